//! `backshift`: the server (`serve`) and the CLI that talks to it.

mod client;
mod commands;
mod credentials;
mod render;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "backshift",
    version,
    about = "A self-hosted runtime for background coding agents"
)]
struct Cli {
    /// The server's URL.
    #[arg(
        long,
        global = true,
        env = "BACKSHIFT_URL",
        default_value = "http://127.0.0.1:7777"
    )]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: API, event streams and the supervisor.
    Serve {
        /// Config file (TOML); every key can also be set as BACKSHIFT_<SECTION>__<KEY>.
        #[arg(long, env = "BACKSHIFT_CONFIG")]
        config: Option<PathBuf>,
        /// Address to listen on (overrides the config).
        #[arg(long)]
        listen: Option<String>,
        /// Data directory (overrides the config).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Hand a task to backshift.
    Run {
        /// What the agent should do.
        prompt: String,
        /// Repository: a local path or a git URL.
        #[arg(long, default_value = ".")]
        repo: String,
        /// Branch, tag or commit to start from (default: HEAD).
        #[arg(long)]
        base: Option<String>,
        /// Agent: builtin (the default), command, or an installed agent
        /// (opencode; see `backshift agents ls`).
        #[arg(long)]
        agent: Option<String>,
        /// A bash script to run in the checkout as the whole agent (the
        /// command agent); the prompt is in $BACKSHIFT_PROMPT.
        #[arg(long)]
        command: Option<String>,
        /// Model turns before the agent is stopped (for installed agents:
        /// tool calls).
        #[arg(long)]
        max_turns: Option<u32>,
        /// Wall-time limit in seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Model tokens (input + output) before the agent is stopped.
        #[arg(long)]
        max_tokens: Option<u64>,
        /// The command that verifies the work (e.g. "pytest -q"), run by
        /// backshift in a fresh sandbox on the agent's commit; overrides
        /// the repository's backshift.toml and the server's [verify].
        #[arg(long)]
        verify: Option<String>,
        /// Times the agent may work on the task when verification fails
        /// (each failure gives it the report and another iteration).
        #[arg(long)]
        max_iterations: Option<u32>,
        /// Attempts to run side by side, each in its own sandbox on its
        /// own branch; the best is chosen when all have ended
        /// (`backshift compare`, `backshift pick`).
        #[arg(long)]
        attempts: Option<u32>,
        /// One agent per attempt, in turn (e.g. builtin,opencode).
        #[arg(long, value_delimiter = ',')]
        agents: Option<Vec<String>>,
        /// Follow the events until the task ends; exit 0 only if it succeeded.
        #[arg(long, short)]
        follow: bool,
    },
    /// List tasks.
    Ls,
    /// Show a task (or attempt).
    Show {
        /// Task or attempt id.
        id: String,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// A task's attempts side by side, best first, with the evidence
    /// they are ranked by.
    Compare {
        /// Task id.
        id: String,
    },
    /// Choose the attempt that is the task's result (over the automatic
    /// choice).
    Pick {
        /// Task id.
        id: String,
        /// The attempt: its number (2) or id (TASK-2).
        attempt: String,
    },
    /// Deliver a task's result again: its branch pushed to the
    /// repository's forge and the pull request opened (after fixing what
    /// made the delivery fail).
    Deliver {
        /// Task id.
        id: String,
    },
    /// Show a task's events.
    Logs {
        /// Task or attempt id.
        id: String,
        /// Keep following new events until the attempt ends.
        #[arg(long, short)]
        follow: bool,
        /// Print raw JSON events, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Print the change an attempt made.
    Diff {
        /// Task or attempt id.
        id: String,
    },
    /// Fetch an attempt's branch into a local clone and switch to it.
    Checkout {
        /// Task or attempt id.
        id: String,
        /// The local clone (default: the current directory).
        #[arg(long, default_value = ".")]
        repo: PathBuf,
        /// Only fetch the branch; do not switch to it.
        #[arg(long)]
        no_switch: bool,
    },
    /// Cancel a task.
    Cancel {
        /// Task id.
        id: String,
    },
    /// Stop a task's sandbox, its files kept, until `backshift resume`:
    /// the agent stops, what runs in the sandbox ends, and the wall-time
    /// clock stops.
    Pause {
        /// Task id (its running attempts) or attempt id (TASK-N).
        id: String,
    },
    /// Start a paused task's sandbox again; the agent goes on from its
    /// last completed step.
    Resume {
        /// Task id (its paused attempts) or attempt id (TASK-N).
        id: String,
    },
    /// List approvals: what agents are waiting for a person to decide.
    Approvals {
        /// Also the answered and expired ones.
        #[arg(long)]
        all: bool,
    },
    /// Approve a pending request; what waits for it goes on at once.
    Approve {
        /// Approval id (from `backshift approvals` or `backshift logs`).
        id: String,
        /// How far it reaches: this request (once), the same request from
        /// this task's attempts (task), or from any task of the project
        /// from now on (project).
        #[arg(long = "for", value_enum, default_value = "once")]
        scope: ScopeArg,
        /// Why (kept on the record).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Deny a pending request; the agent is told why.
    Deny {
        /// Approval id.
        id: String,
        /// Why (kept on the record and told to the agent).
        #[arg(long)]
        reason: Option<String>,
    },
    /// List this server's sandboxes with what each uses now (CPU, memory,
    /// processes, disk).
    Sandboxes,
    /// Show the warm pool: sandboxes made ahead of demand, per
    /// environment, and how often a task found one ready.
    Pool,
    /// List projects (one per repository) with their egress rules.
    Projects,
    /// Show or change a project's own egress rules (decided before the
    /// server's; deny wins over ask, ask over allow).
    Egress {
        /// Project id, or its repository (a path or URL as tasks name it).
        project: String,
        /// Add a rule: "ACTION HOST[:PORT,...] [METHOD,...] [/PATH_PREFIX]",
        /// e.g. "allow *.pythonhosted.org:443" or "ask api.example.com GET /v1/".
        #[arg(long)]
        add: Vec<String>,
        /// Remove rule N (as numbered in the listing).
        #[arg(long)]
        remove: Vec<usize>,
        /// Remove every rule first.
        #[arg(long)]
        clear: bool,
    },
    /// Give a project's sandboxes a Docker engine of their own (or take it
    /// away): a privileged `dockerd` per sandbox, never the host's socket.
    /// Read the README's risks first.
    Docker {
        /// Project id, or its repository (a path or URL as tasks name it).
        project: String,
        /// on or off.
        #[arg(value_parser = ["on", "off"])]
        setting: String,
    },
    /// Secrets: sealed at rest, granted to projects, never shown again.
    Secrets {
        #[command(subcommand)]
        command: SecretsCommand,
    },
    /// API tokens: list, make (shown once), revoke.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// The audit log: every API mutation and policy decision, in order.
    Audit {
        #[command(subcommand)]
        command: Option<AuditCommand>,
        /// Entries after this seq.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// One JSON object per line (an export).
        #[arg(long)]
        jsonl: bool,
    },
    /// Manage sandbox images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Install and list agents (on this host, for the server using its
    /// data directory).
    Agents {
        #[command(subcommand)]
        command: AgentsCommand,
    },
    /// Run as a sandbox's shim (started by backshift inside each sandbox).
    #[command(hide = true)]
    Shim {
        /// The shim's directory: its socket and journal.
        #[arg(long, default_value = backshift_shim::proto::SANDBOX_DIR)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokensCommand {
    /// List the tokens by name.
    Ls,
    /// Make a token; its value is printed once and kept nowhere.
    Create {
        /// Its name (e.g. ci, alice-laptop).
        name: String,
    },
    /// Revoke a token: requests carrying it are refused from now on.
    Revoke {
        /// Its name.
        name: String,
    },
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Set a secret; the value is read from stdin (never from the command
    /// line, where other users and shell history see it).
    Set {
        /// Its name.
        name: String,
        /// Read the value from this environment variable instead.
        #[arg(long)]
        from_env: Option<String>,
    },
    /// List secrets and their grants (never values).
    Ls,
    /// Delete a secret and its grants.
    Rm {
        /// Its name.
        name: String,
    },
    /// Give a project's sandboxes a secret as an environment variable.
    Grant {
        /// The secret.
        name: String,
        /// Project id, or its repository.
        project: String,
        /// The variable.
        #[arg(long = "as")]
        var: String,
        /// For the setup phase only: the devcontainer's postCreateCommand
        /// gets it, the agent never does.
        #[arg(long)]
        setup_only: bool,
    },
    /// Take a grant back.
    Revoke {
        /// The secret.
        name: String,
        /// Project id, or its repository.
        project: String,
    },
    /// Re-seal every secret with the current key (see README: rotation).
    Rotate,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain: exits 1 if a row was edited, inserted or deleted.
    Verify,
}

/// `approve --for`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ScopeArg {
    /// This request only.
    Once,
    /// The same request from this task's attempts.
    Task,
    /// The same request from any task of the project.
    Project,
}

impl From<ScopeArg> for backshift_protocol::Scope {
    fn from(s: ScopeArg) -> Self {
        match s {
            ScopeArg::Once => backshift_protocol::Scope::Once,
            ScopeArg::Task => backshift_protocol::Scope::Task,
            ScopeArg::Project => backshift_protocol::Scope::Project,
        }
    }
}

#[derive(Subcommand)]
enum AgentsCommand {
    /// Install an agent from npm (opencode, claude-code, codex, gemini),
    /// with the Node runtime it needs, for every sandbox of this host.
    Install {
        /// NAME or NAME@VERSION (a version, range or npm tag; default: latest).
        spec: String,
        #[command(flatten)]
        place: AgentsPlace,
    },
    /// List the installed agents.
    Ls {
        #[command(flatten)]
        place: AgentsPlace,
    },
}

/// Where the agents directory is: the server's configuration decides.
#[derive(clap::Args)]
struct AgentsPlace {
    /// The server's config file (its `agents_dir` or `data_dir`).
    #[arg(long, env = "BACKSHIFT_CONFIG")]
    config: Option<PathBuf>,
    /// The server's data directory (overrides the config).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the default sandbox image without a registry (debootstrap + import; needs root).
    Bootstrap {
        /// Debian mirror (default: the one in this host's apt sources).
        #[arg(long)]
        mirror: Option<String>,
        /// Rebuild even if the image exists.
        #[arg(long)]
        force: bool,
        /// The engine image instead (the default image and Debian's
        /// Docker engine), for projects whose sandboxes have their own
        /// Docker.
        #[arg(long)]
        engine: bool,
    },
    /// Pull an image from its registry, with progress (for `[sandbox] image`).
    Pull {
        /// Image reference, e.g. registry.example:5000/team/sandbox:v3.
        reference: String,
    },
    /// Print the default image's tag.
    Tag {
        /// The engine image's instead.
        #[arg(long)]
        engine: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Command::Shim { dir } = &cli.command {
        std::process::exit(shim(dir));
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(commands::dispatch(cli));
    std::process::exit(code);
}

/// The shim: a single-threaded runtime (it runs in every sandbox, under
/// the sandbox's process limit).
fn shim(dir: &std::path::Path) -> i32 {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("backshift shim: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match runtime.block_on(backshift_shim::server::serve(dir)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("backshift shim: {e} (directory {})", dir.display());
            1
        }
    }
}
