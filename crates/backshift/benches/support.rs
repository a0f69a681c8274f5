//! What the backshift benches share: the real server, started and killed
//! as a process, and its API.
#![allow(dead_code)] // each bench uses a part of it

use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

pub struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Stopped as a service manager would (its warm sandboxes go with
        // it), killed if it does not stop within 20 s.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_server(dir: &Path, config: &Path) -> BenchResult<(Server, String)> {
    // No warm pool unless the bench asks for one (it would take part in
    // what the others measure).
    let warm = if std::fs::read_to_string(config)?.contains("warm =") {
        None
    } else {
        Some(("BACKSHIFT_SANDBOX__WARM", "0"))
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_backshift"))
        .args(["serve", "--config"])
        .arg(config)
        .envs(warm)
        .env("BACKSHIFT_CONFIG_DIR", dir.join("config"))
        .env("BACKSHIFT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let server = Server { child };
    use std::io::BufRead;
    let mut url = None;
    let mut lines = std::io::BufReader::new(stdout).lines();
    for line in lines.by_ref() {
        let line = line?;
        if let Some(u) = line.strip_prefix("backshift listening on ") {
            url = Some(u.trim().to_owned());
        }
        if line.contains("ready for tasks") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Ok((
        server,
        url.ok_or("the server did not say where it listens")?,
    ))
}

pub fn token(dir: &Path, url: &str) -> BenchResult<String> {
    let text = std::fs::read_to_string(dir.join("config/credentials.toml"))?;
    let v: toml::Value = toml::from_str(&text)?;
    Ok(v["servers"][url]["token"]
        .as_str()
        .ok_or("no token saved")?
        .to_owned())
}

pub async fn get(http: &reqwest::Client, url: &str, token: &str) -> BenchResult<Value> {
    Ok(http
        .get(url)
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?)
}

/// A scratch directory with a one-commit repository (`repo`) and a server
/// config (`backshift.toml`) on a free loopback port, its model the
/// scripted one at `model_url`, with `extra` top-level keys.
pub fn bench_setup(
    model_url: &str,
    extra: &str,
) -> BenchResult<(tempfile::TempDir, std::path::PathBuf, std::path::PathBuf)> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(&repo)?;
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(&repo)
            .env("GIT_AUTHOR_NAME", "b")
            .env("GIT_AUTHOR_EMAIL", "b@example.invalid")
            .env("GIT_COMMITTER_NAME", "b")
            .env("GIT_COMMITTER_EMAIL", "b@example.invalid")
            .status()
    };
    git(&["init", "-q", "-b", "main"])?;
    std::fs::write(repo.join("README.md"), "bench\n")?;
    git(&["add", "."])?;
    git(&["commit", "-qm", "init"])?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.path().join("backshift.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n{extra}\n[model]\nbase_url = \"{model_url}\"\nmodel = \"scripted\"\n",
            dir.path().join("data").display(),
        ),
    )?;
    Ok((dir, repo, config))
}

/// Runs a bench's `run` on a runtime; a failure is printed and exits 1.
pub fn main(name: &str, run: impl std::future::Future<Output = BenchResult<()>>) {
    if let Err(e) = tokio::runtime::Runtime::new()
        .map_err(|e| e.into())
        .and_then(|rt| rt.block_on(run))
    {
        eprintln!("{name}: {e}");
        std::process::exit(1);
    }
}

/// The positive count after `flag` (`default` without it); `quick` under
/// `cargo test --benches`, which passes no `--bench`.
pub fn count_arg(flag: &str, quick: usize, default: usize) -> BenchResult<usize> {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return Ok(quick);
    }
    match args.iter().position(|a| a == flag) {
        Some(i) => Ok(args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .filter(|n: &usize| *n > 0)
            .ok_or(format!("{flag} needs a positive number"))?),
        None => Ok(default),
    }
}

/// Creates a task from `body`; returns its id.
pub async fn submit(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: Value,
) -> BenchResult<String> {
    let created: Value = http
        .post(format!("{url}/api/v1/tasks"))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await?
        .json()
        .await?;
    Ok(created["id"]
        .as_str()
        .ok_or(format!("no task id: {created}"))?
        .to_owned())
}

/// `curl` timing lines (seconds) into durations.
pub fn parse_times(text: &str) -> Vec<std::time::Duration> {
    text.lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(std::time::Duration::from_secs_f64)
        .collect()
}

