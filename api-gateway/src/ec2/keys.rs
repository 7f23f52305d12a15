//! Key material of EC2 key pairs: generating the key pairs that `CreateKeyPair` returns,
//! parsing the public keys that `ImportKeyPair` accepts, and the fingerprints EC2 shows for
//! both. Pure: no I/O beyond the operating system's random number generator.
//!
//! Fingerprints follow what EC2 computes, which differs by key type and origin:
//!
//! | origin        | RSA                                                  | ED25519                        |
//! |---------------|------------------------------------------------------|--------------------------------|
//! | created       | SHA-1 of the DER PKCS#8 private key, `aa:bb:…`       | base64 SHA-256 of the SSH blob |
//! | imported      | MD5 of the DER SubjectPublicKeyInfo, `aa:bb:…`       | base64 SHA-256 of the SSH blob |
//!
//! The ED25519 form is the one `ssh-keygen -l -E sha256` prints, without its `SHA256:`
//! prefix and with the `=` padding EC2 keeps.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use md5::Md5;
use rand_core::OsRng;
use rsa::pkcs1::der::asn1::ObjectIdentifier;
use rsa::pkcs1::der::Decode as _;
use rsa::pkcs1::EncodeRsaPrivateKey as _;
use rsa::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, SubjectPublicKeyInfoRef};
use sha1::{Digest as _, Sha1};
use ssh_key::public::{Ed25519PublicKey, KeyData, RsaPublicKey};
use ssh_key::{Algorithm, HashAlg, Mpint, PrivateKey, PublicKey};

/// Bits of the RSA keys `CreateKeyPair` generates (EC2 creates 2048-bit keys).
const CREATED_RSA_BITS: usize = 2048;

/// RSA modulus lengths `ImportKeyPair` accepts. EC2 documents 1024, 2048 and 4096; 3072 is
/// `ssh-keygen`'s default since OpenSSH 8.0, so refusing it would refuse most fresh keys.
const IMPORTED_RSA_BITS: [usize; 4] = [1024, 2048, 3072, 4096];

/// `rsaEncryption` (RFC 8017).
const OID_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// `id-Ed25519` (RFC 8410).
const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
/// `id-ecPublicKey` (RFC 5480).
const OID_EC: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// `id-dsa` (RFC 3279).
const OID_DSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10040.4.1");

const RFC4716_BEGIN: &str = "---- BEGIN SSH2 PUBLIC KEY ----";
const RFC4716_END: &str = "---- END SSH2 PUBLIC KEY ----";

/// The type of a key pair, as EC2's `KeyType` parameter and `keyType` element name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KeyType {
    /// RSA; the default of `CreateKeyPair`.
    #[default]
    Rsa,
    /// ED25519.
    Ed25519,
}

impl KeyType {
    /// The EC2 name of the key type: `rsa` or `ed25519`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Rsa => "rsa",
            KeyType::Ed25519 => "ed25519",
        }
    }

    /// The key type EC2 names `name` (`rsa` or `ed25519`), if any.
    pub fn parse(name: &str) -> Option<KeyType> {
        match name {
            "rsa" => Some(KeyType::Rsa),
            "ed25519" => Some(KeyType::Ed25519),
            _ => None,
        }
    }
}

/// A freshly generated key pair, as `CreateKeyPair` hands it out. Its `Debug` leaves the private
/// key out.
#[derive(Clone, PartialEq, Eq)]
pub struct CreatedKey {
    /// The unencrypted private key, returned once as `keyMaterial`: PKCS#1 PEM
    /// (`-----BEGIN RSA PRIVATE KEY-----`) for RSA, OpenSSH PEM
    /// (`-----BEGIN OPENSSH PRIVATE KEY-----`) for ED25519.
    pub private_key: String,
    /// The public key in OpenSSH one-line format without comment, e.g. `ssh-rsa AAAA…`.
    pub public_key: String,
    /// The fingerprint EC2 shows for a key pair it created.
    pub fingerprint: String,
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("private_key", &"<redacted>")
            .field("public_key", &self.public_key)
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// A public key accepted by `ImportKeyPair`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedKey {
    /// The public key normalised to OpenSSH one-line format without comment.
    pub public_key: String,
    /// The key's type.
    pub key_type: KeyType,
    /// The fingerprint EC2 shows for an imported key pair.
    pub fingerprint: String,
}

