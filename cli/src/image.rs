//! `karri image register` and `karri image list`: upload a local disk image into S3
//! (`--bucket`) or the image store, and register it as an Image record (EMI, EKI or ERI) through
//! the resource API.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use crds::{AccessKey, Account, Image, ImageSpec, ImageType, Validate, ID_LABEL};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};

use crate::{s3, store};

/// Where image files are kept when neither `--store` nor a state directory says otherwise.
const DEFAULT_STORE: &str = "/var/lib/karri/images";

/// `karri image …`.
#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Upload a local disk image into S3 (`--bucket`) or the image store and register it;
    /// prints its ID last.
    Register(Box<RegisterArgs>),
    /// List images (ID, type, name, format, size, location).
    List {
        /// Only this namespace (default: every namespace).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
}

/// The kinds of image, as `--type` spells them.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TypeArg {
    /// A bootable root disk (`emi-`).
    Machine,
    /// A kernel (`eki-`).
    Kernel,
    /// An initial ramdisk (`eri-`).
    Ramdisk,
}

impl From<TypeArg> for ImageType {
    fn from(t: TypeArg) -> Self {
        match t {
            TypeArg::Machine => ImageType::Machine,
            TypeArg::Kernel => ImageType::Kernel,
            TypeArg::Ramdisk => ImageType::Ramdisk,
        }
    }
}

/// Flags of `karri image register`.
#[derive(Args, Debug)]
pub struct RegisterArgs {
    /// The image file: raw or qcow2 (kept as is), or any format qemu-img reads (converted to
    /// qcow2). Kernels and ramdisks are plain files.
    #[arg(long)]
    file: PathBuf,
    /// EC2 image name (3 to 128 letters, digits and `()[] ./-'@_`); default: the file's name.
    #[arg(long)]
    name: Option<String>,
    /// What the image holds.
    #[arg(
        long = "type",
        value_name = "TYPE",
        value_enum,
        default_value = "machine"
    )]
    image_type: TypeArg,
    /// Kernel image (`eki-…`) a machine image boots.
    #[arg(long)]
    kernel_id: Option<String>,
    /// Ramdisk image (`eri-…`) a machine image boots with its kernel.
    #[arg(long)]
    ramdisk_id: Option<String>,
    /// Namespace (account) the image belongs to; default: the kubeconfig's namespace.
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Let every account launch the image.
    #[arg(long)]
    public: bool,
    /// Directory the image files are kept in for the nodes; default: `$KARRI_IMAGE_STORE`,
    /// else `$KARRI_STATE_DIR/images` (karri.env sets it) or `$STATE_DIR/images`, else
    /// /var/lib/karri/images. Not with `--bucket` (which ignores those variables).
    #[arg(long, conflicts_with = "bucket")]
    store: Option<PathBuf>,
    /// Upload the image to this S3 bucket (created if missing) instead of the image store,
    /// as the account of `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` at `AWS_ENDPOINT_URL`
    /// (trusting `AWS_CA_BUNDLE`): the environment karri.env sets. Nodes fetch it through
    /// presigned URLs the gateway issues them.
    #[arg(long)]
    bucket: Option<String>,
    /// The object key in `--bucket`; default: the file's name (`.qcow2` for a converted image).
    #[arg(long, requires = "bucket")]
    key: Option<String>,
    /// Free-form description (at most 255 characters).
    #[arg(long)]
    description: Option<String>,
    /// The image's ID (`emi-`/`eki-`/`eri-` and 17 hex digits, by `--type`), for images with a
    /// well-known ID such as the default micro image; default: one the gateway allocates.
    #[arg(long)]
    id: Option<String>,
}

/// Runs `karri image …`.
pub async fn run(client: Client, command: ImageCommand) -> anyhow::Result<()> {
    match command {
        ImageCommand::Register(args) => register(client, *args).await,
        ImageCommand::List { namespace } => list(client, namespace).await,
    }
}

/// The store directory: the flag, else `KARRI_IMAGE_STORE`, else under the state directory
/// (Karri's own variable first), else the system default.
fn store_dir(flag: Option<PathBuf>) -> PathBuf {
    let set = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    flag.or_else(|| set("KARRI_IMAGE_STORE").map(PathBuf::from))
        .or_else(|| {
            ["KARRI_STATE_DIR", "STATE_DIR"]
                .into_iter()
                .find_map(set)
                .map(|dir| PathBuf::from(dir).join("images"))
        })
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STORE))
}

