//! The agent's runtime: a kube-rs client of the gateway's resource API (never etcd) that
//! converges the libvirt domains of its host toward the instances bound to its node.
//!
//! - **Instances**: a kube-rs [`Controller`] over the instances whose `status.nodeName` is this
//!   node. Each reconcile works like KubeVirt virt-handler's `sync`: the record gives the
//!   [`Desired`] state, libvirt the observed domain, [`plan`] the actions, [`apply_plan`] carries
//!   them out; then the agent reports the `DomainRunning` condition ([`crate::report`]), and
//!   besides it writes only the console output and the last reboot it carried out. A
//!   shutdown's start is remembered in memory (by record UID) so that the plan forces the
//!   domain off after `--shutdown-timeout-seconds` (a stop) or `--terminate-timeout-seconds`
//!   (a record terminated or deleted, see [`farewell`]); a restart forgets it and the guest
//!   gets a fresh timeout, which only delays a forced power-off.
//! - **Orphans**: a sweep removes this node's domains whose owner UID is that of no instance
//!   bound to the node (gone from the store, re-created); a terminated or deleted record's
//!   domain is its reconcile's to shut down ([`is_held_on`]). It runs only once the
//!   instance store holds a complete listing — before that, every domain would look orphaned —
//!   then every `--resync-seconds`, and at once when the watch reports an instance deleted (a
//!   record deleted without a finalizer never reaches a reconcile) or lists afresh. The
//!   hypervisor is this node's: domains that are not Karri's, or that name another node (a
//!   second agent on the same libvirtd), are never listed, so never touched.
//! - **Node and lease**: [`crate::node`] registers the Node, reports what the host offers, and
//!   renews the lease every quarter of its duration.
//!
//! Everything is level-triggered: after a kill -9 the agent lists, observes and plans again. A
//! domain that runs as its record wants gets an empty plan, so a restarted agent adopts running
//! domains untouched. Sweeps and reconciles of the same domain name take turns (a per-name
//! lock), and a sweep looks again under the lock before removing anything.
//!
//! `error_policy` is the only place backoff is decided.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crds::common::set_condition;
use crds::{
    Condition, ConditionStatus, DesiredState, Instance, InstanceState, InstanceType, Lease, Node,
    ID_LABEL, NODE_LEASE_NAMESPACE,
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::Instrument;

use crate::console;
use crate::domain::{self, domain_name, DomainSpec, DomainType, RenderError};
use crate::guest::{self, GuestError, Guests, Prepared};
use crate::hypervisor::{apply_plan, Hypervisor, HypervisorError, ObservedDomain};
use crate::metrics::Metrics;
use crate::node::{self, NodeFacts};
use crate::plan::{plan, Action, Desired, DomainState, Power};
use crate::report::{self, with_report, DomainReport};

/// Plan-and-apply rounds in one reconcile before it gives up and tries again later.
const MAX_ROUNDS: usize = 4;
/// How often a domain asked to shut down is looked at until it is off.
const SHUTDOWN_POLL: Duration = Duration::from_secs(1);
/// How often console logs are read and, when they changed, reported.
const CONSOLE_PERIOD: Duration = Duration::from_secs(1);
/// How often, at most, a console whose output fills the reported window (a guest that writes
/// on and on) is reported: each report is a status write of [`console::MAX_CONSOLE_BYTES`].
const FULL_CONSOLE_PERIOD: Duration = Duration::from_secs(10);

/// What the agent last reported of an instance's console: a digest of the text and when.
type ConsoleReport = (u64, Instant);

/// Whether console text with `digest` is to be reported now, after `last`: when it changed,
/// and, once the log fills the reported window (`full`), no more often than
/// [`FULL_CONSOLE_PERIOD`]. Pure.
fn console_due(last: Option<ConsoleReport>, digest: u64, full: bool, now: Instant) -> bool {
    match last {
        None => true,
        Some((d, _)) if d == digest => false,
        Some((_, at)) => !full || now.saturating_duration_since(at) >= FULL_CONSOLE_PERIOD,
    }
}

/// Why a reconcile (or a sweep) did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API answered with an error (a 409 Conflict after a concurrent write among them).
    #[error("the API refused: {0}")]
    Api(#[from] kube::Error),
    /// libvirt failed, or refused to touch a domain.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The record cannot become domain XML.
    #[error("the record cannot become a domain: {0}")]
    Render(#[from] RenderError),
    /// The record names an instance type the catalogue lacks.
    #[error("instance type {0} is not in the catalogue")]
    UnknownInstanceType(String),
    /// A record lacks a field every stored record has.
    #[error("the record has no {0}")]
    Incomplete(&'static str),
    /// The domain still differs from the record after a few rounds.
    #[error("the domain has not converged; still to do: {0:?}")]
    Unconverged(Vec<Action>),
    /// The guest's images, disk or network could not be prepared.
    #[error("the guest cannot be prepared: {0}")]
    Guest(#[from] GuestError),
    /// The record changed (a stop, a terminate, a deletion) while its guest was prepared: the
    /// plan made before is not carried out, and the next reconcile plans afresh.
    #[error("the record changed while the guest was prepared")]
    Superseded,
}

impl Error {
    /// A short label for the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Api(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Api(_) => "api",
            Error::Hypervisor(
                HypervisorError::NotOurs { .. }
                | HypervisorError::Conflict { .. }
                | HypervisorError::OtherNode { .. },
            ) => "not_ours",
            Error::Hypervisor(_) => "libvirt",
            Error::Render(_) => "render",
            Error::UnknownInstanceType(_) => "instance_type",
            Error::Incomplete(_) => "incomplete",
            Error::Unconverged(_) => "unconverged",
            Error::Guest(e) if e.is_permanent() => "launch_failed",
            Error::Guest(_) => "guest",
            Error::Superseded => "superseded",
        }
    }

    /// How long to wait before trying the record again.
    fn backoff(&self) -> Duration {
        match self.metric_label() {
            "conflict" | "superseded" => Duration::from_millis(50),
            "unconverged" => Duration::from_secs(1),
            "api" | "libvirt" | "guest" => Duration::from_secs(2),
            "instance_type" => Duration::from_secs(5),
            // A name held by a domain that is not ours, or a record that can never render:
            // only a change (which triggers a reconcile anyway) or a slow retry helps.
            _ => Duration::from_secs(30),
        }
    }
}

/// Settings of the agent.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Name of this node.
    pub node: String,
    /// Lease duration; the lease is renewed every quarter of it.
    pub lease_duration: Duration,
    /// How long a guest may take to shut down before it is forced off.
    pub shutdown_timeout: Duration,
    /// How long a guest whose instance is terminated or deleted may take to shut down before
    /// it is forced off.
    pub terminate_timeout: Duration,
    /// Period of the orphan sweep, of the Node re-registration and of each instance's
    /// re-observation.
    pub resync: Duration,
    /// Domain type guests get.
    pub domain_type: DomainType,
}

/// Serialises the work on one domain name between reconciles and sweeps.
#[derive(Default)]
struct DomainLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl DomainLocks {
    async fn lock(&self, name: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            // Entries nobody holds or waits for are dropped.
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            Arc::clone(locks.entry(name.to_owned()).or_default())
        };
        lock.lock_owned().await
    }
}

/// What reconciles and sweeps share.
pub struct Context<H> {
    client: Client,
    hypervisor: Arc<H>,
    settings: Settings,
    instances: Store<Instance>,
    types: Store<InstanceType>,
    /// When the agent asked each record's domain to shut down, by record UID.
    shutdowns: Mutex<HashMap<String, Instant>>,
    /// When the agent last pressed each record's power button, by record UID: kept after a
    /// start asked meanwhile (unlike `shutdowns`), so that the guest obeying it then is not
    /// taken for a guest that powered itself off; forgotten when the agent starts the domain.
    buttons: Mutex<HashMap<String, Instant>>,
    locks: DomainLocks,
    metrics: Arc<Metrics>,
    /// Images, disks, network and metadata of real guests; none on hosts that boot nothing.
    guests: Option<Arc<Guests>>,
    /// What the agent last reported of each instance's console, by instance ID.
    consoles: Mutex<HashMap<String, ConsoleReport>>,
    /// The reboot request each record's domain was last reset for, by record UID (pruned by the
    /// sweep once the record leaves the node): a status write lost to a conflict must not reset
    /// the guest again.
    rebooted: Mutex<HashMap<String, String>>,
    /// Failed reconciles in a row, by record UID (reset by one that succeeds, pruned by the
    /// sweep): each failure waits longer before the next try ([`retry_backoff`]).
    failures: Mutex<HashMap<String, u32>>,
}

fn now() -> Time {
    Time(Timestamp::now())
}

/// What the record wants on this node: nothing when it is being deleted or is terminated,
/// else a domain of its UID in its desired power state.
pub fn desire(instance: &Instance, uid: &str, shutdown_timeout: Duration) -> Option<Desired> {
    let failed = instance
        .status
        .as_ref()
        .is_some_and(|s| s.state == InstanceState::Terminated);
    if instance.metadata.deletion_timestamp.is_some() || failed {
        return None;
    }
    let power = match instance.spec.desired_state {
        DesiredState::Running => Power::Running,
        DesiredState::Stopped => Power::Stopped,
        DesiredState::Terminated => return None,
    };
    // A forced stop (StopInstances with Force) powers off without waiting for the guest.
    let forced = power == Power::Stopped
        && instance
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(crds::FORCE_STOP_ANNOTATION));
    Some(Desired {
        uid: uid.to_owned(),
        power,
        shutdown_timeout: if forced {
            Duration::ZERO
        } else {
            shutdown_timeout
        },
        reboot: reboot_request(instance).is_some(),
    })
}

