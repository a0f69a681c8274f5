//! The default sandbox image, built without any registry: debootstrap a
//! minimal Debian, add the unprivileged sandbox user, and stream the root
//! filesystem into `docker import`. The tag carries a hash of the recipe,
//! so a changed recipe is a new image and a stale one is never reused.

use crate::docker::DockerDriver;
use crate::{Result, SandboxError};
use bollard::query_parameters::CreateImageOptions;
use futures::StreamExt;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// The Debian suite of the default image.
pub const SUITE: &str = "bookworm";

/// Packages in the default image beyond `minbase`.
pub const PACKAGES: &[&str] = &[
    "bash",
    "ca-certificates",
    "coreutils",
    "curl",
    "git",
    "procps",
    "python3",
];

/// The sandbox user: uid and gid 1000, home `/home/agent`.
pub const SANDBOX_USER: &str = "agent";
/// uid and gid of [`SANDBOX_USER`].
pub const SANDBOX_UID: u64 = 1000;

/// Bumped whenever the recipe below changes in a way the hash cannot see.
const RECIPE_VERSION: u32 = 1;

/// Image metadata applied at import.
const CHANGES: &[&str] = &[
    "ENV HOME=/home/agent",
    "ENV LANG=C.UTF-8",
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "WORKDIR /workspace",
    "CMD [\"sleep\", \"infinity\"]",
];

/// What an image built by [`bootstrap`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipe {
    /// The image's repository name.
    pub name: &'static str,
    /// Packages beyond `minbase`: the default image's, then these.
    pub extra: &'static [&'static str],
}

/// The default sandbox image.
pub const DEFAULT: Recipe = Recipe {
    name: "backshift-default",
    extra: &[],
};

/// The image of a sandbox's own Docker engine, which is also the sandbox
/// image of projects that have one (it has the `docker` CLI).
/// Its packages are the default image's and Debian's Docker engine
/// (`dockerd`, containerd, runc and the `docker` CLI).
pub const ENGINE: Recipe = Recipe {
    name: "backshift-engine",
    extra: &["docker.io"],
};

impl Recipe {
    /// Every package beyond `minbase`.
    pub fn packages(&self) -> Vec<&'static str> {
        PACKAGES.iter().chain(self.extra).copied().collect()
    }

    /// The tag for this recipe, e.g. `backshift-default:bookworm-3f2a9c1d`:
    /// a changed recipe is a new tag.
    pub fn tag(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!(
            "v{RECIPE_VERSION}\n{SUITE}\n{}\n{}\n{SANDBOX_USER}:{SANDBOX_UID}",
            self.packages().join(","),
            CHANGES.join("\n")
        ));
        let hash = hex::encode(h.finalize());
        format!("{}:{SUITE}-{}", self.name, &hash[..8])
    }
}

/// The tag of the default image for the current recipe.
pub fn default_image_tag() -> String {
    DEFAULT.tag()
}

/// The tag of the engine image for the current recipe.
pub fn engine_image_tag() -> String {
    ENGINE.tag()
}

/// The Debian mirror this host's apt uses, read from its sources (classic
/// `sources.list` lines or deb822 `.sources` files), so we never hard-code
/// a registry address.
pub fn host_debian_mirror() -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find_map(|text| mirror_from_sources(&text))
}

/// The first Debian (not security) archive URI in apt sources text.
pub fn mirror_from_sources(text: &str) -> Option<String> {
    let candidates = text.lines().flat_map(|line| {
        let line = line.trim();
        let uris: Vec<&str> = if let Some(rest) = line.strip_prefix("URIs:") {
            rest.split_whitespace().collect()
        } else if let Some(rest) = line.strip_prefix("deb ") {
            rest.split_whitespace()
                .filter(|w| !w.starts_with('['))
                .take(1)
                .collect()
        } else {
            Vec::new()
        };
        uris.into_iter().map(str::to_owned).collect::<Vec<_>>()
    });
    candidates
        .filter(|u| u.starts_with("http") && u.trim_end_matches('/').ends_with("/debian"))
        .find(|u| !u.contains("security"))
}

/// How to build the image.
#[derive(Debug, Clone)]
pub struct BootstrapOptions {
    /// What goes into it.
    pub recipe: Recipe,
    /// Image tag to create (usually the recipe's).
    pub tag: String,
    /// Debian mirror; the host's apt mirror when `None`.
    pub mirror: Option<String>,
    /// A scratch directory for the root filesystem (removed afterwards).
    pub work_dir: PathBuf,
}

