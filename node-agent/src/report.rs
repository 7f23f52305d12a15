//! The `DomainRunning` condition the agent writes into an instance's status (besides it, the
//! agent writes only `consoleOutput`, `consoleOutputTime` and `lastRebootRequest`).
//!
//! The operator owns every other field of an instance's status (`state`, `nodeName`, the
//! `Scheduled` and `Ready` conditions, times); the agent reports only what it observes of the
//! libvirt domain, with the same condition type, statuses and reasons the operator reads
//! (`operator::lifecycle::Domain::condition`, re-implemented here because binaries never import
//! each other):
//!
//! | domain on the node | status | reason |
//! |---|---|---|
//! | runs (or is shutting down: its QEMU process is there) | `True` | `Running` |
//! | paused (its QEMU process is there, its guest runs nothing) | `True` | `Paused` |
//! | defined but shut off, or crashed | `False` | `ShutOff` |
//! | none of the record's (absent, or left by an earlier record of that name) | `False` | `Undefined` |
//!
//! The condition's `observedGeneration` is the `metadata.generation` the agent acted on. Pure:
//! the controller reads the record, calls [`with_report`] and writes the result only when it
//! differs.

use crds::common::set_condition;
use crds::{Condition, ConditionStatus, InstanceStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::hypervisor::ObservedDomain;
use crate::plan::DomainState;

pub use crds::{CONDITION_DOMAIN_RUNNING, REASON_DOMAIN_PAUSED};
/// `DomainRunning` reason (status `True`): the domain runs.
pub const REASON_RUNNING: &str = "Running";
/// `DomainRunning` reason (status `False`): the domain is defined but shut off.
pub const REASON_SHUT_OFF: &str = "ShutOff";
/// `DomainRunning` reason (status `False`): no domain of the instance is defined on the node.
pub const REASON_UNDEFINED: &str = "Undefined";
/// `DomainRunning` reason (status `False`): the guest cannot be launched (an image that cannot
/// be fetched or fails its checksum); the message says why, and the operator fails the instance.
pub const REASON_LAUNCH_FAILED: &str = "LaunchFailed";
/// `DomainRunning` reason (status `False`): the domain of an instance that should run could not
/// be defined or started yet (libvirt refused, the record cannot be rendered, an image fetch
/// failed for a relaunch …); the message says why, and the agent keeps trying, less and less
/// often. The operator keeps the instance pending.
pub const REASON_LAUNCH_RETRYING: &str = "LaunchRetrying";

/// What the agent reports about an instance's domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DomainReport {
    /// The domain runs.
    Running,
    /// The domain is active but paused: its guest runs nothing until it is resumed.
    Paused,
    /// The domain is defined but shut off.
    ShutOff,
    /// No domain of the instance is defined on the node.
    Undefined,
}

impl DomainReport {
    /// The report for the record with `uid`, given the domain of its name as observed.
    pub fn of(observed: Option<&ObservedDomain>, uid: &str) -> Self {
        match observed {
            Some(domain) if domain.uid == uid => match domain.state {
                DomainState::ShutOff | DomainState::Crashed => Self::ShutOff,
                DomainState::Paused => Self::Paused,
                DomainState::Running | DomainState::ShuttingDown | DomainState::Other => {
                    Self::Running
                }
            },
            _ => Self::Undefined,
        }
    }

    /// The `DomainRunning` condition reporting this for a record at `generation`, transitioned
    /// at `now`.
    pub fn condition(self, generation: Option<i64>, now: &Time) -> Condition {
        let (status, reason, message) = match self {
            Self::Running => (
                ConditionStatus::True,
                REASON_RUNNING,
                "the domain is running",
            ),
            Self::Paused => (
                ConditionStatus::True,
                REASON_DOMAIN_PAUSED,
                "the domain is paused: its guest runs nothing until the hypervisor resumes it",
            ),
            Self::ShutOff => (
                ConditionStatus::False,
                REASON_SHUT_OFF,
                "the domain is shut off",
            ),
            Self::Undefined => (
                ConditionStatus::False,
                REASON_UNDEFINED,
                "no domain is defined",
            ),
        };
        Condition::new(
            CONDITION_DOMAIN_RUNNING,
            status,
            reason,
            message,
            now.clone(),
        )
        .with_observed_generation(generation)
    }

    /// Lower-case name for logs, e.g. `shut-off`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::ShutOff => "shut-off",
            Self::Undefined => "undefined",
        }
    }
}

