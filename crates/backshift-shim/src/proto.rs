//! The shim's wire protocol: newline-delimited JSON over a Unix socket.
//!
//! Every connection carries one [`Request`]. `spawn`, `kill` and `status`
//! get one [`Reply`] line; `follow` gets a stream of [`Entry`] lines, the
//! journal from the asked-for sequence on, that ends after the followed
//! command's [`Entry::Exited`] (or never, when following everything).

use serde::{Deserialize, Serialize};

/// Protocol version; a control plane refuses a shim that speaks another.
pub const VERSION: u32 = 1;

/// Where the shim's directory is inside the sandbox.
pub const SANDBOX_DIR: &str = "/.backshift/run";
/// Where the backshift binary is mounted inside the sandbox.
pub const SANDBOX_BINARY: &str = "/.backshift/bin/backshift";
/// The socket's file name in the shim's directory.
pub const SOCKET: &str = "shim.sock";
/// The journal's file name in the shim's directory.
pub const JOURNAL: &str = "journal.jsonl";
/// The session's variables (see [`Request::SetEnv`]) in the shim's
/// directory, readable by the sandbox's user only.
pub const SESSION_ENV: &str = "session-env.json";
/// The model gateway's socket in the shim's directory (the control plane
/// listens on it).
pub const GATEWAY_SOCKET: &str = "gateway.sock";
/// The loopback port inside the sandbox where the shim forwards to the
/// model gateway: the sandbox has no network, only this.
pub const GATEWAY_PORT: u16 = 47011;
/// The egress proxy's socket in the shim's directory (the control plane
/// listens on it).
pub const EGRESS_SOCKET: &str = "egress.sock";
/// The loopback port inside the sandbox where the shim forwards to the
/// egress proxy: the sandbox's only way to the network.
pub const EGRESS_PORT: u16 = 47012;
/// The sandbox's git endpoint's socket in the shim's directory.
pub const GIT_SOCKET: &str = "git.sock";
/// The loopback port inside the sandbox where the shim forwards to its
/// git endpoint (its own project, its own branch).
pub const GIT_PORT: u16 = 47013;

/// What a connection asks for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Start command `id`, unless one with that id was started before
    /// (then nothing is started: the reply says `existing`).
    Spawn(SpawnRequest),
    /// The journal after `after`; only command `id`'s entries, ending
    /// after its exit, when `id` is given.
    Follow {
        /// Entries with a larger sequence number are sent.
        after: u64,
        /// The command to follow.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// End the stream at the journal's current end instead of waiting
        /// for more.
        #[serde(default)]
        until_now: bool,
    },
    /// Write to command `id`'s stdin (it was started with `stdin_open`);
    /// what is written is journaled as an `input` entry.
    Write {
        /// The command.
        id: String,
        /// The bytes (base64).
        data_b64: String,
        /// Close stdin afterwards.
        #[serde(default)]
        close: bool,
    },
    /// Kill command `id`'s whole process group.
    Kill {
        /// The command.
        id: String,
    },
    /// The shim's version, journal position and running commands.
    Status,
    /// Variables every command started from now on gets (before its own
    /// `env`), replacing those set before: what makes a sandbox an
    /// attempt's (its tokens, its git remote, its secrets) when it was
    /// created without them (a warm one, claimed). Kept in the shim's
    /// directory ([`SESSION_ENV`]), so a shim started again (a stopped
    /// sandbox resumed) has them too.
    SetEnv {
        /// Name and value of each variable.
        env: Vec<(String, String)>,
    },
}

/// A command to start.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SpawnRequest {
    /// The caller's name for the command, unique within the sandbox.
    pub id: String,
    /// Program and arguments (no shell is implied).
    pub argv: Vec<String>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Extra environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<(String, String)>,
    /// Directories put in front of the sandbox's own `PATH`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path_prepend: Vec<String>,
    /// Bytes for stdin (base64), which is then closed; stdin is empty
    /// otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_b64: Option<String>,
    /// Keep stdin open for `write` requests (an agent spoken to over its
    /// stdio); `stdin_b64`, if any, is written first.
    #[serde(default)]
    pub stdin_open: bool,
    /// After this many milliseconds the process group gets SIGTERM, and
    /// SIGKILL [`KILL_GRACE_MS`] later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Between a timeout's SIGTERM and its SIGKILL.
pub const KILL_GRACE_MS: u64 = 5_000;
/// How long output is still read after a command's main process exited
/// (background children may hold its output open forever).
pub const DRAIN_MS: u64 = 500;

/// The answer to `spawn`, `kill` and `status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    /// Whether the request was carried out.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `spawn`: the command had been started before.
    #[serde(default)]
    pub existing: bool,
    /// `status`: the protocol version.
    #[serde(default)]
    pub version: u32,
    /// `status`: the last sequence number written.
    #[serde(default)]
    pub last_seq: u64,
    /// `status`: commands still running.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub running: Vec<String>,
}

/// Which output stream.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One journal line. Sequence numbers start at 1 and have no gaps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Entry {
    /// Command `id` started as process (and process group) `pid`.
    Started {
        /// Sequence number.
        seq: u64,
        /// The command.
        id: String,
        /// Its process id inside the sandbox.
        pid: u32,
    },
    /// What was written to command `id`'s stdin.
    Input {
        /// Sequence number.
        seq: u64,
        /// The command.
        id: String,
        /// The text (lossy UTF-8).
        text: String,
    },
    /// Output of command `id`. Text is cut at character boundaries;
    /// bytes that are not UTF-8 become U+FFFD.
    Output {
        /// Sequence number.
        seq: u64,
        /// The command.
        id: String,
        /// Which stream.
        stream: Stream,
        /// The text.
        text: String,
    },
    /// Command `id` ended.
    Exited {
        /// Sequence number.
        seq: u64,
        /// The command.
        id: String,
        /// Exit code when it exited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
        /// Signal when a signal ended it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        /// Whether its timeout killed it.
        #[serde(default)]
        timed_out: bool,
        /// It could not be started: why.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

impl Entry {
    /// The entry's sequence number.
    pub fn seq(&self) -> u64 {
        match self {
            Entry::Started { seq, .. }
            | Entry::Input { seq, .. }
            | Entry::Output { seq, .. }
            | Entry::Exited { seq, .. } => *seq,
        }
    }

    /// The command it belongs to.
    pub fn id(&self) -> &str {
        match self {
            Entry::Started { id, .. }
            | Entry::Input { id, .. }
            | Entry::Output { id, .. }
            | Entry::Exited { id, .. } => id,
        }
    }
}

/// How a command ended, as the caller sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Exit code; for a signal, 128 + the signal's number (as a shell
    /// reports it); 124 when its timeout killed it.
    pub code: i64,
    /// Whether its timeout killed it.
    pub timed_out: bool,
    /// It could not be started: why.
    pub error: Option<String>,
}

impl Exit {
    /// From an `exited` entry's fields.
    pub fn from_entry(
        code: Option<i32>,
        signal: Option<i32>,
        timed_out: bool,
        error: Option<String>,
    ) -> Exit {
        let code = if timed_out {
            124
        } else {
            match (code, signal) {
                (Some(c), _) => i64::from(c),
                (None, Some(s)) => 128 + i64::from(s),
                (None, None) => 127,
            }
        };
        Exit {
            code,
            timed_out,
            error,
        }
    }
}
