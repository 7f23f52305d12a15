//! Helpers shared by the integration tests.

#![allow(dead_code, reason = "each test crate uses a part")]

use node_agent::domain::{domain_name, render, DomainSpec, DomainType};
use node_agent::hypervisor::LibvirtHypervisor;

/// The libvirt test driver. Its state belongs to the process and lives while at least one
/// connection to it is open; it starts with one running domain, `test`, that is not Karri's.
pub const TEST_URI: &str = "test:///default";

/// Name of the test driver's built-in domain.
pub const BUILTIN_DOMAIN: &str = "test";

/// The node the tests' hypervisors serve.
pub const NODE: &str = "node-1";

/// Another node whose agent shares the host (the same libvirt) in some tests.
pub const OTHER_NODE: &str = "node-2";

/// A connection to the test driver for [`NODE`], kept for the whole test.
pub async fn test_driver() -> LibvirtHypervisor {
    test_driver_for(NODE).await
}

/// A connection to the test driver for `node`, kept for the whole test.
pub async fn test_driver_for(node: &str) -> LibvirtHypervisor {
    LibvirtHypervisor::connect(TEST_URI, node)
        .await
        .expect("the libvirt test driver opens")
}

/// A UID for test `n`, variant `v` (a valid UUID).
pub fn uid(n: u16, v: u16) -> String {
    format!("6f1f8d2e-{n:04x}-4d1e-9a55-{v:012x}")
}

/// A small QEMU domain of [`NODE`] for instance `i-<tag padded>` owned by `uid` in namespace
/// `ns-test`.
pub fn spec(tag: &str, uid: &str) -> DomainSpec {
    spec_for(NODE, tag, uid)
}

/// Like [`spec`], for a domain of `node`.
pub fn spec_for(node: &str, tag: &str, uid: &str) -> DomainSpec {
    let instance_id = format!("i-{tag:0>17}");
    DomainSpec {
        name: domain_name(&instance_id),
        uid: uid.to_owned(),
        instance_id,
        namespace: "ns-test".into(),
        node: node.into(),
        instance_type: "m1.small".into(),
        vcpus: 1,
        memory_mib: 128,
        domain_type: DomainType::Qemu,
        disk: None,
        kernel: None,
        nic: None,
        console_log: None,
    }
}

/// `spec` rendered.
pub fn xml(spec: &DomainSpec) -> String {
    render(spec).expect("the test spec renders")
}

/// A domain without Karri metadata, as another tool on the host would define it.
pub fn foreign_xml(name: &str) -> String {
    format!(
        "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\
         <metadata><other:note xmlns:other='urn:example:other'>mine</other:note></metadata>\
         </domain>"
    )
}
