//! A task's environment, from its repository's devcontainer.json: the
//! image (pulled, or built through the Docker API with its output as
//! events, cached by the content that defines it), the variables, and the
//! setup phase (`postCreateCommand` once, then a `docker commit` of the
//! sandbox keyed by the repository, its lockfiles and its environment
//! definition, so the next attempt on the same state skips setup;
//! `postStartCommand` each time a sandbox starts).

use crate::devcontainer::{self, DevContainer, Lifecycle, Source};
use crate::serve::App;
use backshift_core::FailureReason;
use backshift_protocol::EventKind;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Files whose content decides what a setup installs.
pub const LOCKFILES: [&str; 18] = [
    "package-lock.json",
    "npm-shrinkwrap.json",
    "yarn.lock",
    "pnpm-lock.yaml",
    "bun.lockb",
    "Cargo.lock",
    "go.sum",
    "poetry.lock",
    "Pipfile.lock",
    "uv.lock",
    "requirements.txt",
    "requirements-dev.txt",
    "Gemfile.lock",
    "composer.lock",
    "mix.lock",
    "pubspec.lock",
    "packages.lock.json",
    "flake.lock",
];

/// Bump when what a setup snapshot holds changes meaning.
const SETUP_VERSION: &str = "1";

/// What the sandbox of an attempt is made of.
#[derive(Debug, Clone)]
pub struct Environment {
    /// The image to create the sandbox from (the setup snapshot when
    /// there is one for this state).
    pub image: String,
    /// The devcontainer's variables.
    pub env: Vec<(String, String)>,
    /// Run once, when `setup_image` is not there yet.
    pub post_create: Option<Lifecycle>,
    /// Run each time a sandbox starts.
    pub post_start: Option<Lifecycle>,
    /// Where the state after setup is kept (`docker commit`).
    pub setup_image: Option<String>,
    /// The sandbox starts from `setup_image`: setup is skipped.
    pub setup_cached: bool,
}

/// A failure of the environment, with its reason.
pub type EnvError = (FailureReason, String);

async fn say(app: &App, attempt: &str, kind: EventKind) {
    let _ = app.hub.emit(attempt, kind).await;
}

fn hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