/// How a record that no longer wants its domain (terminated, deleted) takes leave of it while
/// it still runs: as EC2 does on TerminateInstances, the guest is asked to shut down (ACPI power
/// button) and forced off after `timeout`. A launch that failed is forced off at once.
pub fn farewell(instance: &Instance, uid: &str, timeout: Duration) -> Desired {
    let failed = instance
        .status
        .as_ref()
        .is_some_and(|s| s.state == InstanceState::Terminated);
    Desired {
        uid: uid.to_owned(),
        power: Power::Stopped,
        shutdown_timeout: if failed { Duration::ZERO } else { timeout },
        reboot: false,
    }
}

/// What to plan for: what the record wants, else, while the record's own (defined) domain is
/// still active, its `farewell`. A transient domain is destroyed instead: stopping it would
/// define it again, preparing the guest of a record that is going. Pure.
fn wanted<'a>(
    desired: Option<&'a Desired>,
    farewell: Option<&'a Desired>,
    observed: Option<&ObservedDomain>,
    uid: &str,
) -> Option<&'a Desired> {
    desired.or(farewell
        .filter(|_| observed.is_some_and(|d| d.uid == uid && d.defined && d.state.is_active())))
}

/// The reboot request of `instance` not yet carried out: its `karri.dev/reboot-requested-at`
/// annotation when `status.lastRebootRequest` differs.
pub fn reboot_request(instance: &Instance) -> Option<&str> {
    let asked = instance
        .metadata
        .annotations
        .as_ref()?
        .get(crds::REBOOT_ANNOTATION)?
        .as_str();
    let done = instance
        .status
        .as_ref()
        .and_then(|s| s.last_reboot_request.as_deref());
    (done != Some(asked)).then_some(asked)
}

/// Whether `instance` is bound to `node` and still wants a domain there.
pub fn is_live_on(instance: &Instance, node: &str) -> bool {
    instance
        .status
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        == Some(node)
        && instance.metadata.deletion_timestamp.is_none()
        && instance.spec.desired_state != DesiredState::Terminated
}

/// Whether `instance` is bound to `node` and what its domain had may still be there: it is
/// live, or terminated or deleted but not yet released by its reconcile (which shuts the guest
/// down first, see [`farewell`]). The sweeps leave such an instance's domain and files alone.
pub fn is_held_on(instance: &Instance, node: &str) -> bool {
    let bound = instance
        .status
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        == Some(node);
    bound && (is_live_on(instance, node) || !released(instance))
}

/// The agent's `DomainRunning` report on `instance` if it was made at the record's current
/// generation (a report of an older spec says nothing of this one).
fn current_report(instance: &Instance) -> Option<&Condition> {
    instance
        .status
        .as_ref()
        .and_then(|s| crds::common::find_condition(&s.conditions, report::CONDITION_DOMAIN_RUNNING))
        .filter(|c| c.observed_generation == instance.metadata.generation)
}

/// Whether the agent already reported that `instance`, at its current generation, cannot launch.
pub fn launch_failed(instance: &Instance) -> bool {
    current_report(instance).is_some_and(|c| c.reason == report::REASON_LAUNCH_FAILED)
}

/// Whether the agent already reported, at the record's current generation, that the record has
/// no domain here. That report follows the release of what its domain had (overlay, address,
/// DHCP host, port guard binding), and lets the operator free the address: a terminated record
/// kept for retention must not release again what a later instance holds at that address.
pub fn released(instance: &Instance) -> bool {
    current_report(instance).is_some_and(|c| c.reason == report::REASON_UNDEFINED)
}

/// Whether the agent reported, at the record's current generation, that its domain runs, or
/// that its guest powered itself off.
pub fn reported_running(instance: &Instance) -> bool {
    current_report(instance).is_some_and(|c| {
        c.status == ConditionStatus::True || c.reason == crds::REASON_GUEST_SHUTDOWN
    })
}

/// Whether the guest of `instance` powered itself off: the record asks it to run, its domain
/// was reported running at this generation (a start asked since would have a newer one), and
/// `observed` is that domain shut off by a shutdown of its guest OS (not destroyed, not
/// crashed), and not by obeying the power button the agent pressed lately (`pressed_lately`: a
/// stop, then a start asked through the resource API while the guest shut down). EC2 then stops
/// the instance (`instanceInitiatedShutdownBehavior` is `stop`) rather than booting it again.
pub fn powered_off_by_guest(
    instance: &Instance,
    observed: Option<&ObservedDomain>,
    uid: &str,
    pressed_lately: bool,
) -> bool {
    !pressed_lately
        && instance.spec.desired_state == DesiredState::Running
        && instance.metadata.deletion_timestamp.is_none()
        && reported_running(instance)
        && observed.is_some_and(|d| d.uid == uid && d.state == DomainState::ShutOff && d.shut_down)
}

/// Whether a live instance on `node` other than `uid` holds the address `ip`.
pub fn held_by_another<'a>(
    instances: impl IntoIterator<Item = &'a Instance>,
    node: &str,
    uid: &str,
    ip: Ipv4Addr,
) -> bool {
    instances.into_iter().any(|other| {
        other.uid().as_deref() != Some(uid)
            && is_live_on(other, node)
            && guest::address_of(other).is_some_and(|(at, _)| at == ip)
    })
}

/// The record's instance ID (the `karri.dev/id` label).
fn instance_id(instance: &Instance) -> Result<&str, Error> {
    instance
        .labels()
        .get(ID_LABEL)
        .map(String::as_str)
        .filter(|id| !id.is_empty())
        .ok_or(Error::Incomplete("instance ID label"))
}

/// What an orphan sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Swept {
    /// Domains removed.
    removed: usize,
    /// When to look again at the orphans whose guests are still shutting down (`None`: none
    /// is).
    look_again: Option<Duration>,
}

