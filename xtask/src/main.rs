//! Project automation. `cargo xtask up` sets up what backshift needs
//! (Docker engine, dockerd, the default sandbox image), builds a release
//! binary and starts the server; `cargo xtask test` sets up that plus what
//! the tests need (a local image registry, PostgreSQL with the tests'
//! role, the agents they run, from npm) and runs the whole suite;
//! `cargo xtask ci` is what `.ci/run` runs.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => setup_tests().and_then(|()| test(&args[1..])),
        Some("up") => setup().and_then(|()| up(&args[1..])),
        Some("setup") => setup_tests(),
        Some("bench") => setup_tests().and_then(|()| bench(&args[1..])),
        Some("ci") => ci(),
        Some("screenshots") => setup_tests().and_then(|()| screenshots(&args[1..])),
        _ => {
            eprintln!(
                "usage: cargo xtask <test|up|setup|bench|ci> [args]\n  test  set up Docker and the sandbox image, run the whole suite\n  up    set up, build release, start `backshift serve` (args are passed on)\n  setup only the setup (for the tests)\n  bench set up, run the benchmarks (args are passed on, e.g. --iterations 50)\n  ci    fmt --check, clippy -D warnings, then test\n  screenshots [DIR]  the web UI's main pages at desktop and phone width, as PNGs in DIR (docs/screenshots)"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where cargo puts what it builds for this host: every build names its
/// target (`.cargo/config.toml`), so that is `<target dir>/<host tuple>`.
fn target_dir() -> PathBuf {
    let base = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root().join(d),
        None => root().join("target"),
    };
    base.join(host_tuple())
}

fn host_tuple() -> String {
    Command::new("rustc")
        .arg("-vV")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        })
        .unwrap_or_else(|| format!("{}-unknown-linux-gnu", std::env::consts::ARCH))
}

