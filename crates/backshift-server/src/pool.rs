//! The warm pool: sandboxes made ahead of demand, so an attempt starts on
//! one that is already up.
//!
//! A warm sandbox is made exactly as an attempt's agent sandbox would be
//! (image, limits, user, devcontainer variables, egress proxy, CAs, the
//! shim and the installed agents), but it holds no task identity: no
//! attempt label, no model token, no git endpoint, no secret. An attempt
//! whose sandbox would be made from the same definition (the same
//! [`key`]) claims one: the claim is recorded in the store
//! (`sandbox_claims`, since a container's labels cannot change), and the
//! attempt's variables reach its commands through the shim
//! (`set_env`). The pool is refilled at once.
//!
//! Kept warm: `[sandbox] warm` sandboxes of the server's default
//! environment, and of the `[sandbox] warm_environments` environments
//! attempts asked for most recently (a devcontainer's image, a setup
//! snapshot), each dropped after an hour without a claim. Sandboxes with
//! their own Docker engine, and rebuilds from an attempt's own snapshot,
//! are always made new.
//!
//! **Invariant:** a warm sandbox is handed out once, by the replica whose
//! pool made it, and only after its claim is stored; one whose claim is
//! unknown is never handed out (it is removed). Everything that looks
//! for an attempt's sandboxes goes through [`sandboxes`], which names a
//! claimed warm sandbox's attempt.

use crate::serve::App;
use backshift_protocol::{PoolEnvironmentView, PoolView, format_ts, now_ms};
use backshift_sandbox::{SandboxId, SandboxInfo, SandboxSpec, labels};
use backshift_shim::ShimClient;
use backshift_shim::proto::SANDBOX_DIR;
use backshift_store::SandboxClaim;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The role label of a sandbox in the pool (no attempt's yet).
pub const ROLE: &str = "warm";
/// Label: the replica whose pool made the sandbox.
pub const POOL_LABEL: &str = "dev.backshift.pool";
/// An environment no attempt claimed from for this long stops being kept
/// warm (the default one excepted).
const IDLE: Duration = Duration::from_secs(3600);
/// After a sandbox could not be made, its environment waits this long
/// before the next try.
const RETRY: Duration = Duration::from_secs(15);

/// The pool of this replica.
pub struct Pool {
    inner: Mutex<Inner>,
    wake: tokio::sync::Notify,
    since: i64,
}

#[derive(Default)]
struct Inner {
    envs: Vec<Env>,
    hits: u64,
    misses: u64,
    last_miss: Option<String>,
    /// Shim directories of sandboxes being made (the stray sweep leaves
    /// them alone).
    making: HashSet<PathBuf>,
}

struct Env {
    key: String,
    template: SandboxSpec,
    ready: VecDeque<Warm>,
    creating: usize,
    default: bool,
    last_used: i64,
    hits: u64,
    misses: u64,
    last_error: Option<String>,
    retry_at: i64,
}

struct Warm {
    id: SandboxId,
    shim_dir: PathBuf,
    made_at: i64,
}

/// A warm sandbox, now the attempt's.
pub struct Claimed {
    /// The sandbox.
    pub id: SandboxId,
    /// Its shim directory.
    pub shim_dir: PathBuf,
    /// How long it had been ready.
    pub age_ms: i64,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a sandbox is made from, as a short hash: two specs with the same
/// key make interchangeable sandboxes. The name, the labels and the shim
/// directory (each sandbox's own) do not count.
pub fn key(spec: &SandboxSpec) -> String {
    let mounts: Vec<_> = spec
        .mounts
        .iter()
        .filter(|m| m.target != SANDBOX_DIR)
        .map(|m| (&m.host, &m.target, m.read_only))
        .collect();
    let l = &spec.limits;
    let text = format!(
        "{:?}",
        (
            &spec.image,
            &spec.user,
            &spec.workdir,
            &spec.env,
            mounts,
            &spec.command,
            (l.memory_bytes, l.nano_cpus, l.pids, l.disk_bytes),
        )
    );
    hex::encode(&Sha256::digest(text.as_bytes())[..6])
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            inner: Mutex::new(Inner::default()),
            wake: tokio::sync::Notify::new(),
            since: now_ms(),
        }
    }
}

