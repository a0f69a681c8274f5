//! Sandboxes: the isolated computer of one attempt.
//!
//! [`SandboxDriver`] is the interface every backend implements (create,
//! exec with streamed output, copy files in and out, destroy, list by
//! label); [`docker::DockerDriver`] is the first backend. [`image`] builds
//! the default image without any registry.
//!
//! Architecture invariant: drivers know nothing about tasks, agents or the
//! store. They receive labels and limits and return what happened; policy
//! (who may run what) lives above them.

pub mod docker;
pub mod image;
pub mod process;
pub mod tarball;

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;

/// Label keys every backshift sandbox carries.
pub mod labels {
    /// Present (value `true`) on every sandbox backshift created.
    pub const MANAGED: &str = "dev.backshift.managed";
    /// The server instance (data directory) that owns the sandbox.
    pub const INSTANCE: &str = "dev.backshift.instance";
    /// The task the sandbox serves.
    pub const TASK: &str = "dev.backshift.task";
    /// The attempt the sandbox serves.
    pub const ATTEMPT: &str = "dev.backshift.attempt";
    /// The host directory of the sandbox's shim (socket and journal).
    pub const SHIM_DIR: &str = "dev.backshift.shim-dir";
    /// What the sandbox is for: `agent` (the attempt's own) or `verify`.
    pub const ROLE: &str = "dev.backshift.role";
}

/// A sandbox's id within its driver.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SandboxId(pub String);

impl std::fmt::Display for SandboxId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Resource limits applied to a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    /// Memory limit in bytes (no swap beyond it).
    pub memory_bytes: i64,
    /// CPU limit in billionths of a CPU (1.5 CPUs = 1_500_000_000).
    pub nano_cpus: i64,
    /// Maximum number of processes and threads.
    pub pids: i64,
    /// Disk limit of the sandbox's writable layer, bytes, where the
    /// storage driver supports one (overlay2 on xfs with project quotas).
    pub disk_bytes: Option<u64>,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            memory_bytes: 2 * 1024 * 1024 * 1024,
            nano_cpus: 1_000_000_000,
            pids: 512,
            disk_bytes: None,
        }
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Image reference.
    pub image: String,
    /// A readable name prefix (the driver adds a unique suffix).
    pub name: String,
    /// Labels (see [`labels`]).
    pub labels: BTreeMap<String, String>,
    /// Resource limits.
    pub limits: ResourceLimits,
    /// `uid:gid` the sandbox's processes run as. Never root.
    pub user: String,
    /// Default working directory.
    pub workdir: String,
    /// Environment of every process.
    pub env: Vec<(String, String)>,
    /// Host paths bound into the sandbox: only backshift's own (its binary,
    /// read-only, and the shim's directory).
    pub mounts: Vec<Mount>,
    /// The sandbox's main process (default: one that idles).
    pub command: Option<Vec<String>>,
}

/// A host path bound into a sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The path on the host.
    pub host: std::path::PathBuf,
    /// Where it appears in the sandbox.
    pub target: String,
    /// Whether the sandbox may not write to it.
    pub read_only: bool,
}

/// A command to run inside a sandbox.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    /// Program and arguments (no shell is implied).
    pub argv: Vec<String>,
    /// `uid:gid` or user name; the sandbox's user when `None`.
    pub user: Option<String>,
    /// Working directory; the sandbox's when `None`.
    pub workdir: Option<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Bytes written to the command's stdin, which is then closed.
    pub stdin: Option<Bytes>,
}

impl ExecSpec {
    /// A command from its argv.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecSpec {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// A piece of a command's output, in the order it was produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputChunk {
    /// From stdout.
    Stdout(Bytes),
    /// From stderr.
    Stderr(Bytes),
}

/// A command's collected output.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    /// Exit code.
    pub exit_code: i64,
    /// All of stdout.
    pub stdout: Vec<u8>,
    /// All of stderr.
    pub stderr: Vec<u8>,
}

/// A sandbox as listed by the driver.
#[derive(Debug, Clone)]
pub struct SandboxInfo {
    /// Its id.
    pub id: SandboxId,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Whether it is alive: running, or paused for a moment (a snapshot).
    pub running: bool,
}

/// What a sandbox uses now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SandboxUsage {
    /// Alive (running, or paused for a moment).
    pub running: bool,
    /// CPU, percent of one CPU, over the last second (`None` when the
    /// backend has no earlier sample yet).
    pub cpu_percent: Option<f64>,
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// Its memory limit, bytes.
    pub memory_limit_bytes: u64,
    /// Processes and threads.
    pub pids: u64,
    /// Bytes written to its filesystem (its writable layer).
    pub disk_bytes: Option<u64>,
    /// Its disk limit, when one is applied.
    pub disk_limit_bytes: Option<u64>,
}

