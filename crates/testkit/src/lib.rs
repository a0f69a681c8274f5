//! Fixtures for tests that start real parts, all on loopback. Each one
//! fails with what to install when its part is missing; none skips.

pub mod forge;

use anyhow::{Context, bail};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A private image registry (Debian's `docker-registry`) on a free loopback
/// port, storing into a temporary directory; stopped when dropped. Docker
/// treats registries on 127.0.0.0/8 as insecure-allowed, so no TLS is
/// needed.
pub struct Registry {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

impl Registry {
    /// Starts the registry and waits until it accepts connections.
    pub fn start() -> anyhow::Result<Registry> {
        if !Path::new(REGISTRY_BIN).exists() {
            bail!(
                "{REGISTRY_BIN} is missing: install Debian's docker-registry (`apt-get install docker-registry`; `cargo xtask setup` does)"
            );
        }
        let dir = tempfile::tempdir()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {REGISTRY_BIN}"))?;
        let mut registry = Registry { child, addr, dir };
        let started = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = registry.child.try_wait()? {
                bail!("docker-registry exited ({status}): {}", registry.log());
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!(
                    "docker-registry did not listen on {addr} within 20 s: {}",
                    registry.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    /// `127.0.0.1:PORT`, the prefix of image references in this registry.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Pushes local image `local` into the registry as `name:tag`
    /// (`name` without host) and removes the local alias the push needed,
    /// so the reference exists only in the registry. Returns the full
    /// reference.
    pub fn push(&self, local: &str, name: &str, tag: &str) -> anyhow::Result<String> {
        let reference = format!("{}/{name}:{tag}", self.host());
        docker(&["tag", local, &reference])?;
        let pushed = docker(&["push", "-q", &reference]);
        docker(&["rmi", &reference])?;
        pushed.with_context(|| format!("registry log: {}", self.log()))?;
        Ok(reference)
    }

    /// What the registry logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs Debian's docker CLI against the engine's API version (1.41; the
/// newer CLI some machines carry refuses to talk to it) and returns its
/// stdout.
pub fn docker(args: &[&str]) -> anyhow::Result<String> {
    let cli = if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    };
    let out = Command::new(cli)
        .args(args)
        .env("DOCKER_API_VERSION", "1.41")
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("cannot run {cli}; install docker.io (`cargo xtask setup` does)")
        })?;
    if !out.status.success() {
        bail!(
            "docker {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The PostgreSQL server the tests use: `BACKSHIFT_TEST_POSTGRES`, or the
/// local cluster with the role `cargo xtask setup` creates.
pub fn postgres_admin_url() -> String {
    std::env::var("BACKSHIFT_TEST_POSTGRES").unwrap_or_else(|_| {
        "postgres://backshift_test:backshift_test@127.0.0.1:5432/postgres".to_owned()
    })
}

/// A fresh, empty PostgreSQL database for one test; dropped with it.
pub struct PgDatabase {
    /// Its URL.
    pub url: String,
    name: String,
}

impl PgDatabase {
    /// Creates the database, or says what to install or start.
    pub async fn create() -> anyhow::Result<PgDatabase> {
        use sqlx::Connection;
        let admin = postgres_admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin).await.with_context(|| {
            format!(
                "cannot reach PostgreSQL at {admin}: install and start it with the tests' role (`cargo xtask setup` does), or set BACKSHIFT_TEST_POSTGRES"
            )
        })?;
        let name = format!("bs_test_{:016x}", rand::random::<u64>());
        sqlx::Executor::execute(
            &mut conn,
            sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")),
        )
        .await?;
        let url = match admin.rfind('/') {
            Some(i) => format!("{}/{name}", &admin[..i]),
            None => anyhow::bail!("{admin} has no database part"),
        };
        Ok(PgDatabase { url, name })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any runtime the test may still be inside.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&postgres_admin_url())
                    .await
                    .ok()?;
                sqlx::Executor::execute(
                    &mut conn,
                    sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")),
                )
                .await
                .ok()
            })
        })
        .join();
    }
}

/// Where `cargo xtask setup` installs the agents the tests run (keep in
/// step with xtask's `TEST_AGENTS`).
pub const AGENTS_DIR: &str = "/var/cache/backshift-tests/agents";

/// The agents directory for tests, checked: a missing agent fails the test
/// with what to run, never skips it.
pub fn agents_dir(needs: &[&str]) -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(AGENTS_DIR);
    for name in needs {
        assert!(
            dir.join(name).join("current").exists(),
            "agent {name} is not installed in {AGENTS_DIR}: run `cargo xtask setup` (it installs the tests' agents from npm)"
        );
    }
    dir
}
