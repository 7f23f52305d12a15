//! What turns an instance record into a bootable guest on this node: its images fetched into the
//! cache and a copy-on-write overlay of its root disk, its kernel command line, its NIC on the
//! node's guest bridge with a DHCP host entry, its console log file, and its entry in the
//! metadata service's directory. Everything here is undone when the instance leaves the node.
//!
//! [`metadata_of`] and [`artifacts_of`] are pure; the rest touches files and processes.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use crds::{
    DiskImageFormat, HttpEndpoint, HttpTokens, ImageArtifact, Instance, InstanceMetadataTags,
    ID_LABEL,
};
use kube::ResourceExt;

use crate::console;
use crate::domain::{DiskFormat, DiskSpec, KernelBoot, NicSpec};
use crate::guestnet::Dhcp;
use crate::images::{self, CacheError, ImageCache, ImageSource};
use crate::imds::{self, InstanceMetadata};
use crate::portguard::{Mark, PortGuard, PortGuardError};

/// Default kernel command line of directly booted kernels.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// Why a guest cannot be prepared.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// An image could not be fetched or verified: the instance fails with this reason.
    #[error("image {image_id}: {reason}")]
    Image {
        /// The image's ID.
        image_id: String,
        /// What went wrong, with its causes.
        reason: String,
    },
    /// A file or directory of the instance could not be made or removed; try again.
    #[error("cannot {action} {}", .path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The overlay or another file could not be made; try again.
    #[error("{0}")]
    Files(#[source] CacheError),
    /// The DHCP host entry could not be written; try again.
    #[error("the DHCP host entry: {0}")]
    Dhcp(String),
    /// The guest's tap could not be guarded (or forgotten); try again.
    #[error("the port guard: {0}")]
    Ports(#[source] PortGuardError),
    /// An image could not be fetched for a reason that may pass (the network, the gateway, a
    /// full disk); try again, until [`FETCH_GIVE_UP`] after the first such failure.
    #[error("image {image_id} (will try again): {reason}")]
    Fetch {
        /// The image's ID.
        image_id: String,
        /// What went wrong, with its causes.
        reason: String,
    },
}

/// How long fetches of one image may keep failing for reasons that may pass before the
/// instances that need it fail for good.
pub const FETCH_GIVE_UP: std::time::Duration = std::time::Duration::from_secs(300);

impl GuestError {
    /// Whether the instance fails for good (a bad or missing image) rather than being retried.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Image { .. })
    }
}

/// The guest network of the node: its bridge, DHCP server and metadata directory.
pub struct GuestNetwork {
    /// Bridge guests join.
    pub bridge: String,
    /// DHCP server handing each guest its address.
    pub dhcp: tokio::sync::Mutex<Dhcp>,
    /// The guard that lets each guest's tap carry only its own MAC and address.
    pub ports: PortGuard,
    /// The metadata service's instances.
    pub directory: imds::Directory,
    /// Region of the node's zone, for metadata.
    pub region: String,
    /// CIDR of the node's zone subnet, for metadata.
    pub subnet_cidr: String,
}

/// The node's guest facilities.
pub struct Guests {
    cache: ImageCache,
    instance_dir: PathBuf,
    console_dir: PathBuf,
    cmdline: String,
    network: Option<GuestNetwork>,
    /// The cached images (sha256) each live instance's overlay or boot needs, by instance ID.
    bases: Arc<Mutex<HashMap<String, HashSet<String>>>>,
    /// Since when each image location's fetches have been failing for passing reasons.
    failing_since: Mutex<HashMap<String, (std::time::Instant, std::time::Instant)>>,
}

/// The parts of a domain a guest needs, for [`crate::domain::DomainSpec`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prepared {
    /// Root disk overlay.
    pub disk: Option<DiskSpec>,
    /// Directly booted kernel.
    pub kernel: Option<KernelBoot>,
    /// NIC on the guest bridge.
    pub nic: Option<NicSpec>,
    /// Console log file.
    pub console_log: Option<String>,
}

/// An error and its causes in one line: `a: b: c`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        next = cause.source();
    }
    text
}

fn disk_format(f: DiskImageFormat) -> DiskFormat {
    match f {
        DiskImageFormat::Raw => DiskFormat::Raw,
        DiskImageFormat::Qcow2 => DiskFormat::Qcow2,
    }
}

/// The image source of an artifact.
pub fn source_of(a: &ImageArtifact) -> ImageSource {
    ImageSource {
        location: a.location.clone(),
        sha256: a.sha256.clone(),
        format: disk_format(a.format),
    }
}

