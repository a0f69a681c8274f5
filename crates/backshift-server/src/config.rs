//! The server's configuration: one TOML file, every key overridable by an
//! environment variable `BACKSHIFT_<SECTION>__<KEY>` (e.g.
//! `BACKSHIFT_MODEL__BASE_URL`, `BACKSHIFT_LISTEN`).

use backshift_core::{Deadlines, Limits};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything the server reads at start-up.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on (`127.0.0.1:7777`; port 0 picks a free one).
    pub listen: String,
    /// Where the database and git store live; the user's data directory
    /// (`~/.local/share/backshift`) when absent.
    pub data_dir: Option<PathBuf>,
    /// Where agents are installed (`backshift agents install`), once per
    /// host; `<data_dir>/agents` when absent.
    pub agents_dir: Option<PathBuf>,
    /// The database: `postgres://USER:PASSWORD@HOST/DB` for PostgreSQL;
    /// SQLite in the data directory when absent.
    pub database_url: Option<String>,
    /// This server's name among replicas sharing one database. When
    /// absent, one is made on first start and kept in the data directory
    /// (stable across restarts, so a restarted server takes its own
    /// attempts back at once). Replicas sharing a data directory need
    /// their own.
    pub replica_id: Option<String>,
    /// How long a replica's lease on an attempt lasts without a heartbeat;
    /// after that another replica takes the attempt over.
    pub lease_secs: u64,
    /// Longest time without a checkpoint while the agent works: a turn
    /// that runs longer (a long build) is checkpointed meanwhile.
    pub checkpoint_every_secs: u64,
    /// Attempts that may be active at once; more wait in `queued`.
    pub max_concurrent_attempts: usize,
    /// Sandbox settings.
    pub sandbox: SandboxConfig,
    /// The model: the built-in agent talks to it, and the gateway
    /// forwards every installed agent's calls to it.
    pub model: ModelSection,
    /// How installed agents (opencode, ...) are run.
    pub agents: AgentsSection,
    /// Default limits of a task.
    pub limits: Limits,
    /// How long an attempt may stay in each active state.
    pub deadlines: Deadlines,
    /// Identity of the commits backshift makes.
    pub git: GitSection,
    /// What sandboxes may reach through the egress proxy.
    pub egress: EgressSection,
    /// Decisions people are asked for.
    pub approvals: ApprovalsSection,
    /// How secrets are sealed.
    pub secrets: SecretsSection,
    /// How backshift verifies an agent's work.
    pub verify: VerifySection,
    /// Where tasks' results are delivered (`[[forges]]`): their branch
    /// pushed to the repository and a pull request opened.
    pub forges: Vec<ForgeConfig>,
    /// Tasks from signed webhooks.
    pub webhooks: WebhooksSection,
}

/// `[webhooks]`: where tasks come from besides the API.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksSection {
    /// `POST /webhooks/github`: labelled issues become tasks, and
    /// `/backshift ...` comments on backshift's pull requests follow-ups.
    pub github: Option<GithubWebhook>,
    /// `POST /webhooks/generic`: a signed JSON task from an internal
    /// system, its outcome posted back to its `callback_url`.
    pub generic: Option<GenericWebhook>,
    /// `POST /webhooks/linear`: Linear issues given the label.
    pub linear: Option<TrackerWebhook>,
    /// `POST /webhooks/jira`: Jira issues given the label.
    pub jira: Option<TrackerWebhook>,
}