/// The environment the repository at `base` asks for, or `None` when it
/// has no devcontainer.json (the configured image is used).
pub async fn resolve(
    app: &App,
    attempt: &str,
    project: &str,
    base: &str,
) -> Result<Option<Environment>, EnvError> {
    let build_failed = |m: String| (FailureReason::ImageBuildFailed, m);
    let mut found = None;
    for path in devcontainer::LOCATIONS {
        if let Some(text) = app
            .git
            .read_file(project, base, path)
            .await
            .map_err(|e| build_failed(format!("cannot read {path}: {e}")))?
        {
            found = Some((path, text));
            break;
        }
    }
    let Some((path, text)) = found else {
        return Ok(None);
    };
    let dc: DevContainer = devcontainer::parse(&text, path).map_err(|e| {
        build_failed(format!(
            "{e}. Fix {path} in the repository, then submit the task again."
        ))
    })?;
    say(
        app,
        attempt,
        EventKind::Progress {
            message: format!("environment from {path}"),
        },
    )
    .await;
    for w in &dc.warnings {
        say(
            app,
            attempt,
            EventKind::Warning {
                message: format!("{path}: {w}"),
            },
        )
        .await;
    }
    let mut env = Vec::new();
    for (k, v) in dc.env {
        if crate::secrets::reserved_var(&k) {
            say(
                app,
                attempt,
                EventKind::Warning {
                    message: format!("{path}: {k} is backshift's own variable in a sandbox; the devcontainer's value is not used"),
                },
            )
            .await;
        } else {
            env.push((k, v));
        }
    }
    // Without Docker there are no images: the sandbox is this host's
    // own tools; the variables and lifecycle commands still apply, and
    // setup runs every time (nothing can be snapshotted).
    if !app.uses_docker() {
        let what = match &dc.source {
            Source::Image(image) => format!("its image {image}"),
            Source::Build { dockerfile, .. } => format!("its Dockerfile {dockerfile}"),
        };
        say(
            app,
            attempt,
            EventKind::Warning {
                message: format!(
                    "{path}: {what} is not used: this server's sandboxes run on the host's own tools ({}); its variables and lifecycle commands still apply",
                    app.driver_choice
                ),
            },
        )
        .await;
        return Ok(Some(Environment {
            image: app.config.image(),
            env,
            post_create: dc.post_create,
            post_start: dc.post_start,
            setup_image: None,
            setup_cached: false,
        }));
    }
    let driver = app.docker().await.map_err(|e| {
        (
            FailureReason::SandboxFailed,
            format!("{e}. Start the Docker daemon, then submit the task again."),
        )
    })?;
    let image = match &dc.source {
        Source::Image(image) => image.clone(),
        Source::Build {
            context,
            dockerfile,
            args,
        } => {
            let context_id = app
                .git
                .object_id(project, base, context)
                .await
                .map_err(|e| {
                    build_failed(format!(
                        "the build context {context:?} is not in the repository: {e}"
                    ))
                })?;
            let args_text = serde_json::to_string(args).unwrap_or_default();
            let network = app.config.sandbox.build_network;
            let key = hash(&[
                "build",
                &context_id,
                dockerfile,
                &args_text,
                if network { "net" } else { "nonet" },
            ]);
            let tag = format!("backshift-env:{key}");
            let cached = driver
                .image_exists(&tag)
                .await
                .map_err(|e| build_failed(e.to_string()))?;
            if cached {
                say(app, attempt, EventKind::Progress {
                    message: format!("environment image {tag} is built already (same Dockerfile, context and arguments)"),
                })
                .await;
            } else {
                say(
                    app,
                    attempt,
                    EventKind::Progress {
                        message: format!(
                            "building the environment image {tag} from {}{dockerfile}{}",
                            if context.is_empty() {
                                String::new()
                            } else {
                                format!("{context}/")
                            },
                            if network {
                                ""
                            } else {
                                " (without network: [sandbox] build_network = false)"
                            }
                        ),
                    },
                )
                .await;
                let tar =
                    app.git.archive(project, base, context).await.map_err(|e| {
                        build_failed(format!("cannot archive the build context: {e}"))
                    })?;
                let labels = BTreeMap::from([
                    (
                        backshift_sandbox::labels::MANAGED.to_owned(),
                        "true".to_owned(),
                    ),
                    ("dev.backshift.kind".to_owned(), "environment".to_owned()),
                    ("dev.backshift.project".to_owned(), project.to_owned()),
                ]);
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
                let forward = async {
                    while let Some(line) = rx.recv().await {
                        say(
                            app,
                            attempt,
                            EventKind::Progress {
                                message: format!("build: {line}"),
                            },
                        )
                        .await;
                    }
                };
                let build = async {
                    let mut send = |l: String| {
                        let _ = tx.send(l);
                    };
                    let spec = backshift_sandbox::docker::BuildSpec {
                        context_tar: tar,
                        dockerfile: dockerfile.clone(),
                        tag: tag.clone(),
                        args: args.clone(),
                        labels,
                        network,
                    };
                    let r = driver.build_image(spec, &mut send).await;
                    drop(tx);
                    r
                };
                let (built, ()) = tokio::join!(build, forward);
                built.map_err(|e| {
                    build_failed(format!(
                        "the environment image did not build: {e}. Fix the Dockerfile ({dockerfile}) in the repository, then submit the task again."
                    ))
                })?;
            }
            tag
        }
    };
    let (setup_image, setup_cached) = match &dc.post_create {
        None => (None, false),
        Some(post_create) => {
            let locks = app
                .git
                .files_named(project, base, &LOCKFILES)
                .await
                .map_err(|e| build_failed(format!("cannot list the lockfiles: {e}")))?;
            let locks_text: String = locks.iter().map(|(p, b)| format!("{p} {b}\n")).collect();
            let image_id = match driver.image_id(&image).await {
                Ok(Some(id)) => id,
                _ => image.clone(),
            };
            let key = hash(&[
                SETUP_VERSION,
                project,
                &image_id,
                &text,
                &post_create.script(),
                &locks_text,
            ]);
            let tag = format!("backshift-setup:{project}-{key}");
            let cached = driver.image_exists(&tag).await.unwrap_or(false);
            (Some(tag), cached)
        }
    };
    let image = match (&setup_image, setup_cached) {
        (Some(tag), true) => tag.clone(),
        _ => image,
    };
    Ok(Some(Environment {
        image,
        env,
        post_create: dc.post_create,
        post_start: dc.post_start,
        setup_image,
        setup_cached,
    }))
}