/// Builds the default image, reporting progress line by line.
pub async fn bootstrap(
    driver: &DockerDriver,
    options: &BootstrapOptions,
    progress: &mut (dyn FnMut(String) + Send),
) -> Result<()> {
    let mirror = options.mirror.clone().or_else(host_debian_mirror).ok_or_else(|| {
        fail("no Debian mirror found in /etc/apt/sources.list*; pass --mirror URL or set image.mirror in the config")
    })?;
    if which("debootstrap").is_none() {
        return Err(fail(
            "debootstrap is not installed; install it with `apt-get install debootstrap` (as root)",
        ));
    }
    let rootfs = options
        .work_dir
        .join(format!("rootfs-{}", std::process::id()));
    if rootfs.exists() {
        tokio::fs::remove_dir_all(&rootfs).await?;
    }
    tokio::fs::create_dir_all(&rootfs).await?;
    let result = build(driver, options, &mirror, &rootfs, progress).await;
    progress(format!(
        "removing scratch root filesystem {}",
        rootfs.display()
    ));
    let _ = tokio::fs::remove_dir_all(&rootfs).await;
    result
}

async fn build(
    driver: &DockerDriver,
    options: &BootstrapOptions,
    mirror: &str,
    rootfs: &Path,
    progress: &mut (dyn FnMut(String) + Send),
) -> Result<()> {
    progress(format!(
        "debootstrap {SUITE} with {} from {mirror} (a minute or two)",
        options.recipe.packages().join(", ")
    ));
    let include = format!("--include={}", options.recipe.packages().join(","));
    run_streamed(
        Command::new("debootstrap")
            .args(["--variant=minbase", &include, SUITE])
            .arg(rootfs)
            .arg(mirror),
        progress,
    )
    .await?;

    progress(format!(
        "adding sandbox user {SANDBOX_USER} ({SANDBOX_UID}:{SANDBOX_UID})"
    ));
    let uid = SANDBOX_UID.to_string();
    run_streamed(
        Command::new("chroot").arg(rootfs).args([
            "useradd",
            "--create-home",
            "--uid",
            &uid,
            "--user-group",
            "--shell",
            "/bin/bash",
            SANDBOX_USER,
        ]),
        progress,
    )
    .await?;
    let workspace = rootfs.join("workspace");
    tokio::fs::create_dir_all(&workspace).await?;
    run_streamed(
        Command::new("chown")
            .arg(format!("{uid}:{uid}"))
            .arg(&workspace),
        progress,
    )
    .await?;
    for junk in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let dir = rootfs.join(junk);
        if dir.exists() {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            tokio::fs::create_dir_all(&dir).await?;
        }
    }

    progress(format!("importing root filesystem as {}", options.tag));
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["--numeric-owner", "-cf", "-", "."])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = tar
        .stdout
        .take()
        .ok_or_else(|| fail("tar produced no output stream"))?;
    let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(stdout));
    let (repo, tag) = options
        .tag
        .rsplit_once(':')
        .unwrap_or((&options.tag, "latest"));
    let import = CreateImageOptions {
        from_src: Some("-".into()),
        repo: Some(repo.into()),
        tag: Some(tag.into()),
        changes: CHANGES.iter().map(|c| c.to_string()).collect(),
        ..Default::default()
    };
    let mut stream = driver.client().create_image(Some(import), Some(body), None);
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| fail(&format!("docker import failed: {e}")))?;
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            return Err(fail(&format!("docker import failed: {err}")));
        }
        if let Some(status) = info.status {
            progress(format!("import: {}", status.trim()));
        }
    }
    let status = tar.wait().await?;
    if !status.success() {
        return Err(fail(&format!(
            "tar of the root filesystem failed ({status})"
        )));
    }
    if !driver.image_exists(&options.tag).await? {
        return Err(fail("docker import finished but the image is not there"));
    }
    progress(format!("image {} is ready", options.tag));
    Ok(())
}

/// A registry image reference split into what the pull API takes: the
/// repository and its tag (`latest` when none is given) or digest.
pub fn split_reference(reference: &str) -> (String, String) {
    if let Some((name, digest)) = reference.split_once('@') {
        return (name.to_owned(), digest.to_owned());
    }
    // A colon after the last slash separates the tag; one before it is a
    // registry port (`127.0.0.1:5000/team/image`).
    let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last_slash..].rfind(':') {
        Some(i) => {
            let at = last_slash + i;
            (reference[..at].to_owned(), reference[at + 1..].to_owned())
        }
        None => (reference.to_owned(), "latest".to_owned()),
    }
}

