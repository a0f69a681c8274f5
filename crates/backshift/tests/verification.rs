//! Verification: backshift runs the repository's tests itself, in a fresh
//! sandbox made from the agent's commit, and gives a failure back to the
//! agent until they pass or `limits.max_iterations` ends it. The real
//! binary, real sandboxes, a real unittest suite
//! (`fixtures/calc`: a runner writing JUnit XML, configured in its
//! `backshift.toml`) and the scripted model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, script, sh};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// The `from→to` of every state change, in order.
fn states(events: &[Value]) -> Vec<String> {
    of_type(events, "state_changed")
        .iter()
        .map(|e| {
            format!(
                "{}→{}",
                e["from"].as_str().unwrap_or("-"),
                e["to"].as_str().unwrap()
            )
        })
        .collect()
}

const CALC_WITH_MUL_AND_A_BUG: &str = "def add(a, b):\n    return a - b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_verification_goes_back_to_the_agent_until_the_tests_pass() {
    let s = script(json!({"steps": [
        {"expect": {"user_contains": "Add mul"},
         "reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "calc.py", "content": CALC_WITH_MUL_AND_A_BUG}}]}},
        {"expect": {"tool_results": [{"contains": "wrote"}]},
         "reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Add mul"}}]}},
        // The report comes back as a message; the agent fixes add.
        {"expect": {"user_contains": "Verification 1 of 3 failed"},
         "reply": {"tool_calls": [{"name": "replace_in_file", "arguments": {"path": "calc.py", "old": "def add(a, b):\n    return a - b", "new": "def add(a, b):\n    return a + b"}}]}},
        {"expect": {"tool_results": [{"contains": "replaced 1 occurrence"}]},
         "reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Add mul\n\nAnd keep add adding."}}]}}
    ]}));
    let w = World::start(Some(s), "").await;
    common::add_calc_project(&w.repo).await;
    let (task, view) = w.run_task("Add mul to calc.py", &[]).await;
    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    assert_eq!(view["state"], "succeeded", "{view:#}");
    assert_eq!(fake.remaining(), 0);

    // The test report is in the API: the last verification passed, the
    // first failed.
    let attempt = &view["attempts"][0];
    assert_eq!(attempt["verifications"], 2, "{attempt:#}");
    let v = &attempt["verification"];
    assert_eq!(v["passed"], true, "{v:#}");
    assert_eq!(v["iteration"], 2);
    assert_eq!(v["command"], "python3 run_tests.py");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["report"]["format"], "junit");
    assert_eq!(
        (
            v["report"]["passed"].as_u64(),
            v["report"]["failed"].as_u64()
        ),
        (Some(3), Some(0)),
        "{v:#}"
    );
    assert_eq!(
        v["commit"], attempt["head_commit"],
        "the published commit is the verified one"
    );

    let id = format!("{task}-1");
    let events = w.events(&id).await;
    let results = of_type(&events, "verification");
    assert_eq!(results.len(), 2);
    let first = results[0];
    assert_eq!(first["passed"], false);
    assert_eq!(first["exit_code"], 1);
    assert_eq!(first["report"]["failed"], 1, "{first:#}");
    let failure = &first["report"]["failures"][0];
    assert_eq!(failure["name"], "test_calc.CalcTest.test_add");
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("AssertionError: -1 != 5"),
        "{failure:#}"
    );
    let started = of_type(&events, "verification_started");
    assert_eq!(started.len(), 2);
    assert_eq!(started[0]["source"], "repository");
    // Its output was streamed as it ran.
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "command_output" && e["call_id"] == "verify:1"),
        "no streamed output of the first verification"
    );
    assert_eq!(
        states(&events),
        [
            "queued→provisioning",
            "provisioning→preparing",
            "preparing→running",
            "running→verifying",
            "verifying→running",
            "running→verifying",
            "verifying→publishing",
            "publishing→succeeded"
        ]
    );

    // What the agent was told: the failing test, its message, the output.
    let told = fake.requests()[2]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|m| m["role"] == "user")
        .unwrap()["content"]
        .as_str()
        .unwrap()
        .to_owned();
    for want in [
        "`python3 run_tests.py`",
        "exit code 1; 2 passed, 1 failed, 0 skipped",
        "- test_calc.CalcTest.test_add: ",
        "AssertionError: -1 != 5",
        "The end of its output:",
        "FAILED (failures=1)",
    ] {
        assert!(
            told.contains(want),
            "{want:?} missing from the feedback:\n{told}"
        );
    }

    // The branch holds both iterations' work; the CLI shows the report.
    let (code, diff, _) = w.cli(&["diff", &task]).await;
    assert_eq!(code, 0);
    assert!(diff.contains("+def mul(a, b):"), "{diff}");
    assert!(
        !diff.contains("-    return a + b"),
        "the fix is in:\n{diff}"
    );
    let (_, shown, _) = w.cli(&["show", &task]).await;
    assert!(shown.contains("✔ verification passed"), "{shown}");
    assert!(
        shown.contains("3 passed, 0 failed, 0 skipped (junit)"),
        "{shown}"
    );
    let (_, logs, _) = w.cli(&["logs", &task]).await;
    assert!(logs.contains("✗ verification failed"), "{logs}");
    assert!(logs.contains("✗ test_calc.CalcTest.test_add: "), "{logs}");
    assert!(logs.contains("✔ verification passed"), "{logs}");
    // No verification sandbox is left behind.
    let left = common::docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=dev.backshift.attempt={id}"),
    ]);
    assert!(left.trim().is_empty(), "sandboxes left: {left}");
}

