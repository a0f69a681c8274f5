//! A sandbox's own Docker engine, for projects that opt in (`backshift
//! docker PROJECT on`): a `dockerd` container in the sandbox's network
//! namespace, its data under `<data>/engines/<attempt>/<for>/data` (kept
//! across a rebuilt sandbox: its images stay), its socket in
//! `<data>/engines/<attempt>/<for>/socket`, mounted into the sandbox at
//! [`SOCKET_DIR`] with `DOCKER_HOST` pointing at it. `<for>` is the
//! sandbox's role: the agent's, or the verification's (the tests
//! backshift runs get an engine too). Never the host's socket. It stops,
//! starts and goes with its sandbox.

use super::{Failure, Run, docker};
use crate::serve::App;
use backshift_core::FailureReason;
use backshift_sandbox::docker::{DockerDriver, EngineSpec};
use backshift_sandbox::image::{BootstrapOptions, ENGINE, SANDBOX_UID};
use backshift_sandbox::{Mount, SandboxDriver, SandboxId, SandboxSpec, labels};
use std::path::PathBuf;
use std::time::Duration;

/// Where a sandbox has its engine's socket.
pub const SOCKET_DIR: &str = "/.backshift/docker";

/// The role label of an engine container.
pub const ROLE: &str = "engine";

/// The label saying whose engine it is: the role of its sandbox.
const FOR: &str = "dev.backshift.engine-for";

/// The agent's sandbox's role.
pub const AGENT: &str = "agent";

/// The verification sandbox's role.
pub const VERIFY: &str = "verify";

/// How long a new engine has to open its socket.
const START: Duration = Duration::from_secs(60);

/// The attempt's engines' directory on the host.
fn attempt_dir(app: &App, attempt: &str) -> PathBuf {
    app.data_dir.join("engines").join(attempt)
}

/// The directory of the engine of the attempt's sandbox of role `of`.
fn dir(app: &App, attempt: &str, of: &str) -> PathBuf {
    attempt_dir(app, attempt).join(of)
}

/// Whether the attempt's sandboxes get an engine: its project asks for
/// one and sandboxes are Docker containers (a warning says so otherwise).
pub async fn wanted(run: &Run) -> bool {
    let app = &run.app;
    let asked = matches!(
        app.store.project(&run.task.project_id).await,
        Ok(Some(p)) if p.docker_engine
    );
    if asked && !app.uses_docker() {
        run.warn(format!(
                        "the project asks for a Docker engine in its sandboxes, which needs Docker; this server runs {}: the sandbox has none",
                        app.driver_choice
                    )).await;
    }
    asked && app.uses_docker()
}