/// The pinned SHA-256s of an `images.pinned` file, by role (lines that are not `<role> <64 hex>`
/// are skipped).
pub fn parse_pinned(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (role, sha256) = line.trim().split_once(' ')?;
            let valid = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
            valid.then(|| (role.to_owned(), sha256.to_ascii_lowercase()))
        })
        .collect()
}

/// `artifact` as a launched instance fetches it: an image registered without a SHA-256 is
/// taken as the bytes it was first fetched as (`pinned`), from the cache, instead of being
/// downloaded again at every start (and failing or differing once its source is gone or
/// replaced).
pub fn as_pinned(artifact: &ImageArtifact, pinned: Option<&String>) -> ImageArtifact {
    let mut a = artifact.clone();
    if a.sha256.is_none() {
        a.sha256 = pinned.cloned();
    }
    a
}

/// The artifacts of an instance's launch: root, kernel, ramdisk (each when present).
pub fn artifacts_of(instance: &Instance) -> [Option<&ImageArtifact>; 3] {
    let launch = instance.status.as_ref().and_then(|s| s.launch.as_ref());
    [
        launch.and_then(|l| l.root.as_ref()),
        launch.and_then(|l| l.kernel.as_ref()),
        launch.and_then(|l| l.ramdisk.as_ref()),
    ]
}

/// Whether the metadata service answers for the instance: while it is asked to run.
pub fn serves_metadata(instance: &Instance) -> bool {
    instance.spec.desired_state == crds::DesiredState::Running
        && instance.metadata.deletion_timestamp.is_none()
}

/// Whether the metadata service answers for the instance whose domain is (or is not) still
/// active: while it is asked to run, and while its domain still shuts down. Pure.
pub fn publishes_metadata(instance: &Instance, domain_active: bool) -> bool {
    serves_metadata(instance) || domain_active
}

/// The instance's address and MAC, when the operator gave it one.
pub fn address_of(instance: &Instance) -> Option<(Ipv4Addr, String)> {
    let status = instance.status.as_ref()?;
    let ip = status.private_ip_address.as_deref()?.parse().ok()?;
    let mac = status
        .mac_address
        .clone()
        .unwrap_or_else(|| crds::subnet::mac_for(ip));
    Some((ip, mac))
}

/// What the metadata service serves for `instance`; `None` while it has no address.
pub fn metadata_of(
    instance: &Instance,
    region: &str,
    subnet_cidr: &str,
) -> Option<InstanceMetadata> {
    let (ip, mac) = address_of(instance)?;
    let status = instance.status.as_ref()?;
    let spec = &instance.spec;
    let launch = status.launch.clone().unwrap_or_default();
    let options = spec.metadata_options.clone().unwrap_or_default();
    let public_keys = match (&spec.key_name, &launch.public_key) {
        (Some(name), Some(key)) => vec![(name.clone(), key.clone())],
        _ => Vec::new(),
    };
    let user_data = spec
        .user_data
        .as_deref()
        .and_then(|u| crds::decode_user_data(u).ok());
    Some(InstanceMetadata {
        instance_id: instance.labels().get(ID_LABEL)?.clone(),
        image_id: spec.image_id.clone(),
        instance_type: spec.instance_type.clone(),
        account_id: launch.account_id.clone().unwrap_or_default(),
        region: region.to_owned(),
        availability_zone: status.availability_zone.clone().unwrap_or_default(),
        local_ipv4: ip,
        mac,
        hostname: status
            .private_dns_name
            .clone()
            .unwrap_or_else(|| crds::subnet::private_dns_name(ip, region)),
        reservation_id: spec.reservation_id.clone().unwrap_or_default(),
        launch_index: spec.launch_index.unwrap_or(0),
        kernel_id: launch.kernel.as_ref().map(|k| k.image_id.clone()),
        ramdisk_id: launch.ramdisk.as_ref().map(|r| r.image_id.clone()),
        public_keys,
        user_data,
        launch_time: status
            .launch_time
            .as_ref()
            .or(instance.metadata.creation_timestamp.as_ref())
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        security_groups: spec.security_group_ids.clone(),
        subnet_cidr: launch.subnet_cidr.unwrap_or_else(|| subnet_cidr.to_owned()),
        http_tokens_required: options.http_tokens == HttpTokens::Required,
        http_endpoint_enabled: options.http_endpoint == HttpEndpoint::Enabled,
        hop_limit: options.http_put_response_hop_limit.unwrap_or(1),
        tags: (options.instance_metadata_tags == InstanceMetadataTags::Enabled).then(|| {
            spec.tags
                .iter()
                .map(|t| (t.key.clone(), t.value.clone()))
                .collect()
        }),
    })
}

