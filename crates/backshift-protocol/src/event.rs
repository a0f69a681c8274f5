//! Events: the append-only, numbered record of everything that happened to
//! an attempt. `(attempt_id, seq)` is unique and seqs start at 1 without gaps.

use backshift_core::{AttemptState, FailureReason};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// One record in an attempt's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// The attempt this event belongs to.
    pub attempt_id: String,
    /// Position in the attempt's log, from 1, without gaps.
    pub seq: u64,
    /// When it was recorded (RFC 3339, UTC).
    pub ts: String,
    /// The server replica that recorded it (the one driving the attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Token counts reported by the model for one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenUsage {
    /// Tokens in the request.
    pub input_tokens: u64,
    /// Tokens in the response.
    pub output_tokens: u64,
}

/// What model tokens cost, in US dollars per million (server config).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Prices {
    /// Per million input tokens.
    pub input_usd_per_mtok: f64,
    /// Per million output tokens.
    pub output_usd_per_mtok: f64,
}

impl Prices {
    /// The cost of `usage`, in US dollars.
    pub fn cost(&self, usage: &TokenUsage) -> f64 {
        (usage.input_tokens as f64 * self.input_usd_per_mtok
            + usage.output_tokens as f64 * self.output_usd_per_mtok)
            / 1_000_000.0
    }
}

/// A tool call as the model asked for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ToolCallRecord {
    /// The model's id for the call, echoed in the result.
    pub call_id: String,
    /// Tool name.
    pub name: String,
    /// Arguments exactly as the model sent them (JSON text, maybe invalid).
    pub arguments: String,
}

/// One step of an agent's plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlanEntry {
    /// What the step does.
    pub content: String,
    /// `pending`, `in_progress` or `completed`.
    pub status: String,
    /// `high`, `medium` or `low`.
    pub priority: String,
}

