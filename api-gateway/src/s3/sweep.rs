//! The orphan sweep: blobs that no index entry names (left by a crash between writing a blob
//! and publishing it, or between unpublishing and deleting it) are removed once they are older
//! than a grace period that covers any request still in flight.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::blob::{BlobError, BlobStore};
use super::index::{IndexError, ObjectIndex};

/// Why a sweep stopped.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    /// The index could not be read.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The blob store failed.
    #[error(transparent)]
    Blob(#[from] BlobError),
}

/// What one sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Unreferenced blobs deleted.
    pub blobs: usize,
    /// Abandoned temporary files deleted.
    pub temporary: usize,
}

/// The blobs of `listed` (ID, modification time) to delete: not referenced, and older than
/// `cutoff`. Pure.
pub fn orphans(
    listed: &[(String, SystemTime)],
    referenced: &std::collections::HashSet<String>,
    cutoff: SystemTime,
) -> Vec<String> {
    listed
        .iter()
        .filter(|(id, modified)| *modified < cutoff && !referenced.contains(id))
        .map(|(id, _)| id.clone())
        .collect()
}

/// One sweep. Blobs are listed before the index is read, so a blob published after the
/// listing is not in it, and one listed but still unpublished is younger than the grace.
pub async fn sweep_once(
    index: &ObjectIndex,
    blobs: &Arc<dyn BlobStore>,
    grace: Duration,
) -> Result<Swept, SweepError> {
    let cutoff = SystemTime::now()
        .checked_sub(grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let listed = blobs.list().await?;
    let referenced = index.referenced_blobs().await?;
    let doomed = orphans(&listed, &referenced, cutoff);
    for id in &doomed {
        blobs.delete(id).await?;
    }
    let temporary = blobs.sweep_temporary(cutoff).await?;
    Ok(Swept {
        blobs: doomed.len(),
        temporary,
    })
}

/// Sweeps at start and then every `interval`, counting what it removes in `removed`.
pub async fn run(
    index: ObjectIndex,
    blobs: Arc<dyn BlobStore>,
    grace: Duration,
    interval: Duration,
    removed: prometheus_client::metrics::counter::Counter,
) {
    loop {
        match sweep_once(&index, &blobs, grace).await {
            Ok(swept) => {
                removed.inc_by(u64::try_from(swept.blobs + swept.temporary).unwrap_or(0));
                if swept != Swept::default() {
                    tracing::info!(
                        blobs = swept.blobs,
                        temporary = swept.temporary,
                        "S3 sweep removed orphans"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "S3 sweep failed; retrying at the next interval"),
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_old_unreferenced_blobs_are_orphans() {
        let now = SystemTime::now();
        let old = now - Duration::from_secs(7200);
        let listed = vec![
            ("kept".to_string(), old),
            ("orphan".to_string(), old),
            ("young".to_string(), now),
        ];
        let referenced = ["kept".to_string()].into_iter().collect();
        assert_eq!(
            orphans(&listed, &referenced, now - Duration::from_secs(3600)),
            ["orphan"]
        );
    }
}
