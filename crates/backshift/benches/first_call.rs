//! Task submitted → the agent's first model call: the time from the API
//! accepting a task (its `201`) to the built-in agent's first request to
//! the model (its `model_request` event, recorded as the request goes
//! out), with the image present on the Docker host. In between: the queue,
//! the fetch of the repository into the git store, the sandbox's creation
//! with its shim, gateway, egress proxy and git endpoint, the checkout
//! copied in. Beside it, in the same run, the raw baseline: `docker run
//! --rm` of the same image running `true` (a container started and gone,
//! nothing else).
//!
//! Run with `cargo xtask bench` (or `cargo bench -p backshift --bench
//! first_call -- --tasks 10`). Needs dockerd and the default image.

mod support;

use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{BenchResult, get, median, ts_ms};

fn main() {
    support::main("first_call", run());
}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}

/// What one task's start took: (submitted → first model call, sandbox
/// ready as its `sandbox … is up in N ms` event says, whether the sandbox
/// came from the warm pool).
async fn one_task(served: &support::Served, i: usize) -> BenchResult<(f64, f64, bool)> {
    let support::Served {
        repo,
        url,
        token,
        http,
        ..
    } = served;
    let submitted_before = now_ms();
    let task = support::submit(
        http,
        url,
        token,
        json!({"prompt": format!("task {i}"), "repo": repo}),
    )
    .await?;
    let submitted = (submitted_before + now_ms()) / 2.0;
    let started = Instant::now();
    let (first, events) = loop {
        let events = get(
            http,
            &format!("{url}/api/v1/attempts/{task}-1/events?limit=1000"),
            token,
        )
        .await?;
        if let Some(e) = events
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["type"] == "model_request")
        {
            break (ts_ms(e)?, events);
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(format!("task {task} made no model call in 2 minutes: {events}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let said: Vec<&str> = events
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "progress")
        .filter_map(|e| e["message"].as_str())
        .collect();
    let up = said
        .iter()
        .find_map(|m| {
            m.split_once(" is up in ")
                .and_then(|(_, ms)| ms.trim_end_matches(" ms").parse::<f64>().ok())
        })
        .ok_or_else(|| format!("task {task} never said its sandbox was up: {said:?}"))?;
    let warm = said.iter().any(|m| m.contains("taken from the warm pool"));
    // Only its start matters: it is cancelled, and gone before the next
    // one.
    http.post(format!("{url}/api/v1/tasks/{task}/cancel"))
        .bearer_auth(token)
        .send()
        .await?;
    loop {
        let v = get(http, &format!("{url}/api/v1/tasks/{task}"), token).await?;
        if ["succeeded", "failed", "cancelled", "timed_out"]
            .contains(&v["state"].as_str().unwrap_or(""))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((first - submitted, up, warm))
}

/// Waits until the server's warm pool has a sandbox ready (it refills at
/// once; a task submitted back to back could find it still being made).
async fn pool_ready(served: &support::Served) -> BenchResult<()> {
    let started = Instant::now();
    loop {
        let pool = get(
            &served.http,
            &format!("{}/api/v1/pool", served.url),
            &served.token,
        )
        .await?;
        let ready = pool["environments"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["default"] == true && e["ready"].as_u64().unwrap_or(0) > 0);
        if ready {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err(format!("the warm pool made no sandbox in a minute: {pool}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run() -> BenchResult<()> {
    let n = support::count_arg("--tasks", 2, 10)?;
    // The model's answers do not matter (each task is cancelled once it
    // has called); enough of them for every call of both servers.
    let fake = support::fake_replying(40 * n, "Nothing to change.").await?;
    // One server without a warm pool, one with.
    let cold = support::serve(&fake.base_url(), "[sandbox]\nwarm = 0\n")?;
    let warm = support::serve(&fake.base_url(), "[sandbox]\nwarm = 1\n")?;
    let image = backshift_sandbox::image::default_image_tag();
    println!(
        "first_call: {n} tasks, one at a time, on a server without a warm pool and on one with it, each beside a raw `docker run --rm {image} true`"
    );
    let mut raw = Vec::new();
    let (mut cold_first, mut cold_up) = (Vec::new(), Vec::new());
    let (mut warm_first, mut warm_up) = (Vec::new(), Vec::new());
    for i in 0..n {
        // The baseline first, so all see the same machine.
        let t = Instant::now();
        let ok = Command::new("docker")
            .args(["run", "--rm", "--network", "none", &image, "true"])
            .env("DOCKER_API_VERSION", "1.41")
            .status()?
            .success();
        if !ok {
            return Err("docker run failed".into());
        }
        raw.push(t.elapsed().as_secs_f64() * 1000.0);

        let (first, up, _) = one_task(&cold, i).await?;
        cold_first.push(first);
        cold_up.push(up);
        pool_ready(&warm).await?;
        let (first, up, claimed) = one_task(&warm, i).await?;
        if !claimed {
            return Err("a task on the warm server did not get a warm sandbox".into());
        }
        warm_first.push(first);
        warm_up.push(up);
    }
    let r = median(&mut raw);
    println!(
        "{:<48} {:>10}   {:<36} {:>7}",
        "measure", "p50", "baseline p50", "ratio"
    );
    for (what, values) in [
        ("sandbox ready: a new one", &mut cold_up),
        ("sandbox ready: a warm-pool claim", &mut warm_up),
        ("task submitted -> first model call (new)", &mut cold_first),
        ("task submitted -> first model call (warm)", &mut warm_first),
    ] {
        let o = median(values);
        println!(
            "{:<48} {:>10}   {:<36} {:>6.2}x",
            what,
            format!("{o:.0} ms"),
            format!("docker run --rm (true) {r:.0} ms"),
            o / r
        );
    }
    Ok(())
}
