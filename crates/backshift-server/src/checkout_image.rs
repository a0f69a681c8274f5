//! Checkout images: for a large repository, the checkout of a commit is
//! made once, from the host-side mirror (the git store), as an image layer
//! on top of the sandbox's image. Every sandbox of an attempt on that
//! commit starts from it with its files already there: no file is written
//! per attempt (Docker's overlay shares the layer), and the attempt's own
//! step is renaming the branch.
//!
//! A new commit's image is made from the newest image of the same project
//! and base image when there is one: a bundle of the commits in between
//! (from the mirror), fetched and checked out in a container of it, then
//! committed — a layer of what changed. Otherwise (the first time, or
//! after [`MAX_DEPTH`] such layers) from the base image: the tree exported
//! from the mirror, loaded as one layer on top of it (`docker load` of that
//! layer alone), or, on a setup image (which holds an older checkout),
//! copied into a container of it whose old checkout was cleared, then
//! committed. Images are
//! content-addressed (project, base image id, commit); the newest
//! [`KEEP`] per project and base image are kept.
//!
//! The checkout's `.git` compares files by size and whole-second mtime
//! only (`core.checkStat = minimal`, `core.trustCtime = false`): inode
//! numbers and ctimes change when a layer is committed, and git would
//! otherwise read every file again to find nothing changed.

use backshift_git::GitStore;
use backshift_protocol::now_ms;
use backshift_sandbox::docker::DockerDriver;
use backshift_sandbox::image::SANDBOX_UID;
use backshift_sandbox::tarball::{Owner, archive_dir};
use backshift_sandbox::{ExecSpec, ResourceLimits, SandboxDriver, SandboxId, SandboxSpec, labels};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The branch a checkout image's repository is on (an attempt renames it
/// to its own).
pub const BRANCH: &str = "backshift/prepared";
/// The role label of a container that makes a checkout image.
pub const ROLE: &str = "checkout";
/// Label keys of a checkout image.
const KIND: &str = "dev.backshift.kind";
const PROJECT: &str = "dev.backshift.project";
const BASE: &str = "dev.backshift.base-image";
const COMMIT: &str = "dev.backshift.commit";
const DEPTH: &str = "dev.backshift.depth";
const MADE_AT: &str = "dev.backshift.made-at";
/// Layers of changes stacked before the next image starts afresh from
/// the base image (overlay2 takes at most 128 layers in all, base image
/// included, and every layer costs a little at each container start).
pub const MAX_DEPTH: u32 = 50;
/// Checkout images kept per project and base image.
pub const KEEP: usize = 3;

/// Clears a checkout before another is copied in: tracked and untracked
/// files and `.git` go, ignored files (a setup's dependencies) stay. The
/// untracked go first, while the `.gitignore` files (tracked) still say
/// what is ignored.
pub const SCRUB_SCRIPT: &str = r#"set -e
cd /workspace 2>/dev/null || exit 0
if [ -d .git ]; then
  git clean -fdq
  git ls-files -z | xargs -0 rm -f --
fi
rm -rf .git
"#;

/// Moves a checkout image's repository to `$COMMIT` from the bundle at
/// `$BUNDLE` (when there is one).
const ADVANCE_SCRIPT: &str = r#"set -e
cd /workspace
if [ -s "$BUNDLE" ]; then
  git -c core.hooksPath=/dev/null fetch --quiet --no-tags "$BUNDLE" "$PIN"
fi
git -c core.hooksPath=/dev/null reset --quiet --hard "$COMMIT"
git clean -fdq
rm -f "$BUNDLE" .git/FETCH_HEAD
"#;

/// How a checkout image came to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Made {
    /// It existed already.
    Existing,
    /// From the newest one before it: a layer of what changed.
    Advanced {
        /// The commit that image had.
        from: String,
    },
    /// From the base image: the whole tree.
    Whole,
}

/// A checkout image, ready.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Its reference.
    pub image: String,
    /// How it came to be.
    pub made: Made,
}

/// What [`ensure`] needs.
pub struct Source<'a> {
    /// The git store.
    pub git: &'a GitStore,
    /// The project (its repository in the store).
    pub project: &'a str,
    /// A ref of the store pointing at `commit`.
    pub pin: &'a str,
    /// The commit to check out.
    pub commit: &'a str,
}

/// Label: the replica whose build container it is.
pub const REPLICA: &str = "dev.backshift.replica";

