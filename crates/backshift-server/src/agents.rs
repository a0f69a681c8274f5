//! Agents installed once per host: `backshift agents install NAME[@VERSION]`
//! installs an agent's npm package (and, for agents that run on Node, a
//! Node runtime from npm too) into `<agents_dir>/<name>/<version>`, with a
//! manifest; `<agents_dir>/<name>/current` names the version in use. Every
//! installed agent is mounted read-only into glibc-based sandboxes at
//! `/.backshift/agents/<name>`, its commands (and `node`) on the PATH of
//! what the agent runs. npm is the host's, with the host's registry
//! configuration.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Stdio;

/// How to install one agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipe {
    /// The name users give (`opencode`).
    pub name: &'static str,
    /// Its npm package.
    pub package: &'static str,
    /// The command the package installs.
    pub bin: &'static str,
    /// Whether it runs on Node (a runtime is installed with it).
    pub node: bool,
    /// Arguments that make it speak ACP over stdio.
    pub acp_args: &'static [&'static str],
}

/// The agents backshift knows how to install.
pub const RECIPES: &[Recipe] = &[
    Recipe {
        name: "opencode",
        package: "opencode-ai",
        bin: "opencode",
        node: false,
        acp_args: &["acp"],
    },
    Recipe {
        name: "claude-code",
        package: "@zed-industries/claude-code-acp",
        bin: "claude-code-acp",
        node: true,
        acp_args: &[],
    },
    Recipe {
        name: "codex",
        package: "@zed-industries/codex-acp",
        bin: "codex-acp",
        node: true,
        acp_args: &[],
    },
    Recipe {
        name: "gemini",
        package: "@google/gemini-cli",
        bin: "gemini",
        node: true,
        acp_args: &["--experimental-acp"],
    },
];

/// The Node major version installed for agents that need one.
pub const NODE_MAJOR: u32 = 22;

/// Where installed agents appear inside a sandbox.
pub const SANDBOX_AGENTS: &str = "/.backshift/agents";

/// What `install` wrote next to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Agent name.
    pub name: String,
    /// npm package.
    pub package: String,
    /// Installed version.
    pub version: String,
    /// The Node runtime's version, when it has one.
    pub node: Option<String>,
    /// Its command.
    pub bin: String,
    /// When it was installed (unix ms).
    pub installed_at: i64,
}

const MANIFEST: &str = "backshift-agent.json";

/// An installed agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// What was installed.
    pub manifest: Manifest,
    /// Its directory on the host.
    pub dir: PathBuf,
}

impl Installed {
    /// Its directory inside a sandbox.
    pub fn sandbox_dir(&self) -> String {
        format!("{SANDBOX_AGENTS}/{}", self.manifest.name)
    }

    /// The directory inside a sandbox that holds its commands (and `node`).
    pub fn sandbox_bin_dir(&self) -> String {
        format!("{}/node_modules/.bin", self.sandbox_dir())
    }
}

