//! The controllers: kube-rs `Controller`s that read records through the gateway's resource API,
//! call the pure decisions ([`crate::placement`], [`crate::lifecycle`], [`crate::health`]) and
//! write what they answer. `error_policy` is the only place backoff is decided.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crds::common::{find_condition, set_condition};
use crds::{
    AvailabilityZone, ConditionStatus, Instance, InstanceState, InstanceType, InstanceTypeSpec,
    LaunchSpec, Lease, Node, PlacementPolicy, CONDITION_READY, NODE_LEASE_NAMESPACE,
};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};

use crate::health::{self, instance_health, node_ready, Readiness};
use crate::launch::{self, LaunchError};
use crate::lifecycle::{self, effective_desired, needs_placement, Observed, Placed};
use crate::metrics::{ErrorLabels, Metrics};
use crate::placement::{self, place, NodeView, PlacementRequest, Policy, Resources, Unplaceable};

/// The finalizer the operator keeps on every instance until its domain is gone.
pub use crds::INSTANCE_FINALIZER as FINALIZER;

/// Why a reconcile did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API answered with an error (a 409 Conflict after a concurrent write among them).
    #[error("the API refused: {0}")]
    Api(#[from] kube::Error),
    /// The finalizer helper failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// A record lacks a field every stored record has.
    #[error("the record has no {0}")]
    Incomplete(&'static str),
    /// A terminating instance still has a domain on its node: look again soon.
    #[error("waiting for the node agent to remove the domain")]
    DomainStillDefined,
}

impl Error {
    /// A short label for the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Api(kube::Error::Api(s)) if s.code == 409 => "conflict",
            Error::Api(_) => "api",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
            Error::Incomplete(_) => "incomplete",
            Error::DomainStillDefined => "waiting",
        }
    }

    /// Whether the reconcile waits for a node agent to remove the instance's domain, however the
    /// finalizer helper wrapped the error.
    fn waits_for_the_domain(&self) -> bool {
        self.metric_label() == "waiting"
    }

    fn backoff(&self) -> Duration {
        match self.metric_label() {
            "conflict" => Duration::from_millis(50),
            // The agent's report that the domain is gone reconciles the instance through the
            // watch; this look is a safety net only (a mass delete must not spin the operator).
            "waiting" => WAITING_ON_A_READY_NODE,
            _ => Duration::from_secs(2),
        }
    }
}

/// A binding written but not yet seen back through the watch: its capacity is reserved.
#[derive(Clone, Debug)]
struct Assumed {
    node: String,
    resources: Resources,
    since: Instant,
    /// A write of the binding succeeded: a later attempt that fails (a reconcile of an older
    /// copy of the record, refused with a 409) must not drop it.
    written: bool,
}

/// How long a reservation outlives its record's absence from the store: the record of an
/// instance placed a moment ago may not be in the snapshot another placement took before it,
/// so only a record gone for this long is taken as deleted.
const ASSUMED_UNSEEN_TTL: Duration = Duration::from_secs(30);

/// Whether a reservation still counts, given what the store says of its record: bound (the
/// watch has delivered the binding, so the record's usage counts it instead), unbound, or
/// absent (not yet in the snapshot, or deleted), and how old the reservation is.
fn still_assumed(seen_bound: Option<bool>, age: Duration) -> bool {
    match seen_bound {
        Some(bound) => !bound,
        None => age < ASSUMED_UNSEEN_TTL,
    }
}

#[derive(Default)]
struct PlacementState {
    cursors: HashMap<String, usize>,
    assumed: HashMap<String, Assumed>,
    /// Private addresses given but not yet seen back through the watch, by record UID, with
    /// when they were given and whether their write succeeded (they last as
    /// [`still_assumed`] says, as placements do).
    addresses: HashMap<String, Reserved>,
}

/// A private address given to an instance.
#[derive(Clone, Copy, Debug)]
struct Reserved {
    address: Ipv4Addr,
    since: Instant,
    written: bool,
}

/// What [`Context::prepare_launch`] gives a placed instance.
struct Prepared {
    launch: LaunchSpec,
    address: Ipv4Addr,
    region: String,
}

/// A record's resourceVersion as the etcd revision it is (0 when it is not a number).
fn revision<K: kube::Resource>(obj: &K) -> u64 {
    obj.meta()
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What the instance controller shares between reconciles.
pub struct Context {
    client: Client,
    instances: Store<Instance>,
    nodes: Store<Node>,
    /// Each node as the controller's own watch of nodes last delivered it (see
    /// [`Context::node`]).
    seen_nodes: Arc<Mutex<HashMap<String, Arc<Node>>>>,
    types: Store<InstanceType>,
    zones: Store<AvailabilityZone>,
    /// Images, accounts and key pairs that launches are resolved from.
    lookups: launch::Lookups,
    policy: Policy,
    retention: Duration,
    /// Lease duration assumed for node leases that do not say.
    node_lease_duration: Duration,
    /// The leases of nodes whose record is gone, timed by this replica's clock, with their
    /// durations ([`Context::agent_alive`]).
    gone_node_leases: Mutex<HashMap<String, (health::LeaseSighting, Duration)>>,
    state: Mutex<PlacementState>,
    metrics: Arc<Metrics>,
}

/// Settings of the controllers.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Placement policy of zones that name none.
    pub policy: Policy,
    /// How long terminated instances stay visible.
    pub retention: Duration,
    /// Lease duration assumed for node leases that do not say.
    pub node_lease_duration: Duration,
}

