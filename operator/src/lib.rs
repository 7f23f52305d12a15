//! The operator's decision core: pure functions from records and observations to what the
//! operator should write next. No I/O happens here; the controllers (list/watch, status writes,
//! finalizers, backoff) call these functions and carry out the answers.
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