/// Pulls `reference` from its registry, reporting progress: one line per
/// layer whenever its status changes (not every byte count), plus the
/// registry's own status lines.
pub async fn pull(
    driver: &DockerDriver,
    reference: &str,
    progress: &mut (dyn FnMut(String) + Send),
) -> Result<()> {
    let (name, tag) = split_reference(reference);
    if name.is_empty() || tag.is_empty() {
        return Err(SandboxError::Backend {
            op: "image pull",
            message: format!("{reference:?} is not an image reference (NAME[:TAG] or NAME@DIGEST)"),
        });
    }
    progress(format!("pulling {reference}"));
    let options = CreateImageOptions {
        from_image: Some(name),
        tag: Some(tag),
        ..Default::default()
    };
    let mut stream = driver.client().create_image(Some(options), None, None);
    let mut layers: std::collections::HashMap<String, String> = Default::default();
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| SandboxError::Backend {
            op: "image pull",
            message: format!("cannot pull {reference}: {}", pull_error(e)),
        })?;
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            return Err(SandboxError::Backend {
                op: "image pull",
                message: format!("cannot pull {reference}: {err}"),
            });
        }
        let Some(status) = info.status else { continue };
        match info.id {
            Some(layer) if !layer.is_empty() && layer != tag_of(reference) => {
                if layers.get(&layer) != Some(&status) {
                    progress(format!("layer {layer}: {status}"));
                    layers.insert(layer, status);
                }
            }
            _ => progress(status),
        }
    }
    if !driver.image_exists(reference).await? {
        return Err(SandboxError::Backend {
            op: "image pull",
            message: format!("the pull of {reference} finished but the image is not there"),
        });
    }
    progress(format!("image {reference} is ready"));
    Ok(())
}

fn tag_of(reference: &str) -> String {
    split_reference(reference).1
}

fn pull_error(e: bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message,
        other => other.to_string(),
    }
}

async fn run_streamed(cmd: &mut Command, progress: &mut (dyn FnMut(String) + Send)) -> Result<()> {
    let program = format!("{:?}", cmd.as_std().get_program());
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(&format!("cannot start {program}: {e}")))?;
    let stdout = child.stdout.take().ok_or_else(|| fail("no stdout"))?;
    let stderr = child.stderr.take().ok_or_else(|| fail("no stderr"))?;
    let mut out = BufReader::new(stdout).lines();
    let mut err = BufReader::new(stderr).lines();
    let mut tail: Vec<String> = Vec::new();
    let (mut out_done, mut err_done) = (false, false);
    while !(out_done && err_done) {
        tokio::select! {
            line = out.next_line(), if !out_done => match line? {
                Some(l) => progress(l),
                None => out_done = true,
            },
            line = err.next_line(), if !err_done => match line? {
                Some(l) => {
                    progress(l.clone());
                    tail.push(l);
                    if tail.len() > 20 { tail.remove(0); }
                }
                None => err_done = true,
            },
        }
    }
    let status = child.wait().await?;
    if !status.success() {
        return Err(fail(&format!(
            "{program} failed ({status}): {}",
            tail.join("\n")
        )));
    }
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn fail(message: &str) -> SandboxError {
    SandboxError::Backend {
        op: "image bootstrap",
        message: message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_are_read_from_both_source_formats() {
        let deb822 = "Types: deb\nURIs: http://mirror.example.invalid/debian\nSuites: bookworm\n\n\
                      Types: deb\nURIs: http://mirror.example.invalid/debian-security\n";
        assert_eq!(
            mirror_from_sources(deb822).as_deref(),
            Some("http://mirror.example.invalid/debian")
        );
        let classic =
            "# comment\ndeb [arch=amd64] http://m.example.invalid/debian/ bookworm main\n";
        assert_eq!(
            mirror_from_sources(classic).as_deref(),
            Some("http://m.example.invalid/debian/")
        );
        assert_eq!(
            mirror_from_sources("deb http://x.invalid/ubuntu jammy main"),
            None
        );
    }

    #[test]
    fn references_split_into_repository_and_tag() {
        let cases = [
            ("debian", ("debian", "latest")),
            ("debian:bookworm", ("debian", "bookworm")),
            (
                "127.0.0.1:5000/team/img",
                ("127.0.0.1:5000/team/img", "latest"),
            ),
            (
                "127.0.0.1:5000/team/img:v2",
                ("127.0.0.1:5000/team/img", "v2"),
            ),
            (
                "reg.invalid/img@sha256:abc",
                ("reg.invalid/img", "sha256:abc"),
            ),
        ];
        for (reference, (name, tag)) in cases {
            assert_eq!(
                split_reference(reference),
                (name.to_owned(), tag.to_owned()),
                "{reference}"
            );
        }
    }

    #[test]
    fn the_tag_is_stable_and_names_the_suite() {
        assert_eq!(default_image_tag(), default_image_tag());
        assert!(default_image_tag().starts_with("backshift-default:bookworm-"));
    }
}
