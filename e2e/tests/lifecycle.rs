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

/// Waits until instance `name` is in `state`.
async fn wait_state(
    api: &kube::Api<crds::Instance>,
    name: &str,
    state: InstanceState,
) -> anyhow::Result<()> {
    wait_until(&format!("{name} is {state:?}"), STEP, async || {
        let i = api.get(name).await?;
        Ok(match state_of(&i) {
            Some(s) if s == state => Break(()),
            other => Continue(format!("{other:?}")),
        })
    })
    .await
}

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
    wait_state(&api, "vm-1", InstanceState::Running).await?;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_counts_the_disk_an_instance_type_may_grow_to() -> anyhow::Result<()> {
    // One node offering 1,000 GiB of instance disk (see `Cloud`), and a type whose disks may
    // grow to 600 GiB: one such instance fits, a second waits for the room.
    let cloud = Cloud::start(Options {
        agents: 1,
        ..Options::default()
    })
    .await?;
    let types: kube::Api<crds::InstanceType> = kube::Api::all(cloud.client.clone());
    let big_disk: crds::InstanceType = serde_json::from_value(json!({
        "apiVersion": "karri.dev/v1alpha1", "kind": "InstanceType",
        "metadata": {"name": "x.bigdisk"},
        "spec": {"vcpus": 1, "memoryMiB": 256, "diskGiB": 600}
    }))?;
    types.create(&Default::default(), &big_disk).await?;
    let api = cloud.instances();
    for name in ["disk-1", "disk-2"] {
        let mut body = karri_e2e::cloud::instance(name)?;
        body.spec.instance_type = "x.bigdisk".to_owned();
        api.create(&Default::default(), &body).await?;
        if name == "disk-1" {
            wait_state(&api, "disk-1", InstanceState::Running).await?;
        }
    }
    let why = wait_until("disk-2 is unplaceable for its disk", STEP, async || {
        let i = api.get("disk-2").await?;
        Ok(
            match karri_e2e::cloud::condition(&i, crds::CONDITION_SCHEDULED) {
                Some(c) if c.message.contains("600 GiB of disk") => Break(c.message.clone()),
                other => Continue(format!("{other:?}")),
            },
        )
    })
    .await?;
    ensure!(
        why.contains("has room for 1 vCPU, 256 MiB and 600 GiB of disk"),
        "{why}"
    );
    ensure!(
        state_of(&api.get("disk-2").await?) == Some(InstanceState::Pending),
        "disk-2 is not pending"
    );
    // Once the first goes, the second has its room.
    api.patch(
        "disk-1",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"desiredState": "terminated"}})),
    )
    .await?;
    wait_state(&api, "disk-2", InstanceState::Running).await?;
    Ok(())
}
