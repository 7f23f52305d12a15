//! Reading request bodies under a size limit, shared by every face of the gateway.
//!
//! A body over the limit is refused, but the rest of it is read and thrown away first (up to
//! [`DRAIN_LIMIT`] bytes and [`DRAIN_TIMEOUT`]): a client that is still sending when the answer
//! goes out would otherwise see a broken pipe instead of the protocol's "too large" error.
//!
//! A body that stops arriving for [`BODY_IDLE_TIMEOUT`], or takes longer than [`BODY_TIMEOUT`]
//! in all, is given up: a client trickling bytes must not hold a connection and its buffer for
//! ever.

use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body_util::BodyExt;

/// How many bytes past the limit are read and discarded so the client gets its answer.
pub const DRAIN_LIMIT: usize = 64 * 1024 * 1024;
/// How long discarding the rest of a refused body may take.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a body may send nothing before it is given up.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long reading a whole body may take (the limits are a few MiB at most).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a body could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    /// The body is larger than the limit.
    #[error("the request body is larger than {limit} bytes")]
    TooLarge {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// The connection failed while the body was read.
    #[error("the request body could not be read")]
    Unreadable,
    /// The body stopped arriving, or came too slowly.
    #[error("the request body did not arrive in time")]
    Stalled,
}

/// Read a whole body of at most `limit` bytes, within [`BODY_IDLE_TIMEOUT`] between parts and
/// [`BODY_TIMEOUT`] in all.
pub async fn read_limited(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    tokio::time::timeout(BODY_TIMEOUT, read_within(body, limit, BODY_IDLE_TIMEOUT))
        .await
        .map_err(|_| BodyError::Stalled)?
}

async fn read_within(body: Body, limit: usize, idle: Duration) -> Result<Bytes, BodyError> {
    let mut body = body;
    let mut buf = Vec::new();
    while let Some(frame) = tokio::time::timeout(idle, body.frame())
        .await
        .map_err(|_| BodyError::Stalled)?
    {
        let frame = frame.map_err(|_| BodyError::Unreadable)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > limit {
            let seen = buf.len() + data.len();
            drop(buf);
            // A client that keeps sending after this is cut off when the connection closes.
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain(body, seen)).await;
            return Err(BodyError::TooLarge { limit });
        }
        buf.extend_from_slice(&data);
    }
    Ok(Bytes::from(buf))
}

/// Read and discard the rest of a body, up to [`DRAIN_LIMIT`] bytes in all.
async fn drain(mut body: Body, mut seen: usize) {
    while seen <= DRAIN_LIMIT {
        match body.frame().await {
            Some(Ok(frame)) => seen += frame.data_ref().map_or(0, |d| d.len()),
            Some(Err(_)) | None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let got = read_limited(Body::from("hello"), 5).await;
        assert_eq!(got, Ok(Bytes::from("hello")));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_too_large() {
        let got = read_limited(Body::from("hello!"), 5).await;
        assert_eq!(got, Err(BodyError::TooLarge { limit: 5 }));
    }

    #[tokio::test]
    async fn the_rest_of_a_refused_streamed_body_is_consumed() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
        let sender = tokio::spawn(async move {
            for _ in 0..10 {
                if tx.send(Ok(Bytes::from(vec![b'x'; 1024]))).await.is_err() {
                    return false;
                }
            }
            true
        });
        let got = read_limited(body, 2048).await;
        assert_eq!(got, Err(BodyError::TooLarge { limit: 2048 }));
        assert!(
            sender.await.expect("the sender does not panic"),
            "every chunk the client sent was read"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_is_given_up() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
        tx.send(Ok(Bytes::from_static(b"part")))
            .await
            .expect("sent");
        let started = tokio::time::Instant::now();
        let got = read_limited(body, 1024).await;
        assert_eq!(got, Err(BodyError::Stalled));
        assert_eq!(started.elapsed(), BODY_IDLE_TIMEOUT);
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_trickles_is_given_up_after_the_whole_timeout() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
        // One byte just inside the idle timeout, for ever.
        let trickle = tokio::spawn(async move {
            loop {
                tokio::time::sleep(BODY_IDLE_TIMEOUT - Duration::from_secs(1)).await;
                if tx.send(Ok(Bytes::from_static(b"x"))).await.is_err() {
                    return;
                }
            }
        });
        let started = tokio::time::Instant::now();
        let got = read_limited(body, 1024).await;
        assert_eq!(got, Err(BodyError::Stalled));
        assert_eq!(started.elapsed(), BODY_TIMEOUT);
        trickle.abort();
    }
}
