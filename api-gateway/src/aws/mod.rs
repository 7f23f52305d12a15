//! What the AWS-protocol faces (EC2 and S3) share: SigV4 verification and access keys.

pub mod credentials;
pub mod lookups;
pub mod sigv4;
