//! Start-up: open the data directory, settle the previous run, create the
//! first API token, start the supervisor and the HTTP server.

use crate::auth::{generate_token, hash_token};
use crate::config::Config;
use crate::events::EventHub;
use crate::supervisor::{self, Supervisor};
use backshift_agent::ModelConfig;
use backshift_core::TaskId;
use backshift_git::GitStore;
use backshift_protocol::now_ms;
use backshift_sandbox::SandboxDriver;
use backshift_sandbox::docker::DockerDriver;
use backshift_sandbox::process::ProcessDriver;
use backshift_store::Store;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Everything the handlers and the supervisor share.
pub struct App {
    /// Configuration in effect.
    pub config: Config,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The database.
    pub store: Store,
    /// Event numbering, persistence and broadcast.
    pub hub: EventHub,
    /// The git store.
    pub git: GitStore,
    /// This server's identity on the Docker host (labels its sandboxes).
    pub instance: String,
    /// This replica's id: the owner of the leases it holds.
    pub replica: String,
    /// Held while the server runs: no second process drives attempts
    /// under the same replica id.
    _replica_lock: std::fs::File,
    /// Running attempts.
    pub supervisor: Supervisor,
    /// Sandboxes made ahead of demand.
    pub pool: crate::pool::Pool,
    /// Held while a checkout image is made (one at a time).
    pub checkout_images: tokio::sync::Mutex<()>,
    /// This binary: mounted read-only into every sandbox as its shim.
    pub shim_binary: PathBuf,
    /// Woken whenever an approval is answered (its waiters re-read it).
    pub approvals_changed: tokio::sync::Notify,
    /// The audit log.
    pub audit: crate::audit::Audit,
    /// The keys secrets are sealed with.
    pub keyring: crate::secrets::Keyring,
    /// Custom CA certificates for every sandbox, when configured.
    pub ca: Option<crate::certs::CaFiles>,
    /// Why Docker refused a disk limit, once it did: sandboxes are then
    /// created without one (each attempt is told).
    pub disk_limit_unsupported: std::sync::OnceLock<String>,
    docker: Mutex<Option<Arc<DockerDriver>>>,
    /// The process driver, when this server uses it instead of Docker.
    pub process: Option<Arc<ProcessDriver>>,
    /// Which driver this server uses and why (for readyz and the log).
    pub driver_choice: String,
}

impl App {
    /// The sandbox driver this server uses: the process driver when it was
    /// chosen at start, else Docker (connecting on first use).
    pub async fn driver(&self) -> Result<Arc<dyn SandboxDriver>, String> {
        if let Some(p) = &self.process {
            return Ok(p.clone());
        }
        Ok(self.docker().await?)
    }

    /// Whether sandboxes are Docker containers (images, builds, snapshots
    /// exist only there).
    pub fn uses_docker(&self) -> bool {
        self.process.is_none()
    }

    /// The Docker driver, connecting on first use (so a daemon started
    /// after the server is picked up).
    pub async fn docker(&self) -> Result<Arc<DockerDriver>, String> {
        let mut slot = self.docker.lock().await;
        if let Some(d) = slot.as_ref() {
            return Ok(d.clone());
        }
        let d = Arc::new(DockerDriver::connect().await.map_err(|e| e.to_string())?);
        d.ping().await.map_err(|e| e.to_string())?;
        *slot = Some(d.clone());
        Ok(d)
    }

    /// The built-in agent's model settings, or what is missing.
    pub fn model_config(&self) -> Result<ModelConfig, String> {
        let m = &self.config.model;
        let base_url = m.base_url.clone().ok_or_else(|| {
            "no model is configured: set [model] base_url in the config file (or BACKSHIFT_MODEL__BASE_URL)".to_owned()
        })?;
        let api_key =
            crate::config::ModelSection::key_from_env(m.api_key_env.as_deref(), "api_key_env")?;
        Ok(ModelConfig {
            base_url,
            model: m.model.clone(),
            api_key,
            max_retries: m.max_retries,
            retry_base: Duration::from_millis(m.retry_base_ms),
            request_timeout: Duration::from_secs(m.request_timeout_secs),
            max_tokens: m.max_tokens,
            prices: m.prices(),
        })
    }
}

