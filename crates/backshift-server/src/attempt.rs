//! Drives one attempt: provisioning → preparing → running → publishing →
//! succeeded, or an honest end (failed with a reason, cancelled,
//! timed_out). Each transition is persisted before the work it starts.

use crate::checkpoint::{self, AttemptJournal};
use crate::config::PermissionPolicySetting;
use crate::serve::App;
use crate::supervisor::{Stop, StopReason};
use async_trait::async_trait;
use backshift_agent::{
    AcpLaunch, AcpResume, AgentOutcome, CommandRun, Conversation, EventSink, ModelClient,
    PermissionPolicy, Replay, SandboxTools, run_acp_agent, run_agent, run_command_agent,
};
use backshift_core::{AttemptState, FailureReason, Transition};
use backshift_protocol::EventKind;
use backshift_sandbox::docker::DockerDriver;
use backshift_sandbox::image::SANDBOX_UID;
use backshift_sandbox::tarball::{Owner, archive_dir, first_file};
use backshift_sandbox::{
    ExecSpec, Mount, ResourceLimits, SandboxDriver, SandboxError, SandboxId, SandboxSpec, labels,
};
use backshift_shim::ShimClient;
use backshift_shim::proto::{SANDBOX_BINARY, SANDBOX_DIR};
use backshift_store::{AttemptRow, AttemptUpdate, CheckpointRow, TaskRow};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod engine;
mod verify;

pub use verify::verifications;

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
        // An agent's permission request answered is a policy decision.
        if let EventKind::PermissionDecision {
            call_id,
            title,
            kind: tool_kind,
            decision,
            by,
            reason,
        } = &kind
        {
            let actor = if ["policy", "timeout", "approval"].contains(&by.as_str()) {
                by.clone()
            } else {
                format!("token:{by}")
            };
            self.app
                .audit(
                    &actor,
                    &format!("permission.{decision}"),
                    &self.attempt,
                    serde_json::json!({"tool_call": call_id, "title": title, "kind": tool_kind, "reason": reason}),
                )
                .await;
        }
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
    /// The sandbox's shim directory on the host.
    shim_dir: Option<PathBuf>,
    /// The sandbox's model gateway and egress proxy, served while the
    /// runner runs.
    endpoints: Option<Endpoints>,
    /// The repository's environment (devcontainer.json), once resolved.
    env: Option<crate::environment::Environment>,
    /// The sandbox of the verification under way.
    verifier: Option<verify::Verifier>,
    /// Which time the agent works on the task (from 1; each failed
    /// verification starts another).
    iteration: u32,
    /// What the last failed verification found, for the agent's next
    /// iteration.
    feedback: Option<String>,
    /// Why an installed agent's session is reopened, when not after a
    /// restart or a lost sandbox (a person paused the attempt).
    reopen_note: Option<String>,
    /// The checkout image the sandbox was made from (its checkout is in
    /// it already), when it was.
    checkout_image: Option<String>,
}

