//! Checkpoints: at the end of every agent turn the sandbox's working tree
//! is committed (with a private index, leaving the agent's branch and index
//! alone) onto a chain under `refs/backshift/checkpoint` in the sandbox,
//! bundled incrementally, and imported into the project's git store as
//! `refs/backshift/checkpoints/<attempt>`; then the checkpoint row (event
//! seq, turn, conversation length, commit) and the new conversation
//! messages are written in one transaction. A recovery restores the newest
//! row's commit and conversation.

use crate::serve::App;
use async_trait::async_trait;
use backshift_agent::Journal;
use backshift_protocol::{EventKind, now_ms};
use backshift_sandbox::tarball::first_file;
use backshift_sandbox::{ExecSpec, SandboxDriver, SandboxId, labels};
use backshift_store::CheckpointRow;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Where checkpoints of `attempt` live in the project's git store.
pub fn store_ref(attempt: &str) -> String {
    format!("refs/backshift/checkpoints/{attempt}")
}

/// The chain's ref inside the sandbox.
pub const SANDBOX_REF: &str = "refs/backshift/checkpoint";

const BUNDLE: &str = "/tmp/backshift-checkpoint.bundle";

/// Commits the working tree onto the checkpoint chain and bundles what the
/// store does not have yet. The parent is the newest checkpoint the store
/// holds (`STORE_TIP`) when the sandbox has it, else the base: a chain the
/// sandbox advanced without the store knowing (a control plane killed
/// between the two) is not built on. Prints `NEW <sha>` or
/// `UNCHANGED <sha>`.
const SNAPSHOT_SCRIPT: &str = r#"set -e
export GIT_INDEX_FILE=/tmp/backshift-checkpoint.index
if [ -f .git/index ]; then cp .git/index "$GIT_INDEX_FILE"; else git read-tree HEAD; fi
git add -A
tree=$(git write-tree)
parent=$(git rev-parse -q --verify "$STORE_TIP^{commit}" || git rev-parse "$BASE^{commit}")
if [ "$(git rev-parse "$parent^{tree}")" = "$tree" ]; then echo "UNCHANGED $parent"; exit 0; fi
commit=$(printf 'backshift checkpoint %s\n' "$CKPT_N" | git commit-tree "$tree" -p "$parent")
git update-ref "$CKPT_REF" "$commit"
rm -f "$BUNDLE"
git bundle create --quiet "$BUNDLE" "$CKPT_REF" "^$parent"
echo "NEW $commit"
"#;

/// Whether sandbox `id` still exists and runs (a warm
/// sandbox an attempt claimed has no attempt label: the id decides).
pub async fn sandbox_alive(driver: &dyn SandboxDriver, id: &SandboxId) -> bool {
    match driver.list(&[(labels::MANAGED, "true")]).await {
        Ok(found) => found.iter().any(|s| &s.id == id && s.running),
        // The daemon not answering is not proof of loss.
        Err(_) => true,
    }
}

enum Snapshot {
    Taken { commit: String, changed: bool },
    Gone(String),
    Failed(String),
}

struct Progress {
    next_n: u32,
    /// Messages of the conversation as it is now that are in the store.
    saved: u32,
    /// The conversation's length at the last completed turn.
    at_turn_end: u32,
    /// The last completed turn.
    turn: u32,
    /// The newest checkpoint's commit in the store.
    tip: Option<String>,
    /// When the last checkpoint was taken.
    at: std::time::Instant,
    /// When the last filesystem snapshot was taken (or the journal began).
    snapshot_at: std::time::Instant,
    /// The newest snapshot's image.
    snapshot: Option<String>,
}

/// The built-in agent's journal for one attempt in one sandbox.
pub struct AttemptJournal {
    app: Arc<App>,
    attempt: String,
    project: String,
    base: String,
    workdir: String,
    driver: Arc<dyn SandboxDriver>,
    sandbox: SandboxId,
    progress: tokio::sync::Mutex<Progress>,
}