/// A started server.
pub struct Server {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// A token created at this start (first start only), to show once.
    pub new_token: Option<String>,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Shared state.
    pub app: Arc<App>,
    shutdown: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl Server {
    /// Stops accepting requests and stops driving attempts without ending
    /// them: their sandboxes keep running and their leases are released,
    /// so the next server to start (this one again, or another replica)
    /// recovers them. Waits until every event is stored.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.app.hub.flush().await;
    }

    /// Resolves when the server has been asked to stop.
    pub async fn stopped(&self) {
        self.shutdown.cancelled().await
    }
}

/// Starts the server described by `config`.
/// This server's replica id (configured, or made once and kept in the
/// data directory) and an exclusive lock on it: two processes must never
/// drive attempts under one id. The lock goes with the process, even when
/// it is killed.
fn claim_replica_id(config: &Config, data_dir: &Path) -> anyhow::Result<(String, std::fs::File)> {
    let id = match &config.replica_id {
        Some(id)
            if !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
        {
            id.clone()
        }
        Some(id) => {
            anyhow::bail!("replica_id {id:?} is not valid: use letters, digits, '-', '_' or '.'")
        }
        None => {
            let file = data_dir.join("replica-id");
            match std::fs::read_to_string(&file) {
                Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
                _ => {
                    let id = format!("r-{:08x}", rand::random::<u32>());
                    std::fs::write(&file, format!("{id}\n"))
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", file.display()))?;
                    id
                }
            }
        }
    };
    let path = data_dir.join(format!("replica-{id}.lock"));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "another backshift server is running as replica {id} on this data directory ({}). Stop it, or give each server its own replica_id (BACKSHIFT_REPLICA_ID)",
            data_dir.display()
        );
    }
    Ok((id, lock))
}

/// A database URL fit for messages: the password replaced.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Pulls the configured sandbox image at startup when it is missing, so
/// the first task does not wait for it (a task that comes first pulls it
/// too; the daemon joins the two pulls).
async fn prepull(app: Arc<App>) {
    let image = app.config.image();
    let Ok(driver) = app.docker().await else {
        return;
    };
    if !matches!(driver.image_exists(&image).await, Ok(false)) {
        return;
    }
    let mut log = |line: String| tracing::info!(target: "backshift::image", "{line}");
    match backshift_sandbox::image::pull(&driver, &image, &mut log).await {
        Ok(()) => tracing::info!("sandbox image {image} pulled"),
        Err(e) => tracing::warn!(
            "cannot pull the sandbox image {image}: {e}; tasks will fail with image_missing until it is there"
        ),
    }
}

/// How long `auto` waits for Docker to answer at start.
const DOCKER_PROBE: Duration = Duration::from_secs(5);

/// The sandbox driver, from `[sandbox] driver`: the process driver (kept
/// under `<data>/sandboxes`, the data directory and `/etc/backshift`
/// hidden from its sandboxes) or Docker (`None`); and why, in words.
async fn choose_driver(
    config: &Config,
    data_dir: &std::path::Path,
) -> anyhow::Result<(Option<Arc<ProcessDriver>>, String)> {
    use crate::config::DriverSetting;
    let process = || async {
        ProcessDriver::new(
            &data_dir.join("sandboxes"),
            vec![data_dir.to_owned(), PathBuf::from("/etc/backshift")],
        )
        .await
        .map(Arc::new)
    };
    let limits = |p: &ProcessDriver| match p.limits_unsupported() {
        Some(why) => format!("; {why}"),
        None => String::new(),
    };
    match config.sandbox.driver {
        DriverSetting::Docker => Ok((None, "Docker ([sandbox] driver = \"docker\")".into())),
        DriverSetting::Process => {
            let p = process()
                .await
                .map_err(|e| anyhow::anyhow!("[sandbox] driver = \"process\", but {e}"))?;
            let why = format!(
                "the process driver, bubblewrap over this host's own tools ([sandbox] driver = \"process\"){}",
                limits(&p)
            );
            Ok((Some(p), why))
        }
        DriverSetting::Auto => {
            let docker = async {
                let d = DockerDriver::connect().await.map_err(|e| e.to_string())?;
                d.ping().await.map_err(|e| e.to_string())
            };
            let unreachable = match tokio::time::timeout(DOCKER_PROBE, docker).await {
                Ok(Ok(version)) => {
                    return Ok((None, format!("Docker {version} (it answered at start)")));
                }
                Ok(Err(e)) => e,
                Err(_) => format!("no answer within {}s", DOCKER_PROBE.as_secs()),
            };
            match process().await {
                Ok(p) => {
                    let why = format!(
                        "the process driver, bubblewrap over this host's own tools, because Docker is not reachable ({unreachable}){}",
                        limits(&p)
                    );
                    tracing::warn!("{why}");
                    Ok((Some(p), why))
                }
                Err(e) => Ok((
                    None,
                    format!(
                        "Docker, which is not reachable ({unreachable}); the process driver cannot stand in: {e}"
                    ),
                )),
            }
        }
    }
}

