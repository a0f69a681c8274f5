//! Tasks on the process driver (`[sandbox] driver = "process"`, what a
//! host without Docker gets): the agent works in a bubblewrap sandbox
//! over the host's own tools, its commands' network goes through the
//! egress proxy, its work comes back as a branch, and it can be paused
//! and resumed; `readyz` says which driver runs. No container is made.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, docker, script};
use reqwest::Method;
use serde_json::json;

const PROCESS: &str = "[sandbox]\ndriver = \"process\"\n";

fn containers_of(attempt: &str) -> String {
    docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=dev.backshift.attempt={attempt}"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_in_a_process_sandbox_and_returns_its_branch() {
    let w = World::start(
        Some(script(json!({"mode": "sequence", "steps": [
            {"reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "notes.txt", "content": "from a process sandbox\n"}}]}},
            {"expect": {"tool_results": [{"contains": "wrote"}]},
             "reply": {"tool_calls": [{"name": "run_command", "arguments": {"command":
                "id -u; hostname; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; git log --oneline | wc -l; curl -s -o /dev/null -w 'proxy:%{http_code}\\n' http://denied.backshift-test.invalid/; ls /root 2>&1 | head -1"}}]}},
            {"expect": {"tool_results": [{"contains": "proxy:403"}]},
             "reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Write notes"}}]}}
        ]}))),
        PROCESS,
    )
    .await;
    let (status, ready) = w.api(Method::GET, "/readyz", None).await;
    assert_eq!(status, 200, "{ready}");
    let sandboxes = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sandboxes")
        .unwrap();
    assert!(
        sandboxes["message"]
            .as_str()
            .unwrap()
            .contains("the process driver"),
        "{ready}"
    );
    assert!(
        !ready.to_string().contains("\"docker\""),
        "no Docker check: {ready}"
    );

    let (task, view) = w.run_task("Write notes", &[]).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    let attempt = format!("{task}-1");
    let evs = w.events(&attempt).await;
    let output = common::command_output(&evs);
    // The sandbox's user, its own host name, loopback only, the checkout
    // with its history, the network only through the proxy, no host home.
    assert!(
        output.starts_with("1000\nsandbox\nlo\n1\nproxy:403\n"),
        "{output}"
    );
    assert!(output.contains("cannot access '/root'"), "{output}");
    assert!(
        evs.iter().any(|e| e["type"] == "egress"
            && e["host"] == "denied.backshift-test.invalid"
            && e["decision"] == "denied"),
        "the proxy decided: {evs:?}"
    );
    let (code, diff, _) = w.cli(&["diff", &task]).await;
    assert_eq!(code, 0);
    assert!(diff.contains("+from a process sandbox"), "{diff}");
    assert_eq!(containers_of(&attempt), "", "no container was made");
    // Its sandbox directory goes with it.
    let left: Vec<_> = std::fs::read_dir(w.dir.path().join("data/sandboxes"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_sandbox_pauses_with_its_files_and_resumes() {
    let w = World::start(None, PROCESS).await;
    let script = "if [ -e /tmp/mark ]; then echo resumed > result.txt; else touch /tmp/mark; echo waiting; sleep 600; fi";
    let (task, attempt) = w.run_until_output("Wait", script, "waiting").await;
    let (code, out, err) = w.cli(&["pause", &task]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is paused"), "{out}");
    let (status, list) = w.api(Method::GET, "/api/v1/sandboxes", None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list[0]["running"], false, "{list}");
    assert_eq!(list[0]["attempt_state"], "paused", "{list}");
    let (code, out, err) = w.cli(&["resume", &task]).await;
    assert_eq!(code, 0, "{out}{err}");
    let view = w.wait(&task).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(
        diff.contains("+resumed"),
        "the mark outside the checkout was kept: {diff}"
    );
    assert_eq!(containers_of(&attempt), "", "no container was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_docker_the_server_takes_the_process_driver_and_says_so() {
    // A Docker host that does not exist: `auto` falls back.
    let w = World::start_with(
        None,
        "",
        "info",
        &[("DOCKER_HOST", "unix:///nonexistent.invalid/docker.sock")],
    )
    .await;
    let (status, ready) = w.api(Method::GET, "/readyz", None).await;
    assert_eq!(status, 200, "ready without Docker: {ready}");
    let checks = ready["checks"].as_array().unwrap();
    let sandboxes = checks.iter().find(|c| c["name"] == "sandboxes").unwrap();
    let message = sandboxes["message"].as_str().unwrap();
    assert!(
        message.contains("the process driver") && message.contains("Docker is not reachable"),
        "{ready}"
    );
    let limits = checks.iter().find(|c| c["name"] == "limits").unwrap();
    assert_eq!(limits["ok"], true, "{ready}");
    let log = std::fs::read_to_string(w.dir.path().join("server.log")).unwrap();
    assert!(
        log.contains("sandboxes: the process driver"),
        "the log says which: {log}"
    );
    // And a task runs.
    let (task, view) = w
        .run_task("Say hi", &["--command", "echo hi > hi.txt"])
        .await;
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(containers_of(&format!("{task}-1")), "");
}
