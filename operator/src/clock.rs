//! Time arithmetic shared by the lease, health and retention decisions.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::SignedDuration;

/// Time left at `now` until `since + duration`; `None` once that instant is reached, so an
/// interval counts as over exactly at its end (client-go's `expiry.After(now)` rule).
pub(crate) fn remaining(since: &Time, duration: Duration, now: &Time) -> Option<Duration> {
    let limit = SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX);
    let elapsed = now.0.duration_since(since.0);
    let left = limit.checked_sub(elapsed).unwrap_or(SignedDuration::MAX);
    if left <= SignedDuration::ZERO {
        None
    } else {
        Some(Duration::try_from(left).unwrap_or(Duration::MAX))
    }
}

#[cfg(test)]
pub(crate) fn at(seconds: i64) -> Time {
    Time(k8s_openapi::jiff::Timestamp::from_second(seconds).expect("valid timestamp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_is_over_exactly_at_its_end() {
        let rows = [
            (0, 10, 0, Some(10)),
            (0, 10, 9, Some(1)),
            (0, 10, 10, None),
            (0, 10, 11, None),
            (5, 10, 0, Some(15)),
        ];
        for (since, duration, now, want) in rows {
            assert_eq!(
                remaining(&at(since), Duration::from_secs(duration), &at(now)),
                want.map(Duration::from_secs),
                "since {since} for {duration}s at {now}"
            );
        }
    }
}