/// The S3 key an image gets from its file name when `--key` is not given: the name itself, or
/// with its extension replaced by `.qcow2` when the image is converted to qcow2.
pub fn key_from_file(file: &Path, converted: bool) -> Option<String> {
    let name = file.file_name()?.to_str()?;
    if !converted {
        return Some(name.to_owned());
    }
    let stem = file.file_stem()?.to_str()?;
    Some(format!("{stem}.qcow2"))
}

/// Why `bucket/key` cannot be an image location, if it cannot.
pub fn bad_s3_location(bucket: &str, key: &str) -> Option<String> {
    if !crds::is_valid_bucket_name(bucket) {
        return Some(format!(
            "--bucket {bucket:?} is not a bucket name: 3 to 63 lower-case letters, digits, `.` \
             and `-`, starting and ending with a letter or digit"
        ));
    }
    if key.is_empty() || key.len() > 1024 || key.starts_with('/') {
        return Some(format!(
            "--key {key:?} is not an object key: 1 to 1024 bytes, not starting with `/`"
        ));
    }
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some(format!(
            "--key {key:?} has a space or control character, which an image location cannot hold"
        ));
    }
    // A URL drops `.` and `..` segments, so the object stored would not be the one signed for.
    if key
        .split('/')
        .any(|segment| segment == "." || segment == "..")
    {
        return Some(format!(
            "--key {key:?} has a `.` or `..` segment, which a URL does not keep"
        ));
    }
    None
}

/// The EC2 name an image gets from its file name when `--name` is not given: characters EC2
/// does not allow become `-`.
pub fn name_from_file(file: &Path) -> Option<String> {
    let base = file.file_name()?.to_string_lossy();
    let name: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    (name.chars().count() >= 3).then_some(name)
}

/// A Kubernetes name prefix (for `generateName`) made of an EC2 image name: lower case letters,
/// digits and `-`, at most 40 characters, then `-`.
pub fn record_name_prefix(name: &str) -> String {
    let mut prefix = String::new();
    for c in name.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && (prefix.is_empty() || prefix.ends_with('-')) {
            continue;
        }
        prefix.push(c);
        if prefix.len() >= 40 {
            break;
        }
    }
    let mut prefix = prefix.trim_end_matches('-').to_owned();
    if prefix.is_empty() {
        prefix.push_str("image");
    }
    prefix.push('-');
    prefix
}

/// Finds the image with ID `id` (or its `emi-`/`eki-`/`eri-` spelling of an `ami-`/`aki-`/`ari-`).
async fn find_by_id(client: &Client, id: &str) -> anyhow::Result<Option<Image>> {
    let api: Api<Image> = Api::all(client.clone());
    let mut candidates = vec![id.to_owned()];
    if let Some((prefix, hex)) = id.split_once('-') {
        let euca = match prefix {
            "ami" => Some("emi"),
            "aki" => Some("eki"),
            "ari" => Some("eri"),
            _ => None,
        };
        if let Some(p) = euca {
            candidates.push(format!("{p}-{hex}"));
        }
    }
    for candidate in candidates {
        let found = api
            .list(&ListParams::default().labels(&format!("{ID_LABEL}={candidate}")))
            .await
            .with_context(|| format!("cannot look up image {id}"))?;
        if let Some(image) = found.items.into_iter().next() {
            return Ok(Some(image));
        }
    }
    Ok(None)
}

/// Why a machine image in `ns` (public or not) could not boot `part` (its kernel or ramdisk),
/// if it could not.
pub fn unbootable_part(ns: &str, public: bool, part: &Image, want: ImageType) -> Option<String> {
    let id = part.labels().get(ID_LABEL).cloned().unwrap_or_default();
    if part.spec.image_type != want {
        return Some(format!(
            "{id} is a {} image, not a {} image",
            part.spec.image_type.as_str(),
            want.as_str()
        ));
    }
    let part_ns = part.namespace().unwrap_or_default();
    if public && !part.spec.public {
        return Some(format!(
            "{id} is not public, so the accounts a public image is for could not boot it; \
             register it with --public"
        ));
    }
    if part_ns != ns && !part.spec.public {
        return Some(format!(
            "{id} belongs to namespace {part_ns} and is not public, so instances of namespace \
             {ns} could not boot it"
        ));
    }
    None
}

