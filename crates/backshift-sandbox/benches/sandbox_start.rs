//! Sandbox start: how long from "create a sandbox" until its first command
//! has run, through the Docker driver, next to `docker run --rm IMAGE true`
//! measured in the same run on the same image; then through the process
//! driver, next to a bare bubblewrap run of `true`.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p backshift-sandbox
//! --bench sandbox_start -- --iterations N`). Needs dockerd and the default
//! image, which `cargo xtask setup` provides.
//!
//! The two measurements alternate so that both see the same machine state.
//! The driver's figure includes the image check, container create, start
//! and an exec of `true` to completion; removal is measured separately and
//! added for the like-for-like "full cycle" row, because `docker run --rm`
//! removes its container before it returns.

use backshift_sandbox::docker::DockerDriver;
use backshift_sandbox::image::{SANDBOX_UID, default_image_tag};
use backshift_sandbox::{ExecSpec, ResourceLimits, SandboxDriver, SandboxSpec, labels};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const DEFAULT_ITERATIONS: usize = 20;
const WARMUP: usize = 2;

fn main() {
    if let Err(e) = run() {
        eprintln!("sandbox_start: {e}");
        std::process::exit(1);
    }
}

fn iterations() -> BenchResult<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--iterations") {
        Some(i) => {
            let n: usize = args
                .get(i + 1)
                .ok_or("--iterations needs a number")?
                .parse()
                .map_err(|_| "--iterations needs a positive number")?;
            if n == 0 {
                return Err("--iterations needs a positive number".into());
            }
            Ok(n)
        }
        None => Ok(DEFAULT_ITERATIONS),
    }
}

fn run() -> BenchResult<()> {
    // `cargo bench` passes `--bench`; a plain `cargo test --benches` run
    // passes nothing and expects a quick pass, which one iteration is.
    let n = if std::env::args().any(|a| a == "--bench") {
        iterations()?
    } else {
        1
    };
    let rt = tokio::runtime::Runtime::new()?;
    let image = default_image_tag();
    let driver = rt.block_on(DockerDriver::connect()).map_err(|e| {
        format!("{e}; start dockerd (cargo xtask setup does) and run the bench again")
    })?;
    if !rt.block_on(driver.image_exists(&image))? {
        return Err(format!(
            "the default image {image} is missing; run `backshift image bootstrap` or `cargo xtask setup`"
        )
        .into());
    }
    let docker_cli = docker_cli()?;
    let spec = SandboxSpec {
        image: image.clone(),
        name: "bs-bench".into(),
        labels: BTreeMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            ("dev.backshift.bench".to_owned(), "sandbox_start".to_owned()),
        ]),
        limits: ResourceLimits::default(),
        user: format!("{SANDBOX_UID}:{SANDBOX_UID}"),
        workdir: "/workspace".into(),
        env: Vec::new(),
        mounts: Vec::new(),
        command: None,
    };

    println!("sandbox start: {n} iterations after {WARMUP} warm-up, image {image}");
    let mut first_exec = Vec::with_capacity(n);
    let mut full_cycle = Vec::with_capacity(n);
    let mut baseline = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let (to_exec, destroy) = rt.block_on(driver_once(&driver, &spec))?;
        let raw = docker_run_once(&docker_cli, &image)?;
        if i >= WARMUP {
            first_exec.push(to_exec);
            full_cycle.push(to_exec + destroy);
            baseline.push(raw);
        }
    }

    let base = percentile(&mut baseline, 50);
    println!(
        "{:<38} {:>8} {:>8}   {:<28} {:>6}",
        "measure", "p50", "p90", "baseline p50", "ratio"
    );
    for (name, samples) in [
        ("backshift create -> first exec", &mut first_exec),
        ("backshift create -> exec -> destroy", &mut full_cycle),
    ] {
        let p50 = percentile(samples, 50);
        println!(
            "{name:<38} {:>8} {:>8}   {:<28} {:>5.2}x",
            ms(p50),
            ms(percentile(samples, 90)),
            format!("docker run --rm true {}", ms(base)),
            p50.as_secs_f64() / base.as_secs_f64()
        );
    }
    rt.block_on(snapshots(&driver, &spec, &docker_cli, n))?;
    process(&rt, &spec, n)
}

