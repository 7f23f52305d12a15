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