/// Why an image registered in namespace `ns` could not be booted from an object uploaded with
/// access key `key_id`, if it could not. The object is private to the key's account, and the
/// gateway hands nodes an image's object only when the account of the image's namespace may
/// read it; a namespace of no account (public images) reads any. A key or namespace this
/// kubeconfig cannot see is not held against the upload.
pub fn unreadable_upload(
    ns: &str,
    key_id: &str,
    accounts: &[Account],
    keys: &[AccessKey],
) -> Option<String> {
    let owner = accounts
        .iter()
        .find(|a| a.status.as_ref().and_then(|s| s.namespace.as_deref()) == Some(ns))?;
    let key = keys
        .iter()
        .find(|k| k.status.as_ref().and_then(|s| s.access_key_id.as_deref()) == Some(key_id))?;
    let owner_name = owner.name_any();
    (key.spec.account_name != owner_name).then(|| {
        format!(
            "the object would belong to account {}, the owner of access key {key_id}, and the \
             instances of namespace {ns} (account {owner_name}) could not read it to boot; \
             upload with an access key of {owner_name} (AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY), or register the image in a namespace of no account",
            key.spec.account_name
        )
    })
}

/// [`unreadable_upload`] with the accounts and keys the kubeconfig can list (none when it may
/// not list them: the gateway still refuses what it must).
async fn check_upload_readable(client: &Client, ns: &str, key_id: &str) -> anyhow::Result<()> {
    let accounts = Api::<Account>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let keys = Api::<AccessKey>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    match unreadable_upload(ns, key_id, &accounts, &keys) {
        Some(problem) => bail!("cannot register the image in namespace {ns}: {problem}"),
        None => Ok(()),
    }
}

async fn register(client: Client, args: RegisterArgs) -> anyhow::Result<()> {
    let image_type = ImageType::from(args.image_type);
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let name = match &args.name {
        Some(name) => name.clone(),
        None => name_from_file(&args.file).with_context(|| {
            format!(
                "cannot make an image name of {}: pass --name",
                args.file.display()
            )
        })?,
    };
    if let Some(id) = &args.id {
        if !crds::is_valid_id(image_type.id_prefix(), id) {
            bail!(
                "--id {id} is not a {} image ID: {}- and 17 hex digits",
                image_type.as_str(),
                image_type.id_prefix()
            );
        }
    }
    if image_type != ImageType::Machine && (args.kernel_id.is_some() || args.ramdisk_id.is_some()) {
        bail!(
            "--kernel-id and --ramdisk-id belong to machine images, not to a {} image",
            image_type.as_str()
        );
    }
    // The file first: a missing or unreadable one fails before anything else is asked.
    let probe = {
        let file = args.file.clone();
        tokio::task::spawn_blocking(move || store::probe(&file))
            .await
            .context("probing the image stopped")??
    };
    // An upload to S3: its settings and location are checked before anything is uploaded.
    let s3 = match &args.bucket {
        Some(bucket) => {
            let key = match &args.key {
                Some(key) => key.clone(),
                None => key_from_file(&args.file, probe_converts(image_type, &probe))
                    .with_context(|| {
                        format!(
                            "cannot make an S3 key of {}: pass --key",
                            args.file.display()
                        )
                    })?,
            };
            if let Some(problem) = bad_s3_location(bucket, &key) {
                bail!("{problem}");
            }
            Some((s3::S3Settings::from_env()?, bucket.clone(), key))
        }
        None => None,
    };
    let mut spec = ImageSpec {
        name: name.clone(),
        description: args.description.clone(),
        architecture: Default::default(),
        // Replaced by the stored file's path or the S3 location; checked here so that a bad
        // name or ID fails before the upload.
        image_location: match &s3 {
            Some((_, bucket, key)) => format!("{bucket}/{key}"),
            None => "/pending".to_owned(),
        },
        checksum_sha256: None,
        root_device_name: crds::image::DEFAULT_ROOT_DEVICE_NAME.to_owned(),
        public: args.public,
        kernel_id: args.kernel_id.clone(),
        ramdisk_id: args.ramdisk_id.clone(),
        launch_permissions: Vec::new(),
        tags: Vec::new(),
        image_type,
        format: Default::default(),
        size_bytes: None,
    };
    spec.validate()
        .map_err(|e| anyhow::anyhow!("cannot register {name:?}: {e}"))?;
    for (id, want) in [
        (&args.kernel_id, ImageType::Kernel),
        (&args.ramdisk_id, ImageType::Ramdisk),
    ] {
        let Some(id) = id else { continue };
        let part = find_by_id(&client, id)
            .await?
            .with_context(|| format!("there is no {} image {id}", want.as_str()))?;
        if let Some(problem) = unbootable_part(&namespace, args.public, &part, want) {
            bail!("cannot use {id}: {problem}");
        }
    }

    // Refused now rather than after a long copy or upload.
    if let Some((settings, _, _)) = &s3 {
        check_upload_readable(&client, &namespace, &settings.access_key_id).await?;
    }
    let images: Api<Image> = Api::namespaced(client.clone(), &namespace);
    if let Some(id) = &args.id {
        if images.get_opt(id).await?.is_some() {
            bail!("an image {id} exists already in namespace {namespace}");
        }
    }
    // Image names are unique in a namespace (as EC2's in an account): a taken one is refused
    // before the copy or upload, not after it.
    if let Some(taken) = images
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|i| i.spec.name == name)
    {
        bail!(
            "an image named {name:?} exists already in namespace {namespace} ({}): pass --name",
            taken.name_any()
        );
    }

    let (location, sha256, size, format) = match s3 {
        Some((settings, bucket, key)) => {
            upload(&args.file, image_type, probe, settings, (&bucket, &key)).await?
        }
        None => stored_in(&args, image_type, probe).await?,
    };

    spec.image_location = location;
    spec.checksum_sha256 = Some(sha256);
    spec.size_bytes = Some(size);
    spec.format = format;
    let mut image = Image::new("", spec);
    image.metadata.name = args.id.clone();
    if args.id.is_none() {
        image.metadata.generate_name = Some(record_name_prefix(&name));
    }
    let api: Api<Image> = Api::namespaced(client, &namespace);
    let made = api
        .create(&PostParams::default(), &image)
        .await
        .with_context(|| format!("cannot register image {name:?} in namespace {namespace}"))?;
    let id = made
        .labels()
        .get(ID_LABEL)
        .cloned()
        .context("the gateway allocated no image ID")?;
    eprintln!(
        "registered {} image {name:?} as {id} in namespace {namespace} (record {}){}",
        image_type.as_str(),
        made.name_any(),
        if args.public { ", public" } else { "" }
    );
    println!("{id}");
    Ok(())
}

