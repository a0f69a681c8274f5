//! Row types and their decoding.

use crate::{Result, StoreError};
use backshift_core::{AttemptState, FailureReason, Limits};
use sqlx::Row;
use sqlx::any::AnyRow;

macro_rules! task_select {
    () => {
        "SELECT t.id, t.project_id, t.prompt, t.repo, t.base_ref, t.agent, t.limits, t.created_at, t.command, t.verify, t.winner, t.winner_by, t.delivery, t.origin, t.reported_at FROM tasks t"
    };
}
pub(crate) use task_select;

macro_rules! attempt_select {
    () => {
        "SELECT id, task_id, n, state, reason, detail, branch, base_commit, head_commit, summary, \
         sandbox_id, created_at, updated_at, started_at, owner, lease_until, \
         cancel_requested, held_ms, snapshot_image, prepared_sandbox, gateway_token_sha256, agent, pause_requested, resume_requested FROM attempts"
    };
}
pub(crate) use attempt_select;

/// A task to create.
#[derive(Debug, Clone)]
pub struct NewTask {
    /// Task id.
    pub id: String,
    /// Project (repository) id.
    pub project_id: String,
    /// What was asked.
    pub prompt: String,
    /// Repository as given.
    pub repo: String,
    /// Requested base ref.
    pub base_ref: Option<String>,
    /// Agent name.
    pub agent: String,
    /// The `command` agent's script.
    pub command: Option<String>,
    /// The verify command given with the task.
    pub verify: Option<String>,
    /// Effective limits.
    pub limits: Limits,
    /// Creation time, unix ms.
    pub created_at: i64,
    /// Where it came from, to report its outcome (JSON), when not the API.
    pub origin: Option<String>,
}

/// An attempt to create with its task.
#[derive(Debug, Clone)]
pub struct NewAttempt {
    /// Attempt id.
    pub id: String,
    /// Number, from 1.
    pub n: u32,
    /// Branch name.
    pub branch: String,
    /// Its own agent, when not the task's.
    pub agent: Option<String>,
}

/// A stored task.
#[derive(Debug, Clone)]
pub struct TaskRow {
    /// Task id.
    pub id: String,
    /// Project id.
    pub project_id: String,
    /// What was asked.
    pub prompt: String,
    /// Repository as given.
    pub repo: String,
    /// Requested base ref.
    pub base_ref: Option<String>,
    /// Agent name.
    pub agent: String,
    /// The `command` agent's script.
    pub command: Option<String>,
    /// The verify command given with the task.
    pub verify: Option<String>,
    /// Effective limits.
    pub limits: Limits,
    /// Creation time, unix ms.
    pub created_at: i64,
    /// The attempt chosen as the task's result.
    pub winner: Option<String>,
    /// Who chose it: `auto`, or a token's name.
    pub winner_by: Option<String>,
    /// Where the result was delivered (JSON), once it was tried.
    pub delivery: Option<String>,
    /// Where it came from (JSON), when not the API.
    pub origin: Option<String>,
    /// When its outcome was reported there, unix ms.
    pub reported_at: Option<i64>,
}

impl TaskRow {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self> {
        let limits: String = r.get(6);
        Ok(TaskRow {
            id: r.get(0),
            project_id: r.get(1),
            prompt: r.get(2),
            repo: r.get(3),
            base_ref: r.get(4),
            agent: r.get(5),
            limits: serde_json::from_str(&limits)
                .map_err(|e| StoreError::Corrupt(format!("task limits: {e}")))?,
            created_at: r.get(7),
            command: r.get(8),
            verify: r.get(9),
            winner: r.get(10),
            winner_by: r.get(11),
            delivery: r.get(12),
            origin: r.get(13),
            reported_at: r.get(14),
        })
    }
}

/// A stored attempt.
#[derive(Debug, Clone)]
pub struct AttemptRow {
    /// Attempt id.
    pub id: String,
    /// Task id.
    pub task_id: String,
    /// Number, from 1.
    pub n: u32,
    /// Lifecycle state.
    pub state: AttemptState,
    /// Failure reason.
    pub reason: Option<FailureReason>,
    /// Explanation of the end state.
    pub detail: Option<String>,
    /// Branch name.
    pub branch: String,
    /// Commit the branch starts from.
    pub base_commit: Option<String>,
    /// Commit at the branch's tip.
    pub head_commit: Option<String>,
    /// The agent's summary.
    pub summary: Option<String>,
    /// The sandbox serving the attempt.
    pub sandbox_id: Option<String>,
    /// Creation time, unix ms.
    pub created_at: i64,
    /// Last state change, unix ms.
    pub updated_at: i64,
    /// When it left the queue, unix ms.
    pub started_at: Option<i64>,
    /// The replica driving it (holding its lease).
    pub owner: Option<String>,
    /// When that lease runs out, unix ms.
    pub lease_until: Option<i64>,
    /// When a cancellation was asked for through another replica, unix ms.
    pub cancel_requested: Option<i64>,
    /// Milliseconds spent paused or waiting for a person (not counting
    /// the current stay in such a state).
    pub held_ms: i64,
    /// The newest filesystem snapshot of its sandbox.
    pub snapshot_image: Option<String>,
    /// The sandbox whose checkout was completely copied in.
    pub prepared_sandbox: Option<String>,
    /// SHA-256 of its model-gateway token.
    pub gateway_token_sha256: Option<String>,
    /// Its own agent, when not the task's.
    pub agent: Option<String>,
    /// When a person asked to stop (pause) it, unix ms; cleared once it is
    /// paused or ends.
    pub pause_requested: Option<i64>,
    /// When a person asked to resume it, unix ms; cleared once it leaves
    /// `paused`.
    pub resume_requested: Option<i64>,
}

/// A checkpoint: the working tree at the end of a turn, tied to the event
/// log and the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRow {
    /// The attempt.
    pub attempt_id: String,
    /// Number, from 1.
    pub n: u32,
    /// The last event seq it covers.
    pub seq: u64,
    /// The agent turn it follows.
    pub turn: u32,
    /// Length of the conversation at that point.
    pub messages: u32,
    /// The working tree as a commit in the project's git store.
    pub commit_sha: String,
    /// When it was taken, unix ms.
    pub created_at: i64,
}

impl AttemptRow {
    pub(crate) fn from_row(r: &AnyRow) -> Result<Self> {
        let state: String = r.get(3);
        let reason: Option<String> = r.get(4);
        Ok(AttemptRow {
            id: r.get(0),
            task_id: r.get(1),
            n: r.get::<i64, _>(2) as u32,
            state: AttemptState::parse(&state)
                .ok_or_else(|| StoreError::Corrupt(format!("attempt state {state:?}")))?,
            reason: reason
                .map(|s| {
                    FailureReason::parse(&s)
                        .ok_or_else(|| StoreError::Corrupt(format!("failure reason {s:?}")))
                })
                .transpose()?,
            detail: r.get(5),
            branch: r.get(6),
            base_commit: r.get(7),
            head_commit: r.get(8),
            summary: r.get(9),
            sandbox_id: r.get(10),
            created_at: r.get(11),
            updated_at: r.get(12),
            started_at: r.get(13),
            owner: r.get(14),
            lease_until: r.get(15),
            cancel_requested: r.get(16),
            held_ms: r.get(17),
            snapshot_image: r.get(18),
            prepared_sandbox: r.get(19),
            gateway_token_sha256: r.get(20),
            agent: r.get(21),
            pause_requested: r.get(22),
            resume_requested: r.get(23),
        })
    }
}
