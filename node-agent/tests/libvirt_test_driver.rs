//! `LibvirtHypervisor` against the real libvirt test driver (`test:///default`), in process.
//!
//! The test driver keeps its domains in process-wide state that lives while a connection to it is
//! open, so each test keeps its hypervisor (one connection) for its whole life, and uses domain
//! names of its own so that tests sharing a process (`cargo test`) do not see each other's.

mod common;

use common::{
    foreign_xml, spec, spec_for, test_driver, test_driver_for, uid, xml, BUILTIN_DOMAIN, NODE,
    OTHER_NODE, TEST_URI,
};
use node_agent::hypervisor::{Hypervisor, HypervisorError, LibvirtHypervisor};
use node_agent::plan::DomainState;
use virt::connect::Connect;

/// A second, raw connection to the test driver: it sees the same domains while the
/// hypervisor's connection is open.
fn raw() -> Connect {
    Connect::open(Some(TEST_URI)).expect("the libvirt test driver opens")
}

/// (state, id) of any domain, Karri's or not, through a raw connection.
fn raw_state(conn: &Connect, name: &str) -> Option<(bool, Option<u32>)> {
    let dom = conn.lookup_domain_by_name(name).ok()?;
    Some((dom.is_active().ok()?, dom.id()))
}

#[tokio::test]
async fn rendered_domain_is_defined_started_listed_stopped_and_removed() {
    let hv = test_driver().await;
    let spec = spec("a1", &uid(1, 1));
    let name = spec.name.clone();

    hv.define(&xml(&spec)).await.expect("defines");
    let seen = hv.observe(&name).await.expect("observes").expect("exists");
    assert_eq!(seen.state, DomainState::ShutOff);
    assert_eq!(seen.id, None);
    assert!(seen.defined);

    hv.start(&name).await.expect("starts");
    let listed = hv.list_ours().await.expect("lists");
    let seen = listed
        .iter()
        .find(|d| d.name == name)
        .expect("list_ours sees the domain");
    assert_eq!(seen.uid, spec.uid);
    assert_eq!(seen.instance_id, spec.instance_id);
    assert_eq!(seen.namespace, spec.namespace);
    assert_eq!(seen.state, DomainState::Running);
    assert!(seen.id.is_some(), "a running domain has an ID");

    hv.shutdown(&name).await.expect("shuts down");
    let seen = hv.observe(&name).await.expect("observes").expect("exists");
    assert_eq!(
        seen.state,
        DomainState::ShutOff,
        "the test driver's guests obey the power button at once"
    );

    hv.start(&name).await.expect("starts again");
    hv.destroy(&name).await.expect("destroys");
    let seen = hv.observe(&name).await.expect("observes").expect("exists");
    assert_eq!(seen.state, DomainState::ShutOff);

    hv.undefine(&name).await.expect("undefines");
    assert_eq!(hv.observe(&name).await.expect("observes"), None);
    let listed = hv.list_ours().await.expect("lists");
    assert!(listed.iter().all(|d| d.name != name), "{listed:?}");
}

#[tokio::test]
async fn domain_without_karri_metadata_is_never_listed_or_touched() {
    let hv = test_driver().await;
    let raw = raw();
    let foreign = "someone-elses-vm-b1";
    raw.define_domain_xml(&foreign_xml(foreign))
        .expect("defines the foreign domain")
        .create()
        .expect("starts the foreign domain");
    let before = raw_state(&raw, foreign);
    let builtin_before = raw_state(&raw, BUILTIN_DOMAIN);
    assert_eq!(builtin_before.map(|(active, _)| active), Some(true));

    let listed = hv.list_ours().await.expect("lists");
    assert!(
        listed
            .iter()
            .all(|d| d.name != foreign && d.name != BUILTIN_DOMAIN),
        "{listed:?}"
    );

    for name in [foreign, BUILTIN_DOMAIN] {
        for result in [
            hv.observe(name).await.map(|_| ()),
            hv.start(name).await,
            hv.shutdown(name).await,
            hv.destroy(name).await,
            hv.undefine(name).await,
        ] {
            assert!(
                matches!(result, Err(HypervisorError::NotOurs { .. })),
                "{name}: {result:?}"
            );
        }
    }
    // Karri's XML under a foreign domain's name must not replace it either.
    let mut hijack = spec("b1", &uid(2, 1));
    hijack.name = foreign.to_owned();
    let result = hv.define(&xml(&hijack)).await;
    assert!(
        matches!(result, Err(HypervisorError::NotOurs { .. })),
        "{result:?}"
    );

    assert_eq!(raw_state(&raw, foreign), before, "same state, same ID");
    assert_eq!(raw_state(&raw, BUILTIN_DOMAIN), builtin_before);
    let xml_after = raw
        .lookup_domain_by_name(foreign)
        .and_then(|d| d.xml_desc(0))
        .expect("still defined");
    assert!(xml_after.contains("urn:example:other"), "{xml_after}");
}

