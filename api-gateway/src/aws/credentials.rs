//! Access keys: generating the key ID and secret, and sealing the secret at rest with the
//! gateway's secrets key (AES-256-GCM). Pure except for the random numbers.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use rand::Rng as _;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Nonce length of AES-GCM, in bytes.
const NONCE_LEN: usize = 12;
/// Prefix of every Karri access key ID (AWS's start with `AKIA`).
pub const ACCESS_KEY_PREFIX: &str = "AKIK";

/// Why a secret could not be sealed or opened, or the key not loaded.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file could not be read or written.
    #[error("cannot use the secrets key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file does not hold 32 bytes in base64.
    #[error("the secrets key file {0} must hold 32 random bytes in base64")]
    BadKey(String),
    /// The sealed value is damaged or was sealed with another key.
    #[error("the sealed secret cannot be opened: it is damaged or sealed with another key")]
    Open,
    /// Encryption failed (does not happen with a valid key).
    #[error("the secret could not be sealed")]
    Seal,
}

/// Seals and opens secrets with one AES-256-GCM key.
pub struct Sealer {
    cipher: Aes256Gcm,
    derive_key: [u8; 32],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// A sealer with this 256-bit key.
    pub fn new(key: &[u8; 32]) -> Self {
        Sealer {
            cipher: Aes256Gcm::new(key.into()),
            derive_key: *key,
        }
    }

    /// A secret derived from the key for `label` (hex of HMAC-SHA256): the same on every
    /// gateway sharing the key, never stored (the S3 credentials of node agents' presigned
    /// image URLs).
    pub fn derive(&self, label: &str) -> String {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.derive_key)
            .expect("HMAC accepts a key of any length");
        mac.update(b"karri-derived:");
        mac.update(label.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Load the key from `path` (base64 of 32 bytes), creating the file with a fresh random key
    /// (mode 0600) when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, SealError> {
        let shown = path.display().to_string();
        let io = |source| SealError::KeyFile {
            path: shown.clone(),
            source,
        };
        if !path.exists() {
            let key: [u8; 32] = rand::rng().random();
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            write_private(path, B64.encode(key).as_bytes()).map_err(io)?;
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        let raw = B64
            .decode(text.trim())
            .map_err(|_| SealError::BadKey(shown.clone()))?;
        let key: [u8; 32] = raw.try_into().map_err(|_| SealError::BadKey(shown))?;
        Ok(Sealer::new(&key))
    }

    /// Seal `plain` for `context` (what it belongs to, see [`access_key_context`]):
    /// [`BOUND_PREFIX`] and base64 of a random nonce followed by the ciphertext and tag, with
    /// `context` as associated data, so that the value opens for that context alone (copied
    /// into another record, it opens nowhere).
    pub fn seal(&self, plain: &str, context: &str) -> Result<String, SealError> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::rng().random();
        let payload = Payload {
            msg: plain.as_bytes(),
            aad: context.as_bytes(),
        };
        let sealed = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce_bytes), payload)
            .map_err(|_| SealError::Seal)?;
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&sealed);
        Ok(format!("{BOUND_PREFIX}{}", B64.encode(out)))
    }

    /// Open a value made by [`Sealer::seal`] for `context`; also one sealed before values
    /// were bound to a context (then `Opened::legacy`, for the caller to seal it again).
    pub fn open(&self, sealed: &str, context: &str) -> Result<Opened, SealError> {
        let (text, aad, legacy) = match sealed.strip_prefix(BOUND_PREFIX) {
            Some(text) => (text, context.as_bytes(), false),
            None => (sealed, &b""[..], true),
        };
        let raw = B64.decode(text).map_err(|_| SealError::Open)?;
        if raw.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, body) = raw.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad })
            .map_err(|_| SealError::Open)?;
        Ok(Opened {
            secret: String::from_utf8(plain).map_err(|_| SealError::Open)?,
            legacy,
        })
    }
}

/// Marks a value sealed for a context ([`Sealer::seal`]); values without it were sealed before
/// values were bound to what they belong to.
pub const BOUND_PREFIX: &str = "v2:";

