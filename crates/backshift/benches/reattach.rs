//! Restart re-attach: with N attempts running (each in a long command in
//! its own sandbox), the server is killed with SIGKILL and started again;
//! measured is the time from the restart until every attempt has adopted
//! its surviving sandbox (through the sandbox's shim socket) and is
//! running again. Beside it, from the same run, the Docker work a
//! re-attach through Docker would need at least: one exec in each of the N
//! containers through the API, all at once.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p backshift --bench
//! reattach -- --attempts 50`). Needs dockerd and the default image.

use backshift_sandbox::docker::DockerDriver;
use backshift_sandbox::{ExecSpec, SandboxDriver, SandboxId, labels};
use fake_model::FakeModel;
use serde_json::{Value, json};

use std::time::{Duration, Instant};

mod support;

use support::{BenchResult, get, start_server, token};

fn main() {
    support::main("reattach", run());
}

/// Waits until every attempt has an event matching `done` after `after[i]`.
async fn wait_for(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    attempts: &[String],
    after: &[u64],
    done: impl Fn(&Value) -> bool,
    limit: Duration,
) -> BenchResult<()> {
    let start = Instant::now();
    let mut pending: Vec<usize> = (0..attempts.len()).collect();
    while !pending.is_empty() {
        if start.elapsed() > limit {
            return Err(format!("{} attempts not there after {limit:?}", pending.len()).into());
        }
        let mut still = Vec::new();
        for i in pending {
            let evs = get(
                http,
                &format!(
                    "{url}/api/v1/attempts/{}/events?after={}",
                    attempts[i], after[i]
                ),
                token,
            )
            .await?;
            if !evs.as_array().is_some_and(|a| a.iter().any(&done)) {
                still.push(i);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

async fn run() -> BenchResult<()> {
    let n = support::count_arg("--attempts", 2, 50)?;
    let driver = DockerDriver::connect()
        .await
        .map_err(|e| format!("{e}; start dockerd (cargo xtask setup does)"))?;
    let script = serde_json::from_value(json!({"mode": "turn", "steps": [
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "sleep 3000"}}]}}
    ]}))?;
    let fake = FakeModel::start(script).await?;
    let (dir, repo, config) = support::bench_setup(
        &fake.base_url(),
        &format!("max_concurrent_attempts = {n}\n"),
    )?;

    let (server, url) = start_server(dir.path(), &config)?;
    let token = token(dir.path(), &url)?;
    let http = reqwest::Client::new();
    let mut attempts = Vec::new();
    for _ in 0..n {
        let task =
            support::submit(&http, &url, &token, json!({"prompt": "wait", "repo": repo})).await?;
        attempts.push(format!("{task}-1"));
    }
    println!("re-attach: {n} attempts running, then SIGKILL and restart");
    let zeros = vec![0; n];
    let is_running_command = |e: &Value| e["type"] == "tool_call" && e["name"] == "run_command";
    wait_for(
        &http,
        &url,
        &token,
        &attempts,
        &zeros,
        is_running_command,
        Duration::from_secs(600),
    )
    .await?;
    let mut before = Vec::new();
    for a in &attempts {
        let evs = get(
            &http,
            &format!("{url}/api/v1/attempts/{a}/events?limit=10000"),
            &token,
        )
        .await?;
        before.push(evs.as_array().map_or(0, |v| v.len() as u64));
    }

    drop(server); // SIGKILL
    let restart = Instant::now();
    let (server, _) = start_server(dir.path(), &config)?;
    let restored = |e: &Value| {
        e["type"] == "state_changed" && e["from"] == "recovering" && e["to"] == "running"
    };
    wait_for(
        &http,
        &url,
        &token,
        &attempts,
        &before,
        restored,
        Duration::from_secs(600),
    )
    .await?;
    let reattach = restart.elapsed();

    // The baseline: one exec in each surviving container, all at once.
    let containers: Vec<SandboxId> = driver
        .list(&[(labels::MANAGED, "true")])
        .await?
        .into_iter()
        .filter(|s| {
            s.labels
                .get(labels::ATTEMPT)
                .is_some_and(|a| attempts.contains(a))
        })
        .map(|s| s.id)
        .collect();
    let start = Instant::now();
    let execs = containers.iter().map(|id| {
        let driver = driver.clone();
        let id = id.clone();
        async move { driver.exec_collect(&id, &ExecSpec::new(["true"])).await }
    });
    for r in futures::future::join_all(execs).await {
        r?;
    }
    let raw = start.elapsed();

    drop(server);
    for id in &containers {
        let _ = driver.destroy(id).await;
    }
    println!(
        "{:<44} {:>10}   {:<40} {:>7}",
        "measure", "time", "baseline", "ratio"
    );
    println!(
        "{:<44} {:>10}   {:<40} {:>6.1}x",
        format!("restart -> {n} attempts re-attached"),
        format!("{:.0} ms", reattach.as_secs_f64() * 1000.0),
        format!(
            "{} x docker exec true, parallel {:.0} ms",
            containers.len(),
            raw.as_secs_f64() * 1000.0
        ),
        reattach.as_secs_f64() / raw.as_secs_f64()
    );
    Ok(())
}