impl AttemptJournal {
    /// A journal continuing after `latest` (or from nothing), with the
    /// first `saved` messages of the conversation already stored.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        app: Arc<App>,
        attempt: &str,
        project: &str,
        base: &str,
        workdir: &str,
        driver: Arc<dyn SandboxDriver>,
        sandbox: SandboxId,
        latest: Option<&CheckpointRow>,
        saved: u32,
        snapshot: Option<String>,
    ) -> Self {
        AttemptJournal {
            app,
            attempt: attempt.to_owned(),
            project: project.to_owned(),
            base: base.to_owned(),
            workdir: workdir.to_owned(),
            driver,
            sandbox,
            progress: tokio::sync::Mutex::new(Progress {
                next_n: latest.map_or(1, |c| c.n + 1),
                saved,
                at_turn_end: latest.map_or(0, |c| c.messages),
                turn: latest.map_or(0, |c| c.turn),
                tip: latest.map(|c| c.commit_sha.clone()),
                at: std::time::Instant::now(),
                snapshot_at: std::time::Instant::now(),
                snapshot,
            }),
        }
    }

    async fn snapshot(&self, n: u32, tip: Option<&str>) -> Snapshot {
        let spec = ExecSpec {
            argv: vec!["bash".into(), "-c".into(), SNAPSHOT_SCRIPT.into()],
            workdir: Some(self.workdir.clone()),
            env: vec![
                ("BASE".into(), self.base.clone()),
                // An impossible name when the store has none yet.
                (
                    "STORE_TIP".into(),
                    tip.unwrap_or("refs/backshift/none").to_owned(),
                ),
                ("CKPT_REF".into(), SANDBOX_REF.into()),
                ("CKPT_N".into(), n.to_string()),
                ("BUNDLE".into(), BUNDLE.into()),
                (
                    "GIT_AUTHOR_NAME".into(),
                    self.app.config.git.author_name.clone(),
                ),
                (
                    "GIT_AUTHOR_EMAIL".into(),
                    self.app.config.git.author_email.clone(),
                ),
                (
                    "GIT_COMMITTER_NAME".into(),
                    self.app.config.git.author_name.clone(),
                ),
                (
                    "GIT_COMMITTER_EMAIL".into(),
                    self.app.config.git.author_email.clone(),
                ),
            ],
            ..Default::default()
        };
        let out = match self.driver.exec_collect(&self.sandbox, &spec).await {
            Ok(o) if o.exit_code == 0 => o,
            other => {
                let why = match other {
                    Ok(o) => format!(
                        "git exited {}: {}",
                        o.exit_code,
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                    Err(e) => e.to_string(),
                };
                return if sandbox_alive(self.driver.as_ref(), &self.sandbox).await {
                    Snapshot::Failed(why)
                } else {
                    Snapshot::Gone(format!("the sandbox stopped ({why})"))
                };
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut words = stdout.split_whitespace();
        let (kind, commit) = (words.next(), words.next().map(str::to_owned));
        let Some(commit) = commit else {
            return Snapshot::Failed(format!("unexpected answer {stdout:?}"));
        };
        if kind != Some("NEW") {
            return Snapshot::Taken {
                commit,
                changed: false,
            };
        }
        match self.import().await {
            Ok(imported) if imported == commit => Snapshot::Taken {
                commit,
                changed: true,
            },
            Ok(other) => {
                Snapshot::Failed(format!("the store holds {other} after importing {commit}"))
            }
            Err(why) => Snapshot::Failed(why),
        }
    }

    async fn import(&self) -> Result<String, String> {
        let tar = self
            .driver
            .copy_out(&self.sandbox, BUNDLE)
            .await
            .map_err(|e| format!("cannot copy the bundle out: {e}"))?;
        let bundle = first_file(&tar).map_err(|e| format!("unreadable bundle archive: {e}"))?;
        let file = tempfile::NamedTempFile::new_in(self.app.data_dir.join("tmp"))
            .map_err(|e| format!("scratch file: {e}"))?;
        tokio::fs::write(file.path(), &bundle)
            .await
            .map_err(|e| format!("scratch file: {e}"))?;
        self.app
            .git
            .import_bundle_ref(
                &self.project,
                file.path(),
                SANDBOX_REF,
                &store_ref(&self.attempt),
            )
            .await
            .map_err(|e| format!("cannot import into the git store: {e}"))
    }
}

#[async_trait]
impl Journal for AttemptJournal {
    async fn turn_ended(&self, turn: u32, messages: &[Value]) -> Result<(), String> {
        self.checkpoint(Some((turn, messages))).await
    }

    async fn progressed(&self, messages: &[Value]) -> Result<(), String> {
        let mut progress = self.progress.lock().await;
        let from = (progress.saved as usize).min(messages.len());
        let bodies: Vec<String> = messages[from..].iter().map(Value::to_string).collect();
        match self
            .app
            .store
            .save_messages(&self.attempt, from as u32, &bodies, messages.len() as u32)
            .await
        {
            Ok(()) => progress.saved = messages.len() as u32,
            // Not the sandbox's fault: the turn goes on; a restart now
            // would take it again from the last checkpoint.
            Err(e) => {
                tracing::error!(attempt = %self.attempt, "cannot store the conversation: {e}")
            }
        }
        Ok(())
    }
}

impl AttemptJournal {
    /// A checkpoint in the middle of a long turn (a command running for
    /// minutes): the tree as it is now, with the conversation as of the
    /// last completed turn. Skipped when the last checkpoint is younger
    /// than `every`.
    pub async fn tick(&self, every: std::time::Duration) -> Result<(), String> {
        if self.progress.lock().await.at.elapsed() < every {
            return Ok(());
        }
        self.checkpoint(None).await
    }

    /// Takes a checkpoint: after `turn` with the whole conversation
    /// `messages`, or (`None`) mid-turn with the conversation stored so
    /// far.
    async fn checkpoint(&self, turn_end: Option<(u32, &[Value])>) -> Result<(), String> {
        let mut progress = self.progress.lock().await;
        let n = progress.next_n;
        let (turn, messages): (u32, &[Value]) = match turn_end {
            Some((turn, messages)) => (turn, messages),
            None => (progress.turn, &[]),
        };
        let mid_turn = turn_end.is_none();
        let tip = progress.tip.clone();
        let (commit, changed) = match self.snapshot(n, tip.as_deref()).await {
            Snapshot::Taken { commit, changed } => (commit, changed),
            Snapshot::Gone(why) => return Err(why),
            Snapshot::Failed(why) => {
                // Not fatal: the previous checkpoint still holds.
                let _ = self
                    .app
                    .hub
                    .emit(
                        &self.attempt,
                        EventKind::Progress {
                            message: format!("checkpoint after turn {turn} not taken: {why}"),
                        },
                    )
                    .await;
                return Ok(());
            }
        };
        // The checkpoint covers every event of the turn: stored first.
        self.app.hub.flush().await;
        let seq = self.app.store.last_seq(&self.attempt).await.unwrap_or(0);
        let from = (progress.saved as usize).min(messages.len());
        let bodies: Vec<String> = messages[from..].iter().map(Value::to_string).collect();
        let total = if mid_turn {
            progress.at_turn_end
        } else {
            messages.len() as u32
        };
        let row = CheckpointRow {
            attempt_id: self.attempt.clone(),
            n,
            seq,
            turn,
            messages: total,
            commit_sha: commit.clone(),
            created_at: now_ms(),
        };
        if let Err(e) = self
            .app
            .store
            .record_checkpoint(&row, from as u32, &bodies, !mid_turn)
            .await
        {
            tracing::error!(attempt = %self.attempt, "cannot record checkpoint {n}: {e}");
            return Ok(());
        }
        progress.next_n = n + 1;
        progress.tip = Some(commit.clone());
        if !mid_turn {
            progress.saved = total;
        }
        progress.at_turn_end = total;
        progress.turn = turn;
        progress.at = std::time::Instant::now();
        let _ = self
            .app
            .hub
            .emit(
                &self.attempt,
                EventKind::Checkpoint {
                    n,
                    turn,
                    commit,
                    changed,
                },
            )
            .await;
        self.maybe_snapshot(&mut progress, n).await;
        Ok(())
    }

    /// After checkpoint `n`: saves the sandbox's filesystem as an image
    /// when snapshots are on and the last one is old enough, and removes
    /// the previous one. A failure is reported, never fatal.
    async fn maybe_snapshot(&self, progress: &mut Progress, n: u32) {
        let config = &self.app.config.sandbox;
        let every = std::time::Duration::from_secs(config.snapshot_every_secs);
        if !config.snapshots || progress.snapshot_at.elapsed() < every {
            return;
        }
        let image = snapshot_image(&self.attempt, n);
        let labels = BTreeMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (labels::INSTANCE.to_owned(), self.app.instance.clone()),
            (labels::ATTEMPT.to_owned(), self.attempt.clone()),
        ]);
        let started = std::time::Instant::now();
        let result = self.driver.snapshot(&self.sandbox, &image, &labels).await;
        progress.snapshot_at = std::time::Instant::now();
        let event = match result {
            Ok(false) => return,
            Ok(true) => {
                if let Err(e) = self
                    .app
                    .store
                    .set_snapshot(&self.attempt, Some(&image))
                    .await
                {
                    tracing::error!(attempt = %self.attempt, "cannot record snapshot {image}: {e}");
                    let _ = self.driver.remove_snapshot(&image).await;
                    return;
                }
                if let Some(old) = progress.snapshot.replace(image.clone())
                    && old != image
                    && let Err(e) = self.driver.remove_snapshot(&old).await
                {
                    tracing::warn!(attempt = %self.attempt, "cannot remove snapshot {old}: {e}");
                }
                EventKind::Snapshot {
                    checkpoint: n,
                    image,
                    duration_ms: started.elapsed().as_millis() as u64,
                }
            }
            Err(e) => EventKind::Progress {
                message: format!("filesystem snapshot after checkpoint {n} not taken: {e}"),
            },
        };
        let _ = self.app.hub.emit(&self.attempt, event).await;
    }
}

/// The image name of `attempt`'s snapshot taken after checkpoint `n`.
pub fn snapshot_image(attempt: &str, n: u32) -> String {
    format!("backshift-snapshot:{attempt}-{n}")
}
