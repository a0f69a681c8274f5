//! The control plane's own git store: one bare repository per project
//! under `<data>/git/<project>.git`.
//!
//! Repositories enter on the host (a sandbox cannot reach the user's path
//! or the host's loopback): upstream is fetched into the store, a checkout
//! is exported for the sandbox, and the attempt's branch comes back as a
//! bundle. Clients fetch branches from the store over smart HTTP
//! ([`http`]), never from the data directory.
//!
//! Architecture invariant: all git work runs the `git` program with an
//! explicit repository (`-C`/`--git-dir`), no terminal prompts and no
//! hooks, and every failure carries git's own message.

pub mod forge;
pub mod http;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::process::Command;

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// git ran and failed.
    #[error("git {args} failed: {stderr}")]
    Failed {
        /// The git arguments.
        args: String,
        /// git's stderr (trimmed).
        stderr: String,
    },
    /// git could not be started.
    #[error("cannot run git (is it installed?): {0}")]
    Spawn(std::io::Error),
    /// Local I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, GitError>;

/// Change summary between two commits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiffStat {
    /// Files changed.
    pub files_changed: u64,
    /// Lines added.
    pub insertions: u64,
    /// Lines removed.
    pub deletions: u64,
    /// `git diff --stat` text.
    pub stat: String,
}

/// The store of bare repositories.
#[derive(Debug, Clone)]
pub struct GitStore {
    root: PathBuf,
}

