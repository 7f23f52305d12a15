//! The gateway's serving certificate: given by the site, or generated once into a directory
//! (a private CA and a server certificate for loopback and the host name), the way
//! kube-apiserver fills `--cert-dir`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};

/// Why the serving certificate could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("cannot use {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Generating a certificate failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Paths of the serving certificate, its key and the CA that clients trust.
#[derive(Debug, Clone)]
pub struct ServingCert {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificate (for kubeconfigs); None when the site gave its own certificate.
    pub ca: Option<PathBuf>,
}

fn write(path: &Path, data: &str) -> Result<(), TlsError> {
    std::fs::write(path, data).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reuse the certificate in `dir`, or make a CA and a server certificate there.
pub fn ensure_self_signed(dir: &Path, extra_names: &[String]) -> Result<ServingCert, TlsError> {
    let out = ServingCert {
        cert: dir.join("apiserver.crt"),
        key: dir.join("apiserver.key"),
        ca: Some(dir.join("ca.crt")),
    };
    if out.cert.exists() && out.key.exists() && dir.join("ca.crt").exists() {
        return Ok(out);
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "karri-ca");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "karri-api-gateway");
    let mut sans = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
        SanType::IpAddress(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1])),
    ];
    for name in extra_names {
        match name.parse::<IpAddr>() {
            Ok(ip) => sans.push(SanType::IpAddress(ip)),
            Err(_) => sans.push(SanType::DnsName(name.as_str().try_into()?)),
        }
    }
    params.subject_alt_names = sans;
    let cert = params.signed_by(&server_key, &issuer)?;
    write(&dir.join("ca.crt"), &ca_cert.pem())?;
    write(&out.key, &server_key.serialize_pem())?;
    write(&out.cert, &format!("{}{}", cert.pem(), ca_cert.pem()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_certificate_is_made_once_and_reused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = ensure_self_signed(dir.path(), &["gateway.example".into()]).expect("generated");
        let pem = std::fs::read_to_string(&first.cert).expect("written");
        assert!(pem.contains("BEGIN CERTIFICATE"));
        let again = ensure_self_signed(dir.path(), &[]).expect("reused");
        assert_eq!(
            std::fs::read_to_string(&again.cert).expect("still there"),
            pem
        );
    }
}