fn step(msg: &str) {
    println!("==> {msg}");
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Installs missing Debian packages (one `apt-get update` first).
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!("installing {} from apt", missing.join(" ")));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn docker_answers() -> bool {
    Command::new("/usr/bin/docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .env("DOCKER_API_VERSION", "1.41")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Docker engine installed and running, default image present; and
/// bubblewrap, for the process driver (sandboxes without Docker).
fn setup() -> anyhow::Result<()> {
    apt_install(&["docker.io", "debootstrap", "git", "procps", "bubblewrap"])?;
    if docker_answers() {
        step("Docker engine is running");
    } else {
        step("starting dockerd (log: /var/log/backshift-dockerd.log)");
        let log = std::fs::File::create("/var/log/backshift-dockerd.log")?;
        Command::new("setsid")
            .arg("dockerd")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start dockerd")?;
        let started = Instant::now();
        while !docker_answers() {
            if started.elapsed() > Duration::from_secs(60) {
                bail!("dockerd did not answer within 60 s; see /var/log/backshift-dockerd.log");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        step(&format!("dockerd is up ({:.1?})", started.elapsed()));
    }
    step("building backshift");
    run(Command::new("cargo")
        .current_dir(root())
        .args(["build", "-q", "-p", "backshift"]))?;
    // The image tag carries a hash of its recipe: bootstrap builds it only
    // when this recipe's image is missing.
    step("ensuring the default sandbox image");
    run(Command::new(target_dir().join("debug/backshift")).args(["image", "bootstrap"]))
}

/// What `setup` does, plus what only the tests need: a local image
/// registry (Debian's `docker-registry`, started by the tests themselves),
/// PostgreSQL with the tests' role, Chromium with its WebDriver for the
/// UI's browser tests, and the Docker engine image.
fn setup_tests() -> anyhow::Result<()> {
    apt_install(&[
        "docker-registry",
        "postgresql",
        "openssl",
        "curl",
        "chromium",
        "chromium-driver",
    ])?;
    // npm installs the tests' agents; any npm will do (a Node.js from
    // elsewhere brings its own and conflicts with Debian's).
    if Command::new("npm").arg("--version").output().is_err() {
        apt_install(&["npm"])?;
    }
    postgres()?;
    setup()?;
    // The tests of Docker inside a sandbox need the engine image (built
    // once per Docker host: its tag carries the recipe's hash).
    step("ensuring the Docker engine image");
    run(Command::new(target_dir().join("debug/backshift")).args([
        "image",
        "bootstrap",
        "--engine",
    ]))?;
    test_agents()
}

/// The agents the tests run, installed once per host from npm (with the
/// host's npm configuration) where the tests look for them. Keep in step
/// with `testkit::agents`.
const TEST_AGENTS_DIR: &str = "/var/cache/backshift-tests/agents";
const TEST_AGENTS: &[(&str, &str)] = &[
    ("opencode", "1.18.33"),
    ("codex", "0.16.0"),
    ("claude-code", "0.16.2"),
    ("gemini", "0.61.0"),
];

fn test_agents() -> anyhow::Result<()> {
    for (name, version) in TEST_AGENTS {
        let current = Path::new(TEST_AGENTS_DIR).join(name).join("current");
        if std::fs::read_to_string(&current).is_ok_and(|v| v.trim() == *version) {
            step(&format!(
                "agent {name} {version} is installed for the tests"
            ));
            continue;
        }
        step(&format!("installing agent {name} {version} for the tests"));
        run(Command::new(target_dir().join("debug/backshift"))
            .args(["agents", "install", &format!("{name}@{version}")])
            .env("BACKSHIFT_AGENTS_DIR", TEST_AGENTS_DIR))?;
    }
    Ok(())
}

/// A command run as the `postgres` user, from `/` (it may not enter the
/// working directory).
fn as_postgres() -> Command {
    let mut cmd = Command::new("runuser");
    cmd.current_dir("/");
    cmd
}

/// The role and password the tests use (loopback only); tests create
/// their own databases (`bs_test_*`) with it.
const TEST_ROLE: &str = "backshift_test";

/// PostgreSQL running (Debian's cluster, started as its owner: the server
/// refuses root) with the tests' role.
fn postgres() -> anyhow::Result<()> {
    let version = std::fs::read_dir("/etc/postgresql")
        .context("PostgreSQL is not installed (no /etc/postgresql)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|v| v.parse::<u32>().ok()))
        .max()
        .context("no PostgreSQL cluster under /etc/postgresql")?
        .to_string();
    let online = Command::new("pg_ctlcluster")
        .args([&version, "main", "status"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if online {
        step(&format!("PostgreSQL {version} is running"));
    } else {
        step(&format!("starting PostgreSQL {version}"));
        run(Command::new("pg_ctlcluster").args([&version, "main", "start"]))?;
    }
    let sql = format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{TEST_ROLE}') THEN \
         CREATE ROLE {TEST_ROLE} LOGIN CREATEDB PASSWORD '{TEST_ROLE}'; END IF; END $$;"
    );
    run(as_postgres().args(["-u", "postgres", "--", "psql", "-qc", &sql]))?;
    // Databases left by killed test runs.
    let leftovers = as_postgres()
        .args([
            "-u",
            "postgres",
            "--",
            "psql",
            "-Atc",
            "SELECT datname FROM pg_database WHERE datname LIKE 'bs\\_test\\_%'",
        ])
        .output()
        .context("cannot list databases")?;
    for db in String::from_utf8_lossy(&leftovers.stdout).lines() {
        let _ = as_postgres()
            .args(["-u", "postgres", "--", "dropdb", "--force", db])
            .status();
    }
    Ok(())
}

/// The web UI's main pages in headless Chromium, at desktop and phone
/// width, as PNGs in `DIR` (default `docs/screenshots`).
fn screenshots(args: &[String]) -> anyhow::Result<()> {
    let dir = args
        .first()
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("docs/screenshots"));
    let dir = if dir.is_absolute() {
        dir
    } else {
        root().join(dir)
    };
    step(&format!("taking screenshots into {}", dir.display()));
    run(Command::new("cargo")
        .current_dir(root())
        .args([
            "test",
            "-p",
            "backshift",
            "--test",
            "ui",
            "screenshots",
            "--",
            "--ignored",
            "--exact",
            "--nocapture",
        ])
        .env("UI_SCREENSHOTS_DIR", &dir)
        .env("DOCKER_API_VERSION", "1.41"))
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    step("running the test suite");
    let nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root());
    if nextest {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
    }
    run(cmd.args(extra))
}

/// The benchmark harnesses, each printing its figures beside a baseline
/// measured in the same run. Medians go into BENCHMARKS.md.
fn bench(extra: &[String]) -> anyhow::Result<()> {
    // Each harness takes its own flags; the shared ones are passed to all.
    for (package, name) in [
        ("backshift-sandbox", "sandbox_start"),
        ("backshift-server", "events"),
        ("backshift", "reattach"),
        ("backshift", "gateway"),
        ("backshift", "agent_start"),
        ("backshift", "egress"),
        ("backshift", "first_call"),
        ("backshift", "checkout"),
    ] {
        step(&format!("{name} ({package}/benches/{name}.rs)"));
        run(Command::new("cargo")
            .current_dir(root())
            .args(["bench", "-q", "-p", package, "--bench", name, "--"])
            .args(extra))?;
    }
    Ok(())
}

fn up(extra: &[String]) -> anyhow::Result<()> {
    step("building backshift (release)");
    run(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "-q",
        "-p",
        "backshift",
    ]))?;
    step("starting backshift serve");
    let err = exec(
        Command::new(target_dir().join("release/backshift"))
            .arg("serve")
            .args(extra),
    );
    Err(err)
}

fn exec(cmd: &mut Command) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    anyhow::anyhow!("cannot start {cmd:?}: {}", cmd.exec())
}

fn ci() -> anyhow::Result<()> {
    step("cargo fmt --check");
    run(Command::new("cargo")
        .current_dir(root())
        .args(["fmt", "--all", "--", "--check"]))?;
    step("cargo clippy --all-targets -- -D warnings");
    run(Command::new("cargo").current_dir(root()).args([
        "clippy",
        "-q",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    setup_tests()?;
    test(&[])
}