impl Pool {
    /// A warm sandbox made from what `template` defines, now attempt
    /// `attempt`'s; `Err(Some(why))` when there is none (counted as a
    /// miss, and the environment is kept warm from now on), `Err(None)`
    /// when the pool is off.
    pub async fn claim(
        &self,
        app: &App,
        template: &SandboxSpec,
        attempt: &str,
        task: &str,
    ) -> Result<Claimed, Option<String>> {
        let size = app.config.sandbox.warm;
        if size == 0 {
            return Err(None);
        }
        let key = key(template);
        let result = loop {
            let taken = {
                let mut inner = lock(&self.inner);
                let now = now_ms();
                let i = match inner.envs.iter().position(|e| e.key == key) {
                    Some(i) => i,
                    None => {
                        inner
                            .envs
                            .push(Env::new(key.clone(), template.clone(), false));
                        inner.envs.len() - 1
                    }
                };
                let env = &mut inner.envs[i];
                env.last_used = now;
                env.ready.pop_front()
            };
            let Some(warm) = taken else {
                break Err(self.missed(&key));
            };
            // Still alive, and its shim still answers.
            if ShimClient::new(&warm.shim_dir).status().await.is_err() {
                tracing::info!(sandbox = %warm.id, "a warm sandbox stopped answering; removing it");
                discard(app, &warm.id, &warm.shim_dir).await;
                continue;
            }
            let claim = SandboxClaim {
                sandbox_id: warm.id.0.clone(),
                attempt_id: attempt.to_owned(),
                task_id: task.to_owned(),
                claimed_at: now_ms(),
            };
            match app.store.claim_sandbox(&claim).await {
                Ok(true) => {
                    let mut inner = lock(&self.inner);
                    inner.hits += 1;
                    if let Some(env) = inner.envs.iter_mut().find(|e| e.key == key) {
                        env.hits += 1;
                    }
                    break Ok(Claimed {
                        age_ms: now_ms() - warm.made_at,
                        id: warm.id,
                        shim_dir: warm.shim_dir,
                    });
                }
                // Never handed out twice, nor without its claim stored.
                Ok(false) => discard(app, &warm.id, &warm.shim_dir).await,
                Err(e) => {
                    discard(app, &warm.id, &warm.shim_dir).await;
                    break Err(
                        self.missed_because(&key, format!("its claim could not be stored: {e}"))
                    );
                }
            }
        };
        self.wake.notify_one();
        result
    }

    fn missed(&self, key: &str) -> Option<String> {
        let why = {
            let inner = lock(&self.inner);
            match inner.envs.iter().find(|e| e.key == key) {
                Some(e) if e.creating > 0 => {
                    "every warm sandbox of this environment is taken; more are being made".into()
                }
                Some(e) if e.last_error.is_some() => format!(
                    "warm sandboxes of this environment cannot be made: {}",
                    e.last_error.as_deref().unwrap_or_default()
                ),
                Some(e) if e.hits + e.misses == 0 && !e.default => {
                    "this environment was not kept warm yet; it is from now on".into()
                }
                _ => "every warm sandbox of this environment is taken".into(),
            }
        };
        self.missed_because(key, why)
    }

    fn missed_because(&self, key: &str, why: String) -> Option<String> {
        let mut inner = lock(&self.inner);
        inner.misses += 1;
        inner.last_miss = Some(why.clone());
        if let Some(env) = inner.envs.iter_mut().find(|e| e.key == key) {
            env.misses += 1;
        }
        Some(why)
    }

    /// Whether `sb` is one of this pool's (ready, or being made).
    pub fn holds(&self, sb: &SandboxInfo) -> bool {
        let inner = lock(&self.inner);
        let dir = sb.labels.get(labels::SHIM_DIR).map(PathBuf::from);
        dir.is_some_and(|d| inner.making.contains(&d))
            || inner
                .envs
                .iter()
                .any(|e| e.ready.iter().any(|w| w.id == sb.id))
    }

