//! The built-in agent: a tool-calling loop in the control plane against any
//! OpenAI-compatible chat-completions endpoint. Its tools (run a command,
//! read, write, replace, list, finish) run inside the attempt's sandbox
//! through the driver.
//!
//! Architecture invariant: the agent never touches the host. Everything
//! it does goes through [`tools::SandboxTools`], and everything it sees or
//! decides is reported to an [`EventSink`].

pub mod model;
pub mod run;
pub mod tools;

pub use model::{ModelClient, ModelConfig, ModelFailure};
pub use run::{AgentOutcome, run_agent};
pub use tools::SandboxTools;

use async_trait::async_trait;
use backshift_protocol::EventKind;

/// Where the agent reports what happens. Implementations persist and
/// broadcast; they handle their own errors.
#[async_trait]
pub trait EventSink: Send + Sync {
    /// Records one event.
    async fn emit(&self, kind: EventKind);
}
