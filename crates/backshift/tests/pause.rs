//! Pause and resume: a person stops an attempt's sandbox mid-command; it
//! stays stopped (its container kept, not running) with its wall-time
//! clock held; resumed, the same container starts again with every file
//! as it was (in the checkout and outside it), and the agent goes on from
//! its last completed step, told what happened. A paused attempt can be
//! cancelled, and one left paused past its deadline times out; either way
//! its sandbox goes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, docker, script};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

/// Writes a file, then runs a command that the first time marks the
/// sandbox outside the checkout and sleeps (the window in which the test
/// pauses), and the second time finds the mark and ends; then another
/// file. `ran.txt` counts the command's runs.
fn pausable_script() -> fake_model::Script {
    script(json!({"mode": "turn", "steps": [
        {"reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "before.txt", "content": "written before\n"}}]}},
        {"expect": {"tool_results": [{"contains": "wrote"}]},
         "reply": {"tool_calls": [{"name": "run_command", "arguments": {"command":
            "echo run >> ran.txt; if [ -e /tmp/stopped-once ]; then echo found the mark; else touch /tmp/stopped-once; echo started; sleep 600; fi; echo slept"}}]}},
        {"expect": {"tool_results": [{"contains": "found the mark"}], "user_contains": "A person paused this task"},
         "reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "after.txt", "content": "written after\n"}}]}},
        {"expect": {"tool_results": [{"contains": "wrote"}]},
         "reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Write two files"}}]}}
    ]}))
}

fn containers_of(attempt: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label=dev.backshift.attempt={attempt}"),
    ])
    .split_whitespace()
    .map(str::to_owned)
    .collect()
}

/// Waits until `attempt`'s events hold one that `found` accepts.
async fn wait_for_event(w: &World, attempt: &str, what: &str, found: impl Fn(&Value) -> bool) {
    for _ in 0..600 {
        if w.events(attempt).await.iter().any(&found) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{attempt} never showed {what}: {:?}",
        w.events(attempt).await
    );
}

async fn attempt_view(w: &World, attempt: &str) -> Value {
    let (status, view) = w
        .api(Method::GET, &format!("/api/v1/attempts/{attempt}"), None)
        .await;
    assert_eq!(status, 200, "{view}");
    view
}