/// `[webhooks.linear]` and `[webhooks.jira]`: an issue tracker whose
/// labelled issues become tasks on a repository, with the outcome
/// commented on the issue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackerWebhook {
    /// The webhook's signing secret, from this environment variable...
    #[serde(default)]
    pub secret_env: Option<String>,
    /// ... or this file.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The label that hands an issue to backshift.
    #[serde(default = "default_label")]
    pub label: String,
    /// The repository tasks go to (a URL or an absolute path)...
    #[serde(default)]
    pub repo: Option<String>,
    /// ... or per team (Linear) or project (Jira) key.
    #[serde(default)]
    pub repos: std::collections::BTreeMap<String, String>,
    /// The agent of its tasks (the server's default when absent).
    #[serde(default)]
    pub agent: Option<String>,
    /// Where outcomes are commented: Linear's GraphQL endpoint
    /// (`https://api.linear.app/graphql`) or the Jira site
    /// (`https://acme.atlassian.net`); no comment when absent.
    #[serde(default)]
    pub api_url: Option<String>,
    /// Jira: the account the API token belongs to.
    #[serde(default)]
    pub user_email: Option<String>,
    /// The API key (Linear) or token (Jira), from this variable...
    #[serde(default)]
    pub token_env: Option<String>,
    /// ... or this file.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// How far a delivery's timestamp may be from now (Linear's
    /// `webhookTimestamp`, Jira's `timestamp`).
    #[serde(default = "default_tolerance")]
    pub tolerance_secs: u64,
}

impl TrackerWebhook {
    /// The repository for an issue of team or project `key`.
    pub fn repo_for(&self, key: &str) -> Option<&str> {
        self.repos
            .get(key)
            .or(self.repo.as_ref())
            .map(String::as_str)
    }
}

/// `[webhooks.github]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubWebhook {
    /// The webhook's secret, from this environment variable...
    #[serde(default)]
    pub secret_env: Option<String>,
    /// ... or this file.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// The label that hands an issue to backshift.
    #[serde(default = "default_label")]
    pub label: String,
    /// The agent of tasks from issues (the server's default when absent).
    #[serde(default)]
    pub agent: Option<String>,
}

fn default_label() -> String {
    "backshift".into()
}

/// `[webhooks.generic]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericWebhook {
    /// The shared secret, from this environment variable...
    #[serde(default)]
    pub secret_env: Option<String>,
    /// ... or this file.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// How far a delivery's timestamp may be from now.
    #[serde(default = "default_tolerance")]
    pub tolerance_secs: u64,
}

fn default_tolerance() -> u64 {
    300
}

/// A secret named in the config: from `env` when set, else from `file`;
/// `None` when neither is given.
pub fn secret_from(
    env: Option<&str>,
    file: Option<&Path>,
    what: &str,
) -> Result<Option<String>, String> {
    if let Some(var) = env {
        return match std::env::var(var) {
            Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_owned())),
            _ => Err(format!(
                "{what}: the variable {var} is not set in the server's environment"
            )),
        };
    }
    if let Some(file) = file {
        return std::fs::read_to_string(file)
            .map(|t| Some(t.trim().to_owned()))
            .map_err(|e| format!("{what}: cannot read {}: {e}", file.display()));
    }
    Ok(None)
}

/// `[[forges]]`: a forge whose repositories get their tasks' results as
/// a pushed `backshift/*` branch and (with `kind`) a pull request, with
/// credentials only the control plane holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgeConfig {
    /// Repository URLs starting with this are its own
    /// (`https://github.com/acme/`).
    pub url: String,
    /// `github` or `gitea` to open pull requests; absent: push only.
    #[serde(default)]
    pub kind: Option<backshift_git::forge::ForgeKind>,
    /// Its REST API (`https://api.github.com`, `https://HOST/api/v3`,
    /// `https://HOST/api/v1` for Gitea); needed with `kind`.
    #[serde(default)]
    pub api_url: Option<String>,
    /// The environment variable holding its token (push and API).
    #[serde(default)]
    pub token_env: Option<String>,
    /// A file holding its token (when `token_env` is not set).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Open pull requests as drafts.
    #[serde(default)]
    pub draft: bool,
}

impl ForgeConfig {
    /// Its token, or why there is none.
    pub fn token(&self) -> Result<Option<String>, String> {
        secret_from(
            self.token_env.as_deref(),
            self.token_file.as_deref(),
            &format!("the token of [[forges]] {}", self.url),
        )
    }
}

/// `[verify]`: the verify command of projects whose repository names none
/// (a `[verify]` table in `backshift.toml` at its root) and tasks that
/// give none. It runs in a fresh sandbox made from the attempt's commit;
/// a failure goes back to the agent while `limits.max_iterations` allows.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifySection {
    /// The command (bash), run in the checkout; no verification when
    /// absent.
    pub command: Option<String>,
    /// A JUnit XML or TAP file the command writes, relative to the
    /// checkout; without one, TAP on its standard output is read.
    pub report: Option<String>,
    /// Longest run of the verify command.
    pub timeout_secs: u64,
}

