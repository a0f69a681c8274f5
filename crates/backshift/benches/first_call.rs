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

async fn run() -> BenchResult<()> {
    let n = support::count_arg("--tasks", 2, 10)?;
    // The model's answers do not matter (each task is cancelled once it
    // has called); enough of them for every call.
    let fake = support::fake_replying(20 * n, "Nothing to change.").await?;
    let support::Served {
        repo,
        url,
        token,
        http,
        ..
    } = &support::serve(&fake.base_url(), "")?;
    let image = backshift_sandbox::image::default_image_tag();
    println!(
        "first_call: {n} tasks, one at a time, each beside a raw `docker run --rm {image} true`"
    );
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for i in 0..n {
        // The baseline first, so both see the same machine.
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
        let first = loop {
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
                break ts_ms(e)?;
            }
            if started.elapsed() > Duration::from_secs(120) {
                return Err(
                    format!("task {task} made no model call in 2 minutes: {events}").into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        ours.push(first - submitted);
        // Only its start matters: it is cancelled, and gone before the
        // next one.
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
    }
    let (o, r) = (median(&mut ours), median(&mut raw));
    println!(
        "{:<44} {:>10}   {:<36} {:>7}",
        "measure", "p50", "baseline p50", "ratio"
    );
    println!(
        "{:<44} {:>10}   {:<36} {:>6.1}x",
        "task submitted -> first model call",
        format!("{o:.0} ms"),
        format!("docker run --rm (true) {r:.0} ms"),
        o / r
    );
    Ok(())
}