impl Guests {
    /// Guest facilities over `cache`, with overlays under `instance_dir`, console logs under
    /// `console_dir`, and the guest network when the node has one.
    pub fn new(
        cache: ImageCache,
        instance_dir: PathBuf,
        console_dir: PathBuf,
        cmdline: String,
        network: Option<GuestNetwork>,
    ) -> Self {
        let bases: Arc<Mutex<HashMap<String, HashSet<String>>>> = Arc::default();
        let needed = bases.clone();
        // Eviction after a fetch keeps what live instances boot from.
        let cache = cache.with_in_use(move || {
            let bases = needed.lock().unwrap_or_else(PoisonError::into_inner);
            bases.values().flatten().cloned().collect()
        });
        Self {
            cache,
            instance_dir,
            console_dir,
            cmdline,
            network,
            bases,
            failing_since: Mutex::default(),
        }
    }

    /// The console log file of the instance `id`.
    pub fn console_log(&self, id: &str) -> PathBuf {
        console::log_path(&self.console_dir, id)
    }

    /// The overlay of the instance `id`'s root disk.
    fn overlay(&self, id: &str) -> PathBuf {
        self.instance_dir.join(id).join("root.qcow2")
    }

    /// The cached images live instances need; eviction keeps them.
    pub fn in_use(&self) -> HashSet<String> {
        let bases = self.bases.lock().unwrap_or_else(PoisonError::into_inner);
        bases.values().flatten().cloned().collect()
    }

    /// Marks the cached image `sha256` as needed by the instance `id`.
    fn hold(&self, id: &str, sha256: &str) {
        let mut bases = self.bases.lock().unwrap_or_else(PoisonError::into_inner);
        bases
            .entry(id.to_owned())
            .or_default()
            .insert(sha256.to_owned());
    }

    /// Marks the images the instance's launch names (by their SHA-256) as needed by the
    /// instance `id`, without fetching: an agent that restarted adopts the domains it finds
    /// without preparing them again, and eviction must still keep what they boot from.
    pub fn hold_images_of(&self, instance: &Instance, id: &str) {
        for artifact in artifacts_of(instance).into_iter().flatten() {
            if let Some(sha256) = &artifact.sha256 {
                self.hold(id, sha256);
            }
        }
        // Images declared without a SHA-256 are known by the one `prepare` wrote down.
        if let Ok(held) = std::fs::read_to_string(self.held_file(id)) {
            for sha256 in held.split_whitespace() {
                self.hold(id, sha256);
            }
        }
    }

    /// Where `prepare` writes down the cached images an instance boots from.
    fn held_file(&self, id: &str) -> PathBuf {
        self.instance_dir.join(id).join("images.held")
    }

    /// Where `prepare` writes down the SHA-256 of the bytes each of the instance's images was
    /// first fetched as (`<role> <sha256>` lines; roles `root`, `kernel`, `ramdisk`).
    fn pinned_file(&self, id: &str) -> PathBuf {
        self.instance_dir.join(id).join("images.pinned")
    }

    /// The SHA-256s pinned for instance `id`, by role; none before its first launch.
    async fn pinned(&self, id: &str) -> HashMap<String, String> {
        tokio::fs::read_to_string(self.pinned_file(id))
            .await
            .map(|text| parse_pinned(&text))
            .unwrap_or_default()
    }

    /// Writes down what instance `id`'s images were fetched as, aside and renamed.
    async fn write_pinned(&self, id: &str, pinned: &[(&str, String)]) -> Result<(), GuestError> {
        let path = self.pinned_file(id);
        let part = path.with_extension("pinned.part");
        let text: String = pinned
            .iter()
            .map(|(role, sha256)| format!("{role} {sha256}\n"))
            .collect();
        tokio::fs::write(&part, text)
            .await
            .map_err(|source| GuestError::Io {
                action: "write",
                path: part.clone(),
                source,
            })?;
        tokio::fs::rename(&part, &path)
            .await
            .map_err(|source| GuestError::Io {
                action: "rename",
                path,
                source,
            })
    }

