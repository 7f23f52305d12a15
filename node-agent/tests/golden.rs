//! Golden files: `domain::render` must produce `tests/golden/<case>.xml` byte for byte.
//!
//! After an intended change to the XML, rewrite the files with
//! `KARRI_UPDATE_GOLDEN=1 cargo nextest run -p node-agent --test golden` and review the diff.

use std::path::PathBuf;

use node_agent::domain::{
    domain_name, ownership, render, DiskFormat, DiskSpec, DomainSpec, DomainType, KernelBoot,
    NicSpec, Owner,
};

const UPDATE_VAR: &str = "KARRI_UPDATE_GOLDEN";

fn golden_path(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
        .join(format!("{case}.xml"))
}

/// Compares `actual` with the golden file of `case`, or rewrites it when `KARRI_UPDATE_GOLDEN=1`.
fn assert_golden(case: &str, actual: &str) {
    let path = golden_path(case);
    if std::env::var(UPDATE_VAR).as_deref() == Ok("1") {
        std::fs::write(&path, actual).expect("golden file is writable");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read golden file {}: {e}\n\
             create it with {UPDATE_VAR}=1 cargo nextest run -p node-agent --test golden",
            path.display()
        )
    });
    if expected == actual {
        return;
    }
    let line = expected
        .lines()
        .zip(actual.lines())
        .position(|(e, a)| e != a)
        .unwrap_or_else(|| expected.lines().count().min(actual.lines().count()));
    panic!(
        "domain XML for case `{case}` differs from golden file {} at line {}; \
         if the change is intended, rewrite the golden files with \
         {UPDATE_VAR}=1 cargo nextest run -p node-agent --test golden, and review the diff\n\
         expected: {:?}\n\
         actual:   {:?}\n\
         full output:\n{actual}",
        path.display(),
        line + 1,
        expected.lines().nth(line).unwrap_or("<end of file>"),
        actual.lines().nth(line).unwrap_or("<end of output>"),
    );
}

fn qemu_without_disk() -> DomainSpec {
    DomainSpec {
        name: domain_name("i-0123456789abcdef0"),
        uid: "6f1f8d2e-1c1a-4d1e-9a55-2c7c1b7a0b11".into(),
        instance_id: "i-0123456789abcdef0".into(),
        namespace: "default".into(),
        node: "node-1".into(),
        instance_type: "m1.small".into(),
        vcpus: 1,
        memory_mib: 256,
        domain_type: DomainType::Qemu,
        disk: None,
        kernel: None,
        nic: None,
        console_log: None,
    }
}

fn kvm_with_qcow2_disk() -> DomainSpec {
    DomainSpec {
        name: domain_name("i-00000000000000abc"),
        uid: "0d5a3c4e-7f21-4b8e-8c1d-9e2f3a4b5c6d".into(),
        instance_id: "i-00000000000000abc".into(),
        namespace: "acct-000000000042".into(),
        node: "hv-07.rack-a".into(),
        instance_type: "m1.large".into(),
        vcpus: 4,
        memory_mib: 8192,
        domain_type: DomainType::Kvm,
        disk: Some(DiskSpec {
            path: "/var/lib/karri/instances/i-00000000000000abc/root.qcow2".into(),
            format: DiskFormat::Qcow2,
        }),
        kernel: None,
        nic: None,
        console_log: None,
    }
}

fn needs_escaping() -> DomainSpec {
    DomainSpec {
        name: domain_name("i-<0&1>'2\""),
        uid: "A1B2C3D4-E5F6-4A7B-8C9D-0E1F2A3B4C5D".into(),
        instance_id: "i-<0&1>'2\"".into(),
        namespace: "ns <&> 'quoted' \"double\" é".into(),
        node: "node <&> 'q' \"d\" ü".into(),
        instance_type: "t&t<1>".into(),
        vcpus: 2,
        memory_mib: 512,
        domain_type: DomainType::Qemu,
        disk: Some(DiskSpec {
            path: "/srv/karri/a&b/'quoted' \"disk\" <1>.qcow2".into(),
            format: DiskFormat::Qcow2,
        }),
        kernel: None,
        nic: None,
        console_log: None,
    }
}

