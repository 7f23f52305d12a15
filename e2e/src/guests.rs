//! A cloud whose node boots real guests: etcd, the gateway, the operator and one node agent whose
//! host is a simulated one ([`SimHost`]: a network namespace with its own libvirtd, bridge, DHCP
//! and metadata service), and the micro image built from Debian packages and registered as the
//! EKI/ERI/EMI triple of an account: by the paths of its files on the node, or uploaded to a
//! bucket of the gateway's S3 with `karri image register --bucket` ([`ImageSource::S3`]), which
//! the node fetches through presigned URLs. Used by the guest e2e tests and the `bench-guests`
//! benchmark.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use crds::common::find_condition;
use crds::{ConditionStatus, Image, Node, CONDITION_READY, ID_LABEL};
use karri_testkit::{
    kubectl_ok, random_token, workspace_root, AwsCredentials, Etcd, Gateway, Service, SimHost,
    Tokens,
};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use serde_json::json;
use tempfile::TempDir;
use tokio::time::Instant;

/// Availability zone of the node.
pub const ZONE: &str = "karri-1a";
/// The account that runs the guests.
pub const ACCOUNT: &str = "guests";
/// How long the node gets to become Ready.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How often conditions are polled.
const POLL: Duration = Duration::from_millis(100);

/// One file of the micro image.
#[derive(Clone, Debug)]
pub struct ImageFile {
    /// Absolute path.
    pub path: PathBuf,
    /// SHA-256, lower-case hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The micro image: kernel, ramdisk and root disk.
#[derive(Clone, Debug)]
pub struct MicroImage {
    /// The kernel (`vmlinuz`).
    pub kernel: ImageFile,
    /// The busybox initramfs (`initrd.img`).
    pub ramdisk: ImageFile,
    /// The root disk (`disk.img`, raw).
    pub disk: ImageFile,
}

/// Builds the micro image once (cached under `target/karri-micro-image`) and reads its manifest.
pub fn micro_image() -> anyhow::Result<MicroImage> {
    let root = workspace_root();
    let dir = root.join("target").join("karri-micro-image");
    let out = Command::new("bash")
        .arg(root.join("scripts/build-micro-image.sh"))
        .arg(&dir)
        .output()
        .context("running scripts/build-micro-image.sh")?;
    ensure!(
        out.status.success(),
        "building the micro image failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest = std::fs::read_to_string(dir.join("manifest")).context("reading the manifest")?;
    let file = |name: &str| -> anyhow::Result<ImageFile> {
        let line = manifest
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .with_context(|| format!("the manifest lists no {name}"))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        ensure!(fields.len() == 3, "bad manifest line {line:?}");
        Ok(ImageFile {
            path: dir.join(name),
            sha256: fields[1].to_owned(),
            size: fields[2].parse().context("manifest size")?,
        })
    };
    Ok(MicroImage {
        kernel: file("vmlinuz")?,
        ramdisk: file("initrd.img")?,
        disk: file("disk.img")?,
    })
}

/// Where the registered micro image's files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// Their paths on the node (the build directory).
    NodePath,
    /// Uploaded by `karri image register --bucket <bucket>` as the account; their locations are
    /// `<bucket>/vmlinuz`, `<bucket>/initrd.img` and `<bucket>/disk.img`.
    S3 {
        /// The bucket (created by the upload).
        bucket: String,
    },
}

/// A cloud with one simulated host that boots real guests.
pub struct GuestCloud {
    /// The node agent.
    pub agent: Service,
    /// The operator.
    pub operator: Service,
    /// The simulated host (stopped on drop, after the services).
    pub host: SimHost,
    /// The gateway.
    pub gateway: Gateway,
    /// Its etcd.
    pub etcd: Etcd,
    /// Tokens of admin, operator and the node.
    pub tokens: Tokens,
    /// Admin kube client.
    pub client: Client,
    /// Admin kubeconfig.
    pub admin: PathBuf,
    /// Name of the node.
    pub node: String,
    /// The account's 12-digit ID.
    pub account_id: String,
    /// The account's AWS credentials.
    pub credentials: AwsCredentials,
    /// The registered machine image (`emi-`), which names its kernel and ramdisk.
    pub image_id: String,
    /// The micro image's files.
    pub micro: MicroImage,
    /// Where the registered images' files are.
    pub source: ImageSource,
    /// The node agent's data directory (image cache, overlays, console logs).
    pub data_dir: PathBuf,
    _dirs: TempDir,
}

async fn kube_client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("a non-UTF-8 path")
}

