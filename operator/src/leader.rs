//! Lease-based leader election decisions, as client-go's `leaderelection`: one lease record
//! names the leader; the leader renews it well within its duration; anyone may take it over once
//! it has expired. Only one operator replica acts at a time; the others follow and try again.
//!
//! The caller reads the lease, asks [`decide`], and writes the result with a compare-and-swap on
//! the lease's `resourceVersion` (create when there was none). Losing that race (409) means
//! someone else acted first: read again and decide again. A leader must stop acting as soon as
//! [`is_leader`] turns false, before anyone else can take the lease over.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::clock;

/// What leader election needs from a lease record (`spec.holderIdentity`, `spec.renewTime`,
/// `spec.leaseDurationSeconds`, `spec.leaseTransitions`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseView {
    /// Identity of the current holder; `None` or empty when released.
    pub holder: Option<String>,
    /// When the holder last renewed. client-go times the lease from the moment *it* observed the
    /// record change, which is immune to clock skew between replicas; pass that instead when the
    /// caller tracks it.
    pub renew_time: Option<Time>,
    /// How long a renewal holds the lease.
    pub lease_duration: Duration,
    /// How many times the lease has changed hands.
    pub transitions: i32,
}

impl LeaseView {
    /// The holder, unless there is none (absent or empty).
    fn holder(&self) -> Option<&str> {
        self.holder.as_deref().filter(|h| !h.is_empty())
    }

    /// Time left on the lease at `now`; `None` once expired (exactly at expiry included) or when
    /// it was never renewed.
    fn remaining(&self, now: &Time) -> Option<Duration> {
        self.renew_time
            .as_ref()
            .and_then(|renewed| clock::remaining(renewed, self.lease_duration, now))
    }
}

/// What a replica should do with the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Take the lease: write ourselves as holder, `acquireTime` and `renewTime` now, and
    /// `leaseTransitions` set to `transitions` (the old count plus one; 0 for a lease that did
    /// not exist yet, which is created).
    Acquire {
        /// The `leaseTransitions` value to write.
        transitions: i32,
    },
    /// We hold the lease: write `renewTime` now, nothing else.
    Renew,
    /// Someone else holds a live lease: do not act; try again (at the latest) once it expires.
    Follow {
        /// The current holder.
        holder: String,
        /// Time left on the holder's lease.
        expires_in: Duration,
    },
}

/// What replica `identity` should do at `now` given the lease (`None`: no lease record yet).
/// A lease is taken when it has no holder, when its holder's lease has run out (exactly at expiry
/// included), or when it was never renewed. The holder always renews, even late: nobody has taken
/// the lease over, and the compare-and-swap write settles any race.
pub fn decide(lease: Option<&LeaseView>, identity: &str, now: &Time) -> Decision {
    let Some(lease) = lease else {
        return Decision::Acquire { transitions: 0 };
    };
    match lease.holder() {
        Some(holder) if holder == identity => Decision::Renew,
        Some(holder) => match lease.remaining(now) {
            Some(expires_in) => Decision::Follow {
                holder: holder.to_owned(),
                expires_in,
            },
            None => Decision::Acquire {
                transitions: lease.transitions.saturating_add(1),
            },
        },
        None => Decision::Acquire {
            transitions: lease.transitions.saturating_add(1),
        },
    }
}

