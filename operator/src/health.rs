//! Node health from the node agent's lease, and what it means for the node's instances.
//!
//! A node agent renews its lease every few seconds. The operator reads the last renewal and
//! decides [`node_ready`]: Ready while the lease runs, NotReady from the instant it expires (or
//! when it was never renewed). The operator writes the node's `Ready` condition from that
//! ([`Readiness::condition`]), and the `NodeHealthy` condition of each instance bound to the node
//! from [`instance_health`] — the EC2 system status check. An instance on a NotReady node is
//! *impaired*, never rescheduled: EC2 keeps an instance on its host, and the domain may well still
//! run there. When the agent renews again the node is Ready and its instances healthy, untouched.

use std::time::Duration;

use crds::{Condition, ConditionStatus, Lease, CONDITION_READY};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::clock;

/// Instance condition type mirroring the EC2 system status check: `True` while the instance's
/// node is Ready, `False` (the instance is impaired) while it is not.
pub const CONDITION_NODE_HEALTHY: &str = "NodeHealthy";
/// Node `Ready` reason while the agent renews its lease.
pub const REASON_LEASE_RENEWED: &str = "LeaseRenewed";
/// Node `Ready` reason once the lease has run out.
pub const REASON_LEASE_EXPIRED: &str = "LeaseExpired";
/// Node `Ready` reason for a node whose agent never renewed its lease.
pub const REASON_LEASE_NEVER_RENEWED: &str = "LeaseNeverRenewed";
/// Instance `NodeHealthy` reason while its node is Ready.
pub const REASON_NODE_READY: &str = "NodeReady";
/// Instance `NodeHealthy` reason while its node is not Ready (the instance is impaired).
pub const REASON_NODE_NOT_READY: &str = "NodeNotReady";
/// Lease duration when the node does not say otherwise (Kubernetes' node-monitor grace period).
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(40);

/// Whether a node can be trusted to run its instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// The agent renews its lease.
    Ready,
    /// The lease ran out or was never renewed.
    NotReady {
        /// CamelCase reason for the node's `Ready` condition.
        reason: &'static str,
        /// Short sentence for the node's `Ready` condition.
        message: String,
    },
}

impl Readiness {
    /// Whether the node is Ready.
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready)
    }

    /// The node's `Ready` condition saying this, transitioned at `now` (pass it through
    /// `set_condition`, which keeps the old transition time while the status holds).
    pub fn condition(&self, now: &Time) -> Condition {
        match self {
            Self::Ready => Condition::new(
                CONDITION_READY,
                ConditionStatus::True,
                REASON_LEASE_RENEWED,
                "the node agent renews its lease",
                now.clone(),
            ),
            Self::NotReady { reason, message } => Condition::new(
                CONDITION_READY,
                ConditionStatus::False,
                *reason,
                message.clone(),
                now.clone(),
            ),
        }
    }
}

/// Readiness of a node whose agent last renewed its lease at `last_renew` (`None`: never), for a
/// lease of `lease_duration`, at `now`. The lease covers `[last_renew, last_renew + duration)`:
/// exactly at expiry the node is NotReady. A renewal time ahead of `now` (clock skew) counts as
/// fresh. The message names the last renewal rather than an age, so that it stays the same from
/// one evaluation to the next and the status is not rewritten for nothing.
pub fn node_ready(last_renew: Option<&Time>, lease_duration: Duration, now: &Time) -> Readiness {
    match last_renew {
        None => Readiness::NotReady {
            reason: REASON_LEASE_NEVER_RENEWED,
            message: "the node agent has never renewed its lease".to_owned(),
        },
        Some(renewed) => match clock::remaining(renewed, lease_duration, now) {
            Some(_) => Readiness::Ready,
            None => Readiness::NotReady {
                reason: REASON_LEASE_EXPIRED,
                message: format!("the node agent stopped renewing its lease at {}", renewed.0),
            },
        },
    }
}

/// The duration `lease` states, or else `default_duration`. Pure.
pub fn lease_duration(lease: &Lease, default_duration: Duration) -> Duration {
    lease
        .spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(default_duration, Duration::from_secs)
}

/// What the operator remembers of a node's lease: the version it last read, and since when
/// (by its own clock) the lease has been at that version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSighting {
    /// The lease's `resourceVersion`.
    pub version: String,
    /// When it was first seen at that version: the renewal, as the operator times it.
    pub since: Time,
}

