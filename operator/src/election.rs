//! Leader election over a `Lease` record, so that two operator replicas never both act.
//! The decisions are [`crate::leader::decide`]; this loop reads and writes the lease.

use std::time::Duration;

use crds::{Lease, LeaseSpec, SYSTEM_NAMESPACE};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;
use tokio::sync::watch;

use crate::leader::{decide, Decision, LeaseView};

/// Name of the operator's leader lease in `karri-system`.
pub const LEASE_NAME: &str = "karri-operator";

/// How the election is timed.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How long a renewal holds the lease.
    pub lease_duration: Duration,
    /// The leader stops acting when it could not renew for this long (less than the duration,
    /// so it stops before anyone else may take over).
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl Timing {
    /// Timing derived from a lease duration: renew deadline 2/3 of it, retry every 1/5.
    pub fn from_duration(lease_duration: Duration) -> Self {
        Timing {
            lease_duration,
            renew_deadline: lease_duration * 2 / 3,
            retry_period: (lease_duration / 5).max(Duration::from_millis(200)),
        }
    }
}

fn view(lease: &Lease, fallback: Duration) -> LeaseView {
    LeaseView {
        holder: lease.spec.holder_identity.clone(),
        renew_time: lease.spec.renew_time.as_ref().map(|m| Time(m.0)),
        lease_duration: lease
            .spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs)
            .unwrap_or(fallback),
        transitions: lease.spec.lease_transitions.unwrap_or(0),
    }
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// Try once to acquire or renew; true when we hold the lease afterwards.
async fn attempt(api: &Api<Lease>, identity: &str, timing: Timing) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(LEASE_NAME).await?;
    let lease_view = current.as_ref().map(|l| view(l, timing.lease_duration));
    match decide(lease_view.as_ref(), identity, &Time(now)) {
        Decision::Follow { .. } => Ok(false),
        Decision::Renew => {
            let Some(mut lease) = current else {
                return Ok(false);
            };
            lease.spec.renew_time = Some(MicroTime(now));
            api.replace(LEASE_NAME, &PostParams::default(), &lease)
                .await
                .map(|_| true)
        }
        Decision::Acquire { transitions } => {
            let spec = LeaseSpec {
                holder_identity: Some(identity.to_string()),
                lease_duration_seconds: Some(seconds(timing.lease_duration)),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions),
            };
            match current {
                // Replace carries the resourceVersion we decided on: a rival's write wins, we lose.
                Some(mut lease) => {
                    lease.spec = spec;
                    api.replace(LEASE_NAME, &PostParams::default(), &lease)
                        .await
                        .map(|_| true)
                }
                None => {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(LEASE_NAME.to_string()),
                            namespace: Some(SYSTEM_NAMESPACE.to_string()),
                            ..Default::default()
                        },
                        spec,
                        status: None,
                    };
                    api.create(&PostParams::default(), &lease)
                        .await
                        .map(|_| true)
                }
            }
        }
    }
}

/// Campaign forever: `leading` is true exactly while this replica holds a renewed lease.
pub async fn run(client: Client, identity: String, timing: Timing, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, SYSTEM_NAMESPACE);
    let mut last_renewed: Option<tokio::time::Instant> = None;
    loop {
        match attempt(&api, &identity, timing).await {
            Ok(true) => {
                if !*leading.borrow() {
                    tracing::info!(%identity, "became the leader");
                }
                last_renewed = Some(tokio::time::Instant::now());
                leading.send_replace(true);
            }
            Ok(false) => {
                if *leading.borrow() {
                    tracing::warn!(%identity, "another replica holds the lease; stepping down");
                }
                last_renewed = None;
                leading.send_replace(false);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not acquire or renew the leader lease");
                let expired = last_renewed.is_none_or(|t| t.elapsed() >= timing.renew_deadline);
                if expired && *leading.borrow() {
                    tracing::warn!(%identity, "lease not renewed before the deadline; stepping down");
                    leading.send_replace(false);
                }
            }
        }
        tokio::time::sleep(timing.retry_period).await;
    }
}