    /// What the API shows.
    pub fn view(&self, app: &App) -> PoolView {
        let inner = lock(&self.inner);
        let asked = inner.hits + inner.misses;
        PoolView {
            size: app.config.sandbox.warm,
            max_environments: app.config.sandbox.warm_environments,
            environments: inner
                .envs
                .iter()
                .map(|e| PoolEnvironmentView {
                    key: e.key.clone(),
                    image: e.template.image.clone(),
                    default: e.default,
                    ready: e.ready.len(),
                    creating: e.creating,
                    hits: e.hits,
                    misses: e.misses,
                    last_error: e.last_error.clone(),
                })
                .collect(),
            hits: inner.hits,
            misses: inner.misses,
            hit_rate: (asked > 0).then(|| inner.hits as f64 / asked as f64),
            last_miss: inner.last_miss.clone(),
            since: format_ts(self.since),
        }
    }
}

impl Env {
    fn new(key: String, template: SandboxSpec, default: bool) -> Env {
        Env {
            key,
            template,
            ready: VecDeque::new(),
            creating: 0,
            default,
            last_used: 0,
            hits: 0,
            misses: 0,
            last_error: None,
            retry_at: 0,
        }
    }
}

/// The server's default environment: what an attempt without a
/// devcontainer gets.
fn default_template(app: &App) -> SandboxSpec {
    let placeholder = app.data_dir.join("run").join("unmade");
    let mut spec = crate::attempt::base_spec(app, &app.config.image(), Vec::new(), &placeholder);
    spec.mounts.extend(crate::attempt::agent_mounts(app));
    spec
}

/// Keeps the pool filled until `shutdown`, then removes what is in it.
pub async fn run(app: Arc<App>, shutdown: CancellationToken) {
    if app.config.sandbox.warm == 0 {
        return;
    }
    let pool = &app.pool;
    loop {
        let (next, dropped) = plan(&app);
        for w in dropped {
            discard(&app, &w.id, &w.shim_dir).await;
        }
        let made = match next {
            Some((key, template)) => {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    () = make(&app, key, template) => true,
                }
            }
            None => false,
        };
        if !made {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                () = pool.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }
    // Nothing in the pool outlives the server (the next start would
    // remove it anyway).
    let ready: Vec<Warm> = {
        let mut inner = lock(&pool.inner);
        inner
            .envs
            .iter_mut()
            .flat_map(|e| e.ready.drain(..))
            .collect()
    };
    for w in ready {
        discard(&app, &w.id, &w.shim_dir).await;
    }
}

/// The environment to make a sandbox for next (its count goes up), and
/// the sandboxes of environments no longer kept warm.
fn plan(app: &App) -> (Option<(String, SandboxSpec)>, Vec<Warm>) {
    let size = app.config.sandbox.warm;
    let default = default_template(app);
    let default_key = key(&default);
    let now = now_ms();
    let mut inner = lock(&app.pool.inner);
    // The default environment's definition changes with the installed
    // agents and the limits in effect.
    for e in &mut inner.envs {
        e.default = e.key == default_key;
    }
    if !inner.envs.iter().any(|e| e.default) {
        inner.envs.push(Env::new(default_key, default, true));
    }
    // The most recently used first; beyond the limit, or idle, not kept.
    inner.envs.sort_by_key(|e| (!e.default, -e.last_used));
    let mut kept = 0;
    let mut dropped = Vec::new();
    inner.envs.retain_mut(|e| {
        if e.default {
            return true;
        }
        kept += 1;
        let keep = kept <= app.config.sandbox.warm_environments
            && now - e.last_used < IDLE.as_millis() as i64;
        if !keep && e.creating == 0 {
            dropped.extend(e.ready.drain(..));
            return false;
        }
        true
    });
    let next = inner
        .envs
        .iter_mut()
        .find(|e| e.ready.len() + e.creating < size && e.retry_at <= now)
        .map(|env| {
            env.creating += 1;
            (env.key.clone(), env.template.clone())
        });
    (next, dropped)
}