/// Why key material could not be made or accepted. The messages are short sentences fit
/// for an EC2 error response (`InvalidKey.Format` for imports).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The material is not a public key in any accepted format.
    #[error("Key is not in valid OpenSSH public key format")]
    InvalidFormat,
    /// The material is a well-formed public key of a type EC2 does not accept (DSA, ECDSA,
    /// security-key types, …); the field names the type.
    #[error("Key type {0} is not supported; use an RSA or ED25519 key")]
    UnsupportedType(String),
    /// An RSA key whose modulus length is not accepted; the field is the length in bits.
    #[error("RSA key length of {0} bits is not supported; use 1024, 2048, 3072 or 4096 bits")]
    UnsupportedRsaLength(usize),
    /// Generating or encoding a new key failed: a server-side fault, not the caller's.
    #[error("Could not generate the key pair: {0}")]
    Generation(String),
}

impl KeyError {
    /// Whether the error is the caller's (a bad key) rather than the server's.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, KeyError::Generation(_))
    }
}

fn generation_error(err: impl std::fmt::Display) -> KeyError {
    KeyError::Generation(err.to_string())
}

/// Generates a new key pair of `key_type` with its private key, public key and fingerprint
/// as `CreateKeyPair` returns them.
pub fn create(key_type: KeyType) -> Result<CreatedKey, KeyError> {
    match key_type {
        KeyType::Rsa => create_rsa(),
        KeyType::Ed25519 => create_ed25519(),
    }
}

fn create_rsa() -> Result<CreatedKey, KeyError> {
    let key = rsa::RsaPrivateKey::new(&mut OsRng, CREATED_RSA_BITS).map_err(generation_error)?;
    let private_key = key
        .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
        .map_err(generation_error)?
        .as_str()
        .to_owned();
    let public = RsaPublicKey::try_from(key.to_public_key()).map_err(generation_error)?;
    let public_key = openssh_line(KeyData::Rsa(public)).map_err(generation_error)?;
    let fingerprint = created_rsa_fingerprint(&key)?;
    Ok(CreatedKey {
        private_key,
        public_key,
        fingerprint,
    })
}

fn create_ed25519() -> Result<CreatedKey, KeyError> {
    let key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(generation_error)?;
    let private_key = key
        .to_openssh(ssh_key::LineEnding::LF)
        .map_err(generation_error)?
        .as_str()
        .to_owned();
    let key_data = key.public_key().key_data().clone();
    let fingerprint = sha256_fingerprint(&key_data);
    let public_key = openssh_line(key_data).map_err(generation_error)?;
    Ok(CreatedKey {
        private_key,
        public_key,
        fingerprint,
    })
}

/// EC2's fingerprint of an RSA key pair it created: SHA-1 of the DER PKCS#8 private key.
fn created_rsa_fingerprint(key: &rsa::RsaPrivateKey) -> Result<String, KeyError> {
    let der = key.to_pkcs8_der().map_err(generation_error)?;
    Ok(colon_hex(&Sha1::digest(der.as_bytes())))
}

/// Parses a public key as `ImportKeyPair` accepts it (its `PublicKeyMaterial` after base64
/// decoding) and computes the fingerprint EC2 shows for it.
///
/// Accepted: OpenSSH one-line format (`ssh-rsa AAAA… comment`, `ssh-ed25519 …`), the
/// RFC 4716 SSH2 format (`---- BEGIN SSH2 PUBLIC KEY ----`), a PEM `PUBLIC KEY`
/// (SubjectPublicKeyInfo) or `RSA PUBLIC KEY` (PKCS#1), and a SubjectPublicKeyInfo in DER,
/// raw or base64-encoded. Only RSA (1024, 2048, 3072 or 4096 bits) and ED25519 keys pass.
pub fn import(material: &[u8]) -> Result<ImportedKey, KeyError> {
    let key_data = parse_public_key(material)?;
    imported(key_data)
}

