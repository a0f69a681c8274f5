//! Failure paths end honestly: a machine-readable reason and a readable
//! explanation, or a clear 4xx at submit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, script};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx() {
    let w = World::start(Some(script(json!({"steps": []}))), "").await;
    let repo = w.repo.to_string_lossy().into_owned();
    let missing = w.dir.path().join("nope").to_string_lossy().into_owned();

    let (code, body) = w
        .api(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "x", "repo": missing})),
        )
        .await;
    assert_eq!(code, 400);
    assert_eq!(body["error"]["code"], "repo_invalid");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{body}"
    );

    let (code, body) = w
        .api(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "x", "repo": repo, "agent": "nope"})),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("unknown_agent"))
    );

    let (code, body) = w
        .api(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "x", "repo": repo, "base_ref": "nope"})),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("repo_invalid"))
    );

    let (code, body) = w
        .api(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "x", "repo": repo, "limits": {"max_turns": 0}})),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("invalid_limits"))
    );

    let (code, body) = w
        .api(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "x", "repository": repo})),
        )
        .await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );

    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/tasks", w.url))
        .bearer_auth(w.token())
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let resp = reqwest::get(format!("{}/api/v1/tasks", w.url))
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "no token, no API");
    let (code, _) = w.api(Method::GET, "/api/v1/tasks/zzzzzzzz", None).await;
    assert_eq!(code, 404);

    // The CLI says the same in words, and nothing was created.
    let (code, _, err) = w.cli(&["run", "x", "--repo", &missing]).await;
    assert_ne!(code, 0);
    assert!(err.contains("does not exist"), "{err}");
    let (_, tasks) = w.api(Method::GET, "/api/v1/tasks", None).await;
    assert_eq!(tasks.as_array().unwrap().len(), 0);

    let spec: serde_json::Value = reqwest::get(format!("{}/openapi.json", w.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        spec["paths"]["/api/v1/tasks"]["post"].is_object(),
        "OpenAPI lists task creation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_model_fails_with_model_unreachable() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let extra = format!(
        "[model]\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmax_retries = 2\nretry_base_ms = 50\n"
    );
    let w = World::start(None, &extra).await;
    let (task, view) = w.run_task("anything", &[]).await;
    let a = &view["attempts"][0];
    assert_eq!(a["state"], "failed", "{view}");
    assert_eq!(a["reason"], "model_unreachable");
    assert!(a["detail"].as_str().unwrap().contains("3 tries"), "{a}");
    let (_, logs, _) = w.cli(&["logs", &task]).await;
    assert!(logs.contains("retry 2"), "retries are visible:\n{logs}");
    // The failure carries the end of its log, shown by `show`.
    let tail: Vec<&str> = a["log_tail"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(
        tail.iter()
            .any(|l| l.starts_with("model request failed (retry 2)")),
        "{tail:?}"
    );
    assert!(
        tail.last().unwrap().starts_with("state → failed"),
        "{tail:?}"
    );
    let (_, shown, _) = w.cli(&["show", &task]).await;
    assert!(
        shown.contains("log tail") && shown.contains("| model request failed"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_never_ends_is_killed_and_the_model_told() {
    let s = script(json!({"steps": [
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "echo started; sleep 600 & sleep 600", "timeout_secs": 2}}]}},
        {"expect": {"tool_results": [{"contains": "killed after its 2s timeout"}]},
         "reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "for i in 1 2 3 4 5 6 7 8 9 10; do n=$(pgrep -c -x -f \"sleep 600\"); [ \"$n\" = 0 ] && break; sleep 0.2; done; echo sleeping=$n"}}]}},
        {"expect": {"tool_results": [{"contains": "sleeping=0"}]},
         "reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Nothing to change."}}]}}
    ]}));
    let w = World::start(Some(s), "").await;
    let (_, view) = w.run_task("hang", &[]).await;
    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    assert_eq!(view["state"], "succeeded", "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_turn_limit_ends_with_max_turns() {
    let step = json!({"reply": {"tool_calls": [{"name": "list_files", "arguments": {}}]}});
    let w = World::start(Some(script(json!({"steps": [step.clone(), step]}))), "").await;
    let (_, view) = w.run_task("loop", &["--max-turns", "2"]).await;
    let a = &view["attempts"][0];
    assert_eq!(
        (a["state"].as_str(), a["reason"].as_str()),
        (Some("failed"), Some("max_turns")),
        "{view}"
    );
    assert!(a["detail"].as_str().unwrap().contains("max_turns"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_reported_by_readyz_and_fails_the_task() {
    let w = World::start(
        Some(script(json!({"steps": []}))),
        "[sandbox]\nimage = \"backshift-missing:none\"\npull = \"never\"\n",
    )
    .await;
    let resp = reqwest::get(format!("{}/readyz", w.url)).await.unwrap();
    assert_eq!(resp.status(), 503);
    let ready: serde_json::Value = resp.json().await.unwrap();
    let image = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "image")
        .unwrap();
    assert_eq!(image["ok"], false);
    assert!(
        image["fix"].as_str().unwrap().contains("docker load"),
        "{image}"
    );
    let (_, view) = w.run_task("x", &[]).await;
    let a = &view["attempts"][0];
    assert_eq!(
        (a["state"].as_str(), a["reason"].as_str()),
        (Some("failed"), Some("image_missing")),
        "{view}"
    );
    let detail = a["detail"].as_str().unwrap();
    assert!(
        detail.contains("backshift-missing:none does not exist on this Docker host")
            && detail.contains("docker load"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_task_can_be_cancelled_and_its_sandbox_goes() {
    let s = script(json!({"steps": [
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "sleep 120"}}]}}
    ]}));
    let w = World::start(Some(s), "").await;
    let repo = w.repo.to_string_lossy().into_owned();
    let (_, out, _) = w.cli(&["run", "wait", "--repo", &repo]).await;
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    for _ in 0..100 {
        let (_, v) = w
            .api(Method::GET, &format!("/api/v1/tasks/{task}"), None)
            .await;
        if v["state"] == "running" && v["attempts"][0]["last_seq"].as_u64().unwrap() > 10 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (code, out, err) = w.cli(&["cancel", &task]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("cancelled"), "{out}");
    let left = common::sh(
        &w.repo,
        &format!("DOCKER_API_VERSION=1.41 docker ps -aq --filter label=dev.backshift.task={task}"),
    )
    .await;
    assert_eq!(left, "", "sandbox left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_that_overstays_its_deadline_ends_timed_out() {
    // A test-owned registry address that accepts connections and never
    // answers: the image pull hangs, and provisioning with it.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = hole.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for conn in hole.incoming() {
            open.push(conn);
        }
    });
    let w = World::start(
        Some(script(json!({"steps": []}))),
        &format!(
            "[sandbox]\nimage = \"127.0.0.1:{port}/hang/sandbox:v1\"\n[deadlines]\nprovisioning_secs = 2\n"
        ),
    )
    .await;
    let started = std::time::Instant::now();
    let (_, view) = w.run_task("x", &[]).await;
    let a = &view["attempts"][0];
    assert_eq!(a["state"], "timed_out", "{view}");
    let detail = a["detail"].as_str().unwrap();
    assert!(
        detail.contains(
            "stayed provisioning longer than its deadline (2s, [deadlines] provisioning_secs)"
        ),
        "{detail}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(15),
        "ended promptly, not at the pull's own timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_budget_ends_with_budget_exhausted() {
    // The scripted model reports a quarter of the request's bytes as input
    // tokens: about a thousand per turn here.
    let step = json!({"reply": {"tool_calls": [{"name": "list_files", "arguments": {}}]}});
    let w = World::start(
        Some(script(
            json!({"steps": [step.clone(), step.clone(), step.clone(), step.clone(), step]}),
        )),
        "",
    )
    .await;
    let (_, view) = w.run_task("loop", &["--max-tokens", "1500"]).await;
    let a = &view["attempts"][0];
    assert_eq!(
        (a["state"].as_str(), a["reason"].as_str()),
        (Some("failed"), Some("budget_exhausted")),
        "{view}"
    );
    let detail = a["detail"].as_str().unwrap();
    assert!(
        detail.contains("of the 1500 allowed (limits.max_tokens)"),
        "{detail}"
    );
    let (_, events) = w
        .api(
            Method::GET,
            &format!("/api/v1/attempts/{}/events", a["id"].as_str().unwrap()),
            None,
        )
        .await;
    let responses = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "model_response")
        .count();
    assert!(responses >= 1, "it stopped after a response, not before");
    let (code, body) = w
        .api(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "x", "repo": w.repo, "limits": {"max_tokens": 0}})),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.to_string().contains("max_tokens"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_directory_is_refused() {
    let w = World::start(Some(script(json!({"steps": []}))), "").await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_backshift"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(w.dir.path().join("backshift.toml"))
        .env("BACKSHIFT_CONFIG_DIR", w.dir.path().join("config"))
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another backshift server is running as replica")
            && err.contains("replica_id"),
        "{err}"
    );
}