/// The operator's policy for a zone's `spec.placementPolicy`.
pub fn policy_of(p: PlacementPolicy) -> Policy {
    match p {
        PlacementPolicy::RoundRobin => Policy::RoundRobin,
        PlacementPolicy::Greedy => Policy::Greedy,
        PlacementPolicy::Pack => Policy::Pack,
        PlacementPolicy::Spread => Policy::Spread,
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn readiness_of(node: Option<&Node>) -> Readiness {
    let Some(node) = node else {
        return Readiness::NotReady {
            reason: health::REASON_NODE_NOT_READY,
            message: "the node record is gone".into(),
        };
    };
    let ready = node
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, CONDITION_READY));
    match ready {
        Some(c) if c.status == ConditionStatus::True => Readiness::Ready,
        Some(c) => Readiness::NotReady {
            reason: health::REASON_NODE_NOT_READY,
            message: c.message.clone(),
        },
        None => Readiness::NotReady {
            reason: health::REASON_NODE_NOT_READY,
            message: "the node has not reported yet".into(),
        },
    }
}

impl Context {
    /// The node as the newest of two watches saw it: the store's, or the one whose change
    /// triggered this reconcile. The store is fed by its own watch, which may not have applied a
    /// change yet when the controller's watch of nodes reconciles the node's instances for it;
    /// read from the store alone, such a reconcile saw the node as it was (an instance stayed
    /// healthy on a node gone NotReady until something else changed). Karri's resourceVersions
    /// are etcd revisions, so the newer copy is the one with the larger number.
    fn node(&self, name: &str) -> Option<Arc<Node>> {
        let stored = self.nodes.get(&ObjectRef::new(name))?;
        let seen = self
            .seen_nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned();
        Some(match seen {
            Some(seen) if revision(&*seen) > revision(&*stored) => seen,
            _ => stored,
        })
    }

    /// Choose a node for `instance`, reserving its capacity until the binding is seen.
    fn place(&self, instance: &Instance) -> Result<Placed, Unplaceable> {
        let types: BTreeMap<String, InstanceTypeSpec> = self
            .types
            .state()
            .iter()
            .map(|t| (t.name_any(), t.spec.clone()))
            .collect();
        let request = PlacementRequest::for_instance(&instance.spec, &types)?;
        // The store is read under the lock: a snapshot taken before another placement pruned
        // a reservation it had seen bound would count that instance nowhere.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Shared, not copied: a record may carry up to 64 KiB of console output.
        let all = self.instances.state();
        let used = placement::usage(all.iter().map(|i| &**i), &types);
        // Each node as the newest watch saw it: a node just gone NotReady gets nothing.
        let mut views: Vec<NodeView> = self
            .nodes
            .state()
            .iter()
            .filter_map(|n| {
                let fresh = self.node(&n.name_any()).unwrap_or_else(|| Arc::clone(n));
                NodeView::from_node(&fresh, &used)
            })
            .collect();
        // Reservations whose binding the watch has delivered are counted by `usage` already.
        let bound: HashMap<String, bool> = all
            .iter()
            .filter_map(|i| {
                let uid = i.uid()?;
                Some((
                    uid,
                    i.status.as_ref().is_some_and(|s| s.node_name.is_some()),
                ))
            })
            .collect();
        state
            .assumed
            .retain(|uid, a| still_assumed(bound.get(uid).copied(), a.since.elapsed()));
        // This instance was bound already by a write the store has not shown yet: this is an
        // older copy of it, and it stays where it was put.
        if let Some(a) = instance
            .uid()
            .and_then(|uid| state.assumed.get(&uid))
            .filter(|a| a.written)
        {
            let zone = views
                .iter()
                .find(|v| v.name == a.node)
                .map(|v| v.zone.clone())
                .unwrap_or_default();
            return Ok(Placed {
                node: a.node.clone(),
                zone,
            });
        }
        // A node whose zone has no AvailabilityZone record (an agent started with a zone not
        // created yet, or misspelt) gets nothing: the launch there would fail for want of the
        // zone's subnet, and a failed launch terminates the instance.
        views.retain(|v| self.zones.get(&ObjectRef::new(&v.zone)).is_some());
        // The others' reservations; this instance's own (an attempt whose write may not have
        // committed) is replaced by this placement, so it does not count against it.
        let own = instance.uid();
        for (_, a) in state
            .assumed
            .iter()
            .filter(|(uid, _)| Some(*uid) != own.as_ref())
        {
            if let Some(v) = views.iter_mut().find(|v| v.name == a.node) {
                v.assume(a.resources);
            }
        }
        let zone_key = request.zone.clone().unwrap_or_default();
        let policy = self
            .zones
            .get(&ObjectRef::new(&zone_key))
            .and_then(|z| z.spec.placement_policy)
            .map_or(self.policy, policy_of);
        let cursor = state.cursors.entry(zone_key).or_default();
        let node = place(&request, &views, policy, cursor)?;
        let zone = views
            .iter()
            .find(|v| v.name == node)
            .map(|v| v.zone.clone())
            .unwrap_or_default();
        if let Some(uid) = instance.uid() {
            state.assumed.insert(
                uid,
                Assumed {
                    node: node.clone(),
                    resources: request.resources,
                    since: Instant::now(),
                    written: false,
                },
            );
        }
        Ok(Placed { node, zone })
    }