#[tokio::test]
async fn domain_of_another_node_is_never_listed_or_touched() {
    let hv = test_driver().await;
    let other = test_driver_for(OTHER_NODE).await;
    let raw = raw();
    let theirs = spec_for(OTHER_NODE, "k1", &uid(11, 1));
    let name = theirs.name.clone();
    other
        .define(&xml(&theirs))
        .await
        .expect("the other node defines");
    other.start(&name).await.expect("the other node starts");
    let before = raw_state(&raw, &name);
    assert_eq!(before.map(|(active, _)| active), Some(true));

    let listed = hv.list_ours().await.expect("lists");
    assert!(listed.iter().all(|d| d.name != name), "{listed:?}");
    for result in [
        hv.observe(&name).await.map(|_| ()),
        hv.start(&name).await,
        hv.shutdown(&name).await,
        hv.destroy(&name).await,
        hv.undefine(&name).await,
    ] {
        assert!(
            matches!(result, Err(HypervisorError::NotOurs { .. })),
            "{result:?}"
        );
    }
    // This node's XML under that name replaces it neither for the same record nor for another.
    for variant in [1, 2] {
        let result = hv.define(&xml(&spec("k1", &uid(11, variant)))).await;
        assert!(
            matches!(
                &result,
                Err(HypervisorError::Conflict { existing_node, .. }) if existing_node == OTHER_NODE
            ),
            "{result:?}"
        );
    }
    // Nor does this node define a domain for another node.
    let result = hv
        .define(&xml(&spec_for(OTHER_NODE, "k2", &uid(11, 3))))
        .await;
    assert!(
        matches!(&result, Err(HypervisorError::OtherNode { xml_node, .. }) if xml_node == OTHER_NODE),
        "{result:?}"
    );
    assert!(raw_state(&raw, &spec("k2", &uid(11, 3)).name).is_none());

    assert_eq!(raw_state(&raw, &name), before, "same state, same ID");
    let owner = raw
        .lookup_domain_by_name(&name)
        .and_then(|d| d.xml_desc(0))
        .ok()
        .and_then(|xml| node_agent::domain::ownership(&xml))
        .expect("still the other node's");
    assert_eq!(owner.node, OTHER_NODE);
    let seen = other
        .observe(&name)
        .await
        .expect("observes")
        .expect("there");
    assert_eq!(seen.state, DomainState::Running);
    other.destroy(&name).await.expect("the other node destroys");
    other
        .undefine(&name)
        .await
        .expect("the other node undefines");
}

#[tokio::test]
async fn define_refuses_xml_without_karri_owner() {
    let hv = test_driver().await;
    let result = hv.define(&foreign_xml("c1-unowned")).await;
    assert!(
        matches!(result, Err(HypervisorError::Unowned)),
        "{result:?}"
    );
    assert!(raw_state(&raw(), "c1-unowned").is_none());
}

#[tokio::test]
async fn define_refuses_domain_of_another_record_with_the_same_name() {
    let hv = test_driver().await;
    let old = spec("d1", &uid(4, 1));
    let new = spec("d1", &uid(4, 2));
    hv.define(&xml(&old)).await.expect("defines");
    let result = hv.define(&xml(&new)).await;
    assert!(
        matches!(&result, Err(HypervisorError::Conflict { existing_uid, .. }) if *existing_uid == old.uid),
        "{result:?}"
    );
    // The same record redefining its own domain is fine.
    hv.define(&xml(&old)).await.expect("redefines");
    hv.undefine(&old.name).await.expect("undefines");
}

#[tokio::test]
async fn define_refuses_xml_libvirt_cannot_read_with_libvirts_message() {
    let hv = test_driver().await;
    let spec = spec("e1", &uid(5, 1));
    // The schema itself is checked by the golden tests (`virt-xml-validate`); libvirt's parser
    // still refuses values it cannot read.
    let rendered = xml(&spec);
    let memory = rendered
        .lines()
        .find(|l| l.trim_start().starts_with("<memory"))
        .expect("the domain names its memory");
    let unreadable = rendered.replace(memory, "  <memory unit=\"MiB\">lots</memory>");
    let result = hv.define(&unreadable).await;
    let Err(HypervisorError::Libvirt { op, libvirt, .. }) = &result else {
        panic!("XML with an unreadable memory size was defined: {result:?}");
    };
    assert_eq!(*op, "define");
    assert!(
        result
            .as_ref()
            .err()
            .is_some_and(|e| e.to_string().contains(libvirt.message().trim())),
        "the error carries libvirt's message: {result:?}"
    );
    assert!(hv.observe(&spec.name).await.expect("observes").is_none());
}

