//! Secrets: sealed at rest with XChaCha20-Poly1305 under a key the server
//! reads from a file or an environment variable (or, by default, a key
//! file it creates in its data directory), granted to projects, exposed
//! to a project's sandboxes as the environment variable the grant names,
//! and redacted from everything written (see `backshift_store::redact`).
//!
//! Rotation: point `[secrets] key_file` (or `key_env`) at the new key and
//! list the old one in `previous_key_files`; secrets sealed with an old
//! key are still opened, and `POST /api/v1/secrets/rotate` (`backshift
//! secrets rotate`) re-seals them all with the new one, after which the
//! old key can go.

use crate::config::SecretsSection;
use crate::serve::App;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::path::Path;

/// The default key file's name in the data directory.
pub const DEFAULT_KEY_FILE: &str = "secrets.key";

/// One key: its id (the start of its SHA-256) and its cipher.
struct Key {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The current key (sealing) and the previous ones (opening only).
pub struct Keyring {
    current: Key,
    previous: Vec<Key>,
}

fn key_from_text(text: &str, from: &str) -> anyhow::Result<Key> {
    let bytes = hex::decode(text.trim()).map_err(|_| {
        anyhow::anyhow!(
            "the secrets key in {from} is not 64 hex digits (make one with `openssl rand -hex 32`)"
        )
    })?;
    if bytes.len() != 32 {
        anyhow::bail!(
            "the secrets key in {from} is {} bytes; it must be 32 (64 hex digits, e.g. `openssl rand -hex 32`)",
            bytes.len()
        );
    }
    let cipher = XChaCha20Poly1305::new_from_slice(&bytes)
        .map_err(|e| anyhow::anyhow!("the secrets key in {from} is unusable: {e}"))?;
    Ok(Key {
        id: hex::encode(&Sha256::digest(&bytes)[..6]),
        cipher,
    })
}

fn key_from_file(path: &Path) -> anyhow::Result<Key> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the secrets key file {}: {e}", path.display()))?;
    key_from_text(&text, &path.display().to_string())
}

impl Keyring {
    /// The keys `config` names; without one, `<data_dir>/secrets.key`,
    /// created (mode 0600) on first start.
    pub fn load(config: &SecretsSection, data_dir: &Path) -> anyhow::Result<Keyring> {
        let current = if let Some(var) = &config.key_env {
            let text = std::env::var(var).map_err(|_| {
                anyhow::anyhow!(
                    "[secrets] key_env names {var}, which is not set in the server's environment"
                )
            })?;
            key_from_text(&text, &format!("${var}"))?
        } else if let Some(path) = &config.key_file {
            key_from_file(path)?
        } else {
            let path = data_dir.join(DEFAULT_KEY_FILE);
            if !path.exists() {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut bytes = [0u8; 32];
                rand::rng().fill_bytes(&mut bytes);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| {
                        anyhow::anyhow!("cannot create the secrets key {}: {e}", path.display())
                    })?;
                writeln!(f, "{}", hex::encode(bytes))?;
            }
            key_from_file(&path)?
        };
        let previous = config
            .previous_key_files
            .iter()
            .map(|p| key_from_file(p))
            .collect::<anyhow::Result<Vec<Key>>>()?;
        Ok(Keyring { current, previous })
    }

    /// The current key's id.
    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    /// `value` sealed with the current key: (key id, base64 of nonce and
    /// ciphertext).
    pub fn seal(&self, value: &str) -> Result<(String, String), String> {
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = self
            .current
            .cipher
            .encrypt(&XNonce::from(nonce), value.as_bytes())
            .map_err(|e| format!("sealing failed: {e}"))?;
        let mut out = nonce.to_vec();
        out.extend(sealed);
        Ok((
            self.current.id.clone(),
            base64::engine::general_purpose::STANDARD.encode(out),
        ))
    }

    /// Opens a value sealed with key `key_id`.
    pub fn open(&self, key_id: &str, sealed: &str) -> Result<String, String> {
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == key_id)
            .ok_or_else(|| {
                format!(
                    "it was sealed with key {key_id}, which is neither [secrets] key (now {}) nor one of previous_key_files",
                    self.current.id
                )
            })?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .map_err(|e| format!("its stored form is damaged: {e}"))?;
        if bytes.len() < 24 {
            return Err("its stored form is too short".into());
        }
        let (nonce, ciphertext) = bytes.split_at(24);
        let nonce: [u8; 24] = nonce.try_into().map_err(|_| "bad nonce".to_owned())?;
        let plain = key
            .cipher
            .decrypt(&XNonce::from(nonce), ciphertext)
            .map_err(|_| {
                "it does not open with its key (the stored value was altered)".to_owned()
            })?;
        String::from_utf8(plain).map_err(|_| "it is not text".to_owned())
    }
}

/// Every secret's value, opened; the ones that cannot be opened with an
/// error each.
pub async fn open_all(
    app: &App,
) -> Result<Vec<(String, Result<String, String>)>, backshift_store::StoreError> {
    Ok(app
        .store
        .secrets()
        .await?
        .into_iter()
        .map(|s| {
            let value = app.keyring.open(&s.key_id, &s.sealed);
            (s.name, value)
        })
        .collect())
}

