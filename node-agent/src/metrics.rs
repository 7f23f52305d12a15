//! Prometheus metrics of the node agent, served at `/metrics`.
//!
//! The gauge of domains by state is refreshed from libvirt on every scrape (one
//! `list_ours`), so what a scrape shows is what the host holds at that moment, not what the
//! agent last did.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::hypervisor::{Hypervisor, ObservedDomain};
use crate::plan::{Action, DomainState};

/// Every domain state the gauge reports, so that a state no domain is in reads 0.
const STATES: [DomainState; 6] = [
    DomainState::Running,
    DomainState::Paused,
    DomainState::ShuttingDown,
    DomainState::ShutOff,
    DomainState::Crashed,
    DomainState::Other,
];

/// The label value of a domain state, e.g. `shut-off`.
pub fn state_label(state: DomainState) -> &'static str {
    match state {
        DomainState::Running => "running",
        DomainState::Paused => "paused",
        DomainState::ShuttingDown => "shutting-down",
        DomainState::ShutOff => "shut-off",
        DomainState::Crashed => "crashed",
        DomainState::Other => "other",
    }
}

/// Labels of a reconcile error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The error's metric label.
    pub error: String,
}

/// Labels of the domain gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    /// Domain state, e.g. `running` or `shut-off`.
    pub state: String,
}

/// Labels of the hypervisor action counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// The action, e.g. `define`.
    pub action: String,
}

/// Every metric of the node agent.
pub struct Metrics {
    registry: Registry,
    /// Instance reconciles run.
    pub reconciles: Counter,
    /// Reconcile errors by kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile duration in seconds.
    pub duration: Histogram,
    /// Karri's domains on the host, by state.
    pub domains: Family<StateLabels, Gauge>,
    /// Hypervisor actions carried out, by action.
    pub actions: Family<ActionLabels, Counter>,
    /// Domains removed because no instance bound to the node owns them.
    pub orphans_removed: Counter,
    /// Successful lease renewals (including the first create).
    pub lease_renewals: Counter,
    /// Failed lease renewals.
    pub lease_failures: Counter,
    /// Time to prepare a guest (images fetched or found in the cache, overlay, network).
    pub guest_prepare: Histogram,
    /// Console reports written to instance status.
    pub console_reports: Counter,
    /// Frames the port guard dropped (spoofed address or MAC, IPv6, VLAN tags), as its nft
    /// counter said at the last sweep.
    pub guard_dropped_packets: Gauge,
    /// Their bytes.
    pub guard_dropped_bytes: Gauge,
    /// Times the DHCP server (dnsmasq) was found dead and started again.
    pub dhcp_restarts: Counter,
}

impl Metrics {
    /// Register every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("karri_node_agent");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let domains = Family::<StateLabels, Gauge>::default();
        let actions = Family::<ActionLabels, Counter>::default();
        let orphans_removed = Counter::default();
        let lease_renewals = Counter::default();
        let lease_failures = Counter::default();
        let guest_prepare = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        let console_reports = Counter::default();
        let guard_dropped_packets = Gauge::default();
        let guard_dropped_bytes = Gauge::default();
        let dhcp_restarts = Counter::default();
        registry.register(
            "dhcp_restarts",
            "Times the guests' DHCP server (dnsmasq) was found dead and started again",
            dhcp_restarts.clone(),
        );
        registry.register(
            "port_guard_dropped_packets",
            "Frames the port guard dropped since its table was made: another guest's address or \
             MAC, IPv6, VLAN tags (read at each sweep)",
            guard_dropped_packets.clone(),
        );
        registry.register(
            "port_guard_dropped_bytes",
            "Bytes of the frames the port guard dropped since its table was made",
            guard_dropped_bytes.clone(),
        );
        registry.register(
            "guest_prepare_seconds",
            "Time to prepare a guest: images, overlay, network",
            guest_prepare.clone(),
        );
        registry.register(
            "console_reports",
            "Console outputs reported to instance status",
            console_reports.clone(),
        );
        registry.register("reconciles", "Instance reconciles run", reconciles.clone());
        registry.register("reconcile_errors", "Reconcile errors", errors.clone());
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            duration.clone(),
        );
        registry.register(
            "domains",
            "Karri's domains on the host, by state",
            domains.clone(),
        );
        registry.register(
            "domain_actions",
            "Hypervisor actions carried out",
            actions.clone(),
        );
        registry.register(
            "orphans_removed",
            "Domains removed because no instance bound to the node owns them",
            orphans_removed.clone(),
        );
        registry.register(
            "lease_renewals",
            "Successful node lease renewals",
            lease_renewals.clone(),
        );
        registry.register(
            "lease_renewal_failures",
            "Failed node lease renewals",
            lease_failures.clone(),
        );
        for state in STATES {
            domains
                .get_or_create(&StateLabels {
                    state: state_label(state).to_owned(),
                })
                .set(0);
        }
        Metrics {
            registry,
            reconciles,
            errors,
            duration,
            domains,
            actions,
            orphans_removed,
            lease_renewals,
            lease_failures,
            guest_prepare,
            console_reports,
            guard_dropped_packets,
            guard_dropped_bytes,
            dhcp_restarts,
        }
    }

    /// Record what the port guard has dropped so far.
    pub fn guard_dropped(&self, packets: u64, bytes: u64) {
        self.guard_dropped_packets
            .set(i64::try_from(packets).unwrap_or(i64::MAX));
        self.guard_dropped_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Record one reconcile that took `took`.
    pub fn reconciled(&self, took: Duration) {
        self.reconciles.inc();
        self.duration.observe(took.as_secs_f64());
    }

    /// Count one reconcile error.
    pub fn failed(&self, label: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                error: label.to_owned(),
            })
            .inc();
    }

    /// Count the actions of an applied plan.
    pub fn acted(&self, actions: &[Action]) {
        for action in actions {
            self.actions
                .get_or_create(&ActionLabels {
                    action: action.as_str().to_owned(),
                })
                .inc();
        }
    }

    /// Set the domain gauge from a full listing of Karri's domains.
    pub fn observe_domains(&self, domains: &[ObservedDomain]) {
        for state in STATES {
            let n = domains.iter().filter(|d| d.state == state).count();
            self.domains
                .get_or_create(&StateLabels {
                    state: state_label(state).to_owned(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Serve `/metrics` on `listener` until the process ends, refreshing the domain gauge from
/// `hypervisor` on every scrape.
pub async fn serve<H>(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, hypervisor: Arc<H>)
where
    H: Hypervisor + 'static,
{
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            let hypervisor = hypervisor.clone();
            async move {
                match hypervisor.list_ours().await {
                    Ok(domains) => metrics.observe_domains(&domains),
                    Err(error) => {
                        tracing::warn!(%error, "cannot list domains for the metrics");
                    }
                }
                metrics.render()
            }
        }),
    );
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics served");
    }
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics server stopped");
    }
}
