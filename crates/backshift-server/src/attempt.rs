//! Drives one attempt: provisioning → preparing → running → publishing →
//! succeeded, or an honest end (failed with a reason, cancelled,
//! timed_out). Each transition is persisted before the work it starts.

use crate::serve::App;
use async_trait::async_trait;
use backshift_agent::{AgentOutcome, EventSink, ModelClient, SandboxTools, run_agent};
use backshift_core::{AttemptState, FailureReason, Transition};
use backshift_protocol::EventKind;
use backshift_sandbox::docker::DockerDriver;
use backshift_sandbox::image::SANDBOX_UID;
use backshift_sandbox::tarball::{Owner, archive_dir, first_file};
use backshift_sandbox::{
    ExecSpec, ResourceLimits, SandboxDriver, SandboxError, SandboxId, SandboxSpec, labels,
};
use backshift_store::{AttemptRow, AttemptUpdate, TaskRow};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const WORKDIR: &str = "/workspace";

/// An attempt-ending failure: reason and explanation.
struct Failure(FailureReason, String);

/// Reports agent events on the attempt's log.
struct AttemptSink {
    app: Arc<App>,
    attempt: String,
}

#[async_trait]
impl EventSink for AttemptSink {
    async fn emit(&self, kind: EventKind) {
        if let Err(e) = self.app.hub.emit(&self.attempt, kind).await {
            tracing::error!(attempt = %self.attempt, "cannot record event: {e}");
        }
    }
}

/// The attempt's progress, shared by the steps.
struct Run {
    app: Arc<App>,
    attempt: AttemptRow,
    task: TaskRow,
    state: AttemptState,
    sandbox: Option<(Arc<dyn SandboxDriver>, SandboxId)>,
}

impl Run {
    async fn step(&mut self, t: Transition, detail: Option<String>) -> Result<(), Failure> {
        match self
            .app
            .hub
            .transition(&self.attempt.id, self.state, t, detail)
            .await
        {
            Ok(s) => {
                self.state = s;
                Ok(())
            }
            Err(e) => Err(Failure(
                FailureReason::Internal,
                format!("state change {t:?} refused: {e}"),
            )),
        }
    }

    async fn progress(&self, message: impl Into<String>) {
        let _ = self
            .app
            .hub
            .emit(
                &self.attempt.id,
                EventKind::Progress {
                    message: message.into(),
                },
            )
            .await;
    }

    fn sandbox(&self) -> Result<(Arc<dyn SandboxDriver>, SandboxId), Failure> {
        self.sandbox
            .clone()
            .ok_or_else(|| Failure(FailureReason::Internal, "no sandbox at this step".into()))
    }
}

/// Runs `attempt` to its end.
pub async fn run(app: Arc<App>, attempt: AttemptRow, cancel: CancellationToken) {
    let task = match app.store.task(&attempt.task_id).await {
        Ok(Some(t)) => t,
        other => {
            tracing::error!(attempt = %attempt.id, "task of attempt unreadable: {other:?}");
            return;
        }
    };
    let wall = Duration::from_secs(task.limits.wall_time_secs);
    let mut run = Run {
        app: app.clone(),
        state: attempt.state,
        attempt,
        task,
        sandbox: None,
    };
    if let Err(e) = run.step(Transition::Start, None).await {
        // Cancelled (or otherwise moved) before it could start.
        tracing::info!(attempt = %run.attempt.id, "not started: {}", e.1);
        return;
    }
    enum End {
        Done(Result<(), Failure>),
        Cancelled,
        TimedOut,
    }
    let end = {
        let work = drive(&mut run);
        tokio::select! {
            r = tokio::time::timeout(wall, work) => match r {
                Ok(r) => End::Done(r),
                Err(_) => End::TimedOut,
            },
            _ = cancel.cancelled() => End::Cancelled,
        }
    };
    let (transition, detail) = match end {
        End::Done(Ok(())) => (None, None),
        End::Done(Err(Failure(reason, detail))) => (Some(Transition::Fail(reason)), Some(detail)),
        End::Cancelled => (
            Some(Transition::Cancel),
            Some("cancelled on request".to_owned()),
        ),
        End::TimedOut => (
            Some(Transition::Timeout),
            Some(format!(
                "the attempt ran out of wall time ({}s, limits.wall_time_secs) while {}",
                wall.as_secs(),
                run.state
            )),
        ),
    };
    if let Some((driver, id)) = run.sandbox.take() {
        run.progress("removing the sandbox").await;
        if let Err(e) = driver.destroy(&id).await {
            tracing::warn!(attempt = %run.attempt.id, "sandbox {id} not removed: {e}");
        }
    }
    if let Some(t) = transition
        && !run.state.is_terminal()
        && let Err(e) = app
            .hub
            .transition(&run.attempt.id, run.state, t, detail)
            .await
    {
        tracing::error!(attempt = %run.attempt.id, "cannot record the end of the attempt: {e}");
    }
}