/// The median.
pub fn p50(samples: &mut [std::time::Duration]) -> std::time::Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Waits for task `task` to succeed; returns its attempt's stdout.
pub async fn stdout_of(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    task: &str,
) -> BenchResult<String> {
    let started = std::time::Instant::now();
    let view = loop {
        let v = get(http, &format!("{url}/api/v1/tasks/{task}"), token).await?;
        let state = v["state"].as_str().unwrap_or("");
        if ["succeeded", "failed", "cancelled", "timed_out"].contains(&state) {
            break v;
        }
        if started.elapsed() > std::time::Duration::from_secs(600) {
            return Err("the task did not end within 10 minutes".into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    if view["state"] != "succeeded" {
        return Err(format!("the task did not succeed: {view}").into());
    }
    let events = get(
        http,
        &format!("{url}/api/v1/attempts/{task}-1/events?limit=100000"),
        token,
    )
    .await?;
    Ok(events
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "command_output" && e["stream"] == "stdout")
        .filter_map(|e| e["text"].as_str())
        .collect())
}

/// Prints one figure beside its baseline.
pub fn print_row(
    measure: &str,
    ours: std::time::Duration,
    baseline: &str,
    base: std::time::Duration,
) {
    println!(
        "{:<44} {:>10}   {:<36} {:>7}",
        "measure", "p50", "baseline p50", "ratio"
    );
    println!(
        "{:<44} {:>10}   {:<36} {:>6.1}x",
        measure,
        format!("{:.2} ms", ours.as_secs_f64() * 1000.0),
        format!("{baseline} {:.2} ms", base.as_secs_f64() * 1000.0),
        ours.as_secs_f64() / base.as_secs_f64()
    );
}

/// Compares the curl timings a sandbox printed (`sandbox_output`, one
/// `time_total` per line) with the same `n` requests made on the host by
/// `host_loop` (a bash loop printing the same), and prints the figure
/// beside its baseline and the overhead per request.
pub fn compare_with_host(
    measure: &str,
    what: &str,
    n: usize,
    sandbox_output: &str,
    host_loop: &str,
) -> BenchResult<()> {
    let mut through = parse_times(sandbox_output);
    if through.len() != n {
        return Err(format!(
            "{} timings from the sandbox, expected {n}: {sandbox_output}",
            through.len()
        )
        .into());
    }
    let direct = Command::new("bash").args(["-c", host_loop]).output()?;
    let mut direct = parse_times(&String::from_utf8_lossy(&direct.stdout));
    if direct.len() != n {
        return Err(format!("{} timings from the host, expected {n}", direct.len()).into());
    }
    let (ours, base) = (p50(&mut through), p50(&mut direct));
    print_row(measure, ours, "curl on the host, direct", base);
    println!(
        "{what} overhead per request (p50): {:.2} ms",
        (ours.as_secs_f64() - base.as_secs_f64()) * 1000.0
    );
    Ok(())
}

/// The median of `samples`.
pub fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// An event's time, unix ms.
pub fn ts_ms(e: &Value) -> BenchResult<f64> {
    let t = humantime::parse_rfc3339(e["ts"].as_str().ok_or("event without ts")?)?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_secs_f64() * 1000.0)
}

/// A server started on a scratch setup (see [`bench_setup`]), with its
/// API token and a client: what most benches begin with.
pub struct Served {
    /// Stopped before its directory goes (fields drop in this order).
    _server: Server,
    /// The scratch directory (data, config, repository).
    pub dir: tempfile::TempDir,
    /// The one-commit repository tasks run on.
    pub repo: std::path::PathBuf,
    /// The server's URL.
    pub url: String,
    /// Its admin token.
    pub token: String,
    /// A client.
    pub http: reqwest::Client,
}

/// Starts a server whose model is at `model_url`, with `extra` config.
pub fn serve(model_url: &str, extra: &str) -> BenchResult<Served> {
    let (dir, repo, config) = bench_setup(model_url, extra)?;
    let (server, url) = start_server(dir.path(), &config)?;
    let token = token(dir.path(), &url)?;
    Ok(Served {
        dir,
        repo,
        url,
        token,
        http: reqwest::Client::new(),
        _server: server,
    })
}

/// A scripted model that answers `count` requests, each with `content`.
pub async fn fake_replying(count: usize, content: &str) -> BenchResult<fake_model::FakeModel> {
    let steps: Vec<Value> = (0..count)
        .map(|_| serde_json::json!({"reply": {"content": content}}))
        .collect();
    Ok(fake_model::FakeModel::start(serde_json::from_value(
        serde_json::json!({ "steps": steps }),
    )?)
    .await?)
}
