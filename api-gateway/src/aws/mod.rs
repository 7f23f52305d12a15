//! What the AWS-protocol faces (EC2 now, S3 later) share: SigV4 verification and access keys.

pub mod credentials;
pub mod sigv4;