async fn drive(run: &mut Run) -> Result<(), Failure> {
    provision(run).await?;
    run.step(Transition::SandboxReady, None).await?;
    prepare(run).await?;
    run.step(Transition::Prepared, None).await?;
    let summary = work(run).await?;
    run.step(Transition::AgentFinished { verify: false }, None)
        .await?;
    publish(run, &summary).await?;
    run.step(Transition::Published, None).await
}

async fn provision(run: &mut Run) -> Result<(), Failure> {
    let app = run.app.clone();
    let driver = app.docker().await.map_err(|e| {
        Failure(
            FailureReason::SandboxFailed,
            format!(
                "{e}. Start the Docker daemon (`cargo xtask up` does), then submit the task again."
            ),
        )
    })?;
    let image = app.config.image();
    if app.config.pulls_image() {
        ensure_pulled(run, &driver, &image).await?;
    }
    run.progress(format!("creating sandbox from {image}")).await;
    let spec = SandboxSpec {
        image: image.clone(),
        name: format!("backshift-{}", run.attempt.id),
        labels: BTreeMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (labels::INSTANCE.to_owned(), app.instance.clone()),
            (labels::TASK.to_owned(), run.task.id.clone()),
            (labels::ATTEMPT.to_owned(), run.attempt.id.clone()),
        ]),
        limits: ResourceLimits {
            memory_bytes: app.config.sandbox.memory_mb * 1024 * 1024,
            nano_cpus: (app.config.sandbox.cpus * 1e9) as i64,
            pids: app.config.sandbox.pids,
        },
        user: format!("{SANDBOX_UID}:{SANDBOX_UID}"),
        workdir: WORKDIR.into(),
        env: vec![
            ("HOME".into(), "/home/agent".into()),
            ("LANG".into(), "C.UTF-8".into()),
        ],
    };
    let driver: Arc<dyn SandboxDriver> = driver;
    let id = driver.create(&spec).await.map_err(|e| match e {
        SandboxError::ImageMissing(image) => Failure(
            FailureReason::ImageMissing,
            format!(
                "the sandbox image {image} does not exist on this Docker host: {}, then submit the task again.",
                app.config.missing_image_fix()
            ),
        ),
        other => Failure(FailureReason::SandboxFailed, format!("cannot create the sandbox: {other}")),
    })?;
    let _ = app
        .store
        .update_attempt(
            &run.attempt.id,
            &AttemptUpdate {
                sandbox_id: Some(&id.0),
                ..Default::default()
            },
        )
        .await;
    run.progress(format!("sandbox {} is up", &id.0[..12.min(id.0.len())]))
        .await;
    run.sandbox = Some((driver, id));
    Ok(())
}