/// Makes one warm sandbox of environment `key`.
async fn make(app: &App, key: String, template: SandboxSpec) {
    let made = match crate::attempt::new_shim_dir(app, "warm") {
        Ok(shim_dir) => {
            lock(&app.pool.inner).making.insert(shim_dir.clone());
            let made = make_one(app, template, shim_dir.clone()).await;
            lock(&app.pool.inner).making.remove(&shim_dir);
            made
        }
        Err(e) => Err(format!("cannot create a shim directory: {e}")),
    };
    let orphan = {
        let mut inner = lock(&app.pool.inner);
        match (made, inner.envs.iter_mut().find(|e| e.key == key)) {
            (Ok(w), Some(env)) => {
                env.creating -= 1;
                env.last_error = None;
                env.ready.push_back(w);
                None
            }
            // Its environment stopped being kept warm meanwhile.
            (Ok(w), None) => Some(w),
            (Err(why), env) => {
                tracing::warn!(environment = %key, "cannot make a warm sandbox: {why}");
                if let Some(env) = env {
                    env.creating -= 1;
                    env.last_error = Some(why);
                    env.retry_at = now_ms() + RETRY.as_millis() as i64;
                }
                None
            }
        }
    };
    if let Some(w) = orphan {
        discard(app, &w.id, &w.shim_dir).await;
    }
}

/// Creates a warm sandbox with shim directory `shim_dir` and waits for
/// its shim.
async fn make_one(app: &App, template: SandboxSpec, shim_dir: PathBuf) -> Result<Warm, String> {
    let driver = match app.driver().await {
        Ok(d) => d,
        Err(e) => {
            crate::attempt::remove_shim_dir(&shim_dir).await;
            return Err(e);
        }
    };
    let suffix: u32 = rand::random();
    let mut spec = template;
    spec.name = format!("backshift-warm-{suffix:08x}");
    spec.labels = BTreeMap::from([
        (labels::MANAGED.to_owned(), "true".to_owned()),
        (labels::INSTANCE.to_owned(), app.instance.clone()),
        (labels::ROLE.to_owned(), ROLE.to_owned()),
        (POOL_LABEL.to_owned(), app.replica.clone()),
        (labels::SHIM_DIR.to_owned(), shim_dir.display().to_string()),
    ]);
    for m in &mut spec.mounts {
        if m.target == SANDBOX_DIR {
            m.host = shim_dir.clone();
        }
    }
    let id = match crate::attempt::create_limited(app, driver.as_ref(), &spec).await {
        Ok(id) => id,
        Err(e) => {
            crate::attempt::remove_shim_dir(&shim_dir).await;
            return Err(e.to_string());
        }
    };
    if let Err(e) = ShimClient::new(&shim_dir)
        .wait_ready(Duration::from_secs(15))
        .await
    {
        discard(app, &id, &shim_dir).await;
        return Err(format!("its shim did not answer: {e}"));
    }
    Ok(Warm {
        id,
        shim_dir,
        made_at: now_ms(),
    })
}

async fn discard(app: &App, id: &SandboxId, shim_dir: &std::path::Path) {
    if let Ok(driver) = app.driver().await
        && let Err(e) = driver.destroy(id).await
    {
        tracing::warn!(sandbox = %id, "warm sandbox not removed: {e}");
    }
    crate::attempt::remove_shim_dir(shim_dir).await;
}

/// This installation's sandboxes, a claimed warm one labelled as its
/// attempt's agent sandbox (`ATTEMPT`, `TASK`, role `agent`, and
/// [`POOL_LABEL`] kept); only attempt `attempt`'s when given.
pub async fn sandboxes(app: &App, attempt: Option<&str>) -> Result<Vec<SandboxInfo>, String> {
    let driver = app.driver().await?;
    let mut found = driver
        .list(&[(labels::MANAGED, "true"), (labels::INSTANCE, &app.instance)])
        .await
        .map_err(|e| e.to_string())?;
    let warm: Vec<String> = found
        .iter()
        .filter(|s| s.labels.get(labels::ROLE).map(String::as_str) == Some(ROLE))
        .map(|s| s.id.0.clone())
        .collect();
    if !warm.is_empty() {
        let claims: HashMap<String, SandboxClaim> = app
            .store
            .sandbox_claims(&warm)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|c| (c.sandbox_id.clone(), c))
            .collect();
        for sb in &mut found {
            if let Some(c) = claims.get(&sb.id.0) {
                sb.labels
                    .insert(labels::ATTEMPT.to_owned(), c.attempt_id.clone());
                sb.labels.insert(labels::TASK.to_owned(), c.task_id.clone());
                sb.labels
                    .insert(labels::ROLE.to_owned(), "agent".to_owned());
            }
        }
    }
    if let Some(attempt) = attempt {
        found.retain(|s| s.labels.get(labels::ATTEMPT).map(String::as_str) == Some(attempt));
    }
    Ok(found)
}
