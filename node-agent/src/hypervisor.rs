//! The edge where plans become libvirt calls.
//!
//! [`Hypervisor`] is what the agent needs from a host: list its node's domains, and define,
//! start, shut down, destroy and undefine one by name. [`LibvirtHypervisor`] does it with the
//! `virt` crate; [`FakeHypervisor`] does it in memory for tests of the agent loop. Each is made
//! for one node, and a domain is *ours* when its metadata names a Karri owner on that node
//! ([`domain::ownership`], [`domain::Owner::node`]). Both refuse to touch any other domain
//! ([`HypervisorError::NotOurs`]) — one that is not Karri's, or one that another node's agent
//! manages on the same libvirtd — so such a domain is never listed, changed or removed, whatever
//! the caller asks.
//!
//! Every operation is idempotent toward its goal: destroying a domain that is already off,
//! starting one that already runs or undefining one that is gone succeeds, because the domain
//! may have moved on between the observation a plan was made from and the call.

mod fake;
mod libvirt;

use std::future::Future;
use std::time::Duration;

pub use fake::FakeHypervisor;
pub use libvirt::{KeepAlive, LibvirtHypervisor, DEFAULT_MAX_CALLS};

use crate::domain;
use crate::plan::{Action, DomainState, Observed};

/// One of Karri's domains as the hypervisor reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedDomain {
    /// libvirt domain name, `karri-<instance id>`.
    pub name: String,
    /// Record UID from the domain's metadata.
    pub uid: String,
    /// Instance ID from the domain's metadata.
    pub instance_id: String,
    /// Record namespace from the domain's metadata.
    pub namespace: String,
    /// State of the domain.
    pub state: DomainState,
    /// libvirt's ID of the running domain; `None` while it is shut off.
    pub id: Option<u32>,
    /// Whether the domain is persistent (defined) rather than transient.
    pub defined: bool,
    /// Whether a shut-off domain went off by a shutdown of its guest OS (libvirt's shut-off
    /// reason `shutdown`: the guest powered itself off, or obeyed the ACPI power button),
    /// rather than being destroyed or crashing.
    pub shut_down: bool,
}

impl ObservedDomain {
    /// The planner's view of this domain, given how long ago the caller asked it to shut down.
    pub fn observed(&self, shutdown_elapsed: Option<Duration>) -> Observed {
        Observed {
            uid: self.uid.clone(),
            state: self.state,
            defined: self.defined,
            shutdown_elapsed,
        }
    }
}

/// Why a hypervisor call failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The connection to libvirt could not be opened.
    #[error("cannot connect to libvirt at {uri}: {}", .libvirt.message())]
    Connect {
        /// The connection URI.
        uri: String,
        /// What libvirt said.
        libvirt: virt::error::Error,
    },
    /// libvirt refused or failed an operation on one domain.
    #[error("libvirt could not {op} domain {name}: {}", .libvirt.message())]
    Libvirt {
        /// The operation, e.g. `start`.
        op: &'static str,
        /// The domain name.
        name: String,
        /// What libvirt said.
        libvirt: virt::error::Error,
    },
    /// libvirt could not list the domains.
    #[error("libvirt could not list domains: {}", .libvirt.message())]
    List {
        /// What libvirt said.
        libvirt: virt::error::Error,
    },
    /// The domain exists but its metadata names no Karri owner on this node (it is not Karri's,
    /// or another node's agent manages it), so this agent leaves it alone.
    #[error("domain {name} is not this node's Karri domain and is left alone")]
    NotOurs {
        /// The domain name.
        name: String,
    },
    /// A Karri domain of that name belongs to another record (another UID), or to another
    /// node.
    #[error(
        "domain {name} belongs to record {existing_uid} on node {existing_node}, \
         not to record {uid} on node {node}"
    )]
    Conflict {
        /// The domain name.
        name: String,
        /// UID of the record the existing domain belongs to.
        existing_uid: String,
        /// Node the existing domain belongs to.
        existing_node: String,
        /// UID of the record the XML is for.
        uid: String,
        /// Node the XML is for (this hypervisor's node).
        node: String,
    },
    /// The domain to start does not exist.
    #[error("domain {name} does not exist")]
    NotFound {
        /// The domain name.
        name: String,
    },
    /// The XML to define names no Karri owner; Karri only defines domains it can recognise.
    #[error("the domain XML names no Karri owner")]
    Unowned,
    /// The XML to define names an owner on another node: this hypervisor defines only domains
    /// it will itself recognise as its own.
    #[error("the domain XML is for node {xml_node}, not for this node {node}")]
    OtherNode {
        /// The node the XML names.
        xml_node: String,
        /// This hypervisor's node.
        node: String,
    },
    /// The XML to define has no `<name>`.
    #[error("the domain XML has no name")]
    Unnamed,
    /// A plan asked to define a domain but no XML was given, or XML for another domain.
    #[error("the plan defines {name} without its XML")]
    NoDefinition {
        /// The domain name.
        name: String,
    },
    /// libvirt's event loop, which keepalive needs, could not be started.
    #[error("cannot start libvirt's event loop: {0}")]
    EventLoop(String),
    /// The connection to libvirtd was lost and another call is opening it again (libvirtd may
    /// not answer yet); this call fails at once instead of waiting behind it.
    #[error("the connection to libvirt at {uri} is being opened again")]
    Reconnecting {
        /// The connection URI.
        uri: String,
    },
    /// The blocking task running a libvirt call panicked or was cancelled.
    #[error("a libvirt call did not complete: {0}")]
    Blocking(#[source] tokio::task::JoinError),
}

