//! The EC2 lifecycle end to end: a terminated instance stays visible for the retention period
//! and is then collected, with its domain gone.

use std::ops::ControlFlow::{Break, Continue};
use std::time::Duration;

use anyhow::{ensure, Context};
use crds::InstanceState;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use karri_e2e::cloud::{state_of, wait_until, Cloud, Options};
use kube::api::{Patch, PatchParams};
use serde_json::json;

const STEP: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_instance_stays_visible_for_the_retention_period_then_is_collected(
) -> anyhow::Result<()> {
    let retention = 3;
    let cloud = Cloud::start(Options {
        retention_seconds: retention,
        ..Options::default()
    })
    .await?;
    cloud.create_instances(&["vm-1".to_string()]).await?;
    let api = cloud.instances();
    wait_until("vm-1 is running", STEP, async || {
        let i = api.get("vm-1").await?;
        Ok(match state_of(&i) {
            Some(InstanceState::Running) => Break(()),
            other => Continue(format!("{other:?}")),
        })
    })
    .await?;

    api.patch(
        "vm-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"desiredState": "terminated"}})),
    )
    .await?;
    let terminated_at = wait_until("vm-1 is terminated", STEP, async || {
        let i = api.get("vm-1").await?;
        Ok(match (state_of(&i), i.status.as_ref()) {
            (Some(InstanceState::Terminated), Some(s)) => Break(s.state_transition_time.clone()),
            (other, _) => Continue(format!("{other:?}")),
        })
    })
    .await?
    .context("a terminated record says when it was terminated")?;

    let gone_at = wait_until("vm-1 is collected", STEP, async || {
        Ok(match api.get_opt("vm-1").await? {
            None => Break(Timestamp::now()),
            Some(i) => Continue(format!("still there, {:?}", state_of(&i))),
        })
    })
    .await?;
    let visible_for = gone_at.duration_since(terminated_at.0);
    // stateTransitionTime has whole seconds: allow one second of rounding, never more.
    ensure!(
        visible_for >= SignedDuration::from_secs(i64::try_from(retention)? - 1),
        "collected after {visible_for} although the retention is {retention} s"
    );
    let (_, domains) = cloud.agent_domains(0).await?;
    ensure!(domains == 0, "the agent still has {domains} domains");
    Ok(())
}