impl Default for VerifySection {
    fn default() -> Self {
        VerifySection {
            command: None,
            report: None,
            timeout_secs: 1800,
        }
    }
}

/// `[secrets]`: the key secrets are sealed with. Without `key_file` or
/// `key_env`, `<data_dir>/secrets.key` (made on first start, mode 0600).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsSection {
    /// A file holding the key (64 hex digits: `openssl rand -hex 32`).
    pub key_file: Option<PathBuf>,
    /// An environment variable holding the key (wins over `key_file`).
    pub key_env: Option<String>,
    /// Earlier keys, still used to open what they sealed (rotation).
    pub previous_key_files: Vec<PathBuf>,
}

/// `[egress]`: the server's egress policy. Sandboxes have no network;
/// their only way out is backshift's proxy, which decides each request by
/// these rules (deny wins over ask, ask over allow; `default` when none
/// matches).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressSection {
    /// What happens to a request no rule matches: `deny` (the default),
    /// `ask` or `allow`.
    pub default: backshift_core::policy::Action,
    /// The rules (`[[egress.rules]]`: `host`, `action`, and optionally
    /// `ports`, `methods`, `path_prefix`).
    pub rules: Vec<backshift_core::policy::Rule>,
    /// More rules for the setup phase only (a devcontainer's
    /// `postCreateCommand` and `postStartCommand`: package registries the
    /// agent itself should not reach).
    pub setup_rules: Vec<backshift_core::policy::Rule>,
    /// The default during the setup phase (`default` when absent).
    pub setup_default: Option<backshift_core::policy::Action>,
    /// Names the proxy resolves to fixed addresses (for it only, like
    /// `/etc/hosts`).
    pub hosts: std::collections::BTreeMap<String, std::net::IpAddr>,
    /// Private networks the proxy may connect to, as CIDRs (loopback,
    /// RFC 1918 and unique-local addresses are refused otherwise, even for
    /// an allowed name; link-local addresses always are).
    pub allow_networks: Vec<ipnet::IpNet>,
}

/// `[approvals]`: decisions people are asked for (egress `ask` rules,
/// agents' permission requests under `agents.permission_policy = "ask"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsSection {
    /// How long a held request waits for an answer before it is denied.
    pub timeout_secs: u64,
}

impl Default for ApprovalsSection {
    fn default() -> Self {
        ApprovalsSection { timeout_secs: 300 }
    }
}

impl Default for EgressSection {
    fn default() -> Self {
        EgressSection {
            default: backshift_core::policy::Action::Deny,
            rules: Vec::new(),
            setup_rules: Vec::new(),
            setup_default: None,
            hosts: Default::default(),
            allow_networks: Vec::new(),
        }
    }
}

impl EgressSection {
    /// The proxy's view of the network.
    pub fn network(&self) -> backshift_egress::Network {
        backshift_egress::Network {
            hosts: self
                .hosts
                .iter()
                .map(|(k, v)| (k.trim_end_matches('.').to_ascii_lowercase(), *v))
                .collect(),
            allow_networks: self.allow_networks.clone(),
        }
    }
}

/// `[agents]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsSection {
    /// How an agent's permission requests are answered: `allow` (the
    /// sandbox is the fence), `deny`, or `ask` (a person decides).
    pub permission_policy: PermissionPolicySetting,
    /// Tools the agent must ask permission for before each use, in the
    /// agent's own names (opencode: `bash`, `edit`, `webfetch`...). Empty:
    /// the agent's own defaults.
    pub ask: Vec<String>,
}

/// `agents.permission_policy`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PermissionPolicySetting {
    /// Allow once.
    #[default]
    Allow,
    /// Reject once.
    Deny,
    /// A person decides through backshift's approvals (`backshift
    /// approve`); denied when nobody does within `approvals.timeout_secs`.
    Ask,
}

