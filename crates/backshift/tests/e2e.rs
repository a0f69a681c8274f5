//! The spine, end to end, with the real binary, a real Docker sandbox and
//! the scripted model. Needs dockerd and the default image: `cargo xtask
//! test` sets both up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, script, sh};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_runs_end_to_end_and_its_branch_comes_home() {
    let s = script(json!({"steps": [
        {"expect": {"user_contains": "hello script", "tools_include": ["run_command", "write_file", "finish"]},
         "reply": {"content": "Let me look around.", "tool_calls": [{"name": "list_files", "arguments": {"path": "."}}]}},
        {"expect": {"tool_results": [{"contains": "README.md"}]},
         "reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "hello.py", "content": "print('hello'\n"}}]}},
        {"expect": {"tool_results": [{"contains": "wrote"}]},
         "reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "python3 hello.py"}}]}},
        {"expect": {"tool_results": [{"contains": "SyntaxError"}]},
         "reply": {"content": "A parenthesis is missing.", "tool_calls": [{"name": "replace_in_file", "arguments": {"path": "hello.py", "old": "print('hello'\n", "new": "print('hello')\n"}}]}},
        {"expect": {"tool_results": [{"contains": "replaced 1 occurrence"}]},
         "reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "python3 hello.py"}}]}},
        {"expect": {"tool_results": [{"contains": "exit code: 0\nhello"}]},
         "reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Add hello.py\n\nIt prints hello."}}]}}
    ]}));
    let w = World::start(Some(s), "").await;
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w
        .cli(&["run", "Add a hello script", "--repo", &repo, "--follow"])
        .await;
    let fake = w.fake.as_ref().unwrap();
    assert!(
        fake.failures().is_empty(),
        "the agent misbehaved: {:?}",
        fake.failures()
    );
    assert_eq!(code, 0, "run --follow failed:\n{out}\n{err}");
    assert_eq!(fake.remaining(), 0, "every scripted step was used");
    // The live log is readable, not JSON.
    for want in [
        "provisioning",
        "→ list_files .",
        "$ python3 hello.py",
        "SyntaxError",
        "✗ run_command exit 1",
        "✔ agent finished",
        "1 file(s) changed",
        "succeeded",
    ] {
        assert!(
            out.contains(want),
            "{want:?} missing from the followed log:\n{out}"
        );
    }
    assert!(
        !out.contains("{\"attempt_id\""),
        "raw JSON in the log:\n{out}"
    );
    let task = out.split_whitespace().nth(1).unwrap().to_owned();

    let (code, shown, _) = w.cli(&["show", &task, "--json"]).await;
    assert_eq!(code, 0);
    let view: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(view["state"], "succeeded");
    let attempt = &view["attempts"][0];
    let branch = attempt["branch"].as_str().unwrap().to_owned();
    assert!(
        branch.starts_with(&format!("backshift/{task}-add-a-hello-script")),
        "{branch}"
    );
    assert_eq!(attempt["summary"], "Add hello.py\n\nIt prints hello.");

    let (code, diff, _) = w.cli(&["diff", &task]).await;
    assert_eq!(code, 0);
    assert!(diff.contains("+print('hello')"), "{diff}");

    // The stored log has every kind of step, in order, without gaps.
    let attempt_id = attempt["id"].as_str().unwrap();
    let (_, events) = w
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/attempts/{attempt_id}/events"),
            None,
        )
        .await;
    let events = events.as_array().unwrap();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "gapless seqs");
    }
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    for want in [
        "state_changed",
        "model_request",
        "model_response",
        "tool_call",
        "command_output",
        "tool_result",
        "agent_finished",
        "diff_stat",
    ] {
        assert!(kinds.contains(&want), "no {want} event in {kinds:?}");
    }
    let usage = events
        .iter()
        .find(|e| e["type"] == "model_response")
        .unwrap();
    assert!(usage["usage"]["input_tokens"].as_u64().unwrap() > 0);

    // checkout brings exactly that change into the user's clone, over HTTP.
    let (code, out, err) = w.cli(&["checkout", &task]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(sh(&w.repo, "git branch --show-current").await, branch);
    assert_eq!(
        sh(&w.repo, "git diff --name-only main HEAD").await,
        "hello.py"
    );
    assert_eq!(sh(&w.repo, "cat hello.py").await, "print('hello')");
    assert_eq!(
        sh(&w.repo, "git log -1 --format='%an|%s'").await,
        "backshift|Add hello.py"
    );
    assert!(
        sh(&w.repo, "git log -1 --format=%B")
            .await
            .contains(&format!("Backshift-Task: {task}"))
    );
    assert_eq!(sh(&w.repo, "git status --porcelain").await, "");

    // No sandbox is left behind.
    let left = sh(
        &w.repo,
        &format!("DOCKER_API_VERSION=1.41 docker ps -aq --filter label=dev.backshift.task={task}"),
    )
    .await;
    assert_eq!(left, "", "sandbox left behind");
}
