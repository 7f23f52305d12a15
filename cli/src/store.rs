//! The image store: where `karri image register` keeps image files for the nodes when they are
//! not uploaded to S3 (`--bucket`). Files are content-addressed, `<store>/<sha256>.<format>`, so registering the same
//! bytes twice stores them once.
//!
//! An upload is probed with `qemu-img info`; raw and qcow2 files are kept as they are, every
//! other format `qemu-img` reads is converted to qcow2. The bytes are written under a temporary
//! name in the store while they are hashed, synced, and only then renamed to their content
//! address, so a stored file is always complete.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::interrupt;
use crds::{DiskImageFormat, ImageType};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Read and write size while copying.
const CHUNK_BYTES: usize = 1 << 20;

/// Why an image cannot be stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file does not exist.
    #[error("{} does not exist", .0.display())]
    Missing(PathBuf),
    /// The path exists but is not a regular file.
    #[error("{} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    /// A file operation failed.
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// `qemu-img` is not installed.
    #[error("qemu-img is not installed (Debian package qemu-utils)")]
    NoQemuImg,
    /// `qemu-img` failed.
    #[error("qemu-img {what} {} failed: {message}", .path.display())]
    QemuImg {
        /// `info` or `convert`.
        what: &'static str,
        /// The image it was run on.
        path: PathBuf,
        /// Its error output.
        message: String,
    },
    /// `qemu-img info` printed something that is not its JSON.
    #[error("cannot read what qemu-img info says about {}: {message}", .path.display())]
    Probe {
        /// The image.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// Ctrl-C was pressed.
    #[error("interrupted")]
    Interrupted,
    /// The image cannot be registered as it is.
    #[error("{}: {reason}", .path.display())]
    Refused {
        /// The image.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl StoreError {
    fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// What `qemu-img info --output=json` says about a file (the fields Karri reads).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Probe {
    /// The detected format, e.g. `raw`, `qcow2`, `vmdk`.
    pub format: String,
    /// The backing file the image names, if any.
    #[serde(default)]
    pub backing_filename: Option<String>,
    /// Format-specific details (qcow2's external data file lives here).
    #[serde(default)]
    pub format_specific: Option<serde_json::Value>,
}

impl Probe {
    /// Parses the JSON that `qemu-img info --output=json` prints.
    pub fn parse(json: &[u8]) -> Result<Probe, serde_json::Error> {
        serde_json::from_slice(json)
    }

    /// The kind of a vmdk image (`monolithicSparse`, `monolithicFlat`, …), if given.
    fn vmdk_create_type(&self) -> Option<&str> {
        self.format_specific
            .as_ref()?
            .pointer("/data/create-type")?
            .as_str()
    }

    /// The external data file of a qcow2 image, if it has one.
    fn data_file(&self) -> Option<&str> {
        self.format_specific
            .as_ref()?
            .pointer("/data/data-file")?
            .as_str()
    }
}

/// What to do with an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Store the bytes as they are, in this format.
    Keep(DiskImageFormat),
    /// Convert from the named format to qcow2.
    Convert,
}

