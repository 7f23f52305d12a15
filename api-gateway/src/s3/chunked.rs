//! Unsigned `aws-chunked` bodies of anonymous uploads. s3s decodes `aws-chunked` framing
//! while it checks a signature; an unsigned request (boto3 with anonymous credentials still
//! frames its body, with a checksum trailer) reaches the operations framed, and is decoded
//! here: `<hex size>[;extensions]\r\n<data>\r\n` … `0\r\n<trailers>\r\n`.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::blob::{BlobError, ByteStream};

/// Longest chunk header or trailer line accepted.
const MAX_LINE: usize = 4096;
/// Most trailer lines accepted (a checksum or two is what clients send).
const MAX_TRAILERS: usize = 32;

enum Phase {
    Header,
    Data(usize),
    DataEnd,
    Trailers,
    Done,
}

struct Decoder {
    inner: ByteStream<'static>,
    buf: BytesMut,
    phase: Phase,
    input_done: bool,
    trailers: Trailers,
}

/// The trailers of a decoded body (`name:value` lines after its last chunk), complete once the
/// body has ended.
#[derive(Clone, Default)]
pub struct Trailers(Arc<Mutex<HeaderMap>>);

impl Trailers {
    /// The trailers read so far.
    pub fn get(&self) -> HeaderMap {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn add(&self, line: &[u8]) -> Result<(), BlobError> {
        let (name, value) = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.split_once(':'))
            .ok_or_else(|| malformed("a trailer is not name:value"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| malformed("a trailer's name is not a header name"))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| malformed("a trailer's value is not a header value"))?;
        let mut trailers = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if trailers.len() >= MAX_TRAILERS {
            return Err(malformed("too many trailers"));
        }
        trailers.insert(name, value);
        Ok(())
    }
}

fn malformed(what: &str) -> BlobError {
    BlobError::Body(format!("malformed aws-chunked body: {what}"))
}

impl Decoder {
    /// Takes one `\r\n`-terminated line from the buffer, if complete.
    fn line(&mut self) -> Result<Option<Bytes>, BlobError> {
        match self.buf.windows(2).position(|w| w == b"\r\n") {
            Some(i) => {
                let line = self.buf.split_to(i).freeze();
                self.buf.advance(2);
                Ok(Some(line))
            }
            None if self.buf.len() > MAX_LINE => Err(malformed("a line is too long")),
            None => Ok(None),
        }
    }

    /// The next decoded piece, `None` at the end; reads more input when it needs to.
    async fn next_piece(&mut self) -> Result<Option<Bytes>, BlobError> {
        loop {
            match self.phase {
                Phase::Done => return Ok(None),
                Phase::Header => {
                    if let Some(line) = self.line()? {
                        let text = std::str::from_utf8(&line)
                            .map_err(|_| malformed("header is not text"))?;
                        let size = text.split(';').next().unwrap_or("").trim();
                        let n = usize::from_str_radix(size, 16)
                            .map_err(|_| malformed("bad chunk size"))?;
                        self.phase = if n == 0 {
                            Phase::Trailers
                        } else {
                            Phase::Data(n)
                        };
                        continue;
                    }
                }
                Phase::Data(left) => {
                    if !self.buf.is_empty() {
                        let take = left.min(self.buf.len());
                        let piece = self.buf.split_to(take).freeze();
                        self.phase = if take == left {
                            Phase::DataEnd
                        } else {
                            Phase::Data(left - take)
                        };
                        return Ok(Some(piece));
                    }
                }
                Phase::DataEnd => {
                    if self.buf.len() >= 2 {
                        if &self.buf[..2] != b"\r\n" {
                            return Err(malformed("a chunk does not end with CRLF"));
                        }
                        self.buf.advance(2);
                        self.phase = Phase::Header;
                        continue;
                    }
                }
                Phase::Trailers => {
                    if let Some(line) = self.line()? {
                        if line.is_empty() {
                            self.phase = Phase::Done;
                        } else {
                            self.trailers.add(&line)?;
                        }
                        continue;
                    }
                    if self.input_done && self.buf.is_empty() {
                        // Some clients end right after the last trailer line.
                        self.phase = Phase::Done;
                        continue;
                    }
                }
            }
            if self.input_done {
                return Err(malformed("the body ended inside a chunk"));
            }
            match self.inner.next().await {
                Some(chunk) => self.buf.extend_from_slice(&chunk?),
                None => self.input_done = true,
            }
        }
    }
}

