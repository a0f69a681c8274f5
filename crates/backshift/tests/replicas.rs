//! Two `backshift serve` replicas share one PostgreSQL database. One is
//! killed with SIGKILL mid-run; the other takes its attempts over once
//! their leases run out and finishes them. The events show that no
//! attempt was ever driven by both: each attempt's `driver` changes at
//! most once, from the dead replica to the survivor.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{script, sh, spawn_server};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;
use testkit::{PgDatabase, docker};

fn config(dir: &Path, name: &str, db: &str, model: &str) -> std::path::PathBuf {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\ndatabase_url = \"{db}\"\n\
             replica_id = \"{name}\"\nlease_secs = 3\nmax_concurrent_attempts = 3\n\n\
             [model]\nbase_url = \"{model}\"\nmodel = \"scripted\"\nmax_retries = 1\nretry_base_ms = 50\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

async fn api(
    url: &str,
    token: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let mut req = reqwest::Client::new()
        .request(method, format!("{url}{path}"))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap().json().await.unwrap()
}

async fn events(url: &str, token: &str, attempt: &str) -> Vec<Value> {
    api(
        url,
        token,
        reqwest::Method::GET,
        &format!("/api/v1/attempts/{attempt}/events?limit=10000"),
        None,
    )
    .await
    .as_array()
    .cloned()
    .unwrap_or_default()
}

/// What both replicas share: one database, one scripted model, one data
/// directory, one repository.
/// Submits a task through `url` and waits until its attempt has made
/// `calls` tool calls; returns (task, attempt).
async fn submit_until_a_call(
    url: &str,
    token: &str,
    repo: &std::path::Path,
    calls: usize,
) -> (String, String) {
    let created = api(
        url,
        token,
        reqwest::Method::POST,
        "/api/v1/tasks",
        Some(json!({"prompt": "wait", "repo": repo})),
    )
    .await;
    let task = created["id"].as_str().unwrap().to_owned();
    let attempt = format!("{task}-1");
    wait_for_calls(url, token, &attempt, calls).await;
    (task, attempt)
}

/// Waits until `attempt` has made `calls` tool calls.
async fn wait_for_calls(url: &str, token: &str, attempt: &str, calls: usize) {
    for _ in 0..300 {
        let evs = events(url, token, attempt).await;
        if evs.iter().filter(|e| e["type"] == "tool_call").count() >= calls {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{attempt} never made {calls} tool calls");
}

struct Cluster {
    db: PgDatabase,
    fake: fake_model::FakeModel,
    dir: tempfile::TempDir,
    repo: std::path::PathBuf,
}

impl Cluster {
    async fn new(steps: Value) -> Cluster {
        let db = PgDatabase::create().await.unwrap();
        let fake = fake_model::FakeModel::start(script(json!({"mode": "turn", "steps": steps})))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        sh(
            &repo,
            "git init -q -b main && echo hi > README.md && git add . && git commit -qm init",
        )
        .await;
        Cluster {
            db,
            fake,
            dir,
            repo,
        }
    }

    /// Starts replica `name`; returns its process and URL.
    async fn replica(&self, name: &str) -> (tokio::process::Child, String) {
        let path = config(self.dir.path(), name, &self.db.url, &self.fake.base_url());
        spawn_server(&path, self.dir.path()).await
    }

    /// The admin token the first replica saved for `url`.
    fn token(&self, url: &str) -> String {
        let creds: toml::Value = toml::from_str(
            &std::fs::read_to_string(self.dir.path().join("config/credentials.toml")).unwrap(),
        )
        .unwrap();
        creds["servers"][url]["token"].as_str().unwrap().to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_dies_and_the_other_finishes_its_attempts() {
    let c = Cluster::new(json!([
        {"reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "one.txt", "content": "one\n"}}]}},
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "sleep 2; echo slept"}}]}},
        {"expect": {"tool_results": [{"contains": "slept"}]},
         "reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "two.txt", "content": "two\n"}}]}},
        {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Two files"}}]}}
    ]))
    .await;
    let (mut a, a_url) = c.replica("replica-a").await;
    let (mut b, b_url) = c.replica("replica-b").await;
    let token = c.token(&a_url);
    let (repo, fake) = (&c.repo, &c.fake);

    let mut attempts = Vec::new();
    for _ in 0..6 {
        let created = api(
            &a_url,
            &token,
            reqwest::Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "Two files", "repo": repo})),
        )
        .await;
        attempts.push(format!("{}-1", created["id"].as_str().unwrap()));
    }
    // Both replicas take work; wait until replica A is inside a command.
    let mut a_busy = false;
    for _ in 0..300 {
        for at in &attempts {
            let evs = events(&b_url, &token, at).await;
            if evs.iter().any(|e| {
                e["type"] == "tool_call" && e["name"] == "run_command" && e["driver"] == "replica-a"
            }) {
                a_busy = true;
            }
        }
        if a_busy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a_busy, "replica A never started an attempt");
    a.start_kill().unwrap();
    a.wait().await.unwrap();

    // Replica B finishes everything.
    for at in &attempts {
        let task = at.trim_end_matches("-1");
        let mut state = Value::Null;
        for _ in 0..600 {
            let view = api(
                &b_url,
                &token,
                reqwest::Method::GET,
                &format!("/api/v1/tasks/{task}"),
                None,
            )
            .await;
            state = view["state"].clone();
            if ["succeeded", "failed", "cancelled", "timed_out"]
                .contains(&state.as_str().unwrap_or(""))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert_eq!(state, "succeeded", "{at}");
    }
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());

    let mut taken_over = 0;
    for at in &attempts {
        let evs = events(&b_url, &token, at).await;
        for (i, e) in evs.iter().enumerate() {
            assert_eq!(e["seq"], i as u64 + 1, "{at}: gapless");
        }
        let drivers: Vec<&str> = evs.iter().map(|e| e["driver"].as_str().unwrap()).collect();
        let mut changes = drivers.windows(2).filter(|w| w[0] != w[1]);
        match changes.next() {
            None => {}
            Some(w) => {
                assert_eq!(w, ["replica-a", "replica-b"], "{at}: {drivers:?}");
                assert!(
                    changes.next().is_none(),
                    "{at} driven by both at once: {drivers:?}"
                );
                taken_over += 1;
            }
        }
    }
    println!("{taken_over} of {} attempts taken over", attempts.len());
    assert!(taken_over >= 1, "no attempt was taken over");
    for at in &attempts {
        let left = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=dev.backshift.attempt={at}"),
        ])
        .unwrap();
        assert_eq!(left.trim(), "", "sandbox of {at} left behind");
    }
    b.start_kill().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_one_replica_stops_an_attempt_the_other_drives() {
    let c = Cluster::new(json!([
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "sleep 600"}}]}}
    ]))
    .await;
    let (mut b, b_url) = c.replica("replica-b").await;
    let token = c.token(&b_url);
    let (task, attempt) = submit_until_a_call(&b_url, &token, &c.repo, 1).await;

    // Replica A joins and is asked to cancel what B drives.
    let (mut a, a_url) = c.replica("replica-a").await;
    let view = api(
        &a_url,
        &token,
        reqwest::Method::POST,
        &format!("/api/v1/tasks/{task}/cancel"),
        None,
    )
    .await;
    assert_eq!(view["state"], "cancelled", "{view}");
    let evs = events(&a_url, &token, &attempt).await;
    let last = evs.last().unwrap();
    assert_eq!(last["to"], "cancelled", "{last}");
    assert_eq!(
        last["driver"], "replica-b",
        "the driving replica ended it: {last}"
    );
    assert!(
        last["detail"]
            .as_str()
            .unwrap()
            .contains("through another replica"),
        "{last}"
    );
    let left = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=dev.backshift.attempt={attempt}"),
    ])
    .unwrap();
    assert_eq!(left.trim(), "", "the sandbox is gone");
    a.start_kill().unwrap();
    b.start_kill().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_through_one_replica_stops_an_attempt_the_other_drives_and_a_resume_starts_it_again()
 {
    let c = Cluster::new(json!([
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "sleep 600"}}]}}
    ]))
    .await;
    let (mut b, b_url) = c.replica("replica-b").await;
    let token = c.token(&b_url);
    let (task, attempt) = submit_until_a_call(&b_url, &token, &c.repo, 1).await;

    // Replica A is asked to pause what B drives: B carries it out.
    let (mut a, a_url) = c.replica("replica-a").await;
    let view = api(
        &a_url,
        &token,
        reqwest::Method::POST,
        &format!("/api/v1/attempts/{attempt}/pause"),
        None,
    )
    .await;
    assert_eq!(view["state"], "paused", "{view}");
    let evs = events(&a_url, &token, &attempt).await;
    let paused = evs
        .iter()
        .find(|e| e["type"] == "state_changed" && e["to"] == "paused")
        .unwrap();
    assert_eq!(paused["driver"], "replica-b", "{paused}");
    assert!(
        paused["detail"]
            .as_str()
            .unwrap()
            .contains("through another replica"),
        "{paused}"
    );
    // Resumed through A: a replica takes it up from its stopped sandbox,
    // and the agent starts its command again.
    let view = api(
        &a_url,
        &token,
        reqwest::Method::POST,
        &format!("/api/v1/attempts/{attempt}/resume"),
        None,
    )
    .await;
    assert_eq!(view["state"], "running", "{view}");
    wait_for_calls(&a_url, &token, &attempt, 2).await;
    let evs = events(&a_url, &token, &attempt).await;
    assert!(
        evs.iter().any(|e| e["type"] == "progress"
            && e["message"]
                .as_str()
                .unwrap_or("")
                .contains("started again")),
        "the stopped sandbox was started again, not rebuilt"
    );
    let left = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=dev.backshift.attempt={attempt}"),
    ])
    .unwrap();
    assert_eq!(left.lines().count(), 1, "one sandbox, running: {left}");
    let view = api(
        &a_url,
        &token,
        reqwest::Method::POST,
        &format!("/api/v1/tasks/{task}/cancel"),
        None,
    )
    .await;
    assert_eq!(view["state"], "cancelled", "{view}");
    a.start_kill().unwrap();
    b.start_kill().unwrap();
}
