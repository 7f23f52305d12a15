//! An in-memory [`Hypervisor`] for tests of the agent loop.
//!
//! It keeps libvirt's rules that matter to the agent: domains are recognised by the same
//! [`domain::ownership`] metadata, a running domain that is undefined becomes transient and a
//! transient one vanishes when it stops, domains that are not Karri's or belong to another node
//! are never touched, and a guest may ignore the ACPI power button
//! ([`FakeHypervisor::set_guests_ignore_shutdown`]). Every change it is asked for is logged
//! ([`FakeHypervisor::calls`]).
//!
//! A `FakeHypervisor` is one node's view of an in-memory host; [`FakeHypervisor::on_same_host`]
//! gives another node's view of the same host, as two agents on one libvirtd would have.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{Hypervisor, HypervisorError, ObservedDomain};
use crate::domain::{self, Owner};
use crate::plan::{Action, DomainState};

/// In-memory [`Hypervisor`] for one node.
#[derive(Debug)]
pub struct FakeHypervisor {
    /// The host's domains, shared with the other nodes' views of the same host.
    inner: Arc<Mutex<Inner>>,
    /// The node whose domains this view manages.
    node: String,
    /// Every change asked of this view.
    calls: Mutex<Vec<(Action, String)>>,
}

#[derive(Debug, Default)]
struct Inner {
    domains: BTreeMap<String, FakeDomain>,
    last_id: u32,
    guests_ignore_shutdown: bool,
    /// Domains whose destroy fails, as one whose QEMU is stuck in the kernel.
    stuck: std::collections::BTreeSet<String>,
}

#[derive(Debug)]
struct FakeDomain {
    owner: Option<Owner>,
    state: DomainState,
    id: Option<u32>,
    defined: bool,
    /// Shut off by a shutdown of its guest (not destroyed).
    shut_down: bool,
}

impl Inner {
    fn next_id(&mut self) -> u32 {
        self.last_id += 1;
        self.last_id
    }

    /// The domain of that name if it is `node`'s: `None` when there is none, `NotOurs` when it
    /// is not Karri's or belongs to another node.
    fn ours(&mut self, node: &str, name: &str) -> Result<Option<&mut FakeDomain>, HypervisorError> {
        match self.domains.get_mut(name) {
            None => Ok(None),
            Some(dom) if dom.owner.as_ref().is_some_and(|o| o.node == node) => Ok(Some(dom)),
            Some(_) => Err(HypervisorError::NotOurs {
                name: name.to_owned(),
            }),
        }
    }

    /// Turns a domain off, by a shutdown of its guest (`shut_down`) or not; a transient one
    /// vanishes.
    fn power_off(&mut self, name: &str, shut_down: bool) {
        if let Some(dom) = self.domains.get_mut(name) {
            dom.state = DomainState::ShutOff;
            dom.id = None;
            dom.shut_down = shut_down;
            if !dom.defined {
                self.domains.remove(name);
            }
        }
    }
}

/// The domain as `node`'s agent sees it: `None` unless it is `node`'s.
fn observed(node: &str, name: &str, dom: &FakeDomain) -> Option<ObservedDomain> {
    let owner = dom.owner.as_ref().filter(|o| o.node == node)?;
    Some(ObservedDomain {
        name: name.to_owned(),
        uid: owner.uid.clone(),
        instance_id: owner.instance_id.clone(),
        namespace: owner.namespace.clone(),
        state: dom.state,
        id: dom.id,
        defined: dom.defined,
        shut_down: dom.shut_down,
    })
}

impl FakeHypervisor {
    /// An empty host, seen by the agent of `node`, whose guests honour the ACPI power button.
    pub fn new(node: &str) -> Self {
        Self {
            inner: Arc::default(),
            node: node.to_owned(),
            calls: Mutex::default(),
        }
    }

