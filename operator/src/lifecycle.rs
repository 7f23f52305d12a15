//! The EC2 state machine of an instance record, as far as the operator owns it.
//!
//! # Who writes what
//!
//! Two writers share an instance's `status`, each owning its own fields; both write through the
//! `/status` subresource as read-modify-write with the record's `resourceVersion`, so neither
//! loses the other's fields (on a 409 they read again and recompute).
//!
//! - The **node agent** reports what it observes of the libvirt domain in the
//!   condition [`CONDITION_DOMAIN_RUNNING`] (and besides it only the console output and the last
//!   reboot it carried out) (built by [`Domain::condition`]): `True` with reason
//!   `Running` while the domain runs; `False` with reason `ShutOff` while it is defined but shut
//!   off; `False` with reason `Undefined` when no domain of the instance is defined on the node
//!   (not yet created, or destroyed and undefined after termination). The agent sets the
//!   condition's `observedGeneration` to the `metadata.generation` it acted on. Private addresses
//!   are the operator's (allocated at launch, `launch::allocate_address`).
//! - The **operator** owns the binding (`status.nodeName`, `status.availabilityZone`, the
//!   `Scheduled` condition), the EC2 state (`status.state`, `stateTransitionTime`, `launchTime`,
//!   `reason`, `message`), the `Ready` condition, `observedGeneration`, and retention. It derives
//!   the state from the desired state and the agent's report ([`next`]).
//!
//! # States
//!
//! | desired | bound? | agent reports | state |
//! |---|---|---|---|
//! | running | no | — | `pending` (placement pending, `Scheduled` False says why) |
//! | running | yes | domain running | `running` |
//! | running | yes | anything else | `pending` (the agent is defining / starting it) |
//! | stopped | yes | domain running | `stopping` |
//! | stopped | yes | nothing yet | `stopping` if it was running or stopping, else `stopped` |
//! | stopped | any | shut off / undefined, or not bound | `stopped` |
//! | terminated | yes | undefined | `terminated` |
//! | terminated | yes | anything else | `shutting-down` |
//! | terminated | no | — | `terminated` (nothing ever ran) |
//!
//! `terminated` is final. A record being deleted (`deletionTimestamp`) is terminated first, like
//! TerminateInstances; once `terminated` its finalizer may go ([`Action::Release`]). A terminated
//! record that is not being deleted is kept visible for the retention period after
//! `stateTransitionTime`, then collected ([`Action::Collect`]).

use std::time::Duration;

use crds::common::{find_condition, set_condition};
use crds::{
    Condition, ConditionStatus, DesiredState, Instance, InstanceState, InstanceStatus,
    CONDITION_READY, CONDITION_SCHEDULED,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::clock;
use crate::placement::Unplaceable;

pub use crds::CONDITION_DOMAIN_RUNNING;
/// `DomainRunning` reason (status `True`): the domain runs.
pub const REASON_DOMAIN_RUNNING: &str = "Running";
/// `DomainRunning` reason (status `False`): the domain is defined but shut off.
pub const REASON_DOMAIN_SHUT_OFF: &str = "ShutOff";
/// `DomainRunning` reason (status `False`): no domain of the instance is defined on the node.
pub const REASON_DOMAIN_UNDEFINED: &str = "Undefined";
/// `DomainRunning` reason (status `False`): the agent could not launch the domain (an image that
/// cannot be fetched or fails its checksum, say); the message says why. The instance fails.
pub const REASON_LAUNCH_FAILED: &str = "LaunchFailed";
/// EC2 state reason code of an instance that failed to launch.
pub const STATE_REASON_LAUNCH_FAILED: &str = "Server.InternalError";
/// `Scheduled` reason once the instance is bound to a node.
pub const REASON_PLACED: &str = "Placed";
/// `Scheduled` reason while no node can take the instance; the message says why.
pub const REASON_UNPLACEABLE: &str = "Unplaceable";
/// `Ready` reason while the instance runs.
pub const REASON_RUNNING: &str = "Running";
/// EC2 state reason code of a shutdown asked for by the owner (stop, terminate, delete).
pub const STATE_REASON_USER_SHUTDOWN: &str = "Client.UserInitiatedShutdown";
/// EC2 state reason message of a shutdown asked for by the owner.
pub const STATE_MESSAGE_USER_SHUTDOWN: &str =
    "Client.UserInitiatedShutdown: User initiated shutdown";
/// EC2 state reason code of a stop that the guest asked for by powering itself off.
pub const STATE_REASON_INSTANCE_SHUTDOWN: &str = "Client.InstanceInitiatedShutdown";
/// EC2 state reason message of a stop that the guest asked for by powering itself off.
pub const STATE_MESSAGE_INSTANCE_SHUTDOWN: &str =
    "Client.InstanceInitiatedShutdown: Instance initiated shutdown";
/// How long terminated instances stay visible before they are collected, unless configured.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(60 * 60);
/// How soon an instance that could not be placed is placed again: room freed by a terminated
/// instance changes no Node record, so no event would bring it back.
pub const UNPLACEABLE_RECHECK: Duration = Duration::from_secs(10);

/// What the node agent last reported about the instance's domain (its `DomainRunning`
/// condition).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Domain {
    /// No report: the instance is not bound, or its agent has not got to it yet.
    #[default]
    Unreported,
    /// The domain runs.
    Running,
    /// The domain is defined but shut off.
    ShutOff,
    /// No domain of the instance is defined on the node.
    Undefined,
}