fn parse_public_key(material: &[u8]) -> Result<KeyData, KeyError> {
    // Binary DER: a SEQUENCE. Text formats never start with '0', so try it first.
    if material.first() == Some(&0x30) {
        if let Ok(key) = parse_der(material) {
            return Ok(key);
        }
    }
    let text = std::str::from_utf8(material)
        .map_err(|_| KeyError::InvalidFormat)?
        .trim();
    if text.is_empty() {
        Err(KeyError::InvalidFormat)
    } else if text.starts_with(RFC4716_BEGIN) {
        parse_rfc4716(text)
    } else if text.starts_with("-----BEGIN ") {
        parse_pem(text)
    } else if text.contains(char::is_whitespace) {
        parse_openssh(text)
    } else {
        // Base64-encoded DER.
        let der = STANDARD.decode(text).map_err(|_| KeyError::InvalidFormat)?;
        parse_der(&der)
    }
}

/// `algorithm base64-blob [comment]` on a single line.
fn parse_openssh(text: &str) -> Result<KeyData, KeyError> {
    if text.contains('\n') {
        return Err(KeyError::InvalidFormat);
    }
    PublicKey::from_openssh(text)
        .map(|key| key.key_data().clone())
        .map_err(|_| KeyError::InvalidFormat)
}

/// RFC 4716: begin line, headers (`Tag: value`, continued by a trailing backslash), base64
/// body, end line.
fn parse_rfc4716(text: &str) -> Result<KeyData, KeyError> {
    let mut lines = text.lines().map(str::trim);
    if lines.next() != Some(RFC4716_BEGIN) {
        return Err(KeyError::InvalidFormat);
    }
    let mut body = String::new();
    let mut in_headers = true;
    let mut continued = false;
    let mut ended = false;
    for line in lines.by_ref() {
        if line == RFC4716_END {
            ended = true;
            break;
        }
        if continued || (in_headers && line.contains(':')) {
            continued = line.ends_with('\\');
            continue;
        }
        in_headers = false;
        body.push_str(line);
    }
    if !ended || continued || lines.any(|line| !line.is_empty()) {
        return Err(KeyError::InvalidFormat);
    }
    let blob = STANDARD.decode(body).map_err(|_| KeyError::InvalidFormat)?;
    PublicKey::from_bytes(&blob)
        .map(|key| key.key_data().clone())
        .map_err(|_| KeyError::InvalidFormat)
}

/// PEM: `PUBLIC KEY` (SubjectPublicKeyInfo) or `RSA PUBLIC KEY` (PKCS#1).
fn parse_pem(text: &str) -> Result<KeyData, KeyError> {
    let (label, der) =
        rsa::pkcs1::der::pem::decode_vec(text.as_bytes()).map_err(|_| KeyError::InvalidFormat)?;
    match label {
        "PUBLIC KEY" => parse_der(&der),
        "RSA PUBLIC KEY" => parse_pkcs1(&der),
        _ => Err(KeyError::InvalidFormat),
    }
}

/// DER SubjectPublicKeyInfo.
fn parse_der(der: &[u8]) -> Result<KeyData, KeyError> {
    let spki = SubjectPublicKeyInfoRef::try_from(der).map_err(|_| KeyError::InvalidFormat)?;
    let key = spki
        .subject_public_key
        .as_bytes()
        .ok_or(KeyError::InvalidFormat)?;
    match spki.algorithm.oid {
        OID_RSA => parse_pkcs1(key),
        OID_ED25519 => Ed25519PublicKey::try_from(key)
            .map(KeyData::Ed25519)
            .map_err(|_| KeyError::InvalidFormat),
        OID_EC => Err(KeyError::UnsupportedType("ECDSA".to_owned())),
        OID_DSA => Err(KeyError::UnsupportedType("DSA".to_owned())),
        _ => Err(KeyError::InvalidFormat),
    }
}

