//! The operator: pure decisions from records and observations to what it should write next,
//! and the controllers that do the I/O (list/watch, status writes, finalizers, backoff, leader
//! election, metrics) around them. The decisions:
//!
//! - [`placement`]: which Ready node of a zone an instance goes to (ROUNDROBIN, GREEDY, PACK,
//!   SPREAD), and what is already used on each node.
//! - [`health`]: node readiness from its lease, and instance health from its node's readiness.
//! - [`lifecycle`]: the EC2 state machine of an instance record, as far as the operator owns it.
//! - [`leader`]: lease-based leader election decisions, as client-go's `leaderelection`.

pub mod controllers;
pub mod election;
pub mod health;
pub mod launch;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod placement;

mod clock;
