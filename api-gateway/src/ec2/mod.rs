//! The EC2 Query API face (version 2016-11-15): form-encoded `Action=…` requests signed with
//! SigV4, XML responses in the EC2 namespace, onto the same records as the resource API.

pub mod actions;
pub mod error;
pub mod filter;
pub mod keys;
pub mod params;
pub mod router;
pub mod service;
pub mod xml;

/// The field manager EC2 calls are recorded under in a record's `metadata.managedFields`, so
/// that a server-side apply that would undo one (a RunInstances' type, a CreateTags' tag)
/// conflicts with it.
pub const FIELD_MANAGER: &str = "karri-ec2";