/// Loads every secret's value into the store's redactor (at start and
/// after every change).
pub async fn refresh_redactor(app: &App) -> Result<(), backshift_store::StoreError> {
    let mut values = Vec::new();
    for (name, value) in open_all(app).await? {
        match value {
            Ok(v) => values.push((name, v)),
            Err(e) => {
                tracing::error!("secret {name} cannot be opened, so it cannot be redacted: {e}")
            }
        }
    }
    app.store.redactor().set(values);
    Ok(())
}

/// The environment variables `project`'s grants give: its sandboxes'
/// (`setup` false), or its setup phase's (`setup` true: the setup-only
/// grants, given to `postCreateCommand` alone).
pub async fn sandbox_env(
    app: &App,
    project: &str,
    setup: bool,
) -> Result<Vec<(String, String)>, String> {
    let grants: Vec<_> = app
        .store
        .secret_grants(Some(project))
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|g| g.setup_only == setup)
        .collect();
    if grants.is_empty() {
        return Ok(Vec::new());
    }
    let opened = open_all(app).await.map_err(|e| e.to_string())?;
    let mut env = Vec::new();
    for g in grants {
        let value = opened
            .iter()
            .find(|(n, _)| *n == g.secret)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| Err("it does not exist".into()))
            .map_err(|e| {
                format!(
                    "secret {} (granted as {}) cannot be opened: {e}",
                    g.secret, g.var
                )
            })?;
        env.push((g.var, value));
    }
    Ok(env)
}

/// Variables a grant may not name: backshift sets them itself.
pub fn reserved_var(var: &str) -> bool {
    const OURS: [&str; 14] = [
        "HOME",
        "PATH",
        "LANG",
        "USER",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "NODE_USE_ENV_PROXY",
        "OPENAI_BASE_URL",
        "OPENAI_API_KEY",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_API_KEY",
        "GEMINI_API_KEY",
    ];
    /// Set when custom CA certificates are configured.
    const CA: [&str; 7] = [
        "SSL_CERT_FILE",
        "CURL_CA_BUNDLE",
        "REQUESTS_CA_BUNDLE",
        "PIP_CERT",
        "GIT_SSL_CAINFO",
        "CARGO_HTTP_CAINFO",
        "NODE_EXTRA_CA_CERTS",
    ];
    let upper = var.to_ascii_uppercase();
    OURS.contains(&upper.as_str())
        || CA.contains(&upper.as_str())
        || upper.starts_with("BACKSHIFT_")
        || upper.starts_with("GIT_CONFIG_")
        || upper == "GOOGLE_GEMINI_BASE_URL"
        || upper.starts_with("OPENCODE_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_seal_open_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let config = SecretsSection::default();
        let ring = Keyring::load(&config, dir.path()).unwrap();
        let key_file = dir.path().join(DEFAULT_KEY_FILE);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (id, sealed) = ring.seal("hunter2-long").unwrap();
        assert!(!sealed.contains("hunter2"));
        assert_ne!(
            ring.seal("hunter2-long").unwrap().1,
            sealed,
            "a fresh nonce each time"
        );
        assert_eq!(ring.open(&id, &sealed).unwrap(), "hunter2-long");
        // Altered: refused.
        let mut bytes = base64::engine::general_purpose::STANDARD
            .decode(&sealed)
            .unwrap();
        bytes[30] ^= 1;
        let altered = base64::engine::general_purpose::STANDARD.encode(bytes);
        assert!(ring.open(&id, &altered).unwrap_err().contains("altered"));
        // A new key with the old one as previous: old values still open.
        let new_key = dir.path().join("new.key");
        std::fs::write(&new_key, format!("{}\n", "ab".repeat(32))).unwrap();
        let rotated = Keyring::load(
            &SecretsSection {
                key_file: Some(new_key.clone()),
                key_env: None,
                previous_key_files: vec![key_file],
            },
            dir.path(),
        )
        .unwrap();
        assert_ne!(rotated.key_id(), id);
        assert_eq!(rotated.open(&id, &sealed).unwrap(), "hunter2-long");
        let alone = Keyring::load(
            &SecretsSection {
                key_file: Some(new_key),
                key_env: None,
                previous_key_files: vec![],
            },
            dir.path(),
        )
        .unwrap();
        assert!(
            alone
                .open(&id, &sealed)
                .unwrap_err()
                .contains("previous_key_files")
        );
        std::fs::write(dir.path().join("bad.key"), "nothex").unwrap();
        let e = Keyring::load(
            &SecretsSection {
                key_file: Some(dir.path().join("bad.key")),
                key_env: None,
                previous_key_files: vec![],
            },
            dir.path(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("64 hex digits"), "{e}");
    }

    #[test]
    fn backshifts_own_variables_are_reserved() {
        assert!(reserved_var("OPENAI_API_KEY"));
        assert!(reserved_var("https_proxy"));
        assert!(reserved_var("BACKSHIFT_MODEL_TOKEN"));
        assert!(!reserved_var("DATABASE_URL"));
    }
}