/// What can go wrong in a driver.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The driver's backend (the Docker daemon) cannot be reached.
    #[error("cannot reach the Docker daemon: {0}")]
    Unreachable(String),
    /// The image does not exist where the driver looks for it.
    #[error("image {0} does not exist on this Docker host")]
    ImageMissing(String),
    /// The sandbox does not exist (any more).
    #[error("sandbox {0} does not exist")]
    NotFound(String),
    /// The backend refused or failed an operation.
    #[error("{op} failed: {message}")]
    Backend {
        /// What was attempted.
        op: &'static str,
        /// What the backend said.
        message: String,
    },
    /// A disk limit was asked for, and the storage driver cannot apply one
    /// (the message is the backend's).
    #[error("a disk limit cannot be applied here: {0}")]
    DiskLimitUnsupported(String),
    /// Local I/O failed (building or reading a tar stream).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Result alias for driver operations.
pub type Result<T> = std::result::Result<T, SandboxError>;

/// The interface every sandbox backend implements. One conformance suite
/// (`tests/conformance.rs`, with `tests/docker_driver.rs`) runs against
/// each implementation.
#[async_trait]
pub trait SandboxDriver: Send + Sync {
    /// The driver's name (`docker`).
    fn name(&self) -> &'static str;

    /// Creates and starts a sandbox; it is ready for `exec` when this
    /// returns.
    async fn create(&self, spec: &SandboxSpec) -> Result<SandboxId>;

    /// Runs a command to completion, handing each output chunk to
    /// `on_output` as it arrives, and returns its exit code. Dropping the
    /// future stops reading but does not kill the command: callers that
    /// need a deadline run it under their own process group and kill that.
    async fn exec(
        &self,
        id: &SandboxId,
        spec: &ExecSpec,
        on_output: &mut (dyn FnMut(OutputChunk) + Send),
    ) -> Result<i64>;

    /// Extracts a tar archive into directory `dest` of the sandbox. Owners
    /// and modes come from the archive's headers.
    async fn copy_in(&self, id: &SandboxId, dest: &str, tar: Bytes) -> Result<()>;

    /// A tar archive of `path` (a file or directory) in the sandbox.
    async fn copy_out(&self, id: &SandboxId, path: &str) -> Result<Bytes>;

    /// Stops and removes the sandbox and its storage. Removing one that is
    /// already gone is not an error.
    async fn destroy(&self, id: &SandboxId) -> Result<()>;

    /// Sandboxes carrying all of `labels`.
    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<SandboxInfo>>;

    /// Saves the sandbox's filesystem (not its processes, not its mounts)
    /// as an image named `reference` carrying `labels`, from which
    /// [`SandboxDriver::create`] can start a sandbox. `Ok(false)` when the
    /// driver cannot.
    async fn snapshot(
        &self,
        _id: &SandboxId,
        _reference: &str,
        _labels: &BTreeMap<String, String>,
    ) -> Result<bool> {
        Ok(false)
    }

    /// Removes a snapshot; one already gone is not an error.
    async fn remove_snapshot(&self, _reference: &str) -> Result<()> {
        Ok(())
    }

    /// Snapshots carrying all of `labels`, by reference.
    async fn list_snapshots(
        &self,
        _labels: &[(&str, &str)],
    ) -> Result<Vec<(String, BTreeMap<String, String>)>> {
        Ok(Vec::new())
    }

    /// What the sandbox uses now (CPU, memory, processes, disk).
    async fn usage(&self, id: &SandboxId) -> Result<SandboxUsage>;

    /// Stops the sandbox: its processes end, its filesystem is kept. It
    /// is still listed (not running) until destroyed.
    async fn stop(&self, id: &SandboxId) -> Result<()>;

    /// Starts a stopped sandbox again with its files as they were; its
    /// main process (the shim) starts afresh.
    async fn resume(&self, id: &SandboxId) -> Result<()>;

    /// Runs a command and collects its output.
    async fn exec_collect(&self, id: &SandboxId, spec: &ExecSpec) -> Result<ExecOutput> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let exit_code = self
            .exec(id, spec, &mut |chunk| match chunk {
                OutputChunk::Stdout(b) => stdout.extend_from_slice(&b),
                OutputChunk::Stderr(b) => stderr.extend_from_slice(&b),
            })
            .await?;
        Ok(ExecOutput {
            exit_code,
            stdout,
            stderr,
        })
    }
}
