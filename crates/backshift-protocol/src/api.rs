//! REST bodies under `/api/v1`.

use backshift_core::limits::LimitsRequest;
use backshift_core::{AttemptState, FailureReason, Limits};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /api/v1/tasks`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTaskRequest {
    /// What the agent should do.
    pub prompt: String,
    /// The repository: an absolute path on the server's host, or a git URL.
    pub repo: String,
    /// Branch, tag or commit to start from; the repository's HEAD if absent.
    #[serde(default)]
    pub base_ref: Option<String>,
    /// Agent name; the server's default (`builtin`) if absent, `command`
    /// when `command` is given.
    #[serde(default)]
    pub agent: Option<String>,
    /// For the `command` agent: the bash script that is the whole agent.
    /// It runs in the checkout with the task's prompt in
    /// `BACKSHIFT_PROMPT`; exit 0 means done.
    #[serde(default)]
    pub command: Option<String>,
    /// Limits; the server's defaults fill what is absent.
    #[serde(default)]
    pub limits: Option<LimitsRequest>,
    /// The command backshift runs to verify the work, in a fresh sandbox
    /// made from the attempt's commit; overrides the repository's
    /// `backshift.toml` and the server's `[verify] command`.
    #[serde(default)]
    pub verify: Option<String>,
    /// Attempts to run side by side, each in its own sandbox on its own
    /// branch (1 to 10; default 1, or one per agent in `agents`).
    #[serde(default)]
    pub attempts: Option<u32>,
    /// One agent per attempt, in turn (`["builtin", "opencode"]`);
    /// overrides `agent`.
    #[serde(default)]
    pub agents: Option<Vec<String>>,
}

/// A task and its attempts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    /// Task id.
    pub id: String,
    /// Its project (the repository's policy: `backshift egress PROJECT`).
    pub project_id: String,
    /// What was asked.
    pub prompt: String,
    /// The repository as given.
    pub repo: String,
    /// The requested base ref, if any.
    pub base_ref: Option<String>,
    /// Agent name.
    pub agent: String,
    /// The `command` agent's script.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Effective limits.
    pub limits: Limits,
    /// The verify command given with the task, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<String>,
    /// When the task was created (RFC 3339).
    pub created_at: String,
    /// State of the latest attempt.
    pub state: AttemptState,
    /// Attempts, first to last.
    pub attempts: Vec<AttemptView>,
    /// Attempt ids, best first (see `AttemptView::rank`).
    #[serde(default)]
    pub ranking: Vec<String>,
    /// The attempt chosen as the task's result: the best ranked once all
    /// ended (`winner_by`: `auto`), or the one a person picked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub winner: Option<String>,
    /// Who chose the winner: `auto`, or the picking token's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub winner_by: Option<String>,
    /// Where the result went: its branch pushed upstream and the pull
    /// request, once tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
    /// When every attempt ended and none succeeded: what was tried, the
    /// last failing output and where the work stands (Markdown). In the
    /// view of one task, not in lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<String>,
}

/// The delivery of a task's result to its repository's forge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Delivery {
    /// `pushing` (under way), `pushed` (no pull request for this forge),
    /// `opened` (the pull request is open), `failed`, or `kept` (no
    /// `[[forges]]` entry matches the repository: the branch stays in
    /// backshift's git store).
    pub state: String,
    /// The attempt delivered.
    pub attempt: String,
    /// Where it was pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
    /// The branch.
    pub branch: String,
    /// The commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The pull request's number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<u64>,
    /// The pull request's page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request_url: Option<String>,
    /// What went wrong, and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When this state was reached (RFC 3339).
    pub at: String,
}

/// An API token, by name (its value is shown once, when it is made).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    /// Its name.
    pub name: String,
    /// When it was made (RFC 3339).
    pub created_at: String,
}

/// `POST /api/v1/tokens`: a new API token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    /// Its name (letters, digits, `-`, `_`, `.`; unique).
    pub name: String,
}

/// A token just made: the only time its value is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    /// Its name.
    pub name: String,
    /// The token (`bs_...`); only its SHA-256 is kept.
    pub token: String,
}

/// `POST /api/v1/tasks/{id}/pick`: choose the attempt that is the task's
/// result.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PickAttempt {
    /// The attempt: its id (`TASK-2`) or number (`2`).
    pub attempt: String,
}

/// The size of an attempt's change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiffSummary {
    /// Files changed.
    pub files_changed: u64,
    /// Lines added.
    pub insertions: u64,
    /// Lines removed.
    pub deletions: u64,
}

/// One attempt.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttemptView {
    /// Attempt id (`TASKID-N`).
    pub id: String,
    /// Task id.
    pub task_id: String,
    /// Attempt number, from 1.
    pub n: u32,
    /// The agent it runs.
    #[serde(default)]
    pub agent: String,
    /// Lifecycle state.
    pub state: AttemptState,
    /// Why it failed, when `state` is `failed`.
    pub reason: Option<FailureReason>,
    /// What went wrong and what to do, for failed and timed-out attempts.
    pub detail: Option<String>,
    /// The attempt's branch.
    pub branch: String,
    /// The commit the branch starts from, once known.
    pub base_commit: Option<String>,
    /// The branch's tip, once published.
    pub head_commit: Option<String>,
    /// The agent's summary, once it finished.
    pub summary: Option<String>,
    /// Path of the git repository holding the branch, relative to the
    /// server URL (`/git/<project>.git`), for `git fetch`.
    pub git_path: String,
    /// Seq of the attempt's last event.
    pub last_seq: u64,
    /// When the attempt was created (RFC 3339).
    pub created_at: String,
    /// When its state last changed (RFC 3339).
    pub updated_at: String,
    /// The server replica driving it now, while it is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// For an attempt that ended without success: the last lines of its
    /// log, which show what led to the end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_tail: Vec<String>,
    /// The model tokens it used (the built-in agent's and every call
    /// through the gateway) and their cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ModelUsage>,
    /// Its latest verification (the test report), once one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<crate::event::VerificationResult>,
    /// Verifications run so far (each failed one gave the agent another
    /// iteration, up to `limits.max_iterations`).
    #[serde(default)]
    pub verifications: u32,
    /// Its place among the task's attempts, from 1: succeeded first, then
    /// verification passed, fewer failing tests, a smaller (non-empty)
    /// change, lower cost, less time.
    #[serde(default)]
    pub rank: u32,
    /// Its change, once published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<DiffSummary>,
    /// From its start to its end (or now), once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// A person asked to pause it and the runner has not done so yet.
    #[serde(default)]
    pub pause_requested: bool,
    /// A person asked to resume it and it waits for a runner (a free slot).
    #[serde(default)]
    pub resume_requested: bool,
}

/// Model tokens used and what they cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ModelUsage {
    /// Model calls.
    pub calls: u64,
    /// Input tokens.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// In US dollars, when prices are configured (`[model]
    /// input_usd_per_mtok`, `output_usd_per_mtok`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

