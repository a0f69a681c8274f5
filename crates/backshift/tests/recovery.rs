//! Recovery: a sandbox killed mid-run is rebuilt from the last checkpoint,
//! and a server killed with SIGKILL picks its attempts up again on restart
//! (adopting the surviving sandbox through its shim: the command that was
//! running keeps running, is followed again, and never runs twice). In
//! both cases the attempt succeeds, its branch holds the work from before
//! and after the interruption, and its event log has no gap and no
//! duplicate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, script};
use serde_json::{Value, json};
use std::time::Duration;
use testkit::docker;

/// Writes a file, runs a three-second command (the window in which the
/// test interrupts) that counts its runs in `ran.txt`, writes another
/// file, finishes. In turn mode, so a
/// resumed conversation gets the same answers for the same state.
fn resumable_script() -> fake_model::Script {
    script(json!({"mode": "turn", "steps": [
        {"reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "before.txt", "content": "written before\n"}}]}},
        {"expect": {"tool_results": [{"contains": "wrote"}]},
         "reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "echo run >> ran.txt; echo started; sleep 3; echo slept"}}]}},
        {"expect": {"tool_results": [{"contains": "slept"}]},
         "reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "after.txt", "content": "written after\n"}}]}},
        {"expect": {"tool_results": [{"contains": "wrote"}]},
         "reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Write two files"}}]}}
    ]}))
}

/// Submits the task and waits until the agent has started the long
/// command; returns (task, attempt).
async fn submit_and_wait_for_the_command(w: &World) -> (String, String) {
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w.cli(&["run", "Write two files", "--repo", &repo]).await;
    assert_eq!(code, 0, "{out}{err}");
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let attempt = format!("{task}-1");
    for _ in 0..300 {
        let evs = w.events(&attempt).await;
        if evs
            .iter()
            .any(|e| e["type"] == "tool_call" && e["name"] == "run_command")
        {
            return (task, attempt);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the agent never started its command");
}

fn containers_of(attempt: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=dev.backshift.attempt={attempt}"),
    ])
    .unwrap()
    .split_whitespace()
    .map(str::to_owned)
    .collect()
}