/// The checkout image of `source` on `base_image`, made when missing.
/// `limits` are those of the container that makes it; `owner` (instance
/// and replica) labels that container, so the stray sweep knows whose
/// it is.
pub async fn ensure(
    driver: &DockerDriver,
    source: &Source<'_>,
    base_image: &str,
    limits: ResourceLimits,
    owner: (&str, &str),
) -> Result<Prepared, String> {
    let base_id = driver
        .image_id(base_image)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("the image {base_image} is not on this Docker host"))?;
    let image = reference(source.project, &base_id, source.commit);
    if driver
        .image_exists(&image)
        .await
        .map_err(|e| e.to_string())?
    {
        return Ok(Prepared {
            image,
            made: Made::Existing,
        });
    }
    let mut made = driver
        .list_snapshots(&[
            (labels::MANAGED, "true"),
            (KIND, "checkout"),
            (PROJECT, source.project),
            (BASE, &base_id),
        ])
        .await
        .map_err(|e| e.to_string())?;
    made.sort_by_key(|(_, l)| {
        std::cmp::Reverse(l.get(MADE_AT).and_then(|t| t.parse::<i64>().ok()))
    });
    let newest = made.iter().find(|(_, l)| {
        l.get(DEPTH)
            .and_then(|d| d.parse::<u32>().ok())
            .is_some_and(|d| d < MAX_DEPTH)
    });
    let (from_image, depth, from_commit) = match newest {
        Some((image, l)) => (
            image.clone(),
            l.get(DEPTH)
                .and_then(|d| d.parse::<u32>().ok())
                .unwrap_or(0)
                + 1,
            l.get(COMMIT).cloned(),
        ),
        None => (base_image.to_owned(), 1, None),
    };
    let image_labels = BTreeMap::from([
        (labels::MANAGED.to_owned(), "true".to_owned()),
        (KIND.to_owned(), "checkout".to_owned()),
        (PROJECT.to_owned(), source.project.to_owned()),
        (BASE.to_owned(), base_id.clone()),
        (COMMIT.to_owned(), source.commit.to_owned()),
        (DEPTH.to_owned(), depth.to_string()),
        (MADE_AT.to_owned(), now_ms().to_string()),
    ]);
    // The whole tree onto an image without a checkout: one layer, loaded.
    if from_commit.is_none() && !has_checkout(driver, base_image).await {
        let tar = export_tar(source).await?;
        driver
            .add_layer(base_image, tar, &image, &image_labels)
            .await
            .map_err(|e| format!("cannot load the checkout as a layer: {e}"))?;
        prune(driver, source.project, &base_id).await;
        return Ok(Prepared {
            image,
            made: Made::Whole,
        });
    }
    let spec = SandboxSpec {
        image: from_image,
        name: format!("backshift-checkout-{:08x}", rand::random::<u32>()),
        labels: BTreeMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (labels::INSTANCE.to_owned(), owner.0.to_owned()),
            (REPLICA.to_owned(), owner.1.to_owned()),
            (labels::ROLE.to_owned(), ROLE.to_owned()),
        ]),
        limits,
        user: format!("{SANDBOX_UID}:{SANDBOX_UID}"),
        workdir: "/".into(),
        env: Vec::new(),
        mounts: Vec::new(),
        command: Some(vec!["sleep".into(), "infinity".into()]),
    };
    let id = driver.create(&spec).await.map_err(|e| e.to_string())?;
    let result = async {
        let made = match &from_commit {
            Some(from) => {
                advance(driver, &id, source, from).await?;
                Made::Advanced { from: from.clone() }
            }
            None => {
                whole(driver, &id, source).await?;
                Made::Whole
            }
        };
        driver
            .snapshot(&id, &image, &image_labels)
            .await
            .map_err(|e| format!("cannot save the checkout as an image: {e}"))?;
        Ok::<_, String>(made)
    }
    .await;
    let _ = driver.destroy(&id).await;
    let made = result?;
    // The oldest go (one a stopped sandbox still uses keeps its layers).
    prune(driver, source.project, &base_id).await;
    Ok(Prepared { image, made })
}

/// Removes all but the newest [`KEEP`] checkout images of the project on
/// that base image.
async fn prune(driver: &DockerDriver, project: &str, base_id: &str) {
    let Ok(mut made) = driver
        .list_snapshots(&[
            (labels::MANAGED, "true"),
            (KIND, "checkout"),
            (PROJECT, project),
            (BASE, base_id),
        ])
        .await
    else {
        return;
    };
    made.sort_by_key(|(_, l)| {
        std::cmp::Reverse(l.get(MADE_AT).and_then(|t| t.parse::<i64>().ok()))
    });
    for (old, _) in made.into_iter().skip(KEEP) {
        let _ = driver.remove_snapshot(&old).await;
    }
}