/// DER PKCS#1 `RSAPublicKey`.
fn parse_pkcs1(der: &[u8]) -> Result<KeyData, KeyError> {
    let key = rsa::pkcs1::RsaPublicKey::from_der(der).map_err(|_| KeyError::InvalidFormat)?;
    let e = Mpint::from_positive_bytes(key.public_exponent.as_bytes())
        .map_err(|_| KeyError::InvalidFormat)?;
    let n =
        Mpint::from_positive_bytes(key.modulus.as_bytes()).map_err(|_| KeyError::InvalidFormat)?;
    Ok(KeyData::Rsa(RsaPublicKey { e, n }))
}

/// Checks a parsed key against what EC2 accepts and computes its import fingerprint.
fn imported(key_data: KeyData) -> Result<ImportedKey, KeyError> {
    match key_data {
        KeyData::Rsa(key) => {
            let n = key.n.as_positive_bytes().ok_or(KeyError::InvalidFormat)?;
            let e = key.e.as_positive_bytes().ok_or(KeyError::InvalidFormat)?;
            let bits = bit_length(n);
            if !IMPORTED_RSA_BITS.contains(&bits) {
                return Err(KeyError::UnsupportedRsaLength(bits));
            }
            let key = rsa::RsaPublicKey::new(
                rsa::BigUint::from_bytes_be(n),
                rsa::BigUint::from_bytes_be(e),
            )
            .map_err(|_| KeyError::InvalidFormat)?;
            let spki = key
                .to_public_key_der()
                .map_err(|_| KeyError::InvalidFormat)?;
            let fingerprint = colon_hex(&Md5::digest(spki.as_bytes()));
            // Re-encoded from the parsed numbers, so the blob is canonical.
            let public = RsaPublicKey::try_from(&key).map_err(|_| KeyError::InvalidFormat)?;
            Ok(ImportedKey {
                public_key: openssh_line(KeyData::Rsa(public))
                    .map_err(|_| KeyError::InvalidFormat)?,
                key_type: KeyType::Rsa,
                fingerprint,
            })
        }
        KeyData::Ed25519(key) => {
            let key_data = KeyData::Ed25519(key);
            Ok(ImportedKey {
                fingerprint: sha256_fingerprint(&key_data),
                public_key: openssh_line(key_data).map_err(|_| KeyError::InvalidFormat)?,
                key_type: KeyType::Ed25519,
            })
        }
        KeyData::Dsa(_) => Err(KeyError::UnsupportedType("DSA".to_owned())),
        KeyData::Ecdsa(_) => Err(KeyError::UnsupportedType("ECDSA".to_owned())),
        other => Err(KeyError::UnsupportedType(
            other.algorithm().as_str().to_owned(),
        )),
    }
}

/// The number of significant bits of a big-endian unsigned integer.
fn bit_length(be: &[u8]) -> usize {
    let Some(first) = be.iter().position(|&b| b != 0) else {
        return 0;
    };
    (be.len() - first) * 8 - be[first].leading_zeros() as usize
}

/// OpenSSH one-line format without comment.
fn openssh_line(key_data: KeyData) -> ssh_key::Result<String> {
    PublicKey::new(key_data, "").to_openssh()
}

/// Base64 SHA-256 of the SSH wire-format public key, padded as EC2 shows it.
fn sha256_fingerprint(key_data: &KeyData) -> String {
    STANDARD.encode(key_data.fingerprint(HashAlg::Sha256).as_bytes())
}