    /// Drops the reservations an attempt made for `instance` that it did not write.
    fn forget(&self, instance: &Instance) {
        if let Some(uid) = instance.uid() {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if state.assumed.get(&uid).is_some_and(|a| !a.written) {
                state.assumed.remove(&uid);
            }
            if state.addresses.get(&uid).is_some_and(|r| !r.written) {
                state.addresses.remove(&uid);
            }
        }
    }

    /// After a successful write of `status` for `instance`: the reservations it carries are
    /// written (they last until the store shows them), the others dropped.
    fn written(&self, instance: &Instance, status: &crds::InstanceStatus) {
        let Some(uid) = instance.uid() else {
            return;
        };
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match state.assumed.get_mut(&uid) {
            Some(a) if status.node_name.as_deref() == Some(a.node.as_str()) => a.written = true,
            Some(_) => {
                state.assumed.remove(&uid);
            }
            None => {}
        }
        let address = status
            .private_ip_address
            .as_deref()
            .and_then(|a| a.parse::<Ipv4Addr>().ok());
        match state.addresses.get_mut(&uid) {
            Some(r) if address == Some(r.address) => r.written = true,
            Some(_) => {
                state.addresses.remove(&uid);
            }
            None => {}
        }
    }

    /// Whether the agent of `node` still renews its lease (read from the gateway, only for a
    /// node whose record is gone). The lease is timed by this replica's clock, and a lease seen
    /// for the first time counts as renewed now: the domains of a host are given up only once
    /// its lease has stood still for a whole duration here, whatever the agent's clock says.
    async fn agent_alive(&self, node: &str) -> Result<bool, Error> {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), NODE_LEASE_NAMESPACE);
        let lease = leases.get_opt(node).await?;
        let mut seen = self
            .gone_node_leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some((lease, version)) = lease.and_then(|l| {
            let version = l.metadata.resource_version.clone()?;
            Some((l, version))
        }) else {
            seen.remove(node);
            return Ok(false);
        };
        let now = now();
        let sighting = health::sighting(
            seen.get(node).map(|(s, _)| s),
            &version,
            None,
            &now,
            health::FirstSight::AsRenewedNow,
        );
        let duration = health::lease_duration(&lease, self.node_lease_duration);
        let renewed = lease.spec.renew_time.is_some().then_some(&sighting.since);
        let alive = node_ready(renewed, duration, &now).is_ready();
        seen.insert(node.to_owned(), (sighting, duration));
        Ok(alive)
    }

    /// How long until the lease of `node`, whose record is gone, runs out by this replica's
    /// clock (as [`Context::agent_alive`] last timed it); `None` when it has not timed it or the
    /// lease has run out.
    fn gone_node_lease_left(&self, node: &str) -> Option<Duration> {
        let seen = self
            .gone_node_leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (sighting, duration) = seen.get(node)?;
        health::expires_in(Some(&sighting.since), *duration, &now())
    }

    /// Resolves what the node boots for `instance` in `zone` and gives it a private address
    /// (its own when it has one), reserved until the watch shows it written.
    async fn prepare_launch(
        &self,
        instance: &Instance,
        zone: &str,
    ) -> Result<Prepared, LaunchError> {
        // A zone created a moment ago may not be in the store yet: ask the gateway before
        // refusing the launch for good.
        let record = match self.zones.get(&ObjectRef::new(zone)) {
            Some(z) => z,
            None => Api::<AvailabilityZone>::all(self.client.clone())
                .get_opt(zone)
                .await?
                .map(Arc::new)
                .ok_or_else(|| LaunchError::Refused(format!("the zone {zone} does not exist")))?,
        };
        let (_, subnet) = crds::subnet::zone_subnets([(zone, record.spec.subnet_cidr.as_deref())])
            .pop()
            .ok_or_else(|| LaunchError::Refused(format!("the zone {zone} has no subnet")))?;
        let region = record.spec.region.clone();
        let launch = launch::resolve(&self.lookups, instance, Some(subnet)).await?;
        let own = instance
            .status
            .as_ref()
            .and_then(|s| s.private_ip_address.as_deref())
            .and_then(|a| a.parse::<Ipv4Addr>().ok())
            .filter(|ip| subnet.is_assignable(*ip));
        if let Some(address) = own {
            return Ok(Prepared {
                launch,
                address,
                region,
            });
        }
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let all = self.instances.state();
        // Reservations the watch has delivered are counted from the records already; those of
        // records gone from the store for long were deleted before their address was written.
        let written: HashMap<String, bool> = all
            .iter()
            .filter_map(|i| {
                let has_address = i
                    .status
                    .as_ref()
                    .is_some_and(|s| s.private_ip_address.is_some());
                i.uid().map(|uid| (uid, has_address))
            })
            .collect();
        state
            .addresses
            .retain(|uid, r| still_assumed(written.get(uid).copied(), r.since.elapsed()));
        // An address already given to this instance (by an attempt on a newer copy of it, or
        // one whose write failed) is given again.
        if let Some(r) = instance.uid().and_then(|uid| state.addresses.get(&uid)) {
            if subnet.is_assignable(r.address) {
                return Ok(Prepared {
                    launch,
                    address: r.address,
                    region,
                });
            }
        }
        let reserved: HashSet<Ipv4Addr> = state.addresses.values().map(|r| r.address).collect();
        let address =
            launch::allocate_address(subnet, zone, all.iter().map(|i| &**i), &reserved)
                .ok_or_else(|| {
                    LaunchError::Refused(format!(
                        "InsufficientFreeAddressesInSubnet: the subnet {subnet} of zone {zone} has no free address"
                    ))
                })?;
        if let Some(uid) = instance.uid() {
            state.addresses.insert(
                uid,
                Reserved {
                    address,
                    since: Instant::now(),
                    written: false,
                },
            );
        }
        Ok(Prepared {
            launch,
            address,
            region,
        })
    }
}

