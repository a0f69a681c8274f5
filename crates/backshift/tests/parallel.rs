//! Several attempts of one task side by side: each in its own sandbox on
//! its own branch, verified, ranked by evidence, the best chosen as the
//! task's result (or a person's pick), and that one is what is pushed
//! with its pull request, and what `checkout` fetches. Real sandboxes,
//! the calc fixture's real tests, the fake forge.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, sh};
use reqwest::Method;
use serde_json::{Value, json};

fn attempt(task: &Value, n: u64) -> &Value {
    task["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["n"] == n)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_attempts_are_ranked_by_evidence_and_the_best_is_delivered() {
    // The repository is on a forge: the result is pushed and a pull
    // request opened there.
    let (w, forge, repo) = common::world_on_forge(json!({"steps": []}), "").await;
    // Attempt 1 breaks add (its verification fails); attempt 2 adds mul
    // and forty lines of notes; attempt 3 adds mul alone.
    let agent = r#"case "$BACKSHIFT_BRANCH" in
  *-2) printf '\ndef mul(a, b):\n    return a * b\n' >> calc.py
       for i in $(seq 1 40); do echo "note $i" >> NOTES.md; done ;;
  *-3) printf '\ndef mul(a, b):\n    return a * b\n' >> calc.py ;;
  *) sed -i 's/a + b/a - b/' calc.py ;;