/// `201` answer to a created task.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskCreated {
    /// The new task's id.
    pub id: String,
    /// Its attempts' ids.
    pub attempts: Vec<String>,
}

/// A decision a person is asked for: an egress request an `ask` rule
/// holds, or an agent's permission request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ApprovalView {
    /// Its id (`backshift approve ID`).
    pub id: String,
    /// The task.
    pub task_id: String,
    /// The attempt that asked.
    pub attempt_id: String,
    /// `egress` or `permission`.
    pub kind: String,
    /// What is asked, in one line (`CONNECT pypi.example:443`).
    pub summary: String,
    /// Details, kind-specific (egress: host, port, method, path).
    #[schema(value_type = Object)]
    pub subject: serde_json::Value,
    /// `pending`, `approved`, `denied` or `expired`.
    pub state: String,
    /// For an approval: `once`, `task` or `project`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Who answered (an API token's name; `timeout` when nobody did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_by: Option<String>,
    /// Why, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it was asked (RFC 3339).
    pub created_at: String,
    /// When it is denied unless answered.
    pub expires_at: String,
    /// When it was answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_at: Option<String>,
}

/// `POST /api/v1/approvals/{id}`: the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AnswerApproval {
    /// `approve` or `deny`.
    pub decision: Decision,
    /// How far an approval reaches: `once` (this request; the default),
    /// `task` (the same request from any attempt of this task) or
    /// `project` (from any task of the project, from now on).
    #[serde(default)]
    pub scope: Scope,
    /// Why (kept on the record, and told to the agent on a denial).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// See [`AnswerApproval`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Let it go.
    Approve,
    /// Refuse it.
    Deny,
}