pub async fn start(config: Config) -> anyhow::Result<Server> {
    let data_dir = config.data_dir();
    for sub in ["", "git", "tmp"] {
        tokio::fs::create_dir_all(data_dir.join(sub))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot create the data directory {}: {e}",
                    data_dir.display()
                )
            })?;
    }
    let store = match &config.database_url {
        Some(url) => Store::open(url).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot open the database at database_url ({}): {e}",
                redact_url(url)
            )
        })?,
        None => Store::open_sqlite(&data_dir.join("backshift.db"))
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot open the database in {}: {e}", data_dir.display())
            })?,
    };
    let instance = store
        .meta_init("instance_id", TaskId::generate().as_str())
        .await?;
    let new_token = if store.token_count().await? == 0 {
        let token = generate_token();
        store
            .insert_token(
                TaskId::generate().as_str(),
                "admin",
                &hash_token(&token),
                now_ms(),
            )
            .await?;
        Some(token)
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {}: {e} (is another server running? set listen or --listen)",
                config.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let (replica, replica_lock) = claim_replica_id(&config, &data_dir)?;
    let (process, driver_choice) = choose_driver(&config, &data_dir).await?;
    tracing::info!("sandboxes: {driver_choice}");
    let app = Arc::new(App {
        process,
        driver_choice,
        git: GitStore::new(data_dir.join("git")),
        hub: EventHub::new(store.clone(), &replica),
        audit: crate::audit::Audit::new(store.clone(), &data_dir),
        keyring: crate::secrets::Keyring::load(&config.secrets, &data_dir)?,
        disk_limit_unsupported: std::sync::OnceLock::new(),
        ca: config
            .sandbox
            .ca_certificates
            .as_deref()
            .map(|f| crate::certs::prepare(f, &data_dir))
            .transpose()?,
        replica,
        _replica_lock: replica_lock,
        store,
        instance,
        supervisor: Supervisor::default(),
        pool: crate::pool::Pool::default(),
        checkout_images: tokio::sync::Mutex::new(()),
        shim_binary: std::env::current_exe().map_err(|e| {
            anyhow::anyhow!("cannot find this program's own binary (the sandboxes' shim): {e}")
        })?,
        docker: Mutex::new(None),
        approvals_changed: tokio::sync::Notify::new(),

        data_dir: data_dir.clone(),
        config,
    });
    crate::secrets::refresh_redactor(&app).await?;
    if new_token.is_some() {
        app.audit(
            "backshift",
            "token.create",
            "admin",
            serde_json::json!({"why": "first start: the admin token, shown once and saved for the local CLI"}),
        )
        .await;
    }
    supervisor::recover(&app).await?;
    if app.config.pulls_image() && app.uses_docker() {
        tokio::spawn(prepull(app.clone()));
    }

    let shutdown = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(supervisor::run(app.clone(), shutdown.clone()));
    tasks.spawn(supervisor::watch_sandboxes(app.clone(), shutdown.clone()));
    tasks.spawn(crate::pool::run(app.clone(), shutdown.clone()));
    // Deliveries a stop cut short are done again.
    tasks.spawn(crate::deliver::resume(app.clone()));
    let router = crate::api::router(app.clone());
    let stop = shutdown.clone();
    tasks.spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!("HTTP server failed: {e}");
        }
    });
    Ok(Server {
        addr,
        new_token,
        data_dir,
        app,
        shutdown,
        tasks,
    })
}