/// `[sandbox]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Which sandboxes: `auto` (Docker when it answers at start, else the
    /// process driver), `docker` or `process` (bubblewrap namespaces over
    /// this host's own tools, for hosts without Docker).
    pub driver: DriverSetting,
    /// Image of every sandbox; the bootstrapped default image when absent.
    pub image: Option<String>,
    /// Whether a configured `image` missing on the Docker host is pulled
    /// from its registry (`missing`, the default) or not (`never`, for
    /// hosts whose images are loaded by hand).
    pub pull: PullPolicy,
    /// Memory limit per sandbox, MiB.
    pub memory_mb: i64,
    /// CPU limit per sandbox, in CPUs.
    pub cpus: f64,
    /// Process limit per sandbox.
    pub pids: i64,
    /// Whether checkpoints also save the sandbox's filesystem as an image
    /// (`docker commit`), so that a rebuilt sandbox keeps installed
    /// packages and caches.
    pub snapshots: bool,
    /// At most one snapshot per this many seconds (0: at every
    /// checkpoint). The sandbox is paused while one is taken.
    pub snapshot_every_secs: u64,
    /// Whether a repository's devcontainer.json decides its sandboxes'
    /// image, variables and setup (when it has one).
    pub devcontainer: bool,
    /// Whether the `RUN` steps of a devcontainer's Dockerfile build get a
    /// network. Off by default: the Dockerfile is the repository's, and
    /// the build runs on this host, outside the egress proxy.
    pub build_network: bool,
    /// A PEM file of extra CA certificates every sandbox trusts (an
    /// interception proxy, an internal registry).
    pub ca_certificates: Option<PathBuf>,
    /// Disk limit per sandbox, MiB, where Docker's storage driver can
    /// apply one (overlay2 on xfs with project quotas); where it cannot,
    /// each attempt says so in a warning and runs without.
    pub disk_mb: Option<u64>,
    /// Sandboxes kept ready per environment, made ahead of demand (the
    /// warm pool; 0: off). Each holds its memory while it waits.
    pub warm: usize,
    /// Environments kept warm besides the default one: the ones attempts
    /// asked for most recently (a devcontainer's image, a setup
    /// snapshot).
    pub warm_environments: usize,
    /// Repositories with at least this many files get their checkout as
    /// an image layer, made once per commit from the mirror and shared by
    /// every sandbox on that commit, instead of copied into each sandbox
    /// (0: never). Docker only.
    pub checkout_image_files: usize,
}

/// `[sandbox] driver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverSetting {
    /// Docker when it answers at start, else the process driver.
    #[default]
    Auto,
    /// Docker only.
    Docker,
    /// The process driver only.
    Process,
}

/// When a configured sandbox image is pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    /// Pulled when it is not on the Docker host.
    #[default]
    Missing,
    /// Never pulled.
    Never,
}

/// `[model]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// OpenAI-compatible base URL (up to, not including, `/chat/completions`).
    pub base_url: Option<String>,
    /// Model name.
    pub model: String,
    /// Name of the environment variable holding the API key. The key
    /// itself never goes in the file.
    pub api_key_env: Option<String>,
    /// Retries of a failed request (connection errors, 429, 5xx).
    pub max_retries: u32,
    /// First retry wait, ms; doubles each retry.
    pub retry_base_ms: u64,
    /// Timeout of one request, seconds.
    pub request_timeout_secs: u64,
    /// Maximum output tokens per response, when set.
    pub max_tokens: Option<u32>,
    /// Price of a million input tokens, US dollars (with the output price:
    /// events and attempts show costs).
    pub input_usd_per_mtok: Option<f64>,
    /// Price of a million output tokens, US dollars.
    pub output_usd_per_mtok: Option<f64>,
    /// An Anthropic-compatible endpoint (up to, not including,
    /// `/messages`, e.g. `https://host/v1`), for agents that speak the
    /// Anthropic messages API through the gateway.
    pub anthropic_base_url: Option<String>,
    /// The model Anthropic-API calls go to.
    pub anthropic_model: Option<String>,
    /// Name of the environment variable holding the Anthropic key.
    pub anthropic_api_key_env: Option<String>,
    /// A Gemini-API endpoint (up to, not including, `/v1beta`), for
    /// agents that speak it (Gemini CLI) through the gateway.
    pub gemini_base_url: Option<String>,
    /// The model Gemini-API calls go to.
    pub gemini_model: Option<String>,
    /// Name of the environment variable holding the Gemini key.
    pub gemini_api_key_env: Option<String>,
}

