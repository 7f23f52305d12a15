//! Leader election over a `Lease` record, so that two operator replicas never both act.
//! The decisions are [`crate::leader::decide`]; this loop reads and writes the lease.

use std::time::{Duration, Instant};

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

/// How long this replica has seen the lease record unchanged (the same `resourceVersion`), by
/// its own monotonic clock. client-go times another holder's lease this way rather than from the
/// `renewTime` that holder wrote, which another host's clock set: a clock running behind would
/// make a live leader's renewals look expired, one running ahead would keep a dead leader's
/// lease alive.
#[derive(Debug, Default)]
pub struct Observer {
    seen: Option<(String, Instant)>,
}

impl Observer {
    /// Records that the lease is at `version` (`None`: there is no lease) at `now`, and returns
    /// how long it has been at that version as far as this replica knows.
    pub fn age(&mut self, version: Option<&str>, now: Instant) -> Duration {
        match (&self.seen, version) {
            (Some((seen, since)), Some(version)) if seen == version => {
                now.saturating_duration_since(*since)
            }
            (_, Some(version)) => {
                self.seen = Some((version.to_owned(), now));
                Duration::ZERO
            }
            (_, None) => {
                self.seen = None;
                Duration::ZERO
            }
        }
    }
}

/// The lease as the decision sees it: renewed `age` before `now` (see [`Observer`]) when it was
/// renewed at all.
fn view(lease: &Lease, fallback: Duration, age: Duration, now: Timestamp) -> LeaseView {
    LeaseView {
        holder: lease.spec.holder_identity.clone(),
        renew_time: lease
            .spec
            .renew_time
            .as_ref()
            .map(|_| Time(now.checked_sub(age).unwrap_or(now))),
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
async fn attempt(
    api: &Api<Lease>,
    identity: &str,
    timing: Timing,
    observer: &mut Observer,
) -> Result<bool, kube::Error> {
    let current = api.get_opt(LEASE_NAME).await?;
    let now = Timestamp::now();
    let version = current
        .as_ref()
        .and_then(|l| l.metadata.resource_version.as_deref());
    let age = observer.age(version, Instant::now());
    let lease_view = current
        .as_ref()
        .map(|l| view(l, timing.lease_duration, age, now));
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
///
/// Every attempt is bounded in time: a leader waits for an answer only until its renew deadline
/// (counted from when its last successful attempt was sent), so a hung gateway makes it step
/// down before any standby may take the lease over.
pub async fn run(client: Client, identity: String, timing: Timing, leading: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, SYSTEM_NAMESPACE);
    let mut last_renewed: Option<tokio::time::Instant> = None;
    let mut observer = Observer::default();
    loop {
        let sent = tokio::time::Instant::now();
        let limit = match last_renewed {
            Some(renewed) if *leading.borrow() => {
                (renewed + timing.renew_deadline).saturating_duration_since(sent)
            }
            _ => timing.renew_deadline,
        };
        let outcome =
            tokio::time::timeout(limit, attempt(&api, &identity, timing, &mut observer)).await;
        match outcome {
            Ok(Ok(true)) => {
                if !*leading.borrow() {
                    tracing::info!(%identity, "became the leader");
                }
                // The lease was renewed no earlier than the request was sent.
                last_renewed = Some(sent);
                leading.send_replace(true);
            }
            Ok(Ok(false)) => {
                if *leading.borrow() {
                    tracing::warn!(%identity, "another replica holds the lease; stepping down");
                }
                last_renewed = None;
                leading.send_replace(false);
            }
            failed => {
                match failed {
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "could not acquire or renew the leader lease")
                    }
                    _ => tracing::warn!(
                        waited_ms = limit.as_millis(),
                        "no answer to acquiring or renewing the leader lease"
                    ),
                }
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

/// Gives the lease up if `identity` holds it, so that a standby takes over at once instead of
/// when the lease runs out. Call it only after this replica's controllers have stopped and its
/// campaign ([`run`]) has ended. Returns whether it held the lease.
pub async fn release(client: Client, identity: &str) -> Result<bool, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client, SYSTEM_NAMESPACE);
    let Some(mut lease) = api.get_opt(LEASE_NAME).await? else {
        return Ok(false);
    };
    if lease.spec.holder_identity.as_deref() != Some(identity) {
        return Ok(false);
    }
    // A released lease has no holder; replace carries the resourceVersion read, so a rival
    // that took the lease meanwhile keeps it.
    lease.spec.holder_identity = None;
    lease.spec.renew_time = Some(MicroTime(Timestamp::now()));
    api.replace(LEASE_NAME, &PostParams::default(), &lease)
        .await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_ages_by_this_replicas_clock_from_when_its_version_was_first_seen() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut observer = Observer::default();
        // (seconds after t0, version read, age wanted)
        let rows = [
            (0, Some("10"), 0),
            (2, Some("10"), 2),
            (5, Some("10"), 5),
            // Renewed: a new version starts from zero.
            (6, Some("11"), 0),
            (9, Some("11"), 3),
            // Deleted, then created again.
            (10, None, 0),
            (11, Some("12"), 0),
            (12, Some("12"), 1),
        ];
        for (at, version, want) in rows {
            assert_eq!(
                observer.age(version, t0 + s(at)),
                s(want),
                "{version:?} at {at} s"
            );
        }
    }

    /// A gateway stand-in that lets the first replica create the lease and then never answers
    /// another read of it.
    async fn gateway_that_hangs_after_the_lease_is_taken() -> std::net::SocketAddr {
        use axum::http::StatusCode;
        use axum::routing::{get, post};
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;

        let reads = Arc::new(AtomicUsize::new(0));
        let lease_path = format!("/apis/karri.dev/v1alpha1/namespaces/{SYSTEM_NAMESPACE}/leases");
        let app = axum::Router::new()
            .route(
                &format!("{lease_path}/{LEASE_NAME}"),
                get(move || {
                    let first = reads.fetch_add(1, Ordering::SeqCst) == 0;
                    async move {
                        if !first {
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
                &lease_path,
                post(
                    |axum::Json(mut lease): axum::Json<serde_json::Value>| async move {
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
        addr
    }

    #[tokio::test]
    async fn a_leader_whose_renewal_hangs_steps_down_before_its_lease_runs_out() {
        let addr = gateway_that_hangs_after_the_lease_is_taken().await;
        let url = format!("http://{addr}").parse().expect("a valid URL");
        let client = Client::try_from(kube::Config::new(url)).expect("a client");
        let timing = Timing::from_duration(Duration::from_secs(3));
        let (leading, mut seen) = watch::channel(false);
        let campaign = tokio::spawn(run(client, "replica-a".into(), timing, leading));

        let bound = Duration::from_secs(20);
        tokio::time::timeout(bound, seen.wait_for(|l| *l))
            .await
            .expect("became the leader")
            .expect("campaign running");
        let led = Instant::now();
        tokio::time::timeout(bound, seen.wait_for(|l| !*l))
            .await
            .expect("stepped down while its renewal hung")
            .expect("campaign running");
        let held = led.elapsed();
        campaign.abort();
        // A standby may take the lease once it has seen it unchanged for the lease duration.
        assert!(
            held < timing.lease_duration,
            "acted for {held:?} without a renewal; the lease lasts {:?}",
            timing.lease_duration
        );
    }
}
