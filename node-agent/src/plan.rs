//! What to do to one domain: a pure function of the record and the domain, in the manner of
//! KubeVirt virt-handler's `sync(desired?, observed?)`.
//!
//! [`plan`] decides; the caller executes the [`Action`]s in order against a
//! [`Hypervisor`](crate::hypervisor::Hypervisor) (see
//! [`apply_plan`](crate::hypervisor::apply_plan)), observes again and plans again until the plan
//! is empty. Time enters only as inputs: how long ago the caller asked the guest to shut down
//! ([`Observed::shutdown_elapsed`]) and how long it may take ([`Desired::shutdown_timeout`]).
//!
//! A domain that is not Karri's, or that another node's agent manages, never reaches [`plan`]:
//! the caller builds [`Observed`] only from domains whose metadata names an owner on its node
//! ([`Hypervisor::list_ours`](crate::hypervisor::Hypervisor::list_ours),
//! [`domain::ownership`](crate::domain::ownership)), so no plan can touch anything else.

use std::fmt;
use std::time::Duration;

/// Power state the record asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Power {
    /// The domain runs.
    Running,
    /// The domain is defined and shut off; its disks are kept.
    Stopped,
}

/// The record's side: present while the Instance record wants a domain on this node. A record
/// being deleted or terminated wants none (`None`); while its domain still runs, the agent
/// plans a stop for it instead (its farewell: the power button, then a forced stop after a
/// timeout), and `None` once the domain is off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// UID of the Instance record.
    pub uid: String,
    /// Power state asked for.
    pub power: Power,
    /// How long a guest may take to shut down after the ACPI power button before it is forced
    /// off.
    pub shutdown_timeout: Duration,
    /// A reboot was asked for (RebootInstances) and not yet carried out.
    pub reboot: bool,
}

/// State of a domain as libvirt reports it, folded to what planning needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DomainState {
    /// Running (libvirt `running`, or `blocked` on a resource).
    Running,
    /// Paused by libvirt or an administrator, e.g. after an I/O error.
    Paused,
    /// Not running.
    ShutOff,
    /// Shutting down: the guest is powering itself off.
    ShuttingDown,
    /// Crashed and kept for inspection (Karri's domains are destroyed on crash instead).
    Crashed,
    /// Any other state (no state, PM-suspended, unknown).
    Other,
}

impl DomainState {
    /// Whether the domain has a running QEMU process, i.e. is not shut off.
    pub fn is_active(self) -> bool {
        self != Self::ShutOff
    }
}

/// The hypervisor's side: one domain of Karri's with the record's name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Record UID from the domain's metadata.
    pub uid: String,
    /// State of the domain.
    pub state: DomainState,
    /// Whether the domain is persistent (defined); a transient domain vanishes once shut off.
    pub defined: bool,
    /// How long ago the caller last asked this domain to shut down, if it has since the domain
    /// last ran as desired.
    pub shutdown_elapsed: Option<Duration>,
}

/// One step toward the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Define (or redefine) the domain from the record's XML.
    Define,
    /// Start the defined domain.
    Start,
    /// Ask the guest to power off (ACPI power button); the caller starts its shutdown clock.
    Shutdown,
    /// Force the domain off.
    Destroy,
    /// Remove the domain's definition.
    Undefine,
    /// Reset the running domain (RebootInstances).
    Reboot,
}