impl<H: Hypervisor + 'static> Context<H> {
    fn shutdown_elapsed(&self, uid: &str) -> Option<Duration> {
        let shutdowns = self
            .shutdowns
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shutdowns.get(uid).map(Instant::elapsed)
    }

    /// Notes that the agent pressed the power button of `uid`'s domain now, forgetting presses
    /// too old to matter.
    fn pressed_button(&self, uid: &str) {
        let window = self.button_window();
        let mut buttons = self.buttons.lock().unwrap_or_else(PoisonError::into_inner);
        buttons.retain(|_, at| at.elapsed() < window);
        buttons.insert(uid.to_owned(), Instant::now());
    }

    /// Whether the agent pressed the power button of `uid`'s domain recently enough for a guest
    /// shutdown now to be the guest obeying it.
    fn pressed_button_recently(&self, uid: &str) -> bool {
        let window = self.button_window();
        self.buttons
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(uid)
            .is_some_and(|at| at.elapsed() < window)
    }

    /// How long after a press of the power button a guest shutdown counts as obeying it: the time
    /// a guest has to shut down, and as long again.
    fn button_window(&self) -> Duration {
        self.settings.shutdown_timeout.saturating_mul(2)
    }

    fn set_shutdown_clock(&self, uid: &str, running: bool) {
        let mut shutdowns = self
            .shutdowns
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if running {
            shutdowns.entry(uid.to_owned()).or_insert_with(Instant::now);
        } else {
            shutdowns.remove(uid);
        }
    }

    /// The domain XML of `instance`, its guest prepared first (images fetched, overlay made,
    /// network entries written).
    async fn render(&self, instance: &Instance, id: &str, uid: &str) -> Result<String, Error> {
        let guest = match &self.guests {
            Some(g) => {
                let started = std::time::Instant::now();
                let prepared = g.prepare(instance, id).await?;
                self.metrics
                    .guest_prepare
                    .observe(started.elapsed().as_secs_f64());
                prepared
            }
            None => Prepared::default(),
        };
        let type_name = &instance.spec.instance_type;
        let itype = self
            .types
            .get(&ObjectRef::new(type_name))
            .ok_or_else(|| Error::UnknownInstanceType(type_name.clone()))?;
        let spec = DomainSpec {
            name: domain_name(id),
            uid: uid.to_owned(),
            instance_id: id.to_owned(),
            namespace: instance.namespace().ok_or(Error::Incomplete("namespace"))?,
            node: self.settings.node.clone(),
            instance_type: type_name.clone(),
            vcpus: itype.spec.vcpus,
            memory_mib: itype.spec.memory_mib,
            domain_type: self.settings.domain_type,
            disk: guest.disk,
            kernel: guest.kernel,
            nic: guest.nic,
            console_log: guest.console_log,
        };
        Ok(domain::render(&spec)?)
    }

    /// Observe, plan and apply until the plan is empty (or [`MAX_ROUNDS`] pass); returns the
    /// last observation and what is still to do.
    async fn converge(
        &self,
        instance: &Instance,
        id: &str,
        uid: &str,
        desired: Option<&Desired>,
        farewell: Option<&Desired>,
    ) -> Result<(Option<ObservedDomain>, Vec<Action>), Error> {
        let name = domain_name(id);
        let hv = &*self.hypervisor;
        let mut desired = desired.cloned();
        let desired = &mut desired;
        let mut observed = hv.observe(&name).await?;
        for _ in 0..MAX_ROUNDS {
            let elapsed = observed
                .as_ref()
                .filter(|d| d.uid == uid)
                .and_then(|_| self.shutdown_elapsed(uid));
            let actions = plan(
                wanted(desired.as_ref(), farewell, observed.as_ref(), uid),
                observed.as_ref().map(|d| d.observed(elapsed)).as_ref(),
            );
            if actions.is_empty() {
                return Ok((observed, actions));
            }
            let xml = if actions.contains(&Action::Define) {
                // A fetch may evict: first mark what every live instance boots from.
                self.hold_live_images();
                let xml = self.render(instance, id, uid).await?;
                // Preparing the guest may have taken minutes (an image download): a stop, a
                // terminate or a deletion that came meanwhile must not see its guest boot first.
                // A record gone from the node's store (deleted, bound elsewhere) or made anew
                // under its name is superseded too.
                let latest = self
                    .instances
                    .get(&ObjectRef::from_obj(instance))
                    .filter(|latest| latest.uid().as_deref() == Some(uid));
                if latest.is_none_or(|latest| superseded(instance, &latest)) {
                    tracing::info!(domain = %name, "the record changed while its guest was prepared; planning again");
                    return Err(Error::Superseded);
                }
                Some(xml)
            } else {
                None
            };
            if let (Some(guests), true) = (&self.guests, actions.contains(&Action::Start)) {
                // Each run of the guest is a new metadata session.
                guests.withdraw(instance);
            }
            tracing::info!(domain = %name, ?actions, "applying plan");
            apply_plan(hv, &name, xml.as_deref(), &actions).await?;
            self.metrics.acted(&actions);
            if actions.contains(&Action::Shutdown) {
                self.set_shutdown_clock(uid, true);
                self.pressed_button(uid);
            }
            if actions.contains(&Action::Start) {
                // A shutdown of the guest started now is its own, whatever was pressed before.
                self.buttons
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(uid);
            }
            if actions.contains(&Action::Reboot) {
                if let Some(d) = desired.as_mut() {
                    d.reboot = false;
                }
                if let Some(asked) = reboot_request(instance) {
                    self.rebooted
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(uid.to_owned(), asked.to_owned());
                }
            }
            observed = hv.observe(&name).await?;
        }
        let elapsed = self.shutdown_elapsed(uid);
        let left = plan(
            wanted(desired.as_ref(), farewell, observed.as_ref(), uid),
            observed.as_ref().map(|d| d.observed(elapsed)).as_ref(),
        );
        Ok((observed, left))
    }

    /// The reboot request the domain of record `uid` was last reset for and whose record may
    /// not show it yet.
    fn reset_for(&self, uid: &str) -> Option<String> {
        self.rebooted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(uid)
            .cloned()
    }

    /// The newest copy of `instance` the watch has delivered: the store's when it is still the
    /// same record (same UID), else `instance` itself.
    fn freshest(&self, instance: &Instance, uid: &str) -> Arc<Instance> {
        self.instances
            .get(&ObjectRef::from_obj(instance))
            .filter(|latest| latest.uid().as_deref() == Some(uid))
            .unwrap_or_else(|| Arc::new(instance.clone()))
    }

    /// One reconcile of a bound instance.
    async fn sync(&self, instance: &Instance) -> Result<Requeue, Error> {
        let bound = instance
            .status
            .as_ref()
            .and_then(|s| s.node_name.as_deref());
        if bound != Some(self.settings.node.as_str()) {
            // Not ours (the watch selects on the binding, so this is a race): leave it alone;
            // the sweep removes the domain once the instance has left the store.
            return Ok(Requeue::await_change());
        }
        let uid = instance.uid().ok_or(Error::Incomplete("UID"))?;
        let id = instance_id(instance)?;
        let name = instance.name_any();
        let mut desired = desire(instance, &uid, self.settings.shutdown_timeout);
        let farewell = desired
            .is_none()
            .then(|| farewell(instance, &uid, self.settings.terminate_timeout));
        if let (Some(d), Some(asked)) = (desired.as_mut(), reboot_request(instance)) {
            if self.reset_for(&uid) == Some(asked.to_owned()) {
                // Carried out already; only its record is missing (written below).
                d.reboot = false;
            }
        }
        if desired.is_some() && launch_failed(instance) {
            // Reported already for this generation; the operator terminates the instance.
            return Ok(Requeue::await_change());
        }

        let lock = self.locks.lock(&domain_name(id)).await;
        if reported_running(instance) && desired.as_ref().is_some_and(|d| d.power == Power::Running)
        {
            let seen = self.hypervisor.observe(&domain_name(id)).await?;
            if powered_off_by_guest(
                instance,
                seen.as_ref(),
                &uid,
                self.pressed_button_recently(&uid),
            ) {
                drop(lock);
                return self.report_guest_shutdown(instance).await;
            }
        }
        let converged = self
            .converge(instance, id, &uid, desired.as_ref(), farewell.as_ref())
            .await;
        drop(lock);
        let (observed, left) = match converged {
            Err(Error::Guest(e)) if e.is_permanent() => {
                return self.report_launch_failure(instance, &e).await;
            }
            Err(e) => {
                let launching = desired.as_ref().is_some_and(|d| d.power == Power::Running)
                    && !reported_running(instance);
                // Reported on the first failure in a row, then on the 2nd, 4th, 8th …: each
                // report is a status write that reconciles the record again at once, and an
                // error whose text changes from one try to the next must not make every try
                // write.
                let failed_before = self
                    .failures
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&uid)
                    .copied()
                    .unwrap_or(0);
                if launching && reported_as_retrying(&e) && (failed_before + 1).is_power_of_two() {
                    // The instance stays pending: its status says why, while the agent tries
                    // again (less and less often, see `error_policy`).
                    let message = format!("{e}; trying again");
                    if let Err(error) = self
                        .report_not_running(instance, report::REASON_LAUNCH_RETRYING, &message)
                        .await
                    {
                        tracing::debug!(%error, "cannot report the launch retry");
                    }
                }
                return Err(e);
            }
            Ok(converged) => converged,
        };
        if let Some(guests) = &self.guests {
            if desired.is_none()
                && observed.as_ref().is_none_or(|d| d.uid != uid)
                && !released(instance)
            {
                let held_elsewhere = |ip: Ipv4Addr| {
                    let live = self.instances.state();
                    held_by_another(live.iter().map(|i| &**i), &self.settings.node, &uid, ip)
                };
                guests
                    .release(id, guest::address_of(instance), held_elsewhere)
                    .await?;
            } else if desired.is_some() {
                let active = observed
                    .as_ref()
                    .is_some_and(|d| d.uid == uid && d.state.is_active());
                guests.publish(instance, active);
            }
        }

        // The shutdown clock runs only while the record's own domain, asked to stop (or taking
        // its leave of a terminated record), is still active.
        let stopping = wanted(desired.as_ref(), farewell.as_ref(), observed.as_ref(), &uid)
            .filter(|d| d.power == Power::Stopped)
            .map(|d| d.shutdown_timeout);
        let shutting_down = stopping.is_some()
            && observed
                .as_ref()
                .is_some_and(|d| d.uid == uid && d.state.is_active());
        if !shutting_down {
            self.set_shutdown_clock(&uid, false);
        }

        let report = DomainReport::of(observed.as_ref(), &uid);
        let generation = instance.metadata.generation;
        // A reboot asked for is carried out once the record's domain runs (rebooted now, or
        // started afresh).
        let running = observed
            .as_ref()
            .is_some_and(|d| d.uid == uid && d.state == DomainState::Running);
        let rebooted = reboot_request(instance)
            .filter(|_| running && !left.contains(&Action::Reboot))
            .map(str::to_owned);
        // A domain start takes long enough for other status writes (the operator's, a console
        // report) to land meanwhile: build on the freshest copy of the record the watch has
        // delivered, so that the write carries its resourceVersion instead of failing with a 409
        // on the one the reconcile began with. The report stays for `generation`, the spec acted on.
        let base = self.freshest(instance, &uid);
        let mut status = with_report(base.status.as_ref(), report, generation, &now());
        if let Some(asked) = rebooted {
            let next = status.get_or_insert_with(|| base.status.clone().unwrap_or_default());
            next.last_reboot_request = Some(asked);
            tracing::info!("rebooted the domain as asked");
        }
        if let Some(status) = status {
            let ns = instance.namespace().ok_or(Error::Incomplete("namespace"))?;
            let api: Api<Instance> = Api::namespaced(self.client.clone(), &ns);
            let mut updated = (*base).clone();
            updated.status = Some(status);
            // replace_status carries the resourceVersion read: a concurrent write is a 409.
            api.replace_status(&name, &PostParams::default(), &updated)
                .await?;
            tracing::info!(domain = report.as_str(), ?generation, "reported the domain");
        }

        if !left.is_empty() {
            return Err(Error::Unconverged(left));
        }
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&uid);
        Ok(match (self.shutdown_elapsed(&uid), stopping) {
            (Some(elapsed), Some(timeout)) if shutting_down => Requeue::requeue(
                timeout
                    .saturating_sub(elapsed)
                    .clamp(Duration::from_millis(50), SHUTDOWN_POLL),
            ),
            // Look again now and then: a guest may power itself off, a domain may crash.
            _ => Requeue::requeue(self.settings.resync),
        })
    }

    /// Reports that the guest powered itself off (its `DomainRunning` condition `False` with
    /// reason `GuestShutdown` at the record's generation), leaving the domain off: the operator
    /// stops the instance, as EC2 does, and a start asked since (a newer generation) boots it.
    async fn report_guest_shutdown(&self, instance: &Instance) -> Result<Requeue, Error> {
        let reason = crds::REASON_GUEST_SHUTDOWN;
        if self
            .report_not_running(instance, reason, "the guest powered itself off")
            .await?
        {
            tracing::info!("the guest powered itself off; the domain stays off");
        }
        Ok(Requeue::await_change())
    }

    /// Reports that the instance cannot launch (its `DomainRunning` condition `False` with
    /// reason `LaunchFailed`); the operator fails it. Nothing is retried until the record changes.
    async fn report_launch_failure(
        &self,
        instance: &Instance,
        error: &GuestError,
    ) -> Result<Requeue, Error> {
        tracing::warn!(%error, "the instance cannot launch");
        self.report_not_running(instance, report::REASON_LAUNCH_FAILED, &error.to_string())
            .await?;
        self.metrics.failed("launch_failed");
        Ok(Requeue::await_change())
    }

    /// Writes the record's `DomainRunning` condition `False` with `reason` and `message` at its
    /// generation, unless it says so already; returns whether it wrote.
    async fn report_not_running(
        &self,
        instance: &Instance,
        reason: &str,
        message: &str,
    ) -> Result<bool, Error> {
        let mut status = instance.status.clone().unwrap_or_default();
        let condition = Condition::new(
            report::CONDITION_DOMAIN_RUNNING,
            ConditionStatus::False,
            reason,
            message,
            now(),
        )
        .with_observed_generation(instance.metadata.generation);
        if !set_condition(&mut status.conditions, condition) {
            return Ok(false);
        }
        let ns = instance.namespace().ok_or(Error::Incomplete("namespace"))?;
        let api: Api<Instance> = Api::namespaced(self.client.clone(), &ns);
        let mut updated = instance.clone();
        updated.status = Some(status);
        // replace_status carries the resourceVersion read: a concurrent write is a 409.
        api.replace_status(&instance.name_any(), &PostParams::default(), &updated)
            .await?;
        Ok(true)
    }

    /// Reports each live instance's console output when it changed since the last report.
    async fn report_consoles(&self) {
        let Some(guests) = &self.guests else { return };
        for instance in self.instances.state() {
            if !is_live_on(&instance, &self.settings.node) {
                continue;
            }
            let Ok(id) = instance_id(&instance) else {
                continue;
            };
            let path = guests.console_log(id);
            let (text, full) = match tokio::task::spawn_blocking(move || console::read(&path)).await
            {
                Ok(Ok(Some(tail))) => (tail.text, tail.full),
                Ok(Ok(None)) => continue,
                Ok(Err(error)) => {
                    tracing::debug!(%error, id, "cannot read the console log");
                    continue;
                }
                Err(_) => continue,
            };
            let digest = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                text.hash(&mut h);
                h.finish()
            };
            let reported = !console_is_news(
                instance
                    .status
                    .as_ref()
                    .and_then(|s| s.console_output.as_deref()),
                &text,
            );
            {
                let consoles = self.consoles.lock().unwrap_or_else(PoisonError::into_inner);
                let last = consoles.get(id).copied();
                if reported || !console_due(last, digest, full, Instant::now()) {
                    continue;
                }
            }
            let Some(ns) = instance.namespace() else {
                continue;
            };
            let api: Api<Instance> = Api::namespaced(self.client.clone(), &ns);
            let patch = serde_json::json!({
                "status": {"consoleOutput": text, "consoleOutputTime": now()}
            });
            match api
                .patch_status(
                    &instance.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    self.metrics.console_reports.inc();
                    let mut consoles = self.consoles.lock().unwrap_or_else(PoisonError::into_inner);
                    consoles.insert(id.to_owned(), (digest, Instant::now()));
                }
                Err(error) => tracing::debug!(%error, id, "cannot report the console output"),
            }
        }
    }

    /// Marks the images of every live instance bound to the node as needed, from the store
    /// (after a restart, domains are adopted without being prepared).
    fn hold_live_images(&self) {
        let Some(guests) = &self.guests else { return };
        for instance in self.instances.state() {
            if !is_live_on(&instance, &self.settings.node) {
                continue;
            }
            if let Ok(id) = instance_id(&instance) {
                guests.hold_images_of(&instance, id);
            }
        }
    }

    /// Removes the files, DHCP entries and metadata of instances no longer held on the node
    /// ([`is_held_on`]), and evicts cached images beyond the cache's limit.
    async fn sweep_guests(&self) {
        let Some(guests) = &self.guests else { return };
        self.hold_live_images();
        let held_ids = |keep: fn(&Instance, &str) -> bool| -> HashSet<String> {
            self.instances
                .state()
                .iter()
                .filter(|i| keep(i, &self.settings.node))
                .filter_map(|i| instance_id(i).ok().map(str::to_owned))
                .collect()
        };
        let held = held_ids(is_held_on);
        let live = held_ids(is_live_on);
        // The domains there now: an orphan's guest still shutting down keeps its files until
        // its domain is gone. Without the list, nothing is released this time.
        let domains: Option<HashSet<String>> = match self.hypervisor.list_ours().await {
            Ok(domains) => Some(domains.into_iter().map(|d| d.name).collect()),
            Err(error) => {
                tracing::warn!(%error, "cannot list domains; gone instances' files stay for now");
                None
            }
        };
        if let Some(domains) = &domains {
            for id in guests.instances_with_files() {
                if held.contains(&id) || domains.contains(&domain_name(&id)) {
                    continue;
                }
                let _lock = self.locks.lock(&domain_name(&id)).await;
                // Look again under the lock: a record that arrived since, and whose reconcile
                // made these files, holds them now, or has defined its domain.
                if held_ids(is_held_on).contains(&id)
                    || !matches!(self.hypervisor.observe(&domain_name(&id)).await, Ok(None))
                {
                    continue;
                }
                if let Err(error) = guests.release(&id, None, |_| false).await {
                    tracing::warn!(%error, id, "cannot remove the files of a gone instance");
                }
            }
        }
        {
            let mut consoles = self.consoles.lock().unwrap_or_else(PoisonError::into_inner);
            consoles.retain(|id, _| live.contains(id));
        }
        // Taken before the store is read: a guest bound after it is kept though not read.
        let mark = guests.network_mark();
        let addresses: Vec<(Ipv4Addr, String)> = self
            .instances
            .state()
            .iter()
            .filter(|i| is_held_on(i, &self.settings.node))
            .filter_map(|i| guest::address_of(i))
            .collect();
        match guests.keep_dhcp_running().await {
            Some(Ok(true)) => {
                self.metrics.dhcp_restarts.inc();
            }
            Some(Ok(false)) | None => {}
            Some(Err(error)) => tracing::error!(%error, "cannot start the DHCP server again"),
        }
        guests.retain_network(mark, &addresses).await;
        match guests.guard_dropped().await {
            Some(Ok(d)) => self.metrics.guard_dropped(d.packets, d.bytes),
            Some(Err(error)) => tracing::warn!(%error, "cannot read the port guard's counter"),
            None => {}
        }
        if let Err(error) = guests.evict().await {
            tracing::warn!(%error, "cannot evict cached images");
        }
    }

    /// UIDs of the instances bound to the node that `keep` holds for, from the store.
    fn uids(&self, keep: fn(&Instance, &str) -> bool) -> HashSet<String> {
        self.instances
            .state()
            .iter()
            .filter(|i| keep(i, &self.settings.node))
            .filter_map(|i| i.uid())
            .collect()
    }

    /// Removes every domain of Karri's whose owner is no instance held on the node
    /// ([`is_held_on`]): a record terminated or deleted is left to its reconcile, which shuts
    /// its guest down first. A running domain whose record is gone altogether (deleted without
    /// the agent, or while it was down) takes its leave as a terminated one does: its guest is
    /// asked to shut down and forced off after `--terminate-timeout-seconds`; then it is
    /// removed. Call only once the instance store is ready. Returns what it did, and the first
    /// failure (after trying every orphan).
    async fn sweep(&self) -> (Swept, Result<(), Error>) {
        let hv = &*self.hypervisor;
        let domains = match hv.list_ours().await {
            Ok(domains) => domains,
            Err(error) => return (Swept::default(), Err(error.into())),
        };
        self.metrics.observe_domains(&domains);
        // Read after listing: a domain is defined only after its record is in the store, so
        // every listed domain of a held record finds it here.
        let held = self.uids(is_held_on);
        {
            let mut shutdowns = self
                .shutdowns
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // An orphan's clock runs while its domain does.
            shutdowns.retain(|uid, _| {
                held.contains(uid) || domains.iter().any(|d| d.uid == *uid && d.state.is_active())
            });
            drop(shutdowns);
            let live = self.uids(is_live_on);
            self.rebooted
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|uid, _| live.contains(uid));
            self.failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|uid, _| live.contains(uid));
        }
        let mut removed = 0;
        let mut look_again: Option<Duration> = None;
        // One orphan that cannot be removed (a QEMU stuck in the kernel) does not keep the
        // others: each is tried, and the first failure is returned after all of them.
        let mut failed = None;
        for orphan in domains.iter().filter(|d| !held.contains(&d.uid)) {
            let _lock = self.locks.lock(&orphan.name).await;
            // Look again under the lock: a reconcile may have replaced it meanwhile.
            let mut now = match hv.observe(&orphan.name).await {
                Ok(Some(now)) => now,
                Ok(None) => continue,
                Err(error) => {
                    tracing::warn!(%error, domain = %orphan.name, "cannot look at an orphan");
                    failed.get_or_insert(error);
                    continue;
                }
            };
            if now.uid != orphan.uid || self.uids(is_held_on).contains(&now.uid) {
                continue;
            }
            // A defined domain still running first takes its leave; a transient one is
            // destroyed (stopping it would only make it vanish the same way).
            if now.defined && now.state.is_active() {
                let leave = Desired {
                    uid: now.uid.clone(),
                    power: Power::Stopped,
                    shutdown_timeout: self.settings.terminate_timeout,
                    reboot: false,
                };
                let elapsed = self.shutdown_elapsed(&now.uid);
                let actions = plan(Some(&leave), Some(&now.observed(elapsed)));
                if let Err(error) = apply_plan(hv, &now.name, None, &actions).await {
                    tracing::warn!(%error, domain = %now.name, "cannot stop an orphan");
                    failed.get_or_insert(error);
                    continue;
                }
                self.metrics.acted(&actions);
                if actions.contains(&Action::Shutdown) {
                    self.set_shutdown_clock(&now.uid, true);
                    tracing::info!(
                        domain = %now.name,
                        uid = %now.uid,
                        timeout = ?self.settings.terminate_timeout,
                        "asked the guest of a domain no instance on the node owns to shut down"
                    );
                }
                now = match hv.observe(&now.name).await {
                    Ok(Some(after)) if after.uid == now.uid && after.state.is_active() => {
                        let waited = self.shutdown_elapsed(&now.uid).unwrap_or_default();
                        let next = self
                            .settings
                            .terminate_timeout
                            .saturating_sub(waited)
                            .clamp(Duration::from_millis(50), SHUTDOWN_POLL);
                        look_again = Some(look_again.map_or(next, |l| l.min(next)));
                        continue;
                    }
                    // Off now (the guest obeyed, or was forced off): removed below.
                    Ok(Some(after)) if after.uid == now.uid => after,
                    Ok(_) => continue,
                    Err(error) => {
                        failed.get_or_insert(error);
                        continue;
                    }
                };
            }
            let actions = plan(None, Some(&now.observed(None)));
            if let Err(error) = apply_plan(hv, &now.name, None, &actions).await {
                tracing::warn!(%error, domain = %now.name, "cannot remove an orphan");
                failed.get_or_insert(error);
                continue;
            }
            self.set_shutdown_clock(&now.uid, false);
            self.metrics.acted(&actions);
            self.metrics.orphans_removed.inc();
            removed += 1;
            tracing::info!(
                domain = %now.name,
                uid = %now.uid,
                namespace = %now.namespace,
                ?actions,
                "removed a domain no instance on the node owns"
            );
        }
        if removed > 0 {
            match hv.list_ours().await {
                Ok(now) => self.metrics.observe_domains(&now),
                Err(error) => {
                    failed.get_or_insert(error);
                }
            }
        }
        tracing::debug!(
            domains = domains.len(),
            held = held.len(),
            removed,
            "swept orphans"
        );
        let swept = Swept {
            removed,
            look_again,
        };
        match failed {
            Some(error) => (swept, Err(error.into())),
            None => (swept, Ok(())),
        }
    }

    /// Sweeps; returns when to sweep again for the orphans still shutting down (also after a
    /// failure: one orphan that cannot be removed does not delay the others' leave).
    async fn sweep_logged(&self) -> Option<Duration> {
        let (swept, result) = self.sweep().await;
        if let Err(error) = result {
            self.metrics.failed(error.metric_label());
            tracing::warn!(%error, "the orphan sweep failed; trying again later");
        }
        self.sweep_guests().await;
        swept.look_again
    }
}