impl Domain {
    /// The `DomainRunning` condition an agent writes to report this, computed from
    /// `generation`, transitioned at `now`; `None` for [`Domain::Unreported`].
    pub fn condition(self, generation: Option<i64>, now: &Time) -> Option<Condition> {
        let (status, reason, message) = match self {
            Self::Unreported => return None,
            Self::Running => (
                ConditionStatus::True,
                REASON_DOMAIN_RUNNING,
                "the domain is running",
            ),
            Self::ShutOff => (
                ConditionStatus::False,
                REASON_DOMAIN_SHUT_OFF,
                "the domain is shut off",
            ),
            Self::Undefined => (
                ConditionStatus::False,
                REASON_DOMAIN_UNDEFINED,
                "no domain is defined",
            ),
        };
        Some(
            Condition::new(
                CONDITION_DOMAIN_RUNNING,
                status,
                reason,
                message,
                now.clone(),
            )
            .with_observed_generation(generation),
        )
    }
}

/// Reads the agent's report from `status`, for a record at `generation`. A report of
/// `Undefined` made for an older generation is not trusted (the agent may not have seen the
/// spec change yet, and may be creating the domain right now) and counts as
/// [`Domain::Unreported`]; reports without a generation are taken as they are.
pub fn domain_report(status: &InstanceStatus, generation: Option<i64>) -> Domain {
    let Some(condition) = find_condition(&status.conditions, CONDITION_DOMAIN_RUNNING) else {
        return Domain::Unreported;
    };
    match condition.status {
        ConditionStatus::True => Domain::Running,
        ConditionStatus::Unknown => Domain::Unreported,
        ConditionStatus::False if condition.reason == REASON_DOMAIN_UNDEFINED => {
            let stale = matches!(
                (condition.observed_generation, generation),
                (Some(seen), Some(current)) if seen < current
            );
            if stale {
                Domain::Unreported
            } else {
                Domain::Undefined
            }
        }
        ConditionStatus::False => Domain::ShutOff,
    }
}

/// The node placement chose for an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placed {
    /// Node name, written to `status.nodeName`.
    pub node: String,
    /// The node's zone, written to `status.availabilityZone`.
    pub zone: String,
}