    /// The agent of `node`'s view of the same host: it shares the domains (and whether guests
    /// honour the power button), not the call log.
    pub fn on_same_host(&self, node: &str) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            node: node.to_owned(),
            calls: Mutex::default(),
        }
    }

    /// The node whose domains this view manages.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log(&self, action: Action, name: &str) {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((action, name.to_owned()));
    }

    /// Makes [`Hypervisor::destroy`] of the domain `name` fail (`true`) or work again.
    pub fn set_stuck(&self, name: &str, stuck: bool) {
        let mut inner = self.lock();
        if stuck {
            inner.stuck.insert(name.to_owned());
        } else {
            inner.stuck.remove(name);
        }
    }

    /// Makes guests ignore (`true`) or honour (`false`) [`Hypervisor::shutdown`].
    pub fn set_guests_ignore_shutdown(&self, ignore: bool) {
        self.lock().guests_ignore_shutdown = ignore;
    }

    /// Adds a domain that is not Karri's (no metadata), as another tool on the host would.
    pub fn insert_foreign(&self, name: &str, state: DomainState) {
        let mut inner = self.lock();
        let id = state.is_active().then(|| inner.next_id());
        inner.domains.insert(
            name.to_owned(),
            FakeDomain {
                owner: None,
                state,
                id,
                defined: true,
                shut_down: false,
            },
        );
    }

    /// Changes a domain's state as the guest or an administrator would (a guest powering
    /// itself off, a crash, a pause); not logged. Does nothing if there is no such domain.
    pub fn set_state(&self, name: &str, state: DomainState) {
        let mut inner = self.lock();
        if state == DomainState::ShutOff {
            // The guest powered itself off.
            inner.power_off(name, true);
            return;
        }
        let was_active = match inner.domains.get(name) {
            Some(dom) => dom.state.is_active(),
            None => return,
        };
        let id = if was_active {
            inner.domains.get(name).and_then(|dom| dom.id)
        } else {
            Some(inner.next_id())
        };
        if let Some(dom) = inner.domains.get_mut(name) {
            dom.state = state;
            dom.id = id;
        }
    }

    /// Any domain of that name, Karri's or not: its state and ID.
    pub fn peek(&self, name: &str) -> Option<(DomainState, Option<u32>)> {
        self.lock().domains.get(name).map(|dom| (dom.state, dom.id))
    }

    /// Every change asked of this view so far, in order, as (action, domain name).
    pub fn calls(&self) -> Vec<(Action, String)> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Like [`FakeHypervisor::calls`], and forgets them.
    pub fn take_calls(&self) -> Vec<(Action, String)> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn define_now(&self, xml: &str) -> Result<(), HypervisorError> {
        let owner = domain::ownership(xml).ok_or(HypervisorError::Unowned)?;
        if owner.node != self.node {
            return Err(HypervisorError::OtherNode {
                xml_node: owner.node,
                node: self.node.clone(),
            });
        }
        let name = domain::name_of(xml).ok_or(HypervisorError::Unnamed)?;
        self.log(Action::Define, &name);
        let mut inner = self.lock();
        if let Some(existing) = inner.domains.get_mut(&name) {
            let Some(current) = &existing.owner else {
                return Err(HypervisorError::NotOurs { name });
            };
            if current.node != owner.node || current.uid != owner.uid {
                return Err(HypervisorError::Conflict {
                    name,
                    existing_uid: current.uid.clone(),
                    existing_node: current.node.clone(),
                    uid: owner.uid,
                    node: owner.node,
                });
            }
            existing.defined = true;
            existing.owner = Some(owner);
            return Ok(());
        }
        inner.domains.insert(
            name,
            FakeDomain {
                owner: Some(owner),
                state: DomainState::ShutOff,
                id: None,
                defined: true,
                shut_down: false,
            },
        );
        Ok(())
    }

    fn act(&self, action: Action, name: &str) -> Result<(), HypervisorError> {
        self.log(action, name);
        let mut inner = self.lock();
        let ignore_shutdown = inner.guests_ignore_shutdown;
        let stuck = inner.stuck.contains(name);
        let Some(dom) = inner.ours(&self.node, name)? else {
            return match action {
                Action::Start | Action::Reboot => Err(HypervisorError::NotFound {
                    name: name.to_owned(),
                }),
                _ => Ok(()),
            };
        };
        let active = dom.state.is_active();
        if action == Action::Destroy && stuck {
            // libvirt's answer to a QEMU that will not die varies; any error stands for it.
            return Err(HypervisorError::NotFound {
                name: name.to_owned(),
            });
        }
        match action {
            Action::Start if !active => {
                let id = inner.next_id();
                if let Some(dom) = inner.domains.get_mut(name) {
                    dom.state = DomainState::Running;
                    dom.id = Some(id);
                    dom.shut_down = false;
                }
            }
            Action::Shutdown if active && !ignore_shutdown => inner.power_off(name, true),
            Action::Destroy if active => inner.power_off(name, false),
            Action::Undefine if active => dom.defined = false,
            Action::Undefine => {
                inner.domains.remove(name);
            }
            _ => {}
        }
        Ok(())
    }
}

