//! A repository's `devcontainer.json` (JSON with comments and trailing
//! commas), read into what backshift does with it. Fields it does not
//! support are listed in a warning, never silently dropped.

use serde_json::Value;
use std::collections::BTreeMap;

/// Where devcontainer.json is looked for, in order.
pub const LOCATIONS: [&str; 2] = [".devcontainer/devcontainer.json", ".devcontainer.json"];

/// The checkout's path inside the sandbox.
const WORKSPACE: &str = "/workspace";

/// Where the sandbox's image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An image reference.
    Image(String),
    /// A Dockerfile build.
    Build {
        /// The build context, relative to the repository's root (`""`: the
        /// root).
        context: String,
        /// The Dockerfile, relative to the context.
        dockerfile: String,
        /// Build arguments.
        args: BTreeMap<String, String>,
    },
}

/// A lifecycle command: a shell line, an argv, or several run in parallel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lifecycle {
    /// Run with `sh -c` (we use bash when the image has it).
    Shell(String),
    /// Run as it is.
    Argv(Vec<String>),
    /// Named commands, run at once.
    Parallel(BTreeMap<String, Lifecycle>),
}

impl Lifecycle {
    /// As one bash script (parallel parts in the background, waited for;
    /// the script fails if any part does).
    pub fn script(&self) -> String {
        match self {
            Lifecycle::Shell(s) => s.clone(),
            Lifecycle::Argv(argv) => argv
                .iter()
                .map(|a| shell_quote(a))
                .collect::<Vec<_>>()
                .join(" "),
            Lifecycle::Parallel(parts) => {
                let mut s = String::from("pids=()\n");
                for part in parts.values() {
                    s.push_str(&format!("( {} ) &\npids+=($!)\n", part.script()));
                }
                s.push_str("status=0\nfor p in \"${pids[@]}\"; do wait \"$p\" || status=1; done\nexit $status\n");
                s
            }
        }
    }

