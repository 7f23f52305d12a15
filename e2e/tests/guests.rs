//! Real guests on libvirtd + QEMU (TCG) on a simulated host: awscli runs the micro image with a
//! key pair and a user-data script; the guest boots, fetches an IMDSv2 token from the metadata
//! service, prints its instance ID, public key and the script's output on its serial console,
//! which GetConsoleOutput shows. Each instance reads only its own metadata, a tokenless request
//! is refused when tokens are required, and terminate shuts the guest down (the power button,
//! obeyed) and removes the domain and its overlay.
//!
//! The micro image uploaded to the gateway's S3 with `karri image register --bucket` boots the
//! same way: the agent fetches kernel, ramdisk and disk through presigned URLs the gateway issues
//! for its node.
//!
//! Everything with an address lives in the simulated host's network namespace (bridge, DHCP,
//! metadata service, guests); the agent reaches the gateway on loopback.

use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use karri_e2e::guests::{GuestCloud, ImageSource};
use serde_json::Value;
use tokio::time::Instant;

/// How long a guest gets from RunInstances to `karri-micro: ready` (TCG, two at once).
const BOOT_DEADLINE: Duration = Duration::from_secs(240);
/// How long anything else gets.
const DEADLINE: Duration = Duration::from_secs(90);
const POLL: Duration = Duration::from_millis(500);

/// The user-data script: says hello, asks for its instance ID without a token (IMDSv1),
/// printing the HTTP status line it gets, and for its `Name` tag, printing the answer's body.
const SCRIPT: &str = "#!/bin/sh\n\
echo \"user-data says hello from $(hostname)\"\n\
printf 'GET /latest/meta-data/instance-id HTTP/1.0\\r\\nHost: 169.254.169.254\\r\\n\\r\\n' \
| nc 169.254.169.254 80 | head -n 1 | sed 's/^/imdsv1: /'\n\
printf 'GET /latest/meta-data/tags/instance/Name HTTP/1.0\\r\\nHost: 169.254.169.254\\r\\n\\r\\n' \
| nc 169.254.169.254 80 | tail -n 1 | sed 's/^/tag-name: /'\n";

fn instance_id(run: &Value) -> anyhow::Result<String> {
    run.pointer("/Instances/0/InstanceId")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("no instance ID in {run}"))
}

/// Runs one `t1.micro` of the cloud's micro image with `extra` arguments; its instance ID.
async fn run_micro(cloud: &GuestCloud, extra: &[&str]) -> anyhow::Result<String> {
    let mut args = vec![
        "run-instances",
        "--image-id",
        &cloud.image_id,
        "--instance-type",
        "t1.micro",
    ];
    args.extend_from_slice(extra);
    instance_id(&cloud.aws(&args).await?)
}