/// `aa:bb:cc:…` lowercase hex.
fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rsa::pkcs1::DecodeRsaPrivateKey as _;
    use rsa::traits::PublicKeyParts as _;

    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!("../../tests/data/keys/", $name))
        };
    }

    /// The first two fields of an OpenSSH public key line: the line without its comment.
    fn without_comment(line: &str) -> String {
        line.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn key_types_carry_their_ec2_names() {
        assert_eq!(KeyType::Rsa.as_str(), "rsa");
        assert_eq!(KeyType::Ed25519.as_str(), "ed25519");
        assert_eq!(KeyType::parse("rsa"), Some(KeyType::Rsa));
        assert_eq!(KeyType::parse("ed25519"), Some(KeyType::Ed25519));
        assert_eq!(KeyType::parse("RSA"), None);
        assert_eq!(KeyType::parse("dsa"), None);
        assert_eq!(KeyType::default(), KeyType::Rsa);
    }

    #[test]
    fn created_rsa_key_round_trips_through_its_pkcs1_pem() {
        let created = create(KeyType::Rsa).unwrap();
        assert!(created
            .private_key
            .starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
        assert!(created
            .private_key
            .trim_end()
            .ends_with("-----END RSA PRIVATE KEY-----"));
        assert!(created.public_key.starts_with("ssh-rsa AAAA"));
        assert!(!created.public_key.contains('\n'));

        let private = rsa::RsaPrivateKey::from_pkcs1_pem(&created.private_key).unwrap();
        assert_eq!(bit_length(&private.to_public_key().n().to_bytes_be()), 2048);
        let public = RsaPublicKey::try_from(private.to_public_key()).unwrap();
        assert_eq!(
            openssh_line(KeyData::Rsa(public)).unwrap(),
            created.public_key
        );
        assert_eq!(
            created_rsa_fingerprint(&private).unwrap(),
            created.fingerprint
        );
        assert_eq!(created.fingerprint.len(), 20 * 3 - 1);
    }

    #[test]
    fn created_ed25519_key_round_trips_through_its_openssh_pem() {
        let created = create(KeyType::Ed25519).unwrap();
        assert!(created
            .private_key
            .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        assert!(created.public_key.starts_with("ssh-ed25519 AAAA"));

        let private = PrivateKey::from_openssh(&created.private_key).unwrap();
        assert!(!private.is_encrypted());
        assert_eq!(private.algorithm(), Algorithm::Ed25519);
        assert_eq!(
            private.public_key().to_openssh().unwrap(),
            created.public_key
        );
        assert_eq!(
            sha256_fingerprint(private.public_key().key_data()),
            created.fingerprint
        );
    }

    #[test]
    fn created_keys_are_distinct() {
        let a = create(KeyType::Ed25519).unwrap();
        let b = create(KeyType::Ed25519).unwrap();
        assert_ne!(a.public_key, b.public_key);
        assert_ne!(a.fingerprint, b.fingerprint);
    }

    #[test]
    fn created_ed25519_key_keeps_its_fingerprint_when_reimported() {
        let created = create(KeyType::Ed25519).unwrap();
        let imported = import(created.public_key.as_bytes()).unwrap();
        assert_eq!(imported.key_type, KeyType::Ed25519);
        assert_eq!(imported.public_key, created.public_key);
        assert_eq!(imported.fingerprint, created.fingerprint);
    }

    #[test]
    fn created_rsa_key_gets_an_md5_fingerprint_when_reimported() {
        let created = create(KeyType::Rsa).unwrap();
        let imported = import(created.public_key.as_bytes()).unwrap();
        assert_eq!(imported.key_type, KeyType::Rsa);
        assert_eq!(imported.public_key, created.public_key);
        assert_ne!(imported.fingerprint, created.fingerprint);
        assert_eq!(imported.fingerprint.len(), 16 * 3 - 1);
    }

    #[test]
    fn created_rsa_fingerprint_is_the_sha1_of_the_pkcs8_der_that_openssl_computes() {
        let private = rsa::RsaPrivateKey::from_pkcs1_pem(fixture!("rsa2048.pkcs1.pem")).unwrap();
        assert_eq!(
            created_rsa_fingerprint(&private).unwrap(),
            fixture!("rsa2048.create.fingerprint").trim()
        );
    }

    #[test]
    fn imported_openssh_rsa_key_has_the_md5_spki_fingerprint_openssl_computes() {
        let imported = import(fixture!("rsa2048.pub").as_bytes()).unwrap();
        assert_eq!(imported.key_type, KeyType::Rsa);
        assert_eq!(
            imported.fingerprint,
            fixture!("rsa2048.import.fingerprint").trim()
        );
        assert_eq!(
            imported.public_key,
            without_comment(fixture!("rsa2048.pub"))
        );
    }

    #[test]
    fn imported_openssh_ed25519_key_has_the_sha256_fingerprint_ssh_keygen_computes() {
        let imported = import(fixture!("ed25519.pub").as_bytes()).unwrap();
        assert_eq!(imported.key_type, KeyType::Ed25519);
        assert_eq!(imported.fingerprint, fixture!("ed25519.fingerprint").trim());
        assert!(imported.fingerprint.ends_with('='));
        assert_eq!(
            imported.public_key,
            without_comment(fixture!("ed25519.pub"))
        );
    }

    #[test]
    fn every_rsa_encoding_imports_as_the_same_key() {
        let expected = import(fixture!("rsa2048.pub").as_bytes()).unwrap();
        let spki_der: &[u8] = include_bytes!("../../tests/data/keys/rsa2048.spki.der");
        let encodings: Vec<(&str, Vec<u8>)> = vec![
            (
                "rfc4716",
                fixture!("rsa2048.rfc4716.pub").as_bytes().to_vec(),
            ),
            ("spki pem", fixture!("rsa2048.spki.pem").as_bytes().to_vec()),
            (
                "pkcs1 pem",
                fixture!("rsa2048.pkcs1.pub.pem").as_bytes().to_vec(),
            ),
            ("spki der", spki_der.to_vec()),
            ("base64 spki der", STANDARD.encode(spki_der).into_bytes()),
        ];
        for (name, material) in encodings {
            assert_eq!(import(&material).unwrap(), expected, "{name}");
        }
    }

    #[test]
    fn every_ed25519_encoding_imports_as_the_same_key() {
        let expected = import(fixture!("ed25519.pub").as_bytes()).unwrap();
        assert_eq!(
            import(fixture!("ed25519.rfc4716.pub").as_bytes()).unwrap(),
            expected
        );

        // SubjectPublicKeyInfo (RFC 8410) around the raw 32-byte key.
        let blob = STANDARD
            .decode(fixture!("ed25519.pub").split_whitespace().nth(1).unwrap())
            .unwrap();
        let raw = &blob[blob.len() - 32..];
        let mut der = vec![
            0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
        ];
        der.extend_from_slice(raw);
        assert_eq!(import(&der).unwrap(), expected);
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            STANDARD.encode(&der)
        );
        assert_eq!(import(pem.as_bytes()).unwrap(), expected);
    }

    #[test]
    fn import_tolerates_surrounding_whitespace_and_crlf() {
        let expected = import(fixture!("rsa2048.pub").as_bytes()).unwrap();
        let padded = format!("\n  {}  \r\n\r\n", fixture!("rsa2048.pub").trim());
        assert_eq!(import(padded.as_bytes()).unwrap(), expected);
        let crlf = fixture!("rsa2048.rfc4716.pub").replace('\n', "\r\n");
        assert_eq!(import(crlf.as_bytes()).unwrap(), expected);
        let bare = without_comment(fixture!("rsa2048.pub"));
        assert_eq!(import(bare.as_bytes()).unwrap(), expected);
    }

    #[test]
    fn rfc4716_headers_may_continue_over_several_lines() {
        let expected = import(fixture!("ed25519.pub").as_bytes()).unwrap();
        let blob = fixture!("ed25519.pub").split_whitespace().nth(1).unwrap();
        let text = format!(
            "{RFC4716_BEGIN}\nSubject: someone\nComment: \"a comment that goes \\\non: and on\"\n{}\n{}\n{RFC4716_END}\n",
            &blob[..40],
            &blob[40..]
        );
        assert_eq!(import(text.as_bytes()).unwrap(), expected);
    }

    #[test]
    fn rsa_keys_of_accepted_lengths_import() {
        for (material, bits) in [
            (fixture!("rsa1024.pub"), 1024),
            (fixture!("rsa2048.pub"), 2048),
            (fixture!("rsa3072.pub"), 3072),
        ] {
            let imported = import(material.as_bytes()).unwrap();
            assert_eq!(imported.key_type, KeyType::Rsa, "{bits}");
        }
    }

    #[test]
    fn rsa_key_of_another_length_is_refused_with_its_length() {
        let err = import(fixture!("rsa1536.pub").as_bytes()).unwrap_err();
        assert_eq!(err, KeyError::UnsupportedRsaLength(1536));
        assert_eq!(
            err.to_string(),
            "RSA key length of 1536 bits is not supported; use 1024, 2048, 3072 or 4096 bits"
        );
        assert!(err.is_client_error());
    }

    #[test]
    fn dsa_and_ecdsa_keys_are_refused_by_type() {
        let err = import(fixture!("dsa.pub").as_bytes()).unwrap_err();
        assert_eq!(err, KeyError::UnsupportedType("DSA".to_owned()));
        assert_eq!(
            err.to_string(),
            "Key type DSA is not supported; use an RSA or ED25519 key"
        );
        assert_eq!(
            import(fixture!("ecdsa.pub").as_bytes()).unwrap_err(),
            KeyError::UnsupportedType("ECDSA".to_owned())
        );
    }

    #[test]
    fn malformed_material_is_an_invalid_format() {
        let rsa_line = fixture!("rsa2048.pub").trim();
        let blob = rsa_line.split_whitespace().nth(1).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("blank", b"  \n\t ".to_vec()),
            ("garbage", b"this is not a key".to_vec()),
            ("binary garbage", vec![0x30, 0x82, 0xff, 0x00, 0x01, 0xfe]),
            ("not utf-8", vec![0xff, 0xfe, 0xfd]),
            (
                "truncated base64",
                format!("ssh-rsa {}", &blob[..blob.len() - 10]).into_bytes(),
            ),
            (
                "base64 cut to a whole quantum",
                format!("ssh-rsa {}", &blob[..blob.len() / 2 / 4 * 4]).into_bytes(),
            ),
            ("algorithm only", b"ssh-ed25519".to_vec()),
            (
                "algorithm mismatch",
                format!("ssh-ed25519 {blob}").into_bytes(),
            ),
            ("two keys", format!("{rsa_line}\n{rsa_line}").into_bytes()),
            (
                "private key",
                fixture!("rsa2048.pkcs1.pem").as_bytes().to_vec(),
            ),
            (
                "rfc4716 without end",
                fixture!("rsa2048.rfc4716.pub")
                    .replace(RFC4716_END, "")
                    .into_bytes(),
            ),
            (
                "bare base64 of no der",
                STANDARD.encode(b"hello").into_bytes(),
            ),
        ];
        for (name, material) in cases {
            assert_eq!(
                import(&material).unwrap_err(),
                KeyError::InvalidFormat,
                "{name}"
            );
        }
        assert_eq!(
            KeyError::InvalidFormat.to_string(),
            "Key is not in valid OpenSSH public key format"
        );
    }

    #[test]
    fn every_truncation_of_every_fixture_is_an_error_or_a_key_never_a_panic() {
        let spki_der: &[u8] = include_bytes!("../../tests/data/keys/rsa2048.spki.der");
        let fixtures: [&[u8]; 9] = [
            fixture!("rsa2048.pub").as_bytes(),
            fixture!("ed25519.pub").as_bytes(),
            fixture!("rsa2048.rfc4716.pub").as_bytes(),
            fixture!("ed25519.rfc4716.pub").as_bytes(),
            fixture!("rsa2048.spki.pem").as_bytes(),
            fixture!("rsa2048.pkcs1.pub.pem").as_bytes(),
            fixture!("dsa.pub").as_bytes(),
            fixture!("ecdsa.pub").as_bytes(),
            spki_der,
        ];
        for material in fixtures {
            for len in 0..material.len() {
                let _ = import(&material[..len]);
            }
        }
    }

    #[test]
    fn bit_length_counts_significant_bits() {
        assert_eq!(bit_length(&[]), 0);
        assert_eq!(bit_length(&[0, 0]), 0);
        assert_eq!(bit_length(&[1]), 1);
        assert_eq!(bit_length(&[0, 0x80, 0]), 16);
        assert_eq!(bit_length(&[0x7f, 0xff]), 15);
    }

    #[test]
    fn generation_errors_are_the_servers_fault() {
        assert!(!KeyError::Generation("no entropy".to_owned()).is_client_error());
        assert!(KeyError::InvalidFormat.is_client_error());
    }
}