/// The image's reference: content-addressed.
pub fn reference(project: &str, base_id: &str, commit: &str) -> String {
    let hash = Sha256::digest(format!("{project}\n{base_id}\n{commit}").as_bytes());
    format!(
        "backshift-checkout:{}-{}",
        project.to_ascii_lowercase(),
        &hex::encode(hash)[..16]
    )
}

async fn run_script(
    driver: &DockerDriver,
    id: &SandboxId,
    what: &str,
    script: &str,
    env: Vec<(String, String)>,
) -> Result<(), String> {
    let spec = ExecSpec {
        argv: vec!["bash".into(), "-c".into(), script.into()],
        env,
        ..Default::default()
    };
    match driver.exec_collect(id, &spec).await {
        Ok(o) if o.exit_code == 0 => Ok(()),
        Ok(o) => Err(format!(
            "{what} failed ({}): {}",
            o.exit_code,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

/// Whether `image` holds a checkout already (a setup image: the sandbox
/// committed after its setup ran in the checkout).
async fn has_checkout(driver: &DockerDriver, image: &str) -> bool {
    driver
        .client()
        .inspect_image(image)
        .await
        .ok()
        .and_then(|i| i.config)
        .and_then(|c| c.labels)
        .is_some_and(|l| l.get(KIND).map(String::as_str) == Some("setup"))
}

/// The commit's checkout from the mirror, on branch [`BRANCH`], as a tar
/// of `workspace/` owned by the sandbox's user.
async fn export_tar(source: &Source<'_>) -> Result<Vec<u8>, String> {
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    let tree = scratch.path().join("workspace");
    source
        .git
        .export_checkout(source.project, source.pin, source.commit, BRANCH, &tree)
        .await
        .map_err(|e| format!("cannot export the checkout: {e}"))?;
    for (key, value) in [("core.checkStat", "minimal"), ("core.trustCtime", "false")] {
        let status = tokio::process::Command::new("git")
            .arg("-C")
            .arg(&tree)
            .args(["config", key, value])
            .status()
            .await
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("cannot set {key} in the checkout"));
        }
    }
    let _ = tokio::fs::remove_file(tree.join(".git/FETCH_HEAD")).await;
    tokio::task::spawn_blocking(move || {
        archive_dir(
            &tree,
            "workspace",
            Owner {
                uid: SANDBOX_UID,
                gid: SANDBOX_UID,
            },
        )
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("cannot archive the checkout: {e}"))
}

/// From an image with a checkout (a setup image's): it goes (its ignored
/// files stay), the whole tree from the mirror comes in.
async fn whole(driver: &DockerDriver, id: &SandboxId, source: &Source<'_>) -> Result<(), String> {
    run_script(
        driver,
        id,
        "clearing the image's checkout",
        SCRUB_SCRIPT,
        Vec::new(),
    )
    .await?;
    let tar = export_tar(source).await?;
    driver
        .copy_in(id, "/", tar.into())
        .await
        .map_err(|e| format!("cannot copy the checkout in: {e}"))
}

/// From an image of an earlier commit: the commits in between, then a
/// hard reset (what changed is written, nothing else).
async fn advance(
    driver: &DockerDriver,
    id: &SandboxId,
    source: &Source<'_>,
    from: &str,
) -> Result<(), String> {
    const BUNDLE: &str = "/tmp/backshift-checkout.bundle";
    // Going back (a task on an older commit): the objects are there.
    let behind = source
        .git
        .is_ancestor(source.project, source.commit, from)
        .await
        .map_err(|e| e.to_string())?;
    if !behind {
        let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
        let file = scratch.path().join("checkout.bundle");
        source
            .git
            .bundle_since(source.project, source.pin, from, &file)
            .await
            .map_err(|e| format!("cannot bundle the new commits: {e}"))?;
        let bytes = tokio::fs::read(&file).await.map_err(|e| e.to_string())?;
        let tar = backshift_sandbox::tarball::archive_file(
            "tmp/backshift-checkout.bundle",
            &bytes,
            0o600,
            Owner {
                uid: SANDBOX_UID,
                gid: SANDBOX_UID,
            },
        )
        .map_err(|e| e.to_string())?;
        driver
            .copy_in(id, "/", tar.into())
            .await
            .map_err(|e| format!("cannot copy the new commits in: {e}"))?;
    }
    run_script(
        driver,
        id,
        "moving the checkout to the new commit",
        ADVANCE_SCRIPT,
        vec![
            ("BUNDLE".into(), BUNDLE.into()),
            ("PIN".into(), source.pin.into()),
            ("COMMIT".into(), source.commit.into()),
        ],
    )
    .await
}
