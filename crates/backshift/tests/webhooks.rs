//! Intake: tasks from signed webhooks, and their outcome reported back
//! where they came from. GitHub's deliveries in GitHub's own payload
//! shapes and headers (signed with `X-Hub-Signature-256`), the fake forge
//! standing in for GitHub's REST API; and the generic signed webhook with
//! a callback the test receives and checks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::world_on_forge;
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::Sha256;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECRET: &str = "webhook-secret-3c1e";

fn hmac_hex(secret: &str, data: &[u8]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap();
    m.update(data);
    hex::encode(m.finalize().into_bytes())
}

/// GitHub's `issues` event as it delivers it (the fields of its documented
/// payload, with this test's repository).
fn issue_labeled(clone_url: &str, html: &str, label: &str) -> Value {
    let user = json!({"login": "octocat", "id": 1, "node_id": "MDQ6VXNlcjE=", "type": "User", "site_admin": false,
        "html_url": "https://github.example/octocat"});
    let label = json!({"id": 208045946, "node_id": "MDU6TGFiZWwyMDgwNDU5NDY=", "url": format!("{html}/labels/{label}"),
        "name": label, "color": "f29513", "default": false, "description": "Hand it to backshift"});
    json!({
        "action": "labeled",
        "issue": {
            "url": format!("{html}/issues/7"), "repository_url": html, "html_url": format!("{html}/issues/7"),
            "id": 1001, "node_id": "I_kwDOA", "number": 7, "title": "Add mul to calc",
            "user": user, "labels": [label], "state": "open", "locked": false,
            "assignee": null, "assignees": [], "milestone": null, "comments": 0,
            "created_at": "2026-11-23T10:00:00Z", "updated_at": "2026-11-23T10:01:00Z", "closed_at": null,
            "author_association": "OWNER", "active_lock_reason": null,
            "body": "calc.py needs `mul(a, b)`.", "reactions": {"total_count": 0}
        },
        "label": label,
        "repository": {
            "id": 35129377, "node_id": "MDEwOlJlcG9zaXRvcnkzNTEyOTM3Nw==", "name": "calc", "full_name": "acme/calc",
            "private": true, "owner": {"login": "acme", "id": 2, "type": "Organization"},
            "html_url": html, "clone_url": clone_url, "git_url": "git://github.example/acme/calc.git",
            "ssh_url": "git@github.example:acme/calc.git", "default_branch": "main"
        },
        "sender": user
    })
}

/// GitHub's `issue_comment` event on pull request `number`.
fn pr_comment(clone_url: &str, html: &str, number: u64, body: &str) -> Value {
    let user = json!({"login": "octocat", "id": 1, "type": "User"});
    json!({
        "action": "created",
        "issue": {
            "url": format!("{html}/issues/{number}"), "html_url": format!("{html}/pull/{number}"),
            "number": number, "title": "Add mul", "user": user, "labels": [], "state": "open",
            "pull_request": {"url": format!("{html}/pulls/{number}"), "html_url": format!("{html}/pull/{number}")},
            "body": "…"
        },
        "comment": {"id": 99, "html_url": format!("{html}/pull/{number}#issuecomment-99"), "user": user,
            "created_at": "2026-11-23T11:00:00Z", "body": body, "author_association": "OWNER"},
        "repository": {"name": "calc", "full_name": "acme/calc", "html_url": html, "clone_url": clone_url,
            "owner": {"login": "acme"}, "default_branch": "main"},
        "sender": user
    })
}