impl ModelSection {
    /// The key in the server's environment variable `var` (named by
    /// config key `key`), when one is named.
    pub fn key_from_env(var: Option<&str>, key: &str) -> Result<Option<String>, String> {
        var.map(|var| {
            std::env::var(var).map_err(|_| {
                format!(
                    "the key variable {var} ([model] {key}) is not set in the server's environment"
                )
            })
        })
        .transpose()
    }

    /// The prices, when both are configured.
    pub fn prices(&self) -> Option<backshift_protocol::Prices> {
        Some(backshift_protocol::Prices {
            input_usd_per_mtok: self.input_usd_per_mtok?,
            output_usd_per_mtok: self.output_usd_per_mtok?,
        })
    }
}

/// `[git]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GitSection {
    /// Author and committer name of backshift's commits.
    pub author_name: String,
    /// Author and committer email.
    pub author_email: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7777".into(),
            data_dir: None,
            agents_dir: None,
            database_url: None,
            replica_id: None,
            lease_secs: 15,
            checkpoint_every_secs: 60,
            max_concurrent_attempts: 4,
            sandbox: SandboxConfig::default(),
            model: ModelSection::default(),
            agents: AgentsSection::default(),
            limits: Limits::default(),
            deadlines: Deadlines::default(),
            git: GitSection::default(),
            egress: EgressSection::default(),
            approvals: ApprovalsSection::default(),
            secrets: SecretsSection::default(),
            verify: VerifySection::default(),
            forges: Vec::new(),
            webhooks: WebhooksSection::default(),
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            driver: DriverSetting::Auto,
            image: None,
            pull: PullPolicy::Missing,
            memory_mb: 2048,
            cpus: 1.0,
            pids: 512,
            snapshots: true,
            snapshot_every_secs: 300,
            devcontainer: true,
            build_network: false,
            ca_certificates: None,
            disk_mb: None,
            warm: 1,
            warm_environments: 3,
            checkout_image_files: 5000,
        }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            base_url: None,
            model: "gpt-4.1".into(),
            api_key_env: None,
            max_retries: 4,
            retry_base_ms: 500,
            request_timeout_secs: 300,
            max_tokens: None,
            anthropic_base_url: None,
            anthropic_model: None,
            anthropic_api_key_env: None,
            gemini_base_url: None,
            gemini_model: None,
            gemini_api_key_env: None,
            input_usd_per_mtok: None,
            output_usd_per_mtok: None,
        }
    }
}

impl Default for GitSection {
    fn default() -> Self {
        GitSection {
            author_name: "backshift".into(),
            author_email: "backshift@localhost".into(),
        }
    }
}