/// The checks both interruptions share.
async fn assert_recovered(w: &World, task: &str, attempt: &str, adopted: bool) {
    let view = w.wait(task).await;
    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    assert_eq!(view["state"], "succeeded", "{view}");

    let evs = w.events(attempt).await;
    common::assert_gapless(&evs);
    let states = common::states(&evs);
    assert_eq!(
        states,
        [
            "provisioning",
            "preparing",
            "running",
            "recovering",
            "running",
            "publishing",
            "succeeded"
        ]
    );
    let restored = evs.iter().find(|e| e["type"] == "restored").unwrap();
    assert_eq!(restored["checkpoint"], 1, "{restored}");
    assert_eq!(restored["turn"], 1, "{restored}");
    assert_eq!(restored["adopted"], adopted, "{restored}");
    let calls: Vec<&str> = evs
        .iter()
        .filter(|e| e["type"] == "tool_call")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    let output: String = common::command_output(&evs);
    let results = evs.iter().filter(|e| e["type"] == "tool_result").count();
    if adopted {
        // The sandbox survived: the running command was followed again,
        // not started again, and its output is recorded exactly once.
        assert_eq!(calls, ["write_file", "run_command", "write_file", "finish"]);
        assert_eq!(output, "started\nslept\n");
        assert_eq!(results, 4);
    } else {
        // Rebuilt from the checkpoint before it: the interrupted turn ran
        // again; the ones before it did not.
        assert_eq!(
            calls,
            [
                "write_file",
                "run_command",
                "run_command",
                "write_file",
                "finish"
            ]
        );
    }

    let (code, diff, _) = w.cli(&["diff", task]).await;
    assert_eq!(code, 0);
    assert!(diff.contains("+written before"), "{diff}");
    assert!(diff.contains("+written after"), "{diff}");
    // One run in the work that was kept, whichever way it recovered.
    assert_eq!(diff.matches("+run").count(), 1, "{diff}");
    // The sandbox goes right after the attempt ends (its removal follows
    // the terminal state).
    let mut left = containers_of(attempt);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = containers_of(attempt);
    }
    assert!(left.is_empty(), "no sandbox is left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_killed_mid_run_is_rebuilt_from_the_last_checkpoint() {
    let w = World::start(Some(resumable_script()), "").await;
    let (task, attempt) = submit_and_wait_for_the_command(&w).await;
    let ids = containers_of(&attempt);
    assert_eq!(ids.len(), 1);
    docker(&["kill", &ids[0]]).unwrap();
    assert_recovered(&w, &task, &attempt, false).await;
    let evs = w.events(&attempt).await;
    let lost = evs
        .iter()
        .find(|e| e["type"] == "state_changed" && e["to"] == "recovering")
        .unwrap();
    assert!(
        lost["detail"].as_str().unwrap().contains("sandbox"),
        "{lost}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_resumes_its_attempt_on_restart() {
    let mut w = World::start(Some(resumable_script()), "").await;
    let (task, attempt) = submit_and_wait_for_the_command(&w).await;
    w.kill_server().await;
    // The sandbox outlives the server.
    assert_eq!(containers_of(&attempt).len(), 1);
    w.restart_server().await;
    assert_recovered(&w, &task, &attempt, true).await;
    let evs = w.events(&attempt).await;
    let interrupted = evs
        .iter()
        .find(|e| e["type"] == "state_changed" && e["to"] == "recovering")
        .unwrap();
    assert!(
        interrupted["detail"]
            .as_str()
            .unwrap()
            .contains("the server stopped while this attempt was running"),
        "{interrupted}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgresql_a_killed_server_resumes_its_attempt_too() {
    let db = testkit::PgDatabase::create().await.unwrap();
    let mut w = World::start(
        Some(resumable_script()),
        &format!("database_url = \"{}\"\n", db.url),
    )
    .await;
    let ready: Value = reqwest::get(format!("{}/readyz", w.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(ready.to_string().contains("PostgreSQL answers"), "{ready}");
    let (task, attempt) = submit_and_wait_for_the_command(&w).await;
    w.kill_server().await;
    w.restart_server().await;
    assert_recovered(&w, &task, &attempt, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_with_sigterm_leaves_its_attempt_to_resume() {
    let mut w = World::start(Some(resumable_script()), "").await;
    let (task, attempt) = submit_and_wait_for_the_command(&w).await;
    w.stop_server().await;
    // Stopped, not ended: still running, its sandbox alive.
    assert_eq!(containers_of(&attempt).len(), 1);
    w.restart_server().await;
    assert_recovered(&w, &task, &attempt, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_turn_is_checkpointed_meanwhile_and_restored_from_that() {
    let s = script(json!({"mode": "turn", "steps": [
        {"expect": {"user_contains": "Long"},
         "reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "echo partial > partial.txt; sleep 4; echo done > done.txt"}}]}},
        {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Long turn"}}]}}
    ]}));
    let w = World::start(Some(s), "checkpoint_every_secs = 1\n").await;
    let repo = w.repo.to_string_lossy().into_owned();
    let (_, out, _) = w.cli(&["run", "Long", "--repo", &repo]).await;
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let attempt = format!("{task}-1");
    // Wait for a checkpoint taken while the command runs, holding its
    // partial work.
    let mut mid = None;
    for _ in 0..100 {
        mid = w
            .events(&attempt)
            .await
            .into_iter()
            .find(|e| e["type"] == "checkpoint" && e["turn"] == 0 && e["changed"] == true);
        if mid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mid = mid.expect("no checkpoint during the long command");
    let ids = containers_of(&attempt);
    docker(&["kill", &ids[0]]).unwrap();
    let view = w.wait(&task).await;
    let fake = w.fake.as_ref().unwrap();
    assert!(
        fake.failures().is_empty(),
        "the resumed turn has its task: {:?}",
        fake.failures()
    );
    assert_eq!(view["state"], "succeeded", "{view}");
    let evs = w.events(&attempt).await;
    let restored = evs.iter().find(|e| e["type"] == "restored").unwrap();
    assert!(
        restored["checkpoint"].as_u64().unwrap() >= mid["n"].as_u64().unwrap(),
        "{restored}"
    );
    assert_eq!(restored["turn"], 0, "{restored}");
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(
        diff.contains("+partial") && diff.contains("+done"),
        "{diff}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_sandbox_keeps_what_was_installed_through_its_snapshot() {
    let s = script(json!({"mode": "turn", "steps": [
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command":
            "mkdir -p ~/.cache/tool deps && echo installed > ~/.cache/tool/dep && echo 'deps/' > .gitignore && echo vendored > deps/lib && echo tracked > kept.txt"}}]}},
        {"expect": {"tool_results": [{"contains": "exit code: 0"}]},
         "reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "echo waiting; sleep 3"}}]}},
        {"expect": {"tool_results": [{"contains": "waiting"}]},
         "reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "cat ~/.cache/tool/dep deps/lib kept.txt"}}]}},
        {"expect": {"tool_results": [{"contains": "installed\nvendored\ntracked"}]},
         "reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Kept"}}]}}
    ]}));
    let w = World::start(Some(s), "[sandbox]\nsnapshot_every_secs = 0\n").await;
    let repo = w.repo.to_string_lossy().into_owned();
    let (_, out, _) = w.cli(&["run", "Install and wait", "--repo", &repo]).await;
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let attempt = format!("{task}-1");
    let mut snapshot = None;
    for _ in 0..300 {
        let evs = w.events(&attempt).await;
        let waiting = evs
            .iter()
            .any(|e| e["type"] == "command_output" && e["text"] == "waiting\n");
        snapshot = evs.into_iter().find(|e| e["type"] == "snapshot");
        if waiting && snapshot.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let snapshot = snapshot.expect("no snapshot was taken");
    if snapshot["checkpoint"] != 1 {
        let progress: Vec<Value> = w
            .events(&attempt)
            .await
            .into_iter()
            .filter(|e| e["type"] == "progress" || e["type"] == "checkpoint")
            .collect();
        panic!("the first snapshot is {snapshot}, not checkpoint 1's; {progress:#?}");
    }
    let image = snapshot["image"].as_str().unwrap().to_owned();
    let ids = containers_of(&attempt);
    docker(&["kill", &ids[0]]).unwrap();

    let view = w.wait(&task).await;
    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    assert_eq!(view["state"], "succeeded", "{view}");
    let evs = w.events(&attempt).await;
    // One recovery: the kill's (a snapshot pauses the sandbox; that is
    // not a loss).
    let restored: Vec<&Value> = evs.iter().filter(|e| e["type"] == "restored").collect();
    assert_eq!(restored.len(), 1, "{restored:?}");
    let restored = restored[0];
    assert_eq!(restored["adopted"], false, "{restored}");
    assert_eq!(restored["snapshot"], image.as_str(), "{restored}");
    // The checkpoint's files came back; the ignored ones stayed out of the
    // branch.
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(
        diff.contains("+tracked") && diff.contains("+deps/"),
        "{diff}"
    );
    assert!(!diff.contains("vendored"), "{diff}");
    assert!(
        docker(&["images", "-q", &image]).unwrap().trim().is_empty(),
        "the snapshot is removed with the attempt's end"
    );
}
