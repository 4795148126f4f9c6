//! Host and master key pairs (Ed25519, PKCS#8 files readable by root only).

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
};

use anyhow::{Context as _, bail};
use pvc_proto::PublicKey;
use ring::{rand::SystemRandom, signature::Ed25519KeyPair};
use tracing::info;

/// Where a host's key lives unless configured otherwise.
pub const DEFAULT_KEY_FILE: &str = "/var/lib/pvc/host.key";

/// A key pair and its public half.
pub struct KeyPair {
    pub pair: Ed25519KeyPair,
    pub public: PublicKey,
}

impl KeyPair {
    fn from_pkcs8(bytes: &[u8], path: &Path) -> anyhow::Result<Self> {
        let pair = Ed25519KeyPair::from_pkcs8(bytes).map_err(|e| {
            anyhow::anyhow!(
                "{} is not an Ed25519 private key (PKCS#8): {e}",
                path.display()
            )
        })?;
        Ok(Self {
            public: PublicKey::of(&pair),
            pair,
        })
    }

    /// A new key pair that lives in memory only (a master's key in tests,
    /// a throwaway identity).
    pub fn generate() -> anyhow::Result<Self> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
        Self::from_pkcs8(doc.as_ref(), Path::new("(memory)"))
    }

    /// Creates a key pair and writes it to `path` (mode 0600); refuses to
    /// overwrite an existing key.
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| {
                format!(
                    "cannot create key file {} (does it exist already?)",
                    path.display()
                )
            })?;
        f.write_all(doc.as_ref())?;
        f.sync_all()?;
        Self::from_pkcs8(doc.as_ref(), path)
    }

    /// Reads a key pair; refuses a file others can read.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let meta =
            fs::metadata(path).with_context(|| format!("cannot read key {}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "key {} can be read by others (mode {:o}): `chmod 600 {}`",
                path.display(),
                meta.permissions().mode() & 0o777,
                path.display()
            );
        }
        let bytes =
            fs::read(path).with_context(|| format!("cannot read key {}", path.display()))?;
        Self::from_pkcs8(&bytes, path)
    }

    /// The host key, created on first start.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        if path.exists() {
            return Self::load(path);
        }
        let k = Self::create(path)?;
        info!(key = %path.display(), public = %k.public, "created this host's key pair; admit it with `pvc master admit --host-key {}`", k.public);
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_private_and_round_trip() {
        let dir = std::env::temp_dir().join(format!("pvc-keys-{}", std::process::id()));
        let path = dir.join("host.key");
        let k = KeyPair::create(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(KeyPair::load(&path).unwrap().public, k.public);
        assert!(KeyPair::create(&path).is_err(), "never overwrites a key");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = KeyPair::load(&path).err().unwrap().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        fs::write(dir.join("junk.key"), b"junk").unwrap();
        fs::set_permissions(dir.join("junk.key"), fs::Permissions::from_mode(0o600)).unwrap();
        assert!(KeyPair::load(&dir.join("junk.key")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