/// How a lease seen for the first time (by an operator that just started or took the lead) is
/// timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstSight {
    /// From the agent's `renewTime` (never later than now): for a node not judged Ready, so
    /// that a node dead for long stays NotReady instead of getting a lease duration more.
    ByRenewTime,
    /// As a renewal seen now: for a node judged Ready, and for a host whose domains would be
    /// given up, so that an agent whose clock runs behind is not taken for dead at once.
    AsRenewedNow,
}

/// The sighting after reading the lease at `version`, whose agent wrote `renew_time`, at `now`.
/// The same version keeps its time (so the node's condition, which shows it, does not change
/// while the node stays down); a new version is a renewal seen now. Only a first sight may take
/// the agent's `renewTime` (as `first` says), and never later than `now`: an agent clock running
/// ahead buys nothing. Timing leases by the operator's clock keeps a skewed agent from being
/// judged by its clock (Kubernetes' node lifecycle controller times node health by its own
/// clock too). Pure.
pub fn sighting(
    previous: Option<&LeaseSighting>,
    version: &str,
    renew_time: Option<&Time>,
    now: &Time,
    first: FirstSight,
) -> LeaseSighting {
    match previous {
        Some(seen) if seen.version == version => seen.clone(),
        Some(_) => LeaseSighting {
            version: version.to_owned(),
            since: now.clone(),
        },
        None => LeaseSighting {
            version: version.to_owned(),
            since: match first {
                FirstSight::AsRenewedNow => now.clone(),
                FirstSight::ByRenewTime => renew_time
                    .filter(|written| written.0 < now.0)
                    .unwrap_or(now)
                    .clone(),
            },
        },
    }
}

/// How long until a lease renewed at `last_renew` expires, so the operator can look again exactly
/// then; `None` when it has already expired or was never renewed.
pub fn expires_in(
    last_renew: Option<&Time>,
    lease_duration: Duration,
    now: &Time,
) -> Option<Duration> {
    last_renew.and_then(|renewed| clock::remaining(renewed, lease_duration, now))
}

/// Health of an instance as far as its host goes (the EC2 system status check).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstanceHealth {
    /// The instance's node is Ready.
    Ok,
    /// The instance's node is not Ready: the instance stays bound to it and is reported impaired.
    Impaired {
        /// CamelCase reason for the instance's `NodeHealthy` condition.
        reason: &'static str,
        /// Short sentence for the instance's `NodeHealthy` condition.
        message: String,
    },
}

impl InstanceHealth {
    /// Whether the instance is impaired.
    pub fn is_impaired(&self) -> bool {
        matches!(self, Self::Impaired { .. })
    }

    /// The instance's `NodeHealthy` condition saying this, transitioned at `now`.
    pub fn condition(&self, now: &Time) -> Condition {
        match self {
            Self::Ok => Condition::new(
                CONDITION_NODE_HEALTHY,
                ConditionStatus::True,
                REASON_NODE_READY,
                "its node is ready",
                now.clone(),
            ),
            Self::Impaired { reason, message } => Condition::new(
                CONDITION_NODE_HEALTHY,
                ConditionStatus::False,
                *reason,
                message.clone(),
                now.clone(),
            ),
        }
    }
}

