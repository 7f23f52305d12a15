//! The Karri node agent, the virt-handler analogue (DESIGN §4): it turns the Instance records
//! bound to its node into libvirt domains.
//!
//! The pure core:
//! - [`domain`]: the pure conversion from an instance to libvirt domain XML, and back from a
//!   domain's metadata to the record that owns it;
//! - [`plan`]: the pure decision of what to do to one domain, from the record and the domain;
//! - [`report`]: the `DomainRunning` condition the agent writes into an instance's status;
//! - [`hypervisor`]: the edge that carries the decision out, with libvirt or in memory.
//!
//! The runtime, a kube-rs client of the gateway's resource API:
//! - [`agent`]: the instance controller, the orphan sweep and the lease heartbeat;
//! - [`node`]: the node's own records, its Node and its Lease;
//! - [`host`]: the host's capacity and hypervisor;
//! - [`metrics`]: Prometheus metrics on `/metrics`;
//! - [`guestnet`] and [`portguard`]: the guests' bridge and DHCP, and the nftables guard that
//!   lets each guest's tap carry only its own MAC and address;
//! - [`images`]: the content-addressed image cache, which fetches images from S3 through the
//!   gateway's presigned URLs ([`presign`]).

pub mod agent;
pub mod console;
pub mod domain;
pub mod guest;
pub mod guestnet;
pub mod host;
pub mod hypervisor;
pub mod images;
pub mod imds;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod plan;
pub mod portguard;
pub mod presign;
pub mod report;