/// The process driver (bubblewrap): create → first exec, next to a bare
/// `bwrap --unshare-all --ro-bind / / --proc /proc --dev /dev true` and
/// to `docker run --rm IMAGE true`'s figure from this run.
fn process(rt: &tokio::runtime::Runtime, spec: &SandboxSpec, n: usize) -> BenchResult<()> {
    let root = tempfile::Builder::new().prefix("bs-bench-").tempdir()?;
    let driver = rt
        .block_on(backshift_sandbox::process::ProcessDriver::new(
            root.path(),
            Vec::new(),
        ))
        .map_err(|e| format!("{e}; `cargo xtask setup` installs bubblewrap"))?;
    let mut first_exec = Vec::with_capacity(n);
    let mut full_cycle = Vec::with_capacity(n);
    let mut baseline = Vec::with_capacity(n);
    for i in 0..WARMUP + n {
        let (to_exec, destroy) = rt.block_on(driver_once(&driver, spec))?;
        let start = Instant::now();
        let out = Command::new("bwrap")
            .args(["--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc"])
            .args(["--dev", "/dev", "true"])
            .output()?;
        let raw = start.elapsed();
        if !out.status.success() {
            return Err(format!(
                "bwrap failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
            .into());
        }
        if i >= WARMUP {
            first_exec.push(to_exec);
            full_cycle.push(to_exec + destroy);
            baseline.push(raw);
        }
    }
    let base = percentile(&mut baseline, 50);
    for (name, samples) in [
        ("process create -> first exec", &mut first_exec),
        ("process create -> exec -> destroy", &mut full_cycle),
    ] {
        let p50 = percentile(samples, 50);
        println!(
            "{name:<38} {:>8} {:>8}   {:<28} {:>5.2}x",
            ms(p50),
            ms(percentile(samples, 90)),
            format!("bwrap ... true {}", ms(base)),
            p50.as_secs_f64() / base.as_secs_f64()
        );
    }
    Ok(())
}

/// Filesystem snapshots: the driver's (`docker commit` through the API,
/// the sandbox paused meanwhile) next to the `docker commit` CLI, of one
/// sandbox with 20 MiB written outside its checkout.
async fn snapshots(
    driver: &DockerDriver,
    spec: &SandboxSpec,
    cli: &Path,
    n: usize,
) -> BenchResult<()> {
    let id = driver.create(spec).await?;
    let fill = ExecSpec::new([
        "bash",
        "-c",
        "head -c 20971520 /dev/urandom > /home/agent/deps.bin",
    ]);
    let filled = driver.exec_collect(&id, &fill).await?;
    if filled.exit_code != 0 {
        driver.destroy(&id).await?;
        return Err("cannot write the snapshot bench's 20 MiB".into());
    }
    let labels = BTreeMap::from([(labels::MANAGED.to_owned(), "true".to_owned())]);
    let (mut ours, mut raw) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut result = Ok(());
    for i in 0..WARMUP + n {
        let reference = format!("backshift-bench-snapshot:{}-{i}", std::process::id());
        let start = Instant::now();
        if let Err(e) = driver.snapshot(&id, &reference, &labels).await {
            result = Err(e.to_string());
            break;
        }
        let took = start.elapsed();
        driver.remove_snapshot(&reference).await?;
        let start = Instant::now();
        let out = Command::new(cli)
            .env("DOCKER_API_VERSION", "1.41")
            .args(["commit", &id.0, &reference])
            .output()?;
        let cli_took = start.elapsed();
        driver.remove_snapshot(&reference).await?;
        if !out.status.success() {
            result = Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
            break;
        }
        if i >= WARMUP {
            ours.push(took);
            raw.push(cli_took);
        }
    }
    driver.destroy(&id).await?;
    result?;
    let base = percentile(&mut raw, 50);
    let p50 = percentile(&mut ours, 50);
    println!(
        "{:<38} {:>8} {:>8}   {:<28} {:>5.2}x",
        "backshift snapshot (20 MiB changed)",
        ms(p50),
        ms(percentile(&mut ours, 90)),
        format!("docker commit {}", ms(base)),
        p50.as_secs_f64() / base.as_secs_f64()
    );
    Ok(())
}

/// One sandbox: time to first exec, then time to destroy.
async fn driver_once(
    driver: &dyn SandboxDriver,
    spec: &SandboxSpec,
) -> BenchResult<(Duration, Duration)> {
    let start = Instant::now();
    let id = driver.create(spec).await?;
    let exec = driver.exec_collect(&id, &ExecSpec::new(["true"])).await;
    let to_exec = start.elapsed();
    let destroy_start = Instant::now();
    driver.destroy(&id).await?;
    let destroy = destroy_start.elapsed();
    let code = exec?.exit_code;
    if code != 0 {
        return Err(format!("`true` exited {code} in the sandbox").into());
    }
    Ok((to_exec, destroy))
}

/// Debian's docker CLI (it speaks the engine's API), pinned to the
/// engine's API version; any `docker` on PATH otherwise.
fn docker_cli() -> BenchResult<PathBuf> {
    let debian = Path::new("/usr/bin/docker");
    let cli = if debian.exists() {
        debian.to_path_buf()
    } else {
        PathBuf::from("docker")
    };
    let probe = Command::new(&cli)
        .args(["version", "--format", "{{.Server.APIVersion}}"])
        .env("DOCKER_API_VERSION", "1.41")
        .output()
        .map_err(|e| {
            format!("cannot run the docker CLI for the baseline ({e}); install docker.io")
        })?;
    if !probe.status.success() {
        return Err(format!(
            "the docker CLI cannot talk to the engine: {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        )
        .into());
    }
    Ok(cli)
}

fn docker_run_once(cli: &Path, image: &str) -> BenchResult<Duration> {
    let mut cmd = Command::new(cli);
    cmd.env("DOCKER_API_VERSION", "1.41")
        .args(["run", "--rm", image, "true"]);
    let start = Instant::now();
    let out = cmd.output()?;
    let took = start.elapsed();
    if !out.status.success() {
        return Err(format!(
            "docker run --rm {image} true failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(took)
}

/// The nearest-rank percentile `p` (0–100) of a non-empty sample.
fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort();
    let rank = (samples.len() * p).div_ceil(100).max(1);
    samples[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}
