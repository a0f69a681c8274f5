//! Model gateway overhead: the time of one chat-completion call made with
//! curl inside a sandbox, through the shim's forward and the gateway (token
//! check, real key added, usage read, call recorded), next to the same
//! curl call made on the host straight to the same scripted model, in the
//! same run. curl's own `time_total` is the measure on both sides, so
//! process start does not count.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p backshift --bench
//! gateway -- --calls 200`). Needs dockerd and the default image.

mod support;

use fake_model::FakeModel;
use serde_json::{Value, json};
use std::process::Command;
use support::{BenchResult, p50, parse_times, start_server, token};

fn main() {
    support::main("gateway", run());
}

const BODY: &str = r#"{"model":"any","messages":[{"role":"user","content":"hi"}]}"#;

async fn run() -> BenchResult<()> {
    let n = support::count_arg("--calls", 3, 200)?;
    // Both sides' calls, in sequence mode: any request takes the next step.
    let steps: Vec<Value> = (0..2 * n)
        .map(|_| json!({"reply": {"content": "ok"}}))
        .collect();
    let fake = FakeModel::start(serde_json::from_value(json!({ "steps": steps }))?).await?;
    let (dir, repo, config) = support::bench_setup(&fake.base_url(), "")?;
    let (_server, url) = start_server(dir.path(), &config)?;
    let token = token(dir.path(), &url)?;
    let http = reqwest::Client::new();

    println!("gateway: {n} sequential calls each way");
    let script = format!(
        "for i in $(seq 1 {n}); do curl -s -o /dev/null -w '%{{time_total}}\\n' -H \"Authorization: Bearer $OPENAI_API_KEY\" -H 'content-type: application/json' -d '{BODY}' \"$OPENAI_BASE_URL/chat/completions\"; done"
    );
    let task = &support::submit(
        &http,
        &url,
        &token,
        json!({"prompt": "call the model", "repo": repo, "command": script}),
    )
    .await?;
    let output = support::stdout_of(&http, &url, &token, task).await?;
    let mut through = parse_times(&output);
    if through.len() != n {
        return Err(format!("{} timings from the sandbox, expected {n}", through.len()).into());
    }
    // Baseline: the same calls from the host, straight to the model.
    let direct = Command::new("bash")
        .args([
            "-c",
            &format!(
                "for i in $(seq 1 {n}); do curl -s -o /dev/null -w '%{{time_total}}\\n' -H 'content-type: application/json' -d '{BODY}' '{}/chat/completions'; done",
                fake.base_url()
            ),
        ])
        .output()?;
    let mut direct = parse_times(&String::from_utf8_lossy(&direct.stdout));
    if direct.len() != n {
        return Err(format!("{} timings from the host, expected {n}", direct.len()).into());
    }
    let (ours, base) = (p50(&mut through), p50(&mut direct));
    support::print_row(
        "chat completion through the gateway",
        ours,
        "curl on the host, direct",
        base,
    );
    println!(
        "gateway overhead per call (p50): {:.2} ms",
        (ours.as_secs_f64() - base.as_secs_f64()) * 1000.0
    );
    Ok(())
}