/// Everything [`next`] looks at.
#[derive(Clone, Debug, Default)]
pub struct Observed<'a> {
    /// `spec.desiredState`.
    pub desired: DesiredState,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.deletionTimestamp`: the record is being deleted.
    pub deletion_timestamp: Option<&'a Time>,
    /// The current `status` (`None`: never written).
    pub status: Option<&'a InstanceStatus>,
    /// The agent's report, usually [`domain_report`] of the same status. A caller that knows the
    /// node is gone for good (its Node record was deleted and its agent renews no lease) may pass [`Domain::Undefined`] so that
    /// termination can finish.
    pub domain: Domain,
    /// This round's placement, when the caller ran it (see [`needs_placement`]); ignored once the
    /// instance is bound.
    pub placement: Option<&'a Result<Placed, Unplaceable>>,
    /// Why the instance cannot launch, when it cannot: the agent's report ([`launch_failure`])
    /// or what the operator found resolving its images. The instance is terminated with it.
    pub launch_failure: Option<String>,
}

/// The agent's report that it could not launch the instance's domain: the message of a
/// `DomainRunning` condition with reason [`REASON_LAUNCH_FAILED`].
pub fn launch_failure(status: &InstanceStatus) -> Option<String> {
    find_condition(&status.conditions, CONDITION_DOMAIN_RUNNING)
        .filter(|c| c.status == ConditionStatus::False && c.reason == REASON_LAUNCH_FAILED)
        .map(|c| c.message.clone())
}

impl<'a> Observed<'a> {
    /// What `instance` says about itself, with the agent's report read by [`domain_report`] and
    /// `placement` the result of this round's placement, if any.
    pub fn of(instance: &'a Instance, placement: Option<&'a Result<Placed, Unplaceable>>) -> Self {
        let generation = instance.metadata.generation;
        Self {
            desired: instance.spec.desired_state,
            generation,
            deletion_timestamp: instance.metadata.deletion_timestamp.as_ref(),
            status: instance.status.as_ref(),
            domain: instance
                .status
                .as_ref()
                .map_or(Domain::Unreported, |s| domain_report(s, generation)),
            placement,
            launch_failure: instance.status.as_ref().and_then(launch_failure),
        }
    }
}

/// The domain report to act on: an instance being terminated on a host that is gone for good
/// (`host_there` false: its Node record was deleted and its agent renews no lease) counts as
/// having no domain, so that termination can finish and its address and capacity are released;
/// otherwise the agent's `reported` one.
pub fn domain_considering_node(reported: Domain, terminating: bool, host_there: bool) -> Domain {
    if terminating && !host_there {
        Domain::Undefined
    } else {
        reported
    }
}

/// Whether the guest of `instance` powered itself off while asked to run: its node agent
/// reported `GuestShutdown` at the record's current generation. EC2 then stops the instance
/// (`instanceInitiatedShutdownBehavior` `stop`): the operator asks it to stay stopped. Pure.
pub fn guest_powered_off(instance: &Instance) -> bool {
    instance.spec.desired_state == DesiredState::Running
        && instance.metadata.deletion_timestamp.is_none()
        && instance
            .status
            .as_ref()
            .and_then(|s| find_condition(&s.conditions, CONDITION_DOMAIN_RUNNING))
            .is_some_and(|c| {
                c.reason == crds::REASON_GUEST_SHUTDOWN
                    && c.observed_generation == instance.metadata.generation
            })
}

/// The status that shows the guest's own power-off (see [`guest_powered_off`]): `stopping`, for
/// the instance's own reason, written at `now` before the operator asks the record to stay
/// stopped; the stop keeps that reason when it ends. Pure.
pub fn guest_stopping(status: &InstanceStatus, now: &Time) -> InstanceStatus {
    let mut stopping = status.clone();
    stopping.state = InstanceState::Stopping;
    stopping.state_transition_time = Some(now.clone());
    stopping.reason = Some(STATE_REASON_INSTANCE_SHUTDOWN.to_owned());
    stopping.message = Some(STATE_MESSAGE_INSTANCE_SHUTDOWN.to_owned());
    let ready = ready_condition(InstanceState::Stopping, stopping.node_name.as_deref(), now)
        .with_observed_generation(status.observed_generation);
    set_condition(&mut stopping.conditions, ready);
    stopping
}

/// The desired state that counts: a record being deleted is terminated whatever its spec says.
pub fn effective_desired(desired: DesiredState, deleting: bool) -> DesiredState {
    if deleting {
        DesiredState::Terminated
    } else {
        desired
    }
}

/// Whether the operator should run placement for `instance` now: it should run, is not bound
/// yet, not terminated, and not being deleted. Instances asked to stay stopped are placed when
/// they are started.
pub fn needs_placement(instance: &Instance) -> bool {
    let deleting = instance.metadata.deletion_timestamp.is_some();
    effective_desired(instance.spec.desired_state, deleting) == DesiredState::Running
        && instance
            .status
            .as_ref()
            .is_none_or(|s| s.node_name.is_none() && s.state != InstanceState::Terminated)
}

/// What the operator does with the record besides writing its status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep the record; look again after `recheck_in` if set (a terminated record's remaining
    /// retention), otherwise when something changes.
    Keep {
        /// When to look again regardless of changes.
        recheck_in: Option<Duration>,
    },
    /// The record has been terminated for longer than the retention period: delete it.
    Collect,
    /// The record is being deleted and nothing runs for it any more: remove the operator's
    /// finalizer so the deletion completes.
    Release,
}

/// The operator's next status for an instance, and what to do with the record.
#[derive(Clone, Debug, PartialEq)]
pub struct Next {
    /// The status to write: the current one with the operator's fields brought up to date and
    /// every agent-owned field kept as it was.
    pub status: InstanceStatus,
    /// Whether `status` differs from the current one (skip the write when not).
    pub changed: bool,
    /// What to do with the record.
    pub action: Action,
}

/// Computes the operator's next status for the instance described by `observed` at `now`, with
/// terminated records kept for `retention`. See the module documentation for the state table.
/// Steady inputs give the same status again (`changed == false`): transition times move only
/// when a state or condition status does.
pub fn next(observed: &Observed<'_>, now: &Time, retention: Duration) -> Next {
    let old = observed.status.cloned().unwrap_or_default();
    let mut status = old.clone();
    let desired = effective_desired(observed.desired, observed.deletion_timestamp.is_some());
    let terminated = old.state == InstanceState::Terminated;

    // Binding: written once, never changed.
    if status.node_name.is_none() && !terminated && desired == DesiredState::Running {
        if let Some(Ok(placed)) = observed.placement {
            status.node_name = Some(placed.node.clone());
            status.availability_zone = Some(placed.zone.clone());
        }
    }
    let scheduled = match (&status.node_name, observed.placement) {
        (Some(node), _) => Some(Condition::new(
            CONDITION_SCHEDULED,
            ConditionStatus::True,
            REASON_PLACED,
            match &status.availability_zone {
                Some(zone) => format!("placed on node {node} in zone {zone}"),
                None => format!("placed on node {node}"),
            },
            now.clone(),
        )),
        (None, Some(Err(why))) if !terminated && desired == DesiredState::Running => {
            Some(Condition::new(
                CONDITION_SCHEDULED,
                ConditionStatus::False,
                REASON_UNPLACEABLE,
                why.to_string(),
                now.clone(),
            ))
        }
        _ => None,
    };
    if let Some(condition) = scheduled {
        set_condition(
            &mut status.conditions,
            condition.with_observed_generation(observed.generation),
        );
    }

    let failure = observed
        .launch_failure
        .as_deref()
        .filter(|_| !terminated && desired != DesiredState::Stopped);
    let state = if failure.is_some() {
        InstanceState::Terminated
    } else {
        next_state(
            old.state,
            desired,
            status.node_name.is_some(),
            observed.domain,
        )
    };
    if state != old.state || status.state_transition_time.is_none() {
        status.state_transition_time = Some(now.clone());
    }
    if state != old.state {
        if state == InstanceState::Running {
            status.launch_time = Some(now.clone());
        }
        let user_shutdown = matches!(
            state,
            InstanceState::ShuttingDown
                | InstanceState::Terminated
                | InstanceState::Stopping
                | InstanceState::Stopped
        );
        // A stop that ends keeps the reason it began with (the owner's, or the guest's own
        // power-off, see `guest_stopping`).
        let stop_ends = old.state == InstanceState::Stopping && state == InstanceState::Stopped;
        if let Some(why) = failure {
            status.reason = Some(STATE_REASON_LAUNCH_FAILED.to_owned());
            status.message = Some(format!("{STATE_REASON_LAUNCH_FAILED}: {why}"));
        } else if !(stop_ends && old.reason.is_some()) {
            status.reason = user_shutdown.then(|| STATE_REASON_USER_SHUTDOWN.to_owned());
            status.message = user_shutdown.then(|| STATE_MESSAGE_USER_SHUTDOWN.to_owned());
        }
    }
    status.state = state;
    set_condition(
        &mut status.conditions,
        ready_condition(state, status.node_name.as_deref(), now)
            .with_observed_generation(observed.generation),
    );
    if observed.generation.is_some() {
        status.observed_generation = observed.generation;
    }

    let unplaced = matches!(observed.placement, Some(Err(_)));
    let action = if state != InstanceState::Terminated {
        Action::Keep {
            recheck_in: unplaced.then_some(UNPLACEABLE_RECHECK),
        }
    } else if observed.deletion_timestamp.is_some() {
        Action::Release
    } else {
        let since = status.state_transition_time.as_ref().unwrap_or(now);
        match clock::remaining(since, retention, now) {
            Some(left) => Action::Keep {
                recheck_in: Some(left),
            },
            None => Action::Collect,
        }
    };
    Next {
        changed: observed.status != Some(&status),
        status,
        action,
    }
}

/// The state table of the module documentation.
fn next_state(
    current: InstanceState,
    desired: DesiredState,
    bound: bool,
    domain: Domain,
) -> InstanceState {
    use InstanceState as S;
    if current == S::Terminated {
        return S::Terminated;
    }
    match desired {
        DesiredState::Running if bound && domain == Domain::Running => S::Running,
        DesiredState::Running => S::Pending,
        DesiredState::Stopped => match (bound, domain) {
            (true, Domain::Running) => S::Stopping,
            // Bound but not reported yet: a guest may be booting there (a stop asked while
            // pending), so it is stopped only once the agent says so.
            (true, Domain::Unreported)
                if matches!(current, S::Pending | S::Running | S::Stopping) =>
            {
                S::Stopping
            }
            _ => S::Stopped,
        },
        DesiredState::Terminated if !bound || domain == Domain::Undefined => S::Terminated,
        DesiredState::Terminated => S::ShuttingDown,
    }
}

/// The instance's `Ready` condition: `True` while running, otherwise `False` with the state as
/// reason.
fn ready_condition(state: InstanceState, node: Option<&str>, now: &Time) -> Condition {
    if state == InstanceState::Running {
        let message = match node {
            Some(node) => format!("running on node {node}"),
            None => "running".to_owned(),
        };
        return Condition::new(
            CONDITION_READY,
            ConditionStatus::True,
            REASON_RUNNING,
            message,
            now.clone(),
        );
    }
    let reason = match state {
        InstanceState::Pending => "Pending",
        InstanceState::Running => REASON_RUNNING,
        InstanceState::ShuttingDown => "ShuttingDown",
        InstanceState::Terminated => "Terminated",
        InstanceState::Stopping => "Stopping",
        InstanceState::Stopped => "Stopped",
    };
    Condition::new(
        CONDITION_READY,
        ConditionStatus::False,
        reason,
        format!("the instance is {}", state.as_str()),
        now.clone(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::at;
    use crds::common::is_condition_true;
    use crds::InstanceSpec;
    use DesiredState as D;
    use InstanceState as S;

    const HOUR: Duration = DEFAULT_RETENTION;

    #[test]
    fn only_a_terminating_instance_on_a_deleted_node_loses_its_domain() {
        use Domain as Dm;
        for (reported, terminating, node_exists, want) in [
            (Dm::Running, true, false, Dm::Undefined),
            (Dm::ShutOff, true, false, Dm::Undefined),
            (Dm::Unreported, true, false, Dm::Undefined),
            (Dm::Running, true, true, Dm::Running),
            (Dm::Running, false, false, Dm::Running),
            (Dm::ShutOff, false, true, Dm::ShutOff),
        ] {
            assert_eq!(
                domain_considering_node(reported, terminating, node_exists),
                want,
                "{reported:?} terminating={terminating} node_exists={node_exists}"
            );
        }
    }

    fn placed(node: &str) -> Result<Placed, Unplaceable> {
        Ok(Placed {
            node: node.into(),
            zone: "karri-1a".into(),
        })
    }

    fn no_room() -> Result<Placed, Unplaceable> {
        Err(Unplaceable::NoRoom {
            zone: Some("karri-1a".into()),
            vcpus: 2,
            memory_mib: 1024,
            disk_gib: 0,
        })
    }

    /// A status in `state`, bound to `node` (zone karri-1a) when given, since t=10.
    fn status(state: InstanceState, node: Option<&str>) -> InstanceStatus {
        InstanceStatus {
            state,
            node_name: node.map(str::to_owned),
            availability_zone: node.map(|_| "karri-1a".to_owned()),
            state_transition_time: Some(at(10)),
            ..Default::default()
        }
    }

    struct Row {
        what: &'static str,
        desired: DesiredState,
        deleting: bool,
        status: Option<InstanceStatus>,
        domain: Domain,
        placement: Option<Result<Placed, Unplaceable>>,
        state: InstanceState,
        node: Option<&'static str>,
        /// (status, reason, message) of `Scheduled`, or `None` when it must be absent.
        scheduled: Option<(ConditionStatus, &'static str, &'static str)>,
        action: Action,
    }

    fn row(
        what: &'static str,
        desired: DesiredState,
        status: Option<InstanceStatus>,
        domain: Domain,
    ) -> Row {
        Row {
            what,
            desired,
            deleting: false,
            status,
            domain,
            placement: None,
            state: S::Pending,
            node: None,
            scheduled: None,
            action: Action::Keep { recheck_in: None },
        }
    }

    impl Row {
        fn placement(mut self, placement: Result<Placed, Unplaceable>) -> Self {
            self.placement = Some(placement);
            self
        }
        fn deleting(mut self) -> Self {
            self.deleting = true;
            self
        }
        fn want(mut self, state: InstanceState, node: Option<&'static str>) -> Self {
            self.state = state;
            self.node = node;
            self
        }
        fn scheduled(
            mut self,
            status: ConditionStatus,
            reason: &'static str,
            message: &'static str,
        ) -> Self {
            self.scheduled = Some((status, reason, message));
            self
        }
        fn action(mut self, action: Action) -> Self {
            self.action = action;
            self
        }
    }

    const PLACED_HV1: (ConditionStatus, &str, &str) = (
        ConditionStatus::True,
        REASON_PLACED,
        "placed on node hv-01 in zone karri-1a",
    );

    fn rows() -> Vec<Row> {
        let placed_hv1 = |r: Row| r.scheduled(PLACED_HV1.0, PLACED_HV1.1, PLACED_HV1.2);
        vec![
            placed_hv1(
                row(
                    "new instance is placed",
                    D::Running,
                    None,
                    Domain::Unreported,
                )
                .placement(placed("hv-01"))
                .want(S::Pending, Some("hv-01")),
            ),
            row(
                "no room anywhere keeps it pending and says why",
                D::Running,
                None,
                Domain::Unreported,
            )
            .placement(no_room())
            .want(S::Pending, None)
            .scheduled(
                ConditionStatus::False,
                REASON_UNPLACEABLE,
                "no node in zone karri-1a has room for 2 vCPUs and 1024 MiB",
            )
            .action(Action::Keep {
                recheck_in: Some(UNPLACEABLE_RECHECK),
            }),
            row(
                "placement not run yet leaves Scheduled unset",
                D::Running,
                None,
                Domain::Unreported,
            )
            .want(S::Pending, None),
            placed_hv1(
                row(
                    "room appears for an unplaceable instance",
                    D::Running,
                    Some(status(S::Pending, None)),
                    Domain::Unreported,
                )
                .placement(placed("hv-01"))
                .want(S::Pending, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "bound, agent not there yet",
                    D::Running,
                    Some(status(S::Pending, Some("hv-01"))),
                    Domain::Unreported,
                )
                .want(S::Pending, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "bound, domain defined but not started yet",
                    D::Running,
                    Some(status(S::Pending, Some("hv-01"))),
                    Domain::ShutOff,
                )
                .want(S::Pending, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "agent reports the domain running",
                    D::Running,
                    Some(status(S::Pending, Some("hv-01"))),
                    Domain::Running,
                )
                .want(S::Running, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "a bound instance is never moved",
                    D::Running,
                    Some(status(S::Running, Some("hv-01"))),
                    Domain::Running,
                )
                .placement(placed("hv-02"))
                .want(S::Running, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "domain went down while it should run",
                    D::Running,
                    Some(status(S::Running, Some("hv-01"))),
                    Domain::ShutOff,
                )
                .want(S::Pending, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "stop asked, domain still running",
                    D::Stopped,
                    Some(status(S::Running, Some("hv-01"))),
                    Domain::Running,
                )
                .want(S::Stopping, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "stop asked, no report yet after running",
                    D::Stopped,
                    Some(status(S::Running, Some("hv-01"))),
                    Domain::Unreported,
                )
                .want(S::Stopping, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "domain shut off",
                    D::Stopped,
                    Some(status(S::Stopping, Some("hv-01"))),
                    Domain::ShutOff,
                )
                .want(S::Stopped, Some("hv-01")),
            ),
            // Its agent may be booting it: stopped once the agent says it is not running.
            placed_hv1(
                row(
                    "stopped while pending on its node, before its agent reported",
                    D::Stopped,
                    Some(status(S::Pending, Some("hv-01"))),
                    Domain::Unreported,
                )
                .want(S::Stopping, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "stopped while pending on its node, no domain there",
                    D::Stopped,
                    Some(status(S::Pending, Some("hv-01"))),
                    Domain::Undefined,
                )
                .want(S::Stopped, Some("hv-01")),
            ),
            row(
                "created stopped: not placed",
                D::Stopped,
                None,
                Domain::Unreported,
            )
            .placement(placed("hv-01"))
            .want(S::Stopped, None),
            placed_hv1(
                row(
                    "start asked: pending on the same node",
                    D::Running,
                    Some(status(S::Stopped, Some("hv-01"))),
                    Domain::ShutOff,
                )
                .want(S::Pending, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "started again",
                    D::Running,
                    Some(status(S::Pending, Some("hv-01"))),
                    Domain::Running,
                )
                .want(S::Running, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "terminate asked, domain running",
                    D::Terminated,
                    Some(status(S::Running, Some("hv-01"))),
                    Domain::Running,
                )
                .want(S::ShuttingDown, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "terminate asked, domain shut off but still defined",
                    D::Terminated,
                    Some(status(S::ShuttingDown, Some("hv-01"))),
                    Domain::ShutOff,
                )
                .want(S::ShuttingDown, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "terminate asked of a stopped instance",
                    D::Terminated,
                    Some(status(S::Stopped, Some("hv-01"))),
                    Domain::ShutOff,
                )
                .want(S::ShuttingDown, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "agent reports the domain gone: terminated",
                    D::Terminated,
                    Some(status(S::ShuttingDown, Some("hv-01"))),
                    Domain::Undefined,
                )
                .want(S::Terminated, Some("hv-01"))
                .action(Action::Keep {
                    recheck_in: Some(HOUR),
                }),
            ),
            row(
                "terminated before placement: nothing to shut down",
                D::Terminated,
                Some(status(S::Pending, None)),
                Domain::Unreported,
            )
            .placement(placed("hv-01"))
            .want(S::Terminated, None)
            .action(Action::Keep {
                recheck_in: Some(HOUR),
            }),
            placed_hv1(
                row(
                    "terminated is final",
                    D::Running,
                    Some(status(S::Terminated, Some("hv-01"))),
                    Domain::Undefined,
                )
                .want(S::Terminated, Some("hv-01"))
                .action(Action::Keep {
                    recheck_in: Some(Duration::from_secs(3600 - 90)),
                }),
            ),
            row(
                "terminated unplaced instances are not placed",
                D::Running,
                Some(status(S::Terminated, None)),
                Domain::Unreported,
            )
            .placement(no_room())
            .want(S::Terminated, None)
            .action(Action::Keep {
                recheck_in: Some(Duration::from_secs(3600 - 90)),
            }),
            placed_hv1(
                row(
                    "deleted while running: shut down first",
                    D::Running,
                    Some(status(S::Running, Some("hv-01"))),
                    Domain::Running,
                )
                .deleting()
                .want(S::ShuttingDown, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "deleted, agent down: wait for it",
                    D::Running,
                    Some(status(S::ShuttingDown, Some("hv-01"))),
                    Domain::ShutOff,
                )
                .deleting()
                .want(S::ShuttingDown, Some("hv-01")),
            ),
            placed_hv1(
                row(
                    "deleted and the domain is gone: release",
                    D::Stopped,
                    Some(status(S::ShuttingDown, Some("hv-01"))),
                    Domain::Undefined,
                )
                .deleting()
                .want(S::Terminated, Some("hv-01"))
                .action(Action::Release),
            ),
            row(
                "deleted before placement: release at once",
                D::Running,
                None,
                Domain::Unreported,
            )
            .deleting()
            .placement(placed("hv-01"))
            .want(S::Terminated, None)
            .action(Action::Release),
            placed_hv1(
                row(
                    "collected after deletion: release",
                    D::Terminated,
                    Some(status(S::Terminated, Some("hv-01"))),
                    Domain::Undefined,
                )
                .deleting()
                .want(S::Terminated, Some("hv-01"))
                .action(Action::Release),
            ),
        ]
    }

    #[test]
    fn instance_lifecycle_follows_the_ec2_state_machine() {
        let now = at(100);
        for row in rows() {
            let observed = Observed {
                desired: row.desired,
                generation: Some(3),
                deletion_timestamp: row.deleting.then_some(&now),
                status: row.status.as_ref(),
                domain: row.domain,
                placement: row.placement.as_ref(),
                launch_failure: None,
            };
            let next = next(&observed, &now, HOUR);
            let what = row.what;
            assert_eq!(next.status.state, row.state, "{what}: state");
            assert_eq!(next.status.node_name.as_deref(), row.node, "{what}: node");
            let scheduled = find_condition(&next.status.conditions, CONDITION_SCHEDULED)
                .map(|c| (c.status, c.reason.as_str(), c.message.as_str()));
            assert_eq!(scheduled, row.scheduled, "{what}: Scheduled");
            assert_eq!(next.action, row.action, "{what}: action");
            assert_eq!(
                is_condition_true(&next.status.conditions, CONDITION_READY),
                row.state == S::Running,
                "{what}: Ready"
            );
            assert_eq!(
                next.status.observed_generation,
                Some(3),
                "{what}: observedGeneration"
            );

            // Level-triggered: the same inputs later change nothing more.
            let again = Observed {
                status: Some(&next.status),
                ..observed
            };
            let later = at(101);
            let settled = super::next(&again, &later, HOUR);
            assert!(
                !settled.changed,
                "{what}: not settled: {:#?} then {:#?}",
                next.status, settled.status
            );
        }
    }

    #[test]
    fn state_changes_record_when_and_why() {
        let now = at(100);
        let old = status(S::Running, Some("hv-01"));
        let stopping = next(
            &Observed {
                desired: D::Stopped,
                status: Some(&old),
                domain: Domain::Running,
                ..Default::default()
            },
            &now,
            HOUR,
        );
        assert!(stopping.changed);
        assert_eq!(stopping.status.state_transition_time, Some(at(100)));
        assert_eq!(
            stopping.status.reason.as_deref(),
            Some(STATE_REASON_USER_SHUTDOWN)
        );
        assert_eq!(
            stopping.status.message.as_deref(),
            Some(STATE_MESSAGE_USER_SHUTDOWN)
        );

        let started = next(
            &Observed {
                desired: D::Running,
                status: Some(&status(S::Pending, Some("hv-01"))),
                domain: Domain::Running,
                ..Default::default()
            },
            &now,
            HOUR,
        );
        assert_eq!(started.status.launch_time, Some(at(100)));
        assert_eq!(started.status.state_transition_time, Some(at(100)));
        assert_eq!(started.status.reason, None);
        let ready = find_condition(&started.status.conditions, CONDITION_READY).expect("Ready");
        assert_eq!(
            (ready.status, ready.reason.as_str(), ready.message.as_str()),
            (
                ConditionStatus::True,
                REASON_RUNNING,
                "running on node hv-01"
            )
        );

        let unchanged = next(
            &Observed {
                desired: D::Running,
                status: Some(&started.status),
                domain: Domain::Running,
                ..Default::default()
            },
            &at(500),
            HOUR,
        );
        assert!(!unchanged.changed);
        assert_eq!(unchanged.status.launch_time, Some(at(100)));
    }

    #[test]
    fn terminated_records_are_collected_after_the_retention_period() {
        let mut terminated = status(S::Terminated, Some("hv-01"));
        terminated.state_transition_time = Some(at(1000));
        let rows = [
            (
                "just terminated",
                1000,
                Action::Keep {
                    recheck_in: Some(HOUR),
                },
            ),
            (
                "a second before the hour is up",
                4599,
                Action::Keep {
                    recheck_in: Some(Duration::from_secs(1)),
                },
            ),
            ("exactly an hour later", 4600, Action::Collect),
            ("long after", 100_000, Action::Collect),
        ];
        for (what, now, want) in rows {
            let observed = Observed {
                desired: D::Terminated,
                status: Some(&terminated),
                domain: Domain::Undefined,
                ..Default::default()
            };
            assert_eq!(next(&observed, &at(now), HOUR).action, want, "{what}");
        }
        let short = next(
            &Observed {
                desired: D::Terminated,
                status: Some(&terminated),
                ..Default::default()
            },
            &at(1060),
            Duration::from_secs(60),
        );
        assert_eq!(
            short.action,
            Action::Collect,
            "a configured retention counts"
        );
    }

    #[test]
    fn a_terminated_record_without_a_transition_time_starts_its_retention_now() {
        let mut terminated = status(S::Terminated, Some("hv-01"));
        terminated.state_transition_time = None;
        let next = next(
            &Observed {
                desired: D::Terminated,
                status: Some(&terminated),
                ..Default::default()
            },
            &at(7000),
            HOUR,
        );
        assert_eq!(next.status.state_transition_time, Some(at(7000)));
        assert_eq!(
            next.action,
            Action::Keep {
                recheck_in: Some(HOUR)
            }
        );
    }

    #[test]
    fn agent_owned_fields_are_kept() {
        let now = at(100);
        let mut old = status(S::Pending, Some("hv-01"));
        old.private_ip_address = Some("10.0.0.5".into());
        let report = Domain::Running
            .condition(Some(2), &at(90))
            .expect("a condition");
        old.conditions.push(report.clone());
        let next = next(
            &Observed {
                desired: D::Running,
                generation: Some(2),
                status: Some(&old),
                domain: domain_report(&old, Some(2)),
                ..Default::default()
            },
            &now,
            HOUR,
        );
        assert_eq!(next.status.state, S::Running);
        assert_eq!(next.status.private_ip_address.as_deref(), Some("10.0.0.5"));
        assert_eq!(
            find_condition(&next.status.conditions, CONDITION_DOMAIN_RUNNING),
            Some(&report)
        );
    }

    #[test]
    fn the_agent_report_is_read_from_its_condition() {
        let now = at(5);
        let with = |condition: Option<Condition>| InstanceStatus {
            conditions: condition.into_iter().collect(),
            ..Default::default()
        };
        let unknown = Condition::new(
            CONDITION_DOMAIN_RUNNING,
            ConditionStatus::Unknown,
            "Lost",
            "",
            now.clone(),
        );
        let rows = [
            ("no condition", with(None), Some(4), Domain::Unreported),
            (
                "running",
                with(Domain::Running.condition(Some(4), &now)),
                Some(4),
                Domain::Running,
            ),
            (
                "running, older generation",
                with(Domain::Running.condition(Some(3), &now)),
                Some(4),
                Domain::Running,
            ),
            (
                "shut off",
                with(Domain::ShutOff.condition(Some(4), &now)),
                Some(4),
                Domain::ShutOff,
            ),
            (
                "undefined",
                with(Domain::Undefined.condition(Some(4), &now)),
                Some(4),
                Domain::Undefined,
            ),
            (
                "undefined, for an older generation",
                with(Domain::Undefined.condition(Some(3), &now)),
                Some(4),
                Domain::Unreported,
            ),
            (
                "undefined, no generation",
                with(Domain::Undefined.condition(None, &now)),
                Some(4),
                Domain::Undefined,
            ),
            ("unknown", with(Some(unknown)), Some(4), Domain::Unreported),
        ];
        for (what, status, generation, want) in rows {
            assert_eq!(domain_report(&status, generation), want, "{what}");
        }
        assert_eq!(Domain::Unreported.condition(Some(1), &now), None);
    }

    fn instance(desired: DesiredState, status: Option<InstanceStatus>, deleting: bool) -> Instance {
        let mut i = Instance::new(
            "web-1",
            InstanceSpec {
                image_id: "emi-0123456789abcdef0".into(),
                instance_type: "m1.small".into(),
                key_name: None,
                security_group_ids: vec![],
                user_data: None,
                availability_zone: None,
                desired_state: desired,
                client_token: None,
                reservation_id: None,
                launch_index: None,
                disable_api_termination: false,
                tags: Vec::new(),
                kernel_id: None,
                ramdisk_id: None,
                metadata_options: None,
            },
        );
        i.status = status;
        i.metadata.generation = Some(1);
        i.metadata.deletion_timestamp = deleting.then(|| at(50));
        i
    }

    #[test]
    fn a_guest_that_powered_itself_off_is_stopped_only_while_asked_to_run() {
        let reported = |reason: &str, generation: i64| {
            let mut s = status(S::Running, Some("hv-01"));
            s.conditions = vec![Condition::new(
                CONDITION_DOMAIN_RUNNING,
                ConditionStatus::False,
                reason,
                "x",
                at(10),
            )
            .with_observed_generation(Some(generation))];
            s
        };
        let guest_off = reported(crds::REASON_GUEST_SHUTDOWN, 1);
        let rows = [
            (
                "asked to run",
                instance(D::Running, Some(guest_off.clone()), false),
                true,
            ),
            (
                "asked to stop",
                instance(D::Stopped, Some(guest_off.clone()), false),
                false,
            ),
            (
                "being deleted",
                instance(D::Running, Some(guest_off.clone()), true),
                false,
            ),
            (
                "started since (older report)",
                instance(
                    D::Running,
                    Some(reported(crds::REASON_GUEST_SHUTDOWN, 0)),
                    false,
                ),
                false,
            ),
            (
                "shut off otherwise",
                instance(D::Running, Some(reported(REASON_DOMAIN_SHUT_OFF, 1)), false),
                false,
            ),
            ("no report", instance(D::Running, None, false), false),
        ];
        for (what, instance, want) in rows {
            assert_eq!(guest_powered_off(&instance), want, "{what}");
        }
    }

    #[test]
    fn a_stop_after_the_guest_powered_itself_off_is_instance_initiated() {
        let running = status(S::Running, Some("hv-01"));
        let stopping = guest_stopping(&running, &at(100));
        assert_eq!(stopping.state, S::Stopping);
        assert_eq!(stopping.state_transition_time, Some(at(100)));
        let ready = find_condition(&stopping.conditions, CONDITION_READY).expect("Ready");
        assert_eq!(ready.status, ConditionStatus::False);

        // The operator then asks the record to stay stopped; the agent reports it shut off.
        let stopped = next(
            &Observed {
                desired: D::Stopped,
                generation: Some(2),
                status: Some(&stopping),
                domain: Domain::ShutOff,
                ..Default::default()
            },
            &at(110),
            HOUR,
        );
        assert_eq!(stopped.status.state, S::Stopped);
        assert_eq!(stopped.status.state_transition_time, Some(at(110)));
        assert_eq!(
            stopped.status.reason.as_deref(),
            Some(STATE_REASON_INSTANCE_SHUTDOWN)
        );
        assert_eq!(
            stopped.status.message.as_deref(),
            Some(STATE_MESSAGE_INSTANCE_SHUTDOWN)
        );

        // A start asked before the operator's request won: the stop is over, and so is its
        // reason.
        let started = next(
            &Observed {
                desired: D::Running,
                generation: Some(2),
                status: Some(&stopping),
                domain: Domain::ShutOff,
                ..Default::default()
            },
            &at(110),
            HOUR,
        );
        assert_eq!(started.status.state, S::Pending);
        assert_eq!(started.status.reason, None);

        // A terminate of the stopped instance is the owner's doing again.
        let terminated = next(
            &Observed {
                desired: D::Terminated,
                generation: Some(3),
                status: Some(&stopped.status),
                domain: Domain::Undefined,
                ..Default::default()
            },
            &at(200),
            HOUR,
        );
        assert_eq!(terminated.status.state, S::Terminated);
        assert_eq!(
            terminated.status.reason.as_deref(),
            Some(STATE_REASON_USER_SHUTDOWN)
        );
    }

    #[test]
    fn only_unbound_instances_that_should_run_need_placement() {
        let rows = [
            ("new", instance(D::Running, None, false), true),
            (
                "pending, unbound",
                instance(D::Running, Some(status(S::Pending, None)), false),
                true,
            ),
            (
                "already bound",
                instance(D::Running, Some(status(S::Pending, Some("hv-01"))), false),
                false,
            ),
            ("created stopped", instance(D::Stopped, None, false), false),
            (
                "terminate asked",
                instance(D::Terminated, None, false),
                false,
            ),
            ("being deleted", instance(D::Running, None, true), false),
            (
                "terminated",
                instance(D::Running, Some(status(S::Terminated, None)), false),
                false,
            ),
        ];
        for (what, instance, want) in rows {
            assert_eq!(needs_placement(&instance), want, "{what}");
        }
    }

    #[test]
    fn observed_reads_the_instance_record() {
        let mut bound = status(S::Pending, Some("hv-01"));
        bound.conditions.push(
            Domain::Running
                .condition(Some(1), &at(1))
                .expect("a condition"),
        );
        let record = instance(D::Stopped, Some(bound), true);
        let observed = Observed::of(&record, None);
        assert_eq!(observed.desired, D::Stopped);
        assert_eq!(observed.generation, Some(1));
        assert_eq!(observed.deletion_timestamp, Some(&at(50)));
        assert_eq!(observed.domain, Domain::Running);
        let next = next(&observed, &at(60), HOUR);
        assert_eq!(next.status.state, S::ShuttingDown);
    }
}