impl Hypervisor for FakeHypervisor {
    async fn list_ours(&self) -> Result<Vec<ObservedDomain>, HypervisorError> {
        let inner = self.lock();
        Ok(inner
            .domains
            .iter()
            .filter_map(|(name, dom)| observed(&self.node, name, dom))
            .collect())
    }

    async fn observe(&self, name: &str) -> Result<Option<ObservedDomain>, HypervisorError> {
        let mut inner = self.lock();
        Ok(inner
            .ours(&self.node, name)?
            .and_then(|dom| observed(&self.node, name, dom)))
    }

    async fn define(&self, xml: &str) -> Result<(), HypervisorError> {
        self.define_now(xml)
    }

    async fn start(&self, name: &str) -> Result<(), HypervisorError> {
        self.act(Action::Start, name)
    }

    async fn shutdown(&self, name: &str) -> Result<(), HypervisorError> {
        self.act(Action::Shutdown, name)
    }

    async fn reboot(&self, name: &str) -> Result<(), HypervisorError> {
        self.act(Action::Reboot, name)
    }

    async fn destroy(&self, name: &str) -> Result<(), HypervisorError> {
        self.act(Action::Destroy, name)
    }

    async fn undefine(&self, name: &str) -> Result<(), HypervisorError> {
        self.act(Action::Undefine, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{domain_name, render, DomainSpec, DomainType};

    const NODE: &str = "node-1";
    const OTHER_NODE: &str = "node-2";

    fn xml(uid: &str) -> String {
        xml_for(NODE, uid)
    }

    fn xml_for(node: &str, uid: &str) -> String {
        render(&DomainSpec {
            name: domain_name("i-1"),
            uid: uid.into(),
            instance_id: "i-1".into(),
            namespace: "ns".into(),
            node: node.into(),
            instance_type: "m1.small".into(),
            vcpus: 1,
            memory_mib: 64,
            domain_type: DomainType::Qemu,
            disk: None,
            kernel: None,
            nic: None,
            console_log: None,
        })
        .expect("renders")
    }

    const UID: &str = "6f1f8d2e-1c1a-4d1e-9a55-2c7c1b7a0b11";

    #[tokio::test]
    async fn foreign_domain_is_neither_listed_nor_touched() {
        let hv = FakeHypervisor::new(NODE);
        hv.insert_foreign("other", DomainState::Running);
        let before = hv.peek("other");
        assert_eq!(hv.list_ours().await.expect("lists"), []);
        assert!(matches!(
            hv.destroy("other").await,
            Err(HypervisorError::NotOurs { .. })
        ));
        assert!(matches!(
            hv.undefine("other").await,
            Err(HypervisorError::NotOurs { .. })
        ));
        assert!(matches!(
            hv.observe("other").await,
            Err(HypervisorError::NotOurs { .. })
        ));
        assert_eq!(hv.peek("other"), before);
    }

    #[tokio::test]
    async fn domain_of_another_node_on_the_same_host_is_neither_listed_nor_touched() {
        let hv = FakeHypervisor::new(NODE);
        let other = hv.on_same_host(OTHER_NODE);
        other
            .define(&xml_for(OTHER_NODE, UID))
            .await
            .expect("defines");
        other.start("karri-i-1").await.expect("starts");
        let before = hv.peek("karri-i-1");
        assert_eq!(before.map(|(state, _)| state), Some(DomainState::Running));

        assert_eq!(hv.list_ours().await.expect("lists"), []);
        assert!(matches!(
            hv.observe("karri-i-1").await,
            Err(HypervisorError::NotOurs { .. })
        ));
        for result in [
            hv.start("karri-i-1").await,
            hv.shutdown("karri-i-1").await,
            hv.destroy("karri-i-1").await,
            hv.undefine("karri-i-1").await,
        ] {
            assert!(
                matches!(result, Err(HypervisorError::NotOurs { .. })),
                "{result:?}"
            );
        }
        // Neither this node's XML for the same record nor for another record replaces it.
        for uid in [UID, "0b7c1a2e-0000-4000-8000-000000000001"] {
            let result = hv.define(&xml(uid)).await;
            assert!(
                matches!(
                    &result,
                    Err(HypervisorError::Conflict { existing_node, .. }) if existing_node == OTHER_NODE
                ),
                "{result:?}"
            );
        }
        assert_eq!(hv.peek("karri-i-1"), before);
        // The other node's agent still sees it as its own.
        let seen = other.list_ours().await.expect("lists");
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].state, DomainState::Running);
    }