impl GitStore {
    /// A store rooted at `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        GitStore { root: root.into() }
    }

    /// Path of a project's bare repository.
    pub fn repo_path(&self, project: &str) -> PathBuf {
        self.root.join(format!("{project}.git"))
    }

    /// Creates the project's bare repository if it does not exist. The
    /// repository is made aside and renamed into place, so a process
    /// killed half-way (or a concurrent creation) never leaves a broken
    /// one where the store looks.
    pub async fn ensure_repo(&self, project: &str) -> Result<PathBuf> {
        let path = self.repo_path(project);
        if path.join("HEAD").exists() && path.join("config").exists() {
            return Ok(path);
        }
        let complete = |p: &Path| p.join("HEAD").exists() && p.join("config").exists();
        tokio::fs::create_dir_all(&self.root).await?;
        if path.exists() {
            // A concurrent creation may have renamed its repository into
            // place since the first look: complete now means done.
            if complete(&path) {
                return Ok(path);
            }
            // Left half-made by a killed creation of an older version
            // (creations are atomic now). Another process may be removing
            // it too.
            match tokio::fs::remove_dir_all(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        let scratch = self.root.join(format!(
            ".new-{project}-{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        git(None, &["init", "--quiet", "--bare"], Some(&scratch)).await?;
        if tokio::fs::rename(&scratch, &path).await.is_err() {
            // Someone else made it first.
            let _ = tokio::fs::remove_dir_all(&scratch).await;
            if !complete(&path) {
                return Err(GitError::Failed {
                    args: "init --bare".into(),
                    stderr: format!("{} could not be created", path.display()),
                });
            }
        }
        Ok(path)
    }

    /// Fetches `base_ref` (or the source's HEAD) from `source` (a path or
    /// URL) into the project's repository, pins it at `pin_ref`, and
    /// returns its commit.
    pub async fn fetch_source(
        &self,
        project: &str,
        source: &str,
        base_ref: Option<&str>,
        pin_ref: &str,
    ) -> Result<String> {
        self.fetch_source_with(project, source, base_ref, pin_ref, None)
            .await
    }

    /// [`Self::fetch_source`] with a forge's token (see
    /// [`git_with_token`]).
    pub async fn fetch_source_with(
        &self,
        project: &str,
        source: &str,
        base_ref: Option<&str>,
        pin_ref: &str,
        token: Option<&str>,
    ) -> Result<String> {
        let repo = self.ensure_repo(project).await?;
        clear_stale_lock(&repo, pin_ref).await;
        let want = base_ref.unwrap_or("HEAD");
        git_with_token(
            &repo,
            &[
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-write-fetch-head",
                "--",
                source,
                &format!("+{want}:{pin_ref}"),
            ],
            token,
        )
        .await?;
        rev_parse(&repo, &format!("{pin_ref}^{{commit}}")).await
    }

    /// Writes a working tree of `commit` (pinned at `pin_ref`) into `dest`
    /// with its own `.git` holding the history, checked out on a new
    /// branch `branch`, and no remote.
    pub async fn export_checkout(
        &self,
        project: &str,
        pin_ref: &str,
        commit: &str,
        branch: &str,
        dest: &Path,
    ) -> Result<()> {
        let repo = self.repo_path(project);
        git(None, &["init", "--quiet"], Some(dest)).await?;
        let url = format!("file://{}", repo.display());
        git(
            Some(dest),
            &["fetch", "--quiet", "--no-tags", &url, pin_ref],
            None,
        )
        .await?;
        git(
            Some(dest),
            &["checkout", "--quiet", "-b", branch, commit],
            None,
        )
        .await?;
        Ok(())
    }

    /// Imports `branch` from a bundle file into the project's repository
    /// (replacing an earlier import of the same branch) and returns its tip.
    pub async fn import_bundle(
        &self,
        project: &str,
        bundle: &Path,
        branch: &str,
    ) -> Result<String> {
        let r = format!("refs/heads/{branch}");
        self.import_bundle_ref(project, bundle, &r, &r).await
    }

    /// Imports ref `from` of a bundle file as ref `to` (forced) and returns
    /// its commit.
    pub async fn import_bundle_ref(
        &self,
        project: &str,
        bundle: &Path,
        from: &str,
        to: &str,
    ) -> Result<String> {
        let repo = self.repo_path(project);
        clear_stale_lock(&repo, to).await;
        let bundle = bundle.to_string_lossy();
        let refspec = format!("+{from}:{to}");
        git(
            Some(&repo),
            &[
                "-c",
                "fetch.fsckObjects=true",
                "fetch",
                "--quiet",
                "--no-write-fetch-head",
                &bundle,
                &refspec,
            ],
            None,
        )
        .await?;
        rev_parse(&repo, &format!("{to}^{{commit}}")).await
    }

    /// Makes the working tree of checkout `dest` (from [`Self::export_checkout`])
    /// the tree of `commit`, fetched from ref `from` of the store, leaving
    /// the branch and index at the base: the checkpoint's changes are
    /// uncommitted work again. The commit is kept as
    /// `refs/backshift/checkpoint` so later checkpoints chain onto it.
    pub async fn restore_tree(
        &self,
        project: &str,
        from: &str,
        commit: &str,
        dest: &Path,
    ) -> Result<()> {
        let repo = self.repo_path(project);
        let url = format!("file://{}", repo.display());
        git(
            Some(dest),
            &["fetch", "--quiet", "--no-tags", &url, from],
            None,
        )
        .await?;
        git(Some(dest), &["read-tree", "-u", "--reset", commit], None).await?;
        git(Some(dest), &["reset", "--quiet"], None).await?;
        git(
            Some(dest),
            &["update-ref", "refs/backshift/checkpoint", commit],
            None,
        )
        .await?;
        Ok(())
    }

    /// Pushes `commit` of the project's repository to `url` as branch
    /// `branch`, never forced: a remote branch holding other commits
    /// refuses it (and an identical one is a no-op). `token`, when given,
    /// goes as HTTP Basic credentials (see [`git_with_token`]).
    pub async fn push_branch(
        &self,
        project: &str,
        url: &str,
        commit: &str,
        branch: &str,
        token: Option<&str>,
    ) -> Result<()> {
        let repo = self.repo_path(project);
        let refspec = format!("{commit}:refs/heads/{branch}");
        git_with_token(&repo, &["push", "--quiet", "--", url, &refspec], token).await?;
        Ok(())
    }

    /// The commit the full ref `name` points at, if it exists.
    pub async fn ref_commit(&self, project: &str, name: &str) -> Result<Option<String>> {
        let repo = self.repo_path(project);
        match rev_parse(&repo, &format!("{name}^{{commit}}")).await {
            Ok(c) => Ok(Some(c)),
            Err(GitError::Failed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Points `branch` at `commit`.
    pub async fn set_branch(&self, project: &str, branch: &str, commit: &str) -> Result<()> {
        self.set_ref(project, &format!("refs/heads/{branch}"), commit)
            .await
    }

    /// Points the full ref `name` at `commit`.
    pub async fn set_ref(&self, project: &str, name: &str, commit: &str) -> Result<()> {
        let repo = self.repo_path(project);
        clear_stale_lock(&repo, name).await;
        git(Some(&repo), &["update-ref", name, commit], None).await?;
        Ok(())
    }

    /// The text of `path` at `commit`, or `None` when there is no such
    /// file (or it is not text).
    pub async fn read_file(
        &self,
        project: &str,
        commit: &str,
        path: &str,
    ) -> Result<Option<String>> {
        let repo = self.repo_path(project);
        let spec = format!("{commit}:{path}");
        let kind = git(Some(&repo), &["cat-file", "-t", &spec], None).await;
        if !matches!(kind.as_deref().map(str::trim), Ok("blob")) {
            return Ok(None);
        }
        let out = base_command(Some(&repo))
            .args(["cat-file", "blob", &spec])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(GitError::Spawn)?;
        Ok(String::from_utf8(out.stdout).ok())
    }

    /// The id of the tree (or blob) at `path` in `commit` (`""`: the root):
    /// it changes exactly when its content does.
    pub async fn object_id(&self, project: &str, commit: &str, path: &str) -> Result<String> {
        let repo = self.repo_path(project);
        rev_parse(&repo, &format!("{commit}:{path}")).await
    }

    /// A tar of the directory `path` (`""`: the root) at `commit`.
    pub async fn archive(&self, project: &str, commit: &str, path: &str) -> Result<Vec<u8>> {
        let repo = self.repo_path(project);
        let out = base_command(Some(&repo))
            .args(["archive", "--format=tar", &format!("{commit}:{path}")])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(GitError::Spawn)?;
        if !out.status.success() {
            return Err(GitError::Failed {
                args: format!("archive {commit}:{path}"),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(out.stdout)
    }

    /// Every file at `commit` whose name is one of `names`, with its blob
    /// id, in path order.
    pub async fn files_named(
        &self,
        project: &str,
        commit: &str,
        names: &[&str],
    ) -> Result<Vec<(String, String)>> {
        let repo = self.repo_path(project);
        let listing = git(Some(&repo), &["ls-tree", "-r", "--full-tree", commit], None).await?;
        let mut found: Vec<(String, String)> = listing
            .lines()
            .filter_map(|l| {
                let (meta, path) = l.split_once('\t')?;
                let blob = meta.split_whitespace().nth(2)?;
                let name = path.rsplit('/').next()?;
                names
                    .contains(&name)
                    .then(|| (path.to_owned(), blob.to_owned()))
            })
            .collect();
        found.sort();
        Ok(found)
    }

    /// How many files `commit`'s tree holds (every blob and link, in
    /// every directory).
    pub async fn file_count(&self, project: &str, commit: &str) -> Result<usize> {
        let repo = self.repo_path(project);
        let listing = git(
            Some(&repo),
            &["ls-tree", "-r", "-z", "--name-only", "--full-tree", commit],
            None,
        )
        .await?;
        Ok(listing.bytes().filter(|b| *b == 0).count())
    }

    /// Whether `ancestor` is `commit` or one of its ancestors.
    pub async fn is_ancestor(&self, project: &str, ancestor: &str, commit: &str) -> Result<bool> {
        let repo = self.repo_path(project);
        let args = ["merge-base", "--is-ancestor", ancestor, commit];
        let out = base_command(Some(&repo))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(GitError::Spawn)?;
        match out.status.code() {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(GitError::Failed {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            }),
        }
    }

    /// Writes a bundle of `pin_ref` (pointing at the commit wanted) without
    /// what `since` already has: what a checkout at `since` needs to move
    /// to it.
    pub async fn bundle_since(
        &self,
        project: &str,
        pin_ref: &str,
        since: &str,
        dest: &Path,
    ) -> Result<()> {
        let repo = self.repo_path(project);
        let since = format!("^{since}");
        git(
            Some(&repo),
            &[
                "bundle",
                "create",
                "--quiet",
                &dest.to_string_lossy(),
                pin_ref,
                &since,
            ],
            None,
        )
        .await?;
        Ok(())
    }

    /// The unified diff from `base` to `head`.
    pub async fn diff(&self, project: &str, base: &str, head: &str) -> Result<String> {
        let repo = self.repo_path(project);
        git(
            Some(&repo),
            &["diff", "--no-color", "--no-ext-diff", base, head],
            None,
        )
        .await
    }

    /// The change summary from `base` to `head`.
    pub async fn diff_stat(&self, project: &str, base: &str, head: &str) -> Result<DiffStat> {
        let repo = self.repo_path(project);
        let numstat = git(Some(&repo), &["diff", "--numstat", base, head], None).await?;
        let mut stat = DiffStat::default();
        for line in numstat.lines() {
            let mut parts = line.split('\t');
            let add = parts
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            let del = parts
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            stat.files_changed += 1;
            stat.insertions += add;
            stat.deletions += del;
        }
        stat.stat = git(
            Some(&repo),
            &["diff", "--stat", "--no-color", base, head],
            None,
        )
        .await?;
        Ok(stat)
    }
}

/// Checks that `path` is a git repository and, when given, that `base_ref`
/// names a commit in it. The error says which.
pub async fn validate_local_repo(
    path: &Path,
    base_ref: Option<&str>,
) -> std::result::Result<(), String> {
    if !path.exists() {
        return Err(format!("{} does not exist", path.display()));
    }
    if git(Some(path), &["rev-parse", "--git-dir"], None)
        .await
        .is_err()
    {
        return Err(format!("{} is not a git repository", path.display()));
    }
    let want = base_ref.unwrap_or("HEAD");
    if git(
        Some(path),
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{want}^{{commit}}"),
        ],
        None,
    )
    .await
    .is_err()
    {
        return Err(match base_ref {
            Some(r) => format!("{r} is not a branch, tag or commit in {}", path.display()),
            None => format!("{} has no commits yet", path.display()),
        });
    }
    Ok(())
}

/// Whether `s` looks like a git URL rather than a local path.
pub fn is_url(s: &str) -> bool {
    s.contains("://") || (s.contains('@') && s.contains(':') && !s.starts_with('/'))
}

/// Removes the lock file of `refname` left by a git process that was
/// killed while updating it. Only for refs that belong to one attempt,
/// whose single driver is the caller: any lock on them is stale.
async fn clear_stale_lock(repo: &Path, refname: &str) {
    let lock = repo.join(format!("{refname}.lock"));
    if tokio::fs::remove_file(&lock).await.is_ok() {
        tracing::warn!("removed a stale lock {}", lock.display());
    }
}

async fn rev_parse(repo: &Path, rev: &str) -> Result<String> {
    Ok(git(Some(repo), &["rev-parse", "--verify", rev], None)
        .await?
        .trim()
        .to_owned())
}

/// In checkout `dest` (from [`GitStore::export_checkout`]), puts `paths`
/// back as they are at `commit` (an ancestor of its HEAD): changed files
/// restored, added ones removed. Returns the paths under them that HEAD
/// had changed since `commit`.
pub async fn restore_paths(dest: &Path, commit: &str, paths: &[String]) -> Result<Vec<String>> {
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let with = |head: &[&str]| -> Vec<String> {
        head.iter()
            .map(|s| (*s).to_owned())
            .chain(["--".to_owned()])
            .chain(paths.iter().cloned())
            .collect()
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        git(Some(dest), &args, None).await
    };
    let changed = run(with(&["diff", "--name-only", commit, "HEAD"])).await?;
    let changed: Vec<String> = changed.lines().map(str::to_owned).collect();
    if changed.is_empty() {
        return Ok(changed);
    }
    run(with(&["rm", "-r", "-q", "--ignore-unmatch", "--cached"])).await?;
    for p in paths {
        let _ = tokio::fs::remove_dir_all(dest.join(p)).await;
        let _ = tokio::fs::remove_file(dest.join(p)).await;
    }
    let existing = run(with(&["ls-tree", "--name-only", commit])).await?;
    let existing: Vec<&str> = existing.lines().collect();
    if !existing.is_empty() {
        let mut args = vec!["checkout", commit, "--"];
        args.extend(existing);
        git(Some(dest), &args, None).await?;
    }
    Ok(changed)
}

/// Runs git in `repo` talking to a remote with `token`, when given, as
/// HTTP Basic credentials (`x-access-token:TOKEN`, which GitHub and Gitea
/// accept), in a header passed through git's environment: it appears in
/// no argument list, URL, config file or message.
pub async fn git_with_token(repo: &Path, args: &[&str], token: Option<&str>) -> Result<String> {
    use base64::Engine;
    let mut cmd = base_command(Some(repo));
    cmd.args(args);
    if let Some(token) = token {
        let basic =
            base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
        cmd.env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env(
                "GIT_CONFIG_VALUE_0",
                format!("Authorization: Basic {basic}"),
            );
    }
    output(cmd, args, token).await
}

/// Runs git in `cwd` (or with `--git-dir`), with an optional trailing path
/// argument, and returns stdout.
pub(crate) async fn git(
    cwd: Option<&Path>,
    args: &[&str],
    path_arg: Option<&Path>,
) -> Result<String> {
    let mut cmd = base_command(cwd);
    cmd.args(args);
    if let Some(p) = path_arg {
        cmd.arg(p);
    }
    output(cmd, args, None).await
}

/// Runs `cmd` (git with `args`) and returns its stdout, or its stderr as
/// the error, with `token` (if any) blanked out of it.
async fn output(mut cmd: Command, args: &[&str], token: Option<&str>) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(GitError::Spawn)?;
    if !out.status.success() {
        let mut said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            said = said.replace(token, "[token]");
        }
        return Err(GitError::Failed {
            args: args.join(" "),
            stderr: said,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn base_command(cwd: Option<&Path>) -> Command {
    let mut cmd = Command::new("git");
    if let Some(dir) = cwd {
        cmd.arg("-C").arg(dir);
    }
    cmd.args([
        "-c",
        "core.hooksPath=/dev/null",
        "-c",
        "advice.detachedHead=false",
        // No background gc or maintenance taking locks behind our back.
        "-c",
        "gc.auto=0",
        "-c",
        "maintenance.auto=false",
    ])
    .env("GIT_TERMINAL_PROMPT", "0")
    .env("GIT_ASKPASS", "/bin/false")
    .kill_on_drop(true);
    cmd
}

#[cfg(test)]
mod tests;
