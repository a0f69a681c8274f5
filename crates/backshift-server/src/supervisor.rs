//! The supervisor: starts queued attempts as slots free up, owns every
//! running attempt's task and cancellation token, and on start-up settles
//! what a previous run of the server left behind.

use crate::attempt;
use crate::serve::App;
use backshift_core::{AttemptState, Transition};
use backshift_sandbox::{SandboxInfo, labels};
use backshift_store::AttemptRow;
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
    /// The running sandboxes, from one listing a second for all runners
    /// (instead of one Docker call per runner per second).
    alive: tokio::sync::watch::Sender<Option<Arc<Alive>>>,
}

/// One listing of the running sandboxes.
#[derive(Debug)]
pub struct Alive {
    /// When the listing was asked for: a sandbox created later may be
    /// missing from it.
    pub taken_at: std::time::Instant,
    /// Ids of the running sandboxes.
    pub running: HashSet<String>,
}

/// How a runner is told to stop, and why.
#[derive(Default)]
pub struct Stop {
    token: Mutex<CancellationToken>,
    why: Mutex<Option<StopReason>>,
}

/// Why a runner stops before its attempt ends by itself.
#[derive(Debug, Clone)]
pub enum StopReason {
    /// End the attempt with this transition and detail.
    End(Transition, String),
    /// Walk away without touching it: another replica drives it now.
    Abandon(String),
    /// Stop its sandbox, files kept, until a person resumes it (the
    /// detail says who asked).
    Pause(String),
}

impl Stop {
    /// Asks the runner to end the attempt with `transition` (the first
    /// reason given wins).
    pub fn stop(&self, transition: Transition, detail: String) {
        self.request(StopReason::End(transition, detail));
    }

    /// Asks the runner to leave the attempt alone from now on.
    pub fn abandon(&self, why: String) {
        self.request(StopReason::Abandon(why));
    }

    /// Asks the runner to pause the attempt.
    pub fn pause(&self, detail: String) {
        self.request(StopReason::Pause(detail));
    }

    fn request(&self, reason: StopReason) {
        let mut why = self.why.lock().unwrap_or_else(|p| p.into_inner());
        if why.is_none() {
            *why = Some(reason);
        }
        self.token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancel();
    }

    /// Resolves when a stop was asked for.
    pub async fn requested(&self) {
        let token = self.token.lock().unwrap_or_else(|p| p.into_inner()).clone();
        token.cancelled().await
    }

    /// Whether a stop was asked for (and not withdrawn).
    pub fn is_requested(&self) -> bool {
        self.token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_cancelled()
    }

    /// Withdraws a request that could not be carried out (a pause that
    /// came as the attempt moved on): the runner listens again.
    pub fn withdraw(&self) {
        let mut why = self.why.lock().unwrap_or_else(|p| p.into_inner());
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = CancellationToken::new();
        *why = None;
    }

    /// What was asked for (cancellation when nothing was said).
    pub fn reason(&self) -> StopReason {
        self.why
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or(StopReason::End(
                Transition::Cancel,
                "cancelled on request".to_owned(),
            ))
    }
}