/// A secret opened by [`Sealer::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// The secret.
    pub secret: String,
    /// Whether it was sealed without a context: it should be sealed again, bound.
    pub legacy: bool,
}

/// The context an access key's secret is sealed for: its ID and its account's name, so that a
/// sealed secret copied into another access key record (say by someone who can write etcd and
/// knows their own secret) opens for none. Pure.
pub fn access_key_context(access_key_id: &str, account_name: &str) -> String {
    format!("karri-access-key:{access_key_id}:{account_name}")
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

/// A fresh access key ID: `AKIK` and 16 characters of the base32 alphabet (A–Z, 2–7), 20 in all.
pub fn new_access_key_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut rng = rand::rng();
    let tail: String = (0..16)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect();
    format!("{ACCESS_KEY_PREFIX}{tail}")
}

/// A fresh secret access key: 40 characters of base64 (30 random bytes), as AWS's look.
pub fn new_secret_access_key() -> String {
    let bytes: [u8; 30] = rand::rng().random();
    B64.encode(bytes)
}

/// A fresh 12-digit account ID that does not start with 0.
pub fn new_account_id() -> String {
    let n: u64 = rand::rng().random_range(100_000_000_000..1_000_000_000_000);
    n.to_string()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    #[test]
    fn a_sealed_secret_opens_only_with_its_key_and_for_its_own_context() {
        let sealer = Sealer::new(&[7; 32]);
        let mine = access_key_context("AKIKAAAAAAAAAAAAAAAA", "research");
        let sealed = sealer.seal(SECRET, &mine).unwrap();
        assert!(!sealed.contains("wJalr") && sealed.starts_with(BOUND_PREFIX));
        assert_eq!(
            sealer.open(&sealed, &mine).unwrap(),
            Opened {
                secret: SECRET.into(),
                legacy: false
            }
        );
        assert!(Sealer::new(&[8; 32]).open(&sealed, &mine).is_err());
        // Copied into another key's record, or another account's, it opens for neither.
        for other in [
            access_key_context("AKIKBBBBBBBBBBBBBBBB", "research"),
            access_key_context("AKIKAAAAAAAAAAAAAAAA", "admin"),
        ] {
            assert!(sealer.open(&sealed, &other).is_err(), "{other}");
        }
        // Nor with its context stripped, as a legacy value.
        let stripped = sealed.trim_start_matches(BOUND_PREFIX);
        assert!(sealer.open(stripped, &mine).is_err());
        assert!(sealer.open("not base64!", &mine).is_err());
        assert!(sealer.open("AAAA", &mine).is_err());
    }

    #[test]
    fn a_secret_sealed_before_contexts_still_opens_and_says_so() {
        let sealer = Sealer::new(&[7; 32]);
        let nonce = [3u8; NONCE_LEN];
        let body = sealer
            .cipher
            .encrypt(Nonce::from_slice(&nonce), SECRET.as_bytes())
            .unwrap();
        let legacy = B64.encode([nonce.to_vec(), body].concat());
        let opened = sealer.open(&legacy, "anything").unwrap();
        assert_eq!((opened.secret.as_str(), opened.legacy), (SECRET, true));
    }

    #[test]
    fn sealing_twice_gives_different_ciphertexts() {
        let sealer = Sealer::new(&[1; 32]);
        assert_ne!(
            sealer.seal("x", "c").unwrap(),
            sealer.seal("x", "c").unwrap()
        );
    }

    #[test]
    fn generated_credentials_have_aws_shapes() {
        let id = new_access_key_id();
        assert_eq!(id.len(), 20);
        assert!(crds::access_key::is_valid_access_key_id(&id));
        assert_eq!(new_secret_access_key().len(), 40);
        let account = new_account_id();
        assert!(crds::is_valid_account_id(&account));
    }

    #[test]
    fn a_missing_key_file_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/secrets.key");
        let first = Sealer::load_or_create(&path).unwrap();
        let sealed = first.seal("s", "c").unwrap();
        let again = Sealer::load_or_create(&path).unwrap();
        assert_eq!(again.open(&sealed, "c").unwrap().secret, "s");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "short").unwrap();
        assert!(Sealer::load_or_create(&path).is_err());
    }
}