/// Whether `identity` leads at `now`: it holds the lease and the lease has not expired. A leader
/// whose renewals fail must stop acting when this turns false.
pub fn is_leader(lease: Option<&LeaseView>, identity: &str, now: &Time) -> bool {
    lease.is_some_and(|l| l.holder() == Some(identity) && l.remaining(now).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::at;

    const ME: &str = "operator-a";
    const OTHER: &str = "operator-b";

    fn lease(holder: Option<&str>, renewed: Option<i64>, transitions: i32) -> LeaseView {
        LeaseView {
            holder: holder.map(str::to_owned),
            renew_time: renewed.map(at),
            lease_duration: Duration::from_secs(15),
            transitions,
        }
    }

    fn follow(expires_in: u64) -> Decision {
        Decision::Follow {
            holder: OTHER.into(),
            expires_in: Duration::from_secs(expires_in),
        }
    }

    #[test]
    fn leader_election_decides_like_client_go() {
        let rows = [
            (
                "no lease yet: create it",
                None,
                100,
                Decision::Acquire { transitions: 0 },
            ),
            (
                "fresh lease without holder",
                Some(lease(None, None, 0)),
                100,
                Decision::Acquire { transitions: 1 },
            ),
            (
                "released lease (empty holder)",
                Some(lease(Some(""), Some(95), 4)),
                100,
                Decision::Acquire { transitions: 5 },
            ),
            (
                "released lease (no holder)",
                Some(lease(None, Some(95), 4)),
                100,
                Decision::Acquire { transitions: 5 },
            ),
            (
                "another holder within duration",
                Some(lease(Some(OTHER), Some(95), 2)),
                100,
                follow(10),
            ),
            (
                "another holder renewed this instant",
                Some(lease(Some(OTHER), Some(100), 2)),
                100,
                follow(15),
            ),
            (
                "another holder one second before expiry",
                Some(lease(Some(OTHER), Some(95), 2)),
                109,
                follow(1),
            ),
            (
                "clock exactly at expiry",
                Some(lease(Some(OTHER), Some(95), 2)),
                110,
                Decision::Acquire { transitions: 3 },
            ),
            (
                "expired lease taken over",
                Some(lease(Some(OTHER), Some(95), 2)),
                500,
                Decision::Acquire { transitions: 3 },
            ),
            (
                "holder never renewed",
                Some(lease(Some(OTHER), None, 2)),
                100,
                Decision::Acquire { transitions: 3 },
            ),
            (
                "holder renews",
                Some(lease(Some(ME), Some(95), 7)),
                100,
                Decision::Renew,
            ),
            (
                "holder renews even after expiry",
                Some(lease(Some(ME), Some(95), 7)),
                500,
                Decision::Renew,
            ),
            (
                "renewal ahead of our clock",
                Some(lease(Some(OTHER), Some(105), 2)),
                100,
                follow(20),
            ),
        ];
        for (what, lease, now, want) in rows {
            assert_eq!(decide(lease.as_ref(), ME, &at(now)), want, "{what}");
        }
    }

    #[test]
    fn leadership_lasts_while_the_lease_runs() {
        let rows = [
            ("no lease", None, 100, false),
            ("mine, fresh", Some(lease(Some(ME), Some(95), 1)), 100, true),
            (
                "mine, one second left",
                Some(lease(Some(ME), Some(95), 1)),
                109,
                true,
            ),
            (
                "mine, exactly at expiry",
                Some(lease(Some(ME), Some(95), 1)),
                110,
                false,
            ),
            (
                "mine, never renewed",
                Some(lease(Some(ME), None, 1)),
                100,
                false,
            ),
            (
                "someone else's",
                Some(lease(Some(OTHER), Some(95), 1)),
                100,
                false,
            ),
            ("released", Some(lease(Some(""), Some(95), 1)), 100, false),
        ];
        for (what, lease, now, want) in rows {
            assert_eq!(is_leader(lease.as_ref(), ME, &at(now)), want, "{what}");
        }
    }

    #[test]
    fn two_replicas_never_both_lead() {
        // Replay: A creates the lease, renews, dies; B follows, then takes over at expiry.
        let mut record: Option<LeaseView> = None;
        let apply = |record: &mut Option<LeaseView>, who: &str, now: i64, decision: &Decision| {
            match decision {
                Decision::Acquire { transitions } => {
                    *record = Some(LeaseView {
                        holder: Some(who.into()),
                        renew_time: Some(at(now)),
                        lease_duration: Duration::from_secs(15),
                        transitions: *transitions,
                    });
                }
                Decision::Renew => {
                    if let Some(r) = record.as_mut() {
                        r.renew_time = Some(at(now));
                    }
                }
                Decision::Follow { .. } => {}
            }
        };
        // (time, replica that runs its loop)
        let steps = [
            (0, ME),
            (1, OTHER),
            (5, ME),
            (6, OTHER),
            (10, ME),
            // ME dies after renewing at 10; its lease runs until 25
            (12, OTHER),
            (24, OTHER),
            (25, OTHER),
            // ME comes back and finds OTHER leading
            (26, ME),
        ];
        // What each replica last read or wrote: it judges its own leadership from that alone.
        let mut views: std::collections::BTreeMap<&str, Option<LeaseView>> =
            [(ME, None), (OTHER, None)].into_iter().collect();
        let mut leaders = Vec::new();
        for (step, &(now, who)) in steps.iter().enumerate() {
            let decision = decide(record.as_ref(), who, &at(now));
            apply(&mut record, who, now, &decision);
            views.insert(who, record.clone());
            // Until the next step, at most one replica believes it leads.
            let until = steps.get(step + 1).map_or(now + 30, |&(next, _)| next);
            for t in now..until {
                let believers: Vec<&str> = views
                    .iter()
                    .filter(|(id, view)| is_leader(view.as_ref(), id, &at(t)))
                    .map(|(id, _)| *id)
                    .collect();
                assert!(believers.len() <= 1, "{believers:?} all lead at {t}");
            }
            leaders.push(
                record
                    .as_ref()
                    .and_then(|r| r.holder.clone())
                    .unwrap_or_default(),
            );
        }
        assert_eq!(leaders, [ME, ME, ME, ME, ME, ME, ME, OTHER, OTHER]);
        assert_eq!(record.map(|r| r.transitions), Some(1));
    }
}
