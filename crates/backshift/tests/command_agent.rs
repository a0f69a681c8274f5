//! The command agent: a script is the whole agent, under the same
//! lifecycle as any other (events, publishing, crash reports, recovery).
//! No model is involved.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::World;
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

async fn submit(w: &World, prompt: &str, command: &str) -> String {
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w
        .cli(&["run", prompt, "--repo", &repo, "--command", command])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    out.split_whitespace().nth(1).unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_runs_as_the_agent_and_its_changes_are_published() {
    let w = World::start(None, "").await;
    let task = submit(
        &w,
        "Record the prompt\n\nand say hello",
        "printf '%s\\n' \"$BACKSHIFT_PROMPT\" > prompt.txt; echo hello > hello.txt; echo done",
    )
    .await;
    let view = w.wait(&task).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(view["agent"], "command");
    let evs = w.events(&format!("{task}-1")).await;
    let output: String = common::command_output(&evs);
    assert_eq!(output, "done\n");
    let result = evs.iter().find(|e| e["type"] == "tool_result").unwrap();
    assert_eq!(result["exit_code"], 0, "{result}");
    assert!(evs.iter().any(|e| e["type"] == "agent_finished"));
    let (code, diff, _) = w.cli(&["diff", &task]).await;
    assert_eq!(code, 0);
    assert!(diff.contains("+hello"), "{diff}");
    assert!(
        diff.contains("+Record the prompt") && diff.contains("+and say hello"),
        "{diff}"
    );
    // The summary (the commit message) says what ran.
    let summary = view["attempts"][0]["summary"].as_str().unwrap();
    assert!(summary.starts_with("Record the prompt\n"), "{summary}");
    assert!(summary.contains("command agent, which ran"), "{summary}");
    let (_, logs, _) = w.cli(&["logs", &task]).await;
    assert!(logs.contains("done"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_script_ends_agent_crashed_with_its_stderr() {
    let w = World::start(None, "").await;
    let task = submit(
        &w,
        "Break",
        "echo working; echo 'boom: config.yml is missing' >&2; exit 3",
    )
    .await;
    let view = w.wait(&task).await;
    let attempt = &view["attempts"][0];
    assert_eq!(attempt["state"], "failed", "{view}");
    assert_eq!(attempt["reason"], "agent_crashed", "{view}");
    let detail = attempt["detail"].as_str().unwrap();
    assert!(
        detail.contains("exited 3") && detail.contains("boom: config.yml is missing"),
        "{detail}"
    );
    let (code, out, _) = w.cli(&["show", &task]).await;
    assert_eq!(code, 0);
    assert!(out.contains("agent_crashed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_command_requests_get_clear_4xx() {
    let w = World::start(None, "").await;
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, body) = w
        .api(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "x", "repo": repo, "agent": "command"})),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"]["code"], "command_missing", "{body}");
    let (code, body) = w
        .api(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "x", "repo": repo, "agent": "builtin", "command": "true"})),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"]["code"], "command_not_allowed", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_follows_the_script_already_running_instead_of_starting_it_again() {
    let mut w = World::start(None, "").await;
    let task = submit(
        &w,
        "Slow job",
        "echo run >> ran.txt; echo start; sleep 3; echo end",
    )
    .await;
    let attempt = format!("{task}-1");
    for _ in 0..300 {
        if w.events(&attempt)
            .await
            .iter()
            .any(|e| e["type"] == "command_output" && e["text"] == "start\n")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.kill_server().await;
    w.restart_server().await;
    let view = w.wait(&task).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let evs = w.events(&attempt).await;
    common::assert_gapless(&evs);
    let output: String = common::command_output(&evs);
    assert_eq!(output, "start\nend\n", "caught up, nothing twice");
    let calls = evs.iter().filter(|e| e["type"] == "tool_call").count();
    assert_eq!(calls, 1);
    let restored = evs.iter().find(|e| e["type"] == "restored").unwrap();
    assert_eq!(restored["adopted"], true, "{restored}");
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert_eq!(diff.matches("+run").count(), 1, "ran once: {diff}");
}