/// A configured image that is not on the Docker host is pulled from its
/// registry, its progress streamed as events. (The default image is never
/// pulled: it is built locally by `backshift image bootstrap`.)
async fn ensure_pulled(run: &Run, driver: &DockerDriver, image: &str) -> Result<(), Failure> {
    let missing = |message: String| Failure(FailureReason::ImageMissing, message);
    match driver.image_exists(image).await {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(e) => {
            return Err(missing(format!(
                "cannot check the sandbox image {image}: {e}"
            )));
        }
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let pull = async move {
        let mut send = |line: String| {
            let _ = tx.send(line);
        };
        backshift_sandbox::image::pull(driver, image, &mut send).await
    };
    tokio::pin!(pull);
    let result = loop {
        tokio::select! {
            r = &mut pull => break r,
            Some(line) = rx.recv() => run.progress(line).await,
        }
    };
    while let Ok(line) = rx.try_recv() {
        run.progress(line).await;
    }
    result.map_err(|e| {
        missing(format!(
            "the sandbox image {image} ([sandbox] image) is not on this Docker host and could not be pulled: {e}. Check the reference and that its registry is reachable from the Docker host, or unset [sandbox] image to use the bootstrapped default image."
        ))
    })
}

async fn prepare(run: &mut Run) -> Result<(), Failure> {
    let app = run.app.clone();
    let (driver, id) = run.sandbox()?;
    let clone_failed = |what: &str, e: &dyn std::fmt::Display| {
        Failure(FailureReason::CloneFailed, format!("{what}: {e}"))
    };
    let pin = format!("refs/backshift/base/{}", run.attempt.id);
    run.progress(format!("fetching {} into the git store", run.task.repo))
        .await;
    let base = app
        .git
        .fetch_source(
            &run.task.project_id,
            &run.task.repo,
            run.task.base_ref.as_deref(),
            &pin,
        )
        .await
        .map_err(|e| clone_failed(&format!("cannot fetch {}", run.task.repo), &e))?;
    app.store
        .update_attempt(
            &run.attempt.id,
            &AttemptUpdate {
                base_commit: Some(&base),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Failure(FailureReason::Internal, e.to_string()))?;
    run.attempt.base_commit = Some(base.clone());
    run.progress(format!(
        "checking out {} on branch {}",
        &base[..12],
        run.attempt.branch
    ))
    .await;
    let scratch = tempfile::tempdir_in(app.data_dir.join("tmp"))
        .map_err(|e| clone_failed("cannot create a scratch directory", &e))?;
    let tree = scratch.path().join("workspace");
    app.git
        .export_checkout(
            &run.task.project_id,
            &pin,
            &base,
            &run.attempt.branch,
            &tree,
        )
        .await
        .map_err(|e| clone_failed("cannot check out", &e))?;
    let owner = Owner {
        uid: SANDBOX_UID,
        gid: SANDBOX_UID,
    };
    let tar = tokio::task::spawn_blocking(move || archive_dir(&tree, "workspace", owner))
        .await
        .map_err(|e| clone_failed("archiving failed", &e))?
        .map_err(|e| clone_failed("cannot archive the checkout", &e))?;
    let size = tar.len();
    driver
        .copy_in(&id, "/", tar.into())
        .await
        .map_err(|e| clone_failed("cannot copy the checkout into the sandbox", &e))?;
    run.progress(format!("repository in the sandbox ({} KiB)", size / 1024))
        .await;
    Ok(())
}

async fn work(run: &mut Run) -> Result<String, Failure> {
    let app = run.app.clone();
    let (driver, id) = run.sandbox()?;
    let model_config = app
        .model_config()
        .map_err(|e| Failure(FailureReason::ModelError, e))?;
    let model = ModelClient::new(model_config)
        .map_err(|e| Failure(FailureReason::ModelError, e.to_string()))?;
    let tools = SandboxTools::new(
        driver,
        id,
        WORKDIR,
        Duration::from_secs(run.task.limits.command_timeout_secs),
    );
    let sink = AttemptSink {
        app: app.clone(),
        attempt: run.attempt.id.clone(),
    };
    match run_agent(
        &model,
        &tools,
        &sink,
        &run.task.prompt,
        WORKDIR,
        run.task.limits.max_turns,
    )
    .await
    {
        AgentOutcome::Finished { summary } => Ok(summary),
        AgentOutcome::Stopped { reason, detail } => Err(Failure(reason, detail)),
    }
}

async fn publish(run: &mut Run, summary: &str) -> Result<(), Failure> {
    let app = run.app.clone();
    let (driver, id) = run.sandbox()?;
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        Failure(FailureReason::PublishFailed, format!("{what}: {e}"))
    };
    let base = run
        .attempt
        .base_commit
        .clone()
        .ok_or_else(|| Failure(FailureReason::Internal, "no base commit".into()))?;
    let branch = run.attempt.branch.clone();
    let git = &app.config.git;
    let message = commit_message(summary, &run.task.id);
    // Commit everything the agent left, as backshift, hooks disabled; then
    // bundle the new commits for the trip back to the host.
    let script = format!(
        "set -e\ngit add -A\nif git diff --cached --quiet; then echo NO_CHANGES; exit 0; fi\n\
         git -c core.hooksPath=/dev/null -c user.name=\"$GN\" -c user.email=\"$GE\" commit --quiet --no-verify -F -\n\
         git bundle create --quiet /tmp/backshift.bundle \"refs/heads/{branch}\" \"^{base}\"\n"
    );
    let spec = ExecSpec {
        argv: vec!["bash".into(), "-c".into(), script],
        workdir: Some(WORKDIR.into()),
        env: vec![
            ("GN".into(), git.author_name.clone()),
            ("GE".into(), git.author_email.clone()),
        ],
        stdin: Some(message.into_bytes().into()),
        ..Default::default()
    };
    run.progress("committing the agent's changes").await;
    let out = driver
        .exec_collect(&id, &spec)
        .await
        .map_err(|e| failed("cannot run git in the sandbox", &e))?;
    if out.exit_code != 0 {
        return Err(failed(
            "git commit in the sandbox failed",
            &String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    let head = if String::from_utf8_lossy(&out.stdout).contains("NO_CHANGES") {
        run.progress("the agent made no changes; the branch points at the base commit")
            .await;
        app.git
            .set_branch(&run.task.project_id, &branch, &base)
            .await
            .map_err(|e| failed("cannot create the branch", &e))?;
        base.clone()
    } else {
        let tar = driver
            .copy_out(&id, "/tmp/backshift.bundle")
            .await
            .map_err(|e| failed("cannot copy the bundle out of the sandbox", &e))?;
        let bundle =
            first_file(&tar).map_err(|e| failed("the bundle archive is unreadable", &e))?;
        let file = tempfile::NamedTempFile::new_in(app.data_dir.join("tmp"))
            .map_err(|e| failed("scratch file", &e))?;
        tokio::fs::write(file.path(), &bundle)
            .await
            .map_err(|e| failed("scratch file", &e))?;
        app.git
            .import_bundle(&run.task.project_id, file.path(), &branch)
            .await
            .map_err(|e| failed("cannot import the branch into the git store", &e))?
    };
    let stat = app
        .git
        .diff_stat(&run.task.project_id, &base, &head)
        .await
        .map_err(|e| failed("cannot compute the diff", &e))?;
    app.store
        .update_attempt(
            &run.attempt.id,
            &AttemptUpdate {
                head_commit: Some(&head),
                summary: Some(summary),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Failure(FailureReason::Internal, e.to_string()))?;
    let _ = app
        .hub
        .emit(
            &run.attempt.id,
            EventKind::DiffStat {
                branch,
                base_commit: base,
                head_commit: head,
                files_changed: stat.files_changed,
                insertions: stat.insertions,
                deletions: stat.deletions,
                stat: stat.stat,
            },
        )
        .await;
    Ok(())
}

/// The commit message: the summary's first line as subject (at most 72
/// characters), the whole summary as body, and a trailer naming the task.
fn commit_message(summary: &str, task: &str) -> String {
    let first = summary
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("backshift changes")
        .trim();
    let subject: String = if first.chars().count() > 72 {
        first.chars().take(71).chain(['…']).collect()
    } else {
        first.to_owned()
    };
    let rest = summary.trim();
    if rest == first {
        format!("{subject}\n\nBackshift-Task: {task}\n")
    } else {
        format!("{subject}\n\n{rest}\n\nBackshift-Task: {task}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::commit_message;

    #[test]
    fn commit_messages_have_a_short_subject_and_a_trailer() {
        assert_eq!(
            commit_message("Add hello", "t1"),
            "Add hello\n\nBackshift-Task: t1\n"
        );
        let long = "x".repeat(100);
        let m = commit_message(&format!("{long}\nmore"), "t1");
        assert_eq!(m.lines().next().unwrap().chars().count(), 72);
        assert!(m.contains("\nmore\n"));
    }
}
