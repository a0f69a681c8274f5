//! Custom CA certificates (an enterprise's interception proxy, an
//! internal registry): `[sandbox] ca_certificates` names a PEM file. At
//! start the server writes two files in its data directory: the bundle
//! (this host's trusted CAs plus the custom ones) and the custom ones
//! alone. Every sandbox gets them mounted read-only, the bundle also over
//! the system trust store's path, and the variables tools read it from.

use std::path::{Path, PathBuf};

/// Where the bundle is in a sandbox.
pub const SANDBOX_BUNDLE: &str = "/.backshift/ca/bundle.pem";
/// Where the custom certificates alone are in a sandbox.
pub const SANDBOX_EXTRA: &str = "/.backshift/ca/extra.pem";
/// The system trust store's path (Debian, Ubuntu, Alpine); the bundle is
/// mounted over it too, for tools that read no variable.
pub const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where this host keeps its trusted CAs.
const HOST_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// The files a sandbox gets.
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// Host CAs plus the custom ones.
    pub bundle: PathBuf,
    /// The custom ones alone.
    pub extra: PathBuf,
}

impl CaFiles {
    /// The variables that point the usual tools at the bundle.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("SSL_CERT_FILE", SANDBOX_BUNDLE),
            ("CURL_CA_BUNDLE", SANDBOX_BUNDLE),
            ("REQUESTS_CA_BUNDLE", SANDBOX_BUNDLE),
            ("PIP_CERT", SANDBOX_BUNDLE),
            ("GIT_SSL_CAINFO", SANDBOX_BUNDLE),
            ("CARGO_HTTP_CAINFO", SANDBOX_BUNDLE),
            ("NODE_EXTRA_CA_CERTS", SANDBOX_EXTRA),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

/// Writes the files for `custom` (a PEM file) under `data_dir`; an error
/// says what is wrong with it.
pub fn prepare(custom: &Path, data_dir: &Path) -> anyhow::Result<CaFiles> {
    let pem = std::fs::read_to_string(custom).map_err(|e| {
        anyhow::anyhow!(
            "cannot read [sandbox] ca_certificates {}: {e}",
            custom.display()
        )
    })?;
    let count = pem.matches("-----BEGIN CERTIFICATE-----").count();
    if count == 0 || count != pem.matches("-----END CERTIFICATE-----").count() {
        anyhow::bail!(
            "[sandbox] ca_certificates {} holds no PEM certificates (-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----)",
            custom.display()
        );
    }
    let host = HOST_BUNDLES
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let dir = data_dir.join("ca");
    std::fs::create_dir_all(&dir)?;
    let bundle = dir.join("bundle.pem");
    let extra = dir.join("extra.pem");
    let mut all = host;
    if !all.is_empty() && !all.ends_with('\n') {
        all.push('\n');
    }
    all.push_str(&pem);
    std::fs::write(&bundle, all)?;
    std::fs::write(&extra, &pem)?;
    tracing::info!(
        "{count} custom CA certificates from {} go into every sandbox",
        custom.display()
    );
    Ok(CaFiles { bundle, extra })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ca.pem");
        std::fs::write(&f, "not a certificate").unwrap();
        let e = prepare(&f, dir.path()).unwrap_err().to_string();
        assert!(e.contains("holds no PEM certificates"), "{e}");
        let e = prepare(&dir.path().join("missing.pem"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
        std::fs::write(
            &f,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let files = prepare(&f, dir.path()).unwrap();
        let bundle = std::fs::read_to_string(&files.bundle).unwrap();
        assert!(bundle.ends_with("-----END CERTIFICATE-----\n"));
        assert!(
            files
                .env()
                .iter()
                .any(|(k, v)| k == "NODE_EXTRA_CA_CERTS" && v == SANDBOX_EXTRA)
        );
    }
}