/// `status` with the `DomainRunning` condition set to `report` (every other field kept as it
/// is), or `None` when that changes nothing. The transition time moves only when the
/// condition's status does.
pub fn with_report(
    status: Option<&InstanceStatus>,
    report: DomainReport,
    generation: Option<i64>,
    now: &Time,
) -> Option<InstanceStatus> {
    let mut next = status.cloned().unwrap_or_default();
    let changed = set_condition(&mut next.conditions, report.condition(generation, now));
    changed.then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::common::find_condition;
    use crds::{InstanceState, CONDITION_READY};
    use k8s_openapi::jiff::Timestamp;

    const UID: &str = "6f1f8d2e-1c1a-4d1e-9a55-2c7c1b7a0b11";

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(seconds).expect("valid timestamp"))
    }

    fn domain(uid: &str, state: DomainState) -> ObservedDomain {
        ObservedDomain {
            name: "karri-i-0123456789abcdef0".into(),
            uid: uid.into(),
            instance_id: "i-0123456789abcdef0".into(),
            namespace: "acme".into(),
            state,
            id: None,
            defined: true,
            shut_down: false,
        }
    }

    #[test]
    fn report_follows_the_domain_state() {
        let rows = [
            (Some(DomainState::Running), DomainReport::Running),
            (Some(DomainState::Paused), DomainReport::Paused),
            (Some(DomainState::ShuttingDown), DomainReport::Running),
            (Some(DomainState::Other), DomainReport::Running),
            (Some(DomainState::ShutOff), DomainReport::ShutOff),
            (Some(DomainState::Crashed), DomainReport::ShutOff),
            (None, DomainReport::Undefined),
        ];
        for (state, expected) in rows {
            let observed = state.map(|s| domain(UID, s));
            assert_eq!(
                DomainReport::of(observed.as_ref(), UID),
                expected,
                "{state:?}"
            );
        }
    }

    #[test]
    fn domain_of_an_earlier_record_counts_as_undefined() {
        let stale = domain("0b7c1a2e-0000-4000-8000-000000000001", DomainState::Running);
        assert_eq!(DomainReport::of(Some(&stale), UID), DomainReport::Undefined);
    }

    #[test]
    fn conditions_have_the_operators_type_status_and_reason() {
        let rows = [
            (DomainReport::Running, ConditionStatus::True, "Running"),
            (DomainReport::Paused, ConditionStatus::True, "Paused"),
            (DomainReport::ShutOff, ConditionStatus::False, "ShutOff"),
            (DomainReport::Undefined, ConditionStatus::False, "Undefined"),
        ];
        for (report, status, reason) in rows {
            let c = report.condition(Some(3), &at(10));
            assert_eq!(c.type_, "DomainRunning");
            assert_eq!(c.status, status);
            assert_eq!(c.reason, reason);
            assert_eq!(c.observed_generation, Some(3));
            assert_eq!(c.last_transition_time, at(10));
        }
    }

    #[test]
    fn report_keeps_every_other_status_field() {
        let mut status = InstanceStatus {
            state: InstanceState::Pending,
            node_name: Some("node-1".into()),
            availability_zone: Some("karri-1a".into()),
            observed_generation: Some(1),
            ..Default::default()
        };
        status.conditions.push(Condition::new(
            CONDITION_READY,
            ConditionStatus::False,
            "Pending",
            "",
            at(1),
        ));
        let next = with_report(Some(&status), DomainReport::Running, Some(1), &at(5))
            .expect("a new condition is a change");
        assert_eq!(next.state, InstanceState::Pending);
        assert_eq!(next.node_name.as_deref(), Some("node-1"));
        assert_eq!(next.availability_zone.as_deref(), Some("karri-1a"));
        assert_eq!(next.observed_generation, Some(1));
        assert_eq!(
            find_condition(&next.conditions, CONDITION_READY).map(|c| c.reason.as_str()),
            Some("Pending")
        );
        let domain = find_condition(&next.conditions, CONDITION_DOMAIN_RUNNING).expect("set");
        assert_eq!(domain.status, ConditionStatus::True);
    }

    #[test]
    fn same_report_again_is_no_change() {
        let first =
            with_report(None, DomainReport::ShutOff, Some(2), &at(5)).expect("first report");
        assert_eq!(
            with_report(Some(&first), DomainReport::ShutOff, Some(2), &at(9)),
            None
        );
    }

    #[test]
    fn new_generation_is_reported_without_moving_the_transition_time() {
        let first =
            with_report(None, DomainReport::Running, Some(2), &at(5)).expect("first report");
        let next = with_report(Some(&first), DomainReport::Running, Some(3), &at(9))
            .expect("the generation changed");
        let c = find_condition(&next.conditions, CONDITION_DOMAIN_RUNNING).expect("set");
        assert_eq!(c.observed_generation, Some(3));
        assert_eq!(c.last_transition_time, at(5));
    }

    #[test]
    fn changed_status_moves_the_transition_time() {
        let first =
            with_report(None, DomainReport::Running, Some(2), &at(5)).expect("first report");
        let next = with_report(Some(&first), DomainReport::ShutOff, Some(3), &at(9))
            .expect("the status changed");
        let c = find_condition(&next.conditions, CONDITION_DOMAIN_RUNNING).expect("set");
        assert_eq!(c.reason, REASON_SHUT_OFF);
        assert_eq!(c.last_transition_time, at(9));
    }
}
