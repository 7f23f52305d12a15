//! Conditional requests (RFC 9110 §13 as S3 applies it): If-Match and If-Unmodified-Since fail
//! with 412, If-None-Match and If-Modified-Since answer 304 on reads and fail with 412
//! otherwise (a copy's source conditions). A pure function.

use s3s::dto::{ETag, ETagCondition};

/// The preconditions of a request.
#[derive(Debug, Clone, Default)]
pub struct Preconditions {
    /// `If-Match`.
    pub if_match: Option<ETagCondition>,
    /// `If-None-Match`.
    pub if_none_match: Option<ETagCondition>,
    /// `If-Modified-Since`, Unix milliseconds.
    pub if_modified_since_ms: Option<i64>,
    /// `If-Unmodified-Since`, Unix milliseconds.
    pub if_unmodified_since_ms: Option<i64>,
}

/// The outcome of evaluating preconditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Go on.
    Proceed,
    /// 304 Not Modified.
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

fn matches(cond: &ETagCondition, etag: &str) -> bool {
    match cond {
        ETagCondition::Any => true,
        ETagCondition::ETag(ETag::Strong(v) | ETag::Weak(v)) => v == etag,
    }
}

/// Evaluates `p` against an object with ETag `etag` (no quotes) last modified at
/// `modified_ms`, for a read (`GET`/`HEAD`) or not. HTTP dates have whole seconds, so times
/// compare at second precision.
pub fn evaluate(p: &Preconditions, etag: &str, modified_ms: i64, read: bool) -> Outcome {
    let secs = modified_ms.div_euclid(1000);
    if let Some(cond) = &p.if_match {
        if !matches(cond, etag) {
            return Outcome::Failed;
        }
    } else if let Some(t) = p.if_unmodified_since_ms {
        if secs > t.div_euclid(1000) {
            return Outcome::Failed;
        }
    }
    if let Some(cond) = &p.if_none_match {
        if matches(cond, etag) {
            return if read {
                Outcome::NotModified
            } else {
                Outcome::Failed
            };
        }
    } else if let Some(t) = p.if_modified_since_ms {
        if secs <= t.div_euclid(1000) {
            return if read {
                Outcome::NotModified
            } else {
                Outcome::Failed
            };
        }
    }
    Outcome::Proceed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(v: &str) -> Option<ETagCondition> {
        Some(ETagCondition::ETag(ETag::Strong(v.to_string())))
    }

    #[test]
    fn preconditions_follow_rfc_9110_order() {
        const T: i64 = 1_700_000_000_000;
        let p = |im, inm, ims, ius| Preconditions {
            if_match: im,
            if_none_match: inm,
            if_modified_since_ms: ims,
            if_unmodified_since_ms: ius,
        };
        let rows = [
            (p(None, None, None, None), true, Outcome::Proceed),
            (p(tag("abc"), None, None, None), true, Outcome::Proceed),
            (p(tag("xyz"), None, None, None), true, Outcome::Failed),
            (
                p(Some(ETagCondition::Any), None, None, None),
                true,
                Outcome::Proceed,
            ),
            (p(None, tag("abc"), None, None), true, Outcome::NotModified),
            (p(None, tag("abc"), None, None), false, Outcome::Failed),
            (p(None, tag("xyz"), None, None), true, Outcome::Proceed),
            (p(None, None, Some(T), None), true, Outcome::NotModified),
            (p(None, None, Some(T - 1000), None), true, Outcome::Proceed),
            // A copy's source not modified since: the copy fails (S3 answers no 304 to it).
            (p(None, None, Some(T), None), false, Outcome::Failed),
            (p(None, None, Some(T - 1000), None), false, Outcome::Proceed),
            (p(None, None, None, Some(T - 1000)), true, Outcome::Failed),
            (p(None, None, None, Some(T)), true, Outcome::Proceed),
            // If-Match wins over If-Unmodified-Since; If-None-Match over If-Modified-Since.
            (
                p(tag("abc"), None, None, Some(T - 5000)),
                true,
                Outcome::Proceed,
            ),
            (p(None, tag("xyz"), Some(T), None), true, Outcome::Proceed),
        ];
        for (i, (pre, read, want)) in rows.into_iter().enumerate() {
            assert_eq!(evaluate(&pre, "abc", T + 400, read), want, "row {i}");
        }
    }
}
