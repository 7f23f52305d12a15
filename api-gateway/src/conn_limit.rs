//! A cap on the connections the gateway holds open at once.
//!
//! Every connection costs a file descriptor and buffers. Past the cap a new connection is
//! closed as soon as it is accepted (counted in `karri_gateway_connections_refused`), so that
//! the descriptors the gateway needs for etcd, S3 blobs and its own files stay free: a process
//! out of descriptors fails those, and its accept loop stalls. The client sees its connection
//! closed before TLS completes: the AWS SDKs retry that, other clients report it. The cap
//! bounds the connections of all listeners together, so that it bounds the process's
//! descriptors; [`connection_cap`] keeps it within the process's descriptor limit. When the
//! AWS face has a listener of its own, [`split_cap`] keeps part of the cap for the resource
//! API listener alone, so that S3 and EC2 clients never lock node agents, the operator and
//! kubectl out.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum_server::accept::Accept;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The effective connection cap: `wanted`, but at most half the open-file limit `nofile`
/// (`None`: unlimited), leaving the other half to etcd, blobs and files. Pure.
pub fn connection_cap(wanted: usize, nofile: Option<u64>) -> usize {
    match nofile {
        Some(limit) => wanted.min(usize::try_from(limit / 2).unwrap_or(usize::MAX)),
        None => wanted,
    }
}

/// The cap divided between the resource API listener and a separate AWS listener:
/// `(resource, aws)`. The resource API keeps a quarter (at least one connection), the AWS
/// face the rest; `None` when `cap` is too small to give each listener one. Pure.
pub fn split_cap(cap: usize) -> Option<(usize, usize)> {
    let resource = (cap / 4).max(1);
    let aws = cap.checked_sub(resource)?;
    (aws > 0).then_some((resource, aws))
}

/// Wraps an acceptor: each connection holds one of `cap` permits while it is open; a
/// connection that finds none left is closed.
#[derive(Clone, Debug)]
pub struct CappedAcceptor<A> {
    inner: A,
    permits: Arc<Semaphore>,
    open: Gauge,
    refused: Counter,
}

impl<A> CappedAcceptor<A> {
    /// `inner` with at most `cap` connections open at once through every clone of the result;
    /// `open` counts the connections held, `refused` those closed at the cap (both may be
    /// shared with the acceptors of other listeners).
    pub fn new(inner: A, cap: usize, open: Gauge, refused: Counter) -> Self {
        Self {
            inner,
            permits: Arc::new(Semaphore::new(cap)),
            open,
            refused,
        }
    }
}

/// What a capped connection holds until it closes.
#[derive(Debug)]
struct Held {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A connection's stream with its permit.
#[derive(Debug)]
pub struct Capped<T> {
    inner: T,
    _held: Held,
}

impl<I, S, A> Accept<I, S> for CappedAcceptor<A>
where
    A: Accept<I, S>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = Capped<A::Stream>;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.refused.inc();
            tracing::debug!("connection cap reached: closing a new connection");
            // Dropping the stream closes the connection.
            return Box::pin(std::future::ready(Err(io::Error::other(
                "the gateway holds as many connections as it may",
            ))));
        };
        self.open.inc();
        let held = Held {
            _permit: permit,
            open: self.open.clone(),
        };
        let accepted = self.inner.accept(stream, service);
        Box::pin(async move {
            let (inner, service) = accepted.await?;
            Ok((Capped { inner, _held: held }, service))
        })
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Capped<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

/// `AsyncWrite` for a stream wrapper that writes straight to its `inner` stream.
macro_rules! write_through {
    ($wrapper:ident) => {
        impl<T: AsyncWrite + Unpin> AsyncWrite for $wrapper<T> {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.get_mut().inner).poll_flush(cx)
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
            }
        }
    };
}

write_through!(Capped);

