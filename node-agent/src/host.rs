//! Facts about the host the agent runs on: its capacity, and which hypervisor it offers.
//!
//! The readers of `/proc`, `/dev/kvm` and the file system are thin; what can be decided without
//! them ([`parse_mem_total_mib`], [`choose_domain_type`], [`hypervisor_name`]) is pure and tested.

use std::path::Path;

use crate::domain::DomainType;

/// Disk capacity reported when the data directory cannot be measured, in GiB.
pub const DEFAULT_DISK_GIB: u64 = 20;

/// URI scheme of the libvirt test driver (`test:///default`).
const TEST_SCHEME: &str = "test";

/// How many CPUs the agent may use (the process's CPU affinity, like `nproc`); 1 if unknown.
pub fn cpus() -> u32 {
    std::thread::available_parallelism()
        .ok()
        .and_then(|n| u32::try_from(n.get()).ok())
        .unwrap_or(1)
}

/// Total memory from `/proc/meminfo`, in MiB; `None` if it cannot be read.
pub fn memory_mib() -> Option<u64> {
    parse_mem_total_mib(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// `MemTotal` of a `/proc/meminfo` text (given in kB), in MiB.
pub fn parse_mem_total_mib(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut words = line["MemTotal:".len()..].split_whitespace();
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") | None => Some(kib / 1024),
        Some(_) => None,
    }
}

/// The disk, in GiB, that Karri's data at `dir` may take: what is free on its file system plus
/// what `dir` holds already (its instances' disks and cached images, so that a restart does not
/// count them against it); not the file system's whole size, most of which may hold other
/// things. `None` if it cannot be measured.
pub fn disk_gib(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    let free = st.f_bavail.checked_mul(st.f_frsize)?;
    Some(free.saturating_add(bytes_held(dir)) / (1024 * 1024 * 1024))
}

/// Bytes the files under `dir` take on disk (allocated blocks: sparse disks count what they
/// hold), not following symbolic links; what cannot be read counts nothing.
pub fn bytes_held(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total = total.saturating_add(meta.blocks().saturating_mul(512));
            }
        }
    }
    total
}

/// Whether `/dev/kvm` opens for reading and writing, as QEMU needs it.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The scheme of a libvirt URI: `qemu` for `qemu:///system`, `qemu+ssh` for a remote one.
fn scheme(uri: &str) -> &str {
    uri.split_once(':').map_or(uri, |(scheme, _)| scheme)
}

/// Whether the URI names the QEMU driver (`qemu:///system`, `qemu+unix:///session` ...).
pub fn is_qemu_uri(uri: &str) -> bool {
    let scheme = scheme(uri);
    scheme == "qemu" || scheme.starts_with("qemu+")
}

/// Whether the URI names libvirt's test driver.
pub fn is_test_uri(uri: &str) -> bool {
    let scheme = scheme(uri);
    scheme == TEST_SCHEME || scheme.starts_with("test+")
}

/// The domain type guests get: what the Node's hints force, else KVM when the URI is QEMU's
/// and `/dev/kvm` works, else QEMU's emulation (TCG).
pub fn choose_domain_type(hint: Option<DomainType>, uri: &str, kvm_usable: bool) -> DomainType {
    match hint {
        Some(forced) => forced,
        None if is_qemu_uri(uri) && kvm_usable => DomainType::Kvm,
        None => DomainType::Qemu,
    }
}

/// What the Node's `status.hypervisor` says: `test` on the test driver, else the domain type
/// (`kvm` or `qemu`).
pub fn hypervisor_name(uri: &str, domain_type: DomainType) -> &'static str {
    if is_test_uri(uri) {
        TEST_SCHEME
    } else {
        domain_type.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_offered_is_what_is_free_plus_what_the_data_directory_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = disk_gib(dir.path()).expect("measured");
        let nested = dir.path().join("instances/i-1");
        std::fs::create_dir_all(&nested).expect("mkdir");
        std::fs::write(nested.join("root.qcow2"), vec![1u8; 3 << 20]).expect("write");
        assert!(bytes_held(dir.path()) >= 3 << 20, "the file's blocks count");
        // Its own files do not shrink what it is offered (within rounding to GiB).
        let after = disk_gib(dir.path()).expect("measured");
        assert!(
            after + 1 >= empty && after <= empty + 1,
            "{empty} GiB, then {after} GiB"
        );
        // A directory that does not exist is not measured (the agent makes its own first).
        assert_eq!(disk_gib(&dir.path().join("missing")), None);
    }

    #[test]
    fn mem_total_is_read_in_mib() {
        let meminfo = "MemTotal:        8039448 kB\nMemFree:          412340 kB\n";
        assert_eq!(parse_mem_total_mib(meminfo), Some(7851));
        assert_eq!(parse_mem_total_mib("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total_mib("MemTotal: lots kB\n"), None);
        assert_eq!(parse_mem_total_mib("MemTotal: 1024 MB\n"), None);
    }

    #[test]
    fn kvm_only_for_qemu_uris_with_a_usable_dev_kvm() {
        let rows = [
            (None, "qemu:///system", true, DomainType::Kvm),
            (None, "qemu+ssh://host/system", true, DomainType::Kvm),
            (None, "qemu:///system", false, DomainType::Qemu),
            (None, "test:///default", true, DomainType::Qemu),
            (
                Some(DomainType::Qemu),
                "qemu:///system",
                true,
                DomainType::Qemu,
            ),
            (
                Some(DomainType::Kvm),
                "qemu:///system",
                false,
                DomainType::Kvm,
            ),
        ];
        for (hint, uri, kvm, expected) in rows {
            assert_eq!(
                choose_domain_type(hint, uri, kvm),
                expected,
                "{hint:?} {uri} {kvm}"
            );
        }
    }

    #[test]
    fn hypervisor_is_named_after_the_driver_and_domain_type() {
        assert_eq!(hypervisor_name("test:///default", DomainType::Qemu), "test");
        assert_eq!(hypervisor_name("qemu:///system", DomainType::Kvm), "kvm");
        assert_eq!(hypervisor_name("qemu:///system", DomainType::Qemu), "qemu");
    }

    #[test]
    fn the_root_file_system_has_a_size() {
        assert!(disk_gib(Path::new("/")).is_some());
        assert_eq!(disk_gib(Path::new("/no/such/dir/anywhere")), None);
    }
}