/// What happened. Serialized with a `type` field naming the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The attempt moved to another lifecycle state.
    StateChanged {
        /// Previous state; absent for the first event.
        from: Option<AttemptState>,
        /// New state.
        to: AttemptState,
        /// Why it failed, for `failed`.
        reason: Option<FailureReason>,
        /// Human-readable explanation, including what to do.
        detail: Option<String>,
    },
    /// A progress line from backshift itself (creating sandbox, cloning...).
    Progress {
        /// The line.
        message: String,
    },
    /// A request to the model is about to be sent.
    ModelRequest {
        /// Turn number, from 1.
        turn: u32,
        /// Messages in the conversation sent.
        messages: usize,
        /// Approximate size of the conversation in bytes.
        bytes: usize,
    },
    /// The model answered.
    ModelResponse {
        /// Turn number, from 1.
        turn: u32,
        /// The assistant's text, if any.
        text: Option<String>,
        /// Tool calls requested in this turn, in order.
        tool_calls: Vec<ToolCallRecord>,
        /// The model's finish reason (`stop`, `tool_calls`, `length`...).
        finish_reason: Option<String>,
        /// Token counts, when the model reported them.
        usage: Option<TokenUsage>,
        /// What they cost, when prices are configured.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cost_usd: Option<f64>,
        /// Time from request to complete response.
        latency_ms: u64,
    },
    /// A model request failed and will be retried.
    ModelRetry {
        /// Turn number, from 1.
        turn: u32,
        /// Which retry this is, from 1.
        retry: u32,
        /// What went wrong.
        error: String,
        /// How long backshift waits before retrying.
        wait_ms: u64,
    },
    /// A tool call starts.
    ToolCall {
        /// The model's id for the call.
        call_id: String,
        /// Tool name.
        name: String,
        /// Parsed arguments (or the raw text under `raw` when invalid).
        #[schema(value_type = Object)]
        arguments: serde_json::Value,
        /// For agents speaking ACP: the kind of tool (`read`, `edit`,
        /// `delete`, `move`, `search`, `execute`, `think`, `fetch`,
        /// `other`), the same across agents.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<String>,
        /// For agents speaking ACP: the agent's one-line description of
        /// the call (a command line, a file name).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
    },
    /// Output of a running command, as it is produced.
    CommandOutput {
        /// The tool call that runs the command.
        call_id: String,
        /// stdout or stderr.
        stream: OutputStream,
        /// The text (lossy UTF-8).
        text: String,
        /// The sandbox journal's sequence number of the last output this
        /// event includes: where a control plane that restarted resumes
        /// streaming the command's output.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        journal_seq: Option<u64>,
    },
    /// A tool call ended; `output` is what the model is told.
    ToolResult {
        /// The model's id for the call.
        call_id: String,
        /// Tool name.
        name: String,
        /// False when the tool failed (non-zero exit, missing file, bad arguments).
        ok: bool,
        /// Exit code of a command.
        exit_code: Option<i64>,
        /// The result as sent to the model.
        output: String,
        /// How long the call took.
        duration_ms: u64,
    },
    /// The agent called `finish`.
    AgentFinished {
        /// The agent's summary of its work.
        summary: String,
    },
    /// The attempt's branch holds this change.
    DiffStat {
        /// The branch.
        branch: String,
        /// Commit the branch starts from.
        base_commit: String,
        /// Commit at the branch's tip.
        head_commit: String,
        /// Files changed.
        files_changed: u64,
        /// Lines added.
        insertions: u64,
        /// Lines removed.
        deletions: u64,
        /// `git diff --stat` output.
        stat: String,
    },
    /// The working tree and the conversation were saved after a turn; a
    /// recovery resumes from the newest checkpoint.
    Checkpoint {
        /// Number, from 1.
        n: u32,
        /// The turn it follows.
        turn: u32,
        /// The tree as a commit in the git store
        /// (`refs/backshift/checkpoints/<attempt>`).
        commit: String,
        /// Whether the tree changed since the previous checkpoint.
        changed: bool,
    },
    /// A recovery put the attempt back to a checkpoint.
    Restored {
        /// The checkpoint restored (0: none yet, the base commit).
        checkpoint: u32,
        /// The turn the agent resumes after.
        turn: u32,
        /// Whether the sandbox survived (adopted) or was rebuilt.
        adopted: bool,
        /// A rebuilt sandbox started from this filesystem snapshot
        /// (installed packages and caches kept).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot: Option<String>,
    },
    /// An agent in the sandbox called the model through the gateway.
    ModelCall {
        /// The API (`chat.completions`).
        api: String,
        /// The model the call went to.
        model: String,
        /// Whether the answer was streamed.
        stream: bool,
        /// The upstream's HTTP status (or the gateway's own refusal).
        status: u16,
        /// Token counts, when the upstream reported them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        usage: Option<TokenUsage>,
        /// What they cost, when prices are configured.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cost_usd: Option<f64>,
        /// From the request to the end of the answer.
        latency_ms: u64,
        /// Why the gateway refused or failed the call.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// An agent speaking ACP opened (or reopened) its session.
    AgentSession {
        /// The agent (`opencode`).
        agent: String,
        /// What the agent calls itself, with its version.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent_info: Option<String>,
        /// The agent's session id.
        session_id: String,
        /// The agent's process in the sandbox (its shim command id).
        process: String,
        /// Whether an earlier session was loaded (`session/load`, after a
        /// restart) rather than a new one started.
        loaded: bool,
    },
    /// What an agent speaking ACP said (its streamed message chunks,
    /// joined).
    AgentMessage {
        /// The text.
        text: String,
    },
    /// An agent's reasoning, as it chose to show it.
    AgentThought {
        /// The text.
        text: String,
    },
    /// An agent's plan, as it stands now (each update replaces the last).
    Plan {
        /// The steps.
        entries: Vec<PlanEntry>,
    },
    /// A file change an agent made or proposed in a tool call.
    FileDiff {
        /// The tool call.
        call_id: String,
        /// The file.
        path: String,
        /// A unified diff from the old text to the new (cut at 256 KiB).
        diff: String,
    },
    /// An agent asked permission for a tool call and was answered.
    PermissionDecision {
        /// The tool call it asked about.
        call_id: String,
        /// What it asked about (a command line, a file).
        title: String,
        /// The kind of tool (`execute`, `edit`, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<String>,
        /// The answer: `allow_once`, `allow_always`, `reject_once`,
        /// `reject_always`, or `cancelled` (no option fit).
        decision: String,
        /// Who answered (`policy`: the configured permission policy).
        by: String,
        /// Why.
        reason: String,
    },
    /// The sandbox asked the egress proxy for a connection, and what
    /// became of it.
    Egress {
        /// The host as the sandbox named it.
        host: String,
        /// The port.
        port: u16,
        /// The method of a plain HTTP request; absent for a tunnel
        /// (`CONNECT`, how HTTPS goes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        method: Option<String>,
        /// The path of a plain HTTP request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
        /// `allowed` (connected), `denied` (by policy or a person), or
        /// `failed` (allowed, but refused by address or unreachable).
        decision: String,
        /// The rule or approval that decided; absent when the default did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
        /// Why, in words.
        reason: String,
        /// The address connected to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        address: Option<String>,
    },
    /// Something the user should know that did not stop the attempt (a
    /// devcontainer.json field backshift does not support).
    Warning {
        /// What, why, and what happens instead.
        message: String,
    },
    /// backshift started verifying the agent's work: the verify command
    /// runs in a fresh sandbox made from the attempt's commit (its output
    /// follows as `command_output` of call `verify:<iteration>`).
    VerificationStarted {
        /// Which verification of the attempt, from 1.
        iteration: u32,
        /// The commit under test.
        commit: String,
        /// The command run.
        command: String,
        /// Where the command comes from: `task`, `repository`
        /// (`backshift.toml` at the base commit) or `server`.
        source: String,
    },
    /// The verify command ended: the test report.
    Verification {
        /// What was found.
        #[serde(flatten)]
        result: Box<VerificationResult>,
    },
    /// This attempt was chosen as its task's result.
    Winner {
        /// `auto` (the best ranked once every attempt ended), or the
        /// name of the token that picked it.
        by: String,
        /// Its rank among the task's attempts.
        rank: u32,
        /// How many attempts the task has.
        of: u32,
        /// Why it ranks first, or what the person said.
        why: String,
    },
    /// The task's result was delivered (or could not be).
    Delivered {
        /// How far it got.
        #[serde(flatten)]
        delivery: Box<crate::api::Delivery>,
    },
    /// The sandbox pushed to its git endpoint.
    GitPush {
        /// The refs it asked to update.
        refs: Vec<String>,
        /// `accepted` or `refused`.
        decision: String,
        /// Why.
        reason: String,
    },
    /// A person is asked to decide (`backshift approve ID`); what asked
    /// waits meanwhile.
    ApprovalRequested {
        /// The approval's id.
        approval: String,
        /// `egress` or `permission`.
        kind: String,
        /// What is asked, in one line.
        summary: String,
        /// When it is denied unless answered (RFC 3339).
        expires_at: String,
    },
    /// The answer.
    ApprovalAnswered {
        /// The approval's id.
        approval: String,
        /// `approved`, `denied` or `expired`.
        decision: String,
        /// For an approval: `once`, `task` or `project`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scope: Option<String>,
        /// Who answered (`timeout` when nobody did).
        by: String,
        /// Why, when given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The sandbox's filesystem was saved as an image (after a
    /// checkpoint): a rebuilt sandbox starts from it.
    Snapshot {
        /// The checkpoint it was taken after.
        checkpoint: u32,
        /// The image.
        image: String,
        /// How long it took (the sandbox is paused meanwhile).
        duration_ms: u64,
    },
}

/// One verification of an attempt's work: the verify command, run by
/// backshift in a fresh sandbox made from the attempt's commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VerificationResult {
    /// Which verification of the attempt, from 1.
    pub iteration: u32,
    /// The commit tested.
    pub commit: String,
    /// The command run.
    pub command: String,
    /// Whether it passed: exit code 0 and no failed test in the report.
    pub passed: bool,
    /// The command's exit code (absent when it did not end by itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// How long it ran.
    pub duration_ms: u64,
    /// The tests, as far as a report says.
    pub report: TestReport,
    /// The end of its output (stdout and stderr as they came).
    pub output_tail: String,
    /// What kept it from ending by itself (a timeout), when something did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl VerificationResult {
    /// How the command ended, in words: `exit code N`, or what stopped it.
    pub fn exit_text(&self) -> String {
        match (&self.exit_code, &self.error) {
            (_, Some(e)) => e.clone(),
            (Some(c), None) => format!("exit code {c}"),
            (None, None) => "no exit code".into(),
        }
    }
}