/// The payload of an `aws-chunked` body, and its trailers.
pub fn decode(inner: ByteStream<'static>) -> (ByteStream<'static>, Trailers) {
    let trailers = Trailers::default();
    let decoder = Decoder {
        inner,
        buf: BytesMut::new(),
        phase: Phase::Header,
        input_done: false,
        trailers: trailers.clone(),
    };
    let stream = futures::stream::try_unfold(decoder, |mut d| async move {
        Ok(d.next_piece().await?.map(|piece| (piece, d)))
    });
    (Box::pin(stream), trailers)
}

/// Whether a request's `Content-Encoding` says its body is `aws-chunked`.
pub fn is_aws_chunked(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.trim().eq_ignore_ascii_case("aws-chunked"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    async fn run_with_trailers(
        pieces: &[&'static [u8]],
    ) -> Result<(Vec<u8>, HeaderMap), BlobError> {
        let items: Vec<Result<Bytes, BlobError>> =
            pieces.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        let (mut s, trailers) = decode(Box::pin(futures::stream::iter(items)));
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok((out, trailers.get()))
    }

    async fn run(pieces: &[&'static [u8]]) -> Result<Vec<u8>, BlobError> {
        Ok(run_with_trailers(pieces).await?.0)
    }

    #[tokio::test]
    async fn the_trailers_after_the_last_chunk_are_kept() {
        let body: &[u8] = b"3\r\nabc\r\n0\r\nx-amz-checksum-crc32:NSRBwg==\r\nx-other: 1\r\n\r\n";
        let split: Vec<&'static [u8]> = body.chunks(4).collect();
        let (data, trailers) = run_with_trailers(&split).await.unwrap();
        assert_eq!(data, b"abc");
        assert_eq!(trailers["x-amz-checksum-crc32"], "NSRBwg==");
        assert_eq!(trailers["x-other"], "1");
        assert!(run(&[b"0\r\nno colon here\r\n\r\n"]).await.is_err());
    }

    #[tokio::test]
    async fn chunked_bodies_decode_however_they_are_split() {
        let body: &[u8] = b"5\r\nhello\r\n6;chunk-signature=00\r\n world\r\n0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n";
        assert_eq!(run(&[body]).await.unwrap(), b"hello world");
        let split: Vec<&'static [u8]> = body.chunks(3).collect();
        assert_eq!(run(&split).await.unwrap(), b"hello world");
        assert_eq!(run(&[b"0\r\n\r\n"]).await.unwrap(), b"");
        assert_eq!(
            run(&[b"3\r\nabc\r\n0\r\nx-amz-checksum-crc32:AA==\r\n"])
                .await
                .unwrap(),
            b"abc"
        );
    }

    #[tokio::test]
    async fn too_many_trailers_are_an_error() {
        let mut body = b"3\r\nabc\r\n0\r\n".to_vec();
        for i in 0..=MAX_TRAILERS {
            body.extend_from_slice(format!("x-t-{i}: v\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        let body: &'static [u8] = Box::leak(body.into_boxed_slice());
        let err = run(&[body]).await.unwrap_err();
        assert!(err.to_string().contains("too many trailers"), "{err}");
        // As many as allowed are fine.
        let ok: &'static [u8] = b"0\r\nx-a: 1\r\nx-a: 2\r\n\r\n";
        assert!(run(&[ok]).await.is_ok());
    }

    #[tokio::test]
    async fn broken_framing_is_an_error_not_data() {
        for bad in [
            &b"zz\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\r\nhel",
            b"5\r\nhello\r\n",
        ] {
            assert!(
                run(&[bad]).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
