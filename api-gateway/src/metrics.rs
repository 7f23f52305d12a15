//! Prometheus metrics of the gateway, served at `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a request metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `other`.
    pub verb: String,
    /// Resource plural or "".
    pub resource: String,
    /// HTTP status code.
    pub code: String,
}

/// Every metric of the gateway.
pub struct Metrics {
    registry: Registry,
    /// Requests served.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency in seconds.
    pub latency: Family<RequestLabels, Histogram>,
    /// Successful etcd writes.
    pub writes: Counter,
    /// CAS retries after a concurrent write.
    pub conflict_retries: Counter,
    /// Lists served from the watch cache.
    pub cache_lists: Counter,
    /// Open API watches.
    pub watchers: Gauge,
    /// Watches that had to read etcd directly (older than the cache).
    pub etcd_direct_watches: Counter,
    /// Full lists of etcd by the watch cache: its first, then one after each compaction that
    /// its watch could not resume across.
    pub cache_relists: Counter,
    /// Orphaned S3 blobs and temporary files the sweep removed.
    pub s3_swept: Counter,
    /// Client connections open.
    pub connections: Gauge,
    /// Client connections closed on arrival because the cap was reached.
    pub connections_refused: Counter,
    /// Requests with an access key ID the cache did not know, answered 503 without an etcd
    /// lookup because the lookup budget was spent.
    pub key_lookups_refused: Counter,
}

impl Metrics {
    /// Register every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("karri_gateway");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        let writes = Counter::default();
        let conflict_retries = Counter::default();
        let cache_lists = Counter::default();
        let watchers = Gauge::default();
        let etcd_direct_watches = Counter::default();
        let cache_relists = Counter::default();
        let s3_swept = Counter::default();
        let connections = Gauge::default();
        let connections_refused = Counter::default();
        let key_lookups_refused = Counter::default();
        registry.register(
            "unknown_key_lookups_refused",
            "Requests with an access key ID unknown to the cache answered 503 because the etcd lookup budget was spent",
            key_lookups_refused.clone(),
        );
        registry.register(
            "connections",
            "Client connections open",
            connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections closed on arrival because --max-connections were open",
            connections_refused.clone(),
        );
        registry.register(
            "s3_swept_orphans",
            "Orphaned S3 blobs and temporary files removed by the sweep",
            s3_swept.clone(),
        );
        registry.register("requests", "API requests served", requests.clone());
        registry.register(
            "request_duration_seconds",
            "API request latency",
            latency.clone(),
        );
        registry.register(
            "etcd_writes",
            "Successful etcd write transactions",
            writes.clone(),
        );
        registry.register(
            "conflict_retries",
            "Compare-and-swap retries",
            conflict_retries.clone(),
        );
        registry.register(
            "cache_lists",
            "Lists served from the watch cache",
            cache_lists.clone(),
        );
        registry.register("watchers", "Open API watches", watchers.clone());
        registry.register(
            "etcd_direct_watches",
            "Watches served from etcd directly",
            etcd_direct_watches.clone(),
        );
        registry.register(
            "cache_relists",
            "Full lists of etcd by the watch cache (the first, then after compactions)",
            cache_relists.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            writes,
            conflict_retries,
            cache_lists,
            watchers,
            etcd_direct_watches,
            cache_relists,
            s3_swept,
            connections,
            connections_refused,
            key_lookups_refused,
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
