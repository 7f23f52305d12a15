//! A budget for the etcd lookups of access key IDs that the watch cache does not know.
//!
//! A signed AWS request names its access key ID before anything is verified. A key the cache
//! knows costs nothing; an unknown one is looked up in etcd (it may have been made a moment
//! ago on another replica), which costs two reads. Anyone can send well-formed IDs that do not
//! exist, so those lookups are rationed: a token bucket refilled at a steady rate, holding at
//! most two seconds' worth. Past it a request with an unknown key is answered 503 (the AWS
//! SDKs retry it) without touching etcd; requests with known keys are never affected.

use std::sync::{Mutex, PoisonError};
use std::time::Instant;

/// Lookups per second allowed by default.
pub const DEFAULT_LOOKUPS_PER_SECOND: u32 = 50;

/// The bucket's state: tokens left at `at`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The lookup budget of one gateway.
#[derive(Debug)]
pub struct KeyLookups {
    per_second: Mutex<u32>,
    bucket: Mutex<Bucket>,
}

impl KeyLookups {
    /// A full budget of `per_second` lookups a second (0: none at all).
    pub fn new(per_second: u32) -> Self {
        Self {
            per_second: Mutex::new(per_second),
            bucket: Mutex::new(Bucket {
                tokens: burst(per_second),
                at: Instant::now(),
            }),
        }
    }

    /// Changes the rate (the budget starts full again).
    pub fn set_rate(&self, per_second: u32) {
        *self
            .per_second
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = per_second;
        *self.bucket.lock().unwrap_or_else(PoisonError::into_inner) = Bucket {
            tokens: burst(per_second),
            at: Instant::now(),
        };
    }

    /// Whether one more lookup may go to etcd now (and takes it from the budget).
    pub fn take(&self) -> bool {
        let per_second = *self
            .per_second
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let (next, allowed) = take_at(*bucket, per_second, Instant::now());
        *bucket = next;
        allowed
    }
}

/// Most tokens the bucket holds: two seconds' worth.
fn burst(per_second: u32) -> f64 {
    f64::from(per_second) * 2.0
}

/// The bucket after asking for one token at `now`, and whether it was given. Pure.
fn take_at(bucket: Bucket, per_second: u32, now: Instant) -> (Bucket, bool) {
    let elapsed = now.saturating_duration_since(bucket.at);
    let tokens =
        (bucket.tokens + elapsed.as_secs_f64() * f64::from(per_second)).min(burst(per_second));
    if tokens >= 1.0 {
        (
            Bucket {
                tokens: tokens - 1.0,
                at: now,
            },
            true,
        )
    } else {
        (Bucket { tokens, at: now }, false)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn lookups_are_allowed_up_to_the_burst_then_at_the_steady_rate() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut bucket = Bucket {
            tokens: burst(10),
            at: t0,
        };
        // (when, allowed): 20 at once, the 21st refused; 100 ms later one more; a quiet
        // second refills ten, never more than the burst.
        let mut rows: Vec<(Instant, bool)> = (0..20).map(|_| (t0, true)).collect();
        rows.extend([
            (t0, false),
            (ms(50), false),
            (ms(100), true),
            (ms(100), false),
        ]);
        rows.extend((0..10).map(|_| (ms(1_100), true)));
        rows.push((ms(1_100), false));
        rows.extend((0..20).map(|_| (ms(60_000), true)));
        rows.push((ms(60_000), false));
        for (n, (now, allowed)) in rows.into_iter().enumerate() {
            let (next, given) = take_at(bucket, 10, now);
            assert_eq!(given, allowed, "ask #{n}");
            bucket = next;
        }
    }

    #[test]
    fn a_zero_rate_allows_no_lookup() {
        let lookups = KeyLookups::new(0);
        assert!(!lookups.take());
        lookups.set_rate(1);
        assert!(lookups.take() && lookups.take() && !lookups.take());
    }
}