/// One pass over an instance: place it if it needs a node, bring its EC2 state and health up
/// to date, collect it after retention. Returns whether the finalizer may go.
async fn sync_instance(
    instance: &Instance,
    ctx: &Context,
    api: &Api<Instance>,
) -> Result<(Action, bool), Error> {
    let name = instance
        .metadata
        .name
        .clone()
        .ok_or(Error::Incomplete("name"))?;
    let now = now();
    if let Some(status) = instance
        .status
        .as_ref()
        .filter(|_| lifecycle::guest_powered_off(instance))
    {
        // First the state EC2 shows, for the guest's own reason, then the request to stay
        // stopped. Each is written on the version read: a start asked since (a newer
        // generation) wins with a 409, and is reconciled afresh.
        let mut stopping = instance.clone();
        stopping.status = Some(lifecycle::guest_stopping(status, &now));
        let written = api
            .replace_status(&name, &PostParams::default(), &stopping)
            .await?;
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": written.resource_version()},
            "spec": {"desiredState": "stopped"},
        });
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!("the guest powered itself off: the instance is stopped");
        return Ok((Action::await_change(), false));
    }
    let placement = needs_placement(instance).then(|| ctx.place(instance));
    let mut prepared = None;
    let mut launch_failure = None;
    if let Some(zone) = launch_zone(instance, placement.as_ref()) {
        match ctx.prepare_launch(instance, &zone).await {
            Ok(p) => prepared = Some(p),
            Err(LaunchError::Refused(why)) => launch_failure = Some(why),
            Err(LaunchError::Api(e)) => {
                ctx.forget(instance);
                return Err(e.into());
            }
        }
    }
    let mut observed = Observed::of(instance, placement.as_ref());
    if let Some(node) = instance
        .status
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
    {
        let terminating = effective_desired(
            instance.spec.desired_state,
            instance.metadata.deletion_timestamp.is_some(),
        ) == crds::DesiredState::Terminated;
        // A deleted Node record whose agent still renews its lease is a host still there (an
        // administrator deleted the record; the agent writes it again): its domains run, and
        // their addresses and room are not free yet.
        let host_there = ctx.node(node).is_some() || (terminating && ctx.agent_alive(node).await?);
        observed.domain =
            lifecycle::domain_considering_node(observed.domain, terminating, host_there);
    }
    if launch_failure.is_some() {
        observed.launch_failure = launch_failure;
    }
    let next = lifecycle::next(&observed, &now, ctx.retention);
    let mut status = next.status;
    if let Some(p) = prepared.filter(|_| status.state != InstanceState::Terminated) {
        status.launch = Some(p.launch);
        status.private_ip_address = Some(p.address.to_string());
        status.mac_address = Some(crds::subnet::mac_for(p.address));
        status.private_dns_name = Some(crds::subnet::private_dns_name(p.address, &p.region));
    }
    if let Some(node) = status.node_name.clone() {
        let health = instance_health(&readiness_of(ctx.node(&node).as_deref()));
        set_condition(&mut status.conditions, health.condition(&now));
    }
    if Some(&status) != instance.status.as_ref() {
        let mut updated = instance.clone();
        updated.status = Some(status);
        // replace_status carries the resourceVersion we read: a concurrent write is a 409.
        if let Err(e) = api
            .replace_status(&name, &PostParams::default(), &updated)
            .await
        {
            // Only a refusal proves nothing was written. After an error whose outcome is
            // unknown (a lost connection, a timeout) the write may have committed: its
            // reservations stay until the store shows the record or a new placement of it
            // replaces them, so that no other instance takes that room or address meanwhile.
            if refused(&e) {
                ctx.forget(instance);
            }
            return Err(e.into());
        }
        if let Some(status) = &updated.status {
            ctx.written(instance, status);
        }
        if matches!(placement, Some(Ok(_))) {
            ctx.metrics.placements.inc();
        }
    } else if placement.is_some() {
        ctx.forget(instance);
    }
    Ok(match next.action {
        lifecycle::Action::Keep { recheck_in } => (
            recheck_in.map_or_else(Action::await_change, Action::requeue),
            false,
        ),
        lifecycle::Action::Collect => {
            // Only this record: one of the same name created since is not collected with it.
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: instance.uid(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            api.delete(&name, &params).await?;
            (Action::await_change(), false)
        }
        lifecycle::Action::Release => (Action::await_change(), true),
    })
}