/// Decides how an image of `image_type` that `qemu-img` probed as `probe` is stored; the reason
/// it cannot be when it cannot.
pub fn plan(image_type: ImageType, probe: &Probe) -> Result<Plan, String> {
    if image_type != ImageType::Machine {
        // Kernels and ramdisks are handed to the hypervisor as files: never converted.
        return if probe.format == "raw" {
            Ok(Plan::Keep(DiskImageFormat::Raw))
        } else {
            Err(format!(
                "a {} image must be a plain file, but qemu-img sees a {} image",
                image_type.as_str(),
                probe.format
            ))
        };
    }
    // An image that names another file would have that file read into the stored image (by
    // qemu-img convert here, by QEMU on the node): refused, whatever the format.
    if let Some(backing) = &probe.backing_filename {
        return Err(format!(
            "the {} image has a backing file ({backing}); flatten it first with \
             `qemu-img convert -O qcow2 <image> <flat image>`",
            probe.format
        ));
    }
    match probe.format.as_str() {
        "raw" => Ok(Plan::Keep(DiskImageFormat::Raw)),
        "qcow2" => {
            if let Some(data) = probe.data_file() {
                return Err(format!(
                    "the qcow2 image keeps its data in an external file ({data}); convert it \
                     first with `qemu-img convert -O qcow2 <image> <flat image>`"
                ));
            }
            Ok(Plan::Keep(DiskImageFormat::Qcow2))
        }
        "vmdk" => {
            // Only the one-file kinds: a descriptor's extents may name any file on this host.
            let create_type = probe.vmdk_create_type().unwrap_or("unknown");
            if !matches!(create_type, "monolithicSparse" | "streamOptimized") {
                return Err(format!(
                    "the vmdk image is of the {create_type} kind, whose data lives in other \
                     files; only monolithicSparse and streamOptimized vmdk images are taken"
                ));
            }
            Ok(Plan::Convert)
        }
        format if CONVERTED.contains(&format) => Ok(Plan::Convert),
        other => Err(format!(
            "qemu-img sees a {other} image; Karri keeps raw and qcow2 images and converts {}",
            ["vmdk"]
                .iter()
                .chain(CONVERTED)
                .copied()
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Formats converted to qcow2 on upload besides vmdk: each keeps its data in the one file.
const CONVERTED: &[&str] = &["vdi", "vhdx", "vpc", "qed", "qcow"];

/// The percentage in one progress update of `qemu-img convert -p`, e.g. `    (42.17/100%)`.
pub fn parse_progress(line: &str) -> Option<f64> {
    let (_, rest) = line.split_once('(')?;
    let (percent, _) = rest.split_once('/')?;
    percent.trim().parse().ok()
}

/// The content address of a file of `sha256` in `format`.
pub fn stored_name(sha256: &str, format: DiskImageFormat) -> String {
    format!("{sha256}.{}", format.as_str())
}

/// An image file in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Absolute path, `<store>/<sha256>.<format>`.
    pub path: PathBuf,
    /// SHA-256 of its bytes, lower-case hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Its format.
    pub format: DiskImageFormat,
    /// Whether it was converted from another format (named here).
    pub converted_from: Option<String>,
    /// Whether the same bytes were already stored.
    pub reused: bool,
}

/// Checks that `file` is a readable regular file and probes it with `qemu-img info`.
pub fn probe(file: &Path) -> Result<Probe, StoreError> {
    match std::fs::metadata(file) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::Missing(file.to_owned()))
        }
        Err(e) => return Err(StoreError::io("read", file)(e)),
        Ok(m) if !m.is_file() => return Err(StoreError::NotAFile(file.to_owned())),
        Ok(_) => {}
    }
    // Opening it says plainly when it is unreadable (qemu-img would say it less plainly).
    File::open(file).map_err(StoreError::io("open", file))?;
    let out = qemu_img()
        .args(["info", "--force-share", "--output=json"])
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .map_err(spawn_error)?;
    if !out.status.success() {
        return Err(StoreError::QemuImg {
            what: "info",
            path: file.to_owned(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Probe::parse(&out.stdout).map_err(|e| StoreError::Probe {
        path: file.to_owned(),
        message: e.to_string(),
    })
}

/// Stores `file` (probed as `probe`) as an image of `image_type` in `store`, which is created
/// if missing. Progress bars go to the terminal on stderr, when there is one.
pub fn store(
    file: &Path,
    image_type: ImageType,
    probe: &Probe,
    store: &Path,
) -> Result<Stored, StoreError> {
    let plan = plan(image_type, probe).map_err(|reason| StoreError::Refused {
        path: file.to_owned(),
        reason,
    })?;
    std::fs::create_dir_all(store).map_err(StoreError::io("create", store))?;
    let store = store
        .canonicalize()
        .map_err(StoreError::io("resolve", store))?;
    let part = tempfile::Builder::new()
        .prefix(".upload-")
        .suffix(".part")
        .tempfile_in(&store)
        .map_err(StoreError::io("create a file in", &store))?;
    let _part_on_quit = interrupt::remove_on_quit(part.path());
    let (format, sha256, converted_from) = match plan {
        Plan::Keep(format) => {
            let mut src = File::open(file).map_err(StoreError::io("open", file))?;
            let len = src.metadata().map_err(StoreError::io("read", file))?.len();
            let sha = copy_hashing(&mut src, file, part.as_file(), part.path(), len)?;
            (format, sha, None)
        }
        Plan::Convert => {
            convert(file, &probe.format, part.path())?;
            let mut converted =
                File::open(part.path()).map_err(StoreError::io("open", part.path()))?;
            let len = converted
                .metadata()
                .map_err(StoreError::io("read", part.path()))?
                .len();
            let sha = hash(&mut converted, part.path(), len)?;
            (DiskImageFormat::Qcow2, sha, Some(probe.format.clone()))
        }
    };
    let target = store.join(stored_name(&sha256, format));
    let part_file = part.as_file();
    part_file
        .sync_all()
        .map_err(StoreError::io("sync", part.path()))?;
    let size = part_file
        .metadata()
        .map_err(StoreError::io("read", part.path()))?
        .len();
    // The same name was stored before. It is replaced all the same: the new file is known to
    // hash to its name, the old one only to have had it once.
    let reused = std::fs::metadata(&target).is_ok_and(|m| m.is_file() && m.len() == size);
    part_file
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(StoreError::io("set the mode of", part.path()))?;
    part.persist(&target)
        .map_err(|e| StoreError::io("rename into", &target)(e.error))?;
    File::open(&store)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("sync", &store))?;
    Ok(Stored {
        path: target,
        sha256,
        size,
        format,
        converted_from,
        reused,
    })
}

/// An image ready to upload elsewhere (S3): the file whose bytes are the image, hashed.
#[derive(Debug)]
pub struct Prepared {
    /// The file to upload: the original, or a converted copy in a temporary directory.
    pub path: PathBuf,
    /// SHA-256 of its bytes, lower-case hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Its format.
    pub format: DiskImageFormat,
    /// The format it was converted from, if it was.
    pub converted_from: Option<String>,
    /// The converted copy's directory, removed on drop (or by a second Ctrl-C meanwhile).
    _converted: Option<(tempfile::TempDir, interrupt::Registered)>,
}

/// Makes `file` (probed as `probe`) an image of `image_type` ready to upload: raw and qcow2
/// files as they are, other formats converted to qcow2 in a temporary directory; then hashed.
/// Progress bars go to the terminal on stderr, when there is one.
pub fn prepare(file: &Path, image_type: ImageType, probe: &Probe) -> Result<Prepared, StoreError> {
    let plan = plan(image_type, probe).map_err(|reason| StoreError::Refused {
        path: file.to_owned(),
        reason,
    })?;
    let (path, format, converted_from, converted) = match plan {
        Plan::Keep(format) => (file.to_owned(), format, None, None),
        Plan::Convert => {
            let dir = tempfile::Builder::new()
                .prefix("karri-convert-")
                .tempdir()
                .map_err(StoreError::io(
                    "create a directory in",
                    &std::env::temp_dir(),
                ))?;
            let on_quit = interrupt::remove_on_quit(dir.path());
            let target = dir.path().join("image.qcow2");
            convert(file, &probe.format, &target)?;
            (
                target,
                DiskImageFormat::Qcow2,
                Some(probe.format.clone()),
                Some((dir, on_quit)),
            )
        }
    };
    let mut opened = File::open(&path).map_err(StoreError::io("open", &path))?;
    let size = opened
        .metadata()
        .map_err(StoreError::io("read", &path))?
        .len();
    let sha256 = hash(&mut opened, &path, size)?;
    Ok(Prepared {
        path,
        sha256,
        size,
        format,
        converted_from,
        _converted: converted,
    })
}

fn qemu_img() -> Command {
    Command::new("qemu-img")
}

fn spawn_error(e: io::Error) -> StoreError {
    if e.kind() == io::ErrorKind::NotFound {
        StoreError::NoQemuImg
    } else {
        StoreError::Io {
            action: "run",
            path: PathBuf::from("qemu-img"),
            source: e,
        }
    }
}

/// A byte progress bar of `len` bytes labelled `what`, on stderr when it is a terminal.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}

/// Lower-case hex of a digest.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Copies `src` to `dst` (an empty file) while hashing; runs of zeros become holes, so sparse
/// raw images stay sparse. Returns the SHA-256.
fn copy_hashing(
    src: &mut File,
    src_path: &Path,
    mut dst: &File,
    dst_path: &Path,
    len: u64,
) -> Result<String, StoreError> {
    let progress = bar(len, "copying");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut written = 0u64;
    loop {
        if interrupt::interrupted() {
            return Err(StoreError::Interrupted);
        }
        let n = read_full(src, &mut buf).map_err(StoreError::io("read", src_path))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        hasher.update(chunk);
        if chunk.iter().all(|b| *b == 0) {
            dst.seek(SeekFrom::Current(n as i64))
                .map_err(StoreError::io("write", dst_path))?;
        } else {
            dst.write_all(chunk)
                .map_err(StoreError::io("write", dst_path))?;
        }
        written += n as u64;
        progress.inc(n as u64);
    }
    // A trailing hole needs the length set explicitly.
    dst.set_len(written)
        .map_err(StoreError::io("write", dst_path))?;
    progress.finish_and_clear();
    Ok(hex(&hasher.finalize()))
}

/// The SHA-256 of what `file` holds.
fn hash(file: &mut File, path: &Path, len: u64) -> Result<String, StoreError> {
    let progress = bar(len, "hashing");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        if interrupt::interrupted() {
            return Err(StoreError::Interrupted);
        }
        let n = read_full(file, &mut buf).map_err(StoreError::io("read", path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        progress.inc(n as u64);
    }
    progress.finish_and_clear();
    Ok(hex(&hasher.finalize()))
}

/// Reads until `buf` is full or the file ends; the number of bytes read.
fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// `qemu-img convert -p -O qcow2 src dst`, its progress on a bar.
fn convert(src: &Path, from: &str, dst: &Path) -> Result<(), StoreError> {
    let mut child = qemu_img()
        .args(["convert", "-p", "-f", from, "-O", "qcow2"])
        .arg(src)
        .arg(dst)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    // A SIGTERM or SIGHUP for this process alone stops qemu-img too, however long it would
    // have run.
    let killed_on_stop = interrupt::kill_on_stop(child.id());
    let progress = ProgressBar::new(10_000);
    let style = ProgressStyle::with_template("{msg:>10} [{bar:40}] {percent}% eta {eta}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    progress.set_style(style);
    progress.set_message(format!("{from}→qcow2"));
    // Reads stderr on its own thread, so that neither pipe can fill up and block qemu-img.
    let stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = e.read_to_string(&mut text);
            text
        })
    });
    if let Some(stdout) = child.stdout.take() {
        // Updates end with '\r'; the last with "\r\n".
        for update in BufReader::new(stdout).split(b'\r') {
            let Ok(update) = update else { break };
            if let Some(percent) = parse_progress(&String::from_utf8_lossy(&update)) {
                progress.set_position((percent * 100.0) as u64);
            }
        }
    }
    // Until qemu-img is reaped its pid cannot be reused: wait for its exit without reaping it,
    // forget it (no kill may reach another process with its pid), then reap it.
    if let Some(pid) = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::waitid(
            rustix::process::WaitId::Pid(pid),
            rustix::process::WaitIdOptions::EXITED | rustix::process::WaitIdOptions::NOWAIT,
        );
    }
    drop(killed_on_stop);
    let status = child.wait().map_err(spawn_error)?;
    progress.finish_and_clear();
    // qemu-img got the same Ctrl-C (it is in the terminal's process group) or was killed.
    if interrupt::interrupted() {
        return Err(StoreError::Interrupted);
    }
    let message = stderr
        .and_then(|t| t.join().ok())
        .unwrap_or_default()
        .trim()
        .to_owned();
    if !status.success() {
        return Err(StoreError::QemuImg {
            what: "convert",
            path: src.to_owned(),
            message: if message.is_empty() {
                status.to_string()
            } else {
                message
            },
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probed(json: &str) -> Probe {
        Probe::parse(json.as_bytes()).expect("qemu-img JSON")
    }

    #[test]
    fn raw_and_qcow2_machine_images_are_kept_and_other_formats_converted() {
        let raw = probed(r#"{"virtual-size": 512, "format": "raw", "actual-size": 4096}"#);
        let qcow2 = probed(
            r#"{"format": "qcow2", "format-specific": {"type": "qcow2", "data": {"compat": "1.1"}}}"#,
        );
        let vmdk = probed(
            r#"{"format": "vmdk", "format-specific": {"type": "vmdk", "data": {"create-type": "monolithicSparse"}}}"#,
        );
        assert_eq!(
            plan(ImageType::Machine, &raw),
            Ok(Plan::Keep(DiskImageFormat::Raw))
        );
        assert_eq!(
            plan(ImageType::Machine, &qcow2),
            Ok(Plan::Keep(DiskImageFormat::Qcow2))
        );
        assert_eq!(plan(ImageType::Machine, &vmdk), Ok(Plan::Convert));
    }

    #[test]
    fn a_qcow2_with_a_backing_or_external_data_file_is_refused() {
        let backed = probed(
            r#"{"format": "qcow2", "backing-filename": "base.qcow2", "full-backing-filename": "/x/base.qcow2"}"#,
        );
        let err = plan(ImageType::Machine, &backed).expect_err("refused");
        assert!(err.contains("backing file (base.qcow2)"), "{err}");
        let external = probed(
            r#"{"format": "qcow2", "format-specific": {"type": "qcow2", "data": {"data-file": "/etc/shadow"}}}"#,
        );
        let err = plan(ImageType::Machine, &external).expect_err("refused");
        assert!(err.contains("/etc/shadow"), "{err}");
    }

    #[test]
    fn an_image_that_would_pull_in_other_files_or_is_of_an_unknown_format_is_refused() {
        for (json, says) in [
            // Backing files, whatever the format.
            (
                r#"{"format": "qed", "backing-filename": "/etc/shadow"}"#,
                "the qed image has a backing file (/etc/shadow)",
            ),
            (
                r#"{"format": "vmdk", "backing-filename": "parent.vmdk", "format-specific": {"type": "vmdk", "data": {"create-type": "monolithicSparse"}}}"#,
                "backing file (parent.vmdk)",
            ),
            // vmdk descriptors whose extents are other files.
            (
                r#"{"format": "vmdk", "format-specific": {"type": "vmdk", "data": {"create-type": "monolithicFlat", "extents": [{"filename": "/dev/sda"}]}}}"#,
                "monolithicFlat kind",
            ),
            (
                r#"{"format": "vmdk", "format-specific": {"type": "vmdk", "data": {"create-type": "twoGbMaxExtentSparse"}}}"#,
                "twoGbMaxExtentSparse kind",
            ),
            (r#"{"format": "vmdk"}"#, "unknown kind"),
            // Formats Karri does not convert.
            (r#"{"format": "dmg"}"#, "qemu-img sees a dmg image"),
            (r#"{"format": "luks"}"#, "qemu-img sees a luks image"),
        ] {
            let err = plan(ImageType::Machine, &probed(json)).expect_err(json);
            assert!(err.contains(says), "{json}: {err}");
        }
        for format in ["vdi", "vhdx", "vpc", "qed", "qcow"] {
            let json = format!(r#"{{"format": "{format}"}}"#);
            assert_eq!(plan(ImageType::Machine, &probed(&json)), Ok(Plan::Convert));
        }
        let stream = probed(
            r#"{"format": "vmdk", "format-specific": {"type": "vmdk", "data": {"create-type": "streamOptimized"}}}"#,
        );
        assert_eq!(plan(ImageType::Machine, &stream), Ok(Plan::Convert));
    }

    #[test]
    fn kernels_and_ramdisks_must_be_plain_files() {
        let raw = probed(r#"{"format": "raw"}"#);
        let qcow2 = probed(r#"{"format": "qcow2"}"#);
        assert_eq!(
            plan(ImageType::Kernel, &raw),
            Ok(Plan::Keep(DiskImageFormat::Raw))
        );
        assert_eq!(
            plan(ImageType::Ramdisk, &raw),
            Ok(Plan::Keep(DiskImageFormat::Raw))
        );
        let err = plan(ImageType::Kernel, &qcow2).expect_err("refused");
        assert!(err.contains("kernel image must be a plain file"), "{err}");
    }

    #[test]
    fn convert_progress_updates_give_their_percentage() {
        assert_eq!(parse_progress("    (0.00/100%)"), Some(0.0));
        assert_eq!(parse_progress("    (42.17/100%)"), Some(42.17));
        assert_eq!(parse_progress("\n"), None);
        assert_eq!(parse_progress("garbage"), None);
    }

    #[test]
    fn stored_files_are_named_by_content_and_format() {
        assert_eq!(
            stored_name("ab12", DiskImageFormat::Qcow2),
            "ab12.qcow2".to_owned()
        );
        assert_eq!(stored_name("ab12", DiskImageFormat::Raw), "ab12.raw");
    }

    #[test]
    fn a_sparse_file_is_stored_sparse_with_its_sha256() -> Result<(), StoreError> {
        let dir = tempfile::tempdir().map_err(StoreError::io("create", Path::new("/tmp")))?;
        let src_path = dir.path().join("disk.img");
        {
            let f = File::create(&src_path).map_err(StoreError::io("create", &src_path))?;
            f.set_len(3 * CHUNK_BYTES as u64)
                .map_err(StoreError::io("write", &src_path))?;
            let mut f = &f;
            f.write_all(b"karri")
                .map_err(StoreError::io("write", &src_path))?;
        }
        let probe = Probe {
            format: "raw".into(),
            backing_filename: None,
            format_specific: None,
        };
        let store_dir = dir.path().join("store");
        let first = store(&src_path, ImageType::Machine, &probe, &store_dir)?;
        let bytes = std::fs::read(&first.path).map_err(StoreError::io("read", &first.path))?;
        let source = std::fs::read(&src_path).map_err(StoreError::io("read", &src_path))?;
        assert_eq!(bytes, source);
        assert_eq!(first.sha256, hex(&Sha256::digest(&source)));
        assert_eq!(first.size, 3 * CHUNK_BYTES as u64);
        assert!(first.path.ends_with(format!("{}.raw", first.sha256)));
        assert!(!first.reused);
        // A stored file of the right size whose bytes went bad is replaced by storing again.
        std::fs::write(&first.path, vec![0u8; 3 * CHUNK_BYTES])
            .map_err(StoreError::io("write", &first.path))?;
        let again = store(&src_path, ImageType::Machine, &probe, &store_dir)?;
        assert!(again.reused);
        assert_eq!(again.path, first.path);
        let repaired = std::fs::read(&first.path).map_err(StoreError::io("read", &first.path))?;
        assert!(repaired == source, "the stored file was not repaired");
        // Only the stored file remains: no temporary files left behind.
        let entries = std::fs::read_dir(&store_dir)
            .map_err(StoreError::io("list", &store_dir))?
            .count();
        assert_eq!(entries, 1);
        Ok(())
    }
}
