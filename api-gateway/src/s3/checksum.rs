//! The additional checksums of uploads (`x-amz-checksum-crc32` and its kin), checked as S3
//! checks them: a value sent in a header, or announced by `x-amz-trailer` and sent after the
//! body (awscli and boto3 send a CRC32 trailer with every upload by default). An upload whose
//! bytes do not hash to it is refused with `BadDigest`, and nothing is stored. The hashing is
//! s3s' own ([`s3s::checksum::ChecksumHasher`]).

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures::StreamExt;
use http::HeaderMap;
use s3s::checksum::ChecksumHasher;
use s3s::crypto::{Checksum as _, Crc32, Crc32c, Crc64Nvme, Sha1, Sha256};

use super::blob::{BlobError, ByteStream};

/// A checksum algorithm of S3 (stored by its S3 name, e.g. `CRC32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Algorithm {
    /// CRC-32 (ISO HDLC).
    Crc32,
    /// CRC-32C (Castagnoli).
    Crc32c,
    /// CRC-64/NVME.
    Crc64Nvme,
    /// SHA-1.
    Sha1,
    /// SHA-256.
    Sha256,
}

impl Algorithm {
    const ALL: [Algorithm; 5] = [
        Algorithm::Crc32,
        Algorithm::Crc32c,
        Algorithm::Crc64Nvme,
        Algorithm::Sha1,
        Algorithm::Sha256,
    ];

    /// The header (and trailer) that carries its value, in lower case.
    pub fn header(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "x-amz-checksum-crc32",
            Algorithm::Crc32c => "x-amz-checksum-crc32c",
            Algorithm::Crc64Nvme => "x-amz-checksum-crc64nvme",
            Algorithm::Sha1 => "x-amz-checksum-sha1",
            Algorithm::Sha256 => "x-amz-checksum-sha256",
        }
    }

    /// Its name in S3's messages.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Crc32 => "CRC32",
            Algorithm::Crc32c => "CRC32C",
            Algorithm::Crc64Nvme => "CRC64NVME",
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
        }
    }

    /// The algorithm S3 names `name` (`CRC32`, `SHA256` …, as `x-amz-checksum-algorithm` and
    /// `ChecksumAlgorithm` give it), in any case.
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(name.trim()))
    }

    fn of_header(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.header().eq_ignore_ascii_case(name.trim()))
    }

    fn hasher(self) -> ChecksumHasher {
        let mut h = ChecksumHasher::default();
        match self {
            Algorithm::Crc32 => h.crc32 = Some(Crc32::new()),
            Algorithm::Crc32c => h.crc32c = Some(Crc32c::new()),
            Algorithm::Crc64Nvme => h.crc64nvme = Some(Crc64Nvme::new()),
            Algorithm::Sha1 => h.sha1 = Some(Sha1::new()),
            Algorithm::Sha256 => h.sha256 = Some(Sha256::new()),
        }
        h
    }

    fn value_of(self, sums: &s3s::dto::Checksum) -> Option<&str> {
        match self {
            Algorithm::Crc32 => sums.checksum_crc32.as_deref(),
            Algorithm::Crc32c => sums.checksum_crc32c.as_deref(),
            Algorithm::Crc64Nvme => sums.checksum_crc64nvme.as_deref(),
            Algorithm::Sha1 => sums.checksum_sha1.as_deref(),
            Algorithm::Sha256 => sums.checksum_sha256.as_deref(),
        }
    }
}

/// A checksum an upload asks to be checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    /// Its algorithm.
    pub algorithm: Algorithm,
    /// The value from its header; `None` when a trailer brings it.
    pub value: Option<String>,
}