/// Makes a sandbox of role `of` ready for an engine: the socket
/// directory mounted and `DOCKER_HOST` set; an engine left from an
/// earlier sandbox of that role removed (its data stays).
pub async fn prepare_spec(run: &Run, spec: &mut SandboxSpec, of: &str) -> Result<(), Failure> {
    let app = &run.app;
    remove_engines(app, &run.attempt.id, Some(of)).await;
    let dir = dir(app, &run.attempt.id, of);
    let made = (|| {
        for sub in ["data", "socket"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        match std::fs::remove_file(dir.join("socket/docker.sock")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    })();
    made.map_err(|e| {
        Failure(
            FailureReason::SandboxFailed,
            format!(
                "cannot make the Docker engine's directory {}: {e}",
                dir.display()
            ),
        )
    })?;
    spec.mounts.push(Mount {
        host: dir.join("socket"),
        target: SOCKET_DIR.into(),
        read_only: false,
    });
    spec.env.push((
        "DOCKER_HOST".into(),
        format!("unix://{SOCKET_DIR}/docker.sock"),
    ));
    Ok(())
}

/// The engine image, built on first use (debootstrap + import, with
/// progress on the attempt's log).
pub async fn ensure_image(run: &Run, driver: &DockerDriver) -> Result<String, Failure> {
    let tag = ENGINE.tag();
    if driver.image_exists(&tag).await.unwrap_or(false) {
        return Ok(tag);
    }
    run.progress(format!(
        "building the Docker engine image {tag} (first use: debootstrap and import, a minute or two)"
    ))
    .await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let options = BootstrapOptions {
        recipe: ENGINE,
        tag: tag.clone(),
        mirror: None,
        work_dir: run.app.data_dir.join("tmp"),
    };
    let build = async move {
        let mut send = |line: String| {
            let _ = tx.send(line);
        };
        backshift_sandbox::image::bootstrap(driver, &options, &mut send).await
    };
    tokio::pin!(build);
    let built = loop {
        tokio::select! {
            r = &mut build => break r,
            Some(line) = rx.recv() => run.progress(format!("engine image: {line}")).await,
        }
    };
    while let Ok(line) = rx.try_recv() {
        run.progress(format!("engine image: {line}")).await;
    }
    built.map_err(|e| {
        Failure(
            FailureReason::ImageMissing,
            format!(
                "the Docker engine image {tag} could not be built: {e}. Build it with `backshift image bootstrap --engine` (as root), then submit the task again."
            ),
        )
    })?;
    Ok(tag)
}

/// Starts the engine of `sandbox` (of role `of`) and waits until it
/// answers on its socket.
pub async fn start(run: &Run, sandbox: &SandboxId, of: &str) -> Result<(), Failure> {
    let app = &run.app;
    let driver = docker(app).await?;
    let image = ensure_image(run, &driver).await?;
    let dir = dir(app, &run.attempt.id, of);
    let spec = EngineSpec {
        sandbox: sandbox.clone(),
        image,
        name: format!("backshift-{}-{of}-engine", run.attempt.id),
        labels: [
            (labels::MANAGED, "true"),
            (labels::INSTANCE, app.instance.as_str()),
            (labels::TASK, run.task.id.as_str()),
            (labels::ATTEMPT, run.attempt.id.as_str()),
            (labels::ROLE, ROLE),
            (FOR, of),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        limits: super::sandbox_limits(app),
        data_dir: dir.join("data"),
        socket_dir: dir.join("socket"),
        socket_gid: SANDBOX_UID,
        // Pulls go through the sandbox's egress proxy (its loopback).
        env: crate::egress::sandbox_env(),
    };
    let failed = |why: String| {
        Failure(
            FailureReason::SandboxFailed,
            format!("the sandbox's Docker engine did not start: {why}"),
        )
    };
    let id = driver
        .create_engine(&spec)
        .await
        .map_err(|e| failed(e.to_string()))?;
    wait_for_socket(run, &driver, &id, of).await.map_err(failed)
}

async fn wait_for_socket(
    run: &Run,
    driver: &DockerDriver,
    id: &SandboxId,
    of: &str,
) -> Result<(), String> {
    let socket = dir(&run.app, &run.attempt.id, of).join("socket/docker.sock");
    let until = tokio::time::Instant::now() + START;
    while tokio::time::Instant::now() < until {
        if socket.exists() {
            run.progress(format!(
                "the {of} sandbox's own Docker engine is up (DOCKER_HOST=unix://{SOCKET_DIR}/docker.sock)"
            ))
            .await;
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "no socket within {}s; its log ends: {}",
        START.as_secs(),
        driver.log_tail(id, 5).await.trim()
    ))
}

/// The attempt's engine containers (of its sandbox of role `of`, or all).
async fn engines(app: &App, attempt: &str, of: Option<&str>) -> Vec<SandboxId> {
    let Ok(driver) = app.driver().await else {
        return Vec::new();
    };
    let mut wanted = vec![
        (labels::MANAGED, "true"),
        (labels::ATTEMPT, attempt),
        (labels::ROLE, ROLE),
    ];
    if let Some(of) = of {
        wanted.push((FOR, of));
    }
    driver
        .list(&wanted)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|s| s.id)
        .collect()
}

/// Stops the engine of the attempt's agent sandbox (before the sandbox:
/// it lives in the sandbox's network namespace).
pub async fn stop(app: &App, attempt: &str) {
    let Ok(driver) = app.driver().await else {
        return;
    };
    for id in engines(app, attempt, Some(AGENT)).await {
        if let Err(e) = driver.stop(&id).await {
            tracing::warn!(%attempt, "cannot stop the Docker engine {id}: {e}");
        }
    }
}

/// Starts the stopped engine of the attempt's agent sandbox again (after
/// the sandbox).
pub async fn resume(run: &Run) -> Result<(), Failure> {
    let app = &run.app;
    let Some(id) = engines(app, &run.attempt.id, Some(AGENT))
        .await
        .into_iter()
        .next()
    else {
        return Ok(());
    };
    let driver = docker(app).await?;
    let _ = std::fs::remove_file(dir(app, &run.attempt.id, AGENT).join("socket/docker.sock"));
    let failed = |why: String| {
        Failure(
            FailureReason::SandboxFailed,
            format!("the sandbox's Docker engine did not start again: {why}"),
        )
    };
    SandboxDriver::resume(driver.as_ref(), &id)
        .await
        .map_err(|e| failed(e.to_string()))?;
    wait_for_socket(run, &driver, &id, AGENT)
        .await
        .map_err(failed)
}

async fn remove_engines(app: &App, attempt: &str, of: Option<&str>) {
    let Ok(driver) = app.driver().await else {
        return;
    };
    for id in engines(app, attempt, of).await {
        let _ = driver.destroy(&id).await;
    }
}

/// Removes the engine of the attempt's sandbox of role `of` (a finished
/// verification's) and its directory.
pub async fn remove_of(app: &App, attempt: &str, of: &str) {
    remove_engines(app, attempt, Some(of)).await;
    let _ = tokio::fs::remove_dir_all(dir(app, attempt, of)).await;
}

/// Removes the attempt's engines and their directories (images included).
pub async fn remove(app: &App, attempt: &str) {
    remove_engines(app, attempt, None).await;
    let dir = attempt_dir(app, attempt);
    if let Err(e) = tokio::fs::remove_dir_all(&dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(%attempt, "cannot remove {}: {e}", dir.display());
    }
}