impl Run {
    async fn step(&mut self, t: Transition, detail: Option<String>) -> Result<(), Failure> {
        match transition_following_approvals(&self.app, &self.attempt.id, self.state, t, detail)
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

    /// A `warning` event on the attempt's log: something did not go as
    /// configured, and the attempt goes on without it.
    async fn warn(&self, message: impl Into<String>) {
        let _ = self
            .app
            .hub
            .emit(
                &self.attempt.id,
                EventKind::Warning {
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

    /// Removes the sandbox (if any) and its shim directory.
    async fn discard_sandbox(&mut self) {
        if let Some(v) = self.verifier.take() {
            v.discard().await;
        }
        self.endpoints = None;
        if let Some((driver, id)) = self.sandbox.take()
            && let Err(e) = driver.destroy(&id).await
        {
            tracing::warn!(attempt = %self.attempt.id, "sandbox {id} not removed: {e}");
        }
        if let Some(dir) = self.shim_dir.take() {
            remove_shim_dir(&dir).await;
        }
    }
}

/// Removes every sandbox still labelled with the ended attempt: one a
/// killed control plane was making (a verification's) is not the
/// runner's to know of. When an attempt ends, none of its sandboxes
/// remain.
async fn remove_leftovers(app: &App, attempt: &str) {
    let Ok(driver) = app.driver().await else {
        return;
    };
    let found = crate::pool::sandboxes(app, Some(attempt))
        .await
        .unwrap_or_default();
    for sb in found {
        if let Err(e) = driver.destroy(&sb.id).await {
            tracing::warn!(%attempt, "sandbox {} not removed: {e}", sb.id);
        }
        if let Some(dir) = sb.labels.get(labels::SHIM_DIR) {
            remove_shim_dir(Path::new(dir)).await;
        }
    }
    engine::remove(app, attempt).await;
}

/// Removes the attempt's filesystem snapshot, if it has one.
async fn remove_snapshot(app: &App, attempt: &str) {
    let Ok(Some(row)) = app.store.attempt(attempt).await else {
        return;
    };
    let Some(image) = row.snapshot_image else {
        return;
    };
    if let Ok(driver) = app.driver().await {
        match driver.remove_snapshot(&image).await {
            Ok(()) => {
                let _ = app.store.set_snapshot(attempt, None).await;
            }
            Err(e) => tracing::warn!(%attempt, "cannot remove snapshot {image}: {e}"),
        }
    }
}

/// Removes a shim directory (its socket and journal).
pub async fn remove_shim_dir(dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("cannot remove shim directory {}: {e}", dir.display());
    }
}

/// Why the steps stopped short of success.
enum Halt {
    /// The attempt ends: failed with a reason.
    Fail(Failure),
    /// The sandbox is gone: recover from the last checkpoint.
    Lost(String),
}

impl From<Failure> for Halt {
    fn from(f: Failure) -> Self {
        Halt::Fail(f)
    }
}

/// Runs `attempt` to its end: from the queue, or (when it is already
/// active, after a restart of the server) through a recovery.
pub async fn run(app: Arc<App>, attempt: AttemptRow, stop: Arc<Stop>) {
    let task = match app.store.task(&attempt.task_id).await {
        Ok(Some(t)) => t,
        other => {
            tracing::error!(attempt = %attempt.id, "task of attempt unreadable: {other:?}");
            return;
        }
    };
    let wall = Duration::from_secs(task.limits.wall_time_secs);
    // One of several attempts may run an agent of its own.
    let task = TaskRow {
        agent: attempt.agent.clone().unwrap_or(task.agent),
        ..task
    };
    let mut run = Run {
        app: app.clone(),
        state: attempt.state,
        attempt,
        task,
        sandbox: None,
        shim_dir: None,
        endpoints: None,
        env: None,
        verifier: None,
        iteration: 1,
        feedback: None,
        reopen_note: None,
        checkout_image: None,
    };
    // A runner told to stop before it began only ends the attempt (one
    // cancelled or out of time while nobody drove it: a paused one).
    let ending = stop.is_requested();
    if !ending {
        let begun = match run.state {
            AttemptState::Queued => run.step(Transition::Start, None).await,
            AttemptState::Paused => {
                run.step(Transition::Resume, Some("resumed on request".into()))
                    .await
            }
            _ => {
                let detail = format!(
                    "the server stopped while this attempt was {}; recovering from its last checkpoint",
                    run.state
                );
                run.step(Transition::Interrupted, Some(detail)).await
            }
        };
        if let Err(e) = begun {
            // Cancelled (or otherwise moved) before it could start.
            tracing::info!(attempt = %run.attempt.id, "not started: {}", e.1);
            return;
        }
        // A request held for a person before a restart died with the old
        // process; its approval is settled so nobody answers into the void.
        crate::approvals::expire_pending(
            &app,
            &run.attempt.id,
            "the control plane restarted and the held request was dropped; the agent may ask again",
        )
        .await;
    }
    // The wall-time budget counts from the first start, across restarts.
    let now = backshift_protocol::now_ms();
    let started_at = run.attempt.started_at.unwrap_or(now);
    if run.attempt.started_at.is_none() {
        let _ = app
            .store
            .update_attempt(
                &run.attempt.id,
                &AttemptUpdate {
                    started_at: Some(now),
                    ..Default::default()
                },
            )
            .await;
        run.attempt.started_at = Some(now);
    }
    enum End {
        Done(Result<(), Failure>),
        Stopped,
        TimedOut,
    }
    let attempt_id = run.attempt.id.clone();
    let end = loop {
        if ending {
            break End::Stopped;
        }
        let end = {
            let work = drive(&mut run);
            tokio::select! {
                r = work => End::Done(r),
                () = wall_clock(&app, &attempt_id, started_at, wall) => End::TimedOut,
                () = stop.requested() => End::Stopped,
            }
        };
        if let (End::Stopped, StopReason::Pause(detail)) = (&end, stop.reason()) {
            match pause(&mut run, &stop, detail).await {
                // The runner leaves; the attempt waits for a person.
                Ok(true) => return,
                Ok(false) => continue,
                Err(f) => break End::Done(Err(f)),
            }
        }
        break end;
    };
    let (transition, detail) = match end {
        End::Done(Ok(())) => (None, None),
        End::Done(Err(Failure(reason, detail))) => (Some(Transition::Fail(reason)), Some(detail)),
        End::Stopped => match stop.reason() {
            StopReason::End(t, detail) => (Some(t), Some(detail)),
            StopReason::Abandon(why) => {
                // Another replica drives the attempt now: its sandbox and
                // state are that replica's to change.
                tracing::warn!(attempt = %run.attempt.id, "leaving the attempt: {why}");
                return;
            }
            // Carried out above.
            StopReason::Pause(_) => return,
        },
        End::TimedOut => (
            Some(Transition::Timeout),
            Some(format!(
                "the attempt ran out of wall time ({}s, limits.wall_time_secs) while {}",
                wall.as_secs(),
                run.state
            )),
        ),
    };
    if transition.is_some() {
        cancel_agent(&run).await;
        catch_up_output(&run).await;
    }
    if run.sandbox.is_some() {
        run.progress("removing the sandbox").await;
    }
    run.discard_sandbox().await;
    remove_leftovers(&app, &run.attempt.id).await;
    remove_snapshot(&app, &run.attempt.id).await;
    crate::approvals::expire_pending(&app, &run.attempt.id, "the attempt ended").await;
    if let Some(t) = transition
        && !run.state.is_terminal()
        && let Err(e) =
            transition_following_approvals(&app, &run.attempt.id, run.state, t, detail).await
    {
        tracing::error!(attempt = %run.attempt.id, "cannot record the end of the attempt: {e}");
    }
    if run.state != AttemptState::Succeeded {
        keep_work(&run).await;
    }
    // The last of the task's attempts to end chooses its result, which is
    // then delivered.
    match crate::results::choose_winner(&app, &run.task.id).await {
        Ok(true) => {
            if let Err(e) = crate::deliver::deliver(&app, &run.task.id).await {
                tracing::warn!(task = %run.task.id, "cannot record the delivery: {e}");
            }
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(task = %run.task.id, "cannot choose the task's result: {e}"),
    }
    // A task from a webhook hears back where it came from.
    crate::origin::report(&app, &run.task.id).await;
}

/// Carries out a pause request: a running attempt (or one waiting for a
/// person) is paused and its sandbox stopped, files kept; `Ok(true)`, and
/// the runner leaves it. One that had moved on to a state that cannot
/// pause (verifying, publishing, ...) goes on: its work, cut short, is
/// picked up as after a restart, and `Ok(false)`.
async fn pause(run: &mut Run, stop: &Stop, detail: String) -> Result<bool, Failure> {
    let app = run.app.clone();
    let id = run.attempt.id.clone();
    // The work was dropped mid-step: the store says where it is.
    if let Ok(Some(a)) = app.store.attempt(&id).await {
        run.state = a.state;
    }
    let pausable = matches!(
        run.state,
        AttemptState::Running | AttemptState::WaitingApproval
    );
    if pausable && run.sandbox.is_none() {
        // Cut short while taking its sandbox up again (a resume): the
        // prepared one is what stops.
        if let (Ok(driver), Ok(Some(row))) = (app.driver().await, app.store.attempt(&id).await) {
            let found = crate::pool::sandboxes(&app, Some(&id))
                .await
                .unwrap_or_default();
            if let Some((sb, dir)) =
                keep_prepared(&driver, found, row.prepared_sandbox.as_deref(), |_| true).await
            {
                run.sandbox = Some((driver, sb.id));
                run.shim_dir = Some(dir);
            }
        }
    }
    if pausable && run.sandbox.is_some() {
        cancel_agent(run).await;
        catch_up_output(run).await;
        match transition_following_approvals(&app, &id, run.state, Transition::Pause, Some(detail))
            .await
        {
            Ok(s) => {
                run.state = s;
                stop_sandbox(run).await;
                crate::approvals::expire_pending(
                    &app,
                    &id,
                    "the attempt was paused; the agent may ask again once it is resumed",
                )
                .await;
                return Ok(true);
            }
            Err(e) => {
                tracing::info!(attempt = %id, "not paused: {e}");
                if let Ok(Some(a)) = app.store.attempt(&id).await {
                    run.state = a.state;
                }
            }
        }
    }
    if run.state.is_terminal() {
        return Err(Failure(
            FailureReason::Internal,
            format!("the attempt ended ({}) as it was being paused", run.state),
        ));
    }
    let _ = app.store.drop_pause_request(&id).await;
    stop.withdraw();
    run.progress(format!(
        "a pause was asked for while the attempt was {}, which cannot pause; it goes on",
        run.state
    ))
    .await;
    // What was under way is picked up as after a restart: the sandbox,
    // untouched, is adopted again.
    if let Some(v) = run.verifier.take() {
        v.discard().await;
    }
    run.endpoints = None;
    run.sandbox = None;
    run.shim_dir = None;
    run.step(
        Transition::Interrupted,
        Some("the work was cut short by a pause request that could not be carried out".into()),
    )
    .await?;
    Ok(false)
}

/// Stops the paused attempt's sandbox (its files stay) and lets go of it:
/// its model gateway, egress proxy and git endpoint close.
async fn stop_sandbox(run: &mut Run) {
    run.endpoints = None;
    run.shim_dir = None;
    let Some((driver, id)) = run.sandbox.take() else {
        return;
    };
    engine::stop(&run.app, &run.attempt.id).await;
    let short = &id.0[..12.min(id.0.len())];
    match driver.stop(&id).await {
        Ok(()) => {
            run.progress(format!(
                "sandbox {short} stopped; its files are kept until the attempt is resumed or ends"
            ))
            .await
        }
        Err(e) => {
            run.progress(format!(
                "sandbox {short} could not be stopped ({e}); it is left as it is and taken up again on resume"
            ))
            .await
        }
    }
}

/// An attempt that ended without success keeps its last work on its
/// branch in the git store (its last commit for verification, else its
/// newest checkpoint), so a person can take over from there.
async fn keep_work(run: &Run) {
    let app = &run.app;
    let project = &run.task.project_id;
    let work = match app.git.ref_commit(project, &work_ref(run)).await {
        Ok(Some(c)) => Some(c),
        _ => app
            .store
            .latest_checkpoint(&run.attempt.id)
            .await
            .ok()
            .flatten()
            .map(|cp| cp.commit_sha),
    };
    if let Some(commit) = work
        && let Err(e) = app
            .git
            .set_branch(project, &run.attempt.branch, &commit)
            .await
    {
        tracing::warn!(attempt = %run.attempt.id, "cannot keep the attempt's work on its branch: {e}");
    }
}

/// `hub.transition`, except that the runner's idea of the state may lag
/// behind approvals: while the agent works, a held request moves the
/// attempt between `running` and `waiting_approval` without the runner.
/// A transition refused because of that is taken from the actual state.
async fn transition_following_approvals(
    app: &App,
    attempt: &str,
    from: AttemptState,
    t: Transition,
    detail: Option<String>,
) -> Result<AttemptState, crate::events::TransitionFailed> {
    use crate::events::TransitionFailed;
    let swings =
        |s: AttemptState| matches!(s, AttemptState::Running | AttemptState::WaitingApproval);
    let mut from = from;
    for _ in 0..3 {
        match app.hub.transition(attempt, from, t, detail.clone()).await {
            Err(TransitionFailed::Moved { expected, actual })
                if swings(expected) && swings(actual) =>
            {
                if actual == AttemptState::WaitingApproval && t == Transition::ApprovalNeeded {
                    return Ok(actual);
                }
                if actual.apply(t).is_err() && actual == AttemptState::WaitingApproval {
                    // Only `running` can take it (the agent finished while
                    // a request of its own was held, which cannot outlive
                    // it): settle what is pending first.
                    crate::approvals::expire_pending(app, attempt, "the agent went on without it")
                        .await;
                    let _ = app
                        .hub
                        .transition(attempt, actual, Transition::ApprovalAnswered, None)
                        .await;
                    from = AttemptState::Running;
                } else {
                    from = actual;
                }
            }
            other => return other,
        }
    }
    app.hub.transition(attempt, from, t, detail).await
}

/// How long an ACP agent asked to cancel gets to stop before its sandbox
/// is removed with it.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// An ACP agent still at work when its attempt is stopped (cancelled, out
/// of time or budget) is asked to cancel its turn (`session/cancel`, the
/// protocol's way) and its stdin closed, so it can stop cleanly before
/// its sandbox goes. Written straight to its stdin through the shim: it
/// works whatever became of the connection that started it.
async fn cancel_agent(run: &Run) {
    let Some(dir) = &run.shim_dir else {
        return;
    };
    if crate::agents::recipe(&run.task.agent).is_none() {
        return;
    }
    let app = &run.app;
    app.hub.flush().await;
    let Ok(events) = app
        .store
        .events_of_kinds(&run.attempt.id, &["agent_session"], 0)
        .await
    else {
        return;
    };
    let Some(EventKind::AgentSession {
        agent,
        session_id,
        process,
        ..
    }) = events.into_iter().last().map(|e| e.kind)
    else {
        return;
    };
    let shim = ShimClient::new(dir);
    let cancel = serde_json::json!({
        "jsonrpc": "2.0",
        "method": "session/cancel",
        "params": {"sessionId": session_id},
    });
    if shim
        .write(&process, format!("{cancel}\n").as_bytes(), true)
        .await
        .is_err()
    {
        // It is not running any more.
        return;
    }
    let stopped = tokio::time::timeout(CANCEL_GRACE, shim.follow(&process, 0, &mut |_| {}))
        .await
        .is_ok();
    run.progress(if stopped {
        format!("asked {agent} to cancel its turn (session/cancel); it stopped")
    } else {
        format!(
            "asked {agent} to cancel its turn (session/cancel); it did not stop within {} s and goes with its sandbox",
            CANCEL_GRACE.as_secs()
        )
    })
    .await;
}

/// Output streamed per call before a catch-up stops adding to it (as
/// while the agent runs).
const CATCH_UP_MAX: usize = 1024 * 1024;

/// Before the sandbox of an attempt that did not succeed goes: what its
/// shim journaled of the interrupted call's command (the agent was stopped
/// mid-command: cancelled, out of time or budget) and is not on the record
/// yet is recorded, so the log shows how it ended.
async fn catch_up_output(run: &Run) {
    let Some(dir) = &run.shim_dir else {
        return;
    };
    let app = &run.app;
    app.hub.flush().await;
    let Ok(replay) = replay(app, &run.attempt.id).await else {
        return;
    };
    let Ok(entries) = ShimClient::new(dir).journal(0).await else {
        return;
    };
    let mut added: std::collections::HashMap<String, usize> = Default::default();
    for entry in entries {
        let backshift_shim::Entry::Output {
            seq,
            id,
            stream,
            text,
        } = entry
        else {
            continue;
        };
        // Shim commands are named `t<turn>:<call id>:<op>`.
        let Some(call_id) = id
            .split_once(':')
            .and_then(|(_, rest)| rest.rsplit_once(':'))
            .map(|(call, _)| call.to_owned())
        else {
            continue;
        };
        let recorded = replay.output_recorded.get(&call_id).copied().unwrap_or(0);
        if !replay.announced.contains(&call_id)
            || replay.reported.contains(&call_id)
            || seq <= recorded
        {
            continue;
        }
        let total = added.entry(call_id.clone()).or_default();
        if *total >= CATCH_UP_MAX {
            continue;
        }
        *total += text.len();
        let stream = match stream {
            backshift_shim::Stream::Stdout => backshift_protocol::OutputStream::Stdout,
            backshift_shim::Stream::Stderr => backshift_protocol::OutputStream::Stderr,
        };
        let _ = app
            .hub
            .emit(
                &run.attempt.id,
                EventKind::CommandOutput {
                    call_id,
                    stream,
                    text,
                    journal_seq: Some(seq),
                },
            )
            .await;
    }
}

/// Returns when the attempt has used its wall time: since `started_at`,
/// less the time it spent paused or waiting for a person (read from the
/// store each time the clock would run out, so a hold stops it).
async fn wall_clock(app: &App, attempt: &str, started_at: i64, wall: Duration) {
    let wall_ms = wall.as_millis() as i64;
    let mut held = (0, AttemptState::Running, started_at);
    loop {
        let now = backshift_protocol::now_ms();
        if let Ok(Some(a)) = app.store.attempt(attempt).await {
            held = (a.held_ms, a.state, a.updated_at);
        }
        let (held_ms, state, since) = held;
        let used =
            backshift_core::deadlines::wall_time_used(started_at, held_ms, state, since, now);
        if used >= wall_ms && !state.holds_wall_time() {
            return;
        }
        // While held, look again now and then; otherwise when it would
        // run out (at most a minute ahead: a hold may begin meanwhile).
        let wait = if state.holds_wall_time() {
            1_000
        } else {
            (wall_ms - used).clamp(10, 60_000)
        };
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
}

/// At most this many recoveries per attempt: a sandbox that keeps dying
/// is a failure, not a loop.
const MAX_RECOVERIES: u32 = 10;

async fn drive(run: &mut Run) -> Result<(), Failure> {
    let mut recoveries = 0;
    loop {
        let result = match run.state {
            AttemptState::Provisioning => fresh(run).await,
            AttemptState::Recovering => {
                recoveries += 1;
                if recoveries > MAX_RECOVERIES {
                    return Err(Failure(
                        FailureReason::SandboxFailed,
                        format!("the sandbox was lost {MAX_RECOVERIES} times; giving up"),
                    ));
                }
                recover(run).await
            }
            // Only a paused attempt a person resumed starts out running.
            AttemptState::Running => resume(run).await,
            other => {
                return Err(Failure(
                    FailureReason::Internal,
                    format!("the runner cannot continue an attempt that is {other}"),
                ));
            }
        };
        match result {
            Ok(()) => return Ok(()),
            Err(Halt::Fail(f)) => return Err(f),
            Err(Halt::Lost(why)) => {
                run.progress(format!("sandbox lost: {why}")).await;
                run.discard_sandbox().await;
                run.step(Transition::SandboxLost, Some(why)).await?;
            }
        }
    }
}

/// From the queue: a new sandbox, the checkout, the agent, the branch.
async fn fresh(run: &mut Run) -> Result<(), Halt> {
    fetch_base(run).await?;
    resolve_environment(run).await?;
    provision(run, None, true).await?;
    run.step(Transition::SandboxReady, None).await?;
    let from_setup = run.env.as_ref().is_some_and(|e| e.setup_cached);
    prepare(run, None, from_setup).await?;
    setup(run, false).await?;
    run.step(Transition::Prepared, None).await?;
    let conversation = Conversation::new(&run.task.prompt, WORKDIR);
    finish(run, None, 0, conversation).await
}

/// After a restart or a lost sandbox. A surviving sandbox whose shim
/// answers is adopted as it is: nothing in it was lost, commands it runs
/// keep running, and the agent continues its conversation exactly where
/// it was (tool calls it had decided are carried out, a running command
/// is followed rather than started again). Otherwise a new sandbox is
/// built from the newest checkpoint and the agent resumes from there,
/// told what was lost. When the agent had already finished, publishing
/// runs again.
async fn recover(run: &mut Run) -> Result<(), Halt> {
    let app = run.app.clone();
    let fail = |reason, msg: String| Halt::Fail(Failure(reason, msg));
    let internal = |e: &dyn std::fmt::Display| fail(FailureReason::Internal, e.to_string());
    let checkpoint = app
        .store
        .latest_checkpoint(&run.attempt.id)
        .await
        .map_err(|e| internal(&e))?;
    let adopted = adopt(run).await?;
    let mut snapshot = None;
    if !adopted {
        snapshot = usable_snapshot(run).await;
        fetch_base(run).await?;
        resolve_environment(run).await?;
        provision(run, snapshot.as_deref(), checkpoint.is_none()).await?;
        let from_setup = run.env.as_ref().is_some_and(|e| e.setup_cached);
        prepare(run, checkpoint.as_ref(), snapshot.is_some() || from_setup).await?;
        setup(run, snapshot.is_some()).await?;
        // The conversation goes back to the checkpoint too.
        app.store
            .set_conversation_len(
                &run.attempt.id,
                checkpoint.as_ref().map_or(0, |c| c.messages),
            )
            .await
            .map_err(|e| internal(&e))?;
    }
    let _ = app
        .hub
        .emit(
            &run.attempt.id,
            EventKind::Restored {
                checkpoint: checkpoint.as_ref().map_or(0, |c| c.n),
                turn: checkpoint.as_ref().map_or(0, |c| c.turn),
                adopted,
                snapshot,
            },
        )
        .await;
    run.step(Transition::Recovered, None).await?;
    // Every token the attempt used counts, the interrupted turn's too.
    let tokens_used = app
        .store
        .model_tokens_used(&run.attempt.id)
        .await
        .map_err(|e| internal(&e))?;
    let parse = |bodies: Vec<String>| stored_messages(&bodies).map_err(Halt::Fail);
    if adopted {
        let live = parse(
            app.store
                .live_messages(&run.attempt.id)
                .await
                .map_err(|e| internal(&e))?,
        )?;
        let saved = live.len() as u32;
        // What the log holds of the work under way (the built-in agent's
        // interrupted turn, or the command agent's run).
        let replay = replay(&app, &run.attempt.id)
            .await
            .map_err(|e| internal(&e))?;
        // Nothing stored yet (the first model request was in flight, or
        // an agent without a conversation): it starts over, in the
        // sandbox as it is, following what already runs there.
        let conversation = if live.is_empty() {
            Conversation {
                tokens_used,
                replay,
                ..Conversation::new(&run.task.prompt, WORKDIR)
            }
        } else {
            let turns = completed_turns(&live);
            Conversation::continued(live, turns, tokens_used, replay)
        };
        return finish(run, checkpoint.as_ref(), saved, conversation).await;
    }
    let conversation = match &checkpoint {
        Some(cp) => {
            let messages = parse(
                app.store
                    .messages(&run.attempt.id, cp.messages)
                    .await
                    .map_err(|e| internal(&e))?,
            )?;
            // A checkpoint taken during the first turn has no
            // conversation yet: start it, with the note.
            let messages = if messages.is_empty() {
                Conversation::new(&run.task.prompt, WORKDIR).messages
            } else {
                messages
            };
            Conversation::resumed(messages, cp.turn, 0, "the sandbox was lost and rebuilt")
        }
        None => Conversation::new(&run.task.prompt, WORKDIR),
    };
    let conversation = Conversation {
        tokens_used,
        ..conversation
    };
    let saved = checkpoint.as_ref().map_or(0, |c| c.messages);
    finish(run, checkpoint.as_ref(), saved, conversation).await
}

/// A paused attempt, resumed: its stopped sandbox starts again with its
/// files as they were (its shim afresh: what ran in it was ended by the
/// stop), and the agent goes on from its last completed turn, told what
/// happened. A sandbox gone meanwhile is a lost one: rebuilt from the
/// last checkpoint.
async fn resume(run: &mut Run) -> Result<(), Halt> {
    let app = run.app.clone();
    let id = run.attempt.id.clone();
    let internal = |e: &dyn std::fmt::Display| Failure(FailureReason::Internal, e.to_string());
    let driver = driver(&app).await?;
    let row = app
        .store
        .attempt(&id)
        .await
        .map_err(|e| internal(&e))?
        .ok_or_else(|| internal(&"the attempt is gone"))?;
    let found = crate::pool::sandboxes(&app, Some(&id))
        .await
        .map_err(|e| Halt::Lost(format!("cannot list the attempt's sandboxes: {e}")))?;
    let kept = keep_prepared(&driver, found, row.prepared_sandbox.as_deref(), |_| true).await;
    let Some((sb, dir)) = kept else {
        return Err(Halt::Lost(
            "its stopped sandbox is gone (removed while the attempt was paused)".into(),
        ));
    };
    let short = sb.id.0[..12.min(sb.id.0.len())].to_owned();
    // The shim makes its socket and journal anew when it starts.
    let _ = tokio::fs::remove_file(dir.join(backshift_shim::proto::SOCKET)).await;
    if !sb.running
        && let Err(e) = driver.resume(&sb.id).await
    {
        let _ = driver.destroy(&sb.id).await;
        remove_shim_dir(&dir).await;
        return Err(Halt::Lost(format!(
            "its stopped sandbox {short} could not be started again: {e}"
        )));
    }
    run.sandbox = Some((driver, sb.id));
    run.shim_dir = Some(dir.clone());
    shim_ready(&dir).await.map_err(|f| Halt::Lost(f.1))?;
    run.endpoints = Some(Endpoints::start(&app, &id, &dir)?);
    run.progress(format!(
        "sandbox {short} started again with its files as they were; what ran in it was ended when it stopped"
    ))
    .await;
    engine::resume(run).await?;
    run.reopen_note =
        Some("a person paused the task: its sandbox was stopped and started again".into());
    let checkpoint = app
        .store
        .latest_checkpoint(&id)
        .await
        .map_err(|e| internal(&e))?;
    let tokens_used = app
        .store
        .model_tokens_used(&id)
        .await
        .map_err(|e| internal(&e))?;
    let live = stored_messages(
        &app.store
            .live_messages(&id)
            .await
            .map_err(|e| internal(&e))?,
    )?;
    let live = Conversation::completed_prefix(live);
    let saved = live.len() as u32;
    app.store
        .set_conversation_len(&id, saved)
        .await
        .map_err(|e| internal(&e))?;
    let conversation = if live.is_empty() {
        Conversation {
            tokens_used,
            ..Conversation::new(&run.task.prompt, WORKDIR)
        }
    } else {
        let turns = completed_turns(&live);
        Conversation::after_stop(live, turns, tokens_used)
    };
    finish(run, checkpoint.as_ref(), saved, conversation).await
}

/// The conversation's messages as the store keeps them (JSON text).
fn stored_messages(bodies: &[String]) -> Result<Vec<serde_json::Value>, Failure> {
    bodies
        .iter()
        .map(|b| serde_json::from_str(b))
        .collect::<Result<_, _>>()
        .map_err(|e| Failure(FailureReason::Internal, format!("stored message: {e}")))
}

/// Of the attempt's sandboxes (`found`), the one whose checkout was
/// completely copied in (`prepared`), with its shim directory, when it
/// is `usable`; the others are removed with their shim directories.
async fn keep_prepared(
    driver: &Arc<dyn SandboxDriver>,
    found: Vec<backshift_sandbox::SandboxInfo>,
    prepared: Option<&str>,
    usable: impl Fn(&backshift_sandbox::SandboxInfo) -> bool,
) -> Option<(backshift_sandbox::SandboxInfo, PathBuf)> {
    let mut kept = None;
    for sb in found {
        // Its Docker engine goes with it (see `engine`).
        if sb.labels.get(labels::ROLE).map(String::as_str) == Some(engine::ROLE) {
            continue;
        }
        let dir = sb.labels.get(labels::SHIM_DIR).map(PathBuf::from);
        match dir {
            Some(dir) if kept.is_none() && prepared == Some(sb.id.0.as_str()) && usable(&sb) => {
                kept = Some((sb, dir));
            }
            dir => {
                let _ = driver.destroy(&sb.id).await;
                if let Some(dir) = dir {
                    remove_shim_dir(&dir).await;
                }
            }
        }
    }
    kept
}

/// The attempt's newest filesystem snapshot, when its image is still on
/// the Docker host.
async fn usable_snapshot(run: &mut Run) -> Option<String> {
    let app = run.app.clone();
    let image = app
        .store
        .attempt(&run.attempt.id)
        .await
        .ok()
        .flatten()?
        .snapshot_image?;
    run.attempt.snapshot_image = Some(image.clone());
    if !app.uses_docker() {
        return None;
    }
    let driver = app.docker().await.ok()?;
    match driver.image_exists(&image).await {
        Ok(true) => Some(image),
        _ => {
            run.progress(format!(
                "the filesystem snapshot {image} is gone; rebuilding from the image instead"
            ))
            .await;
            None
        }
    }
}

/// Turns the conversation has completed: one assistant message each, not
/// counting a last one whose tool calls still wait for results.
fn completed_turns(messages: &[serde_json::Value]) -> u32 {
    let role = |m: &serde_json::Value| {
        m.get("role")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    let assistants = messages
        .iter()
        .filter(|m| role(m).as_deref() == Some("assistant"))
        .count() as u32;
    let last = messages
        .iter()
        .rposition(|m| role(m).as_deref() == Some("assistant"));
    let pending = last.is_some_and(|i| {
        let calls = messages[i]
            .get("tool_calls")
            .and_then(serde_json::Value::as_array)
            .map_or(0, Vec::len);
        let results = messages[i + 1..]
            .iter()
            .filter(|m| role(m).as_deref() == Some("tool"))
            .count();
        results < calls
    });
    assistants - u32::from(pending)
}

/// What the log already holds of the calls of the interrupted turn.
async fn replay(app: &App, attempt: &str) -> Result<Replay, backshift_store::StoreError> {
    // The interrupted turn began after the last model response; an
    // iteration after a failed verification began after that.
    let since = app
        .store
        .last_seq_of_kind(attempt, "model_response")
        .await?
        .max(app.store.last_seq_of_kind(attempt, "verification").await?);
    let events = app
        .store
        .events_of_kinds(
            attempt,
            &[
                "tool_call",
                "tool_result",
                "command_output",
                "agent_finished",
            ],
            since.saturating_sub(1),
        )
        .await?;
    let mut replay = Replay::default();
    for e in events {
        match e.kind {
            EventKind::ToolCall { call_id, .. } => {
                replay.announced.insert(call_id);
            }
            EventKind::ToolResult { call_id, .. } => {
                replay.reported.insert(call_id);
            }
            EventKind::AgentFinished { .. } => replay.finished = true,
            EventKind::CommandOutput {
                call_id,
                journal_seq: Some(seq),
                ..
            } => {
                let upto = replay.output_recorded.entry(call_id).or_default();
                *upto = (*upto).max(seq);
            }
            _ => {}
        }
    }
    Ok(replay)
}

/// The agent (unless it already finished: its summary is stored), then,
/// when the project has a verify command, verification in a fresh
/// sandbox: a failure gives the agent the report and another iteration
/// while `limits.max_iterations` allows. Then publishing.
async fn finish(
    run: &mut Run,
    checkpoint: Option<&CheckpointRow>,
    saved: u32,
    conversation: Conversation,
) -> Result<(), Halt> {
    let internal = |e: &dyn std::fmt::Display| Failure(FailureReason::Internal, e.to_string());
    let plan = verify::plan(run).await?;
    if plan.is_some() {
        verify::resume_iteration(run)
            .await
            .map_err(|e| internal(&e))?;
    }
    let conversation = verify::with_feedback(run, conversation);
    let mut next = Some((checkpoint.cloned(), saved, conversation));
    loop {
        let summary = match run.attempt.summary.clone() {
            Some(s) => {
                run.progress("the agent had finished before the interruption; going on from there")
                    .await;
                s
            }
            None => {
                let (checkpoint, saved, conversation) = match next.take() {
                    Some(n) => n,
                    None => verify::next_conversation(run)
                        .await
                        .map_err(|e| internal(&e))?,
                };
                let s = work(run, checkpoint.as_ref(), saved, conversation).await?;
                run.app
                    .store
                    .update_attempt(
                        &run.attempt.id,
                        &AttemptUpdate {
                            summary: Some(&s),
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|e| internal(&e))?;
                run.attempt.summary = Some(s.clone());
                s
            }
        };
        next = None;
        let Some(plan) = &plan else {
            run.step(Transition::AgentFinished { verify: false }, None)
                .await?;
            let head = commit_work(run, &summary).await?;
            publish(run, &summary, &head).await?;
            run.step(Transition::Published, None).await?;
            return Ok(());
        };
        run.step(Transition::AgentFinished { verify: true }, None)
            .await?;
        let head = commit_work(run, &summary).await?;
        let result = verify::verify(run, plan, &head).await?;
        if result.passed {
            run.step(Transition::VerificationPassed, None).await?;
            publish(run, &summary, &head).await?;
            run.step(Transition::Published, None).await?;
            return Ok(());
        }
        let max = run.task.limits.max_iterations;
        if result.iteration >= max {
            return Err(Failure(
                FailureReason::VerificationFailed,
                verify::final_failure(&result, max, &plan.command),
            )
            .into());
        }
        verify::begin_iteration(run, &result)
            .await
            .map_err(|e| internal(&e))?;
        run.step(
            Transition::VerificationFailed,
            Some(format!(
                "verification {} of {max} failed; the agent gets the report and works on (limits.max_iterations = {max})",
                result.iteration
            )),
        )
        .await?;
    }
}

/// Adopts the attempt's surviving sandbox when its checkout was complete
/// and its shim answers (one request on the shim's socket: no call to
/// Docker when the supervisor's listing already found it). Removes the
/// others. Returns whether it adopted.
async fn adopt(run: &mut Run) -> Result<bool, Halt> {
    let app = run.app.clone();
    let Ok(driver) = app.driver().await else {
        return Ok(false);
    };
    let found = match app.supervisor.take_survivors(&run.attempt.id) {
        Some(found) => found,
        None => crate::pool::sandboxes(&app, Some(&run.attempt.id))
            .await
            .unwrap_or_default(),
    };
    // Only a sandbox whose checkout was completely copied in: one the
    // interruption caught while it was being prepared is rebuilt.
    let prepared = app
        .store
        .attempt(&run.attempt.id)
        .await
        .ok()
        .flatten()
        .and_then(|a| a.prepared_sandbox);
    let Some((sb, dir)) = keep_prepared(&driver, found, prepared.as_deref(), |sb| sb.running).await
    else {
        return Ok(false);
    };
    let id = sb.id;
    let short = &id.0[..12.min(id.0.len())];
    match ShimClient::new(&dir).status().await {
        Ok(status) => {
            let running = if status.running.is_empty() {
                "no command running".to_owned()
            } else {
                format!("still running: {}", status.running.join(", "))
            };
            run.progress(format!(
                "re-attached to sandbox {short}: its journal holds {} entries; {running}",
                status.last_seq
            ))
            .await;
        }
        Err(e) => {
            run.progress(format!(
                "sandbox {short} survived but cannot be re-attached ({e}); building a new one"
            ))
            .await;
            let _ = driver.destroy(&id).await;
            remove_shim_dir(&dir).await;
            return Ok(false);
        }
    }
    run.endpoints = Some(Endpoints::start(&app, &run.attempt.id, &dir)?);
    run.sandbox = Some((driver, id));
    run.shim_dir = Some(dir);
    Ok(true)
}

/// What the control plane serves a sandbox on sockets in its shim
/// directory: the model gateway and the egress proxy. Both stop when this
/// is dropped.
struct Endpoints {
    _gateway: crate::gateway::Gateway,
    _egress: crate::egress::Egress,
    _git: crate::sandbox_git::SandboxGit,
}

impl Endpoints {
    fn start(app: &Arc<App>, attempt: &str, dir: &std::path::Path) -> Result<Self, Failure> {
        let failed = |what: &str, e: std::io::Error| {
            Failure(
                FailureReason::SandboxFailed,
                format!("cannot serve the {what} in {}: {e}", dir.display()),
            )
        };
        Ok(Endpoints {
            _gateway: crate::gateway::start(app.clone(), attempt, dir)
                .map_err(|e| failed("model gateway", e))?,
            _egress: crate::egress::start(app.clone(), attempt, dir)
                .map_err(|e| failed("egress proxy", e))?,
            _git: crate::sandbox_git::start(app.clone(), attempt, dir)
                .map_err(|e| failed("git endpoint", e))?,
        })
    }
}

/// Gives the attempt its agent sandbox: a warm one from the pool when one
/// is ready for its environment, else a new one, from `snapshot` when
/// given (a rebuild that keeps installed packages and caches), otherwise
/// from the environment's image. Either way the sandbox is made the
/// attempt's through its shim ([`identity_env`]). `checkout`: the
/// sandbox gets the base commit's checkout (not a checkpoint's), so a
/// large repository's may come in its image ([`checkout_image`]).
async fn provision(run: &mut Run, snapshot: Option<&str>, checkout: bool) -> Result<(), Failure> {
    let app = run.app.clone();
    let with_engine = engine::wanted(run).await;
    let image = match (snapshot, &run.env) {
        (Some(s), _) => s.to_owned(),
        (None, Some(env)) => env.image.clone(),
        // The engine image is the default one with Docker's CLI too.
        (None, None) if with_engine && app.config.sandbox.image.is_none() => {
            engine::ensure_image(run, docker(&app).await?.as_ref()).await?
        }
        (None, None) => app.config.image(),
    };
    // Images are Docker's (the process driver runs the host's tools).
    if app.uses_docker() {
        let driver = docker(&app).await?;
        let pull = match (snapshot, &run.env) {
            (Some(_), _) => false,
            // A devcontainer's image (built ones exist already).
            (None, Some(_)) => {
                app.config.sandbox.pull == crate::config::PullPolicy::Missing
                    && !driver.image_exists(&image).await.unwrap_or(true)
            }
            (None, None) => app.config.pulls_image(),
        };
        if pull {
            ensure_pulled(run, &driver, &image).await?;
        }
    }
    run.checkout_image = None;
    let image = match (snapshot, checkout) {
        (None, true) => match checkout_image(run, &image).await {
            Some(prepared) => {
                run.checkout_image = Some(prepared.clone());
                prepared
            }
            None => image,
        },
        _ => image,
    };
    let identity = identity_env(run).await?;
    let placeholder = app.data_dir.join("run").join("unmade");
    let mut template = base_spec(
        &app,
        &image,
        run.env.as_ref().map(|e| e.env.clone()).unwrap_or_default(),
        &placeholder,
    );
    template.mounts.extend(agent_mounts(&app));
    let started = std::time::Instant::now();
    // A sandbox made ahead cannot have its engine's socket (nor an
    // attempt's own snapshot).
    let claimed = match (snapshot, with_engine) {
        (None, false) => {
            app.pool
                .claim(&app, &template, &run.attempt.id, &run.task.id)
                .await
        }
        (Some(_), _) => Err(None),
        (None, true) => Err(Some(
            "the project's sandboxes have their own Docker engine".into(),
        )),
    };
    let (driver, id, shim_dir) = match claimed {
        Ok(warm) => {
            run.progress(format!(
                "sandbox {} taken from the warm pool (made {} s ago{})",
                &warm.id.0[..12.min(warm.id.0.len())],
                warm.age_ms / 1000,
                if app.uses_docker() {
                    format!(" from {image}")
                } else {
                    String::new()
                }
            ))
            .await;
            (driver(&app).await?, warm.id, warm.shim_dir)
        }
        Err(miss) => {
            let made = if app.uses_docker() {
                format!("creating sandbox from {image}")
            } else {
                "creating sandbox (process driver: this host's own tools)".to_owned()
            };
            run.progress(match miss {
                Some(why) => format!("{made}: no warm sandbox ({why})"),
                None => made,
            })
            .await;
            let shim_dir = new_shim_dir(&app, &run.attempt.id).map_err(|e| {
                Failure(
                    FailureReason::SandboxFailed,
                    format!(
                        "cannot create the sandbox's shim directory under {}: {e}",
                        app.data_dir.display()
                    ),
                )
            })?;
            let mut spec = sandbox_spec(run, &image, &shim_dir, "agent");
            spec.mounts.extend(agent_mounts(&app));
            if with_engine {
                engine::prepare_spec(run, &mut spec, engine::AGENT).await?;
            }
            let (driver, id) = create_sandbox(run, &spec, &shim_dir, true).await?;
            (driver, id, shim_dir)
        }
    };
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
    run.sandbox = Some((driver, id.clone()));
    run.shim_dir = Some(shim_dir.clone());
    run.endpoints = Some(Endpoints::start(&app, &run.attempt.id, &shim_dir)?);
    shim_ready(&shim_dir).await?;
    ShimClient::new(&shim_dir)
        .set_env(identity)
        .await
        .map_err(|e| {
            Failure(
                FailureReason::SandboxFailed,
                format!("the sandbox's shim did not take the attempt's variables: {e}"),
            )
        })?;
    run.progress(format!(
        "sandbox {} is up in {} ms",
        &id.0[..12.min(id.0.len())],
        started.elapsed().as_millis()
    ))
    .await;
    if with_engine {
        engine::start(run, &id, engine::AGENT).await?;
    }
    Ok(())
}

/// The server's sandbox driver, or why the attempt cannot have a sandbox.
async fn driver(app: &App) -> Result<Arc<dyn SandboxDriver>, Failure> {
    if !app.uses_docker() {
        return app
            .driver()
            .await
            .map_err(|e| Failure(FailureReason::SandboxFailed, e));
    }
    Ok(docker(app).await?)
}

/// The Docker driver, or why the attempt cannot have a sandbox.
async fn docker(app: &App) -> Result<Arc<DockerDriver>, Failure> {
    app.docker().await.map_err(|e| {
        Failure(
            FailureReason::SandboxFailed,
            format!(
                "{e}. Start the Docker daemon (`cargo xtask up` does), then submit the task again."
            ),
        )
    })
}

/// Waits for a new sandbox's shim to answer.
async fn shim_ready(shim_dir: &Path) -> Result<(), Failure> {
    ShimClient::new(shim_dir)
        .wait_ready(Duration::from_secs(15))
        .await
        .map(|_| ())
        .map_err(|e| Failure(
            FailureReason::SandboxFailed,
            format!(
                "the sandbox started but its shim ({SANDBOX_BINARY} shim, backshift's own binary mounted read-only) did not answer: {e}. The binary must be statically linked (build backshift from its repository, whose cargo config does that) and the image must let user {SANDBOX_UID} run it."
            ),
        ))
}

/// The limits of every sandbox (`[sandbox]`; the disk limit unless the
/// host refused one).
fn sandbox_limits(app: &App) -> ResourceLimits {
    ResourceLimits {
        memory_bytes: app.config.sandbox.memory_mb * 1024 * 1024,
        nano_cpus: (app.config.sandbox.cpus * 1e9) as i64,
        pids: app.config.sandbox.pids,
        disk_bytes: app
            .config
            .sandbox
            .disk_mb
            .filter(|_| app.disk_limit_unsupported.get().is_none())
            .map(|mb| mb * 1024 * 1024),
    }
}

/// What every sandbox of the attempt has, whatever it is for (`role`:
/// `agent` or `verify`): its labels (see [`base_spec`] for the rest).
fn sandbox_spec(run: &Run, image: &str, shim_dir: &Path, role: &str) -> SandboxSpec {
    let devcontainer_env = run.env.as_ref().map(|e| e.env.clone()).unwrap_or_default();
    SandboxSpec {
        name: if role == "agent" {
            format!("backshift-{}", run.attempt.id)
        } else {
            format!("backshift-{}-{role}", run.attempt.id)
        },
        labels: BTreeMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (labels::INSTANCE.to_owned(), run.app.instance.clone()),
            (labels::TASK.to_owned(), run.task.id.clone()),
            (labels::ATTEMPT.to_owned(), run.attempt.id.clone()),
            (labels::SHIM_DIR.to_owned(), shim_dir.display().to_string()),
            (labels::ROLE.to_owned(), role.to_owned()),
        ]),
        ..base_spec(&run.app, image, devcontainer_env, shim_dir)
    }
}

/// What every sandbox has, whoever it is for (no name or labels yet):
/// its limits, the non-root user, the devcontainer's variables, the
/// egress proxy, the custom CAs, and the shim (backshift's binary,
/// read-only, and its directory). An agent's sandbox adds the installed
/// agents ([`agent_mounts`]), and later, through its shim, the model,
/// its git endpoint and secrets ([`identity_env`]).
pub(crate) fn base_spec(
    app: &App,
    image: &str,
    devcontainer_env: Vec<(String, String)>,
    shim_dir: &Path,
) -> SandboxSpec {
    SandboxSpec {
        image: image.to_owned(),
        name: String::new(),
        labels: BTreeMap::new(),
        limits: sandbox_limits(app),
        user: format!("{SANDBOX_UID}:{SANDBOX_UID}"),
        workdir: WORKDIR.into(),
        // The devcontainer's variables first: backshift's own, after
        // them, are the ones in effect (they are refused there anyway).
        env: devcontainer_env
            .into_iter()
            .chain([
                ("HOME".into(), "/home/agent".into()),
                ("LANG".into(), "C.UTF-8".into()),
            ])
            // The network, through the egress proxy.
            .chain(crate::egress::sandbox_env())
            // Custom CA certificates, where tools look for them.
            .chain(app.ca.iter().flat_map(crate::certs::CaFiles::env))
            .collect(),
        mounts: [
            Mount {
                host: app.shim_binary.clone(),
                target: SANDBOX_BINARY.into(),
                read_only: true,
            },
            Mount {
                host: shim_dir.to_owned(),
                target: SANDBOX_DIR.into(),
                read_only: false,
            },
        ]
        .into_iter()
        // Custom CA certificates, read-only (the bundle also where the
        // system trust store is).
        .chain(app.ca.iter().flat_map(|ca| {
            [
                (ca.bundle.clone(), crate::certs::SANDBOX_BUNDLE),
                (ca.extra.clone(), crate::certs::SANDBOX_EXTRA),
                (ca.bundle.clone(), crate::certs::SYSTEM_BUNDLE),
            ]
            .map(|(host, target)| Mount {
                host,
                target: target.into(),
                read_only: true,
            })
        }))
        .collect(),
        command: Some(vec![SANDBOX_BINARY.into(), "shim".into()]),
    }
}

/// The installed agents, read-only (installed once per host): every
/// agent sandbox has them.
pub(crate) fn agent_mounts(app: &App) -> impl Iterator<Item = Mount> {
    crate::agents::installed(&app.config.agents_dir())
        .into_iter()
        .map(|a| Mount {
            target: a.sandbox_dir(),
            host: a.dir,
            read_only: true,
        })
}

/// What makes an agent's sandbox its attempt's: the model through the
/// gateway with the sandbox's own token (the provider's key never enters
/// it), its own branch through its git endpoint, and the project's
/// granted secrets. Given through the shim once the sandbox is up (a
/// warm sandbox was made before there was an attempt), never in the
/// sandbox's definition.
async fn identity_env(run: &Run) -> Result<Vec<(String, String)>, Failure> {
    let app = &run.app;
    let secrets = crate::secrets::sandbox_env(app, &run.task.project_id, false)
        .await
        .map_err(|e| {
            Failure(
                FailureReason::SandboxFailed,
                format!("{e}. Fix the key configuration ([secrets] key_file, previous_key_files) or set the secret again (`backshift secrets set`), then submit the task again."),
            )
        })?;
    let token = crate::gateway::issue_token(app, &run.attempt.id)
        .await
        .map_err(|e| Failure(FailureReason::Internal, e.to_string()))?;
    let gateway = crate::gateway::base_url_in_sandbox();
    Ok([
        ("OPENAI_BASE_URL".into(), gateway.clone()),
        ("OPENAI_API_KEY".into(), token.clone()),
        // Anthropic's SDKs add `/v1/messages` themselves.
        (
            "ANTHROPIC_BASE_URL".into(),
            gateway.trim_end_matches("/v1").to_owned(),
        ),
        ("ANTHROPIC_API_KEY".into(), token.clone()),
        // Gemini's SDK adds `/v1beta/models/...` itself.
        (
            "GOOGLE_GEMINI_BASE_URL".into(),
            gateway.trim_end_matches("/v1").to_owned(),
        ),
        ("GEMINI_API_KEY".into(), token.clone()),
        ("BACKSHIFT_MODEL_URL".into(), gateway),
        ("BACKSHIFT_MODEL_TOKEN".into(), token.clone()),
        ("BACKSHIFT_MODEL".into(), app.config.model.model.clone()),
    ]
    .into_iter()
    .chain(crate::sandbox_git::sandbox_env(
        &run.task.project_id,
        &run.attempt.branch,
        &token,
    ))
    .chain(secrets)
    .collect())
}

/// Creates a sandbox from `spec` (without the disk limit when the
/// storage driver cannot apply one; `warn`: say so on the attempt's log).
/// Removes the shim directory when it fails.
async fn create_sandbox(
    run: &Run,
    spec: &SandboxSpec,
    shim_dir: &Path,
    warn: bool,
) -> Result<(Arc<dyn SandboxDriver>, SandboxId), Failure> {
    let app = run.app.clone();
    let driver = driver(&app).await?;
    let created = create_limited(&app, driver.as_ref(), spec).await;
    if let (true, Some(_), Some(why)) = (
        warn,
        app.config.sandbox.disk_mb,
        app.disk_limit_unsupported.get(),
    ) {
        run.warn(format!(
                        "the disk limit ([sandbox] disk_mb) is not applied: {} cannot limit a sandbox's disk ({why}); sandboxes run without one (their disk use is in GET /api/v1/sandboxes)",
                        if app.uses_docker() { "Docker's storage driver here" } else { "the process driver" }
                    )).await;
    }
    if created.is_err() {
        remove_shim_dir(shim_dir).await;
    }
    let id = created.map_err(|e| match e {
        SandboxError::ImageMissing(image) => Failure(
            FailureReason::ImageMissing,
            format!(
                "the sandbox image {image} does not exist on this Docker host: {}, then submit the task again.",
                app.config.missing_image_fix()
            ),
        ),
        other => Failure(FailureReason::SandboxFailed, format!("cannot create the sandbox: {other}")),
    })?;
    Ok((driver, id))
}

/// Creates a sandbox from `spec`, without its disk limit when the host
/// cannot apply one (found out once: later sandboxes do not ask again).
pub(crate) async fn create_limited(
    app: &App,
    driver: &dyn SandboxDriver,
    spec: &SandboxSpec,
) -> Result<SandboxId, SandboxError> {
    let created = driver.create(spec).await;
    if let Err(SandboxError::DiskLimitUnsupported(why)) = &created {
        let _ = app.disk_limit_unsupported.set(why.clone());
        let mut unlimited = spec.clone();
        unlimited.limits.disk_bytes = None;
        return driver.create(&unlimited).await;
    }
    created
}

/// A new, empty shim directory for a sandbox of `attempt` (or, for a
/// warm one, `warm`), owned by the sandbox's user (the shim writes its
/// socket and journal there).
pub(crate) fn new_shim_dir(app: &App, attempt: &str) -> std::io::Result<PathBuf> {
    let suffix: u32 = rand::random();
    let dir = app
        .data_dir
        .join("run")
        .join(format!("{attempt}-{suffix:08x}"));
    std::fs::create_dir_all(&dir)?;
    let uid = u32::try_from(SANDBOX_UID).map_err(std::io::Error::other)?;
    std::os::unix::fs::chown(&dir, Some(uid), Some(uid))?;
    Ok(dir)
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

/// Puts the repository into the sandbox on the attempt's branch: fetched
/// into the git store the first time (the base is pinned there), exported
/// from the pin afterwards, with a checkpoint's tree when recovering.
/// Where the attempt's base commit is pinned in the git store.
fn base_pin(run: &Run) -> String {
    format!("refs/backshift/base/{}", run.attempt.id)
}

/// The attempt's base commit: fetched from the repository into the git
/// store the first time, pinned, and remembered.
async fn fetch_base(run: &mut Run) -> Result<String, Failure> {
    if let Some(base) = run.attempt.base_commit.clone() {
        return Ok(base);
    }
    let app = run.app.clone();
    run.progress(format!("fetching {} into the git store", run.task.repo))
        .await;
    // A forge's repository is fetched with its token.
    let token = match app.config.forge_for(&run.task.repo).map(|f| f.token()) {
        Some(Ok(t)) => t,
        Some(Err(why)) => return Err(Failure(FailureReason::CloneFailed, why)),
        None => None,
    };
    let base = app
        .git
        .fetch_source_with(
            &run.task.project_id,
            &run.task.repo,
            run.task.base_ref.as_deref(),
            &base_pin(run),
            token.as_deref(),
        )
        .await
        .map_err(|e| {
            Failure(
                FailureReason::CloneFailed,
                format!("cannot fetch {}: {e}", run.task.repo),
            )
        })?;
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
    Ok(base)
}

/// Reads the repository's devcontainer.json (unless turned off) into
/// `run.env`: the image, built when it has to be, and the setup plan.
async fn resolve_environment(run: &mut Run) -> Result<(), Failure> {
    if !run.app.config.sandbox.devcontainer {
        return Ok(());
    }
    let base = fetch_base(run).await?;
    let env = crate::environment::resolve(&run.app, &run.attempt.id, &run.task.project_id, &base)
        .await
        .map_err(|(reason, detail)| Failure(reason, detail))?;
    run.env = env;
    Ok(())
}

/// The setup phase, after the checkout: `postCreateCommand` when this
/// state has no setup snapshot yet (then the sandbox is committed as
/// one), and `postStartCommand` in every new sandbox. `on_snapshot`: the
/// sandbox was rebuilt from the attempt's own filesystem snapshot, which
/// holds the setup already.
async fn setup(run: &mut Run, on_snapshot: bool) -> Result<(), Halt> {
    let Some(env) = run.env.clone() else {
        return Ok(());
    };
    let app = run.app.clone();
    let (driver, id) = run.sandbox()?;
    if let (Some(post_create), Some(tag)) = (&env.post_create, &env.setup_image) {
        if env.setup_cached || on_snapshot {
            run.progress(format!(
                "setup skipped: the sandbox starts from {}, the environment after postCreateCommand for the same lockfiles and environment definition",
                if on_snapshot { "the attempt's own snapshot".to_owned() } else { tag.clone() }
            ))
            .await;
        } else {
            // Setup-only secrets: for this command alone.
            let secrets = crate::secrets::sandbox_env(&app, &run.task.project_id, true)
                .await
                .map_err(|e| {
                    Failure(
                        FailureReason::SetupFailed,
                        format!("{e}; the setup cannot run without it"),
                    )
                })?;
            lifecycle(run, "postCreateCommand", post_create, secrets).await?;
            let labels = BTreeMap::from([
                (labels::MANAGED.to_owned(), "true".to_owned()),
                ("dev.backshift.kind".to_owned(), "setup".to_owned()),
                (
                    "dev.backshift.project".to_owned(),
                    run.task.project_id.clone(),
                ),
            ]);
            let started = std::time::Instant::now();
            match driver.snapshot(&id, tag, &labels).await {
                Ok(_) => {
                    run.progress(format!(
                        "setup saved as {tag} in {} ms: the next attempt on the same lockfiles and environment definition starts from it",
                        started.elapsed().as_millis()
                    ))
                    .await;
                }
                Err(e) => {
                    run.warn(format!(
                        "the setup could not be saved ({e}); the next attempt runs it again"
                    ))
                    .await;
                }
            }
        }
    }
    if let Some(post_start) = &env.post_start {
        lifecycle(run, "postStartCommand", post_start, Vec::new()).await?;
    }
    Ok(())
}

/// Runs a devcontainer lifecycle command in the checkout, its output
/// streamed as the events of a `setup:NAME` call.
async fn lifecycle(
    run: &mut Run,
    name: &str,
    command: &crate::devcontainer::Lifecycle,
    env: Vec<(String, String)>,
) -> Result<(), Halt> {
    let Some(dir) = run.shim_dir.clone() else {
        return Err(Failure(FailureReason::Internal, "no shim directory at setup".into()).into());
    };
    run_lifecycle(run, &dir, &format!("setup:{name}"), name, command, env).await
}

/// Runs a devcontainer lifecycle command in the checkout of the sandbox
/// whose shim directory is `dir`, as the events of call `call_id`.
async fn run_lifecycle(
    run: &Run,
    dir: &Path,
    call_id: &str,
    name: &str,
    command: &crate::devcontainer::Lifecycle,
    env: Vec<(String, String)>,
) -> Result<(), Halt> {
    let script = command.script();
    let call_id = call_id.to_owned();
    let sink = AttemptSink {
        app: run.app.clone(),
        attempt: run.attempt.id.clone(),
    };
    sink.emit(EventKind::ToolCall {
        call_id: call_id.clone(),
        name: name.to_owned(),
        arguments: serde_json::json!({ "command": script }),
        kind: Some("execute".into()),
        title: Some(format!("setup: {name}")),
    })
    .await;
    let tools = SandboxTools::new(
        ShimClient::new(dir),
        WORKDIR,
        Duration::from_secs(run.task.limits.command_timeout_secs),
    );
    let key = backshift_agent::CallKey {
        turn: 0,
        call_id: call_id.clone(),
        output_recorded: 0,
    };
    let started = std::time::Instant::now();
    let out = tools
        .run_script(&key, &script, env, Vec::new(), &sink)
        .await;
    let exit = out
        .exit
        .map_err(|e| Halt::Lost(format!("while running {name}: {e}")))?;
    let ok = exit.code == 0 && exit.error.is_none();
    sink.emit(EventKind::ToolResult {
        call_id,
        name: name.to_owned(),
        ok,
        exit_code: Some(exit.code),
        output: out.for_model.clone(),
        duration_ms: started.elapsed().as_millis() as u64,
    })
    .await;
    if !ok {
        let tail = out.stderr_tail.trim();
        return Err(Failure(
            FailureReason::SetupFailed,
            format!(
                "the devcontainer's {name} exited {}{}; fix it in the repository and submit the task again.{}",
                exit.code,
                exit.error.map(|e| format!(" ({e})")).unwrap_or_default(),
                if tail.is_empty() { String::new() } else { format!(" The end of its stderr:\n{tail}") }
            ),
        )
        .into());
    }
    Ok(())
}

async fn prepare(
    run: &mut Run,
    restore: Option<&CheckpointRow>,
    on_snapshot: bool,
) -> Result<(), Halt> {
    let app = run.app.clone();
    let (driver, id) = run.sandbox()?;
    let clone_failed = |what: &str, e: &dyn std::fmt::Display| {
        Failure(FailureReason::CloneFailed, format!("{what}: {e}"))
    };
    let pin = base_pin(run);
    let base = fetch_base(run).await?;
    if restore.is_none()
        && let Some(image) = run.checkout_image.clone()
    {
        return checkout_from_image(run, &driver, &id, &image, &base).await;
    }
    run.progress(format!(
        "checking out {} on branch {}",
        &base[..12],
        run.attempt.branch
    ))
    .await;
    let (_scratch, tree) = export_tree(run, &pin, &base).await?;
    if let Some(cp) = restore {
        run.progress(format!(
            "restoring checkpoint {} (after turn {})",
            cp.n, cp.turn
        ))
        .await;
        app.git
            .restore_tree(
                &run.task.project_id,
                &checkpoint::store_ref(&run.attempt.id),
                &cp.commit_sha,
                &tree,
            )
            .await
            .map_err(|e| clone_failed("cannot restore the checkpoint", &e))?;
    }
    let tar = workspace_tar(tree).await?;
    let size = tar.len();
    if on_snapshot {
        // The snapshot's checkout is older than the checkpoint: its files
        // (tracked or not) and its .git go, ignored files (dependencies,
        // build output) stay.
        let scrub = ExecSpec {
            argv: vec![
                "bash".into(),
                "-c".into(),
                crate::checkout_image::SCRUB_SCRIPT.into(),
            ],
            ..Default::default()
        };
        match driver.exec_collect(&id, &scrub).await {
            Ok(o) if o.exit_code == 0 => {}
            Ok(o) => {
                return Err(clone_failed(
                    "cannot clear the snapshot's checkout",
                    &String::from_utf8_lossy(&o.stderr).trim(),
                )
                .into());
            }
            Err(e) => {
                return Err(Halt::Lost(format!(
                    "while clearing the snapshot's checkout: {e}"
                )));
            }
        }
    }
    if let Err(e) = driver.copy_in(&id, "/", tar.into()).await {
        if !checkpoint::sandbox_alive(driver.as_ref(), &id).await {
            return Err(Halt::Lost(format!("while copying the checkout in: {e}")));
        }
        return Err(clone_failed("cannot copy the checkout into the sandbox", &e).into());
    }
    mark_prepared(run, &id).await?;
    run.progress(format!("repository in the sandbox ({} KiB)", size / 1024))
        .await;
    Ok(())
}

/// The sandbox's checkout is complete: from here on it can be adopted as
/// it is after a restart.
async fn mark_prepared(run: &mut Run, id: &SandboxId) -> Result<(), Failure> {
    run.app
        .store
        .update_attempt(
            &run.attempt.id,
            &AttemptUpdate {
                prepared_sandbox: Some(&id.0),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Failure(FailureReason::Internal, e.to_string()))?;
    run.attempt.prepared_sandbox = Some(id.0.clone());
    Ok(())
}

/// The checkout is in the sandbox's image already: its branch becomes the
/// attempt's.
async fn checkout_from_image(
    run: &mut Run,
    driver: &Arc<dyn SandboxDriver>,
    id: &SandboxId,
    image: &str,
    base: &str,
) -> Result<(), Halt> {
    let spec = ExecSpec {
        argv: vec![
            "git".into(),
            "-c".into(),
            "core.hooksPath=/dev/null".into(),
            "branch".into(),
            "-m".into(),
            crate::checkout_image::BRANCH.into(),
            run.attempt.branch.clone(),
        ],
        workdir: Some(WORKDIR.into()),
        ..Default::default()
    };
    match driver.exec_collect(id, &spec).await {
        Ok(o) if o.exit_code == 0 => {}
        Ok(o) => {
            return Err(Failure(
                FailureReason::CloneFailed,
                format!(
                    "cannot name the checkout's branch: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
            )
            .into());
        }
        Err(e) => {
            if !checkpoint::sandbox_alive(driver.as_ref(), id).await {
                return Err(Halt::Lost(format!(
                    "while naming the checkout's branch: {e}"
                )));
            }
            return Err(Failure(
                FailureReason::CloneFailed,
                format!("cannot name the checkout's branch: {e}"),
            )
            .into());
        }
    }
    mark_prepared(run, id).await?;
    run.progress(format!(
        "{} checked out on branch {}: the sandbox's image {image} holds it",
        &base[..12],
        run.attempt.branch
    ))
    .await;
    Ok(())
}

/// A large repository's checkout of the base commit as an image on top
/// of `image` (made from the mirror when missing, see
/// [`crate::checkout_image`]); `None` when the repository is small, the
/// sandboxes are not Docker's, or it could not be made (a warning says
/// why: the checkout is then copied in as usual).
async fn checkout_image(run: &Run, image: &str) -> Option<String> {
    let app = &run.app;
    let threshold = app.config.sandbox.checkout_image_files;
    if threshold == 0 || !app.uses_docker() {
        return None;
    }
    let base = run.attempt.base_commit.clone()?;
    let files = app.git.file_count(&run.task.project_id, &base).await.ok()?;
    if files < threshold {
        return None;
    }
    let driver = app.docker().await.ok()?;
    // One at a time: parallel attempts on one commit make it once.
    let _one = app.checkout_images.lock().await;
    let started = std::time::Instant::now();
    let pin = base_pin(run);
    let source = crate::checkout_image::Source {
        git: &app.git,
        project: &run.task.project_id,
        pin: &pin,
        commit: &base,
    };
    run.progress(format!(
        "{files} files at {}: the checkout comes in an image layer of {image}",
        &base[..12.min(base.len())]
    ))
    .await;
    match crate::checkout_image::ensure(
        &driver,
        &source,
        image,
        sandbox_limits(app),
        (&app.instance, &app.replica),
    )
    .await
    {
        Ok(p) => {
            use crate::checkout_image::Made;
            let how = match &p.made {
                Made::Existing => "made before".to_owned(),
                Made::Advanced { from } => format!(
                    "made in {} ms: a layer of what changed since {}",
                    started.elapsed().as_millis(),
                    &from[..12.min(from.len())]
                ),
                Made::Whole => format!(
                    "made in {} ms from the mirror",
                    started.elapsed().as_millis()
                ),
            };
            run.progress(format!("checkout image {} {how}", p.image))
                .await;
            Some(p.image)
        }
        Err(e) => {
            run.warn(format!("the checkout could not be made as an image ({e}); it is copied into the sandbox instead")).await;
            None
        }
    }
}

/// A checkout of `commit` (fetched from the store's ref `pin`) on the
/// attempt's branch, in a scratch directory removed when the returned
/// guard is dropped.
async fn export_tree(
    run: &Run,
    pin: &str,
    commit: &str,
) -> Result<(tempfile::TempDir, PathBuf), Failure> {
    let app = &run.app;
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        Failure(FailureReason::CloneFailed, format!("{what}: {e}"))
    };
    let scratch = tempfile::tempdir_in(app.data_dir.join("tmp"))
        .map_err(|e| failed("cannot create a scratch directory", &e))?;
    let tree = scratch.path().join("workspace");
    app.git
        .export_checkout(
            &run.task.project_id,
            pin,
            commit,
            &run.attempt.branch,
            &tree,
        )
        .await
        .map_err(|e| failed(&format!("cannot check out {commit}"), &e))?;
    Ok((scratch, tree))
}

/// A checkout directory as a tar of `workspace/`, owned by the sandbox's
/// user, for copying into a sandbox at `/`.
async fn workspace_tar(tree: PathBuf) -> Result<Vec<u8>, Failure> {
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        Failure(FailureReason::CloneFailed, format!("{what}: {e}"))
    };
    let owner = Owner {
        uid: SANDBOX_UID,
        gid: SANDBOX_UID,
    };
    tokio::task::spawn_blocking(move || archive_dir(&tree, "workspace", owner))
        .await
        .map_err(|e| failed("archiving failed", &e))?
        .map_err(|e| failed("cannot archive the checkout", &e))
}

/// Runs the agent from `conversation`, checkpointing each turn, while
/// watching that the sandbox lives.
async fn work(
    run: &mut Run,
    checkpoint: Option<&CheckpointRow>,
    saved: u32,
    conversation: Conversation,
) -> Result<String, Halt> {
    let app = run.app.clone();
    let (driver, id) = run.sandbox()?;
    let shim_dir = run
        .shim_dir
        .clone()
        .ok_or_else(|| Failure(FailureReason::Internal, "the sandbox has no shim".into()))?;
    let tools = SandboxTools::new(
        ShimClient::new(&shim_dir),
        WORKDIR,
        Duration::from_secs(run.task.limits.command_timeout_secs),
    );
    let sink = AttemptSink {
        app: app.clone(),
        attempt: run.attempt.id.clone(),
    };
    let base = run.attempt.base_commit.clone().unwrap_or_default();
    let journal = AttemptJournal::new(
        app.clone(),
        &run.attempt.id,
        &run.task.project_id,
        &base,
        WORKDIR,
        driver.clone(),
        id.clone(),
        checkpoint,
        saved,
        run.attempt.snapshot_image.clone(),
    );
    let agent: std::pin::Pin<Box<dyn std::future::Future<Output = AgentOutcome> + Send + '_>> =
        match (run.task.agent.as_str(), run.task.command.as_deref()) {
            ("command", Some(script)) => Box::pin(run_command_agent(
                &tools,
                CommandRun {
                    script,
                    prompt: &run.task.prompt,
                    iteration: run.iteration,
                    feedback: run.feedback.as_deref(),
                },
                crate::agents::installed(&app.config.agents_dir())
                    .iter()
                    .map(|a| a.sandbox_bin_dir())
                    .collect(),
                &sink,
                &journal,
                &conversation.replay,
            )),
            (name, None) if crate::agents::recipe(name).is_some() => {
                let (launch, resume) = acp_setup(run, &shim_dir, &conversation).await?;
                let shim = ShimClient::new(&shim_dir);
                let (sink, journal, prompt) = (&sink, &journal, run.task.prompt.clone());
                Box::pin(async move {
                    run_acp_agent(&shim, &launch, &prompt, sink, journal, resume).await
                })
            }
            _ => {
                let model_config = app
                    .model_config()
                    .map_err(|e| Failure(FailureReason::ModelError, e))?;
                let model = ModelClient::new(model_config)
                    .map_err(|e| Failure(FailureReason::ModelError, e.to_string()))?;
                let (tools, sink, journal) = (&tools, &sink, &journal);
                let limits = run.task.limits;
                Box::pin(async move {
                    run_agent(
                        &model,
                        tools,
                        sink,
                        journal,
                        conversation,
                        limits.max_turns,
                        limits.max_tokens,
                    )
                    .await
                })
            }
        };
    // The supervisor lists all sandboxes once a second; a listing taken
    // after this point that lacks ours means it is gone.
    let watch = app
        .supervisor
        .sandbox_gone(&id.0, std::time::Instant::now());
    // Long turns are checkpointed meanwhile; a sandbox found gone then
    // ends the work like a failed turn-end checkpoint.
    let every = Duration::from_secs(app.config.checkpoint_every_secs.max(1));
    let ticker = async {
        loop {
            tokio::time::sleep(every.min(Duration::from_secs(1)).max(every / 4)).await;
            if let Err(why) = journal.tick(every).await {
                return why;
            }
        }
    };
    let outcome = tokio::select! {
        outcome = agent => outcome,
        why = ticker => return Err(Halt::Lost(why)),
        () = watch => return Err(Halt::Lost("the sandbox stopped while the agent worked".into())),
    };
    match outcome {
        AgentOutcome::Finished { summary } => Ok(summary),
        AgentOutcome::Stopped { reason, detail } => Err(Failure(reason, detail).into()),
        AgentOutcome::Interrupted { detail } => Err(Halt::Lost(detail)),
    }
}

/// How to run the task's installed agent over ACP in this sandbox, and
/// where it starts from: a first session, or the one an earlier
/// generation of it opened (a restart or a lost sandbox).
async fn acp_setup(
    run: &Run,
    shim_dir: &Path,
    conversation: &Conversation,
) -> Result<(AcpLaunch, AcpResume), Failure> {
    let app = &run.app;
    let name = run.task.agent.as_str();
    let dir = app.config.agents_dir();
    if let Some((why, fix)) = crate::agents::not_runnable(&app.config, name) {
        return Err(Failure(
            FailureReason::AgentCrashed,
            format!("{why}; {fix}"),
        ));
    }
    let all = crate::agents::installed(&dir);
    let installed = all
        .iter()
        .find(|a| a.manifest.name == name)
        .ok_or_else(|| {
            Failure(
                FailureReason::AgentCrashed,
                format!("{name} is not installed"),
            )
        })?;
    let (argv, env) = crate::agents::launch(
        installed,
        shim_dir,
        &crate::agents::AgentSetup {
            model: &app.config.model.model,
            anthropic_model: app
                .config
                .model
                .anthropic_model
                .as_deref()
                .unwrap_or(&app.config.model.model),
            gemini_model: app
                .config
                .model
                .gemini_model
                .as_deref()
                .unwrap_or(&app.config.model.model),
            ask: &app.config.agents.ask,
        },
    )
    .map_err(|e| {
        Failure(
            FailureReason::SandboxFailed,
            format!("cannot configure {name} for this attempt: {e}"),
        )
    })?;
    let launch = AcpLaunch {
        agent: name.to_owned(),
        argv,
        env,
        path_prepend: all.iter().map(|a| a.sandbox_bin_dir()).collect(),
        cwd: WORKDIR.into(),
        permissions: match app.config.agents.permission_policy {
            PermissionPolicySetting::Allow => PermissionPolicy::Allow,
            PermissionPolicySetting::Deny => PermissionPolicy::Deny,
            PermissionPolicySetting::Ask => {
                PermissionPolicy::Ask(Arc::new(crate::approvals::PermissionApprover {
                    app: app.clone(),
                    attempt: run.attempt.id.clone(),
                }))
            }
        },
        max_tool_calls: run.task.limits.max_turns,
    };
    let internal = |e: backshift_store::StoreError| Failure(FailureReason::Internal, e.to_string());
    let events = app
        .store
        .events_of_kinds(
            &run.attempt.id,
            &["agent_session", "tool_call", "verification"],
            0,
        )
        .await
        .map_err(internal)?;
    let mut resume = AcpResume {
        generation: 1,
        finished: conversation.replay.finished,
        feedback: run.feedback.clone(),
        ..Default::default()
    };
    for e in events {
        match e.kind {
            EventKind::AgentSession {
                session_id,
                process,
                ..
            } => {
                let n: u32 = process
                    .strip_prefix("acp:")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                resume.generation = resume.generation.max(n + 1);
                resume.session_id = Some(session_id);
                resume.why = Some(run.reopen_note.clone().unwrap_or_else(|| {
                    "the control plane restarted or the sandbox was lost".into()
                }));
            }
            EventKind::ToolCall { .. } => resume.tool_calls += 1,
            // A session before a verification ended its turn: reopening
            // it starts another iteration, not a recovery.
            EventKind::Verification { .. } => resume.why = None,
            _ => {}
        }
    }
    Ok((launch, resume))
}

/// A publishing step's failure.
fn publish_failed(what: &str, e: &dyn std::fmt::Display) -> Failure {
    Failure(FailureReason::PublishFailed, format!("{what}: {e}"))
}

/// The attempt's base commit (pinned before its work began) and branch.
fn base_and_branch(run: &Run) -> Result<(String, String), Failure> {
    let base = run
        .attempt
        .base_commit
        .clone()
        .ok_or_else(|| Failure(FailureReason::Internal, "no base commit".into()))?;
    Ok((base, run.attempt.branch.clone()))
}

/// Where the attempt's committed work is kept in the git store until it
/// is published on its branch (verification checks it out from there).
fn work_ref(run: &Run) -> String {
    format!("refs/backshift/work/{}", run.attempt.id)
}

/// Commits what the agent left in its sandbox (as backshift, hooks
/// disabled) and brings the branch back into the git store under
/// [`work_ref`]. Returns the commit: the base when nothing changed.
/// Idempotent: run again after an interruption, it finds nothing left
/// to commit and brings the same branch back.
async fn commit_work(run: &mut Run, summary: &str) -> Result<String, Halt> {
    let app = run.app.clone();
    let (driver, id) = run.sandbox()?;
    let (base, branch) = base_and_branch(run)?;
    let git = &app.config.git;
    let message = commit_message(summary, &run.task.id);
    // Commit everything the agent left, as backshift, hooks disabled; then
    // bundle the new commits for the trip back to the host.
    // Idempotent: a publish interrupted after its commit finds nothing
    // left to commit and bundles the same branch again.
    let script = format!(
        "set -e\ngit add -A\nif ! git diff --cached --quiet; then\n\
         git -c core.hooksPath=/dev/null -c user.name=\"$GN\" -c user.email=\"$GE\" commit --quiet --no-verify -F -\nfi\n\
         if [ \"$(git rev-parse HEAD)\" = \"{base}\" ]; then echo NO_CHANGES; exit 0; fi\n\
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
    let out = match driver.exec_collect(&id, &spec).await {
        Ok(o) if o.exit_code == 0 => o,
        other => {
            if !checkpoint::sandbox_alive(driver.as_ref(), &id).await {
                return Err(Halt::Lost("the sandbox stopped while publishing".into()));
            }
            other.map_err(|e| publish_failed("cannot run git in the sandbox", &e))?
        }
    };
    if out.exit_code != 0 {
        return Err(publish_failed(
            "git commit in the sandbox failed",
            &String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )
        .into());
    }
    let work = work_ref(run);
    let head = if String::from_utf8_lossy(&out.stdout).contains("NO_CHANGES") {
        run.progress("the agent made no changes; the branch points at the base commit")
            .await;
        app.git
            .set_ref(&run.task.project_id, &work, &base)
            .await
            .map_err(|e| publish_failed("cannot record the work", &e))?;
        base.clone()
    } else {
        let tar = driver
            .copy_out(&id, "/tmp/backshift.bundle")
            .await
            .map_err(|e| publish_failed("cannot copy the bundle out of the sandbox", &e))?;
        let bundle =
            first_file(&tar).map_err(|e| publish_failed("the bundle archive is unreadable", &e))?;
        let file = tempfile::NamedTempFile::new_in(app.data_dir.join("tmp"))
            .map_err(|e| publish_failed("scratch file", &e))?;
        tokio::fs::write(file.path(), &bundle)
            .await
            .map_err(|e| publish_failed("scratch file", &e))?;
        app.git
            .import_bundle_ref(
                &run.task.project_id,
                file.path(),
                &format!("refs/heads/{branch}"),
                &work,
            )
            .await
            .map_err(|e| publish_failed("cannot import the branch into the git store", &e))?
    };
    Ok(head)
}

/// Points the attempt's branch in the git store at `head` (its committed
/// work, verified when verification is on) and records the diff.
async fn publish(run: &mut Run, summary: &str, head: &str) -> Result<(), Halt> {
    let app = run.app.clone();
    let (base, branch) = base_and_branch(run)?;
    let head = head.to_owned();
    app.git
        .set_branch(&run.task.project_id, &branch, &head)
        .await
        .map_err(|e| publish_failed("cannot set the branch", &e))?;
    let stat = app
        .git
        .diff_stat(&run.task.project_id, &base, &head)
        .await
        .map_err(|e| publish_failed("cannot compute the diff", &e))?;
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
    use super::{commit_message, completed_turns};
    use serde_json::json;

    #[test]
    fn a_turn_counts_once_its_calls_have_results() {
        let calls = json!([{"id": "a"}, {"id": "b"}]);
        let mut m = vec![
            json!({"role": "system"}),
            json!({"role": "user"}),
            json!({"role": "assistant", "tool_calls": [{"id": "x"}]}),
            json!({"role": "tool"}),
            json!({"role": "assistant", "tool_calls": calls}),
            json!({"role": "tool"}),
        ];
        assert_eq!(completed_turns(&m), 1, "the second turn waits for b");
        m.push(json!({"role": "tool"}));
        assert_eq!(completed_turns(&m), 2);
        m.push(json!({"role": "assistant", "content": "plain"}));
        assert_eq!(completed_turns(&m), 3);
        assert_eq!(completed_turns(&m[..2]), 0);
    }

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