    fn read(v: &Value, field: &str) -> Result<Lifecycle, String> {
        match v {
            Value::String(s) => Ok(Lifecycle::Shell(s.clone())),
            Value::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("{field}: an array's items must be strings"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Lifecycle::Argv),
            Value::Object(map) => map
                .iter()
                .map(|(k, v)| Ok((k.clone(), Lifecycle::read(v, field)?)))
                .collect::<Result<BTreeMap<_, _>, String>>()
                .map(Lifecycle::Parallel),
            _ => Err(format!("{field} must be a string, an array or an object")),
        }
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What backshift takes from a devcontainer.json.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevContainer {
    /// The image or its build.
    pub source: Source,
    /// Variables of the sandbox (`containerEnv` then `remoteEnv`: backshift
    /// runs everything in the one container environment).
    pub env: Vec<(String, String)>,
    /// Run once after the checkout, in the setup phase.
    pub post_create: Option<Lifecycle>,
    /// Run each time a sandbox starts, after the checkout.
    pub post_start: Option<Lifecycle>,
    /// What is not supported, in sentences (one warning event).
    pub warnings: Vec<String>,
}

/// Fields read (the rest is warned about).
const SUPPORTED: [&str; 10] = [
    "image",
    "build",
    "containerEnv",
    "remoteEnv",
    "remoteUser",
    "containerUser",
    "postCreateCommand",
    "postStartCommand",
    "forwardPorts",
    "workspaceFolder",
];
/// Fields that change nothing here and are not worth a warning.
const IGNORED: [&str; 3] = ["name", "$schema", "customizations"];

/// `path` joined to `base` (both relative to the repository root),
/// normalized; an error when it leaves the repository.
fn join(base: &str, path: &str) -> Result<String, String> {
    let mut parts: Vec<&str> = if path.starts_with('/') {
        Vec::new()
    } else {
        base.split('/').filter(|p| !p.is_empty()).collect()
    };
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(format!("{path} leads out of the repository"));
                }
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

/// Replaces the variables devcontainer.json may use in values; those that
/// would read the host (`${localEnv:...}`) become empty, with a warning.
fn substitute(value: &str, warnings: &mut Vec<String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let var = &rest[start + 2..start + len];
        match var {
            "containerWorkspaceFolder" => out.push_str(WORKSPACE),
            "containerWorkspaceFolderBasename" => out.push_str("workspace"),
            v if v.starts_with("localEnv:") || v.starts_with("localWorkspaceFolder") => {
                warnings.push(format!(
                    "${{{var}}} would read the server's host, which a sandbox never sees: it is left empty"
                ));
            }
            _ => {
                warnings.push(format!("${{{var}}} is not supported: it is left as it is"));
                out.push_str(&rest[start..start + len + 1]);
            }
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

fn env_map(
    v: Option<&Value>,
    field: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<(String, String)>, String> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let map = v
        .as_object()
        .ok_or_else(|| format!("{field} must be an object of strings"))?;
    map.iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => substitute(s, warnings),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            Ok((k.clone(), value))
        })
        .collect()
}

/// Reads devcontainer.json found at `path` (repository-relative).
pub fn parse(text: &str, path: &str) -> Result<DevContainer, String> {
    let value: Value = jsonc_parser::parse_to_serde_value(text, &Default::default())
        .map_err(|e| format!("{path} is not valid JSON with comments: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| format!("{path} must hold an object"))?;
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    let mut warnings = Vec::new();
    let unsupported: Vec<&str> = obj
        .keys()
        .map(String::as_str)
        .filter(|k| !SUPPORTED.contains(k) && !IGNORED.contains(k))
        .collect();
    if !unsupported.is_empty() {
        warnings.push(format!(
            "fields backshift does not support, ignored: {}",
            unsupported.join(", ")
        ));
    }
    let source = match (obj.get("image"), obj.get("build")) {
        (_, Some(build)) => {
            let build = build
                .as_object()
                .ok_or("build must be an object with a dockerfile")?;
            let dockerfile = build
                .get("dockerfile")
                .and_then(Value::as_str)
                .ok_or("build.dockerfile is missing")?;
            let context = join(
                dir,
                build.get("context").and_then(Value::as_str).unwrap_or("."),
            )?;
            let dockerfile = join(dir, dockerfile)?;
            let in_context = if context.is_empty() {
                Some(dockerfile.as_str())
            } else {
                dockerfile.strip_prefix(&format!("{context}/"))
            };
            let Some(in_context) = in_context else {
                return Err(format!(
                    "the Dockerfile {dockerfile} is outside the build context {}; backshift builds with the Dockerfile inside its context",
                    if context.is_empty() {
                        "(the repository)"
                    } else {
                        &context
                    }
                ));
            };
            let mut args = BTreeMap::new();
            if let Some(a) = build.get("args").and_then(Value::as_object) {
                for (k, v) in a {
                    let v = v
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string());
                    args.insert(k.clone(), substitute(&v, &mut warnings));
                }
            }
            let extra: Vec<&str> = build
                .keys()
                .map(String::as_str)
                .filter(|k| !["dockerfile", "context", "args"].contains(k))
                .collect();
            if !extra.is_empty() {
                warnings.push(format!(
                    "build fields backshift does not support, ignored: {}",
                    extra.join(", ")
                ));
            }
            if obj.contains_key("image") {
                warnings.push("both image and build are set: the build is used".into());
            }
            Source::Build {
                dockerfile: in_context.to_owned(),
                context,
                args,
            }
        }
        (Some(Value::String(image)), None) => Source::Image(image.clone()),
        (Some(_), None) => return Err("image must be a string".into()),
        (None, None) => {
            return Err(format!(
                "{path} names neither an image nor a build (Docker Compose files are not supported)"
            ));
        }
    };
    let mut env = env_map(obj.get("containerEnv"), "containerEnv", &mut warnings)?;
    env.extend(env_map(obj.get("remoteEnv"), "remoteEnv", &mut warnings)?);
    for field in ["remoteUser", "containerUser"] {
        if let Some(user) = obj.get(field).and_then(Value::as_str) {
            warnings.push(format!(
                "{field} \"{user}\" is not used: sandboxes always run as uid 1000 (HOME=/home/agent)"
            ));
        }
    }
    if let Some(folder) = obj.get("workspaceFolder").and_then(Value::as_str)
        && folder.trim_end_matches('/') != WORKSPACE
    {
        warnings.push(format!(
            "workspaceFolder \"{folder}\" is not used: the checkout is always at {WORKSPACE}"
        ));
    }
    if obj
        .get("forwardPorts")
        .and_then(Value::as_array)
        .is_some_and(|p| !p.is_empty())
    {
        warnings.push(
            "forwardPorts is not supported: a sandbox has no network, so nothing can reach its ports".into(),
        );
    }
    let post_create = obj
        .get("postCreateCommand")
        .map(|v| Lifecycle::read(v, "postCreateCommand"))
        .transpose()?;
    let post_start = obj
        .get("postStartCommand")
        .map(|v| Lifecycle::read(v, "postStartCommand"))
        .transpose()?;
    Ok(DevContainer {
        source,
        env,
        post_create,
        post_start,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commented_build_config_is_read_with_its_paths_resolved() {
        let text = r#"{
            // The team's image.
            "name": "demo",
            "build": { "dockerfile": "Dockerfile", "context": "..", "args": { "VARIANT": "3" } },
            "containerEnv": { "FOO": "bar", "WS": "${containerWorkspaceFolder}/src" },
            "remoteEnv": { "HOST_HOME": "${localEnv:HOME}" },
            "postCreateCommand": "make setup",
            "postStartCommand": ["echo", "it's up"],
            "features": { "ghcr.io/devcontainers/features/node:1": {} },
            "mounts": [],
            "forwardPorts": [3000],
            "remoteUser": "vscode",
        }"#;
        let d = parse(text, ".devcontainer/devcontainer.json").unwrap();
        assert_eq!(
            d.source,
            Source::Build {
                context: String::new(),
                dockerfile: ".devcontainer/Dockerfile".into(),
                args: BTreeMap::from([("VARIANT".into(), "3".into())]),
            }
        );
        assert_eq!(
            d.env,
            [
                ("FOO".to_owned(), "bar".to_owned()),
                ("WS".to_owned(), "/workspace/src".to_owned()),
                ("HOST_HOME".to_owned(), String::new()),
            ]
        );
        assert_eq!(d.post_create, Some(Lifecycle::Shell("make setup".into())));
        assert_eq!(d.post_start.unwrap().script(), "echo 'it'\\''s up'");
        let w = d.warnings.join("\n");
        assert!(w.contains("ignored: features, mounts"), "{w}");
        assert!(
            w.contains("${localEnv:HOME} would read the server's host"),
            "{w}"
        );
        assert!(w.contains("forwardPorts is not supported"), "{w}");
        assert!(w.contains("remoteUser \"vscode\" is not used"), "{w}");
        assert!(!w.contains("name"), "{w}");
    }

    #[test]
    fn an_image_config_and_bad_ones() {
        let d = parse(
            r#"{"image": "registry.invalid/x:1", "workspaceFolder": "/workspace"}"#,
            ".devcontainer.json",
        )
        .unwrap();
        assert_eq!(d.source, Source::Image("registry.invalid/x:1".into()));
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        assert!(
            parse("{", ".devcontainer.json")
                .unwrap_err()
                .contains("not valid JSON")
        );
        assert!(
            parse("{}", ".devcontainer.json")
                .unwrap_err()
                .contains("neither an image nor a build")
        );
        let e = parse(
            r#"{"build": {"dockerfile": "../../x"}}"#,
            ".devcontainer/devcontainer.json",
        )
        .unwrap_err();
        assert!(e.contains("out of the repository"), "{e}");
        let e = parse(
            r#"{"build": {"dockerfile": "Dockerfile", "context": "sub"}}"#,
            ".devcontainer/devcontainer.json",
        )
        .unwrap_err();
        assert!(e.contains("outside the build context"), "{e}");
    }

    #[test]
    fn parallel_commands_become_one_script_that_fails_if_any_part_does() {
        let l = Lifecycle::read(&serde_json::json!({"a": "true", "b": ["false"]}), "x").unwrap();
        let script = l.script();
        assert!(
            script.contains("( true ) &") && script.contains("( false ) &"),
            "{script}"
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &script])
            .status()
            .unwrap();
        assert!(!out.success());
    }
}