/// The zone of an instance that needs its launch resolved: bound (or placed this round), not
/// terminated, asked to run, and without a launch yet.
fn launch_zone(
    instance: &Instance,
    placement: Option<&Result<Placed, placement::Unplaceable>>,
) -> Option<String> {
    let status = instance.status.as_ref();
    let deleting = instance.metadata.deletion_timestamp.is_some();
    if effective_desired(instance.spec.desired_state, deleting) != crds::DesiredState::Running
        || status.is_some_and(|s| s.launch.is_some() || s.state == InstanceState::Terminated)
    {
        return None;
    }
    match (status.and_then(|s| s.node_name.as_ref()), placement) {
        (Some(_), _) => status.and_then(|s| s.availability_zone.clone()),
        (None, Some(Ok(placed))) => Some(placed.zone.clone()),
        _ => None,
    }
}

async fn reconcile_instance(instance: Arc<Instance>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let ns = instance.namespace().ok_or(Error::Incomplete("namespace"))?;
    let api: Api<Instance> = Api::namespaced(ctx.client.clone(), &ns);
    let result = match finalizer(&api, FINALIZER, instance, |event| async {
        match event {
            Finalizer::Apply(i) => sync_instance(&i, &ctx, &api).await.map(|(a, _)| a),
            Finalizer::Cleanup(i) => match sync_instance(&i, &ctx, &api).await? {
                (action, true) => Ok(action),
                (_, false) => Err(Error::DomainStillDefined),
            },
        }
    })
    .await
    {
        // The record is gone: a reconcile of an older copy, after another removed the
        // finalizer (the record then went), or a record deleted before its finalizer was ever
        // added (no domain was started for it). Nothing is left to do.
        Err(e) if gone_under_the_finalizer(&e) => Ok(Action::await_change()),
        other => other.map_err(|e| Error::Finalizer(Box::new(e))),
    };
    ctx.metrics.reconciled("instances", started.elapsed());
    result
}

/// Whether adding or removing the finalizer found the record gone (404). Pure.
fn gone_under_the_finalizer(error: &kube::runtime::finalizer::Error<Error>) -> bool {
    use kube::runtime::finalizer::Error as Fin;
    matches!(error, Fin::AddFinalizer(kube::Error::Api(s)) | Fin::RemoveFinalizer(kube::Error::Api(s)) if s.code == 404)
}

/// Whether the gateway refused a write (a 4xx answer: a stale version, an invalid change), so
/// that it certainly stored nothing. Pure.
fn refused(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if (400..500).contains(&status.code))
}

/// How often an instance whose domain waits on a node that is not Ready is looked at: the
/// node's return reconciles it anyway (the node watch), so there is no need to look often.
const WAITING_ON_A_DOWN_NODE: Duration = Duration::from_secs(30);

/// How often a deleted instance whose domain its Ready node is still removing is looked at.
const WAITING_ON_A_READY_NODE: Duration = Duration::from_secs(5);

fn instance_error_policy(instance: Arc<Instance>, error: &Error, ctx: Arc<Context>) -> Action {
    record_error(&ctx.metrics, "instances", error);
    if error.waits_for_the_domain() {
        let node = instance
            .status
            .as_ref()
            .and_then(|s| s.node_name.as_deref());
        if let Some(n) = node {
            if ctx.node(n).is_none() {
                // Its record is gone: look again when the agent's lease runs out.
                let left = ctx
                    .gone_node_lease_left(n)
                    .unwrap_or(WAITING_ON_A_DOWN_NODE);
                return Action::requeue(
                    (left + Duration::from_millis(50)).min(WAITING_ON_A_DOWN_NODE),
                );
            }
            if !readiness_of(ctx.node(n).as_deref()).is_ready() {
                return Action::requeue(WAITING_ON_A_DOWN_NODE);
            }
        }
    }
    Action::requeue(error.backoff())
}

fn record_error(metrics: &Metrics, controller: &str, error: &Error) {
    match error.metric_label() {
        "waiting" => {}
        // Another writer was first: the retry reads the newer record.
        "conflict" => tracing::debug!(controller, %error, "reconcile failed"),
        _ => tracing::warn!(controller, %error, "reconcile failed"),
    }
    metrics
        .errors
        .get_or_create(&ErrorLabels {
            controller: controller.to_string(),
            error: error.metric_label().to_string(),
        })
        .inc();
}

/// Reflector tasks feeding a controller's stores; they stop when this is dropped, with the
/// controller future that owns it (a replica that loses the lead keeps no watches open).
#[derive(Default)]
struct Reflectors(Vec<tokio::task::JoinHandle<()>>);

impl Reflectors {
    /// A store of `K` kept by a reflector task of its own.
    fn store<K>(&mut self, api: Api<K>) -> Store<K>
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
        self.0.push(tokio::spawn(
            stream.for_each(|_| futures::future::ready(())),
        ));
        store
    }
}