async fn submit(w: &World, prompt: &str) -> (String, String) {
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w.cli(&["run", prompt, "--repo", &repo]).await;
    assert_eq!(code, 0, "{out}{err}");
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let attempt = format!("{task}-1");
    (task, attempt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_attempt_keeps_its_sandbox_and_files_and_goes_on_when_resumed() {
    let w = World::start(Some(pausable_script()), "").await;
    let (task, attempt) = submit(&w, "Write two files").await;
    wait_for_event(&w, &attempt, "the command's start", |e| {
        e["type"] == "command_output" && e["text"].as_str().unwrap_or("").contains("started")
    })
    .await;
    let before = containers_of(&attempt);
    assert_eq!(before.len(), 1, "{before:?}");

    let (code, out, err) = w.cli(&["pause", &task]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("attempt {attempt} is paused")),
        "{out}"
    );
    let view = attempt_view(&w, &attempt).await;
    assert_eq!(view["state"], "paused", "{view}");
    assert_eq!(view["pause_requested"], false, "carried out: {view}");
    // The container is kept, stopped.
    assert_eq!(containers_of(&attempt), before);
    let state = docker(&["inspect", "-f", "{{.State.Status}}", &before[0]]);
    assert_eq!(state, "exited", "stopped, not removed");
    let (status, list) = w.api(Method::GET, "/api/v1/sandboxes", None).await;
    assert_eq!(status, 200, "{list}");
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["attempt_id"] == attempt.as_str())
        .unwrap_or_else(|| panic!("the stopped sandbox is listed: {list}"));
    assert_eq!(listed["running"], false, "{listed}");
    assert_eq!(listed["attempt_state"], "paused", "{listed}");
    // Paused again: nothing changes. Held, not timed: the task waits.
    let (status, again) = w
        .api(
            Method::POST,
            &format!("/api/v1/attempts/{attempt}/pause"),
            None,
        )
        .await;
    assert_eq!((status, again["state"].as_str()), (200, Some("paused")));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(attempt_view(&w, &attempt).await["state"], "paused");

    let (status, resumed) = w
        .api(
            Method::POST,
            &format!("/api/v1/attempts/{attempt}/resume"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{resumed}");
    assert_ne!(resumed["state"], "paused", "{resumed}");
    let view = w.wait(&task).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());

    let evs = w.events(&attempt).await;
    common::assert_gapless(&evs);
    let states = common::states(&evs);
    assert_eq!(
        states,
        [
            "provisioning",
            "preparing",
            "running",
            "paused",
            "running",
            "publishing",
            "succeeded"
        ]
    );
    let paused = evs
        .iter()
        .find(|e| e["type"] == "state_changed" && e["to"] == "paused")
        .unwrap();
    assert_eq!(paused["detail"], "paused by token:admin", "{paused}");
    assert!(
        !evs.iter().any(|e| e["type"] == "restored"),
        "resumed, not rebuilt"
    );
    let progress: Vec<&str> = evs
        .iter()
        .filter(|e| e["type"] == "progress")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        progress
            .iter()
            .any(|m| m.contains("stopped; its files are kept")),
        "{progress:?}"
    );
    assert!(
        progress.iter().any(|m| m.contains("started again")),
        "{progress:?}"
    );
    // The same container all along: the mark outside the checkout was
    // there, and the checkout kept the first run's line written after the
    // last checkpoint.
    let (code, diff, _) = w.cli(&["diff", &task]).await;
    assert_eq!(code, 0);
    assert!(diff.contains("+written before"), "{diff}");
    assert!(diff.contains("+written after"), "{diff}");
    assert_eq!(diff.matches("+run").count(), 2, "{diff}");
    let output = common::command_output(&evs);
    assert!(output.contains("started\n"), "{output}");
    assert!(output.contains("found the mark\nslept\n"), "{output}");

    // Who paused and resumed it is on the record.
    let (code, audit, _) = w.cli(&["audit", "--jsonl"]).await;
    assert_eq!(code, 0);
    assert!(
        audit.contains("attempt.pause") && audit.contains("attempt.resume"),
        "{audit}"
    );
    // An attempt that ended can neither pause nor resume.
    for verb in ["pause", "resume"] {
        let (status, body) = w
            .api(
                Method::POST,
                &format!("/api/v1/attempts/{attempt}/{verb}"),
                None,
            )
            .await;
        assert_eq!(status, 409, "{verb}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("succeeded"),
            "{body}"
        );
    }
    let (code, _, err) = w.cli(&["resume", &task]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("only a paused attempt can be resumed"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_attempt_can_be_cancelled_and_times_out_when_left() {
    let w = World::start(None, "[deadlines]\npaused_secs = 6\n").await;
    let script = "echo waiting; sleep 600";
    let (cancelled, a1) = w.run_until_output("Wait", script, "waiting").await;
    let (left, a2) = w.run_until_output("Wait too", script, "waiting").await;
    for a in [&a1, &a2] {
        let (status, view) = w
            .api(Method::POST, &format!("/api/v1/attempts/{a}/pause"), None)
            .await;
        assert_eq!(
            (status, view["state"].as_str()),
            (200, Some("paused")),
            "{view}"
        );
        assert_eq!(containers_of(a).len(), 1);
    }
    let (code, out, err) = w.cli(&["cancel", &cancelled]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("cancelled"), "{out}");
    let view = w.wait(&cancelled).await;
    assert_eq!(view["state"], "cancelled", "{view}");
    assert!(
        view["handoff"].is_string(),
        "a failed task says where it stands: {view}"
    );
    let view = w.wait(&left).await;
    assert_eq!(view["state"], "timed_out", "{view}");
    let detail = view["attempts"][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("paused longer than its deadline (6s, [deadlines] paused_secs)"),
        "{detail}"
    );
    for a in [&a1, &a2] {
        let mut left = containers_of(a);
        for _ in 0..100 {
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = containers_of(a);
        }
        assert!(left.is_empty(), "the stopped sandbox of {a} goes: {left:?}");
    }
}