/// `NAME` or `NAME@VERSION` (a version or an npm range/tag).
pub fn parse_spec(spec: &str) -> Result<(Recipe, Option<String>), String> {
    let (name, version) = match spec.split_once('@') {
        Some((n, v)) if !v.is_empty() => (n, Some(v.to_owned())),
        Some((n, _)) => (n, None),
        None => (spec, None),
    };
    let known = || {
        RECIPES
            .iter()
            .map(|r| r.name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if name == "builtin" {
        return Err("the built-in agent needs no installation".into());
    }
    RECIPES
        .iter()
        .find(|r| r.name == name)
        .map(|r| (*r, version))
        .ok_or_else(|| format!("unknown agent {name:?}; installable: {}", known()))
}

/// The recipe of agent `name`.
pub fn recipe(name: &str) -> Option<Recipe> {
    RECIPES.iter().find(|r| r.name == name).copied()
}

/// The installed agent `name`, if it is.
pub fn find_installed(agents_dir: &Path, name: &str) -> Option<Installed> {
    installed(agents_dir)
        .into_iter()
        .find(|a| a.manifest.name == name)
}

/// Why agent `name` cannot run tasks on this server, if it cannot, and
/// what to do about it.
pub fn not_runnable(config: &crate::config::Config, name: &str) -> Option<(String, String)> {
    let recipe = recipe(name)?;
    let agents_dir = config.agents_dir();
    if find_installed(&agents_dir, name).is_none() {
        return Some((
            format!(
                "{name} is not installed on this server (agents live in {})",
                agents_dir.display()
            ),
            format!("run `backshift agents install {name}` on the server's host"),
        ));
    }
    match recipe.name {
        "opencode" | "codex" if config.model.base_url.is_none() => Some((
            format!("{name} speaks the OpenAI API, and no model is configured for the model gateway"),
            "set [model] base_url (and api_key_env) in the server's config".into(),
        )),
        "opencode" | "codex" => None,
        "claude-code" if config.model.anthropic_base_url.is_none() => Some((
            "claude-code speaks the Anthropic messages API, and no Anthropic endpoint is configured for the model gateway".into(),
            "set [model] anthropic_base_url (with anthropic_model and anthropic_api_key_env) in the server's config".into(),
        )),
        "claude-code" => None,
        "gemini" if config.model.gemini_base_url.is_none() => Some((
            "gemini speaks the Gemini API, and no Gemini endpoint is configured for the model gateway".into(),
            "set [model] gemini_base_url (with gemini_model and gemini_api_key_env) in the server's config".into(),
        )),
        _ => None,
    }
}

/// Where an agent's per-attempt configuration is written in the shim
/// directory (the sandbox sees it under `/.backshift/run`).
pub const CONFIG_FILE: &str = "agent-config.json";

/// What an attempt tells an agent about where it runs.
#[derive(Debug, Clone)]
pub struct AgentSetup<'a> {
    /// The model's name at the gateway.
    pub model: &'a str,
    /// The model Anthropic-API calls go to.
    pub anthropic_model: &'a str,
    /// The model Gemini-API calls go to.
    pub gemini_model: &'a str,
    /// Tools the agent must ask permission for.
    pub ask: &'a [String],
}

/// An agent's command line in the sandbox and the environment it adds.
pub type Command = (Vec<String>, Vec<(String, String)>);

/// How to run installed agent `agent` for an attempt: program, arguments
/// and environment, with its configuration written to `shim_dir`. The
/// configuration names the gateway and its token through the sandbox's
/// environment (`OPENAI_BASE_URL`, `OPENAI_API_KEY`), never by value, and
/// turns off everything that would reach out (updates, sharing, model
/// catalogues, LSP downloads).
pub fn launch(
    agent: &Installed,
    shim_dir: &Path,
    setup: &AgentSetup<'_>,
) -> std::io::Result<Command> {
    let Some(recipe) = recipe(&agent.manifest.name) else {
        return Err(std::io::Error::other(format!(
            "no recipe for {}",
            agent.manifest.name
        )));
    };
    let bin = format!("{}/{}", agent.sandbox_bin_dir(), recipe.bin);
    let mut argv = vec![bin];
    argv.extend(recipe.acp_args.iter().map(|a| (*a).to_owned()));
    let config_in_sandbox = format!("{}/{CONFIG_FILE}", backshift_shim::proto::SANDBOX_DIR);
    match recipe.name {
        "opencode" => {
            let config = opencode_config(setup);
            write_config(&shim_dir.join(CONFIG_FILE), &config)?;
            let env = [
                ("OPENCODE_CONFIG", config_in_sandbox.as_str()),
                ("OPENCODE_DISABLE_AUTOUPDATE", "true"),
                ("OPENCODE_DISABLE_MODELS_FETCH", "true"),
                ("OPENCODE_DISABLE_LSP_DOWNLOAD", "true"),
                ("OPENCODE_DISABLE_SHARE", "true"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            Ok((argv, env))
        }
        "codex" => {
            for (key, value) in codex_overrides(setup) {
                argv.push("-c".into());
                argv.push(format!("{key}={value}"));
            }
            Ok((argv, Vec::new()))
        }
        "claude-code" => {
            // `ANTHROPIC_BASE_URL` and `ANTHROPIC_API_KEY` (the gateway
            // and the sandbox's token) are in the sandbox's environment.
            let env = [
                ("ANTHROPIC_MODEL", setup.anthropic_model),
                ("ANTHROPIC_DEFAULT_HAIKU_MODEL", setup.anthropic_model),
                ("DISABLE_TELEMETRY", "1"),
                ("DISABLE_ERROR_REPORTING", "1"),
                ("DISABLE_AUTOUPDATER", "1"),
                ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            Ok((argv, env))
        }
        "gemini" => {
            write_config(&shim_dir.join(CONFIG_FILE), &gemini_settings())?;
            // `GOOGLE_GEMINI_BASE_URL` and `GEMINI_API_KEY` (the gateway
            // and the sandbox's token) are in the sandbox's environment.
            let env = [
                ("GEMINI_MODEL", setup.gemini_model),
                (
                    "GEMINI_CLI_SYSTEM_SETTINGS_PATH",
                    config_in_sandbox.as_str(),
                ),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
            Ok((argv, env))
        }
        other => Err(std::io::Error::other(format!(
            "backshift cannot run {other} yet"
        ))),
    }
}

/// Codex's configuration, as `-c key=value` overrides (values in TOML):
/// one provider, the gateway's responses API, with the sandbox's token
/// from `OPENAI_API_KEY`; no approvals unless some are asked for (the
/// sandbox is the fence, so Codex's own sandbox is off), no update
/// checks.
fn codex_overrides(setup: &AgentSetup<'_>) -> Vec<(&'static str, String)> {
    let quoted = |s: &str| serde_json::Value::from(s).to_string();
    vec![
        ("model", quoted(setup.model)),
        ("model_provider", quoted("backshift")),
        (
            "model_providers.backshift.name",
            quoted("backshift model gateway"),
        ),
        (
            "model_providers.backshift.base_url",
            quoted(&crate::gateway::base_url_in_sandbox()),
        ),
        (
            "model_providers.backshift.env_key",
            quoted("OPENAI_API_KEY"),
        ),
        ("model_providers.backshift.wire_api", quoted("responses")),
        (
            "approval_policy",
            quoted(if setup.ask.is_empty() {
                "never"
            } else {
                "untrusted"
            }),
        ),
        ("sandbox_mode", quoted("danger-full-access")),
        ("check_for_update_on_startup", "false".into()),
    ]
}

/// Gemini CLI's system settings (they override the user's): API-key
/// auth, no update checks, usage statistics or telemetry.
fn gemini_settings() -> serde_json::Value {
    serde_json::json!({
        "security": {"auth": {"selectedType": "gemini-api-key"}},
        "general": {"disableAutoUpdate": true, "disableUpdateNag": true},
        "privacy": {"usageStatisticsEnabled": false},
        "telemetry": {"enabled": false},
    })
}

/// OpenCode's configuration: one provider, the gateway, through the
/// OpenAI-compatible adapter bundled with it.
fn opencode_config(setup: &AgentSetup<'_>) -> serde_json::Value {
    let model = setup.model;
    let mut config = serde_json::json!({
        "autoupdate": false,
        "share": "disabled",
        "provider": {
            "backshift": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "backshift model gateway",
                "options": {
                    "baseURL": "{env:OPENAI_BASE_URL}",
                    "apiKey": "{env:OPENAI_API_KEY}",
                },
                "models": { model: { "name": model } },
            }
        },
        "model": format!("backshift/{model}"),
        "small_model": format!("backshift/{model}"),
        "enabled_providers": ["backshift"],
    });
    if !setup.ask.is_empty() {
        config["permission"] = setup
            .ask
            .iter()
            .map(|tool| (tool.clone(), serde_json::Value::from("ask")))
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    config
}

fn write_config(path: &Path, config: &serde_json::Value) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(config)?)?;
    std::fs::rename(tmp, path)
}

/// The current version of every installed agent, by name.
pub fn installed(agents_dir: &Path) -> Vec<Installed> {
    let mut out = Vec::new();
    for recipe in RECIPES {
        let base = agents_dir.join(recipe.name);
        let Ok(version) = std::fs::read_to_string(base.join("current")) else {
            continue;
        };
        let dir = base.join(version.trim());
        let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST)) else {
            continue;
        };
        if let Ok(manifest) = serde_json::from_str::<Manifest>(&text) {
            out.push(Installed { manifest, dir });
        }
    }
    out
}

fn npm() -> std::process::Command {
    let mut cmd = std::process::Command::new("npm");
    cmd.env("NO_UPDATE_NOTIFIER", "1")
        .env("npm_config_fund", "false");
    cmd
}

/// The version npm resolves `package@wanted` to.
fn resolve(package: &str, wanted: &str) -> anyhow::Result<String> {
    let out = npm()
        .args(["view", &format!("{package}@{wanted}"), "version", "--json"])
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run npm ({e}); install Node.js and npm (Debian: apt install npm)"
            )
        })?;
    if !out.status.success() {
        anyhow::bail!(
            "npm cannot find {package}@{wanted}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| anyhow::anyhow!("npm's answer about {package} is not JSON: {e}"))?;
    let version = match v {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Array(a) => a.last().and_then(|x| x.as_str()).map(str::to_owned),
        _ => None,
    };
    version.ok_or_else(|| anyhow::anyhow!("npm knows no version of {package}@{wanted}"))
}

/// npm's name for this host's Node build.
fn node_package() -> anyhow::Result<String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "x64",
        "aarch64" => "arm64",
        other => anyhow::bail!("no Node runtime for agents on {other}"),
    };
    Ok(format!("node-linux-{arch}"))
}