    /// Writes down the cached images instance `id` holds, for [`Guests::hold_images_of`]
    /// after an agent restart.
    async fn write_held(&self, id: &str) -> Result<(), GuestError> {
        let held: Vec<String> = {
            let bases = self.bases.lock().unwrap_or_else(PoisonError::into_inner);
            bases
                .get(id)
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default()
        };
        let path = self.held_file(id);
        let io = |action: &'static str, path: PathBuf| {
            move |source| GuestError::Io {
                action,
                path,
                source,
            }
        };
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io("create", dir.to_path_buf()))?;
        }
        // Written aside and renamed: a crash leaves the old list or the new one, never half.
        let part = path.with_extension("held.part");
        tokio::fs::write(&part, held.join("\n"))
            .await
            .map_err(io("write", part.clone()))?;
        tokio::fs::rename(&part, &path)
            .await
            .map_err(io("rename", path.clone()))
    }

    /// Fetches an image of instance `instance` (`<namespace>/<name>`), `pin` the SHA-256 it
    /// was fetched as at the instance's launch; `launched` when the instance has launched
    /// before (its disk may hold data), whose fetch failures are never permanent: a failed
    /// launch terminates the instance and deletes its disk, and an image gone since its launch
    /// (or a blob, a permission) must not cost the owner that disk.
    ///
    /// An instance that launched from the pinned image uses any cached copy of it; any other
    /// use of an image in S3 is first asked about for this instance (its image's owner may
    /// read the object), cached or not.
    async fn fetch(
        &self,
        artifact: &ImageArtifact,
        pin: Option<&String>,
        launched: bool,
        instance: &str,
    ) -> Result<images::CachedImage, GuestError> {
        let a = &as_pinned(artifact, pin);
        let source = source_of(a);
        let fetched = if launched && pin.is_some() && a.sha256.as_ref() == pin {
            self.cache.get_pinned(&source).await
        } else {
            match self.cache.authorize(&a.location, instance).await {
                Ok(url) => self.cache.get_authorized(&source, url).await,
                Err(e) => Err(e),
            }
        };
        let mut failing = self
            .failing_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match fetched {
            Ok(image) => {
                failing.remove(&a.location);
                Ok(image)
            }
            Err(e) => {
                let run = failure_run(failing.get(&a.location).copied(), std::time::Instant::now());
                failing.insert(a.location.clone(), run);
                let since = run.0;
                let (image_id, reason) = (a.image_id.clone(), chain(&e));
                if !launched && (e.is_permanent() || since.elapsed() >= FETCH_GIVE_UP) {
                    failing.remove(&a.location);
                    Err(GuestError::Image { image_id, reason })
                } else {
                    Err(GuestError::Fetch { image_id, reason })
                }
            }
        }
    }

    /// [`Guests::fetch`] of `artifact`, if there is one, held for instance `id` as soon as it
    /// is in the cache: the cache evicts after each fetch whatever no instance holds, which
    /// would otherwise include an image of this instance fetched at the same time.
    async fn fetch_if(
        &self,
        id: &str,
        artifact: Option<&ImageArtifact>,
        pin: Option<&String>,
        launched: bool,
        instance: &str,
    ) -> Result<Option<images::CachedImage>, GuestError> {
        let Some(a) = artifact else {
            return Ok(None);
        };
        let image = self.fetch(a, pin, launched, instance).await?;
        self.hold(id, &image.sha256);
        Ok(Some(image))
    }

    /// Fetches the instance's images, makes its overlay and network entries, and returns the
    /// domain parts. Idempotent.
    pub async fn prepare(&self, instance: &Instance, id: &str) -> Result<Prepared, GuestError> {
        let [root, kernel, ramdisk] = artifacts_of(instance);
        tokio::fs::create_dir_all(&self.console_dir)
            .await
            .map_err(|source| GuestError::Io {
                action: "create",
                path: self.console_dir.clone(),
                source,
            })?;
        let mut prepared = Prepared {
            console_log: Some(self.console_log(id).to_string_lossy().into_owned()),
            ..Prepared::default()
        };
        // Written at the end of every preparation that succeeded: the instance launched.
        let launched = tokio::fs::try_exists(self.held_file(id))
            .await
            .unwrap_or(true);
        let pins = self.pinned(id).await;
        let instance_ref = format!(
            "{}/{}",
            instance.metadata.namespace.as_deref().unwrap_or_default(),
            instance.metadata.name.as_deref().unwrap_or_default()
        );
        let mut pinned: Vec<(&str, String)> = Vec::new();
        // The three images are fetched at once (each fetch runs in a task of the cache's), and
        // their results looked at in a fixed order, so the error reported does not depend on
        // which fetch ended first. All three are tried even when one fails (a retry then finds
        // the others cached). A ramdisk is used only with a kernel.
        let ramdisk = ramdisk.filter(|_| kernel.is_some());
        let (root_image, kernel_image, ramdisk_image) = tokio::join!(
            self.fetch_if(id, root, pins.get("root"), launched, &instance_ref),
            self.fetch_if(id, kernel, pins.get("kernel"), launched, &instance_ref),
            self.fetch_if(id, ramdisk, pins.get("ramdisk"), launched, &instance_ref)
        );
        let (root_image, kernel_image, ramdisk_image) =
            (root_image?, kernel_image?, ramdisk_image?);
        if let Some(base) = root_image {
            pinned.push(("root", base.sha256.clone()));
            let overlay = self.overlay(id);
            if let Some(dir) = overlay.parent() {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|source| GuestError::Io {
                        action: "create",
                        path: dir.to_path_buf(),
                        source,
                    })?;
            }
            // An overlay made over other bytes than the image has now (a location whose
            // contents changed) is retried, never failed for good: a failed launch terminates
            // the instance, and that would delete the disk holding its data.
            self.cache
                .create_overlay(&base, &overlay)
                .await
                .map_err(GuestError::Files)?;
            prepared.disk = Some(DiskSpec {
                path: overlay.to_string_lossy().into_owned(),
                format: DiskFormat::Qcow2,
            });
        }
        if let Some(k) = kernel_image {
            pinned.push(("kernel", k.sha256.clone()));
            let initrd = match ramdisk_image {
                Some(r) => {
                    pinned.push(("ramdisk", r.sha256.clone()));
                    Some(r.path.to_string_lossy().into_owned())
                }
                None => None,
            };
            prepared.kernel = Some(KernelBoot {
                kernel: k.path.to_string_lossy().into_owned(),
                initrd,
                cmdline: self.cmdline.clone(),
            });
        }
        self.write_held(id).await?;
        self.write_pinned(id, &pinned).await?;
        if let (Some(net), Some((ip, mac))) = (&self.network, address_of(instance)) {
            // Under the DHCP lock, as a release of an earlier holder of the address is.
            let dhcp = net.dhcp.lock().await;
            // Guarded before the domain exists: no frame of its tap passes unchecked.
            let tap = net.ports.bind(&mac, ip).await.map_err(GuestError::Ports)?;
            let hostname = crds::subnet::hostname_for(ip);
            dhcp.set_host(&mac, ip, &hostname)
                .await
                .map_err(|e| GuestError::Dhcp(e.to_string()))?;
            if let Some(md) = metadata_of(instance, &net.region, &net.subnet_cidr) {
                net.directory.set(md);
            }
            drop(dhcp);
            prepared.nic = Some(NicSpec {
                mac,
                bridge: net.bridge.clone(),
                tap,
            });
        }
        Ok(prepared)
    }

    /// Keeps the metadata of a running instance current (user data and options may change
    /// while it is stopped), also while its domain (`domain_active`) still shuts down after a
    /// stop was asked, as EC2 answers until the guest has halted (shutdown hooks read it; the
    /// port guard lets only this instance's tap use the address). Withdraws it once the domain
    /// is down.
    pub fn publish(&self, instance: &Instance, domain_active: bool) {
        let Some(net) = &self.network else { return };
        if publishes_metadata(instance, domain_active) {
            if let Some(md) = metadata_of(instance, &net.region, &net.subnet_cidr) {
                net.directory.set(md);
            }
        } else if let (Some((ip, _)), Some(id)) =
            (address_of(instance), instance.labels().get(ID_LABEL))
        {
            net.directory.remove(ip, id);
        }
    }

    /// Withdraws the instance's metadata before its domain starts, so that the start begins a
    /// new metadata session ([`Guests::publish`] puts it back) and IMDSv2 tokens of an earlier
    /// run are refused.
    pub fn withdraw(&self, instance: &Instance) {
        let Some(net) = &self.network else { return };
        if let (Some((ip, _)), Some(id)) = (address_of(instance), instance.labels().get(ID_LABEL)) {
            net.directory.remove(ip, id);
        }
    }

    /// Removes what [`Guests::prepare`] made for the instance `id` (its domain is gone): overlay,
    /// console log, DHCP entry, metadata. What is bound to its `address` stays when
    /// `held_elsewhere` says another live instance holds that address now; it is asked under
    /// the lock that [`Guests::prepare`] binds an address under, so an instance that takes the
    /// address after the question is bound after the release.
    pub async fn release(
        &self,
        id: &str,
        address: Option<(Ipv4Addr, String)>,
        held_elsewhere: impl Fn(Ipv4Addr) -> bool,
    ) -> Result<(), GuestError> {
        {
            let mut bases = self.bases.lock().unwrap_or_else(PoisonError::into_inner);
            bases.remove(id);
        }
        if let (Some(net), Some((ip, mac))) = (&self.network, address) {
            let dhcp = net.dhcp.lock().await;
            if held_elsewhere(ip) {
                tracing::debug!(%ip, "the address is another instance's now; its bindings stay");
            } else {
                net.directory.remove(ip, id);
                dhcp.remove_host(&mac)
                    .await
                    .map_err(|e| GuestError::Dhcp(e.to_string()))?;
                net.ports
                    .unbind(&mac, ip)
                    .await
                    .map_err(GuestError::Ports)?;
            }
            drop(dhcp);
        }
        images::remove_overlay(&self.overlay(id))
            .await
            .map_err(GuestError::Files)?;
        let dir = self.instance_dir.join(id);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(GuestError::Io {
                    action: "remove",
                    path: dir,
                    source,
                })
            }
        }
        // With the files virtlogd rotated out of it.
        let (dir, owner) = (self.console_dir.clone(), id.to_owned());
        tokio::task::spawn_blocking(move || console::remove_logs(&dir, &owner))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|removed| removed)
            .map_err(|source| GuestError::Io {
                action: "remove the console logs in",
                path: self.console_dir.clone(),
                source,
            })?;
        Ok(())
    }

    /// The mark to take before reading the live instances for [`Guests::retain_network`];
    /// `None` without a guest network.
    pub fn network_mark(&self) -> Option<Mark> {
        self.network.as_ref().map(|net| net.ports.mark())
    }

    /// Drops the DHCP entries and metadata of every address but `live` (address, MAC) pairs,
    /// and makes the port guard hold exactly theirs (and those bound after `mark`).
    pub async fn retain_network(&self, mark: Option<Mark>, live: &[(Ipv4Addr, String)]) {
        let Some(net) = &self.network else { return };
        if let Some(mark) = mark {
            if let Err(error) = net.ports.sync(mark, live).await {
                tracing::warn!(%error, "cannot rewrite the port guard");
            }
        }
        let ips: HashSet<Ipv4Addr> = live.iter().map(|(ip, _)| *ip).collect();
        net.directory.retain(|md| ips.contains(&md.local_ipv4));
        let macs: HashSet<String> = live.iter().map(|(_, mac)| mac.clone()).collect();
        if let Err(error) = net.dhcp.lock().await.retain_hosts(&macs).await {
            tracing::warn!(%error, "cannot prune the DHCP host entries");
        }
    }

    /// Starts the guests' DHCP server again if it died (without it, new guests get no address
    /// and running ones lose theirs when their lease runs out). Returns whether it had to;
    /// `None` without a guest network.
    pub async fn keep_dhcp_running(&self) -> Option<Result<bool, crate::guestnet::GuestNetError>> {
        let net = self.network.as_ref()?;
        Some(net.dhcp.lock().await.ensure_running().await)
    }

    /// What the port guard has dropped so far; `None` without a guest network.
    pub async fn guard_dropped(&self) -> Option<Result<crate::portguard::Dropped, PortGuardError>> {
        match &self.network {
            Some(net) => Some(net.ports.dropped().await),
            None => None,
        }
    }

    /// Instance IDs that have files under the instance directory or console logs.
    pub fn instances_with_files(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(&self.instance_dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name.starts_with("i-"))
            .collect();
        // An instance without a root disk has only its console logs.
        ids.extend(
            console::owners_in(&self.console_dir)
                .into_iter()
                .filter(|id| id.starts_with("i-")),
        );
        ids.sort();
        ids.dedup();
        ids
    }

    /// Evicts cached images beyond the cache's size limit that no live instance needs.
    pub async fn evict(&self) -> Result<u64, CacheError> {
        self.cache.evict(&self.in_use()).await
    }
}