impl HypervisorError {
    /// libvirt's own error, when the failure came from libvirt.
    pub fn libvirt(&self) -> Option<&virt::error::Error> {
        match self {
            Self::Connect { libvirt, .. }
            | Self::Libvirt { libvirt, .. }
            | Self::List { libvirt } => Some(libvirt),
            _ => None,
        }
    }
}

/// What the node agent needs from a host's hypervisor.
///
/// A hypervisor serves one node: "ours" below means a domain whose metadata names a Karri owner
/// on that node. Methods return `Send` futures so that the agent can run them on a
/// multi-threaded runtime. The trait is used generically (`H: Hypervisor`), not as a trait
/// object.
pub trait Hypervisor: Send + Sync {
    /// Every domain whose metadata names a Karri owner on this node; other domains are left
    /// out.
    fn list_ours(
        &self,
    ) -> impl Future<Output = Result<Vec<ObservedDomain>, HypervisorError>> + Send;

    /// Our domain of that name; `None` when there is none, [`HypervisorError::NotOurs`] when the
    /// name belongs to a domain that is not ours (not Karri's, or another node's).
    fn observe(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<ObservedDomain>, HypervisorError>> + Send;

    /// Defines (or redefines) a domain from XML that names its Karri owner on this node (see
    /// [`domain::render`]); XML for another node is [`HypervisorError::OtherNode`]. Refuses to
    /// replace a domain that is not Karri's ([`HypervisorError::NotOurs`]), or that belongs to
    /// another node or another record ([`HypervisorError::Conflict`]).
    fn define(&self, xml: &str) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Starts a defined domain; succeeds if it already runs.
    fn start(&self, name: &str) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Asks the guest to power off (ACPI power button) and returns at once; succeeds if the
    /// domain is off or gone. The guest may ignore it: escalate with [`Hypervisor::destroy`].
    fn shutdown(&self, name: &str) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Resets a running domain (RebootInstances): the guest restarts at once, as with a reset
    /// button, so that guests without ACPI handling reboot too.
    fn reboot(&self, name: &str) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Forces the domain off; succeeds if it is off or gone.
    fn destroy(&self, name: &str) -> impl Future<Output = Result<(), HypervisorError>> + Send;

    /// Removes the domain's definition (with any managed save image and snapshot metadata);
    /// succeeds if it is gone. A running domain becomes transient: destroy it first.
    fn undefine(&self, name: &str) -> impl Future<Output = Result<(), HypervisorError>> + Send;
}

/// Runs `actions` in order against domain `name`, stopping at the first failure.
///
/// `xml` is the record's rendered domain ([`domain::render`]); it is needed only when the plan
/// holds [`Action::Define`], and must be for the domain `name`.
pub async fn apply_plan<H: Hypervisor>(
    hypervisor: &H,
    name: &str,
    xml: Option<&str>,
    actions: &[Action],
) -> Result<(), HypervisorError> {
    for action in actions {
        match action {
            Action::Define => {
                let xml = xml
                    .filter(|xml| domain::name_of(xml).as_deref() == Some(name))
                    .ok_or_else(|| HypervisorError::NoDefinition {
                        name: name.to_owned(),
                    })?;
                hypervisor.define(xml).await?;
            }
            Action::Start => hypervisor.start(name).await?,
            Action::Shutdown => hypervisor.shutdown(name).await?,
            Action::Destroy => hypervisor.destroy(name).await?,
            Action::Reboot => hypervisor.reboot(name).await?,
            Action::Undefine => hypervisor.undefine(name).await?,
        }
    }
    Ok(())
}