impl Drop for Reflectors {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Run the instance controller until the future is dropped. It starts once `nodes_checked`
/// says the node controller has judged every node's lease ([`run_nodes`]), or after a lease
/// duration at most: a Node record still shows the readiness its last judge wrote, and a
/// replica taking over from one that stopped would otherwise place instances on a node that
/// died meanwhile (a binding is for good).
pub async fn run_instances(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    mut nodes_checked: tokio::sync::watch::Receiver<bool>,
) {
    let mut reflectors = Reflectors::default();
    let nodes = reflectors.store(Api::<Node>::all(client.clone()));
    let types = reflectors.store(Api::<InstanceType>::all(client.clone()));
    let zones = reflectors.store(Api::<AvailabilityZone>::all(client.clone()));
    let lookups = launch::Lookups {
        client: client.clone(),
        images: reflectors.store(Api::<crds::Image>::all(client.clone())),
        accounts: reflectors.store(Api::<crds::Account>::all(client.clone())),
        keys: reflectors.store(Api::<crds::KeyPair>::all(client.clone())),
    };
    let controller = Controller::new(
        Api::<Instance>::all(client.clone()),
        watcher::Config::default(),
    );
    let instances = controller.store();
    let by_node = instances.clone();
    let _ = tokio::join!(
        nodes.wait_until_ready(),
        types.wait_until_ready(),
        zones.wait_until_ready()
    );
    // The `Ref` wait_for returns holds the channel's lock: drop it at once (`is_ok`), or the node
    // controller's next send would wait for it forever.
    let checked = tokio::time::timeout(
        settings.node_lease_duration,
        nodes_checked.wait_for(|checked| *checked),
    )
    .await
    .is_ok_and(|seen| seen.is_ok());
    if !checked {
        tracing::warn!("placing instances before every node's lease was judged");
    }
    let seen_nodes: Arc<Mutex<HashMap<String, Arc<Node>>>> = Arc::default();
    let seen = seen_nodes.clone();
    let ctx = Arc::new(Context {
        client: client.clone(),
        instances,
        nodes,
        seen_nodes,
        types,
        zones,
        lookups,
        policy: settings.policy,
        retention: settings.retention,
        node_lease_duration: settings.node_lease_duration,
        gone_node_leases: Mutex::default(),
        state: Mutex::new(PlacementState::default()),
        metrics: metrics.clone(),
    });
    controller
        // A node change can free room (pending instances) or change health (bound instances).
        .watches(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            move |node: Node| {
                let name = node.name_any();
                // Recorded before the reconciles it triggers run.
                seen.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(name.clone(), Arc::new(node));
                by_node
                    .state()
                    .iter()
                    .filter(|i| {
                        needs_placement(i)
                            || i.status.as_ref().and_then(|s| s.node_name.as_deref())
                                == Some(name.as_str())
                    })
                    .map(|i| ObjectRef::from_obj(&**i))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile_instance, instance_error_policy, ctx)
        .for_each(|_| futures::future::ready(()))
        .await;
}

/// What the node health controller shares.
pub struct NodeContext {
    client: Client,
    lease_duration: Duration,
    metrics: Arc<Metrics>,
    /// Since when each node's lease has been at its version, by this replica's clock.
    sightings: Mutex<HashMap<String, health::LeaseSighting>>,
    /// The nodes judged at least once by this controller.
    checked: Mutex<HashSet<String>>,
    /// The controller's store of nodes.
    store: Store<Node>,
    /// Set once every node in the store has been judged.
    all_checked: tokio::sync::watch::Sender<bool>,
}

impl NodeContext {
    /// Notes that `name` has been judged; says so once every node in the store has been.
    fn judged(&self, name: &str) {
        let mut checked = self
            .checked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        checked.insert(name.to_owned());
        if self
            .store
            .state()
            .iter()
            .all(|n| checked.contains(&n.name_any()))
        {
            self.all_checked.send_replace(true);
        }
    }
}

async fn reconcile_node(node: Arc<Node>, ctx: Arc<NodeContext>) -> Result<Action, Error> {
    let started = Instant::now();
    let name = node
        .metadata
        .name
        .clone()
        .ok_or(Error::Incomplete("name"))?;
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), NODE_LEASE_NAMESPACE);
    let lease = leases.get_opt(&name).await?;
    let duration = lease.as_ref().map_or(ctx.lease_duration, |l| {
        health::lease_duration(l, ctx.lease_duration)
    });
    // A node judged Ready (by this replica or the one before) keeps a whole lease by this
    // replica's clock; one that was not is judged by the renewal time its agent wrote.
    let judged_ready = node
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, CONDITION_READY))
        .is_some_and(|c| c.status == crds::ConditionStatus::True);
    let first = if judged_ready {
        health::FirstSight::AsRenewedNow
    } else {
        health::FirstSight::ByRenewTime
    };
    let now = now();
    let renew_time = lease
        .as_ref()
        .and_then(|l| l.spec.renew_time.as_ref())
        .map(|m| Time(m.0));
    let version = lease
        .as_ref()
        .and_then(|l| l.metadata.resource_version.clone());
    let renewed = {
        let mut sightings = ctx
            .sightings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (version, &renew_time) {
            (Some(version), Some(written)) => {
                let seen =
                    health::sighting(sightings.get(&name), &version, Some(written), &now, first);
                let since = seen.since.clone();
                sightings.insert(name.clone(), seen);
                Some(since)
            }
            _ => {
                sightings.remove(&name);
                None
            }
        }
    };
    let readiness = node_ready(renewed.as_ref(), duration, &now);
    let mut status = node.status.clone().unwrap_or_default();
    set_condition(&mut status.conditions, readiness.condition(&now));
    if Some(&status) != node.status.as_ref() {
        let mut updated = (*node).clone();
        updated.status = Some(status);
        let nodes: Api<Node> = Api::all(ctx.client.clone());
        nodes
            .replace_status(&name, &PostParams::default(), &updated)
            .await?;
        tracing::info!(node = %name, ready = readiness.is_ready(), "node readiness changed");
    }
    ctx.metrics.reconciled("nodes", started.elapsed());
    ctx.judged(&name);
    Ok(match health::expires_in(renewed.as_ref(), duration, &now) {
        Some(left) => Action::requeue(left + Duration::from_millis(50)),
        None => Action::await_change(),
    })
}