/// See [`AnswerApproval`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// This request only.
    #[default]
    Once,
    /// The same request from this task's attempts.
    Task,
    /// The same request from any task of the project.
    Project,
}

impl Scope {
    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Once => "once",
            Scope::Task => "task",
            Scope::Project => "project",
        }
    }
}

/// A project: a repository and its own policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProjectView {
    /// Its id.
    pub id: String,
    /// The repository (a path on the server's host, or a URL).
    pub source: String,
    /// Its egress rules, decided before the server's (deny still wins
    /// over ask, and ask over allow, across both).
    pub egress_rules: Vec<backshift_core::policy::Rule>,
    /// When it was first used (RFC 3339).
    pub created_at: String,
    /// Whether its sandboxes get a Docker engine of their own.
    #[serde(default)]
    pub docker_engine: bool,
}

/// `PUT /api/v1/projects/{id}/docker`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetDockerEngine {
    /// Whether the project's next sandboxes get a Docker engine of their
    /// own (a privileged container: see the README's risks).
    pub enabled: bool,
}

/// `PUT /api/v1/projects/{id}/egress`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetEgressRules {
    /// The rules, replacing the project's.
    pub rules: Vec<backshift_core::policy::Rule>,
}

/// A secret, without its value (no response ever carries one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretView {
    /// Its name.
    pub name: String,
    /// The key that sealed it.
    pub key_id: String,
    /// Created (RFC 3339).
    pub created_at: String,
    /// Last set.
    pub updated_at: String,
    /// The projects whose sandboxes get it, and as which variable.
    pub grants: Vec<SecretGrantView>,
}

/// See [`SecretView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretGrantView {
    /// The project.
    pub project_id: String,
    /// The environment variable its sandboxes get.
    #[serde(rename = "as")]
    pub var: String,
    /// Only the setup phase gets it.
    #[serde(default)]
    pub setup_only: bool,
}

/// `PUT /api/v1/secrets/{name}`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetSecret {
    /// The value (at least 6 characters: shorter ones could not be
    /// redacted).
    pub value: String,
}

impl std::fmt::Debug for SetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SetSecret { value: <hidden> }")
    }
}

/// `PUT /api/v1/projects/{id}/secrets/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantSecret {
    /// The environment variable the project's sandboxes get it as.
    #[serde(rename = "as")]
    pub var: String,
    /// Only for the setup phase: the devcontainer's `postCreateCommand`
    /// gets it, the sandbox's environment (and so the agent) never does.
    #[serde(default)]
    pub setup_only: bool,
}

/// `POST /api/v1/secrets/rotate`: what was re-sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RotationView {
    /// Secrets re-sealed with the current key.
    pub resealed: u32,
    /// The current key.
    pub key_id: String,
}

/// A sandbox of this server and what it uses now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SandboxView {
    /// The sandbox (its container's id).
    pub id: String,
    /// The attempt it serves.
    pub attempt_id: Option<String>,
    /// The task.
    pub task_id: Option<String>,
    /// Its attempt's state (`paused`: stopped on request, files kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_state: Option<backshift_core::AttemptState>,
    /// What it is for: `agent` (the attempt's own), `verify`, `engine`
    /// (an agent's own Docker engine) or `warm` (in the warm pool, no
    /// attempt's yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// It came from the warm pool (made ahead, claimed by its attempt).
    #[serde(default)]
    pub from_pool: bool,
    /// Alive (running, or paused for a moment for a snapshot).
    pub running: bool,
    /// CPU, percent of one CPU, over the last second.
    pub cpu_percent: Option<f64>,
    /// Memory in use, bytes (page cache not counted).
    pub memory_bytes: u64,
    /// Its memory limit, bytes.
    pub memory_limit_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// Bytes written to its filesystem.
    pub disk_bytes: Option<u64>,
    /// Its disk limit, when one is applied (`[sandbox] disk_mb`, where the
    /// storage driver supports it).
    pub disk_limit_bytes: Option<u64>,
    /// Why there is no disk limit though one is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_limit_note: Option<String>,
}

