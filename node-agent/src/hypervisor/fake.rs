//! An in-memory [`Hypervisor`] for tests of the agent loop.
//!
//! It keeps libvirt's rules that matter to the agent: domains are recognised by the same
//! [`domain::ownership`] metadata, a running domain that is undefined becomes transient and a
//! transient one vanishes when it stops, domains that are not Karri's are never touched, and a
//! guest may ignore the ACPI power button ([`FakeHypervisor::set_guests_ignore_shutdown`]). Every
//! change it is asked for is logged ([`FakeHypervisor::calls`]).

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{Hypervisor, HypervisorError, ObservedDomain};
use crate::domain::{self, Owner};
use crate::plan::{Action, DomainState};

/// In-memory [`Hypervisor`].
#[derive(Debug, Default)]
pub struct FakeHypervisor {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    domains: BTreeMap<String, FakeDomain>,
    last_id: u32,
    calls: Vec<(Action, String)>,
    guests_ignore_shutdown: bool,
}

#[derive(Debug)]
struct FakeDomain {
    owner: Option<Owner>,
    state: DomainState,
    id: Option<u32>,
    defined: bool,
}

impl Inner {
    fn next_id(&mut self) -> u32 {
        self.last_id += 1;
        self.last_id
    }

    /// The Karri domain of that name: `None` when there is none, `NotOurs` when it is not
    /// Karri's.
    fn ours(&mut self, name: &str) -> Result<Option<&mut FakeDomain>, HypervisorError> {
        match self.domains.get_mut(name) {
            None => Ok(None),
            Some(dom) if dom.owner.is_none() => Err(HypervisorError::NotOurs {
                name: name.to_owned(),
            }),
            Some(dom) => Ok(Some(dom)),
        }
    }

    /// Turns a domain off; a transient one vanishes.
    fn power_off(&mut self, name: &str) {
        if let Some(dom) = self.domains.get_mut(name) {
            dom.state = DomainState::ShutOff;
            dom.id = None;
            if !dom.defined {
                self.domains.remove(name);
            }
        }
    }
}

fn observed(name: &str, dom: &FakeDomain) -> Option<ObservedDomain> {
    let owner = dom.owner.as_ref()?;
    Some(ObservedDomain {
        name: name.to_owned(),
        uid: owner.uid.clone(),
        instance_id: owner.instance_id.clone(),
        namespace: owner.namespace.clone(),
        state: dom.state,
        id: dom.id,
        defined: dom.defined,
    })
}

impl FakeHypervisor {
    /// An empty hypervisor whose guests honour the ACPI power button.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
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
            },
        );
    }

    /// Changes a domain's state as the guest or an administrator would (a guest powering
    /// itself off, a crash, a pause); not logged. Does nothing if there is no such domain.
    pub fn set_state(&self, name: &str, state: DomainState) {
        let mut inner = self.lock();
        if state == DomainState::ShutOff {
            inner.power_off(name);
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

    /// Every change asked for so far, in order, as (action, domain name).
    pub fn calls(&self) -> Vec<(Action, String)> {
        self.lock().calls.clone()
    }

    /// Like [`FakeHypervisor::calls`], and forgets them.
    pub fn take_calls(&self) -> Vec<(Action, String)> {
        std::mem::take(&mut self.lock().calls)
    }

    fn define_now(&self, xml: &str) -> Result<(), HypervisorError> {
        let owner = domain::ownership(xml).ok_or(HypervisorError::Unowned)?;
        let name = domain::name_of(xml).ok_or(HypervisorError::Unnamed)?;
        let mut inner = self.lock();
        inner.calls.push((Action::Define, name.clone()));
        if let Some(existing) = inner.ours(&name)? {
            let existing_uid = existing.owner.as_ref().map(|o| o.uid.clone());
            if existing_uid.as_deref() != Some(owner.uid.as_str()) {
                return Err(HypervisorError::Conflict {
                    name,
                    existing_uid: existing_uid.unwrap_or_default(),
                    uid: owner.uid,
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
            },
        );
        Ok(())
    }

    fn act(&self, action: Action, name: &str) -> Result<(), HypervisorError> {
        let mut inner = self.lock();
        inner.calls.push((action, name.to_owned()));
        let ignore_shutdown = inner.guests_ignore_shutdown;
        let Some(dom) = inner.ours(name)? else {
            return match action {
                Action::Start => Err(HypervisorError::NotFound {
                    name: name.to_owned(),
                }),
                _ => Ok(()),
            };
        };
        let active = dom.state.is_active();
        match action {
            Action::Start if !active => {
                let id = inner.next_id();
                if let Some(dom) = inner.domains.get_mut(name) {
                    dom.state = DomainState::Running;
                    dom.id = Some(id);
                }
            }
            Action::Shutdown if active && !ignore_shutdown => inner.power_off(name),
            Action::Destroy if active => inner.power_off(name),
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
            .filter_map(|(name, dom)| observed(name, dom))
            .collect())
    }

    async fn observe(&self, name: &str) -> Result<Option<ObservedDomain>, HypervisorError> {
        let mut inner = self.lock();
        Ok(inner.ours(name)?.and_then(|dom| observed(name, dom)))
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

    fn xml(uid: &str) -> String {
        render(&DomainSpec {
            name: domain_name("i-1"),
            uid: uid.into(),
            instance_id: "i-1".into(),
            namespace: "ns".into(),
            instance_type: "m1.small".into(),
            vcpus: 1,
            memory_mib: 64,
            domain_type: DomainType::Qemu,
            disk: None,
        })
        .expect("renders")
    }

    const UID: &str = "6f1f8d2e-1c1a-4d1e-9a55-2c7c1b7a0b11";

    #[tokio::test]
    async fn foreign_domain_is_neither_listed_nor_touched() {
        let hv = FakeHypervisor::new();
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
    async fn undefined_running_domain_is_transient_and_vanishes_when_destroyed() {
        let hv = FakeHypervisor::new();
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
        let hv = FakeHypervisor::new();
        hv.define(&xml(UID)).await.expect("defines");
        let other = "0b7c1a2e-0000-4000-8000-000000000001";
        assert!(matches!(
            hv.define(&xml(other)).await,
            Err(HypervisorError::Conflict { .. })
        ));
    }

    #[tokio::test]
    async fn restarted_domain_gets_a_new_id() {
        let hv = FakeHypervisor::new();
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