/// Installs `recipe` at `version` (latest when `None`), telling `say`
/// what it does; npm's own output goes to this process's stderr. Returns
/// the installation (the existing one when that version is there).
pub fn install(
    agents_dir: &Path,
    recipe: Recipe,
    version: Option<&str>,
    say: &mut dyn FnMut(&str),
) -> anyhow::Result<Installed> {
    let version = resolve(recipe.package, version.unwrap_or("latest"))?;
    let base = agents_dir.join(recipe.name);
    let dir = base.join(&version);
    if let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST))
        && let Ok(manifest) = serde_json::from_str::<Manifest>(&text)
    {
        say(&format!("{} {version} is already installed", recipe.name));
        write_current(&base, &version)?;
        return Ok(Installed { manifest, dir });
    }
    let mut packages = vec![format!("{}@{version}", recipe.package)];
    let node = if recipe.node {
        let pkg = node_package()?;
        let v = resolve(&pkg, &NODE_MAJOR.to_string())?;
        packages.push(format!("{pkg}@{v}"));
        Some(v)
    } else {
        None
    };
    std::fs::create_dir_all(&base)?;
    let scratch = tempfile::Builder::new()
        .prefix(".installing-")
        .tempdir_in(&base)?;
    say(&format!(
        "installing {} from npm: {}",
        recipe.name,
        packages.join(" ")
    ));
    let status = npm()
        .arg("install")
        .arg("--prefix")
        .arg(scratch.path())
        .args(["--no-audit", "--omit=dev", "--loglevel=warn"])
        .args(&packages)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot run npm ({e}); install Node.js and npm (Debian: apt install npm)"
            )
        })?;
    if !status.success() {
        anyhow::bail!(
            "npm install of {} failed ({status}); see npm's output above",
            packages.join(" ")
        );
    }
    let bin = scratch.path().join("node_modules/.bin").join(recipe.bin);
    if !bin.exists() {
        anyhow::bail!(
            "{} installed no `{}` command (looked for {})",
            recipe.package,
            recipe.bin,
            bin.display()
        );
    }
    let manifest = Manifest {
        name: recipe.name.into(),
        package: recipe.package.into(),
        version: version.clone(),
        node,
        bin: recipe.bin.into(),
        installed_at: backshift_protocol::now_ms(),
    };
    std::fs::write(
        scratch.path().join(MANIFEST),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    let scratch = scratch.keep();
    std::fs::rename(&scratch, &dir)?;
    write_current(&base, &version)?;
    say(&format!(
        "installed {} {version} in {}",
        recipe.name,
        dir.display()
    ));
    Ok(Installed { manifest, dir })
}

