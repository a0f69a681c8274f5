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

use serde_json::json;
use support::BenchResult;

fn main() {
    support::main("gateway", run());
}

const BODY: &str = r#"{"model":"any","messages":[{"role":"user","content":"hi"}]}"#;

async fn run() -> BenchResult<()> {
    let n = support::count_arg("--calls", 3, 200)?;
    // Both sides' calls, in sequence mode: any request takes the next step.
    let fake = support::fake_replying(2 * n, "ok").await?;
    let support::Served {
        repo,
        url,
        token,
        http,
        ..
    } = &support::serve(&fake.base_url(), "")?;

    println!("gateway: {n} sequential calls each way");
    let script = format!(
        "for i in $(seq 1 {n}); do curl -s -o /dev/null -w '%{{time_total}}\\n' -H \"Authorization: Bearer $OPENAI_API_KEY\" -H 'content-type: application/json' -d '{BODY}' \"$OPENAI_BASE_URL/chat/completions\"; done"
    );
    let task = &support::submit(
        http,
        url,
        token,
        json!({"prompt": "call the model", "repo": repo, "command": script}),
    )
    .await?;
    let output = support::stdout_of(http, url, token, task).await?;
    let host_loop = format!(
        "for i in $(seq 1 {n}); do curl -s -o /dev/null -w '%{{time_total}}\\n' -H 'content-type: application/json' -d '{BODY}' '{}/chat/completions'; done",
        fake.base_url()
    );
    support::compare_with_host(
        "chat completion through the gateway",
        "gateway",
        n,
        &output,
        &host_loop,
    )?;
    Ok(())
}