#[tokio::test]
async fn operations_that_find_their_goal_reached_succeed() {
    let hv = test_driver().await;
    let spec = spec("f1", &uid(6, 1));
    let name = spec.name.clone();
    // Nothing there: nothing to stop or remove.
    hv.shutdown(&name)
        .await
        .expect("shutdown of a missing domain");
    hv.destroy(&name)
        .await
        .expect("destroy of a missing domain");
    hv.undefine(&name)
        .await
        .expect("undefine of a missing domain");
    let result = hv.start(&name).await;
    assert!(
        matches!(result, Err(HypervisorError::NotFound { .. })),
        "{result:?}"
    );
    // Defined and off: already stopped.
    hv.define(&xml(&spec)).await.expect("defines");
    hv.shutdown(&name)
        .await
        .expect("shutdown of a shut off domain");
    hv.destroy(&name)
        .await
        .expect("destroy of a shut off domain");
    // Running: already started, and defining it again changes nothing.
    hv.start(&name).await.expect("starts");
    let id = hv
        .observe(&name)
        .await
        .expect("observes")
        .and_then(|d| d.id);
    hv.start(&name).await.expect("start of a running domain");
    hv.define(&xml(&spec))
        .await
        .expect("redefine of a running domain");
    let seen = hv.observe(&name).await.expect("observes").expect("exists");
    assert_eq!((seen.state, seen.id), (DomainState::Running, id));
    hv.destroy(&name).await.expect("destroys");
    hv.undefine(&name).await.expect("undefines");
    hv.undefine(&name).await.expect("undefines again");
}

#[tokio::test]
async fn undefined_running_domain_stays_listed_as_transient_until_destroyed() {
    let hv = test_driver().await;
    let spec = spec("g1", &uid(7, 1));
    let name = spec.name.clone();
    hv.define(&xml(&spec)).await.expect("defines");
    hv.start(&name).await.expect("starts");
    hv.undefine(&name).await.expect("undefines");
    let seen = hv.observe(&name).await.expect("observes").expect("exists");
    assert_eq!((seen.state, seen.defined), (DomainState::Running, false));
    hv.destroy(&name).await.expect("destroys");
    assert_eq!(hv.observe(&name).await.expect("observes"), None);
}

#[tokio::test]
async fn test_driver_state_is_shared_by_connections_open_at_once() {
    let first = test_driver().await;
    let second = LibvirtHypervisor::connect(TEST_URI, NODE)
        .await
        .expect("opens again");
    let spec = spec("h1", &uid(8, 1));
    first.define(&xml(&spec)).await.expect("defines");
    assert!(
        second
            .observe(&spec.name)
            .await
            .expect("observes")
            .is_some(),
        "a second connection sees the first one's domain"
    );
    second.undefine(&spec.name).await.expect("undefines");
    assert_eq!(first.observe(&spec.name).await.expect("observes"), None);
}

#[tokio::test]
async fn unreachable_libvirt_is_a_connect_error() {
    let result = LibvirtHypervisor::connect("test:///nonexistent/karri.xml", NODE).await;
    let Err(err) = result else {
        panic!("a missing test driver file opened");
    };
    assert!(matches!(err, HypervisorError::Connect { .. }), "{err:?}");
    assert!(
        err.to_string().contains("test:///nonexistent/karri.xml"),
        "{err}"
    );
}

#[tokio::test]
async fn every_golden_domain_defines_and_reads_back_its_owner() {
    let hv = test_driver().await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("golden directory")
        .map(|entry| entry.expect("golden entry").path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "{files:?}");
    for path in files {
        let xml = std::fs::read_to_string(&path).expect("golden file");
        let owner = node_agent::domain::ownership(&xml).expect("golden file has an owner");
        let name = node_agent::domain::name_of(&xml).expect("golden file has a name");
        // Each golden domain names its own node; its agent is the one that defines it.
        let hv = if owner.node == hv.node() {
            hv.clone()
        } else {
            test_driver_for(&owner.node).await
        };
        hv.define(&xml)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let seen = hv.observe(&name).await.expect("observes").expect("defined");
        assert_eq!(
            (seen.uid, seen.instance_id, seen.namespace),
            (owner.uid, owner.instance_id, owner.namespace),
            "{}",
            path.display()
        );
        hv.undefine(&name).await.expect("undefines");
    }
}