/// Whether an image of `image_type` probed as `probe` is converted to qcow2.
fn probe_converts(image_type: ImageType, probe: &store::Probe) -> bool {
    store::plan(image_type, probe) == Ok(store::Plan::Convert)
}

/// Uploads `file` to `bucket/key` of S3 (creating the bucket when missing; skipping the upload
/// when the object already holds the same bytes): its location, SHA-256, size and format.
async fn upload(
    file: &Path,
    image_type: ImageType,
    probe: store::Probe,
    settings: s3::S3Settings,
    (bucket, key): (&str, &str),
) -> anyhow::Result<(String, String, u64, crds::DiskImageFormat)> {
    let endpoint = settings.endpoint.clone();
    let client = s3::S3Client::new(settings)?;
    let converts = probe_converts(image_type, &probe);
    let too_large = |size: u64| {
        anyhow::anyhow!(
            "{} is {size} bytes{}, more than the {} bytes one S3 upload may carry",
            file.display(),
            if converts { " as qcow2" } else { "" },
            s3::MAX_PUT_BYTES
        )
    };
    // A file kept as it is can be measured before anything is done.
    if !converts {
        let size = std::fs::metadata(file)
            .with_context(|| format!("cannot read {}", file.display()))?
            .len();
        if size > s3::MAX_PUT_BYTES {
            return Err(too_large(size));
        }
    }
    let prepared = {
        let file = file.to_owned();
        tokio::task::spawn_blocking(move || store::prepare(&file, image_type, &probe))
            .await
            .context("preparing the image stopped")??
    };
    if prepared.size > s3::MAX_PUT_BYTES {
        return Err(too_large(prepared.size));
    }
    let created = client.ensure_bucket(bucket).await?;
    if created == s3::BucketOutcome::Created {
        eprintln!("created bucket {bucket} at {endpoint}");
    }
    let same = client.head_object(bucket, key).await?.is_some_and(|head| {
        head.size == Some(prepared.size) && head.sha256.as_deref() == Some(&prepared.sha256)
    });
    if !same {
        let progress = store::bar(prepared.size, "uploading");
        client
            .put_file(
                (bucket, key),
                &prepared.path,
                (prepared.size, &prepared.sha256),
                progress.clone(),
            )
            .await
            .with_context(|| format!("cannot upload {} to s3://{bucket}/{key}", file.display()))?;
        progress.finish_and_clear();
    }
    eprintln!(
        "{} s3://{bucket}/{key} ({} bytes, {}{}, sha256 {})",
        if same {
            "already uploaded:"
        } else {
            "uploaded"
        },
        prepared.size,
        prepared.format.as_str(),
        prepared
            .converted_from
            .as_deref()
            .map(|f| format!(" converted from {f}"))
            .unwrap_or_default(),
        prepared.sha256
    );
    Ok((
        format!("{bucket}/{key}"),
        prepared.sha256,
        prepared.size,
        prepared.format,
    ))
}