esac"#;
    let (code, out, err) = w
        .cli(&[
            "run",
            "Add mul",
            "--repo",
            &repo,
            "--command",
            agent,
            "--attempts",
            "3",
            "--max-iterations",
            "1",
            "--follow",
        ])
        .await;
    // Followed: the first attempt's events, then all three side by side,
    // and exit 0 because the task has a result.
    assert_eq!(code, 0, "{out}{err}");
    let id = out.split_whitespace().nth(1).unwrap().to_owned();
    assert!(out.contains(&format!("{id}-1, {id}-2, {id}-3")), "{out}");
    assert!(
        out.contains(&format!("following {id}-1; the other 2 run alongside")),
        "{out}"
    );
    assert!(out.contains("✗ verification failed"), "{out}");
    assert!(out.contains(&format!("★1   {id}-3")), "{out}");
    let task = w.wait(&id).await;
    // `wait` returns once the task's state is terminal: every attempt ended.
    let branches: Vec<&str> = task["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["branch"].as_str().unwrap())
        .collect();
    assert!(
        branches[1].ends_with("-2") && branches[2].ends_with("-3"),
        "{branches:?}"
    );

    assert_eq!(task["state"], "succeeded", "{task:#}");
    assert_eq!(attempt(&task, 1)["state"], "failed");
    assert_eq!(attempt(&task, 1)["reason"], "verification_failed");
    assert_eq!(attempt(&task, 2)["state"], "succeeded");
    assert_eq!(attempt(&task, 3)["state"], "succeeded");
    assert_eq!(
        task["ranking"],
        json!([format!("{id}-3"), format!("{id}-2"), format!("{id}-1")]),
        "{task:#}"
    );
    assert_eq!(attempt(&task, 3)["rank"], 1);
    assert_eq!(attempt(&task, 1)["rank"], 3);
    assert_eq!(attempt(&task, 3)["diff"]["insertions"], 3);
    assert_eq!(attempt(&task, 2)["diff"]["insertions"], 43);
    // Chosen automatically once all ended, with the reason on record.
    let winner = format!("{id}-3");
    for _ in 0..50 {
        let (_, t) = w
            .api(Method::GET, &format!("/api/v1/tasks/{id}"), None)
            .await;
        if t["winner"].is_string() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, task) = w
        .api(Method::GET, &format!("/api/v1/tasks/{id}"), None)
        .await;
    assert_eq!(task["winner"], winner.as_str(), "{task:#}");
    assert_eq!(task["winner_by"], "auto");
    let events = w.events(&winner).await;
    let chosen: Vec<&Value> = events.iter().filter(|e| e["type"] == "winner").collect();
    assert_eq!(chosen.len(), 1);
    assert!(
        chosen[0]["why"]
            .as_str()
            .unwrap()
            .contains("smaller change (3 lines against 43)"),
        "{:?}",
        chosen[0]
    );

    // Only the result went to the forge, its pull request ranking them.
    let delivered = wait_delivery(&w, &id, &winner).await;
    assert_eq!(delivered["delivery"]["state"], "opened", "{delivered:#}");
    let upstream = forge.repo_path("acme", "calc");
    let pushed = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(&upstream)
        .args([
            "for-each-ref",
            "--format=%(refname:short)",
            "refs/heads/backshift",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&pushed.stdout).trim(),
        attempt(&task, 3)["branch"].as_str().unwrap()
    );
    let body = forge.pulls()[0]["body"].as_str().unwrap().to_owned();
    for want in [
        "## Attempts",
        &format!("| 1 | `{id}-3` | command | succeeded | passed (3) | +3 -0 |"),
        &format!("| 2 | `{id}-2` | command | succeeded | passed (3) | +43 -0 |"),
        &format!("| 3 | `{id}-1` | command | failed | failed (1) | - |"),
        "rank 1 of 3, chosen by auto",
    ] {
        assert!(body.contains(want), "{want:?} missing from:\n{body}");
    }

    // Side by side in the CLI, best first.
    let (code, compared, _) = w.cli(&["compare", &id]).await;
    assert_eq!(code, 0);
    let rows: Vec<&str> = compared.lines().skip(1).collect();
    assert!(
        rows[0].starts_with("★1") && rows[0].contains(&winner),
        "{compared}"
    );
    assert!(
        rows[0].contains("passed 3/3") && rows[0].contains("+3 -0"),
        "{compared}"
    );
    assert!(
        rows[1].contains(&format!("{id}-2")) && rows[1].contains("+43 -0"),
        "{compared}"
    );
    assert!(
        rows[2].contains(&format!("{id}-1")) && rows[2].contains("failed 2/3"),
        "{compared}"
    );
    assert!(compared.contains("chosen by auto"), "{compared}");

    // `checkout` delivers the result.
    let (code, out, err) = w.cli(&["checkout", &id]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        sh(&w.repo, "git branch --show-current").await,
        attempt(&task, 3)["branch"].as_str().unwrap()
    );
    assert!(sh(&w.repo, "ls").await.lines().all(|f| f != "NOTES.md"));

    // A person may prefer another attempt that succeeded, not a failed one.
    let (code, out, err) = w.cli(&["pick", &id, "2"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (_, task) = w
        .api(Method::GET, &format!("/api/v1/tasks/{id}"), None)
        .await;
    assert_eq!(task["winner"], format!("{id}-2"));
    assert!(
        task["winner_by"].as_str().unwrap().starts_with("token:"),
        "{task:#}"
    );
    // ... which is delivered in turn.
    let delivered = wait_delivery(&w, &id, &format!("{id}-2")).await;
    assert_eq!(delivered["delivery"]["pull_request"], 2, "{delivered:#}");
    assert!(forge.failures().is_empty(), "{:#?}", forge.failures());
    let (status, body) = w
        .api(
            Method::POST,
            &format!("/api/v1/tasks/{id}/pick"),
            Some(json!({"attempt": "1"})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "attempt_not_succeeded");
    let (status, _) = w
        .api(
            Method::POST,
            &format!("/api/v1/tasks/{id}/pick"),
            Some(json!({"attempt": "7"})),
        )
        .await;
    assert_eq!(status, 400);
    let (_, audit, _) = w.cli(&["audit"]).await;
    assert!(
        audit.contains("task.winner") && audit.contains("task.pick"),
        "{audit}"
    );
}

/// Waits until the task's delivery of `attempt` settled.
async fn wait_delivery(w: &World, task: &str, attempt: &str) -> Value {
    for _ in 0..300 {
        let (_, v) = w
            .api(Method::GET, &format!("/api/v1/tasks/{task}"), None)
            .await;
        let d = &v["delivery"];
        if d["attempt"] == attempt && d["state"] != "pushing" && !d["state"].is_null() {
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{attempt} of {task} was never delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_requests_are_checked() {
    let w = World::start(None, "").await;
    let repo = w.repo.to_string_lossy().into_owned();
    for (body, code) in [
        (
            json!({"prompt": "x", "repo": repo, "command": "true", "attempts": 11}),
            "invalid_attempts",
        ),
        (
            json!({"prompt": "x", "repo": repo, "command": "true", "attempts": 0}),
            "invalid_attempts",
        ),
        (
            json!({"prompt": "x", "repo": repo, "command": "true", "agents": []}),
            "agents_empty",
        ),
        (
            json!({"prompt": "x", "repo": repo, "command": "true", "agents": ["command", "nope"]}),
            "unknown_agent",
        ),
        (
            json!({"prompt": "x", "repo": repo, "command": "true", "agents": ["command", "command"], "attempts": 1}),
            "invalid_attempts",
        ),
    ] {
        let (status, got) = w
            .api(Method::POST, "/api/v1/tasks", Some(body.clone()))
            .await;
        assert_eq!(status, 400, "{body} → {got}");
        assert_eq!(got["error"]["code"], code, "{body} → {got}");
    }
    // One agent for two attempts: both run it.
    let (status, created) = w
        .api(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "x", "repo": repo, "command": "true", "agents": ["command"], "attempts": 2})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap();
    let task = w.wait(id).await;
    assert_eq!(task["attempts"].as_array().unwrap().len(), 2);
    assert_eq!(attempt(&task, 2)["agent"], "command");
}
