//! Karri's API gateway: the only etcd client. It keeps every record in etcd with Kubernetes
//! semantics and serves them through a Kubernetes-compatible resource API, the EC2 Query API
//! and the S3 REST API, all through the same registry and admission.

pub mod admission;
pub mod auth;
pub mod aws;
pub mod body;
pub mod cache;
pub mod capacity;
pub mod combined_creates;
pub mod conn_limit;
pub mod ec2;
pub mod error;
pub mod http;
pub mod kinds;
pub mod metrics;
pub mod point_reads;
pub mod registry;
pub mod s3;
pub mod schema;
pub mod selectors;
pub mod ssa;
pub mod store;
pub mod table;
pub mod tls;