/// Health of an instance bound to a node of `node_readiness`. Only health: the binding and the
/// EC2 state are left alone (an impaired running instance stays `running` on its node).
pub fn instance_health(node_readiness: &Readiness) -> InstanceHealth {
    match node_readiness {
        Readiness::Ready => InstanceHealth::Ok,
        Readiness::NotReady { message, .. } => InstanceHealth::Impaired {
            reason: REASON_NODE_NOT_READY,
            message: format!("its node is not ready: {message}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::at;
    use crds::common::{find_condition, set_condition};

    const LEASE: Duration = Duration::from_secs(40);

    #[test]
    fn a_lease_lasts_its_own_duration_or_the_default() {
        let lease = |seconds: Option<i32>| {
            let mut l = Lease::new("hv-01", crds::LeaseSpec::default());
            l.spec.lease_duration_seconds = seconds;
            l
        };
        let rows = [
            (Some(60), Duration::from_secs(60)),
            (None, LEASE),
            (Some(-5), LEASE),
        ];
        for (seconds, want) in rows {
            assert_eq!(lease_duration(&lease(seconds), LEASE), want, "{seconds:?}");
        }
    }

    #[test]
    fn node_readiness_follows_the_lease() {
        let expired = |renewed: &str| Readiness::NotReady {
            reason: REASON_LEASE_EXPIRED,
            message: format!("the node agent stopped renewing its lease at {renewed}"),
        };
        let rows = [
            (
                "never renewed",
                None,
                100,
                Readiness::NotReady {
                    reason: REASON_LEASE_NEVER_RENEWED,
                    message: "the node agent has never renewed its lease".into(),
                },
            ),
            ("renewed this instant", Some(100), 100, Readiness::Ready),
            ("renewed a moment ago", Some(100), 101, Readiness::Ready),
            ("one second before expiry", Some(100), 139, Readiness::Ready),
            (
                "exactly at expiry",
                Some(100),
                140,
                expired("1970-01-01T00:01:40Z"),
            ),
            (
                "just after expiry",
                Some(100),
                141,
                expired("1970-01-01T00:01:40Z"),
            ),
            (
                "long gone",
                Some(100),
                100_000,
                expired("1970-01-01T00:01:40Z"),
            ),
            (
                "renewal ahead of our clock",
                Some(130),
                100,
                Readiness::Ready,
            ),
        ];
        for (what, renewed, now, want) in rows {
            let renewed = renewed.map(at);
            assert_eq!(
                node_ready(renewed.as_ref(), LEASE, &at(now)),
                want,
                "{what}"
            );
        }
    }

    /// Reads a lease at each row (seconds on the operator's clock, lease version, agent's
    /// renewTime, Ready wanted) in turn, timing a first sight as `first`, and checks readiness.
    fn check_sightings(rows: &[(i64, &str, i64, bool)], first: FirstSight) {
        let mut seen: Option<LeaseSighting> = None;
        for &(secs, version, written, ready) in rows {
            let now = at(secs);
            let next = sighting(seen.as_ref(), version, Some(&at(written)), &now, first);
            assert_eq!(
                node_ready(Some(&next.since), LEASE, &now).is_ready(),
                ready,
                "version {version} at {secs} s"
            );
            seen = Some(next);
        }
    }

    #[test]
    fn a_node_lease_is_timed_by_the_operators_clock_and_its_condition_holds_still() {
        // (seconds on the operator's clock, lease version, agent's renewTime, Ready wanted)
        let rows: [(i64, &str, i64, bool); 9] = [
            // First sight after an operator start: a renewal the agent dates in the past counts
            // from then, so a node dead for long is NotReady at once...
            (1_000, "7", 900, false),
            // ...until its agent renews again (a new version, seen now).
            (1_010, "8", 1_009, true),
            (1_049, "8", 1_009, true),
            (1_051, "8", 1_009, false),
            // Its clock then runs an hour ahead: nothing bought, the version is what counts.
            (1_060, "9", 4_660, true),
            (1_101, "9", 4_660, false),
            // An hour behind, renewing every 10 s: Ready throughout.
            (1_110, "10", -2_490, true),
            (1_120, "11", -2_480, true),
            (1_130, "12", -2_470, true),
        ];
        check_sightings(&rows, FirstSight::ByRenewTime);
        // An agent whose first renewTime is ahead of the operator's clock is taken as now.
        let ahead = sighting(
            None,
            "1",
            Some(&at(9_999)),
            &at(1_000),
            FirstSight::ByRenewTime,
        );
        assert_eq!(ahead.since, at(1_000));
        // While a node stays down its condition stays the same: nothing to write again.
        let down = sighting(
            None,
            "5",
            Some(&at(500)),
            &at(1_000),
            FirstSight::ByRenewTime,
        );
        let again = sighting(
            Some(&down),
            "5",
            Some(&at(500)),
            &at(1_030),
            FirstSight::ByRenewTime,
        );
        assert_eq!(
            node_ready(Some(&down.since), LEASE, &at(1_000)),
            node_ready(Some(&again.since), LEASE, &at(1_030))
        );
    }

    #[test]
    fn a_node_judged_ready_keeps_a_whole_lease_after_an_operator_start_whatever_its_agents_clock() {
        // (seconds on the operator's clock, lease version, agent's renewTime, Ready wanted)
        let rows: [(i64, &str, i64, bool); 4] = [
            // The agent's clock runs an hour behind: its renewal looks an hour old...
            (1_000, "7", -2_600, true),
            // ...yet it renews, and each renewal is timed by the operator's clock.
            (1_010, "8", -2_590, true),
            (1_049, "8", -2_590, true),
            // It stops renewing: NotReady a lease after the last renewal seen.
            (1_050, "8", -2_590, false),
        ];
        check_sightings(&rows, FirstSight::AsRenewedNow);
        // A node that died just before the start is given up a lease later, not at once.
        let dead = sighting(
            None,
            "3",
            Some(&at(10)),
            &at(1_000),
            FirstSight::AsRenewedNow,
        );
        assert!(node_ready(Some(&dead.since), LEASE, &at(1_039)).is_ready());
        assert!(!node_ready(Some(&dead.since), LEASE, &at(1_040)).is_ready());
    }

    #[test]
    fn a_lease_of_zero_is_never_ready() {
        assert!(!node_ready(Some(&at(100)), Duration::ZERO, &at(100)).is_ready());
    }

    #[test]
    fn expiry_is_reported_for_the_next_look() {
        let rows = [
            (None, 100, None),
            (Some(100), 100, Some(40)),
            (Some(100), 139, Some(1)),
            (Some(100), 140, None),
        ];
        for (renewed, now, want) in rows {
            let renewed = renewed.map(at);
            assert_eq!(
                expires_in(renewed.as_ref(), LEASE, &at(now)),
                want.map(Duration::from_secs),
                "renewed {renewed:?} at {now}"
            );
        }
    }

    #[test]
    fn instances_on_a_not_ready_node_are_impaired() {
        let rows = [
            (node_ready(Some(&at(100)), LEASE, &at(120)), InstanceHealth::Ok),
            (
                node_ready(Some(&at(100)), LEASE, &at(140)),
                InstanceHealth::Impaired {
                    reason: REASON_NODE_NOT_READY,
                    message: "its node is not ready: the node agent stopped renewing its lease at 1970-01-01T00:01:40Z".into(),
                },
            ),
            (
                node_ready(None, LEASE, &at(140)),
                InstanceHealth::Impaired {
                    reason: REASON_NODE_NOT_READY,
                    message: "its node is not ready: the node agent has never renewed its lease".into(),
                },
            ),
        ];
        for (readiness, want) in rows {
            assert_eq!(instance_health(&readiness), want, "{readiness:?}");
        }
    }

    #[test]
    fn a_node_that_returns_is_ready_again_and_its_instances_healthy() {
        let mut node_conditions = Vec::new();
        let mut instance_conditions = Vec::new();
        // (last renewal, now, node ready?, node condition changed?)
        let timeline = [
            (100, 110, true, true),
            (130, 150, true, false),
            // the agent stops renewing at 130: its lease runs out at 170
            (130, 169, true, false),
            (130, 170, false, true),
            (130, 300, false, false),
            // the agent is back
            (310, 311, true, true),
            (340, 350, true, false),
        ];
        for (renewed, now, ready, changed) in timeline {
            let now = at(now);
            let readiness = node_ready(Some(&at(renewed)), LEASE, &now);
            assert_eq!(readiness.is_ready(), ready, "at {now:?}");
            assert_eq!(
                set_condition(&mut node_conditions, readiness.condition(&now)),
                changed,
                "at {now:?}"
            );
            let health = instance_health(&readiness);
            assert_eq!(health.is_impaired(), !ready);
            assert_eq!(
                set_condition(&mut instance_conditions, health.condition(&now)),
                changed
            );
        }
        let node = find_condition(&node_conditions, CONDITION_READY).expect("set");
        assert_eq!(
            (
                node.status,
                node.reason.as_str(),
                node.last_transition_time.clone()
            ),
            (ConditionStatus::True, REASON_LEASE_RENEWED, at(311))
        );
        let instance = find_condition(&instance_conditions, CONDITION_NODE_HEALTHY).expect("set");
        assert_eq!(
            (
                instance.status,
                instance.reason.as_str(),
                instance.last_transition_time.clone()
            ),
            (ConditionStatus::True, REASON_NODE_READY, at(311))
        );
    }
}
