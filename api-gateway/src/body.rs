//! Reading request bodies under a size limit, shared by every face of the gateway.
//!
//! A body over the limit is refused, but the rest of it is read and thrown away first (up to
//! [`DRAIN_LIMIT`] bytes and [`DRAIN_TIMEOUT`]): a client that is still sending when the answer
//! goes out would otherwise see a broken pipe instead of the protocol's "too large" error.

use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body_util::BodyExt;

/// How many bytes past the limit are read and discarded so the client gets its answer.
pub const DRAIN_LIMIT: usize = 64 * 1024 * 1024;
/// How long discarding the rest of a refused body may take.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// Read a whole body of at most `limit` bytes.
pub async fn read_limited(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let mut body = body;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
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
}
