//! The script format: a list of steps, each consumed by one request.
//!
//! ```json
//! {"steps": [
//!   {"expect": {"tool_results": [{"contains": "README"}]},
//!    "reply": {"content": "Looking.", "tool_calls": [{"name": "list_files", "arguments": {"path": "."}}]}},
//!   {"reply": {"status": 503, "error": "overloaded"}},
//!   {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "done"}}]}}
//! ]}
//! ```

use serde::{Deserialize, Serialize};

/// A whole script.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// How a request finds its step.
    #[serde(default)]
    pub mode: Mode,
    /// Steps, in the order requests consume them.
    pub steps: Vec<Step>,
    /// The answer to every request that offers no tools (an agent's side
    /// requests, such as OpenCode's title for a session). Such requests
    /// consume no step and may come at any time; without this they take
    /// steps like any other.
    #[serde(default)]
    pub untooled: Option<Reply>,
}

/// How a request finds its step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Each request takes the next step.
    #[default]
    Sequence,
    /// A request takes step N, where N is the number of assistant messages
    /// it carries: the same conversation state always gets the same
    /// answer. For agents that are interrupted and resume from a
    /// checkpoint (they send an earlier state again), and for many
    /// conversations sharing one script.
    Turn,
}

/// One request's worth of script.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// What the request must contain; a mismatch is recorded as a failure
    /// and answered with HTTP 400.
    #[serde(default)]
    pub expect: Expect,
    /// The answer.
    pub reply: Reply,
}

/// Checks on a request, beyond the ones always made (every tool call of
/// the previous reply answered by a tool message with its id).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// The tool messages answering the previous reply, in order: each
    /// must contain its text.
    #[serde(default)]
    pub tool_results: Vec<Contains>,
    /// Some user message must contain this text.
    #[serde(default)]
    pub user_contains: Option<String>,
    /// These tool names must be offered.
    #[serde(default)]
    pub tools_include: Vec<String>,
}

/// A substring check.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contains {
    /// The text that must appear.
    pub contains: String,
}

/// An answer: a completion, or an HTTP error.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    /// Assistant text.
    #[serde(default)]
    pub content: Option<String>,
    /// Tool calls.
    #[serde(default)]
    pub tool_calls: Vec<ScriptedCall>,
    /// Finish reason; `tool_calls` when there are calls, else `stop`.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// Answer with this HTTP status and `error` instead of a completion.
    #[serde(default)]
    pub status: Option<u16>,
    /// Error message for `status`.
    #[serde(default)]
    pub error: Option<String>,
    /// Wait this long before answering.
    #[serde(default)]
    pub delay_ms: Option<u64>,
}

/// A scripted tool call.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedCall {
    /// Tool name.
    pub name: String,
    /// Arguments as JSON (serialized into the call).
    #[serde(default)]
    pub arguments: serde_json::Value,
    /// Arguments as raw text, sent verbatim (to script malformed JSON).
    #[serde(default)]
    pub raw_arguments: Option<String>,
}