impl Supervisor {
    /// Asks the loop to look for queued attempts now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The stop handle of `attempt`'s runner, when this replica runs it.
    pub fn stop_handle(&self, attempt: &str) -> Option<Arc<Stop>> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(attempt)
            .cloned()
    }

    /// The sandboxes of `attempt` found at start-up (once; `None` after
    /// that, or when there was no start-up listing).
    pub fn take_survivors(&self, attempt: &str) -> Option<Vec<SandboxInfo>> {
        self.survivors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(attempt)
    }

    /// Resolves when a listing taken after `since` no longer shows sandbox
    /// `id` running. Never resolves while Docker does not answer.
    pub async fn sandbox_gone(&self, id: &str, since: std::time::Instant) {
        let mut rx = self.alive.subscribe();
        loop {
            {
                let seen = rx.borrow_and_update();
                if let Some(a) = seen.as_ref()
                    && a.taken_at > since
                    && !a.running.contains(id)
                {
                    return;
                }
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
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

    /// Asks the runner of `attempt` to pause it; false when it is not
    /// running here.
    pub fn pause(&self, attempt: &str, detail: String) -> bool {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        match running.get(attempt) {
            Some(stop) => {
                stop.pause(detail);
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

    /// Leaves every running attempt (to be recovered by the next server)
    /// and waits for the runners to end.
    pub async fn shutdown(&self) {
        for stop in self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            stop.abandon(
                "the server is shutting down; the attempt resumes when a server starts".into(),
            );
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// Start-up: removes sandboxes of this installation that belong to no
/// unfinished attempt, then takes back every active attempt this replica
/// drove before it stopped (and any other whose lease ran out): each gets
/// a runner again, which records the interruption and recovers it from
/// its last checkpoint, adopting its sandbox when that survived. Queued
/// attempts stay queued.
pub async fn recover(app: &Arc<App>) -> anyhow::Result<()> {
    let started = started_attempts(app).await?;
    take_over(app, &started, true).await
}

/// Attempts that left the queue and have not ended (paused ones too): the
/// ones with a deadline and, unless paused, a driver.
async fn started_attempts(app: &App) -> anyhow::Result<Vec<AttemptRow>> {
    let states: Vec<AttemptState> = AttemptState::ALL
        .into_iter()
        .filter(|s| !s.is_terminal() && *s != AttemptState::Queued)
        .collect();
    Ok(app.store.attempts_in_states(&states).await?)
}

/// Claims active attempts that nobody drives: this replica's own from
/// before a restart, unowned ones, and those whose owner's lease ran out
/// (a replica that died). `sweep` also removes sandboxes of no
/// unfinished attempt.
async fn take_over(app: &Arc<App>, started: &[AttemptRow], sweep: bool) -> anyhow::Result<()> {
    let now = backshift_protocol::now_ms();
    let orphans: Vec<AttemptRow> = started
        .iter()
        // A paused attempt is left alone until a person resumes or
        // cancels it.
        .filter(|a| a.state != AttemptState::Paused || a.cancel_requested.is_some())
        .filter(|a| !app.supervisor.is_running(&a.id))
        .filter(|a| {
            a.owner.is_none()
                || a.owner.as_deref() == Some(app.replica.as_str())
                || a.lease_until.unwrap_or(0) < now
        })
        .cloned()
        .collect();
    if orphans.is_empty() && !sweep {
        return Ok(());
    }
    let found = if sweep {
        remove_strays(app).await
    } else {
        list_sandboxes(app).await
    };
    {
        let mut survivors = app
            .supervisor
            .survivors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        survivors.clear();
        if let Some(found) = found {
            for a in &orphans {
                survivors.insert(a.id.clone(), Vec::new());
            }
            for sb in found {
                let attempt = sb.labels.get(labels::ATTEMPT).cloned().unwrap_or_default();
                if let Some(list) = survivors.get_mut(&attempt) {
                    list.push(sb);
                }
            }
        }
    }
    let until = now + lease_ms(app);
    for a in orphans {
        if !app.store.claim(&a.id, &app.replica, now, until).await? {
            continue; // another replica was quicker
        }
        if a.cancel_requested.is_some() {
            // Nobody drives it: a runner ends it (and cleans up after it).
            spawn_ending(app, a, Transition::Cancel, "cancelled on request".into());
            continue;
        }
        let whose = match &a.owner {
            Some(o) if *o == app.replica => "this replica's, from before a restart".to_owned(),
            Some(o) => format!("from replica {o}, whose lease ran out"),
            None => "unowned".to_owned(),
        };
        tracing::info!(attempt = %a.id, state = %a.state, "taking over attempt ({whose})");
        spawn(app, a);
    }
    Ok(())
}

fn lease_ms(app: &App) -> i64 {
    app.config.lease_secs.max(1) as i64 * 1000
}

/// Extends the leases of the attempts running here; a runner whose lease
/// another replica took walks away.
async fn heartbeat(app: &Arc<App>) {
    let running: Vec<(String, Arc<Stop>)> = app
        .supervisor
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let cancels = app
        .store
        .cancel_requests(&app.replica)
        .await
        .unwrap_or_default();
    let pauses = app
        .store
        .pause_requests(&app.replica)
        .await
        .unwrap_or_default();
    let until = backshift_protocol::now_ms() + lease_ms(app);
    for (id, stop) in running {
        if cancels.contains(&id) {
            stop.stop(
                Transition::Cancel,
                "cancelled on request (through another replica)".into(),
            );
        }
        if pauses.contains(&id) {
            stop.pause("paused on request (through another replica)".into());
        }
        match app.store.renew(&id, &app.replica, until).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(attempt = %id, "lease lost to another replica; leaving the attempt to it");
                stop.abandon("another replica took the attempt over".into());
            }
            // Keep driving: if the database stays away, the lease runs out
            // and the next renewal says so.
            Err(e) => tracing::warn!(attempt = %id, "cannot renew the lease: {e}"),
        }
    }
}

/// The sandboxes of this installation (`None` when Docker does not answer).
async fn list_sandboxes(app: &App) -> Option<Vec<SandboxInfo>> {
    crate::pool::sandboxes(app, None).await.ok()
}

/// Removes this installation's sandboxes whose attempt is finished or
/// unknown (any replica's unfinished attempts keep theirs); returns the
/// ones kept (`None` when Docker or the database did not answer).
async fn remove_strays(app: &App) -> Option<Vec<SandboxInfo>> {
    let found = list_sandboxes(app).await?;
    let unfinished: Vec<AttemptState> = AttemptState::ALL
        .into_iter()
        .filter(|s| !s.is_terminal())
        .collect();
    let keep: HashSet<String> = app
        .store
        .attempts_in_states(&unfinished)
        .await
        .ok()?
        .into_iter()
        .map(|a| a.id)
        .collect();
    let driver = app.driver().await.ok()?;
    let mut kept = Vec::new();
    for sb in found {
        let attempt = sb.labels.get(labels::ATTEMPT).cloned().unwrap_or_default();
        let role = sb.labels.get(labels::ROLE).map(String::as_str);
        // Unclaimed warm sandboxes: another replica's pool's, or one
        // this pool holds, stay; the rest were left by an earlier run.
        let warm_kept = role == Some(crate::pool::ROLE)
            && (sb.labels.get(crate::pool::POOL_LABEL) != Some(&app.replica)
                || app.pool.holds(&sb));
        // One making a checkout image is left to its maker: another
        // replica, or this one while it builds (one at a time: while one
        // runs, the lock is held).
        let building = role == Some(crate::checkout_image::ROLE)
            && (sb.labels.get(crate::checkout_image::REPLICA) != Some(&app.replica)
                || app.checkout_images.try_lock().is_err());
        if keep.contains(&attempt) || warm_kept || building {
            kept.push(sb);
        } else {
            tracing::info!(sandbox = %sb.id, %attempt, "removing a sandbox no attempt owns");
            if let Err(e) = driver.destroy(&sb.id).await {
                tracing::warn!(sandbox = %sb.id, "cannot remove: {e}");
            }
        }
    }
    remove_stray_shim_dirs(app, &kept).await;
    // Docker engines' data of attempts that ended while no server ran.
    if let Ok(mut entries) = tokio::fs::read_dir(app.data_dir.join("engines")).await {
        while let Ok(Some(entry)) = entries.next_entry().await {
            let attempt = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&attempt) {
                tracing::info!(%attempt, "removing the data of a Docker engine no attempt owns");
                let _ = tokio::fs::remove_dir_all(entry.path()).await;
            }
        }
    }
    // Filesystem snapshots of attempts that ended while no server ran.
    let snapshots = driver
        .list_snapshots(&[
            (labels::MANAGED, "true"),
            (labels::INSTANCE, app.instance.as_str()),
        ])
        .await
        .unwrap_or_default();
    for (image, image_labels) in snapshots {
        let attempt = image_labels
            .get(labels::ATTEMPT)
            .cloned()
            .unwrap_or_default();
        // Setup and checkout images are no attempt's (an older setup
        // image may still carry the labels of the sandbox it was made
        // from).
        let shared = image_labels
            .get("dev.backshift.kind")
            .is_some_and(|k| k == "setup" || k == "checkout");
        if !shared && !keep.contains(&attempt) {
            tracing::info!(%image, %attempt, "removing a snapshot no attempt owns");
            let _ = driver.remove_snapshot(&image).await;
        }
    }
    Some(kept)
}

/// Shim directories are made just before their sandbox: one that no
/// sandbox names and that is older than this is left over.
const SHIM_DIR_GRACE: Duration = Duration::from_secs(120);

/// Removes shim directories under `<data>/run` that no kept sandbox uses
/// (their sandbox was removed while this server was down).
async fn remove_stray_shim_dirs(app: &App, kept: &[SandboxInfo]) {
    let used: HashSet<std::path::PathBuf> = kept
        .iter()
        .filter_map(|sb| {
            sb.labels
                .get(labels::SHIM_DIR)
                .map(std::path::PathBuf::from)
        })
        .collect();
    let Ok(mut entries) = tokio::fs::read_dir(app.data_dir.join("run")).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let path = entry.path();
        let old = entry
            .metadata()
            .await
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > SHIM_DIR_GRACE);
        if old && !used.contains(&path) {
            tracing::info!(dir = %path.display(), "removing a shim directory no sandbox uses");
            crate::attempt::remove_shim_dir(&path).await;
        }
    }
}

/// The loop: start queued attempts while slots are free.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    let mut last_sweep = std::time::Instant::now();
    loop {
        if let Err(e) = start_queued(&app).await {
            tracing::error!("supervisor: {e:#}");
        }
        heartbeat(&app).await;
        // One read of the started attempts serves the deadlines and the
        // take-over (a runner spawned for an attempt the deadline just
        // ended finds it moved and stops: transitions are compare-and-set).
        match started_attempts(&app).await {
            Ok(started) => {
                if let Err(e) = enforce_deadlines(&app, &started).await {
                    tracing::error!("supervisor: deadlines: {e:#}");
                }
                let sweep = last_sweep.elapsed() >= SWEEP_EVERY;
                if sweep {
                    last_sweep = std::time::Instant::now();
                }
                if let Err(e) = take_over(&app, &started, sweep).await {
                    tracing::error!("supervisor: take-over: {e:#}");
                }
            }
            Err(e) => tracing::error!("supervisor: {e:#}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = app.supervisor.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
    app.supervisor.shutdown().await;
}

/// Starts queued attempts, and paused ones a person asked to resume
/// (those first: their sandboxes already hold resources).
async fn start_queued(app: &Arc<App>) -> anyhow::Result<()> {
    let (resumed, queued): (Vec<AttemptRow>, Vec<AttemptRow>) = app
        .store
        .attempts_in_states(&[AttemptState::Paused, AttemptState::Queued])
        .await?
        .into_iter()
        .filter(|a| {
            a.state == AttemptState::Queued
                || (a.resume_requested.is_some() && a.cancel_requested.is_none())
        })
        .partition(|a| a.state == AttemptState::Paused);
    for a in resumed.into_iter().chain(queued) {
        if app.supervisor.running_count() >= app.config.max_concurrent_attempts {
            break;
        }
        if app.supervisor.is_running(&a.id) {
            continue;
        }
        let now = backshift_protocol::now_ms();
        if !app
            .store
            .claim(&a.id, &app.replica, now, now + lease_ms(app))
            .await?
        {
            continue; // another replica starts it
        }
        spawn(app, a);
    }
    Ok(())
}

/// How often the running sandboxes are listed for the runners' watchers.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Lists the running sandboxes once a second while attempts run here and
/// publishes the listing to every runner's watcher.
pub async fn watch_sandboxes(app: Arc<App>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(WATCH_EVERY) => {}
        }
        if app.supervisor.running_count() == 0 {
            continue;
        }
        let taken_at = std::time::Instant::now();
        if let Some(found) = list_sandboxes(&app).await {
            let running = found
                .into_iter()
                .filter(|s| s.running)
                .map(|s| s.id.0)
                .collect();
            app.supervisor
                .alive
                .send_replace(Some(Arc::new(Alive { taken_at, running })));
        }
    }
}

/// How often sandboxes that no running attempt owns are swept away.
const SWEEP_EVERY: Duration = Duration::from_secs(15);

/// Ends attempts that overstayed their state's deadline: `timed_out`,
/// with the state and the deadline in the detail.
async fn enforce_deadlines(app: &Arc<App>, started: &[AttemptRow]) -> anyhow::Result<()> {
    let now = backshift_protocol::now_ms();
    for a in started {
        // The wall time of a running attempt counts from its first start,
        // less the time it was held (the runner enforces it too); other
        // states count from their entry.
        let used = match a.state {
            AttemptState::Running => backshift_core::deadlines::wall_time_used(
                a.started_at.unwrap_or(a.updated_at),
                a.held_ms,
                a.state,
                a.updated_at,
                now,
            ),
            _ => now - a.updated_at,
        };
        // Only a running attempt's deadline comes from its task.
        let limits = if a.state == AttemptState::Running {
            match app.store.task(&a.task_id).await? {
                Some(t) => t.limits,
                None => continue,
            }
        } else {
            backshift_core::Limits::default()
        };
        let Some(deadline) = a.state.deadline(&app.config.deadlines, &limits) else {
            continue;
        };
        if used <= deadline.as_millis() as i64 {
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
        let orphan = a.owner.is_none() || a.lease_until.unwrap_or(0) < now;
        match stop {
            Some(stop) => stop.stop(Transition::Timeout, detail),
            // Another replica drives it: its supervisor ends it.
            None if !orphan => {}
            // Nobody drives it (a paused one, or its replica died): a
            // runner ends it and cleans up after it.
            None => {
                if app
                    .store
                    .claim(&a.id, &app.replica, now, now + lease_ms(app))
                    .await?
                {
                    spawn_ending(app, a.clone(), Transition::Timeout, detail);
                }
            }
        }
    }
    Ok(())
}

/// Starts a runner for `a` (from the queue, resuming an interrupted or
/// paused one).
fn spawn(app: &Arc<App>, a: AttemptRow) {
    spawn_with(app, a, Arc::new(Stop::default()));
}

/// Starts a runner that only ends `a` with `transition`: it removes what
/// the attempt left (sandboxes, snapshot), keeps its work, and chooses
/// and reports the task's result, as any runner does at the end.
fn spawn_ending(app: &Arc<App>, a: AttemptRow, transition: Transition, detail: String) {
    let stop = Arc::new(Stop::default());
    stop.stop(transition, detail);
    spawn_with(app, a, stop);
}

fn spawn_with(app: &Arc<App>, a: AttemptRow, stop: Arc<Stop>) {
    app.supervisor
        .running
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(a.id.clone(), stop.clone());
    // Another replica may have written to the attempt since this one
    // last did: number its events from the store.
    app.hub.forget(&a.id);
    let app2 = app.clone();
    app.supervisor.tracker.spawn(async move {
        let id = a.id.clone();
        attempt::run(app2.clone(), a, stop).await;
        if let Err(e) = app2.store.release(&id, &app2.replica).await {
            tracing::warn!(attempt = %id, "cannot release the lease: {e}");
        }
        app2.supervisor
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        app2.supervisor.wake();
    });
}