fn write_current(base: &Path, version: &str) -> std::io::Result<()> {
    let tmp = base.join(".current.tmp");
    std::fs::write(&tmp, format!("{version}\n"))?;
    std::fs::rename(tmp, base.join("current"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_a_known_agent_and_maybe_a_version() {
        let (r, v) = parse_spec("opencode").unwrap();
        assert_eq!((r.package, v), ("opencode-ai", None));
        let (r, v) = parse_spec("codex@0.16.0").unwrap();
        assert_eq!((r.bin, v.as_deref()), ("codex-acp", Some("0.16.0")));
        assert!(
            parse_spec("vim")
                .unwrap_err()
                .contains("installable: opencode")
        );
        assert!(
            parse_spec("builtin")
                .unwrap_err()
                .contains("no installation")
        );
    }

    #[test]
    fn opencode_is_configured_for_the_gateway_without_secrets() {
        let ask = vec!["bash".to_owned()];
        let c = opencode_config(&AgentSetup {
            model: "gpt-x",
            anthropic_model: "claude-x",
            gemini_model: "gemini-x",
            ask: &ask,
        });
        assert_eq!(c["model"], "backshift/gpt-x");
        assert_eq!(
            c["provider"]["backshift"]["options"]["apiKey"],
            "{env:OPENAI_API_KEY}"
        );
        assert_eq!(c["autoupdate"], false);
        assert_eq!(c["share"], "disabled");
        assert_eq!(c["permission"]["bash"], "ask");
    }

    #[test]
    fn codex_is_pointed_at_the_gateways_responses_api() {
        let o = codex_overrides(&AgentSetup {
            model: "gpt-x",
            anthropic_model: "claude-x",
            gemini_model: "gemini-x",
            ask: &[],
        });
        let get = |k: &str| o.iter().find(|(key, _)| *key == k).unwrap().1.clone();
        assert_eq!(get("model"), "\"gpt-x\"");
        assert_eq!(get("model_providers.backshift.wire_api"), "\"responses\"");
        assert_eq!(
            get("model_providers.backshift.env_key"),
            "\"OPENAI_API_KEY\""
        );
        assert_eq!(get("approval_policy"), "\"never\"");
    }

    #[test]
    fn only_complete_installations_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(installed(dir.path()).is_empty());
        let base = dir.path().join("opencode");
        std::fs::create_dir_all(base.join("1.0.0")).unwrap();
        // A version named current without a manifest (an interrupted
        // install) is not an installation.
        write_current(&base, "1.0.0").unwrap();
        assert!(installed(dir.path()).is_empty());
        let m = Manifest {
            name: "opencode".into(),
            package: "opencode-ai".into(),
            version: "1.0.0".into(),
            node: None,
            bin: "opencode".into(),
            installed_at: 1,
        };
        std::fs::write(
            base.join("1.0.0").join(MANIFEST),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        let found = installed(dir.path());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].manifest, m);
        assert_eq!(
            found[0].sandbox_bin_dir(),
            "/.backshift/agents/opencode/node_modules/.bin"
        );
    }
}