/// Why an upload's checksum is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChecksumError {
    /// More than one algorithm's value was sent.
    #[error("Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.")]
    Several,
    /// `x-amz-trailer` names something other than a checksum.
    #[error("The value specified in the x-amz-trailer header is not supported: {0}")]
    UnsupportedTrailer(String),
    /// The trailer `x-amz-trailer` announced did not come.
    #[error("The {0} trailer announced by x-amz-trailer did not arrive after the body.")]
    MissingTrailer(&'static str),
    /// The bytes do not hash to the value sent.
    #[error("The {0} you specified did not match the calculated checksum.")]
    Mismatch(&'static str),
}

/// The checksum the request `headers` ask to be checked, if any.
pub fn asked(headers: &HeaderMap) -> Result<Option<Asked>, ChecksumError> {
    let mut found = Algorithm::ALL.into_iter().filter_map(|a| {
        headers.get(a.header()).map(|v| Asked {
            algorithm: a,
            value: Some(String::from_utf8_lossy(v.as_bytes()).trim().to_owned()),
        })
    });
    let first = found.next();
    if found.next().is_some() {
        return Err(ChecksumError::Several);
    }
    if first.is_some() {
        return Ok(first);
    }
    let Some(trailer) = headers.get("x-amz-trailer") else {
        return Ok(None);
    };
    let name = String::from_utf8_lossy(trailer.as_bytes()).into_owned();
    match Algorithm::of_header(&name) {
        Some(algorithm) => Ok(Some(Asked {
            algorithm,
            value: None,
        })),
        None => Err(ChecksumError::UnsupportedTrailer(name)),
    }
}

/// A running hash of the bytes a stream carries, read once the stream has ended.
#[derive(Clone)]
pub struct Running(Arc<Mutex<Option<ChecksumHasher>>>);

impl Running {
    /// The value of the bytes seen, base64 as S3 writes it.
    pub fn value(&self, algorithm: Algorithm) -> Option<String> {
        let hasher = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        algorithm.value_of(&hasher.finalize()).map(str::to_owned)
    }
}

/// `body`, hashing what it carries with `algorithm` as it goes.
pub fn hashing(body: ByteStream<'static>, algorithm: Algorithm) -> (ByteStream<'static>, Running) {
    let running = Running(Arc::new(Mutex::new(Some(algorithm.hasher()))));
    let seen = running.clone();
    let stream = body.map(move |piece: Result<Bytes, BlobError>| {
        if let Ok(bytes) = &piece {
            if let Some(h) = seen
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_mut()
            {
                h.update(bytes);
            }
        }
        piece
    });
    (Box::pin(stream), running)
}

/// Checks the `computed` value of an upload against what `asked` sent, in its header or in
/// `trailers` (read after the body); returns the value to answer with.
pub fn verify(
    asked: &Asked,
    trailers: Option<&HeaderMap>,
    computed: Option<String>,
) -> Result<String, ChecksumError> {
    let algorithm = asked.algorithm;
    let sent = match &asked.value {
        Some(v) => v.clone(),
        None => trailers
            .and_then(|t| t.get(algorithm.header()))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned())
            .ok_or(ChecksumError::MissingTrailer(algorithm.header()))?,
    };
    match computed {
        Some(c) if c == sent => Ok(c),
        _ => Err(ChecksumError::Mismatch(algorithm.name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    type Row<'a> = (
        &'a [(&'a str, &'a str)],
        Result<Option<Asked>, ChecksumError>,
    );

    #[test]
    fn an_upload_asks_for_one_checksum_in_a_header_or_its_trailer() {
        let rows: [Row; 6] = [
            (&[], Ok(None)),
            (
                &[("x-amz-checksum-crc32", "AAAAAA==")],
                Ok(Some(Asked {
                    algorithm: Algorithm::Crc32,
                    value: Some("AAAAAA==".into()),
                })),
            ),
            (
                &[("x-amz-trailer", "x-amz-checksum-crc64nvme")],
                Ok(Some(Asked {
                    algorithm: Algorithm::Crc64Nvme,
                    value: None,
                })),
            ),
            (
                &[
                    ("x-amz-checksum-crc32", "AAAAAA=="),
                    ("x-amz-checksum-sha1", "x"),
                ],
                Err(ChecksumError::Several),
            ),
            (
                &[("x-amz-trailer", "x-amz-meta-other")],
                Err(ChecksumError::UnsupportedTrailer("x-amz-meta-other".into())),
            ),
            // Other x-amz-checksum- headers say how, not what.
            (&[("x-amz-checksum-type", "FULL_OBJECT")], Ok(None)),
        ];
        for (sent, want) in rows {
            assert_eq!(asked(&headers(sent)), want, "{sent:?}");
        }
    }

    async fn computed(algorithm: Algorithm, data: &'static [u8]) -> Option<String> {
        let pieces: Vec<Result<Bytes, BlobError>> =
            data.chunks(3).map(|c| Ok(Bytes::from_static(c))).collect();
        let (mut stream, running) = hashing(Box::pin(futures::stream::iter(pieces)), algorithm);
        while stream.next().await.is_some() {}
        running.value(algorithm)
    }

    #[tokio::test]
    async fn values_are_the_published_ones_of_each_algorithm() {
        // "hello world" as AWS's documentation and `aws s3api` show its checksums.
        let rows = [
            (Algorithm::Crc32, "DUoRhQ=="),
            (Algorithm::Crc32c, "yZRlqg=="),
            (Algorithm::Sha1, "Kq5sNclPz7QV2+lfQIuc6R7oRu0="),
            (
                Algorithm::Sha256,
                "uU0nuZNNPgilLlLX2n2r+sSE7+N6U4DukIj3rOLvzek=",
            ),
        ];
        for (algorithm, want) in rows {
            assert_eq!(
                computed(algorithm, b"hello world").await.as_deref(),
                Some(want),
                "{algorithm:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_value_that_differs_or_a_trailer_that_never_came_is_refused() {
        let value = computed(Algorithm::Crc32, b"hello world").await;
        let in_header = |v: &str| Asked {
            algorithm: Algorithm::Crc32,
            value: Some(v.into()),
        };
        assert_eq!(
            verify(&in_header("DUoRhQ=="), None, value.clone()),
            Ok("DUoRhQ==".into())
        );
        assert_eq!(
            verify(&in_header("AAAAAA=="), None, value.clone()),
            Err(ChecksumError::Mismatch("CRC32"))
        );
        let in_trailer = Asked {
            algorithm: Algorithm::Crc32,
            value: None,
        };
        let trailers = headers(&[("x-amz-checksum-crc32", "DUoRhQ==")]);
        assert_eq!(
            verify(&in_trailer, Some(&trailers), value.clone()),
            Ok("DUoRhQ==".into())
        );
        let wrong = headers(&[("x-amz-checksum-crc32", "AAAAAA==")]);
        assert_eq!(
            verify(&in_trailer, Some(&wrong), value.clone()),
            Err(ChecksumError::Mismatch("CRC32"))
        );
        assert_eq!(
            verify(&in_trailer, None, value),
            Err(ChecksumError::MissingTrailer("x-amz-checksum-crc32"))
        );
    }
}
