//! The supervisor: starts queued attempts as slots free up, owns every
//! running attempt's task and cancellation token, and on start-up settles
//! what a previous run of the server left behind.

use crate::attempt;
use crate::serve::App;
use backshift_core::{AttemptState, Transition};
use backshift_sandbox::{SandboxDriver, SandboxInfo, labels};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Running attempts and the means to stop them.
#[derive(Default)]
pub struct Supervisor {
    wake: Notify,
    running: Mutex<HashMap<String, Arc<Stop>>>,
    tracker: TaskTracker,
    /// Sandboxes found at start-up, by attempt, for the recovering
    /// runners to adopt without listing again.
    survivors: Mutex<HashMap<String, Vec<SandboxInfo>>>,
}

/// How a runner is told to stop, and why.
#[derive(Default)]
pub struct Stop {
    token: CancellationToken,
    why: Mutex<Option<(Transition, String)>>,
}

impl Stop {
    /// Asks the runner to end the attempt with `transition` (the first
    /// reason given wins).
    pub fn stop(&self, transition: Transition, detail: String) {
        let mut why = self.why.lock().unwrap_or_else(|p| p.into_inner());
        if why.is_none() {
            *why = Some((transition, detail));
        }
        self.token.cancel();
    }

    /// Resolves when a stop was asked for.
    pub async fn requested(&self) {
        self.token.cancelled().await
    }

    /// The transition and detail asked for (cancellation when none was
    /// given).
    pub fn reason(&self) -> (Transition, String) {
        self.why
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or((Transition::Cancel, "cancelled on request".to_owned()))
    }
}

impl Supervisor {
    /// Asks the loop to look for queued attempts now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The sandboxes of `attempt` found at start-up (once; `None` after
    /// that, or when there was no start-up listing).
    pub fn take_survivors(&self, attempt: &str) -> Option<Vec<SandboxInfo>> {
        self.survivors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(attempt)
    }

    /// Cancels a running attempt; false when it is not running here.
    pub fn cancel(&self, attempt: &str) -> bool {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        match running.get(attempt) {
            Some(stop) => {
                stop.stop(Transition::Cancel, "cancelled on request".to_owned());
                true
            }
            None => false,
        }
    }