/// The micro image as the agent boots it: kernel and ramdisk from the image cache, a qcow2
/// overlay over the machine image, a NIC on the node's bridge, the console logged to a file.
fn micro_image_with_kernel_nic_and_console_log() -> DomainSpec {
    DomainSpec {
        name: domain_name("i-0000000000000d00d"),
        uid: "3b7e1c52-9f0a-4c6d-8e2b-1a2b3c4d5e6f".into(),
        instance_id: "i-0000000000000d00d".into(),
        namespace: "acme".into(),
        node: "node-1".into(),
        instance_type: "t1.micro".into(),
        vcpus: 1,
        memory_mib: 256,
        domain_type: DomainType::Qemu,
        disk: Some(DiskSpec {
            path: "/var/lib/karri/instances/i-0000000000000d00d/root.qcow2".into(),
            format: DiskFormat::Qcow2,
        }),
        kernel: Some(KernelBoot {
            kernel: "/var/lib/karri/images/sha256/aa".into(),
            initrd: Some("/var/lib/karri/images/sha256/bb".into()),
            cmdline: "console=ttyS0 panic=-1".into(),
        }),
        nic: Some(NicSpec {
            mac: "02:00:ac:1f:00:04".into(),
            bridge: "karri0".into(),
            tap: "k0200ac1f0004".into(),
        }),
        console_log: Some("/var/lib/karri/console/i-0000000000000d00d.log".into()),
    }
}

fn cases() -> [(&'static str, DomainSpec); 4] {
    [
        ("qemu_without_disk", qemu_without_disk()),
        ("kvm_with_qcow2_disk", kvm_with_qcow2_disk()),
        ("name_and_namespace_needing_escaping", needs_escaping()),
        (
            "micro_image_with_kernel_nic_and_console_log",
            micro_image_with_kernel_nic_and_console_log(),
        ),
    ]
}

#[test]
fn micro_image_domain_with_kernel_nic_and_console_log_matches_golden_file() {
    let xml = render(&micro_image_with_kernel_nic_and_console_log()).expect("renders");
    assert_golden("micro_image_with_kernel_nic_and_console_log", &xml);
}

#[test]
fn qemu_domain_without_disk_matches_golden_file() {
    let xml = render(&qemu_without_disk()).expect("renders");
    assert_golden("qemu_without_disk", &xml);
}

#[test]
fn kvm_domain_with_qcow2_disk_matches_golden_file() {
    let xml = render(&kvm_with_qcow2_disk()).expect("renders");
    assert_golden("kvm_with_qcow2_disk", &xml);
}

#[test]
fn domain_with_name_and_namespace_needing_escaping_matches_golden_file() {
    let xml = render(&needs_escaping()).expect("renders");
    assert_golden("name_and_namespace_needing_escaping", &xml);
}

#[test]
fn golden_cases_read_back_the_owner_they_were_rendered_for() {
    for (case, spec) in cases() {
        // What the golden tests pin; rendered here so that this test never races their rewrite.
        let xml = render(&spec).expect("renders");
        assert_eq!(
            ownership(&xml),
            Some(Owner {
                uid: spec.uid.clone(),
                instance_id: spec.instance_id.clone(),
                namespace: spec.namespace.clone(),
                node: spec.node.clone(),
            }),
            "{case}"
        );
        assert_eq!(
            node_agent::domain::name_of(&xml).as_deref(),
            Some(spec.name.as_str()),
            "{case}"
        );
    }
}

#[test]
fn rendering_is_deterministic() {
    for (case, spec) in cases() {
        assert_eq!(render(&spec).ok(), render(&spec).ok(), "{case}");
    }
}

/// The agent defines domains without libvirt's per-call schema validation (which reparses the
/// whole RelaxNG schema on every define), so the schema check lives here: every rendered case
/// must validate against the installed libvirt's `domain` schema (`virt-xml-validate`, from
/// Debian's libvirt-clients, which `make setup` installs).
#[test]
fn every_rendered_case_is_valid_against_libvirts_domain_schema() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (case, spec) in cases() {
        let xml = render(&spec).expect("renders");
        let path = dir.path().join(format!("{case}.xml"));
        std::fs::write(&path, &xml).expect("the temporary file is writable");
        let out = std::process::Command::new("virt-xml-validate")
            .arg(&path)
            .arg("domain")
            .output()
            .expect("virt-xml-validate runs (package libvirt-clients)");
        assert!(
            out.status.success(),
            "{case}: libvirt's domain schema refuses the rendered XML:\n{}{}\n{xml}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The check above can fail: XML that libvirt's schema refuses is reported.
#[test]
fn schema_check_refuses_a_domain_libvirt_would_reinterpret() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let xml = render(&qemu_without_disk()).expect("renders").replacen(
        "<memory",
        "<memroy-typo/><memory",
        1,
    );
    let path = dir.path().join("typo.xml");
    std::fs::write(&path, &xml).expect("the temporary file is writable");
    let out = std::process::Command::new("virt-xml-validate")
        .arg(&path)
        .arg("domain")
        .output()
        .expect("virt-xml-validate runs (package libvirt-clients)");
    assert!(
        !out.status.success(),
        "a misspelt element passed the schema"
    );
}
