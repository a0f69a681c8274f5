//! The built-in agent: a tool-calling loop in the control plane against any
//! OpenAI-compatible chat-completions endpoint. Its tools (run a command,
//! read, write, replace, list, finish) run inside the attempt's sandbox
//! through its shim.
//!
//! Architecture invariant: the agent never touches the host. Everything
//! it does goes through [`tools::SandboxTools`], and everything it sees or
//! decides is reported to an [`EventSink`].

pub mod acp;
pub mod command;
pub mod model;
pub mod run;
pub mod tools;

pub use acp::{AcpLaunch, AcpResume, PermissionPolicy, run_acp_agent};
pub use command::{CommandRun, run_command_agent};
pub use model::{ModelClient, ModelConfig, ModelFailure};
pub use run::{AgentOutcome, Conversation, Replay, run_agent};
pub use tools::{CallKey, SandboxTools, Streamed};

use async_trait::async_trait;
use backshift_protocol::EventKind;
use serde_json::Value;

/// Where the agent reports what happens. Implementations persist and
/// broadcast; they handle their own errors.
#[async_trait]
pub trait EventSink: Send + Sync {
    /// Records one event.
    async fn emit(&self, kind: EventKind);
}

/// Where the agent's conversation is kept so that it can be resumed: told
/// when the model has decided its tool calls (before any runs), after each
/// tool result, and at the end of every turn.
#[async_trait]
pub trait Journal: Send + Sync {
    /// `messages` is the whole conversation so far, mid-turn. `Err` stops
    /// the agent like in [`Journal::turn_ended`].
    async fn progressed(&self, messages: &[Value]) -> Result<(), String>;

    /// Turn `turn` ended and `messages` is the whole conversation. `Err`
    /// stops the agent (with [`AgentOutcome::Interrupted`]): the place the
    /// work happens is gone, and going on would lose what follows.
    async fn turn_ended(&self, turn: u32, messages: &[Value]) -> Result<(), String>;
}
