//! The supervisor: starts queued attempts as slots free up, owns every
//! running attempt's task and cancellation token, and on start-up settles
//! what a previous run of the server left behind.

use crate::attempt;
use crate::serve::App;
use backshift_core::{AttemptState, FailureReason, Transition};
use backshift_sandbox::{SandboxDriver, labels};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Running attempts and the means to stop them.
#[derive(Default)]
pub struct Supervisor {
    wake: Notify,
    running: Mutex<HashMap<String, CancellationToken>>,
    tracker: TaskTracker,
}

impl Supervisor {
    /// Asks the loop to look for queued attempts now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Cancels a running attempt; false when it is not running here.
    pub fn cancel(&self, attempt: &str) -> bool {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        match running.get(attempt) {
            Some(token) => {
                token.cancel();
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
        for token in self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            token.cancel();
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Settles the previous run's leftovers: attempts that were active when
/// the server stopped are failed honestly (`control_plane_restarted`) and
/// this instance's sandboxes are removed. Queued attempts stay queued.
pub async fn recover(app: &App) -> anyhow::Result<()> {
    let active: Vec<AttemptState> = AttemptState::ALL
        .into_iter()
        .filter(|s| !s.is_terminal() && *s != AttemptState::Queued)
        .collect();
    for a in app.store.attempts_in_states(&active).await? {
        let detail = format!(
            "the server stopped while this attempt was {}; its sandbox was removed. Submit the task again to retry.",
            a.state
        );
        if let Err(e) = app
            .hub
            .transition(
                &a.id,
                a.state,
                Transition::Fail(FailureReason::ControlPlaneRestarted),
                Some(detail),
            )
            .await
        {
            tracing::warn!(attempt = %a.id, "could not settle attempt: {e}");
        }
    }
    if let Ok(driver) = app.docker().await {
        let leftovers = driver
            .list(&[(labels::MANAGED, "true"), (labels::INSTANCE, &app.instance)])
            .await?;
        for sb in leftovers {
            tracing::info!(sandbox = %sb.id, "removing sandbox left by a previous run");
            driver.destroy(&sb.id).await?;
        }
    }
    Ok(())
}

/// The loop: start queued attempts while slots are free.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    loop {
        if let Err(e) = start_queued(&app).await {
            tracing::error!("supervisor: {e:#}");
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
        let token = CancellationToken::new();
        app.supervisor
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(a.id.clone(), token.clone());
        let app2 = app.clone();
        app.supervisor.tracker.spawn(async move {
            let id = a.id.clone();
            attempt::run(app2.clone(), a, token).await;
            app2.supervisor
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            app2.supervisor.wake();
        });
    }
    Ok(())
}