async fn reconcile<H: Hypervisor + 'static>(
    instance: Arc<Instance>,
    ctx: Arc<Context<H>>,
) -> Result<Requeue, Error> {
    let started = std::time::Instant::now();
    let span = tracing::info_span!(
        "reconcile",
        instance = %format!("{}/{}", instance.namespace().unwrap_or_default(), instance.name_any()),
        id = instance.labels().get(ID_LABEL).map_or("", String::as_str),
    );
    let result = ctx.sync(&instance).instrument(span).await;
    ctx.metrics.reconciled(started.elapsed());
    result
}

fn error_policy<H: Hypervisor + 'static>(
    instance: Arc<Instance>,
    error: &Error,
    ctx: Arc<Context<H>>,
) -> Requeue {
    ctx.metrics.failed(error.metric_label());
    let what = format!(
        "{}/{}",
        instance.namespace().unwrap_or_default(),
        instance.name_any()
    );
    let failures = instance.uid().map_or(0, |uid| {
        let mut failures = ctx.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let n = failures.entry(uid).or_insert(0);
        *n = n.saturating_add(1);
        *n
    });
    match error.metric_label() {
        "conflict" | "unconverged" | "superseded" => {
            tracing::debug!(instance = %what, %error, "reconcile failed")
        }
        _ => tracing::warn!(instance = %what, %error, "reconcile failed"),
    }
    Requeue::requeue(retry_backoff(error, failures))
}

