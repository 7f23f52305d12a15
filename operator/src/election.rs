//! Leader election over a `Lease` record, so that two operator replicas never both act.
//! The decisions are [`crate::leader::decide`]; this loop reads and writes the lease.

use std::time::{Duration, Instant};

use crds::{Lease, LeaseSpec, SYSTEM_NAMESPACE};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tokio::sync::watch;

use crate::leader::{decide, Decision, LeaseView};

/// Name of the operator's leader lease in `karri-system`.
pub const LEASE_NAME: &str = "karri-operator";

/// How the election is timed.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How long a renewal holds the lease.
    pub lease_duration: Duration,
    /// The leader stops acting when it could not renew for this long (less than the duration,
    /// so it stops before anyone else may take over).
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl Timing {
    /// Timing derived from a lease duration: renew deadline 2/3 of it, retry every 1/5.
    pub fn from_duration(lease_duration: Duration) -> Self {
        Timing {
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: (lease_duration / 5).max(Duration::from_millis(200)),
        }
    }
}

/// How long this replica has seen the lease record unchanged (the same `resourceVersion`), by
/// its own monotonic clock. client-go times another holder's lease this way rather than from the
/// `renewTime` that holder wrote, which another host's clock set: a clock running behind would
/// make a live leader's renewals look expired, one running ahead would keep a dead leader's
/// lease alive.
#[derive(Debug, Default)]
pub struct Observer {
    seen: Option<(String, Instant)>,
}

impl Observer {
    /// Records that the lease is at `version` (`None`: there is no lease) at `now`, and returns
    /// how long it has been at that version as far as this replica knows.
    pub fn age(&mut self, version: Option<&str>, now: Instant) -> Duration {
        match (&self.seen, version) {
            (Some((seen, since)), Some(version)) if seen == version => {
                now.saturating_duration_since(*since)
            }
            (_, Some(version)) => {
                self.seen = Some((version.to_owned(), now));
                Duration::ZERO
            }
            (_, None) => {
                self.seen = None;
                Duration::ZERO
            }
        }
    }
}

/// The lease as the decision sees it: renewed `age` before `now` (see [`Observer`]) when it was
/// renewed at all.
fn view(lease: &Lease, fallback: Duration, age: Duration, now: Timestamp) -> LeaseView {
    LeaseView {
        holder: lease.spec.holder_identity.clone(),
        renew_time: lease
            .spec
            .renew_time
            .as_ref()
            .map(|_| Time(now.checked_sub(age).unwrap_or(now))),
        lease_duration: lease
            .spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(fallback),
        transitions: lease.spec.lease_transitions.unwrap_or(0),
    }
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// Try once to acquire or renew; true when we hold the lease afterwards.
async fn attempt(
    api: &Api<Lease>,
    identity: &str,
    timing: Timing,
    observer: &mut Observer,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(LEASE_NAME).await?;
    let now = Timestamp::now();
    let version = current
        .as_ref()
        .and_then(|l| l.metadata.resource_version.as_deref());
    let age = observer.age(version, Instant::now());
    let lease_view = current
        .as_ref()
        .map(|l| view(l, timing.lease_duration, age, now));
    match decide(lease_view.as_ref(), identity, &Time(now)) {
        Decision::Follow { .. } => Ok(false),
        Decision::Renew => {
            let Some(mut lease) = current else {
                return Ok(false);
            };
            lease.spec.renew_time = Some(MicroTime(now));
            api.replace(LEASE_NAME, &PostParams::default(), &lease)
                .await
                .map(|_| true)
        }
        Decision::Acquire { transitions } => {
            let spec = LeaseSpec {
                holder_identity: Some(identity.to_string()),
                lease_duration_seconds: Some(seconds(timing.lease_duration)),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions),
            };
            match current {
                // Replace carries the resourceVersion we decided on: a rival's write wins, we lose.
                Some(mut lease) => {
                    lease.spec = spec;
                    api.replace(LEASE_NAME, &PostParams::default(), &lease)
                        .await
                        .map(|_| true)
                }
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(LEASE_NAME.to_string()),
                            namespace: Some(SYSTEM_NAMESPACE.to_string()),
                            ..Default::default()
                        },
                        spec,
                        status: None,
                    };
                    api.create(&PostParams::default(), &lease)
                        .await
                        .map(|_| true)
                }
            }
        }
    }
}

/// Campaign forever: `leading` is true exactly while this replica holds a renewed lease.
pub async fn run(client: Client, identity: String, timing: Timing, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, SYSTEM_NAMESPACE);
    let mut last_renewed: Option<tokio::time::Instant> = None;
    let mut observer = Observer::default();
    loop {
        match attempt(&api, &identity, timing, &mut observer).await {
            Ok(true) => {
                if !*leading.borrow() {
                    tracing::info!(%identity, "became the leader");
                }
                last_renewed = Some(tokio::time::Instant::now());
                leading.send_replace(true);
            }
            Ok(false) => {
                if *leading.borrow() {
                    tracing::warn!(%identity, "another replica holds the lease; stepping down");
                }
                last_renewed = None;
                leading.send_replace(false);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not acquire or renew the leader lease");
                let expired = last_renewed.is_none_or(|t| t.elapsed() >= timing.renew_deadline);
                if expired && *leading.borrow() {
                    tracing::warn!(%identity, "lease not renewed before the deadline; stepping down");
                    leading.send_replace(false);
                }
            }
        }
        tokio::time::sleep(timing.retry_period).await;
    }
}

/// Gives the lease up if `identity` holds it, so that a standby takes over at once instead of
/// when the lease runs out. Call it only after this replica's controllers have stopped and its
/// campaign ([`run`]) has ended. Returns whether it held the lease.
pub async fn release(client: Client, identity: &str) -> Result<bool, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, SYSTEM_NAMESPACE);
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        return Ok(false);
    };
    if lease.spec.holder_identity.as_deref() != Some(identity) {
        return Ok(false);
    }
    // A released lease has no holder; replace carries the resourceVersion read, so a rival
    // that took the lease meanwhile keeps it.
    lease.spec.holder_identity = None;
    lease.spec.renew_time = Some(MicroTime(Timestamp::now()));
    api.replace(LEASE_NAME, &PostParams::default(), &lease)
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_ages_by_this_replicas_clock_from_when_its_version_was_first_seen() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut observer = Observer::default();
        // (seconds after t0, version read, age wanted)
        let rows = [
            (0, Some("10"), 0),
            (2, Some("10"), 2),
            (5, Some("10"), 5),
            // Renewed: a new version starts from zero.
            (6, Some("11"), 0),
            (9, Some("11"), 3),
            // Deleted, then created again.
            (10, None, 0),
            (11, Some("12"), 0),
            (12, Some("12"), 1),
        ];
        for (at, version, want) in rows {
            assert_eq!(
                observer.age(version, t0 + s(at)),
                s(want),
                "{version:?} at {at} s"
            );
        }
    }
}