/// The run of fetch failures of one location after a failure at `now`: when it began and when
/// it last failed. A run whose last failure is older than [`FETCH_GIVE_UP`] (its instances
/// went away) is over; this failure begins a new one. Pure.
fn failure_run(
    previous: Option<(std::time::Instant, std::time::Instant)>,
    now: std::time::Instant,
) -> (std::time::Instant, std::time::Instant) {
    match previous {
        Some((since, last)) if now.saturating_duration_since(last) < FETCH_GIVE_UP => (since, now),
        _ => (now, now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest facilities without a network, with every file under `dir`.
    fn guests_in(dir: &std::path::Path) -> Guests {
        let cache = ImageCache::open(dir.join("cache"), 1 << 30).expect("cache");
        Guests::new(
            cache,
            dir.join("instances"),
            dir.join("consoles"),
            String::new(),
            None,
        )
    }

    fn launched(artifacts: serde_json::Value) -> Instance {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "karri.dev/v1alpha1",
            "kind": "Instance",
            "metadata": {"name": "i-1", "namespace": "acme"},
            "spec": {"imageId": "emi-0123456789abcdef0", "instanceType": "t1.micro"},
            "status": {"launch": artifacts},
        }))
        .expect("a valid Instance")
    }

    fn artifact(id: &str, sha256: Option<&str>) -> serde_json::Value {
        let mut a = serde_json::json!({"imageId": id, "location": "/images/x"});
        if let Some(sha) = sha256 {
            a["sha256"] = serde_json::json!(sha);
        }
        a
    }

    #[tokio::test]
    async fn an_unreachable_image_is_tried_again_and_a_missing_one_fails_for_good() {
        let dir = tempfile::tempdir().expect("temp dir");
        let guests = guests_in(dir.path());
        let artifact = |location: &str| ImageArtifact {
            image_id: "emi-1".into(),
            location: location.into(),
            sha256: None,
            format: Default::default(),
        };
        // Nothing listens on loopback port 9: the connection is refused, which may pass.
        match guests
            .fetch(
                &artifact("http://127.0.0.1:9/root.img"),
                None,
                false,
                "acme/i-1",
            )
            .await
        {
            Err(e @ GuestError::Fetch { .. }) => assert!(!e.is_permanent()),
            other => panic!("expected a fetch to try again, got {other:?}"),
        }
        let missing = dir.path().join("no-such-image.img");
        match guests
            .fetch(
                &artifact(&missing.to_string_lossy()),
                None,
                false,
                "acme/i-1",
            )
            .await
        {
            Err(e) => assert!(e.is_permanent(), "{e}"),
            Ok(_) => panic!("a missing file was fetched"),
        }
    }

    #[test]
    fn only_an_instance_asked_to_run_is_served_metadata() {
        let mut instance = launched(serde_json::json!({}));
        assert!(serves_metadata(&instance));
        for desired in [crds::DesiredState::Stopped, crds::DesiredState::Terminated] {
            instance.spec.desired_state = desired;
            assert!(!serves_metadata(&instance), "{desired:?}");
        }
        instance.spec.desired_state = crds::DesiredState::Running;
        instance.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert!(!serves_metadata(&instance), "being deleted");
    }

    #[test]
    fn metadata_is_served_until_a_stopping_guest_has_halted() {
        let mut instance = launched(serde_json::json!({}));
        instance.spec.desired_state = crds::DesiredState::Stopped;
        assert!(publishes_metadata(&instance, true), "still shutting down");
        assert!(!publishes_metadata(&instance, false), "halted");
        instance.spec.desired_state = crds::DesiredState::Running;
        assert!(
            publishes_metadata(&instance, false),
            "asked to run, domain not up yet"
        );
    }

    #[test]
    fn an_adopted_instance_holds_its_images_without_a_fetch_until_released() {
        let dir = tempfile::tempdir().expect("temp dir");
        let guests = guests_in(dir.path());
        let instance = launched(serde_json::json!({
            "root": artifact("emi-1", Some("aa")),
            "kernel": artifact("eki-1", Some("bb")),
            "ramdisk": artifact("eri-1", None),
        }));
        guests.hold_images_of(&instance, "i-1");
        let held: HashSet<String> = ["aa".to_string(), "bb".to_string()].into();
        assert_eq!(guests.in_use(), held);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime
            .block_on(guests.release("i-1", None, |_| false))
            .expect("release");
        assert!(guests.in_use().is_empty());
    }

    #[tokio::test]
    async fn an_instances_kernel_and_ramdisk_download_at_the_same_time() {
        // Each image is served only once both requests have arrived: fetched one after the
        // other, the first would wait in vain and be answered 503.
        let both = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let serve = |body: &'static [u8]| {
            let both = both.clone();
            move || async move {
                match tokio::time::timeout(std::time::Duration::from_secs(10), both.wait()).await {
                    Ok(_) => (axum::http::StatusCode::OK, body),
                    Err(_) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, &b"alone"[..]),
                }
            }
        };
        let router = axum::Router::new()
            .route("/kernel", axum::routing::get(serve(b"a kernel")))
            .route("/ramdisk", axum::routing::get(serve(b"a ramdisk")));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local address");
        tokio::spawn(async move { axum::serve(listener, router).await });
        let mut kernel = artifact("eki-1", None);
        kernel["location"] = serde_json::json!(format!("http://{addr}/kernel"));
        let mut ramdisk = artifact("eri-1", None);
        ramdisk["location"] = serde_json::json!(format!("http://{addr}/ramdisk"));
        let instance = launched(serde_json::json!({"kernel": kernel, "ramdisk": ramdisk}));
        let dir = tempfile::tempdir().expect("temp dir");
        let prepared = guests_in(dir.path())
            .prepare(&instance, "i-1")
            .await
            .expect("prepared");
        let boot = prepared.kernel.expect("a kernel");
        assert_eq!(std::fs::read(&boot.kernel).expect("cached"), b"a kernel");
        let initrd = boot.initrd.expect("a ramdisk");
        assert_eq!(std::fs::read(&initrd).expect("cached"), b"a ramdisk");
    }

    #[tokio::test]
    async fn an_image_without_a_declared_sha256_stays_held_across_an_agent_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("kernel.img");
        std::fs::write(&image, b"a kernel").expect("written");
        let location = image.to_string_lossy().into_owned();
        let mut kernel = artifact("eki-1", None);
        kernel["location"] = serde_json::json!(location);
        let instance = launched(serde_json::json!({"kernel": kernel}));
        let guests = guests_in(dir.path());
        guests.prepare(&instance, "i-1").await.expect("prepared");
        let held = guests.in_use();
        assert_eq!(held.len(), 1, "{held:?}");
        // A new agent over the same directories adopts the running domain without preparing.
        let restarted = guests_in(dir.path());
        restarted.hold_images_of(&instance, "i-1");
        assert_eq!(restarted.in_use(), held);
        restarted
            .release("i-1", None, |_| false)
            .await
            .expect("release");
        assert!(guests_in(dir.path()).in_use().is_empty());
        let again = guests_in(dir.path());
        again.hold_images_of(&instance, "i-1");
        assert!(again.in_use().is_empty(), "a released instance held images");
    }

    #[tokio::test]
    async fn an_image_gone_after_the_launch_never_fails_the_instance_that_holds_its_disk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("kernel.img");
        std::fs::write(&image, b"a kernel").expect("written");
        let mut kernel = artifact("eki-1", None);
        kernel["location"] = serde_json::json!(image.to_string_lossy());
        let instance = launched(serde_json::json!({"kernel": kernel}));
        let guests = guests_in(dir.path());
        // A new instance whose image is missing fails for good (and is terminated).
        std::fs::remove_file(&image).expect("removed");
        match guests.prepare(&instance, "i-new").await {
            Err(e) => assert!(e.is_permanent(), "{e}"),
            Ok(_) => panic!("prepared from a missing image"),
        }
        // One that launched boots the bytes it launched with again, from the cache, with its
        // image gone or replaced since (the image declares no SHA-256: the first fetch pins it).
        std::fs::write(&image, b"a kernel").expect("written");
        let kernel_of = |p: &Prepared| p.kernel.as_ref().expect("a kernel").kernel.clone();
        let first = kernel_of(&guests.prepare(&instance, "i-1").await.expect("prepared"));
        std::fs::remove_file(&image).expect("removed");
        let again = guests
            .prepare(&instance, "i-1")
            .await
            .expect("from the cache");
        assert_eq!(kernel_of(&again), first);
        std::fs::write(&image, b"another kernel").expect("written");
        let replaced = guests
            .prepare(&instance, "i-1")
            .await
            .expect("from the cache");
        assert_eq!(kernel_of(&replaced), first);
        assert_eq!(std::fs::read(&first).expect("cached"), b"a kernel");
        // With its cached copy gone too, it waits for those bytes instead of failing.
        std::fs::remove_file(&first).expect("removed");
        std::fs::remove_file(&image).expect("removed");
        match guests.prepare(&instance, "i-1").await {
            Err(e) => assert!(
                !e.is_permanent(),
                "a launched instance failed for good: {e}"
            ),
            Ok(_) => panic!("prepared from a missing image"),
        }
    }

    #[test]
    fn pinned_images_are_read_by_role_and_never_override_a_declared_sha256() {
        let sha = "ab".repeat(32);
        let pins = parse_pinned(&format!("root {sha}\nkernel short\n\ngarbage\n"));
        assert_eq!(pins.len(), 1);
        assert_eq!(pins.get("root"), Some(&sha));
        let undeclared = ImageArtifact {
            image_id: "emi-1".into(),
            location: "/images/x".into(),
            sha256: None,
            format: Default::default(),
        };
        assert_eq!(
            as_pinned(&undeclared, pins.get("root")).sha256,
            Some(sha.clone())
        );
        let declared = ImageArtifact {
            sha256: Some("cd".repeat(32)),
            ..undeclared
        };
        assert_eq!(
            as_pinned(&declared, pins.get("root")).sha256,
            declared.sha256
        );
    }

    #[test]
    fn a_run_of_fetch_failures_long_over_is_not_charged_to_a_new_one() {
        let t0 = std::time::Instant::now();
        let at = |d: std::time::Duration| t0 + d;
        let minute = std::time::Duration::from_secs(60);
        // The first failure begins a run.
        assert_eq!(failure_run(None, t0), (t0, t0));
        // Failures that keep coming extend it from its beginning.
        assert_eq!(failure_run(Some((t0, t0)), at(minute)), (t0, at(minute)));
        let late = at(FETCH_GIVE_UP + minute);
        assert_eq!(failure_run(Some((t0, at(FETCH_GIVE_UP))), late), (t0, late));
        // One long after the last (an instance terminated since) begins a new run.
        let later = at(FETCH_GIVE_UP * 3);
        assert_eq!(failure_run(Some((t0, at(minute))), later), (later, later));
    }
}