/// Registers one image file in `ns`; returns its ID.
pub async fn register(
    client: &Client,
    ns: &str,
    name: &str,
    image_type: &str,
    file: &ImageFile,
    extra: serde_json::Value,
) -> anyhow::Result<String> {
    let mut spec = json!({
        "name": name,
        "imageType": image_type,
        "imageLocation": file.path.display().to_string(),
        "checksumSha256": file.sha256,
        "sizeBytes": file.size,
        "format": "raw",
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    let image: Image = serde_json::from_value(json!({
        "apiVersion": "karri.dev/v1alpha1",
        "kind": "Image",
        "metadata": {"name": name},
        "spec": spec,
    }))?;
    let api: Api<Image> = Api::namespaced(client.clone(), ns);
    let made = api
        .create(&PostParams::default(), &image)
        .await
        .with_context(|| format!("registering {name}"))?;
    made.labels()
        .get(ID_LABEL)
        .cloned()
        .context("the image got no ID")
}

/// Registers the micro image's files by their paths on the node; the machine image's ID.
async fn register_paths(client: &Client, micro: &MicroImage) -> anyhow::Result<String> {
    let kernel = register(
        client,
        ACCOUNT,
        "micro-kernel",
        "kernel",
        &micro.kernel,
        json!({}),
    )
    .await?;
    let ramdisk = register(
        client,
        ACCOUNT,
        "micro-ramdisk",
        "ramdisk",
        &micro.ramdisk,
        json!({}),
    )
    .await?;
    register(
        client,
        ACCOUNT,
        "micro",
        "machine",
        &micro.disk,
        json!({"kernelId": kernel, "ramdiskId": ramdisk}),
    )
    .await
}

/// Uploads the micro image's files to `bucket` with `karri image register --bucket` as the
/// account of `creds` and registers them (admin kubeconfig `admin`); the machine image's ID.
async fn register_in_s3(
    gateway: &Gateway,
    creds: &AwsCredentials,
    admin: &Path,
    micro: &MicroImage,
    bucket: &str,
) -> anyhow::Result<String> {
    let register = async |file: &ImageFile, extra: &[&str]| {
        let mut args = vec![
            "--file",
            path_str(&file.path)?,
            "--bucket",
            bucket,
            "--namespace",
            ACCOUNT,
        ];
        args.extend_from_slice(extra);
        let registered = crate::karri::image_register(gateway, creds, admin, &args).await?;
        eprintln!("[guests] {}", registered.stderr.trim());
        anyhow::Ok(registered.id)
    };
    let kernel = register(
        &micro.kernel,
        &["--type", "kernel", "--name", "micro-kernel"],
    )
    .await?;
    let ramdisk = register(
        &micro.ramdisk,
        &["--type", "ramdisk", "--name", "micro-ramdisk"],
    )
    .await?;
    register(
        &micro.disk,
        &[
            "--name",
            "micro",
            "--kernel-id",
            &kernel,
            "--ramdisk-id",
            &ramdisk,
        ],
    )
    .await
}

impl GuestCloud {
    /// Builds the micro image, starts everything, registers the image triple in the account's
    /// namespace by the files' paths on the node and waits until the node is Ready.
    pub async fn start(label: &str) -> anyhow::Result<GuestCloud> {
        Self::start_with(label, ImageSource::NodePath).await
    }

    /// [`GuestCloud::start`] with the image triple's files where `source` says.
    pub async fn start_with(label: &str, source: ImageSource) -> anyhow::Result<GuestCloud> {
        let micro = tokio::task::spawn_blocking(micro_image).await??;
        let mut dirs = tempfile::Builder::new()
            .prefix(&format!("karri-{label}-"))
            .tempdir()?;
        if std::env::var_os("KARRI_KEEP_LOGS").is_some() {
            dirs.disable_cleanup(true);
            eprintln!("[guests] logs and data kept in {}", dirs.path().display());
        }
        let node = format!("{label}-{}", &random_token()[..8]);
        let host = {
            let hint = label.to_owned();
            tokio::task::spawn_blocking(move || SimHost::start(&hint)).await??
        };
        let etcd = Etcd::start().await?;
        let tokens = Tokens::generate(&[&node], &[]);
        let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
        let admin = gateway.kubeconfig(&tokens.admin, "default")?;
        let samples = workspace_root().join("config").join("samples");
        for sample in ["availability-zone.yaml", "instance-type.yaml"] {
            kubectl_ok(&admin, &["apply", "-f", path_str(&samples.join(sample))?])?;
        }
        let client = kube_client(&admin).await?;
        let (account_id, credentials) = gateway.account_with_key(&tokens.admin, ACCOUNT).await?;
        let image_id = match &source {
            ImageSource::NodePath => register_paths(&client, &micro).await?,
            ImageSource::S3 { bucket } => {
                register_in_s3(&gateway, &credentials, &admin, &micro, bucket).await?
            }
        };

        let logs = dirs.path().join("logs");
        let data_dir = dirs.path().join("data");
        std::fs::create_dir_all(&logs)?;
        std::fs::create_dir_all(&data_dir)?;
        let envs = [("RUST_LOG".to_owned(), "info,node_agent=debug".to_owned())];
        let operator_kc = gateway.kubeconfig(&tokens.operator, "default")?;
        let operator = Service::spawn(
            "operator",
            "operator",
            &logs,
            &strings(&[
                "--kubeconfig",
                path_str(&operator_kc)?,
                "--metrics-listen",
                "127.0.0.1:0",
                "--leader-lease-seconds",
                "3",
            ]),
            &envs,
        )?;
        let node_kc =
            gateway.kubeconfig(tokens.node(&node).context("no node token")?, "default")?;
        let agent = Service::spawn(
            "node-agent",
            "node-agent",
            &logs,
            &strings(&[
                "--kubeconfig",
                path_str(&node_kc)?,
                "--node-name",
                &node,
                "--zone",
                ZONE,
                "--libvirt-uri",
                host.uri(),
                // The simulated host's libvirtd takes 32 requests of a client at once.
                "--libvirt-max-calls",
                "31",
                "--guest-netns",
                host.netns(),
                // KVM opens on these machines but hangs guest kernels (nested virtualisation).
                "--domain-type",
                "qemu",
                "--data-dir",
                path_str(&data_dir)?,
                "--metrics-listen",
                "127.0.0.1:0",
                "--vcpus",
                "32",
                "--memory-mib",
                "8192",
                "--disk-gib",
                "100",
                "--resync-seconds",
                "5",
            ]),
            &envs,
        )?;
        let mut cloud = GuestCloud {
            agent,
            operator,
            host,
            gateway,
            etcd,
            tokens,
            client,
            admin,
            node,
            account_id,
            credentials,
            image_id,
            micro,
            source,
            data_dir,
            _dirs: dirs,
        };
        cloud.wait_node_ready().await?;
        Ok(cloud)
    }

    async fn wait_node_ready(&mut self) -> anyhow::Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(node) = nodes.get_opt(&self.node).await? {
                let ready = node
                    .status
                    .as_ref()
                    .and_then(|s| find_condition(&s.conditions, CONDITION_READY))
                    .is_some_and(|c| c.status == ConditionStatus::True);
                if ready {
                    return Ok(());
                }
            }
            if !self.agent.running() {
                bail!("the node agent exited:\n{}", self.agent.log_tail());
            }
            if Instant::now() > deadline {
                bail!(
                    "the node did not become Ready in {READY_TIMEOUT:?}:\n{}",
                    self.agent.log_tail()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The node agent's log file.
    pub fn agent_log(&self) -> PathBuf {
        self._dirs.path().join("logs").join("node-agent.log")
    }

    /// `aws ec2 <args> --output json` as the account, which must succeed: its JSON answer.
    pub async fn aws(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let args: Vec<&str> = std::iter::once("ec2").chain(args.iter().copied()).collect();
        self.gateway.aws(&self.credentials, &args).await
    }

    /// The decoded console output of `instance` as GetConsoleOutput gives it ("" while none).
    pub async fn console(&self, instance: &str) -> anyhow::Result<String> {
        let out = self
            .aws(&["get-console-output", "--instance-id", instance])
            .await?;
        Ok(out
            .get("Output")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned())
    }
}

impl Drop for GuestCloud {
    fn drop(&mut self) {
        // The agent and operator go first, so that nothing recreates domains while the host
        // is stopped (SimHost's own drop destroys what is left).
        self.agent.kill();
        self.operator.kill();
    }
}
