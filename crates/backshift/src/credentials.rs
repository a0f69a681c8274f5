//! The CLI's credentials file: `<config dir>/backshift/credentials.toml`
//! (0600), mapping server URLs to tokens. `BACKSHIFT_CONFIG_DIR` moves it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    #[serde(default)]
    servers: BTreeMap<String, Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    token: String,
}

/// Where the file lives.
pub fn path() -> PathBuf {
    let dir = std::env::var_os("BACKSHIFT_CONFIG_DIR")
        .map(PathBuf::from)
        .or_else(|| dirs::config_dir().map(|d| d.join("backshift")))
        .unwrap_or_else(|| PathBuf::from(".backshift"));
    dir.join("credentials.toml")
}

/// The token saved for `url`.
pub fn load(url: &str) -> Option<String> {
    let text = std::fs::read_to_string(path()).ok()?;
    let file: File = toml::from_str(&text).ok()?;
    file.servers
        .get(url.trim_end_matches('/'))
        .map(|e| e.token.clone())
}

/// Saves `token` for `url`, creating the file with mode 0600.
pub fn save(url: &str, token: &str) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file: File = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| toml::from_str(&t).ok())
        .unwrap_or_default();
    file.servers.insert(
        url.trim_end_matches('/').to_owned(),
        Entry {
            token: token.to_owned(),
        },
    );
    let text = toml::to_string(&file)?;
    let tmp = path.with_extension("toml.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}