/// Whether a failed reconcile of an instance on its way up is reported in its status
/// ([`report::REASON_LAUNCH_RETRYING`]): what keeps its guest from starting, not a lost race
/// (a conflict, a changed record) nor a failure to reach the API (the report would fail too).
fn reported_as_retrying(error: &Error) -> bool {
    !matches!(
        error.metric_label(),
        "conflict" | "superseded" | "api" | "launch_failed"
    )
}

/// Longest wait between two tries of a record that keeps failing.
const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(60);

/// How long to wait before trying a record again after its `failures`-th failure in a row:
/// the error's own backoff, doubled with each failure after the first few, up to
/// [`MAX_RETRY_BACKOFF`] (a lost race is tried again at once whatever came before). Pure.
fn retry_backoff(error: &Error, failures: u32) -> Duration {
    let base = error.backoff();
    if matches!(error.metric_label(), "conflict" | "superseded") {
        return base;
    }
    let doublings = failures.saturating_sub(3).min(6);
    base.saturating_mul(1 << doublings)
        .min(MAX_RETRY_BACKOFF.max(base))
}

/// Whether `latest`, the freshest copy of the record a reconcile began with (`began`), asks
/// for something else: a new generation (a stop, a start, a terminate, a type change) or a
/// deletion. Pure.
fn superseded(began: &Instance, latest: &Instance) -> bool {
    began.metadata.generation != latest.metadata.generation
        || (began.metadata.deletion_timestamp.is_none()
            && latest.metadata.deletion_timestamp.is_some())
}

/// Whether console `text` read from the log differs from the output a record shows
/// (`reported`). An empty log (virtlogd makes the file as QEMU starts) says what no output says:
/// reporting "" would be a write that only races the agent's report of the domain start.
fn console_is_news(reported: Option<&str>, text: &str) -> bool {
    reported.unwrap_or_default() != text
}

/// A store of `K` kept by its own reflector task.
fn spawn_store<K>(api: Api<K>) -> Store<K>
where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    tokio::spawn(stream.for_each(|_| futures::future::ready(())));
    store
}

/// Renews the node lease every quarter of its duration; failures are logged and retried on
/// the next tick. A renewal that takes longer than that quarter is given up and tried afresh:
/// one request to a gateway that stopped answering must not hold the lease until it expires.
async fn heartbeat(client: Client, node: String, duration: Duration, metrics: Arc<Metrics>) {
    let api: Api<Lease> = Api::namespaced(client, NODE_LEASE_NAMESPACE);
    let period = (duration / 4).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match tokio::time::timeout(period, node::renew_lease(&api, &node, duration)).await {
            Ok(Ok(())) => {
                metrics.lease_renewals.inc();
            }
            Ok(Err(error)) => {
                metrics.lease_failures.inc();
                tracing::warn!(%error, "could not renew the node lease");
            }
            Err(_) => {
                metrics.lease_failures.inc();
                tracing::warn!(?period, "the node lease renewal got no answer in time");
            }
        }
    }
}

