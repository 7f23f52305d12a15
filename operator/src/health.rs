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

use crds::{Condition, ConditionStatus, CONDITION_READY};
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

/// When a node's lease was last renewed as the operator tells it: `age` before `now`, where
/// `age` is how long this replica has seen the lease at one `resourceVersion` by its own
/// monotonic clock ([`crate::election::Observer`]); `None` when the lease was never renewed.
/// The `renewTime` the agent wrote is not compared with the operator's clock: an agent whose
/// clock runs ahead would keep a dead node Ready, one running behind would make a live node
/// NotReady (Kubernetes' node lifecycle controller times node health the same way).
pub fn renewed_as_seen(renewed_at_all: bool, age: Duration, now: &Time) -> Option<Time> {
    renewed_at_all.then(|| Time(now.0.checked_sub(age).unwrap_or(now.0)))
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

    #[test]
    fn a_node_lease_ages_by_the_operators_clock_whatever_clock_the_agent_has() {
        use crate::election::Observer;
        let t0 = std::time::Instant::now();
        // (seconds after t0 on the operator's clock, lease version read, ready wanted)
        let rows = [
            // An agent whose clock runs an hour ahead renews twice, then dies: its lease lasts
            // 40 s from the last change the operator saw, not an hour more.
            (0, "7", true),
            (10, "8", true),
            (49, "8", true),
            (51, "8", false),
            // It comes back (a new version): Ready again at once.
            (60, "9", true),
            // An agent whose clock runs a minute behind, renewing every 10 s, stays Ready.
            (70, "10", true),
            (80, "11", true),
            (90, "12", true),
        ];
        let mut observer = Observer::default();
        for (secs, version, ready) in rows {
            let age = observer.age(Some(version), t0 + Duration::from_secs(secs));
            let now = at(1_000 + i64::try_from(secs).expect("small"));
            let renewed = renewed_as_seen(true, age, &now);
            assert_eq!(
                node_ready(renewed.as_ref(), LEASE, &now).is_ready(),
                ready,
                "version {version} at {secs} s"
            );
        }
        assert_eq!(renewed_as_seen(false, Duration::ZERO, &at(1_000)), None);
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