/// Tests passed, failed and skipped, from a JUnit XML or TAP report; or,
/// without one, only the exit code.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TestReport {
    /// `junit`, `tap`, or `exit_code` (no report was read).
    pub format: String,
    /// Tests passed.
    pub passed: u64,
    /// Tests failed (errors included).
    pub failed: u64,
    /// Tests skipped (TAP's `SKIP` and `TODO` included).
    pub skipped: u64,
    /// Each failed test with what it said.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<TestFailure>,
    /// Why a configured report could not be read, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A failed test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TestFailure {
    /// Its name (with its class or suite when the report gives one).
    pub name: String,
    /// Its failure message and details, shortened.
    pub message: String,
}

impl EventKind {
    /// The `type` name of the variant, as serialized.
    pub fn type_name(&self) -> &'static str {
        match self {
            EventKind::StateChanged { .. } => "state_changed",
            EventKind::Progress { .. } => "progress",
            EventKind::ModelRequest { .. } => "model_request",
            EventKind::ModelResponse { .. } => "model_response",
            EventKind::ModelRetry { .. } => "model_retry",
            EventKind::ToolCall { .. } => "tool_call",
            EventKind::CommandOutput { .. } => "command_output",
            EventKind::ToolResult { .. } => "tool_result",
            EventKind::AgentFinished { .. } => "agent_finished",
            EventKind::DiffStat { .. } => "diff_stat",
            EventKind::Checkpoint { .. } => "checkpoint",
            EventKind::Restored { .. } => "restored",
            EventKind::Snapshot { .. } => "snapshot",
            EventKind::ModelCall { .. } => "model_call",
            EventKind::AgentSession { .. } => "agent_session",
            EventKind::AgentMessage { .. } => "agent_message",
            EventKind::AgentThought { .. } => "agent_thought",
            EventKind::Plan { .. } => "plan",
            EventKind::FileDiff { .. } => "file_diff",
            EventKind::PermissionDecision { .. } => "permission_decision",
            EventKind::Egress { .. } => "egress",
            EventKind::GitPush { .. } => "git_push",
            EventKind::VerificationStarted { .. } => "verification_started",
            EventKind::Verification { .. } => "verification",
            EventKind::Winner { .. } => "winner",
            EventKind::Delivered { .. } => "delivered",
            EventKind::Warning { .. } => "warning",
            EventKind::ApprovalRequested { .. } => "approval_requested",
            EventKind::ApprovalAnswered { .. } => "approval_answered",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_flat_with_a_type_tag() {
        let e = Event {
            attempt_id: "k3f9x2m1-1".into(),
            seq: 3,
            ts: "2026-11-23T10:00:00Z".into(),
            driver: None,
            kind: EventKind::Progress {
                message: "cloning".into(),
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "progress");
        assert_eq!(v["message"], "cloning");
        assert_eq!(v["seq"], 3);
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        assert_eq!(e.kind.type_name(), "progress");
    }
}