/// Wraps an acceptor: a connection that sends nothing within `deadline` of being accepted (of
/// its TLS handshake, when `inner` is the TLS acceptor) is closed. hyper's header timeout
/// starts only once it reads a request, and deciding between HTTP/1.1 and HTTP/2 first waits
/// for the client's opening bytes with no deadline: a client that connects and stays silent
/// would otherwise hold its connection for ever.
#[derive(Clone, Debug)]
pub struct FirstBytesAcceptor<A> {
    inner: A,
    deadline: std::time::Duration,
}

impl<A> FirstBytesAcceptor<A> {
    /// `inner`, whose connections must send within `deadline`.
    pub fn new(inner: A, deadline: std::time::Duration) -> Self {
        Self { inner, deadline }
    }
}

impl<I, S, A> Accept<I, S> for FirstBytesAcceptor<A>
where
    A: Accept<I, S>,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
{
    type Stream = FirstBytes<A::Stream>;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: I, service: S) -> Self::Future {
        let accepted = self.inner.accept(stream, service);
        let deadline = self.deadline;
        Box::pin(async move {
            let (inner, service) = accepted.await?;
            Ok((FirstBytes::new(inner, deadline), service))
        })
    }
}

/// A stream whose first bytes must arrive within a deadline ([`FirstBytesAcceptor`]).
#[derive(Debug)]
pub struct FirstBytes<T> {
    inner: T,
    /// Until the first bytes came.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> FirstBytes<T> {
    /// `inner`, whose first bytes must arrive within `deadline` from now.
    pub fn new(inner: T, deadline: std::time::Duration) -> Self {
        Self {
            inner,
            deadline: Some(Box::pin(tokio::time::sleep(deadline))),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstBytes<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some(deadline) = this.deadline.as_mut() else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) if buf.filled().len() == before => Poll::Ready(Ok(())),
            Poll::Ready(result) => {
                this.deadline = None;
                Poll::Ready(result)
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client sent no request in time",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

write_through!(FirstBytes);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sends_nothing_is_given_up_at_the_deadline() {
        let deadline = std::time::Duration::from_secs(120);
        let (_client, server) = tokio::io::duplex(64);
        let mut stream = FirstBytes::new(server, deadline);
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 8];
        let err = stream.read(&mut buf).await.expect_err("no bytes came");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), deadline);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_sent_its_first_bytes_has_no_deadline_left() {
        let deadline = std::time::Duration::from_secs(120);
        let (mut client, server) = tokio::io::duplex(64);
        let mut stream = FirstBytes::new(server, deadline);
        client.write_all(b"GET").await.expect("written");
        let mut buf = [0u8; 8];
        assert_eq!(stream.read(&mut buf).await.expect("read"), 3);
        // Long after the deadline, the connection still waits for more (hyper's own
        // timeouts take over).
        let later = tokio::spawn(async move {
            let mut rest = [0u8; 8];
            stream.read(&mut rest).await.map(|n| rest[..n].to_vec())
        });
        tokio::time::sleep(deadline * 3).await;
        client.write_all(b" /").await.expect("written");
        let rest = later
            .await
            .expect("no panic")
            .expect("read after the deadline");
        assert_eq!(rest, b" /");
    }

    #[test]
    fn the_cap_leaves_half_the_descriptor_limit_to_everything_else() {
        let rows = [
            (10_000, None, 10_000),
            (10_000, Some(1_048_576), 10_000),
            (10_000, Some(1_024), 512),
            (10_000, Some(1), 0),
            (100, Some(1_024), 100),
        ];
        for (wanted, nofile, cap) in rows {
            assert_eq!(connection_cap(wanted, nofile), cap, "{wanted} {nofile:?}");
        }
    }

    #[test]
    fn a_separate_aws_listener_leaves_a_quarter_of_the_cap_to_the_resource_api() {
        let rows = [
            (10_000, Some((2_500, 7_500))),
            (512, Some((128, 384))),
            (7, Some((1, 6))),
            (4, Some((1, 3))),
            (2, Some((1, 1))),
            (1, None),
            (0, None),
        ];
        for (cap, split) in rows {
            assert_eq!(split_cap(cap), split, "{cap}");
        }
    }
}