async fn deliver_github(
    url: &str,
    event: &str,
    delivery: &str,
    body: &Value,
    signature: Option<String>,
) -> (u16, Value) {
    let body = serde_json::to_vec(body).unwrap();
    let mut req = reqwest::Client::new()
        .post(format!("{url}/webhooks/github"))
        .header("X-GitHub-Event", event)
        .header("X-GitHub-Delivery", delivery)
        .header("X-GitHub-Hook-ID", "123")
        .header("User-Agent", "GitHub-Hookshot/5f1d0c9")
        .header("Content-Type", "application/json");
    if let Some(sig) = signature {
        req = req.header("X-Hub-Signature-256", sig);
    }
    let resp = req.body(body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn signed(body: &Value) -> Option<String> {
    Some(format!(
        "sha256={}",
        hmac_hex(SECRET, &serde_json::to_vec(body).unwrap())
    ))
}

async fn task_count(w: &common::World) -> usize {
    let (_, tasks) = w.api(Method::GET, "/api/v1/tasks", None).await;
    tasks.as_array().unwrap().len()
}

const GOOD_CALC: &str = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_labelled_issue_becomes_a_pull_request_and_a_comment_asks_for_more() {
    let with_div = format!("{GOOD_CALC}\n\ndef div(a, b):\n    return a / b\n");
    let steps = json!({"steps": [
        {"expect": {"user_contains": "calc.py needs `mul(a, b)`."},
         "reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "calc.py", "content": GOOD_CALC}}]}},
        {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Add mul"}}]}},
        {"expect": {"user_contains": "also add div"},
         "reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "calc.py", "content": with_div}}]}},
        {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Add div too"}}]}}
    ]});
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), SECRET).unwrap();
    let (w, forge, clone_url) = world_on_forge(
        steps,
        &format!(
            "[webhooks.github]\nsecret_file = \"{}\"\n",
            secret_file.path().display()
        ),
    )
    .await;
    let html = "https://github.example/acme/calc";
    let payload = issue_labeled(&clone_url, html, "backshift");

    // Unsigned, badly signed, signed for another body: refused, nothing made.
    let (status, body) = deliver_github(&w.url, "issues", "d-0", &payload, None).await;
    assert_eq!(status, 401, "{body}");
    let forged = Some(format!(
        "sha256={}",
        hmac_hex("not-the-secret", &serde_json::to_vec(&payload).unwrap())
    ));
    let (status, _) = deliver_github(&w.url, "issues", "d-0", &payload, forged).await;
    assert_eq!(status, 401);
    let other = issue_labeled(&clone_url, html, "something-else");
    let (status, _) = deliver_github(&w.url, "issues", "d-0", &payload, signed(&other)).await;
    assert_eq!(status, 401);
    assert_eq!(task_count(&w).await, 0);
    // Another label: accepted and ignored.
    let (status, body) = deliver_github(&w.url, "issues", "d-1", &other, signed(&other)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(task_count(&w).await, 0);

    // The real thing: a task.
    let (status, body) = deliver_github(&w.url, "issues", "d-2", &payload, signed(&payload)).await;
    assert_eq!(status, 201, "{body}");
    let task = body["task"].as_str().unwrap().to_owned();
    // The same delivery again is a replay.
    let (status, body) = deliver_github(&w.url, "issues", "d-2", &payload, signed(&payload)).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("replay")
    );
    assert_eq!(task_count(&w).await, 1);

    let view = w.wait(&task).await;
    assert_eq!(view["state"], "succeeded", "{view:#}");
    assert!(
        view["prompt"]
            .as_str()
            .unwrap()
            .contains("(GitHub issue #7: https://github.example/acme/calc/issues/7)")
    );
    let view = wait_reported(&forge, 1, &w, &task).await;
    assert_eq!(view["delivery"]["pull_request"], 1, "{view:#}");
    let branch = view["attempts"][0]["branch"].as_str().unwrap().to_owned();
    let (repo, number, text) = forge.comments()[0].clone();
    assert_eq!((repo.as_str(), number), ("acme/calc", 7));
    assert!(
        text.contains(&format!("✅ backshift finished task `{task}`")),
        "{text}"
    );
    assert!(
        text.contains("the tests passed (`python3 run_tests.py`: 3 passed)"),
        "{text}"
    );
    assert!(text.contains("/acme/calc/pull/1"), "{text}");

    // `/backshift ...` on that pull request: a follow-up on its branch.
    let comment = pr_comment(&clone_url, html, 1, "/backshift also add div");
    let (status, body) =
        deliver_github(&w.url, "issue_comment", "d-3", &comment, signed(&comment)).await;
    assert_eq!(status, 201, "{body}");
    let follow_up = body["task"].as_str().unwrap().to_owned();
    let view = w.wait(&follow_up).await;
    assert_eq!(view["state"], "succeeded", "{view:#}");
    assert_eq!(
        view["attempts"][0]["branch"],
        branch.as_str(),
        "the same branch"
    );
    assert_eq!(view["base_ref"], branch.as_str());
    let view = wait_reported(&forge, 2, &w, &follow_up).await;
    // The same pull request, now with both commits, fast-forwarded.
    assert_eq!(view["delivery"]["pull_request"], 1, "{view:#}");
    assert_eq!(forge.pulls().len(), 1);
    let upstream = forge.repo_path("acme", "calc");
    let log = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(&upstream)
        .args(["log", "--format=%s", &branch])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&log.stdout);
    assert!(log.starts_with("Add div too\nAdd mul\n"), "{log}");
    let (_, number, text) = forge.comments()[1].clone();
    assert_eq!(number, 1, "the outcome goes on the pull request");
    assert!(
        text.contains(&format!("✅ backshift finished task `{follow_up}`")),
        "{text}"
    );
    // Comments that are not for backshift are ignored.
    let chatter = pr_comment(&clone_url, html, 1, "looks good");
    let (status, _) =
        deliver_github(&w.url, "issue_comment", "d-4", &chatter, signed(&chatter)).await;
    assert_eq!(status, 202);
    assert!(forge.failures().is_empty(), "{:#?}", forge.failures());
    let (_, audit, _) = w.cli(&["audit"]).await;
    assert!(audit.contains("github:octocat"), "{audit}");
    assert!(audit.contains("webhook.replay_refused"), "{audit}");
}

/// Waits until the fake forge has `n` comments and returns the task.
async fn wait_reported(
    forge: &testkit::forge::FakeForge,
    n: usize,
    w: &common::World,
    task: &str,
) -> Value {
    for _ in 0..300 {
        if forge.comments().len() >= n {
            let (_, v) = w
                .api(Method::GET, &format!("/api/v1/tasks/{task}"), None)
                .await;
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no comment {n} on the forge: {:?}", forge.comments());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generic_webhook_takes_signed_fresh_deliveries_once_and_calls_back() {
    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), SECRET).unwrap();
    let w = common::World::start(
        None,
        &format!(
            "[webhooks.generic]\nsecret_file = \"{}\"\n",
            secret_file.path().display()
        ),
    )
    .await;
    // The callback's receiver: checks the signature of what it gets.
    let got: Arc<Mutex<Vec<(bool, Value)>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let callback = format!("http://{}/done", listener.local_addr().unwrap());
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/done",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    let mut signed = h("x-backshift-timestamp").into_bytes();
                    signed.push(b'.');
                    signed.extend_from_slice(&body);
                    let ok = h("x-backshift-signature")
                        == format!("sha256={}", hmac_hex(SECRET, &signed));
                    sink.lock()
                        .unwrap()
                        .push((ok, serde_json::from_slice(&body).unwrap_or(Value::Null)));
                    "ok"
                }
            },
        ),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let repo = w.repo.to_string_lossy().into_owned();
    let task = json!({"prompt": "Say hi", "repo": repo, "command": "echo hi > hi.txt", "callback_url": callback});
    let body = serde_json::to_vec(&task).unwrap();
    let send = |ts: i64, id: &str, sig: Option<String>| {
        let body = body.clone();
        let url = w.url.clone();
        let id = id.to_owned();
        async move {
            let mut req = reqwest::Client::new()
                .post(format!("{url}/webhooks/generic"))
                .header("Content-Type", "application/json")
                .header("X-Backshift-Timestamp", ts.to_string())
                .header("X-Backshift-Delivery", id);
            if let Some(s) = sig {
                req = req.header("X-Backshift-Signature", s);
            }
            let resp = req.body(body).send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let sign = |ts: i64| {
        let mut data = ts.to_string().into_bytes();
        data.push(b'.');
        data.extend_from_slice(&body);
        Some(format!("sha256={}", hmac_hex(SECRET, &data)))
    };
    let now = backshift_protocol::now_ms() / 1000;
    assert_eq!(send(now, "g-1", None).await.0, 401, "unsigned");
    assert_eq!(
        send(now, "g-1", sign(now - 1)).await.0,
        401,
        "signed for another time"
    );
    assert_eq!(
        send(now - 3600, "g-1", sign(now - 3600)).await.0,
        401,
        "an hour old"
    );
    let (status, created) = send(now, "g-1", sign(now)).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(send(now, "g-1", sign(now)).await.0, 401, "replayed");
    let (_, tasks) = w.api(Method::GET, "/api/v1/tasks", None).await;
    assert_eq!(tasks.as_array().unwrap().len(), 1);
    let id = created["task"].as_str().unwrap();
    let view = w.wait(id).await;
    assert_eq!(view["state"], "succeeded", "{view:#}");
    for _ in 0..100 {
        if !got.lock().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = got.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let (ok, outcome) = &calls[0];
    assert!(ok, "the callback's signature does not verify");
    assert_eq!(outcome["task"], id);
    assert_eq!(outcome["state"], "succeeded");
    assert!(
        outcome["text"]
            .as_str()
            .unwrap()
            .contains("✅ backshift finished task")
    );
}

/// An issue tracker's API as the test sees it: every request's path,
/// Authorization header and JSON body.
type TrackerCalls = Arc<Mutex<Vec<(String, String, Value)>>>;

/// Serves Linear's GraphQL endpoint (`/graphql`) and Jira's comment
/// endpoint (`/rest/api/3/issue/{key}/comment`) on loopback.
async fn tracker_api() -> (String, TrackerCalls) {
    let calls: TrackerCalls = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let record = |calls: TrackerCalls| {
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let calls = calls.clone();
            async move {
                let auth = headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let path = uri.path().to_owned();
                calls.lock().unwrap().push((path.clone(), auth, body));
                if path == "/graphql" {
                    (
                        axum::http::StatusCode::OK,
                        axum::Json(json!({"data": {"commentCreate": {"success": true}}})),
                    )
                } else {
                    (
                        axum::http::StatusCode::CREATED,
                        axum::Json(json!({"id": "10000"})),
                    )
                }
            }
        }
    };
    let app = axum::Router::new()
        .route("/graphql", axum::routing::post(record(calls.clone())))
        .route(
            "/rest/api/3/issue/{key}/comment",
            axum::routing::post(record(calls.clone())),
        );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, calls)
}

async fn post_signed(url: &str, headers: &[(&str, String)], body: &Value) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("Content-Type", "application/json; charset=utf-8");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let resp = req
        .body(serde_json::to_vec(body).unwrap())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linear_and_jira_issues_given_the_label_become_tasks_and_hear_back() {
    let steps = json!({"steps": [
        {"expect": {"user_contains": "(Linear issue ENG-12: https://linear.app/acme/issue/ENG-12/add-hello)"},
         "reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "hello.txt", "content": "hello\n"}}]}},
        {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Add hello.txt"}}]}},
        {"expect": {"user_contains": "Write bye.txt\nwith a goodbye"},
         "reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "bye.txt", "content": "bye\n"}}]}},
        {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Add bye.txt"}}]}}
    ]});
    let (api, calls) = tracker_api().await;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("tracked");
    std::fs::create_dir_all(&repo).unwrap();
    common::sh(
        &repo,
        "git init -q -b main && echo x > README.md && git add . && git commit -qm init",
    )
    .await;
    for (name, text) in [
        ("secret", SECRET),
        ("linear-key", "lin_api_k3y"),
        ("jira-token", "jira-t0ken"),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let d = dir.path().display();
    let config = format!(
        "[webhooks.linear]\nsecret_file = \"{d}/secret\"\nrepos = {{ ENG = \"{repo}\" }}\napi_url = \"{api}/graphql\"\ntoken_file = \"{d}/linear-key\"\n\
         [webhooks.jira]\nsecret_file = \"{d}/secret\"\nrepo = \"{repo}\"\napi_url = \"{api}\"\nuser_email = \"bot@acme.example\"\ntoken_file = \"{d}/jira-token\"\n",
        repo = repo.display()
    );
    let w = common::World::start(Some(common::script(steps)), &config).await;
    let now = backshift_protocol::now_ms();

    // Linear: a new issue with the label, as Linear sends it.
    let issue = |ts: i64, team: &str| {
        json!({
            "action": "create", "type": "Issue", "createdAt": "2026-11-23T12:00:00.000Z",
            "organizationId": "org-1", "webhookTimestamp": ts, "webhookId": "wh-1",
            "url": "https://linear.app/acme/issue/ENG-12/add-hello",
            "actor": {"id": "u-1", "type": "user", "name": "Ada"},
            "data": {
                "id": "2174add1-f7c8-44e3-bbf3-2d60b5ea8bc9", "identifier": "ENG-12", "number": 12,
                "title": "Add hello", "description": "Write hello.txt", "priority": 0,
                "url": "https://linear.app/acme/issue/ENG-12/add-hello",
                "teamId": "t-1", "team": {"id": "t-1", "key": team, "name": "Engineering"},
                "labelIds": ["lbl-1"], "labels": [{"id": "lbl-1", "name": "backshift", "color": "#5e6ad2"}],
                "state": {"id": "s-1", "name": "Todo", "type": "unstarted"}
            }
        })
    };
    let linear = format!("{}/webhooks/linear", w.url);
    let sig = |b: &Value| hmac_hex(SECRET, &serde_json::to_vec(b).unwrap());
    let headers = |id: &str, s: String| {
        vec![
            ("Linear-Delivery", id.to_owned()),
            ("Linear-Event", "Issue".to_owned()),
            ("User-Agent", "Linear-Webhook".to_owned()),
            ("Linear-Signature", s),
        ]
    };
    let fresh = issue(now, "ENG");
    let stale = issue(now - 3_600_000, "ENG");
    assert_eq!(
        post_signed(&linear, &headers("l-1", sig(&stale)), &stale)
            .await
            .0,
        401,
        "an hour old"
    );
    assert_eq!(
        post_signed(&linear, &headers("l-1", "00".repeat(32)), &fresh)
            .await
            .0,
        401,
        "forged"
    );
    let other_team = issue(now, "OPS");
    let (status, body) = post_signed(&linear, &headers("l-0", sig(&other_team)), &other_team).await;
    assert_eq!(status, 202, "no repository for OPS: {body}");
    let (status, body) = post_signed(&linear, &headers("l-1", sig(&fresh)), &fresh).await;
    assert_eq!(status, 201, "{body}");
    let linear_task = body["task"].as_str().unwrap().to_owned();
    assert_eq!(
        post_signed(&linear, &headers("l-1", sig(&fresh)), &fresh)
            .await
            .0,
        401,
        "replayed"
    );
    let view = w.wait(&linear_task).await;
    assert_eq!(view["state"], "succeeded", "{view:#}");

    // Jira: an existing issue given the label.
    let jira_issue = json!({
        "timestamp": now, "webhookEvent": "jira:issue_updated", "issue_event_type_name": "issue_updated",
        "user": {"accountId": "5b10a2844c20165700ede21g", "displayName": "Grace"},
        "issue": {
            "id": "10002", "self": "https://acme.atlassian.net/rest/api/3/issue/10002", "key": "CALC-7",
            "fields": {
                "summary": "Say goodbye", "labels": ["backshift", "ops"],
                "project": {"id": "10000", "key": "CALC", "name": "Calc"},
                "issuetype": {"name": "Task"},
                "description": {"type": "doc", "version": 1, "content": [
                    {"type": "paragraph", "content": [{"type": "text", "text": "Write bye.txt"}]},
                    {"type": "paragraph", "content": [{"type": "text", "text": "with a goodbye"}]}
                ]}
            }
        },
        "changelog": {"id": "10100", "items": [
            {"field": "labels", "fieldtype": "jira", "from": null, "fromString": "ops", "to": null, "toString": "backshift ops"}
        ]}
    });
    let jira = format!("{}/webhooks/jira", w.url);
    let jira_headers = |id: &str, b: &Value| {
        vec![
            ("X-Atlassian-Webhook-Identifier", id.to_owned()),
            ("X-Hub-Signature", format!("sha256={}", sig(b))),
        ]
    };
    let mut unrelated = jira_issue.clone();
    unrelated["changelog"]["items"][0]["fromString"] = json!("backshift");
    let (status, _) = post_signed(&jira, &jira_headers("j-0", &unrelated), &unrelated).await;
    assert_eq!(status, 202, "the label was there before");
    assert_eq!(
        post_signed(
            &jira,
            &[("X-Atlassian-Webhook-Identifier", "j-1".into())],
            &jira_issue
        )
        .await
        .0,
        401
    );
    let (status, body) = post_signed(&jira, &jira_headers("j-1", &jira_issue), &jira_issue).await;
    assert_eq!(status, 201, "{body}");
    let jira_task = body["task"].as_str().unwrap().to_owned();
    assert_eq!(
        post_signed(&jira, &jira_headers("j-1", &jira_issue), &jira_issue)
            .await
            .0,
        401,
        "replayed"
    );
    let view = w.wait(&jira_task).await;
    assert_eq!(view["state"], "succeeded", "{view:#}");
    let prompt = view["prompt"].as_str().unwrap();
    assert!(
        prompt.starts_with(
            "Say goodbye\n\nWrite bye.txt\nwith a goodbye\n\n(Jira issue CALC-7: http://"
        ) && prompt.ends_with("/browse/CALC-7)"),
        "{prompt}"
    );
    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());

    // Both heard back, each through its own API with its own credentials.
    for _ in 0..100 {
        if calls.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    let (path, auth, body) = &calls[0];
    assert_eq!(path, "/graphql");
    assert_eq!(auth, "lin_api_k3y");
    assert!(body["query"].as_str().unwrap().contains("commentCreate"));
    assert_eq!(
        body["variables"]["input"]["issueId"],
        "2174add1-f7c8-44e3-bbf3-2d60b5ea8bc9"
    );
    let text = body["variables"]["input"]["body"].as_str().unwrap();
    assert!(
        text.contains(&format!("✅ backshift finished task `{linear_task}`")),
        "{text}"
    );
    assert!(
        text.contains("is in backshift (`backshift checkout"),
        "{text}"
    );
    let (path, auth, body) = &calls[1];
    assert_eq!(path, "/rest/api/3/issue/CALC-7/comment");
    use base64::Engine;
    let basic = base64::engine::general_purpose::STANDARD.encode("bot@acme.example:jira-t0ken");
    assert_eq!(auth, &format!("Basic {basic}"));
    assert_eq!(body["body"]["type"], "doc");
    assert!(
        body.to_string()
            .contains(&format!("backshift finished task `{jira_task}`")),
        "{body}"
    );
    let (_, audit, _) = w.cli(&["audit"]).await;
    assert!(
        audit.contains("linear:Ada") && audit.contains("jira:Grace"),
        "{audit}"
    );
}