/// Stores the file of `args` in the image store: its path, SHA-256, size and format.
async fn stored_in(
    args: &RegisterArgs,
    image_type: ImageType,
    probe: store::Probe,
) -> anyhow::Result<(String, String, u64, crds::DiskImageFormat)> {
    let file = args.file.clone();
    let store_dir = store_dir(args.store.clone());
    let stored = tokio::task::spawn_blocking(move || -> anyhow::Result<store::Stored> {
        Ok(store::store(&file, image_type, &probe, &store_dir)?)
    })
    .await
    .context("the upload stopped")??;
    eprintln!(
        "{} {} ({} bytes, {}{}, sha256 {})",
        if stored.reused {
            "already stored:"
        } else {
            "stored"
        },
        stored.path.display(),
        stored.size,
        stored.format.as_str(),
        stored
            .converted_from
            .as_deref()
            .map(|f| format!(" converted from {f}"))
            .unwrap_or_default(),
        stored.sha256
    );
    Ok((
        stored.path.display().to_string(),
        stored.sha256,
        stored.size,
        stored.format,
    ))
}

/// `1.5 MiB`-style size.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

async fn list(client: Client, namespace: Option<String>) -> anyhow::Result<()> {
    let api: Api<Image> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let mut images = api
        .list(&ListParams::default())
        .await
        .context("cannot list images")?
        .items;
    images.sort_by_key(|i| (i.namespace(), i.spec.name.clone()));
    println!(
        "{:<21} {:<8} {:<24} {:<6} {:>10} {:<16} {:<6} LOCATION",
        "ID", "TYPE", "NAME", "FORMAT", "SIZE", "NAMESPACE", "PUBLIC"
    );
    for i in images {
        let size = i
            .spec
            .size_bytes
            .or_else(|| i.status.as_ref().and_then(|s| s.size_bytes))
            .map(human_size)
            .unwrap_or_else(|| "-".to_owned());
        println!(
            "{:<21} {:<8} {:<24} {:<6} {:>10} {:<16} {:<6} {}",
            i.labels().get(ID_LABEL).map(String::as_str).unwrap_or("-"),
            i.spec.image_type.as_str(),
            i.spec.name,
            i.spec.format.as_str(),
            size,
            i.namespace().unwrap_or_default(),
            i.spec.public,
            i.spec.image_location
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_is_refused_for_a_namespace_whose_account_could_not_read_it() {
        let account = |name: &str, ns: &str| {
            let mut a = crds::Account::new(name, crds::AccountSpec::default());
            a.status = Some(crds::AccountStatus {
                namespace: Some(ns.into()),
                ..Default::default()
            });
            a
        };
        let key = |id: &str, account: &str| {
            let mut k = crds::AccessKey::new(
                id,
                crds::AccessKeySpec {
                    account_name: account.into(),
                    user_name: None,
                    active: true,
                    description: None,
                },
            );
            k.status = Some(crds::AccessKeyStatus {
                access_key_id: Some(id.into()),
                ..Default::default()
            });
            k
        };
        let accounts = [
            account("admin", "karri-admin"),
            account("research", "research"),
        ];
        let keys = [key("AKIAADMIN", "admin"), key("AKIARESEARCH", "research")];
        let refused = unreadable_upload("research", "AKIAADMIN", &accounts, &keys);
        assert!(
            refused
                .as_deref()
                .is_some_and(|p| p.contains("account admin") && p.contains("research")),
            "{refused:?}"
        );
        assert_eq!(
            unreadable_upload("research", "AKIARESEARCH", &accounts, &keys),
            None
        );
        // A namespace of no account (public images) reads any upload.
        assert_eq!(
            unreadable_upload("karri-public", "AKIAADMIN", &accounts, &keys),
            None
        );
        // A key this kubeconfig cannot see is not held against the upload.
        assert_eq!(
            unreadable_upload("research", "AKIAUNSEEN", &accounts, &keys),
            None
        );
    }

    #[test]
    fn an_image_is_named_after_its_file_without_characters_ec2_refuses() {
        assert_eq!(
            name_from_file(Path::new("/tmp/debian 12+cloud.qcow2")),
            Some("debian 12-cloud.qcow2".to_owned())
        );
        assert_eq!(name_from_file(Path::new("/tmp/ab")), None);
        assert_eq!(name_from_file(Path::new("/")), None);
    }

    #[test]
    fn record_names_are_dns_labels_made_of_the_image_name() {
        assert_eq!(record_name_prefix("karri-micro"), "karri-micro-");
        assert_eq!(
            record_name_prefix("Debian 12 (cloud) [x86_64]"),
            "debian-12-cloud-x86-64-"
        );
        assert_eq!(record_name_prefix("..."), "image-");
        assert!(record_name_prefix(&"a".repeat(100)).len() <= 41);
    }

    #[test]
    fn s3_keys_are_the_file_name_or_its_qcow2_conversion() {
        let cases = [
            ("/tmp/disk.img", false, Some("disk.img")),
            ("/tmp/disk.vmdk", true, Some("disk.qcow2")),
            ("/tmp/vmlinuz", false, Some("vmlinuz")),
            ("/tmp/debian.12.vdi", true, Some("debian.12.qcow2")),
            ("/", false, None),
        ];
        for (file, converted, want) in cases {
            assert_eq!(
                key_from_file(Path::new(file), converted).as_deref(),
                want,
                "{file}"
            );
        }
    }

    #[test]
    fn an_s3_location_needs_a_bucket_name_and_a_key_without_spaces() {
        let cases = [
            ("images", "micro/disk.img", None),
            ("Images", "disk.img", Some("is not a bucket name")),
            ("ab", "disk.img", Some("is not a bucket name")),
            ("images", "", Some("is not an object key")),
            ("images", "/disk.img", Some("is not an object key")),
            ("images", "my disk.img", Some("space or control character")),
            ("images", "a/../disk.img", Some("`..` segment")),
            ("images", "./disk.img", Some("`..` segment")),
            ("images", "v1.2/disk..img", None),
        ];
        for (bucket, key, want) in cases {
            let got = bad_s3_location(bucket, key);
            match want {
                None => assert_eq!(got, None, "{bucket}/{key}"),
                Some(want) => assert!(
                    got.as_deref().is_some_and(|g| g.contains(want)),
                    "{bucket}/{key}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn sizes_are_shown_in_binary_units() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(8 * 1024 * 1024), "8.0 MiB");
        assert_eq!(human_size(1536), "1.5 KiB");
    }

    fn image(ns: &str, image_type: ImageType, public: bool) -> Image {
        let spec: ImageSpec = serde_json::from_value(serde_json::json!({
            "name": "micro-kernel",
            "imageLocation": "/var/lib/karri/images/k",
            "imageType": image_type,
            "public": public,
        }))
        .expect("a valid image spec");
        let mut i = Image::new("k", spec);
        i.metadata.namespace = Some(ns.into());
        i.labels_mut()
            .insert(ID_LABEL.into(), "eki-0123456789abcdef0".into());
        i
    }

    #[test]
    fn a_machine_image_needs_a_kernel_of_the_right_type_that_its_launchers_can_boot() {
        let own = image("acme", ImageType::Kernel, false);
        assert_eq!(
            unbootable_part("acme", false, &own, ImageType::Kernel),
            None
        );
        let wrong = unbootable_part("acme", false, &own, ImageType::Ramdisk);
        assert!(wrong.is_some_and(|w| w.contains("is a kernel image, not a ramdisk")));
        let private_for_public = unbootable_part("acme", true, &own, ImageType::Kernel);
        assert!(private_for_public.is_some_and(|w| w.contains("--public")));
        let elsewhere = unbootable_part("other", false, &own, ImageType::Kernel);
        assert!(elsewhere.is_some_and(|w| w.contains("namespace acme")));
        let shared = image("karri-images", ImageType::Kernel, true);
        assert_eq!(
            unbootable_part("acme", true, &shared, ImageType::Kernel),
            None
        );
    }
}
