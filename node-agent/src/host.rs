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

/// Size of the file system holding `dir`, in GiB; `None` if it cannot be measured.
pub fn disk_gib(dir: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(dir).ok()?;
    let bytes = st.f_blocks.checked_mul(st.f_frsize)?;
    Some(bytes / (1024 * 1024 * 1024))
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
