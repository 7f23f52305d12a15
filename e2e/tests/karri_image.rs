//! `karri image register` and `karri image list` against a real gateway on a real etcd: local
//! files are stored content-addressed (raw kept, vmdk converted to qcow2 by the real qemu-img),
//! registered as EMI/EKI/ERI records whose size and SHA-256 match the stored file, and a public
//! image in a shared namespace is what every account's awscli sees. Bad input fails plainly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use crds::{DiskImageFormat, Image, ImageType, ID_LABEL};
use karri_testkit::{bin_dir, Etcd, Gateway, Tokens};
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

/// The namespace the admin kubeconfig defaults to.
const NS: &str = "acme";

fn karri(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let bin = bin_dir().join("karri");
    ensure!(
        bin.is_file(),
        "{} missing: run `cargo build --workspace --bins`",
        bin.display()
    );
    Command::new(&bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env_remove("KUBECONFIG")
        .env_remove("STATE_DIR")
        .env_remove("KARRI_STATE_DIR")
        .env_remove("KARRI_IMAGE_STORE")
        .output()
        .with_context(|| format!("running karri {args:?}"))
}

/// Runs `karri image register` with `args`, which must succeed; the ID it prints last.
fn register(kubeconfig: &Path, store: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["image", "register", "--store", path_str(store)?];
    all.extend_from_slice(args);
    let out = karri(kubeconfig, &all)?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "karri {all:?} failed: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stdout
        .lines()
        .last()
        .map(str::to_owned)
        .with_context(|| format!("karri printed no ID: {stdout:?}"))
}

/// Runs `karri image register` with `args`, which must fail: its error output.
fn register_fails(kubeconfig: &Path, store: &Path, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["image", "register", "--store", path_str(store)?];
    all.extend_from_slice(args);
    let out = karri(kubeconfig, &all)?;
    ensure!(
        !out.status.success(),
        "karri {all:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        out.stdout.is_empty(),
        "a failed register printed {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(String::from_utf8_lossy(&out.stderr).to_string())
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str().context("a non-UTF-8 path")
}

fn run_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The SHA-256 of a file, as sha256sum computes it.
fn sha256sum(path: &Path) -> anyhow::Result<String> {
    let out = run_ok(Command::new("sha256sum").arg(path))?;
    out.split_whitespace()
        .next()
        .map(str::to_owned)
        .context("sha256sum printed nothing")
}

/// `len` bytes that are not all alike (and so not a hole), from a seed.
fn pseudo_random(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

async fn admin_client(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// The image record with this ID.
async fn record(client: &Client, id: &str) -> anyhow::Result<Image> {
    let api: Api<Image> = Api::all(client.clone());
    let found = api
        .list(&ListParams::default().labels(&format!("{ID_LABEL}={id}")))
        .await?;
    found
        .items
        .into_iter()
        .next()
        .with_context(|| format!("no image record has ID {id}"))
}

/// Checks what a register of `id` stored: the record's type, format, size, checksum and
/// location agree with the file at that location, which is in `store`.
async fn check_stored(
    client: &Client,
    id: &str,
    image_type: ImageType,
    format: DiskImageFormat,
    store: &Path,
) -> anyhow::Result<Image> {
    let image = record(client, id).await?;
    let spec = &image.spec;
    ensure!(
        id.starts_with(&format!("{}-", image_type.id_prefix())),
        "{id} is not an ID of a {} image",
        image_type.as_str()
    );
    ensure!(spec.image_type == image_type, "{id}: {spec:?}");
    ensure!(spec.format == format, "{id}: {spec:?}");
    let location = PathBuf::from(&spec.image_location);
    ensure!(
        location.is_absolute(),
        "{id}: relative location {location:?}"
    );
    ensure!(location.is_file(), "{id}: {location:?} does not exist");
    ensure!(
        location.parent() == Some(store),
        "{id}: {location:?} is not in the store {store:?}"
    );
    let sha = sha256sum(&location)?;
    ensure!(
        spec.checksum_sha256.as_deref() == Some(sha.as_str()),
        "{id}: checksum {:?}, the stored file hashes to {sha}",
        spec.checksum_sha256
    );
    ensure!(
        location.file_name().and_then(|n| n.to_str())
            == Some(&format!("{sha}.{}", format.as_str())),
        "{id}: {location:?} is not named by its content"
    );
    let size = std::fs::metadata(&location)?.len();
    ensure!(
        spec.size_bytes == Some(size),
        "{id}: sizeBytes {:?}, the stored file has {size}",
        spec.size_bytes
    );
    let info: serde_json::Value = serde_json::from_str(&run_ok(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&location),
    )?)?;
    ensure!(
        info["format"] == format.as_str(),
        "{id}: qemu-img sees {info}"
    );
    Ok(image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_images_are_stored_by_content_and_recorded_with_their_type_size_and_checksum(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    let admin = gateway.kubeconfig(&tokens.admin, NS)?;
    let client = admin_client(&admin).await?;
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files)?;

    // A kernel, a ramdisk and a raw root disk with a hole in the middle.
    let kernel = files.join("vmlinuz");
    std::fs::write(&kernel, pseudo_random(300_000, 1))?;
    let ramdisk = files.join("initrd.img");
    std::fs::write(&ramdisk, pseudo_random(200_000, 2))?;
    let disk = files.join("disk.img");
    let mut bytes = pseudo_random(1 << 20, 3);
    bytes.extend(std::iter::repeat_n(0u8, 2 << 20));
    bytes.extend(pseudo_random(1 << 20, 4));
    std::fs::write(&disk, &bytes)?;

    let eki = register(
        &admin,
        &store,
        &[
            "--file",
            path_str(&kernel)?,
            "--type",
            "kernel",
            "--name",
            "test-kernel",
        ],
    )?;
    let eri = register(
        &admin,
        &store,
        &[
            "--file",
            path_str(&ramdisk)?,
            "--type",
            "ramdisk",
            "--name",
            "test-ramdisk",
        ],
    )?;
    let emi = register(
        &admin,
        &store,
        &[
            "--file",
            path_str(&disk)?,
            "--name",
            "test-disk",
            "--description",
            "a raw test disk",
            "--kernel-id",
            &eki,
            "--ramdisk-id",
            &eri,
        ],
    )?;
    check_stored(
        &client,
        &eki,
        ImageType::Kernel,
        DiskImageFormat::Raw,
        &store,
    )
    .await?;
    check_stored(
        &client,
        &eri,
        ImageType::Ramdisk,
        DiskImageFormat::Raw,
        &store,
    )
    .await?;
    let machine = check_stored(
        &client,
        &emi,
        ImageType::Machine,
        DiskImageFormat::Raw,
        &store,
    )
    .await?;
    ensure!(machine.spec.kernel_id.as_deref() == Some(eki.as_str()));
    ensure!(machine.spec.ramdisk_id.as_deref() == Some(eri.as_str()));
    ensure!(machine.spec.name == "test-disk");
    ensure!(machine.spec.description.as_deref() == Some("a raw test disk"));
    ensure!(!machine.spec.public);
    // Without --namespace the image is the kubeconfig namespace's.
    ensure!(machine.metadata.namespace.as_deref() == Some(NS));
    // The raw disk is stored byte for byte.
    ensure!(std::fs::read(&machine.spec.image_location)? == bytes);

    // A vmdk is converted to qcow2; its name defaults to the file's.
    let vmdk = files.join("appliance.vmdk");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "vmdk"])
            .arg(&vmdk)
            .arg("16M"),
    )?;
    let converted = register(&admin, &store, &["--file", path_str(&vmdk)?])?;
    let image = check_stored(
        &client,
        &converted,
        ImageType::Machine,
        DiskImageFormat::Qcow2,
        &store,
    )
    .await?;
    ensure!(image.spec.name == "appliance.vmdk", "{:?}", image.spec);

    // The same bytes again: a new image, the same stored file.
    let again = register(
        &admin,
        &store,
        &["--file", path_str(&disk)?, "--name", "test-disk-2"],
    )?;
    ensure!(again != emi);
    let first = record(&client, &emi).await?;
    let second = record(&client, &again).await?;
    ensure!(first.spec.image_location == second.spec.image_location);
    // Four distinct files: kernel, ramdisk, raw disk, converted vmdk; no temporary files left.
    let stored: Vec<_> = std::fs::read_dir(&store)?.collect::<Result<_, _>>()?;
    ensure!(stored.len() == 4, "the store holds {stored:?}");

    // The listing shows every image with its type, format, size and location.
    let listed = karri(&admin, &["image", "list"])?;
    ensure!(listed.status.success(), "{listed:?}");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for (id, kind) in [
        (&eki, "kernel"),
        (&eri, "ramdisk"),
        (&emi, "machine"),
        (&converted, "machine"),
    ] {
        let line = listed
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .with_context(|| format!("{id} not listed:\n{listed}"))?;
        ensure!(line.contains(kind), "{line}");
        let image = record(&client, id).await?;
        ensure!(line.contains(&image.spec.image_location), "{line}");
        ensure!(line.contains(image.spec.format.as_str()), "{line}");
    }
    ensure!(
        listed.contains("4.0 MiB"),
        "the raw disk's size is not shown:\n{listed}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_image_in_a_shared_namespace_is_launchable_by_every_account() -> anyhow::Result<()>
{
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    let admin = gateway.kubeconfig(&tokens.admin, "default")?;
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, pseudo_random(4096, 5))?;
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, pseudo_random(65536, 6))?;
    let shared = ["--namespace", "karri-images", "--public"];

    // A public machine image cannot boot a private kernel: refused before anything is stored.
    let eki_private = register(
        &admin,
        &store,
        &[
            "--file",
            path_str(&kernel)?,
            "--type",
            "kernel",
            "--namespace",
            "karri-images",
        ],
    )?;
    let refused = register_fails(
        &admin,
        &store,
        &[
            &["--file", path_str(&disk)?, "--kernel-id", &eki_private][..],
            &shared[..],
        ]
        .concat(),
    )?;
    ensure!(refused.contains("not public"), "{refused}");

    let eki = register(
        &admin,
        &store,
        &[
            &[
                "--file",
                path_str(&kernel)?,
                "--type",
                "kernel",
                "--name",
                "shared-kernel",
            ][..],
            &shared[..],
        ]
        .concat(),
    )?;
    let emi = register(
        &admin,
        &store,
        &[
            &[
                "--file",
                path_str(&disk)?,
                "--name",
                "shared-disk",
                "--kernel-id",
                &eki,
            ][..],
            &shared[..],
        ]
        .concat(),
    )?;

    // Every account's awscli sees the public images (and not the private kernel).
    let (_, creds) = gateway.account_with_key(&tokens.admin, "tenant").await?;
    let answer = gateway.aws(&creds, &["ec2", "describe-images"]).await?;
    let images = answer["Images"].as_array().context("no Images")?;
    let shown = |id: &str| images.iter().find(|i| i["ImageId"] == id);
    let machine = shown(&emi).with_context(|| format!("{emi} not shown: {answer}"))?;
    ensure!(machine["Public"] == true, "{machine}");
    ensure!(machine["KernelId"] == eki.as_str(), "{machine}");
    ensure!(machine["ImageType"] == "machine", "{machine}");
    let kernel = shown(&eki).with_context(|| format!("{eki} not shown: {answer}"))?;
    ensure!(kernel["ImageType"] == "kernel", "{kernel}");
    ensure!(
        shown(&eki_private).is_none(),
        "a private image of another namespace is shown"
    );
    // They are the cloud's own images: owner 000000000000, alias `amazon`, as scripts that
    // look for the provider's images (`--owners amazon`) expect.
    ensure!(
        machine["OwnerId"] == "000000000000" && machine["ImageOwnerAlias"] == "amazon",
        "{machine}"
    );
    let by_alias = |args: &'static [&'static str]| {
        let (gateway, creds) = (&gateway, &creds);
        async move {
            let answer = gateway
                .aws(creds, &[&["ec2", "describe-images"][..], args].concat())
                .await?;
            let mut ids: Vec<String> = answer["Images"]
                .as_array()
                .context("no Images")?
                .iter()
                .filter_map(|i| i["ImageId"].as_str().map(str::to_owned))
                .collect();
            ids.sort();
            anyhow::Ok(ids)
        }
    };
    let mut public = vec![eki.clone(), emi.clone()];
    public.sort();
    for args in [
        &["--owners", "amazon"][..],
        &["--owners", "000000000000"][..],
        &["--filters", "Name=owner-alias,Values=amazon"][..],
    ] {
        let ids = by_alias(args).await?;
        ensure!(ids == public, "describe-images {args:?} shows {ids:?}");
    }
    // The tenant's own image has no alias and is not the cloud's.
    let own = dir.path().join("own.img");
    std::fs::write(&own, pseudo_random(65536, 8))?;
    let own_id = register(
        &admin,
        &store,
        &["--file", path_str(&own)?, "--namespace", "tenant"],
    )?;
    let ids = by_alias(&["--owners", "amazon"]).await?;
    ensure!(
        ids == public,
        "--owners amazon shows {ids:?} (own {own_id})"
    );
    let mine = by_alias(&["--owners", "self"]).await?;
    ensure!(mine == [own_id.clone()], "--owners self shows {mine:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_uploads_fail_with_a_clear_message_and_register_nothing() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    let admin = gateway.kubeconfig(&tokens.admin, NS)?;
    let client = admin_client(&admin).await?;
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");

    let missing = dir.path().join("no-such.img");
    let err = register_fails(&admin, &store, &["--file", path_str(&missing)?])?;
    ensure!(
        err.contains(&format!("{} does not exist", missing.display())),
        "{err}"
    );

    let a_dir = dir.path().join("a-directory");
    std::fs::create_dir(&a_dir)?;
    let err = register_fails(&admin, &store, &["--file", path_str(&a_dir)?])?;
    ensure!(err.contains("is not a regular file"), "{err}");

    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, pseudo_random(4096, 7))?;
    let err = register_fails(
        &admin,
        &store,
        &["--file", path_str(&disk)?, "--type", "floppy"],
    )?;
    ensure!(err.contains("invalid value 'floppy'"), "{err}");
    ensure!(err.contains("machine, kernel, ramdisk"), "{err}");

    // A qcow2 over a backing file could read any file on the node: refused.
    let base = dir.path().join("base.qcow2");
    let overlay = dir.path().join("overlay.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("1M"),
    )?;
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&overlay),
    )?;
    let err = register_fails(&admin, &store, &["--file", path_str(&overlay)?])?;
    ensure!(err.contains("backing file"), "{err}");
    // So could a qed over one (qemu-img convert would copy it in), or a vmdk whose data lives
    // in other files its descriptor names.
    let qed = dir.path().join("overlay.qed");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qed", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&qed),
    )?;
    let err = register_fails(&admin, &store, &["--file", path_str(&qed)?])?;
    ensure!(err.contains("the qed image has a backing file"), "{err}");
    let flat = dir.path().join("flat.vmdk");
    run_ok(
        Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                "subformat=monolithicFlat",
            ])
            .arg(&flat)
            .arg("1M"),
    )?;
    let err = register_fails(&admin, &store, &["--file", path_str(&flat)?])?;
    ensure!(err.contains("monolithicFlat kind"), "{err}");

    // An image larger than one S3 upload is refused before anything is sent (the endpoint
    // here answers nothing).
    let huge = dir.path().join("huge.img");
    std::fs::File::create(&huge)?.set_len((5 << 30) + 1)?;
    let out = Command::new(bin_dir().join("karri"))
        .args(["--kubeconfig", path_str(&admin)?])
        .args(["image", "register", "--file", path_str(&huge)?])
        .args(["--bucket", "images"])
        .env("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "secret")
        .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "a 5 GiB + 1 byte upload was accepted"
    );
    ensure!(
        err.contains("5368709121 bytes, more than the 5368709120 bytes one S3 upload may carry"),
        "{err}"
    );

    // A kernel must be a plain file.
    let err = register_fails(
        &admin,
        &store,
        &["--file", path_str(&base)?, "--type", "kernel"],
    )?;
    ensure!(err.contains("must be a plain file"), "{err}");

    // Names EC2 refuses, kernels that do not exist.
    let err = register_fails(&admin, &store, &["--file", path_str(&disk)?, "--name", "x"])?;
    ensure!(err.contains("spec.name"), "{err}");
    let err = register_fails(
        &admin,
        &store,
        &[
            "--file",
            path_str(&disk)?,
            "--kernel-id",
            "eki-0123456789abcdef0",
        ],
    )?;
    ensure!(
        err.contains("there is no kernel image eki-0123456789abcdef0"),
        "{err}"
    );

    let images: Api<Image> = Api::all(client);
    ensure!(
        images.list(&ListParams::default()).await?.items.is_empty(),
        "a failed register left a record"
    );

    // A name that is taken is refused before the copy: the store gets nothing more.
    register(
        &admin,
        &store,
        &["--file", path_str(&disk)?, "--name", "taken-name"],
    )?;
    let stored = || -> anyhow::Result<usize> { Ok(std::fs::read_dir(&store)?.count()) };
    let before = stored()?;
    let other = dir.path().join("other.img");
    std::fs::write(&other, pseudo_random(8192, 9))?;
    let err = register_fails(
        &admin,
        &store,
        &["--file", path_str(&other)?, "--name", "taken-name"],
    )?;
    ensure!(err.contains("exists already"), "{err}");
    ensure!(
        stored()? == before,
        "a register refused for its name stored its file"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_or_sigterm_during_an_upload_stops_it_and_leaves_no_temporary_file(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    let admin = gateway.kubeconfig(&tokens.admin, NS)?;
    for (signal, word, status) in [("INT", "interrupted", 130), ("TERM", "terminated", 143)] {
        stop_an_upload(&admin, (signal, word, status)).await?;
    }
    Ok(())
}

/// Starts `karri image register` of a large file, sends `signal` once its copy has begun, and
/// checks that it stops saying `word`, with exit status `status` (128 + the signal's number),
/// no temporary file and no record.
async fn stop_an_upload(
    admin: &Path,
    (signal, word, status): (&str, &str, i32),
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    // Sparse, so large to copy and hash yet cheap to make.
    let big = dir.path().join("big.img");
    std::fs::File::create(&big)?.set_len(8 << 30)?;
    let mut child = Command::new(bin_dir().join("karri"))
        .args(["--kubeconfig", path_str(admin)?])
        .args(["image", "register", "--store", path_str(&store)?])
        .args(["--file", path_str(&big)?])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Once the copy has begun (its temporary file exists), the signal.
    let parts = || -> Vec<String> {
        std::fs::read_dir(&store)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".upload-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let started = std::time::Instant::now();
    while parts().is_empty() {
        ensure!(
            child.try_wait()?.is_none(),
            "karri ended before its copy was seen"
        );
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the copy never began"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()?;
    ensure!(sent.success(), "kill -{signal} failed");
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(status),
        "{signal}: {:?}: {stderr}",
        out.status
    );
    ensure!(stderr.contains(word), "{signal}: {stderr}");
    ensure!(parts().is_empty(), "left behind: {:?}", parts());
    let images: Api<Image> = Api::all(admin_client(admin).await?);
    ensure!(
        images.list(&ListParams::default()).await?.items.is_empty(),
        "an interrupted register left a record"
    );
    Ok(())
}

/// The state letter of process `pid` (`T` stopped, `S` sleeping …), if it runs.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses, which may hold spaces.
    stat.rsplit_once(") ")?.1.chars().next()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_conversion_stops_qemu_img_too_and_leaves_no_temporary_file(
) -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let tokens = Tokens::generate(&[], &[]);
    let gateway = Gateway::start(&etcd.endpoint, &tokens).await?;
    let admin = gateway.kubeconfig(&tokens.admin, NS)?;
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let vmdk = dir.path().join("disk.vmdk");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vmdk"])
        .arg(&vmdk)
        .arg("64M")
        .status()?;
    ensure!(made.success(), "qemu-img create failed");
    // The real qemu-img, behind a wrapper that says its pid on a FIFO and stops itself before
    // it converts: a conversion that would run for ever. A SIGTERM sent to karri alone (not to
    // the terminal's process group, as a Ctrl-C is) must still end it.
    let real = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v qemu-img"])
            .output()?
            .stdout,
    )?;
    let fifo = dir.path().join("converting");
    let mkfifo = Command::new("mkfifo").arg(&fifo).status()?;
    ensure!(mkfifo.success(), "mkfifo failed");
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin)?;
    let wrapper = bin.join("qemu-img");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nif [ \"$1\" = convert ]; then echo $$ > '{}'; kill -STOP $$; fi\nexec {} \"$@\"\n",
            fifo.display(),
            real.trim()
        ),
    )?;
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let child = Command::new(bin_dir().join("karri"))
        .args(["--kubeconfig", path_str(&admin)?])
        .args(["image", "register", "--store", path_str(&store)?])
        .args(["--file", path_str(&vmdk)?])
        .env("PATH", path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let karri = child.id();
    // karri's end, whenever it comes, on a channel: the test waits on it with a deadline.
    let (ended_tx, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = ended_tx.send(child.wait_with_output());
    });
    // The wrapper's pid, once it is about to stop (reading the FIFO blocks until it writes).
    let (pid_tx, pid_rx) = std::sync::mpsc::channel();
    let reader = fifo.clone();
    std::thread::spawn(move || {
        let _ = pid_tx.send(std::fs::read_to_string(reader));
    });
    let deadline = Duration::from_secs(60);
    let converter: u32 = pid_rx
        .recv_timeout(deadline)
        .context("qemu-img convert never started")??
        .trim()
        .parse()?;
    let sent = Command::new("kill")
        .args(["-TERM", &karri.to_string()])
        .status()?;
    ensure!(sent.success(), "kill -TERM failed");
    // karri must end by itself; a karri still waiting for its stopped qemu-img fails the test.
    let out = match ended.recv_timeout(deadline) {
        Ok(out) => out?,
        Err(_) => {
            for pid in [karri, converter] {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            bail!("karri still waits for qemu-img {converter} after SIGTERM");
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(143), "{:?}: {stderr}", out.status);
    ensure!(stderr.contains("terminated"), "{stderr}");
    ensure!(
        process_state(converter).is_none(),
        "qemu-img {converter} still runs"
    );
    let left: Vec<String> = std::fs::read_dir(&store)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(left.is_empty(), "left in the store: {left:?}");
    Ok(())
}