impl Config {
    /// Defaults, then the file (when given; it must exist), then the
    /// environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                anyhow::bail!("config file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed("BACKSHIFT_").split("__").ignore(&[
            "TOKEN",
            "URL",
            "CONFIG_DIR",
            "CONFIG",
            "LOG",
        ]));
        let config: Config = figment
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        for (which, rules) in [
            ("rule", &config.egress.rules),
            ("setup rule", &config.egress.setup_rules),
        ] {
            for (i, rule) in rules.iter().enumerate() {
                rule.check().map_err(|e| {
                    anyhow::anyhow!("invalid configuration: [egress] {which} {}: {e}", i + 1)
                })?;
            }
        }
        for f in &config.forges {
            if f.kind.is_some() && f.api_url.is_none() {
                anyhow::bail!(
                    "invalid configuration: [[forges]] {} has a `kind` but no `api_url` (e.g. https://api.github.com)",
                    f.url
                );
            }
            if f.url.trim().is_empty() {
                anyhow::bail!("invalid configuration: a [[forges]] entry has an empty `url`");
            }
        }
        Ok(config)
    }

    /// The forge that serves `repo` (the longest matching `url`).
    pub fn forge_for(&self, repo: &str) -> Option<&ForgeConfig> {
        self.forges
            .iter()
            .filter(|f| repo.starts_with(f.url.as_str()))
            .max_by_key(|f| f.url.len())
    }

    /// The data directory in effect.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .or_else(|| dirs::data_dir().map(|d| d.join("backshift")))
            .unwrap_or_else(|| PathBuf::from(".backshift"))
    }

    /// The agents directory in effect.
    pub fn agents_dir(&self) -> PathBuf {
        self.agents_dir
            .clone()
            .unwrap_or_else(|| self.data_dir().join("agents"))
    }

    /// The sandbox image in effect.
    pub fn image(&self) -> String {
        self.sandbox
            .image
            .clone()
            .unwrap_or_else(backshift_sandbox::image::default_image_tag)
    }

    /// Whether the image in effect is pulled from its registry when it is
    /// missing. The default image never is: it is built locally.
    pub fn pulls_image(&self) -> bool {
        self.sandbox.image.is_some() && self.sandbox.pull == PullPolicy::Missing
    }

    /// What to do when the image in effect is not on the Docker host.
    pub fn missing_image_fix(&self) -> &'static str {
        match (&self.sandbox.image, self.sandbox.pull) {
            (None, _) => {
                "build it with `backshift image bootstrap` (as root, about a minute), or set [sandbox] image"
            }
            (Some(_), PullPolicy::Missing) => {
                "backshift pulls it at startup and before each task, so check the reference and that its registry is reachable from the Docker host (`backshift image pull IMAGE` shows the registry's answer), or unset [sandbox] image to use the bootstrapped default"
            }
            (Some(_), PullPolicy::Never) => {
                "load or build it on the Docker host (docker load, docker build), set [sandbox] pull = \"missing\" to pull it, or unset [sandbox] image to use the bootstrapped default"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::result_large_err)]
    fn file_then_environment_override_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:1\"\n[model]\nbase_url = \"http://m.invalid/v1\"\n[limits]\nmax_turns = 7\nwall_time_secs = 60\ncommand_timeout_secs = 5\n").unwrap();
        figment::Jail::expect_with(|jail| {
            jail.set_env("BACKSHIFT_MODEL__MODEL", "from-env");
            let c = Config::load(Some(&file)).map_err(|e| e.to_string())?;
            assert_eq!(c.listen, "127.0.0.1:1");
            assert_eq!(c.model.base_url.as_deref(), Some("http://m.invalid/v1"));
            assert_eq!(c.model.model, "from-env");
            assert_eq!(c.limits.max_turns, 7);
            assert_eq!(c.sandbox.memory_mb, 2048);
            Ok(())
        });
    }

    #[test]
    fn a_missing_image_fix_fits_where_the_image_comes_from() {
        let mut c = Config::default();
        assert!(!c.pulls_image(), "the default image is built, not pulled");
        assert!(c.missing_image_fix().contains("backshift image bootstrap"));
        c.sandbox.image = Some("127.0.0.1:5000/team/img:v1".into());
        assert!(c.pulls_image());
        assert!(c.missing_image_fix().contains("backshift image pull"));
        c.sandbox.pull = PullPolicy::Never;
        assert!(!c.pulls_image());
        assert!(c.missing_image_fix().contains("docker load"));
    }

    #[test]
    fn egress_rules_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[egress]\ndefault = \"ask\"\nallow_networks = [\"10.0.0.0/8\"]\nhosts = { \"pkg.invalid\" = \"10.1.2.3\" }\n[[egress.rules]]\nhost = \"*.pkg.invalid\"\nports = [443]\naction = \"allow\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&file)).unwrap();
        assert_eq!(c.egress.default, backshift_core::policy::Action::Ask);
        assert_eq!(c.egress.rules[0].ports, vec![443]);
        assert_eq!(
            c.egress.network().hosts["pkg.invalid"].to_string(),
            "10.1.2.3"
        );
        std::fs::write(
            &file,
            "[[egress.rules]]\nhost = \"a*.invalid\"\naction = \"allow\"\n",
        )
        .unwrap();
        let e = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(
            e.contains("[egress] rule 1") && e.contains("a*.invalid"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "lissten = \"x\"\n").unwrap();
        let e = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(e.contains("lissten"), "{e}");
    }
}