impl Action {
    /// Lower-case name, e.g. `shutdown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Define => "define",
            Self::Start => "start",
            Self::Shutdown => "shutdown",
            Self::Destroy => "destroy",
            Self::Undefine => "undefine",
            Self::Reboot => "reboot",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The actions that take `observed` toward `desired`, in order; empty when they agree or when
/// only waiting helps (a shutdown in progress, a paused domain).
///
/// - no record, no domain: nothing;
/// - no record, a domain: destroy it if active, undefine it if defined;
/// - a record, no domain: define, then start if it should run;
/// - a domain whose UID is not the record's (left behind by an earlier record of the same name):
///   removed as above, then the record's domain is created as above;
/// - running asked, domain shut off: start; crashed: destroy and start; running: reboot when one
///   is asked for, else nothing; paused, shutting down or unknown: nothing;
/// - stopped asked, domain running or shutting down: shutdown, then nothing while the guest has
///   time, then destroy once [`Observed::shutdown_elapsed`] reaches
///   [`Desired::shutdown_timeout`] (a zero timeout, a forced stop: destroy at once); paused,
///   crashed or unknown: destroy; shut off: nothing;
/// - a record whose domain is transient: define first, so that it is persistent.
///
/// The caller only ever passes its node's domains (Karri's metadata naming that node); see the
/// module docs.
pub fn plan(desired: Option<&Desired>, observed: Option<&Observed>) -> Vec<Action> {
    match (desired, observed) {
        (None, None) => Vec::new(),
        (None, Some(observed)) => remove(observed),
        (Some(desired), None) => create(desired),
        (Some(desired), Some(observed)) if desired.uid != observed.uid => {
            let mut actions = remove(observed);
            actions.extend(create(desired));
            actions
        }
        (Some(desired), Some(observed)) => converge(desired, observed),
    }
}

/// Removes a domain that no record wants.
fn remove(observed: &Observed) -> Vec<Action> {
    let mut actions = Vec::new();
    if observed.state.is_active() {
        actions.push(Action::Destroy);
    }
    if observed.defined {
        actions.push(Action::Undefine);
    }
    actions
}

/// Creates the record's domain where there is none.
fn create(desired: &Desired) -> Vec<Action> {
    match desired.power {
        Power::Running => vec![Action::Define, Action::Start],
        Power::Stopped => vec![Action::Define],
    }
}

/// Moves the record's own domain toward its power state.
fn converge(desired: &Desired, observed: &Observed) -> Vec<Action> {
    let mut actions = Vec::new();
    // A domain about to start is defined afresh from the record, so that it boots what the
    // record says now (a type changed while stopped, the NIC's guarded tap name of a domain
    // defined by an older agent), not what it was first defined with.
    let starts = desired.power == Power::Running
        && matches!(observed.state, DomainState::ShutOff | DomainState::Crashed);
    if !observed.defined && !starts {
        actions.push(Action::Define);
    }
    match (desired.power, observed.state) {
        (Power::Running, DomainState::ShutOff) => actions.extend([Action::Define, Action::Start]),
        (Power::Running, DomainState::Crashed) => {
            actions.extend([Action::Destroy, Action::Define, Action::Start]);
        }
        (Power::Running, DomainState::Running) if desired.reboot => actions.push(Action::Reboot),
        (
            Power::Running,
            DomainState::Running
            | DomainState::Paused
            | DomainState::ShuttingDown
            | DomainState::Other,
        ) => {}
        (Power::Stopped, DomainState::ShutOff) => {}
        (Power::Stopped, DomainState::Running | DomainState::ShuttingDown) => {
            match observed.shutdown_elapsed {
                // A forced stop: no power button first.
                None if desired.shutdown_timeout.is_zero() => actions.push(Action::Destroy),
                None => actions.push(Action::Shutdown),
                Some(elapsed) if elapsed >= desired.shutdown_timeout => {
                    actions.push(Action::Destroy);
                }
                Some(_) => {}
            }
        }
        (Power::Stopped, DomainState::Paused | DomainState::Crashed | DomainState::Other) => {
            actions.push(Action::Destroy);
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;
    use DomainState::*;

    const UID: &str = "6f1f8d2e-1c1a-4d1e-9a55-2c7c1b7a0b11";
    const OLD_UID: &str = "0b7c1a2e-0000-4000-8000-000000000001";
    const TIMEOUT: Duration = Duration::from_secs(60);

    fn desired(power: Power) -> Desired {
        Desired {
            uid: UID.into(),
            power,
            shutdown_timeout: TIMEOUT,
            reboot: false,
        }
    }

    fn rebooting() -> Desired {
        Desired {
            reboot: true,
            ..desired(Power::Running)
        }
    }

    fn observed(state: DomainState) -> Observed {
        Observed {
            uid: UID.into(),
            state,
            defined: true,
            shutdown_elapsed: None,
        }
    }

    fn stale(state: DomainState) -> Observed {
        Observed {
            uid: OLD_UID.into(),
            ..observed(state)
        }
    }

    fn transient(state: DomainState) -> Observed {
        Observed {
            defined: false,
            ..observed(state)
        }
    }

    fn shutting_down_for(state: DomainState, secs: u64) -> Observed {
        Observed {
            shutdown_elapsed: Some(Duration::from_secs(secs)),
            ..observed(state)
        }
    }

    fn check(desired: Option<Desired>, observed: Option<Observed>, expected: &[Action]) {
        assert_eq!(
            plan(desired.as_ref(), observed.as_ref()),
            expected,
            "desired {desired:?}, observed {observed:?}"
        );
    }

    #[test]
    fn nothing_wanted_and_nothing_there_needs_nothing() {
        check(None, None, &[]);
    }

    #[test]
    fn running_instance_without_domain_is_defined_and_started() {
        check(Some(desired(Power::Running)), None, &[Define, Start]);
    }

    #[test]
    fn stopped_instance_without_domain_is_defined_but_not_started() {
        check(Some(desired(Power::Stopped)), None, &[Define]);
    }

    #[test]
    fn running_instance_with_shut_off_domain_is_defined_afresh_and_started() {
        check(
            Some(desired(Power::Running)),
            Some(observed(ShutOff)),
            &[Define, Start],
        );
    }

    #[test]
    fn running_instance_with_running_domain_is_left_alone() {
        check(Some(desired(Power::Running)), Some(observed(Running)), &[]);
    }

    #[test]
    fn running_instance_waits_for_domain_that_is_paused_shutting_down_or_unknown() {
        for state in [Paused, ShuttingDown, Other] {
            check(Some(desired(Power::Running)), Some(observed(state)), &[]);
        }
    }

    #[test]
    fn running_instance_with_crashed_domain_is_destroyed_and_restarted() {
        check(
            Some(desired(Power::Running)),
            Some(observed(Crashed)),
            &[Destroy, Define, Start],
        );
    }

    #[test]
    fn stopped_instance_with_running_domain_is_shut_down() {
        check(
            Some(desired(Power::Stopped)),
            Some(observed(Running)),
            &[Shutdown],
        );
    }

    #[test]
    fn forced_stop_destroys_the_domain_without_pressing_the_power_button() {
        let forced = Desired {
            shutdown_timeout: Duration::ZERO,
            ..desired(Power::Stopped)
        };
        for state in [Running, ShuttingDown] {
            check(Some(forced.clone()), Some(observed(state)), &[Destroy]);
        }
    }

    #[test]
    fn stopped_instance_with_domain_shutting_down_by_itself_gets_a_shutdown_clock() {
        check(
            Some(desired(Power::Stopped)),
            Some(observed(ShuttingDown)),
            &[Shutdown],
        );
    }

    #[test]
    fn stopped_instance_waits_while_the_guest_has_time_to_shut_down() {
        for state in [Running, ShuttingDown] {
            check(
                Some(desired(Power::Stopped)),
                Some(shutting_down_for(state, 59)),
                &[],
            );
        }
    }

    #[test]
    fn stopped_instance_whose_guest_ignores_shutdown_is_destroyed_at_the_timeout() {
        for secs in [60, 600] {
            for state in [Running, ShuttingDown] {
                check(
                    Some(desired(Power::Stopped)),
                    Some(shutting_down_for(state, secs)),
                    &[Destroy],
                );
            }
        }
    }

    #[test]
    fn stopped_instance_with_paused_crashed_or_unknown_domain_is_destroyed() {
        for state in [Paused, Crashed, Other] {
            check(
                Some(desired(Power::Stopped)),
                Some(observed(state)),
                &[Destroy],
            );
        }
    }

    #[test]
    fn stopped_instance_with_shut_off_domain_is_left_alone() {
        check(Some(desired(Power::Stopped)), Some(observed(ShutOff)), &[]);
        check(
            Some(desired(Power::Stopped)),
            Some(shutting_down_for(ShutOff, 5)),
            &[],
        );
    }

    #[test]
    fn domain_without_record_is_destroyed_and_undefined() {
        for state in [Running, Paused, ShuttingDown, Crashed, Other] {
            check(None, Some(observed(state)), &[Destroy, Undefine]);
        }
    }

    #[test]
    fn shut_off_domain_without_record_is_only_undefined() {
        check(None, Some(observed(ShutOff)), &[Undefine]);
    }

    #[test]
    fn transient_domain_without_record_is_only_destroyed() {
        check(None, Some(transient(Running)), &[Destroy]);
    }

    #[test]
    fn transient_domain_of_a_record_is_defined_to_make_it_persistent() {
        check(
            Some(desired(Power::Running)),
            Some(transient(Running)),
            &[Define],
        );
        check(
            Some(desired(Power::Stopped)),
            Some(transient(Running)),
            &[Define, Shutdown],
        );
    }

    #[test]
    fn stale_running_domain_of_an_earlier_record_is_replaced() {
        check(
            Some(desired(Power::Running)),
            Some(stale(Running)),
            &[Destroy, Undefine, Define, Start],
        );
    }

    #[test]
    fn stale_shut_off_domain_of_an_earlier_record_is_replaced_without_destroy() {
        check(
            Some(desired(Power::Running)),
            Some(stale(ShutOff)),
            &[Undefine, Define, Start],
        );
        check(
            Some(desired(Power::Stopped)),
            Some(stale(ShutOff)),
            &[Undefine, Define],
        );
    }

    #[test]
    fn stale_domain_is_replaced_even_when_its_state_matches_the_record() {
        check(
            Some(desired(Power::Stopped)),
            Some(stale(Running)),
            &[Destroy, Undefine, Define],
        );
    }

    #[test]
    fn stale_domain_shutdown_clock_does_not_carry_over() {
        let observed = Observed {
            shutdown_elapsed: Some(Duration::from_secs(1)),
            ..stale(Running)
        };
        check(
            Some(desired(Power::Stopped)),
            Some(observed),
            &[Destroy, Undefine, Define],
        );
    }

    #[test]
    fn a_reboot_request_resets_a_running_domain_only() {
        check(Some(rebooting()), Some(observed(Running)), &[Reboot]);
        check(Some(rebooting()), Some(observed(ShutOff)), &[Define, Start]);
        check(Some(rebooting()), Some(observed(Paused)), &[]);
        check(Some(rebooting()), Some(observed(ShuttingDown)), &[]);
        check(Some(rebooting()), None, &[Define, Start]);
        let stopping = Desired {
            reboot: true,
            ..desired(Power::Stopped)
        };
        check(Some(stopping), Some(observed(Running)), &[Shutdown]);
    }
}