    fn running_count(&self) -> usize {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn is_running(&self, attempt: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(attempt)
    }

    /// Cancels everything and waits for the attempts' tasks to end.
    pub async fn shutdown(&self) {
        for stop in self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            stop.stop(
                Transition::Cancel,
                "cancelled: the server was shut down".to_owned(),
            );
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Picks up what a previous run of the server left: every attempt that was
/// active (not queued, not paused) gets a runner again, which records the
/// interruption and recovers it from its last checkpoint, adopting its
/// sandbox when that survived. Sandboxes of this instance that belong to
/// no active attempt are removed. Queued attempts stay queued.
pub async fn recover(app: &Arc<App>) -> anyhow::Result<()> {
    let active: Vec<AttemptState> = AttemptState::ALL
        .into_iter()
        .filter(|s| !s.is_terminal() && *s != AttemptState::Queued && *s != AttemptState::Paused)
        .collect();
    let attempts = app.store.attempts_in_states(&active).await?;
    let keep: HashSet<String> = attempts.iter().map(|a| a.id.clone()).collect();
    let kept = remove_strays(app, &keep).await;
    {
        let mut survivors = app
            .supervisor
            .survivors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for a in &attempts {
            survivors.insert(a.id.clone(), Vec::new());
        }
        if let Some(kept) = kept {
            for sb in kept {
                let attempt = sb.labels.get(labels::ATTEMPT).cloned().unwrap_or_default();
                survivors.entry(attempt).or_default().push(sb);
            }
        } else {
            // Docker did not answer: the runners list for themselves.
            survivors.clear();
        }
    }
    for a in attempts {
        tracing::info!(attempt = %a.id, state = %a.state, "resuming attempt after a restart");
        spawn(app, a);
    }
    Ok(())
}

/// Removes this instance's sandboxes whose attempt is not in `keep`;
/// returns the ones kept (`None` when Docker did not answer).
async fn remove_strays(app: &App, keep: &HashSet<String>) -> Option<Vec<SandboxInfo>> {
    let driver = app.docker().await.ok()?;
    let found = driver
        .list(&[(labels::MANAGED, "true"), (labels::INSTANCE, &app.instance)])
        .await
        .ok()?;
    let mut kept = Vec::new();
    for sb in found {
        let attempt = sb.labels.get(labels::ATTEMPT).cloned().unwrap_or_default();
        if keep.contains(&attempt) {
            kept.push(sb);
        } else {
            tracing::info!(sandbox = %sb.id, %attempt, "removing a sandbox no attempt owns");
            if let Err(e) = driver.destroy(&sb.id).await {
                tracing::warn!(sandbox = %sb.id, "cannot remove: {e}");
            }
        }
    }
    Some(kept)
}

/// The loop: start queued attempts while slots are free.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let mut last_sweep = std::time::Instant::now();
    loop {
        if let Err(e) = start_queued(&app).await {
            tracing::error!("supervisor: {e:#}");
        }
        if let Err(e) = enforce_deadlines(&app).await {
            tracing::error!("supervisor: deadlines: {e:#}");
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = std::time::Instant::now();
            let keep: HashSet<String> = app
                .supervisor
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .cloned()
                .collect();
            remove_strays(&app, &keep).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = app.supervisor.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    app.supervisor.shutdown().await;
}

async fn start_queued(app: &Arc<App>) -> anyhow::Result<()> {
    let queued = app
        .store
        .attempts_in_states(&[AttemptState::Queued])
        .await?;
    for a in queued {
        if app.supervisor.running_count() >= app.config.max_concurrent_attempts {
            break;
        }
        if app.supervisor.is_running(&a.id) {
            continue;
        }
        spawn(app, a);
    }
    Ok(())
}

/// How often sandboxes that no running attempt owns are swept away.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// Ends attempts that overstayed their state's deadline: `timed_out`,
/// with the state and the deadline in the detail.
async fn enforce_deadlines(app: &Arc<App>) -> anyhow::Result<()> {
    let active: Vec<AttemptState> = AttemptState::ALL
        .into_iter()
        .filter(|s| !s.is_terminal() && *s != AttemptState::Queued)
        .collect();
    let now = backshift_protocol::now_ms();
    for a in app.store.attempts_in_states(&active).await? {
        // The wall time of a running attempt counts from its first start
        // (the runner enforces it too); other states from their entry.
        let since = match a.state {
            AttemptState::Running => a.started_at.unwrap_or(a.updated_at),
            _ => a.updated_at,
        };
        let limits = match app.store.task(&a.task_id).await? {
            Some(t) => t.limits,
            None => continue,
        };
        let Some(deadline) = a.state.deadline(&app.config.deadlines, &limits) else {
            continue;
        };
        if now - since <= deadline.as_millis() as i64 {
            continue;
        }
        let detail = if a.state == AttemptState::Running {
            format!(
                "the attempt ran out of wall time ({}s, limits.wall_time_secs)",
                deadline.as_secs()
            )
        } else {
            format!(
                "the attempt stayed {} longer than its deadline ({}s, [deadlines] {}_secs)",
                a.state,
                deadline.as_secs(),
                a.state
            )
        };
        let stop = app
            .supervisor
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&a.id)
            .cloned();
        match stop {
            Some(stop) => stop.stop(Transition::Timeout, detail),
            None => {
                let _ = app
                    .hub
                    .transition(&a.id, a.state, Transition::Timeout, Some(detail))
                    .await;
            }
        }
    }
    Ok(())
}

/// Starts a runner for `a` (from the queue, or resuming an interrupted one).
fn spawn(app: &Arc<App>, a: backshift_store::AttemptRow) {
    let stop = Arc::new(Stop::default());
    app.supervisor
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(a.id.clone(), stop.clone());
    let app2 = app.clone();
    app.supervisor.tracker.spawn(async move {
        let id = a.id.clone();
        attempt::run(app2.clone(), a, stop).await;
        app2.supervisor
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        app2.supervisor.wake();
    });
}