/// Polls GetConsoleOutput until it shows `karri-micro: ready`.
async fn console_when_ready(cloud: &GuestCloud, id: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + BOOT_DEADLINE;
    loop {
        let out = cloud.console(id).await?;
        if out.contains("karri-micro: ready") {
            return Ok(out);
        }
        if Instant::now() > deadline {
            bail!(
                "{id} printed no `ready` in {BOOT_DEADLINE:?}; console so far:\n{out}\nagent:\n{}",
                cloud.agent.log_tail()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn state_of(cloud: &GuestCloud, id: &str) -> anyhow::Result<String> {
    let d = cloud
        .aws(&["describe-instances", "--instance-ids", id])
        .await?;
    Ok(d.pointer("/Reservations/0/Instances/0/State/Name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned())
}

/// Polls DescribeInstances until `id` is in state `want`, for at most `within`; the error shows
/// the last state, the console and the agent's log.
async fn until_state(
    cloud: &GuestCloud,
    id: &str,
    want: &str,
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let state = state_of(cloud, id).await?;
        if state == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{id} is {state}, not {want}; console:\n{}\nagent:\n{}",
            cloud.console(id).await.unwrap_or_default(),
            cloud.agent.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_image_guests_print_their_metadata_and_user_data_on_the_console() -> anyhow::Result<()>
{
    let cloud = GuestCloud::start("guests").await?;
    // A kernel image boots nothing by itself: RunInstances of one says so.
    let images = cloud
        .aws(&["describe-images", "--image-ids", &cloud.image_id])
        .await?;
    let kernel = images
        .pointer("/Images/0/KernelId")
        .and_then(Value::as_str)
        .context("the micro image names no kernel")?
        .to_owned();
    let refused = cloud
        .aws(&[
            "run-instances",
            "--image-id",
            &kernel,
            "--instance-type",
            "t1.micro",
        ])
        .await;
    let why = format!(
        "{:#}",
        refused
            .err()
            .context("RunInstances of a kernel image succeeded")?
    );
    ensure!(
        why.contains("InvalidParameterValue") && why.contains("is a kernel image"),
        "{why}"
    );
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("script.sh");
    std::fs::write(&script, SCRIPT)?;
    let user_data = format!("file://{}", script.display());

    let key = cloud.aws(&["create-key-pair", "--key-name", "k"]).await?;
    ensure!(key.get("KeyMaterial").is_some(), "create-key-pair: {key}");
    let described = cloud
        .aws(&[
            "describe-key-pairs",
            "--key-names",
            "k",
            "--include-public-key",
        ])
        .await?;
    let public_key = described
        .pointer("/KeyPairs/0/PublicKey")
        .and_then(Value::as_str)
        .context("no public key")?
        .trim()
        .to_owned();

    // Two guests at once: one with tokens optional, one with tokens required.
    let started = Instant::now();
    let common = [
        "run-instances",
        "--image-id",
        &cloud.image_id,
        "--instance-type",
        "t1.micro",
        "--key-name",
        "k",
        "--user-data",
        &user_data,
    ];
    // The first serves its tags (InstanceMetadataTags), as a guest reads them from IMDS.
    let mut optional_args = common.to_vec();
    optional_args.extend([
        "--metadata-options",
        "InstanceMetadataTags=enabled",
        "--tag-specifications",
        "ResourceType=instance,Tags=[{Key=Name,Value=tagged-guest}]",
    ]);
    let optional = instance_id(&cloud.aws(&optional_args).await?)?;
    let mut required_args = common.to_vec();
    required_args.extend(["--metadata-options", "HttpTokens=required"]);
    let required = instance_id(&cloud.aws(&required_args).await?)?;

    let optional_console = console_when_ready(&cloud, &optional).await?;
    let required_console = console_when_ready(&cloud, &required).await?;
    eprintln!(
        "both guests ready {:?} after RunInstances; console of {optional}:\n{optional_console}",
        started.elapsed()
    );

    for (id, console, other) in [
        (&optional, &optional_console, &required),
        (&required, &required_console, &optional),
    ] {
        for line in [
            "karri-micro: imds: v2 token ok".to_owned(),
            format!("karri-micro: instance-id: {id}"),
            format!("karri-micro: public-key: {public_key}"),
            "karri-micro: user-data: running script".to_owned(),
            "user-data says hello from".to_owned(),
            "karri-micro: user-data: exit 0".to_owned(),
        ] {
            ensure!(
                console.contains(&line),
                "the console of {id} lacks {line:?}:\n{console}"
            );
        }
        ensure!(
            !console.contains(other.as_str()),
            "the console of {id} shows the other instance's ID {other}:\n{console}"
        );
    }
    ensure!(
        optional_console.contains("imdsv1: HTTP/1.0 200")
            || optional_console.contains("imdsv1: HTTP/1.1 200"),
        "a tokenless request is served when tokens are optional:\n{optional_console}"
    );
    ensure!(
        optional_console.contains("tag-name: tagged-guest"),
        "the guest that serves its tags reads its Name tag:\n{optional_console}"
    );
    ensure!(
        !required_console.contains("tagged-guest"),
        "the other guest has no such tag:\n{required_console}"
    );
    ensure!(
        required_console.contains("imdsv1: HTTP/1.0 401")
            || required_console.contains("imdsv1: HTTP/1.1 401"),
        "a tokenless request must be refused (401) when tokens are required:\n{required_console}"
    );

    // An address that is no instance's (the host side of the bridge) gets nothing.
    let out = cloud
        .host
        .exec([
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "http://169.254.169.254/latest/meta-data/instance-id",
        ])
        .output()?;
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        code == "403",
        "a caller that is no instance got HTTP {code}"
    );

    // Terminate: the domain and the overlay go.
    let overlay = cloud.data_dir.join("instances").join(&optional);
    ensure!(
        overlay.join("root.qcow2").exists(),
        "no overlay at {}",
        overlay.display()
    );
    cloud
        .aws(&["terminate-instances", "--instance-ids", &optional])
        .await?;
    let deadline = Instant::now() + DEADLINE;
    while state_of(&cloud, &optional).await? != "terminated" {
        ensure!(Instant::now() < deadline, "{optional} did not terminate");
        tokio::time::sleep(POLL).await;
    }
    let domains = cloud.host.virsh(["list", "--all", "--name"]).output()?;
    let domains = String::from_utf8_lossy(&domains.stdout);
    ensure!(
        !domains.contains(&optional),
        "the domain of {optional} is still defined: {domains}"
    );
    ensure!(
        domains.contains(&required),
        "the other guest's domain must stay: {domains}"
    );
    // As EC2 does on terminate, the guest was asked to shut down, and obeyed: no forced stop,
    // neither by its reconcile nor by the agent's sweep of domains.
    let domain = format!("karri-{optional}");
    let plans = plans_for(&cloud, &domain)?;
    ensure!(
        plans.iter().any(|l| l.contains("Shutdown"))
            && !plans.iter().any(|l| l.contains("Destroy")),
        "the terminated guest was not shut down gracefully:\n{}",
        plans.join("\n")
    );
    let log = std::fs::read_to_string(cloud.agent_log())?;
    let swept: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("removed a domain") && l.contains(&domain))
        .collect();
    ensure!(
        swept.is_empty(),
        "the sweep removed the terminated guest's domain:\n{}",
        swept.join("\n")
    );
    let deadline = Instant::now() + DEADLINE;
    while overlay.exists() {
        ensure!(
            Instant::now() < deadline,
            "the overlay {} is still there",
            overlay.display()
        );
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_micro_image_uploaded_to_s3_boots_a_guest_that_prints_ready() -> anyhow::Result<()> {
    let bucket = "karri-micro";
    let cloud = GuestCloud::start_with(
        "s3guest",
        ImageSource::S3 {
            bucket: bucket.to_owned(),
        },
    )
    .await?;
    let micro = cloud.micro.clone();
    let files = [
        ("vmlinuz", &micro.kernel),
        ("initrd.img", &micro.ramdisk),
        ("disk.img", &micro.disk),
    ];
    let described = cloud.aws(&["describe-images", "--owners", "self"]).await?;
    let mut locations: Vec<&str> = described["Images"]
        .as_array()
        .context("no Images")?
        .iter()
        .filter_map(|i| i["ImageLocation"].as_str())
        .collect();
    locations.sort_unstable();
    let mut want: Vec<String> = files
        .iter()
        .map(|(key, _)| format!("{bucket}/{key}"))
        .collect();
    want.sort_unstable();
    ensure!(
        locations == want,
        "the kernel, ramdisk and disk should be registered in S3: {described}"
    );

    let started = Instant::now();
    let id = run_micro(&cloud, &[]).await?;
    let console = console_when_ready(&cloud, &id).await?;
    let booted = started.elapsed();

    ensure!(
        console.contains(&format!("karri-micro: instance-id: {id}")),
        "the guest should print its instance ID:\n{console}"
    );
    let log = std::fs::read_to_string(cloud.agent_log())?;
    for (key, file) in files {
        let location = format!("{bucket}/{key}");
        let issued = log
            .lines()
            .filter(|l| l.contains("the gateway issued a presigned URL") && l.contains(&location))
            .count();
        ensure!(
            issued == 1,
            "the agent should have one presigned URL of {location}, not {issued}:\n{}",
            cloud.agent.log_tail()
        );
        let cached = cloud.data_dir.join("images/sha256").join(&file.sha256);
        let size = std::fs::metadata(&cached)
            .with_context(|| format!("{location} is not cached at {}", cached.display()))?
            .len();
        ensure!(
            size == file.size,
            "{location}: {size} bytes cached, not {}",
            file.size
        );
    }
    eprintln!(
        "[guests] {id} booted from s3://{bucket} and printed `karri-micro: ready` {booted:?} after \
         RunInstances; console:\n{console}"
    );
    Ok(())
}

/// The user-data script of a guest that tries to pass for another (`@VICTIM_IP@`,
/// `@VICTIM_MAC@`): it asks the metadata service for its instance ID as itself, then with the
/// victim's address (claimed with a gratuitous ARP), then with the victim's MAC and address, then
/// as itself again, printing one `spoof:` line for each answer.
const SPOOF_SCRIPT: &str = r#"#!/bin/sh
read -r IFC MYIP PREFIX GW < /run/karri-net
MYMAC=$(cat /sys/class/net/$IFC/address)
ask() {
    printf 'GET /latest/meta-data/instance-id HTTP/1.0\r\nHost: 169.254.169.254\r\n\r\n' \
        | timeout 8 nc -w 5 169.254.169.254 80 | tail -n 1
}
become() {
    ip link set dev $IFC down
    ip link set dev $IFC address $1
    ip link set dev $IFC up
    ip addr flush dev $IFC
    ip addr add $2/$PREFIX dev $IFC
    ip route add default via $GW dev $IFC
}
echo "spoof: own: $(ask)"
become $MYMAC @VICTIM_IP@
arping -U -c 1 -I $IFC @VICTIM_IP@ > /dev/null 2>&1
echo "spoof: address: $(ask)"
become @VICTIM_MAC@ @VICTIM_IP@
echo "spoof: mac and address: $(ask)"
become $MYMAC $MYIP
echo "spoof: back: $(ask)"
"#;

/// The line of `console` that starts with `prefix`, without it.
fn line_after<'a>(console: &'a str, prefix: &str) -> Option<&'a str> {
    console
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_takes_another_guests_address_and_mac_is_not_served_its_metadata(
) -> anyhow::Result<()> {
    let cloud = GuestCloud::start("spoof").await?;
    let run = [
        "run-instances",
        "--image-id",
        &cloud.image_id,
        "--instance-type",
        "t1.micro",
    ];
    let victim = instance_id(&cloud.aws(&run).await?)?;
    let deadline = Instant::now() + DEADLINE;
    let victim_ip = loop {
        let d = cloud
            .aws(&["describe-instances", "--instance-ids", &victim])
            .await?;
        if let Some(ip) = d
            .pointer("/Reservations/0/Instances/0/PrivateIpAddress")
            .and_then(Value::as_str)
        {
            break ip.parse::<std::net::Ipv4Addr>()?;
        }
        ensure!(Instant::now() < deadline, "{victim} got no private address");
        tokio::time::sleep(POLL).await;
    };
    let victim_mac = crds::subnet::mac_for(victim_ip);
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("spoof.sh");
    std::fs::write(
        &script,
        SPOOF_SCRIPT
            .replace("@VICTIM_IP@", &victim_ip.to_string())
            .replace("@VICTIM_MAC@", &victim_mac),
    )?;
    let user_data = format!("file://{}", script.display());
    let mut attack = run.to_vec();
    attack.extend(["--user-data", &user_data]);
    let attacker = instance_id(&cloud.aws(&attack).await?)?;

    let console = console_when_ready(&cloud, &attacker).await?;
    console_when_ready(&cloud, &victim).await?;
    eprintln!("console of {attacker} (victim {victim} at {victim_ip}, {victim_mac}):\n{console}");
    let answer = |prefix: &str| {
        line_after(&console, prefix)
            .map(str::trim)
            .with_context(|| format!("no {prefix:?} line on the console:\n{console}"))
    };
    ensure!(
        answer("spoof: own:")? == attacker,
        "not served as itself:\n{console}"
    );
    for attempt in ["spoof: address:", "spoof: mac and address:"] {
        let got = answer(attempt)?;
        ensure!(
            !got.contains(&victim),
            "{attacker} read {victim}'s metadata ({attempt} {got}):\n{console}"
        );
        ensure!(got.is_empty(), "{attempt} got an answer: {got}\n{console}");
    }
    ensure!(
        answer("spoof: back:")? == attacker,
        "not served as itself again:\n{console}"
    );
    Ok(())
}

/// The user-data script of a guest that powers itself off once it has said so.
const POWEROFF_SCRIPT: &str = "#!/bin/sh\necho \"user-data powers the guest off\"\npoweroff -f\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_powers_itself_off_is_stopped_not_booted_again() -> anyhow::Result<()> {
    let cloud = GuestCloud::start("poweroff").await?;
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("poweroff.sh");
    std::fs::write(&script, POWEROFF_SCRIPT)?;
    let user_data = format!("file://{}", script.display());
    let id = run_micro(&cloud, &["--user-data", &user_data]).await?;
    // As EC2 with instanceInitiatedShutdownBehavior `stop`: the instance ends up stopped
    // (one guest boots in well under a minute; the agent looks again every resync).
    until_state(&cloud, &id, "stopped", 2 * DEADLINE).await?;
    let console = cloud.console(&id).await?;
    ensure!(
        console.contains("user-data powers the guest off"),
        "the guest did not get to power itself off:\n{console}"
    );
    let domain = format!("karri-{id}");
    let shown = cloud.host.virsh(["domstate", &domain]).output()?;
    let shown = String::from_utf8_lossy(&shown.stdout);
    ensure!(
        shown.trim() == "shut off",
        "the domain of {id} is {shown:?}"
    );
    // EC2 tells the guest's own shutdown from a stop its owner asked for.
    let described = cloud
        .aws(&["describe-instances", "--instance-ids", &id])
        .await?;
    let reason = described.pointer("/Reservations/0/Instances/0/StateReason/Code");
    ensure!(
        reason.and_then(Value::as_str) == Some("Client.InstanceInitiatedShutdown"),
        "the state reason of {id} is {reason:?}"
    );
    // A start boots it again.
    cloud
        .aws(&["start-instances", "--instance-ids", &id])
        .await?;
    until_state(&cloud, &id, "running", DEADLINE).await?;
    Ok(())
}

/// The instance status check DescribeInstanceStatus shows for `id` (`""` while none).
async fn instance_status_of(cloud: &GuestCloud, id: &str) -> anyhow::Result<String> {
    let d = cloud
        .aws(&["describe-instance-status", "--instance-ids", id])
        .await?;
    Ok(d.pointer("/InstanceStatuses/0/InstanceStatus/Status")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned())
}

/// Polls until DescribeInstanceStatus shows `id` with instance status `want`.
async fn until_instance_status(cloud: &GuestCloud, id: &str, want: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let shown = instance_status_of(cloud, id).await?;
        if shown == want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the instance status of {id} is {shown:?}, not {want:?}; agent:\n{}",
            cloud.agent.log_tail()
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_guest_stays_running_with_an_impaired_status_until_it_is_resumed(
) -> anyhow::Result<()> {
    let cloud = GuestCloud::start("paused").await?;
    let id = run_micro(&cloud, &[]).await?;
    until_instance_status(&cloud, &id, "ok").await?;
    let domain = format!("karri-{id}");
    let suspended = cloud.host.virsh(["suspend", &domain]).output()?;
    ensure!(
        suspended.status.success(),
        "virsh suspend {domain}: {}",
        String::from_utf8_lossy(&suspended.stderr)
    );
    until_instance_status(&cloud, &id, "impaired").await?;
    ensure!(
        state_of(&cloud, &id).await? == "running",
        "a paused instance is still running in EC2's terms"
    );
    // The agent leaves a paused domain paused (libvirt pauses one whose disk fails), and
    // reports it again once it runs.
    let resumed = cloud.host.virsh(["resume", &domain]).output()?;
    ensure!(
        resumed.status.success(),
        "virsh resume {domain}: {}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    until_instance_status(&cloud, &id, "ok").await?;
    Ok(())
}

/// The plans the agent applied to `domain`, from its log.
fn plans_for(cloud: &GuestCloud, domain: &str) -> anyhow::Result<Vec<String>> {
    let log = std::fs::read_to_string(cloud.agent_log())?;
    Ok(log
        .lines()
        .filter(|l| l.contains("applying plan") && l.contains(domain))
        .map(str::to_owned)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_stop_destroys_the_domain_without_asking_the_guest_first() -> anyhow::Result<()> {
    let cloud = GuestCloud::start("forcestop").await?;
    let id = run_micro(&cloud, &[]).await?;
    until_instance_status(&cloud, &id, "ok").await?;
    cloud
        .aws(&["stop-instances", "--instance-ids", &id, "--force"])
        .await?;
    until_state(&cloud, &id, "stopped", DEADLINE).await?;
    // The agent's plans for the domain: a forced stop is a destroy, with no power button first.
    let domain = format!("karri-{id}");
    let plans = plans_for(&cloud, &domain)?;
    ensure!(
        plans.iter().any(|l| l.contains("Destroy")),
        "no destroy of {domain}:\n{}",
        plans.join("\n")
    );
    ensure!(
        !plans.iter().any(|l| l.contains("Shutdown")),
        "the guest of {domain} was asked to shut down first:\n{}",
        plans.join("\n")
    );
    // A start afterwards is an ordinary start.
    cloud
        .aws(&["start-instances", "--instance-ids", &id])
        .await?;
    until_state(&cloud, &id, "running", DEADLINE).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_whose_record_is_deleted_behind_the_agent_is_shut_down_before_its_domain_goes(
) -> anyhow::Result<()> {
    use kube::api::{Api, DeleteParams, Patch, PatchParams};
    let mut cloud = GuestCloud::start("orphan").await?;
    let id = run_micro(&cloud, &[]).await?;
    until_instance_status(&cloud, &id, "ok").await?;
    // While the agent is down, an administrator removes the record outright (deleted, then its
    // finalizers dropped), so that no reconcile of the agent ever takes leave of the guest:
    // when the agent is back, its domain is an orphan.
    cloud.agent.kill();
    let api: Api<crds::Instance> =
        Api::namespaced(cloud.client.clone(), karri_e2e::guests::ACCOUNT);
    api.delete(&id, &DeleteParams::default()).await?;
    api.patch(
        &id,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
    )
    .await?;
    ensure!(
        api.get_opt(&id).await?.is_none(),
        "the record of {id} is still there"
    );
    let domain = format!("karri-{id}");
    let listed = cloud.host.virsh(["list", "--name"]).output()?;
    ensure!(
        String::from_utf8_lossy(&listed.stdout).contains(&domain),
        "the guest of {domain} stopped with the agent"
    );
    cloud.agent.restart()?;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let listed = cloud.host.virsh(["list", "--all", "--name"]).output()?;
        if !String::from_utf8_lossy(&listed.stdout).contains(&domain) {
            break;
        }
        ensure!(Instant::now() < deadline, "the orphan {domain} stayed");
        tokio::time::sleep(POLL).await;
    }
    // The sweep pressed the power button, the guest obeyed, and its domain was removed
    // without being forced off.
    let log = std::fs::read_to_string(cloud.agent_log())?;
    let lines = |what: &str| -> Vec<&str> {
        log.lines()
            .filter(|l| l.contains(what) && l.contains(&domain))
            .collect()
    };
    ensure!(
        !lines("asked the guest of a domain no instance on the node owns to shut down").is_empty(),
        "the orphan's guest was not asked to shut down:\n{log}"
    );
    let removed = lines("removed a domain no instance on the node owns");
    ensure!(
        removed.len() == 1 && !removed[0].contains("Destroy"),
        "the orphan was not removed once, without a forced stop: {removed:?}"
    );
    ensure!(
        plans_for(&cloud, &domain)?
            .iter()
            .all(|l| !l.contains("Destroy") && !l.contains("Shutdown")),
        "a reconcile of the deleted record acted on the orphan"
    );
    Ok(())
}
