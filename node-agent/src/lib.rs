//! Core of the Karri node agent, the virt-handler analogue (DESIGN §4): it turns the Instance
//! records bound to its node into libvirt domains.
//!
//! - [`domain`]: the pure conversion from an instance to libvirt domain XML, and back from a
//!   domain's metadata to the record that owns it;
//! - [`plan`]: the pure decision of what to do to one domain, from the record and the domain;
//! - [`hypervisor`]: the edge that carries the decision out, with libvirt or in memory.
//!
//! The agent loop (watching records, writing status, the lease) builds on these.

pub mod domain;
pub mod hypervisor;
pub mod plan;