/// Sweeps orphans once the instance store holds a complete listing, then every resync period
/// and whenever `sweep_now` is notified (an instance deleted, or a fresh listing); re-asserts
/// the Node record every resync period.
async fn housekeeping<H: Hypervisor + 'static>(
    ctx: Arc<Context<H>>,
    mut facts: NodeFacts,
    mut listed: watch::Receiver<bool>,
    sweep_now: Arc<Notify>,
) {
    if listed.wait_for(|listed| *listed).await.is_err() {
        tracing::error!("the instance watch ended before listing; no orphan sweeps");
        return;
    }
    tracing::debug!("the instance store is complete; sweeping orphans from now on");
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    // The first tick completes at once.
    let mut resync = tokio::time::interval(ctx.settings.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When an orphan's guest still shutting down is to be looked at again.
    let mut look_again: Option<tokio::time::Instant> = None;
    loop {
        let due = async {
            match look_again {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            _ = resync.tick() => {
                let next = ctx.sweep_logged().await;
                facts.remeasure();
                if let Err(error) = node::ensure(&nodes, &facts).await {
                    tracing::warn!(%error, "could not re-assert the Node record");
                }
                next
            }
            () = sweep_now.notified() => ctx.sweep_logged().await,
            () = due => ctx.sweep_logged().await,
        };
        look_again = next.map(|d| tokio::time::Instant::now() + d);
    }
}

/// Registers the Node and decides the domain type (the Node's hint, else `/dev/kvm` with a
/// QEMU URI, else TCG), retrying until the gateway answers. Returns the facts reported (`base`
/// with its `hypervisor` decided) and the domain type.
pub async fn register(
    client: &Client,
    base: &NodeFacts,
    uri: &str,
    kvm_usable: bool,
) -> (NodeFacts, DomainType) {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut backoff = Duration::from_millis(500);
    loop {
        let attempt = async {
            let node = node::get_or_create(&nodes, &base.name, &base.zone).await?;
            let hint = node::domain_type_hint(&node);
            let domain_type = crate::host::choose_domain_type(hint, uri, kvm_usable);
            let facts = NodeFacts {
                hypervisor: crate::host::hypervisor_name(uri, domain_type).to_owned(),
                ..base.clone()
            };
            node::write_status(&nodes, node, &facts).await?;
            Ok::<_, kube::Error>((facts, domain_type))
        };
        match attempt.await {
            Ok(done) => return done,
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "could not register the Node");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Runs the agent: spawns the lease heartbeat and the housekeeping (orphan sweeps, Node
/// re-assertion), which live as long as the runtime, and runs the instance controller until
/// its watch ends. Call [`register`] first.
pub async fn run<H: Hypervisor + 'static>(
    client: Client,
    hypervisor: Arc<H>,
    settings: Settings,
    facts: NodeFacts,
    metrics: Arc<Metrics>,
    guests: Option<Arc<Guests>>,
) {
    tokio::spawn(heartbeat(
        client.clone(),
        settings.node.clone(),
        settings.lease_duration,
        metrics.clone(),
    ));
    let types = spawn_store(Api::<InstanceType>::all(client.clone()));
    let selector = format!("{}={}", crds::NODE_NAME_FIELD, settings.node);
    let api = Api::<Instance>::all(client.clone());

    // The controller's own reflector, fed by one watch. Its listing completing and its
    // deletions are what the orphan sweep waits for; the controller's runner stays the only
    // waiter on the store's readiness (kube-runtime's `Store::wait_until_ready` wakes only the
    // last of several concurrent waiters).
    let (instances, writer) = reflector::store();
    let (listed_tx, listed) = watch::channel(false);
    let sweep_now = Arc::new(Notify::new());
    let signal = sweep_now.clone();
    let stream = watcher(api, watcher::Config::default().fields(&selector))
        .default_backoff()
        .reflect(writer)
        .inspect_ok(move |event| match event {
            watcher::Event::InitDone => {
                listed_tx.send_replace(true);
                // A relist drops records deleted meanwhile without a Delete event.
                signal.notify_one();
            }
            watcher::Event::Delete(_) => signal.notify_one(),
            watcher::Event::Apply(_) | watcher::Event::Init | watcher::Event::InitApply(_) => {}
        })
        .applied_objects();
    let controller = Controller::for_stream(stream, instances.clone());
    let ctx = Arc::new(Context {
        client,
        hypervisor,
        settings,
        instances,
        types: types.clone(),
        shutdowns: Mutex::new(HashMap::new()),
        buttons: Mutex::new(HashMap::new()),
        locks: DomainLocks::default(),
        metrics,
        guests,
        consoles: Mutex::new(HashMap::new()),
        rebooted: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
    });
    tokio::spawn(housekeeping(ctx.clone(), facts, listed, sweep_now));
    if ctx.guests.is_some() {
        let consoles = ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CONSOLE_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                consoles.report_consoles().await;
            }
        });
    }
    if types.wait_until_ready().await.is_err() {
        tracing::error!("the instance type store was dropped");
        return;
    }
    tracing::info!(node = %ctx.settings.node, "watching the instances bound to the node");
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            if let Err(error) = result {
                tracing::debug!(%error, "controller");
            }
            futures::future::ready(())
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crds::{InstanceSpec, InstanceStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const UID: &str = "6f1f8d2e-1c1a-4d1e-9a55-2c7c1b7a0b11";
    const TIMEOUT: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn a_lease_renewal_the_gateway_never_answers_is_given_up_and_tried_again() {
        use axum::http::StatusCode;
        use axum::routing::{get, post};
        use std::sync::atomic::{AtomicUsize, Ordering};

        // The first read of the lease never gets an answer; later ones find none, and the
        // lease is created.
        let reads = Arc::new(AtomicUsize::new(0));
        let (created, mut create_seen) = tokio::sync::mpsc::channel::<()>(4);
        let path = format!("/apis/karri.dev/v1alpha1/namespaces/{NODE_LEASE_NAMESPACE}/leases");
        let app = axum::Router::new()
            .route(
                &format!("{path}/n1"),
                get(move || {
                    let first = reads.fetch_add(1, Ordering::SeqCst) == 0;
                    async move {
                        if first {
                            std::future::pending::<()>().await;
                        }
                        let status = serde_json::json!({
                            "kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "reason": "NotFound", "code": 404, "message": "not found"
                        });
                        (StatusCode::NOT_FOUND, axum::Json(status))
                    }
                }),
            )
            .route(
                &path,
                post(
                    move |axum::Json(mut lease): axum::Json<serde_json::Value>| async move {
                        // The renewal after the hung one reached the gateway.
                        let _ = created.send(()).await;
                        lease["metadata"]["resourceVersion"] = serde_json::json!("1");
                        (StatusCode::CREATED, axum::Json(lease))
                    },
                ),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("loopback has a free port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = Client::try_from(kube::Config::new(
            format!("http://{addr}").parse().expect("a URL"),
        ))
        .expect("a client");
        let metrics = Arc::new(Metrics::new());
        let beat = tokio::spawn(heartbeat(
            client,
            "n1".into(),
            Duration::from_millis(400),
            metrics.clone(),
        ));
        // The hung renewal is given up after 100 ms (and counted), the next one creates the
        // lease; bounded, should it never come.
        let renewed = tokio::time::timeout(Duration::from_secs(10), create_seen.recv()).await;
        beat.abort();
        assert!(
            matches!(renewed, Ok(Some(()))),
            "the lease was never renewed after a hung renewal"
        );
        assert!(
            metrics.lease_failures.get() >= 1,
            "the hung renewal was not counted"
        );
    }

    /// Defines and starts a domain of Karri's for each of `ids` on `hv`; returns their names.
    async fn running_domains(hv: &crate::hypervisor::FakeHypervisor, ids: &[&str]) -> Vec<String> {
        let mut names = Vec::new();
        for (n, id) in ids.iter().enumerate() {
            let xml = domain::render(&DomainSpec {
                name: domain_name(id),
                uid: format!("00000000-0000-4000-8000-00000000000{n}"),
                instance_id: (*id).into(),
                namespace: "ns".into(),
                node: "n1".into(),
                instance_type: "m1.small".into(),
                vcpus: 1,
                memory_mib: 64,
                domain_type: DomainType::Qemu,
                disk: None,
                kernel: None,
                nic: None,
                console_log: None,
            })
            .expect("renders");
            hv.define(&xml).await.expect("defined");
            hv.start(&domain_name(id)).await.expect("started");
            names.push(domain_name(id));
        }
        names
    }

    /// An agent context on node `n1` of `hv` with no instance records at all, so that every
    /// domain is an orphan; `terminate_timeout` for their leave.
    fn orphan_context(
        hv: Arc<crate::hypervisor::FakeHypervisor>,
        terminate_timeout: Duration,
    ) -> Context<crate::hypervisor::FakeHypervisor> {
        let client = Client::try_from(kube::Config::new(
            "http://127.0.0.1:9".parse().expect("a URL"),
        ))
        .expect("a client");
        let (instances, _writer) = reflector::store::<Instance>();
        let (types, _types_writer) = reflector::store::<InstanceType>();
        Context {
            client,
            hypervisor: hv,
            settings: Settings {
                node: "n1".into(),
                lease_duration: Duration::from_secs(40),
                shutdown_timeout: TIMEOUT,
                terminate_timeout,
                resync: Duration::from_secs(30),
                domain_type: DomainType::Qemu,
            },
            instances,
            types,
            shutdowns: Mutex::new(HashMap::new()),
            buttons: Mutex::new(HashMap::new()),
            locks: DomainLocks::default(),
            metrics: Arc::new(Metrics::new()),
            guests: None,
            consoles: Mutex::new(HashMap::new()),
            rebooted: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// A sweep that must succeed: (removed, look again).
    async fn swept(ctx: &Context<crate::hypervisor::FakeHypervisor>) -> (usize, Option<Duration>) {
        let (swept, result) = ctx.sweep().await;
        result.expect("swept");
        (swept.removed, swept.look_again)
    }

    #[tokio::test]
    async fn an_orphan_that_cannot_be_destroyed_does_not_keep_the_others() {
        use crate::hypervisor::FakeHypervisor;
        let hv = Arc::new(FakeHypervisor::new("n1"));
        let names = running_domains(&hv, &["i-1", "i-2", "i-3"]).await;
        // The first in the sweep's order is stuck; no time for a shutdown: forced off at once.
        hv.set_stuck(&names[0], true);
        let ctx = orphan_context(hv.clone(), Duration::ZERO);
        assert!(ctx.sweep().await.1.is_err(), "the stuck orphan is reported");
        assert!(hv.peek(&names[0]).is_some(), "the stuck orphan stays");
        for name in &names[1..] {
            assert!(hv.peek(name).is_none(), "{name} was kept by the stuck one");
        }
        hv.set_stuck(&names[0], false);
        assert_eq!(swept(&ctx).await, (1, None));
        assert!(hv.peek(&names[0]).is_none());
    }

    #[tokio::test]
    async fn an_orphan_that_cannot_be_removed_does_not_delay_the_leave_of_the_others() {
        use crate::hypervisor::FakeHypervisor;
        let hv = Arc::new(FakeHypervisor::new("n1"));
        let names = running_domains(&hv, &["i-1", "i-2"]).await;
        // The first is paused (forced off at once) and cannot be; the second's guest takes its
        // time.
        hv.set_state(&names[0], DomainState::Paused);
        hv.set_stuck(&names[0], true);
        hv.set_guests_ignore_shutdown(true);
        let ctx = orphan_context(hv.clone(), TIMEOUT);
        let (swept, result) = ctx.sweep().await;
        assert!(result.is_err(), "the stuck orphan is reported");
        assert_eq!(
            swept.look_again,
            Some(SHUTDOWN_POLL),
            "the sweep still comes back to the guest shutting down"
        );
        assert!(hv.peek(&names[1]).is_some());
    }

    #[tokio::test]
    async fn an_orphan_guest_is_asked_to_shut_down_before_its_domain_is_removed() {
        use crate::hypervisor::FakeHypervisor;
        let hv = Arc::new(FakeHypervisor::new("n1"));
        let names = running_domains(&hv, &["i-1"]).await;
        hv.take_calls();
        let ctx = orphan_context(hv.clone(), TIMEOUT);
        // The guest obeys the power button: its domain is then removed, never forced off.
        assert_eq!(swept(&ctx).await, (1, None));
        assert_eq!(
            hv.take_calls(),
            [
                (Action::Shutdown, names[0].clone()),
                (Action::Undefine, names[0].clone())
            ]
        );
        assert!(hv.peek(&names[0]).is_none());
    }

    #[tokio::test]
    async fn an_orphan_guest_that_ignores_the_power_button_is_forced_off_after_the_timeout() {
        use crate::hypervisor::FakeHypervisor;
        let hv = Arc::new(FakeHypervisor::new("n1"));
        let names = running_domains(&hv, &["i-1"]).await;
        hv.set_guests_ignore_shutdown(true);
        hv.take_calls();
        let ctx = orphan_context(hv.clone(), TIMEOUT);
        let (removed, look_again) = swept(&ctx).await;
        assert_eq!(removed, 0, "the guest has time to shut down");
        assert_eq!(
            look_again,
            Some(SHUTDOWN_POLL),
            "the sweep comes back to it"
        );
        assert_eq!(hv.take_calls(), [(Action::Shutdown, names[0].clone())]);
        // Within the timeout, a sweep only waits.
        let (removed, _) = swept(&ctx).await;
        assert_eq!(removed, 0);
        assert!(hv.take_calls().is_empty(), "the button is pressed once");
        // Once the guest had its time (its clock set back rather than waited for), it is
        // forced off and removed.
        ctx.shutdowns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values_mut()
            .for_each(|at| *at -= TIMEOUT);
        assert_eq!(swept(&ctx).await, (1, None));
        assert_eq!(
            hv.take_calls(),
            [
                (Action::Destroy, names[0].clone()),
                (Action::Undefine, names[0].clone())
            ]
        );
        assert!(hv.peek(&names[0]).is_none());
        assert!(ctx
            .shutdowns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty());
    }

    #[test]
    fn a_console_that_fills_its_window_is_reported_every_ten_seconds_at_most() {
        let t0 = Instant::now();
        let (full, short) = (true, false);
        let rows = [
            ("never reported", None, 2, short, true),
            ("unchanged", Some((2, t0)), 2, short, false),
            ("changed, short", Some((1, t0)), 2, short, true),
            ("changed, full, 1 s later", Some((1, t0)), 2, full, false),
            (
                "changed, full, 9 s later",
                Some((1, t0 - Duration::from_secs(9))),
                2,
                full,
                false,
            ),
            (
                "changed, full, 10 s later",
                Some((1, t0 - Duration::from_secs(10))),
                2,
                full,
                true,
            ),
        ];
        for (what, last, digest, full, want) in rows {
            assert_eq!(console_due(last, digest, full, t0), want, "{what}");
        }
    }

    #[test]
    fn a_record_that_keeps_failing_is_tried_less_and_less_often() {
        let libvirt = Error::Hypervisor(HypervisorError::NotFound {
            name: "karri-i-1".into(),
        });
        let rows = [(1, 2), (3, 2), (4, 4), (5, 8), (7, 32), (8, 60), (40, 60)];
        for (failures, secs) in rows {
            assert_eq!(
                retry_backoff(&libvirt, failures),
                Duration::from_secs(secs),
                "after {failures} failures"
            );
        }
        // A lost race is tried again at once, however many came before.
        assert_eq!(
            retry_backoff(&Error::Superseded, 30),
            Duration::from_millis(50)
        );
        assert!(reported_as_retrying(&libvirt));
        assert!(!reported_as_retrying(&Error::Superseded));
        assert!(reported_as_retrying(&Error::UnknownInstanceType(
            "m1.tiny".into()
        )));
    }

    #[test]
    fn a_plan_is_superseded_by_a_new_generation_or_a_deletion_only() {
        let record = |generation: i64, deleted: bool| {
            let mut i = Instance::new(
                "web",
                serde_json::from_value(serde_json::json!({
                    "imageId": "emi-0123456789abcdef0", "instanceType": "t1.micro"
                }))
                .expect("a spec"),
            );
            i.metadata.generation = Some(generation);
            if deleted {
                i.metadata.deletion_timestamp = Some(
                    serde_json::from_value(serde_json::json!("2026-11-26T10:00:00Z"))
                        .expect("a time"),
                );
            }
            i
        };
        let rows = [
            ("the same record", record(1, false), record(1, false), false),
            (
                "a status write only",
                record(1, false),
                record(1, false),
                false,
            ),
            (
                "stopped or terminated",
                record(1, false),
                record(2, false),
                true,
            ),
            ("deleted", record(1, false), record(1, true), true),
            (
                "deleted already when it began",
                record(1, true),
                record(1, true),
                false,
            ),
        ];
        for (what, began, latest, want) in rows {
            assert_eq!(superseded(&began, &latest), want, "{what}");
        }
    }

    #[test]
    fn console_output_is_reported_only_when_it_differs_from_the_record() {
        for (reported, text, news) in [
            (None, "", false),
            (None, "karri-micro: booting", true),
            (Some(""), "", false),
            (Some("boot"), "boot", false),
            (Some("boot"), "boot\nready", true),
            (Some("boot"), "", true),
        ] {
            assert_eq!(
                console_is_news(reported, text),
                news,
                "{reported:?} -> {text:?}"
            );
        }
    }

    fn instance(desired: DesiredState, node: Option<&str>) -> Instance {
        let mut i = Instance::new(
            "web-1",
            InstanceSpec {
                image_id: "emi-0123456789abcdef0".into(),
                instance_type: "m1.small".into(),
                key_name: None,
                security_group_ids: Vec::new(),
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
        i.metadata.uid = Some(UID.into());
        i.status = Some(InstanceStatus {
            node_name: node.map(str::to_owned),
            ..Default::default()
        });
        i
    }

    /// The defined domain `karri-i-1` of record `uid`.
    fn observed_domain(uid: &str, state: DomainState, shut_down: bool) -> ObservedDomain {
        ObservedDomain {
            name: "karri-i-1".into(),
            uid: uid.into(),
            instance_id: "i-1".into(),
            namespace: "ns".into(),
            state,
            id: None,
            defined: true,
            shut_down,
        }
    }

    #[test]
    fn record_desires_a_domain_in_its_power_state() {
        let running = desire(&instance(DesiredState::Running, None), UID, TIMEOUT);
        assert_eq!(running.map(|d| d.power), Some(Power::Running));
        let stopped = desire(&instance(DesiredState::Stopped, None), UID, TIMEOUT);
        assert_eq!(stopped.as_ref().map(|d| d.power), Some(Power::Stopped));
        assert_eq!(
            stopped.map(|d| (d.uid, d.shutdown_timeout)),
            Some((UID.into(), TIMEOUT))
        );
    }

    #[test]
    fn a_guest_that_powered_itself_off_is_told_from_a_stop_a_start_and_a_crash() {
        let running_report = |generation: i64| {
            Condition::new(
                report::CONDITION_DOMAIN_RUNNING,
                ConditionStatus::True,
                report::REASON_RUNNING,
                String::new(),
                now(),
            )
            .with_observed_generation(Some(generation))
        };
        let record = |desired: DesiredState, reported_at: Option<i64>| {
            let mut i = instance(desired, Some("n1"));
            i.metadata.generation = Some(4);
            if let (Some(s), Some(g)) = (i.status.as_mut(), reported_at) {
                s.conditions = vec![running_report(g)];
            }
            i
        };
        let domain = observed_domain;
        let off = domain(UID, DomainState::ShutOff, true);
        let rows = [
            (
                "powered off while it ran",
                record(DesiredState::Running, Some(4)),
                Some(off.clone()),
                true,
            ),
            (
                "obeying the power button the agent pressed for a stop since undone",
                record(DesiredState::Running, Some(4)),
                Some(off.clone()),
                false,
            ),
            (
                "started since (newer generation)",
                record(DesiredState::Running, Some(3)),
                Some(off.clone()),
                false,
            ),
            (
                "never reported running",
                record(DesiredState::Running, None),
                Some(off.clone()),
                false,
            ),
            (
                "asked to stop",
                record(DesiredState::Stopped, Some(4)),
                Some(off.clone()),
                false,
            ),
            (
                "destroyed, not shut down",
                record(DesiredState::Running, Some(4)),
                Some(domain(UID, DomainState::ShutOff, false)),
                false,
            ),
            (
                "crashed",
                record(DesiredState::Running, Some(4)),
                Some(domain(UID, DomainState::Crashed, false)),
                false,
            ),
            (
                "still running",
                record(DesiredState::Running, Some(4)),
                Some(domain(UID, DomainState::Running, false)),
                false,
            ),
            (
                "another record's domain",
                record(DesiredState::Running, Some(4)),
                Some(domain("other", DomainState::ShutOff, true)),
                false,
            ),
            (
                "no domain",
                record(DesiredState::Running, Some(4)),
                None,
                false,
            ),
        ];
        for (what, instance, observed, want) in rows {
            let pressed = what.contains("power button");
            assert_eq!(
                powered_off_by_guest(&instance, observed.as_ref(), UID, pressed),
                want,
                "{what}"
            );
        }
    }

    #[test]
    fn a_forced_stop_waits_for_no_guest_shutdown() {
        let mut forced = instance(DesiredState::Stopped, None);
        forced.metadata.annotations = Some(
            [(
                crds::FORCE_STOP_ANNOTATION.to_owned(),
                "2026-11-26T05:00:00Z".to_owned(),
            )]
            .into(),
        );
        let desired = desire(&forced, UID, TIMEOUT).expect("a domain");
        assert_eq!(
            (desired.power, desired.shutdown_timeout),
            (Power::Stopped, Duration::ZERO)
        );
        // Asked to run again, the annotation left over changes nothing.
        forced.spec.desired_state = DesiredState::Running;
        let desired = desire(&forced, UID, TIMEOUT).expect("a domain");
        assert_eq!(desired.shutdown_timeout, TIMEOUT);
        let plain = desire(&instance(DesiredState::Stopped, None), UID, TIMEOUT).expect("a domain");
        assert_eq!(plain.shutdown_timeout, TIMEOUT);
    }

    #[test]
    fn terminated_or_deleted_record_desires_nothing() {
        assert_eq!(
            desire(&instance(DesiredState::Terminated, None), UID, TIMEOUT),
            None
        );
        let mut deleting = instance(DesiredState::Running, None);
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        assert_eq!(desire(&deleting, UID, TIMEOUT), None);
    }

    #[test]
    fn a_terminated_record_asks_its_running_guest_to_shut_down_before_the_domain_goes() {
        let terminated = instance(DesiredState::Terminated, None);
        let leave = farewell(&terminated, UID, TIMEOUT);
        assert_eq!(
            (leave.power, leave.shutdown_timeout, leave.reboot),
            (Power::Stopped, TIMEOUT, false)
        );
        let running = observed_domain(UID, DomainState::Running, false);
        let off = observed_domain(UID, DomainState::ShutOff, false);
        let others = observed_domain("other", DomainState::Running, false);
        let transient = ObservedDomain {
            defined: false,
            ..running.clone()
        };
        assert_eq!(wanted(None, Some(&leave), Some(&transient), UID), None);
        // Its own active domain is shut down first; once off, or another record's, or a
        // transient one, it goes.
        assert_eq!(
            wanted(None, Some(&leave), Some(&running), UID),
            Some(&leave)
        );
        assert_eq!(wanted(None, Some(&leave), Some(&off), UID), None);
        assert_eq!(wanted(None, Some(&leave), Some(&others), UID), None);
        assert_eq!(wanted(None, Some(&leave), None, UID), None);
        assert_eq!(
            plan(
                wanted(None, Some(&leave), Some(&running), UID),
                Some(&running.observed(None))
            ),
            [Action::Shutdown]
        );
        assert_eq!(
            plan(
                wanted(None, Some(&leave), Some(&running), UID),
                Some(&running.observed(Some(TIMEOUT)))
            ),
            [Action::Destroy]
        );
        // A record that still wants its domain is planned for as before.
        let stay = desire(&instance(DesiredState::Running, None), UID, TIMEOUT).expect("a domain");
        assert_eq!(wanted(Some(&stay), None, Some(&running), UID), Some(&stay));
    }

    #[test]
    fn a_failed_launch_is_forced_off_at_once() {
        let mut failed = instance(DesiredState::Running, None);
        failed.status = Some(crds::InstanceStatus {
            state: InstanceState::Terminated,
            ..Default::default()
        });
        assert_eq!(
            farewell(&failed, UID, TIMEOUT).shutdown_timeout,
            Duration::ZERO
        );
    }

    #[test]
    fn a_going_record_is_held_on_its_node_until_its_domain_is_reported_undefined() {
        let live = instance(DesiredState::Running, Some("n1"));
        assert!(is_held_on(&live, "n1"));
        assert!(!is_held_on(&live, "n2"));
        let mut going = instance(DesiredState::Terminated, Some("n1"));
        going.metadata.generation = Some(3);
        assert!(is_held_on(&going, "n1"), "its guest is still shutting down");
        let undefined = Condition::new(
            report::CONDITION_DOMAIN_RUNNING,
            ConditionStatus::False,
            report::REASON_UNDEFINED,
            "no domain is defined",
            now(),
        );
        if let Some(s) = going.status.as_mut() {
            s.conditions = vec![undefined.clone().with_observed_generation(Some(2))];
        }
        assert!(is_held_on(&going, "n1"), "reported for an older generation");
        if let Some(s) = going.status.as_mut() {
            s.conditions = vec![undefined.with_observed_generation(Some(3))];
        }
        assert!(!is_held_on(&going, "n1"), "released");
    }

    #[test]
    fn only_bound_running_or_stopped_records_are_live() {
        assert!(is_live_on(
            &instance(DesiredState::Running, Some("n1")),
            "n1"
        ));
        assert!(is_live_on(
            &instance(DesiredState::Stopped, Some("n1")),
            "n1"
        ));
        assert!(!is_live_on(
            &instance(DesiredState::Running, Some("n2")),
            "n1"
        ));
        assert!(!is_live_on(&instance(DesiredState::Running, None), "n1"));
        assert!(!is_live_on(
            &instance(DesiredState::Terminated, Some("n1")),
            "n1"
        ));
        let mut deleting = instance(DesiredState::Running, Some("n1"));
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        assert!(!is_live_on(&deleting, "n1"));
    }

    /// `instance(desired, Some("n1"))` with its own UID at `ip`.
    fn at(desired: DesiredState, uid: &str, ip: &str) -> Instance {
        let mut i = instance(desired, Some("n1"));
        i.metadata.uid = Some(uid.into());
        if let Some(s) = i.status.as_mut() {
            s.private_ip_address = Some(ip.into());
        }
        i
    }

    #[test]
    fn an_address_is_held_by_another_only_while_a_live_instance_on_the_node_has_it() {
        let ip: Ipv4Addr = "172.31.0.5".parse().expect("an address");
        let terminated = at(DesiredState::Terminated, UID, "172.31.0.5");
        let rows: [(&str, Vec<Instance>, bool); 5] = [
            ("alone", vec![terminated.clone()], false),
            (
                "a running instance took it",
                vec![
                    terminated.clone(),
                    at(DesiredState::Running, "uid-b", "172.31.0.5"),
                ],
                true,
            ),
            (
                "a stopped instance keeps it",
                vec![at(DesiredState::Stopped, "uid-b", "172.31.0.5")],
                true,
            ),
            (
                "another address",
                vec![at(DesiredState::Running, "uid-b", "172.31.0.6")],
                false,
            ),
            (
                "a terminated one had it too",
                vec![at(DesiredState::Terminated, "uid-b", "172.31.0.5")],
                false,
            ),
        ];
        for (what, instances, want) in rows {
            assert_eq!(held_by_another(&instances, "n1", UID, ip), want, "{what}");
        }
    }

    #[test]
    fn a_record_is_released_once_its_undefined_domain_is_reported_for_its_generation() {
        let mut terminated = instance(DesiredState::Terminated, Some("n1"));
        terminated.metadata.generation = Some(3);
        assert!(!released(&terminated), "nothing reported yet");
        let report = |reason: &str, generation: i64| {
            Condition::new(
                report::CONDITION_DOMAIN_RUNNING,
                ConditionStatus::False,
                reason,
                String::new(),
                now(),
            )
            .with_observed_generation(Some(generation))
        };
        let rows = [
            (report::REASON_UNDEFINED, 3, true),
            (report::REASON_UNDEFINED, 2, false),
            ("ShutOff", 3, false),
        ];
        for (reason, generation, want) in rows {
            let mut i = terminated.clone();
            if let Some(s) = i.status.as_mut() {
                s.conditions = vec![report(reason, generation)];
            }
            assert_eq!(released(&i), want, "{reason} at generation {generation}");
        }
    }

    #[test]
    fn conflicts_back_off_briefly_and_foreign_domains_slowly() {
        let conflict = Error::Api(kube::Error::Api(
            kube::core::Status::failure("conflict", "Conflict")
                .with_code(409)
                .boxed(),
        ));
        assert_eq!(conflict.metric_label(), "conflict");
        assert_eq!(conflict.backoff(), Duration::from_millis(50));
        let foreign = Error::Hypervisor(HypervisorError::NotOurs {
            name: "karri-i-1".into(),
        });
        assert_eq!(foreign.metric_label(), "not_ours");
        assert_eq!(foreign.backoff(), Duration::from_secs(30));
        assert_eq!(Error::Incomplete("UID").metric_label(), "incomplete");
    }

    #[tokio::test]
    async fn domain_locks_serialise_one_name_only() {
        let locks = DomainLocks::default();
        let a = locks.lock("a").await;
        // Another name is free while "a" is held.
        let b = tokio::time::timeout(Duration::from_secs(1), locks.lock("b")).await;
        assert!(b.is_ok());
        // "a" is not.
        let again = tokio::time::timeout(Duration::from_millis(50), locks.lock("a")).await;
        assert!(again.is_err());
        drop(a);
        let again = tokio::time::timeout(Duration::from_secs(1), locks.lock("a")).await;
        assert!(again.is_ok());
    }
}