/// The warm pool: sandboxes made ahead of demand, per environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PoolView {
    /// Ready sandboxes kept per environment (`[sandbox] warm`; 0: off).
    pub size: usize,
    /// Environments kept warm besides the default one
    /// (`[sandbox] warm_environments`): the most recently asked for.
    pub max_environments: usize,
    /// Each environment kept warm.
    pub environments: Vec<PoolEnvironmentView>,
    /// Attempts that got a warm sandbox, since this server started.
    pub hits: u64,
    /// Attempts that could have had one but found none ready.
    pub misses: u64,
    /// `hits / (hits + misses)`, when there was any.
    pub hit_rate: Option<f64>,
    /// Why the last miss missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_miss: Option<String>,
    /// When the counts started (this server's start, RFC 3339).
    pub since: String,
}

/// One environment of the warm pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PoolEnvironmentView {
    /// Its key: a hash of everything its sandboxes are made from.
    pub key: String,
    /// Their image.
    pub image: String,
    /// The server's default environment (kept warm always), rather than
    /// one an attempt asked for (a devcontainer's, a setup snapshot).
    pub default: bool,
    /// Sandboxes ready to be claimed.
    pub ready: usize,
    /// Sandboxes being made.
    pub creating: usize,
    /// Claims that found one ready.
    pub hits: u64,
    /// Claims that found none.
    pub misses: u64,
    /// Why the last sandbox could not be made, when the last try failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// One row of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Position, from 1, without gaps.
    pub seq: i64,
    /// When (RFC 3339).
    pub ts: String,
    /// Who: `token:NAME` (an API caller), `policy`, `sandbox:ATTEMPT`,
    /// `timeout`, `backshift`.
    pub actor: String,
    /// What: `task.create`, `task.cancel`, `approval.approve`,
    /// `egress.denied`, `permission.allow_once`...
    pub action: String,
    /// On what: a task, attempt or approval id, or `host:port`.
    pub target: String,
    /// Details and reasons.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
    /// This row's hash (SHA-256 over its content and the previous hash).
    pub hash: String,
}

/// `GET /api/v1/audit/verify`: whether the chain is intact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditVerification {
    /// No problem found.
    pub ok: bool,
    /// Rows checked.
    pub rows: u64,
    /// The last row written, as the head file outside the database says.
    pub head_seq: Option<i64>,
    /// What is wrong, one sentence each.
    pub problems: Vec<String>,
}

/// Every error body: what went wrong, and what to do about it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// See [`ErrorBody`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code (`repo_not_found`, `unauthorized`...).
    pub code: String,
    /// What went wrong, and why.
    pub message: String,
    /// What to do about it, when we know.
    pub hint: Option<String>,
}

/// `/readyz`: whether the server can run tasks now.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReadyView {
    /// True when every check passed.
    pub ready: bool,
    /// Each check with its outcome.
    pub checks: Vec<ReadyCheck>,
}

/// One readiness check.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReadyCheck {
    /// What is checked (`database`, `sandboxes`, `docker`, `image`,
    /// `limits`, `model`).
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub message: String,
    /// What to do when it failed.
    pub fix: Option<String>,
}

/// `GET /api/v1/attempts/{id}/events` query (non-streaming form).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, utoipa::IntoParams)]
pub struct EventsQuery {
    /// Only events with a larger seq.
    pub after: Option<u64>,
    /// At most this many events (default 1000).
    pub limit: Option<u32>,
}