    #[tokio::test]
    async fn xml_for_another_node_is_not_defined() {
        let hv = FakeHypervisor::new(NODE);
        let result = hv.define(&xml_for(OTHER_NODE, UID)).await;
        assert!(
            matches!(&result, Err(HypervisorError::OtherNode { xml_node, node })
                if xml_node == OTHER_NODE && node == NODE),
            "{result:?}"
        );
        assert_eq!(hv.peek("karri-i-1"), None);
    }

    #[tokio::test]
    async fn undefined_running_domain_is_transient_and_vanishes_when_destroyed() {
        let hv = FakeHypervisor::new(NODE);
        hv.define(&xml(UID)).await.expect("defines");
        hv.start("karri-i-1").await.expect("starts");
        hv.undefine("karri-i-1").await.expect("undefines");
        let seen = hv.observe("karri-i-1").await.expect("observes");
        assert_eq!(
            seen.map(|d| (d.state, d.defined)),
            Some((DomainState::Running, false))
        );
        hv.destroy("karri-i-1").await.expect("destroys");
        assert_eq!(hv.observe("karri-i-1").await.expect("observes"), None);
    }

    #[tokio::test]
    async fn define_of_another_records_domain_is_a_conflict() {
        let hv = FakeHypervisor::new(NODE);
        hv.define(&xml(UID)).await.expect("defines");
        let other = "0b7c1a2e-0000-4000-8000-000000000001";
        assert!(matches!(
            hv.define(&xml(other)).await,
            Err(HypervisorError::Conflict { .. })
        ));
    }

    #[tokio::test]
    async fn restarted_domain_gets_a_new_id() {
        let hv = FakeHypervisor::new(NODE);
        hv.define(&xml(UID)).await.expect("defines");
        hv.start("karri-i-1").await.expect("starts");
        let first = hv.peek("karri-i-1").and_then(|(_, id)| id);
        hv.start("karri-i-1")
            .await
            .expect("start of a running domain");
        assert_eq!(hv.peek("karri-i-1").and_then(|(_, id)| id), first);
        hv.destroy("karri-i-1").await.expect("destroys");
        assert_eq!(hv.peek("karri-i-1"), Some((DomainState::ShutOff, None)));
        hv.start("karri-i-1").await.expect("starts");
        let second = hv.peek("karri-i-1").and_then(|(_, id)| id);
        assert!(second.is_some() && second != first);
    }
}