/// Waits until the attempt is `state`.
async fn wait_for_state(w: &World, attempt: &str, state: &str) {
    for _ in 0..1200 {
        let (_, v) = w
            .api(
                Method::GET,
                &format!("/api/v1/tasks/{}", attempt.trim_end_matches("-1")),
                None,
            )
            .await;
        if v["attempts"][0]["state"] == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{attempt} never became {state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_cannot_make_verification_pass_from_its_own_sandbox() {
    // The agent breaks add, and then tries every way to pass anyway: it
    // commits a runner that always succeeds (a protected path), points
    // backshift.toml's command at `true`, and leaves a process behind
    // that, once its work is committed, keeps gutting the tests and the
    // runner in its sandbox while verification runs.
    let cheat = r#"set -e
printf 'def add(a, b):\n    return 0\n\n\ndef sub(a, b):\n    return a - b\n' > calc.py
printf 'import sys\nsys.exit(0)\n' > run_tests.py
sed -i 's/^command = .*/command = "true"/' backshift.toml
base=$(git rev-parse HEAD)
nohup bash -c "while [ \"\$(git rev-parse HEAD)\" = $base ]; do sleep 0.05; done; while :; do : > test_calc.py; printf 'import sys\nsys.exit(0)\n' > run_tests.py; sleep 0.05; done" >/dev/null 2>&1 &
echo planted"#;
    let s = script(json!({"steps": [
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": cheat}}]}},
        {"expect": {"tool_results": [{"contains": "planted"}]},
         "reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Simplify add"}}]}}
    ]}));
    let w = World::start(Some(s), "").await;
    common::add_calc_project(&w.repo).await;
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w
        .cli(&[
            "run",
            "Simplify add",
            "--repo",
            &repo,
            "--max-iterations",
            "1",
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let id = format!("{task}-1");

    // While verification runs, the agent's own sandbox really is
    // tampered with.
    wait_for_state(&w, &id, "verifying").await;
    let agent_box = common::docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=dev.backshift.attempt={id}"),
        "--filter",
        "label=dev.backshift.role=agent",
    ]);
    let agent_box = agent_box.trim().to_owned();
    assert!(!agent_box.is_empty(), "the agent's sandbox is gone");
    let mut tampered = false;
    for _ in 0..100 {
        let tests = common::docker_quiet(&["exec", &agent_box, "cat", "/workspace/test_calc.py"]);
        if tests.trim().is_empty() {
            tampered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(tampered, "the planted process never emptied the tests");
    let (_, v) = w
        .api(Method::GET, &format!("/api/v1/tasks/{task}"), None)
        .await;
    assert_eq!(
        v["attempts"][0]["state"], "verifying",
        "tampered during verification"
    );

    let view = w.wait(&task).await;
    let attempt = &view["attempts"][0];
    assert_eq!(attempt["state"], "failed", "{view:#}");
    assert_eq!(attempt["reason"], "verification_failed");
    let detail = attempt["detail"].as_str().unwrap();
    assert!(detail.contains("limits.max_iterations = 1"), "{detail}");
    assert!(detail.contains("test_calc.CalcTest.test_add"), "{detail}");
    assert!(attempt["head_commit"].is_null(), "nothing is published");
    let v = &attempt["verification"];
    // The command of the starting commit, not the agent's `true`; the
    // runner of the starting commit, not the agent's; the tests of the
    // commit, not the gutted ones.
    assert_eq!(v["command"], "python3 run_tests.py", "{v:#}");
    assert_eq!(v["passed"], false);
    assert_eq!(v["report"]["format"], "junit");
    assert_eq!(
        (
            v["report"]["passed"].as_u64(),
            v["report"]["failed"].as_u64()
        ),
        (Some(2), Some(1)),
        "{v:#}"
    );
    assert!(
        v["report"]["note"]
            .as_str()
            .unwrap()
            .contains("run_tests.py"),
        "{v:#}"
    );
    let events = w.events(&id).await;
    assert!(
        of_type(&events, "warning")
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains("protected paths")),
        "no warning about the protected runner"
    );
    assert_eq!(states(&events).last().unwrap(), "verifying→failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_can_bring_its_own_verify_command_and_tap_counts_tests() {
    // The command agent gets the report in $BACKSHIFT_VERIFY_REPORT and
    // its iteration in $BACKSHIFT_ITERATION; the task's verify command
    // prints TAP.
    let w = World::start(None, "").await;
    let repo = w.repo.to_string_lossy().into_owned();
    let agent = r#"echo "$BACKSHIFT_ITERATION" > state
if [ -n "$BACKSHIFT_VERIFY_REPORT" ]; then printf '%s\n' "$BACKSHIFT_VERIFY_REPORT" > report-seen.txt; fi"#;
    let verify = r#"echo 'TAP version 13'
echo '1..2'
echo 'ok 1 - first'
if [ "$(cat state)" = 2 ]; then echo 'ok 2 - second'; else
echo 'not ok 2 - second'; echo '  ---'; echo '  message: state is still 1'; echo '  ...'; exit 1; fi"#;
    let (code, out, err) = w
        .cli(&[
            "run",
            "Get to state 2",
            "--repo",
            &repo,
            "--command",
            agent,
            "--verify",
            verify,
            "--max-iterations",
            "2",
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let view = w.wait(&task).await;
    assert_eq!(view["state"], "succeeded", "{view:#}");
    assert_eq!(view["verify"], verify);
    let events = w.events(&format!("{task}-1")).await;
    let results = of_type(&events, "verification");
    assert_eq!(results.len(), 2);
    let first = &results[0];
    assert_eq!(first["report"]["format"], "tap");
    assert_eq!(
        (
            first["report"]["passed"].as_u64(),
            first["report"]["failed"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(first["report"]["failures"][0]["name"], "second");
    assert!(
        first["report"]["failures"][0]["message"]
            .as_str()
            .unwrap()
            .contains("state is still 1")
    );
    assert_eq!(
        of_type(&events, "verification_started")[0]["source"],
        "task"
    );
    assert_eq!(results[1]["passed"], true);
    assert_eq!(results[1]["report"]["passed"], 2);
    // Each iteration is its own call.
    let calls: Vec<&str> = of_type(&events, "tool_call")
        .iter()
        .map(|e| e["call_id"].as_str().unwrap())
        .collect();
    assert_eq!(calls, ["command", "command:2"]);
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(diff.contains("+2"), "{diff}");
    assert!(diff.contains("Verification 1 of 2 failed"), "{diff}");
    assert!(
        diff.contains("- second: message: state is still 1"),
        "{diff}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_verify_settings_are_refused_with_reasons() {
    let w = World::start(None, "").await;
    let repo = w.repo.to_string_lossy().into_owned();
    let (status, body) = w
        .api(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "x", "repo": repo, "command": "true", "verify": "  "})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "verify_empty");
    let (status, body) = w
        .api(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "x", "repo": repo, "command": "true", "limits": {"max_iterations": 0}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_iterations")
    );
    // A repository whose backshift.toml is broken ends the attempt at once,
    // before any agent work, saying what to fix.
    std::fs::write(
        w.repo.join("backshift.toml"),
        "[verify]\ncommand = \"make test\"\nreport = \"../../etc/passwd\"\n",
    )
    .unwrap();
    sh(&w.repo, "git add -A && git commit -qm broken").await;
    let (task, view) = w.run_task("x", &["--command", "touch ran"]).await;
    let attempt = &view["attempts"][0];
    assert_eq!(attempt["reason"], "verification_failed", "{view:#}");
    let detail = attempt["detail"].as_str().unwrap();
    assert!(
        detail.contains("backshift.toml at the base commit"),
        "{detail}"
    );
    assert!(
        detail.contains("must be a relative path inside the repository"),
        "{detail}"
    );
    let events = w.events(&format!("{task}-1")).await;
    assert!(
        of_type(&events, "tool_call").is_empty(),
        "the agent never ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_during_verification_verifies_once_more_and_publishes() {
    let good = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n";
    let s = script(json!({"steps": [
        {"reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "calc.py", "content": good}}]}},
        {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Add mul"}}]}}
    ]}));
    let mut w = World::start(Some(s), "").await;
    common::add_calc_project(&w.repo).await;
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w.cli(&["run", "Add mul", "--repo", &repo]).await;
    assert_eq!(code, 0, "{out}{err}");
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let id = format!("{task}-1");
    wait_for_state(&w, &id, "verifying").await;
    // Mid-run: its verification sandbox exists.
    for _ in 0..100 {
        let verifier = common::docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=dev.backshift.attempt={id}"),
            "--filter",
            "label=dev.backshift.role=verify",
        ]);
        if !verifier.trim().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.kill_server().await;
    w.restart_server().await;
    let view = w.wait(&task).await;
    let events = w.events(&id).await;
    assert_eq!(view["state"], "succeeded", "{view:#}\n{events:#?}");
    let attempt = &view["attempts"][0];
    assert_eq!(attempt["verification"]["passed"], true);
    assert_eq!(attempt["verification"]["commit"], attempt["head_commit"]);
    // One agent finish, verified to the end once; the interrupted run left
    // no verdict.
    assert_eq!(of_type(&events, "agent_finished").len(), 1);
    assert_eq!(of_type(&events, "verification_started").len(), 2);
    assert_eq!(of_type(&events, "verification").len(), 1);
    assert_eq!(of_type(&events, "restored").len(), 1);
    assert_eq!(attempt["verifications"], 1);
    // Its sandboxes go as it ends, the dead server's verifier too.
    let mut left = String::new();
    for _ in 0..50 {
        left = common::docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=dev.backshift.attempt={id}"),
        ]);
        if left.trim().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(left.trim().is_empty(), "sandboxes left: {left}");
}