fn node_error_policy(_: Arc<Node>, error: &Error, ctx: Arc<NodeContext>) -> Action {
    record_error(&ctx.metrics, "nodes", error);
    Action::requeue(error.backoff())
}

/// Run the node health controller until the future is dropped: a node whose lease expires
/// becomes NotReady (its instances turn impaired through the instance controller).
///
/// `all_checked` is set once every node has been judged (at once when there is none).
pub async fn run_nodes(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    all_checked: tokio::sync::watch::Sender<bool>,
) {
    let controller = Controller::new(Api::<Node>::all(client.clone()), watcher::Config::default());
    let store = controller.store();
    let ctx = Arc::new(NodeContext {
        client: client.clone(),
        lease_duration: settings.node_lease_duration,
        metrics,
        sightings: Mutex::default(),
        checked: Mutex::default(),
        store: store.clone(),
        all_checked,
    });
    let empty = {
        let ctx = ctx.clone();
        async move {
            if store.wait_until_ready().await.is_ok() && store.is_empty() {
                ctx.all_checked.send_replace(true);
            }
        }
    };
    let run = controller
        .watches(
            Api::<Lease>::namespaced(client, NODE_LEASE_NAMESPACE),
            watcher::Config::default(),
            |lease: Lease| Some(ObjectRef::<Node>::new(&lease.name_any())),
        )
        .run(reconcile_node, node_error_policy, ctx)
        .for_each(|_| futures::future::ready(()));
    tokio::join!(run, empty);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newer_of_two_copies_is_the_one_with_the_larger_revision() {
        let node = |rv: Option<&str>| {
            let mut n = Node::new(
                "node-1",
                crds::NodeSpec {
                    availability_zone: "karri-1a".into(),
                    unschedulable: false,
                    hypervisor: None,
                },
            );
            n.metadata.resource_version = rv.map(str::to_owned);
            n
        };
        assert_eq!(revision(&node(Some("1042"))), 1042);
        assert!(revision(&node(Some("1042"))) > revision(&node(Some("999"))));
        assert_eq!(revision(&node(None)), 0);
        assert_eq!(revision(&node(Some("opaque"))), 0);
    }

    fn store_of<K>(objects: &[serde_json::Value]) -> Store<K>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        let (store, mut writer) = reflector::store();
        for o in objects {
            let object: K = serde_json::from_value(o.clone()).expect("a record of the kind");
            writer.apply_watcher_event(&watcher::Event::Apply(object));
        }
        store
    }

    /// A Ready node in `zone` with room for exactly one `t1.micro`.
    fn ready_node(name: &str, zone: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "karri.dev/v1alpha1", "kind": "Node",
            "metadata": {"name": name, "resourceVersion": "1"},
            "spec": {"availabilityZone": zone},
            "status": {
                "conditions": [{"type": "Ready", "status": "True",
                    "lastTransitionTime": "2026-11-26T00:00:00Z", "reason": "LeaseRenewed"}],
                "allocatable": {"vcpus": 1, "memoryMiB": 256, "diskGiB": 5}
            }
        })
    }

    /// A context over stores of two nodes of zone `karri-1a` with room for exactly one
    /// `t1.micro` each.
    fn context_of(instances: Store<Instance>) -> Context {
        let micro = serde_json::json!({
            "apiVersion": "karri.dev/v1alpha1", "kind": "InstanceType",
            "metadata": {"name": "t1.micro"},
            "spec": {"vcpus": 1, "memoryMiB": 256, "diskGiB": 5}
        });
        // Placement reads stores only: the client is never used.
        let client = Client::try_from(kube::Config::new(
            "http://127.0.0.1:9".parse().expect("a URL"),
        ))
        .expect("a client");
        Context {
            client: client.clone(),
            instances,
            nodes: store_of(&[
                ready_node("node-a", "karri-1a"),
                ready_node("node-b", "karri-1a"),
            ]),
            seen_nodes: Arc::default(),
            types: store_of(&[micro]),
            zones: store_of(&[serde_json::json!({
                "apiVersion": "karri.dev/v1alpha1", "kind": "AvailabilityZone",
                "metadata": {"name": "karri-1a"},
                "spec": {"region": "karri-1"}
            })]),
            lookups: launch::Lookups {
                client,
                images: store_of(&[]),
                accounts: store_of(&[]),
                keys: store_of(&[]),
            },
            policy: Policy::default(),
            retention: Duration::from_secs(60),
            node_lease_duration: health::DEFAULT_LEASE_DURATION,
            gone_node_leases: Mutex::default(),
            state: Mutex::default(),
            metrics: Arc::new(Metrics::new()),
        }
    }

    fn pending(name: &str) -> Instance {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "karri.dev/v1alpha1", "kind": "Instance",
            "metadata": {"name": name, "namespace": "acme", "uid": format!("uid-{name}"),
                "resourceVersion": "100"},
            "spec": {"imageId": "emi-0123456789abcdef0", "instanceType": "t1.micro"}
        }))
        .expect("an instance")
    }

    #[tokio::test]
    async fn a_written_placement_survives_a_refused_retry_from_an_older_copy_of_the_record() {
        let (x, y) = (pending("x"), pending("y"));
        let ctx = context_of(store_of(&[
            serde_json::to_value(&x).expect("json"),
            serde_json::to_value(&y).expect("json"),
        ]));
        let first = ctx.place(&x).expect("x fits");
        let mut status = crds::InstanceStatus {
            node_name: Some(first.node.clone()),
            ..Default::default()
        };
        ctx.written(&x, &status);
        // The store still shows x unbound: a reconcile of that copy puts it where it was put,
        // and when its write is refused (409), the written reservation stays.
        let again = ctx.place(&x).expect("x is placed");
        assert_eq!(again.node, first.node);
        ctx.forget(&x);
        let other = ctx.place(&y).expect("y fits on the other node");
        assert_ne!(other.node, first.node, "y was put on x's full node");

        // A reservation an attempt made but never wrote goes when that attempt fails.
        ctx.forget(&y);
        let y_again = ctx.place(&y).expect("y fits");
        assert_eq!(y_again.node, other.node);
        // A write that did not carry the binding drops it too.
        status.node_name = None;
        ctx.written(&y, &status);
        assert!(!ctx
            .state
            .lock()
            .expect("not poisoned")
            .assumed
            .contains_key("uid-y"));
    }

    #[test]
    fn only_a_refused_status_write_is_known_to_have_stored_nothing() {
        let api = |code: u16| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        assert!(refused(&api(409)), "a stale version");
        assert!(refused(&api(422)), "an invalid change");
        assert!(
            !refused(&api(500)),
            "the gateway failed: the write may have committed"
        );
        assert!(
            !refused(&api(504)),
            "timed out: the write may have committed"
        );
        let lost = kube::Error::Service(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(!refused(&lost), "connection lost: outcome unknown");
    }

    #[test]
    fn a_record_gone_while_its_finalizer_changes_is_not_a_failure() {
        use kube::runtime::finalizer::Error as Fin;
        let api = |code: u16| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        assert!(gone_under_the_finalizer(&Fin::RemoveFinalizer(api(404))));
        assert!(gone_under_the_finalizer(&Fin::AddFinalizer(api(404))));
        assert!(!gone_under_the_finalizer(&Fin::RemoveFinalizer(api(409))));
        assert!(!gone_under_the_finalizer(&Fin::RemoveFinalizer(api(500))));
        let cleanup = Fin::CleanupFailed(Error::Api(api(404)));
        assert!(
            !gone_under_the_finalizer(&cleanup),
            "a cleanup's own 404 is the reconcile's to judge"
        );
    }

    #[test]
    fn a_cleanup_waiting_for_the_domain_is_told_through_the_finalizer_wrapper() {
        use kube::runtime::finalizer::Error as Fin;
        let wrapped = Error::Finalizer(Box::new(Fin::CleanupFailed(Error::DomainStillDefined)));
        assert!(wrapped.waits_for_the_domain());
        let other = Error::Finalizer(Box::new(Fin::CleanupFailed(Error::Incomplete("name"))));
        assert!(!other.waits_for_the_domain());
    }

    #[tokio::test]
    async fn placement_is_told_once_every_node_has_been_judged() {
        let client = Client::try_from(kube::Config::new(
            "http://127.0.0.1:9".parse().expect("a URL"),
        ))
        .expect("a client");
        let (all_checked, mut told) = tokio::sync::watch::channel(false);
        let ctx = NodeContext {
            client,
            lease_duration: health::DEFAULT_LEASE_DURATION,
            metrics: Arc::new(Metrics::new()),
            sightings: Mutex::default(),
            checked: Mutex::default(),
            store: store_of(&[
                ready_node("node-a", "karri-1a"),
                ready_node("node-b", "karri-1a"),
            ]),
            all_checked,
        };
        ctx.judged("node-a");
        ctx.judged("node-a");
        assert!(!*told.borrow_and_update(), "told with node-b not judged");
        ctx.judged("node-b");
        assert!(*told.borrow_and_update());
    }

    #[tokio::test]
    async fn a_node_whose_zone_has_no_record_is_never_chosen() {
        let x = pending("x");
        let mut ctx = context_of(store_of(&[serde_json::to_value(&x).expect("json")]));
        ctx.nodes = store_of(&[
            ready_node("node-typo", "karri-1z"),
            ready_node("node-a", "karri-1a"),
        ]);
        assert_eq!(ctx.place(&x).expect("x fits").node, "node-a");
        ctx.forget(&x);
        ctx.nodes = store_of(&[ready_node("node-typo", "karri-1z")]);
        assert!(
            ctx.place(&x).is_err(),
            "x was put in a zone that does not exist"
        );
    }

    #[test]
    fn a_reservation_lasts_until_its_binding_is_seen_or_its_record_stays_away() {
        let young = Duration::from_secs(1);
        let old = ASSUMED_UNSEEN_TTL + Duration::from_secs(1);
        for (seen_bound, age, counts) in [
            (Some(false), young, true),
            (Some(false), old, true),
            (Some(true), young, false),
            (Some(true), old, false),
            // Not in a snapshot taken before the record arrived: still reserved.
            (None, young, true),
            // Gone for longer than any snapshot lags: deleted.
            (None, old, false),
        ] {
            assert_eq!(
                still_assumed(seen_bound, age),
                counts,
                "{seen_bound:?} after {age:?}"
            );
        }
    }
}
