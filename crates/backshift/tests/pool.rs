//! The warm pool: with `[sandbox] warm = 1` the server keeps a sandbox of
//! its default environment ready, holding no task identity (no attempt
//! label, no model token, no git endpoint, no secret). A task claims it:
//! the attempt runs in that very container, its variables (token, git
//! remote, secrets) given through the shim, and the pool is refilled at
//! once with a new one. A claimed sandbox is found as its attempt's after
//! a restart (re-attached) and across a pause; it goes when its attempt
//! ends. An environment a task asked for (a devcontainer's variables) is
//! kept warm after its first miss.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, docker};
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

const SECRET: &str = "pool-s3cret-5517";

async fn pool(w: &World) -> Value {
    let (status, v) = w.api(Method::GET, "/api/v1/pool", None).await;
    assert_eq!(status, 200, "{v}");
    v
}

/// Waits until the environment `which` accepts has a ready sandbox;
/// returns the ids of the warm sandboxes then.
async fn warm_ready(w: &World, which: impl Fn(&Value) -> bool) -> Vec<String> {
    for _ in 0..300 {
        let p = pool(w).await;
        let ready = p["environments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| which(e) && e["ready"].as_u64() == Some(1));
        if ready {
            let (_, list) = w.api(Method::GET, "/api/v1/sandboxes", None).await;
            return list
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["role"] == "warm")
                .map(|s| s["id"].as_str().unwrap().to_owned())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no warm sandbox became ready: {}", pool(w).await);
}

fn default_env(e: &Value) -> bool {
    e["default"] == true
}

/// What a container was made with: its variables and labels.
fn definition(id: &str) -> (Vec<String>, Value) {
    let env: Vec<String> = serde_json::from_str(&docker(&[
        "inspect",
        "--format",
        "{{json .Config.Env}}",
        id,
    ]))
    .unwrap();
    let labels: Value = serde_json::from_str(&docker(&[
        "inspect",
        "--format",
        "{{json .Config.Labels}}",
        id,
    ]))
    .unwrap();
    (env, labels)
}

fn assert_anonymous(id: &str) {
    let (env, labels) = definition(id);
    for name in [
        "OPENAI_API_KEY",
        "BACKSHIFT_MODEL_TOKEN",
        "ANTHROPIC_API_KEY",
        "GIT_CONFIG_COUNT",
        "BACKSHIFT_BRANCH",
        "DEPLOY_TOKEN",
    ] {
        assert!(
            !env.iter().any(|v| v.starts_with(&format!("{name}="))),
            "warm sandbox {id} was made with {name}: {env:?}"
        );
    }
    assert!(
        !env.iter().any(|v| v.contains(SECRET)),
        "warm sandbox {id} holds the secret: {env:?}"
    );
    assert_eq!(labels["dev.backshift.role"], "warm", "{labels}");
    assert!(labels.get("dev.backshift.attempt").is_none(), "{labels}");
    assert!(labels.get("dev.backshift.task").is_none(), "{labels}");
}

fn exists(id: &str) -> bool {
    !docker(&["ps", "-aq", "--no-trunc", "--filter", &format!("id={id}")]).is_empty()
}

/// Whether container `id` is gone within 10 s (an attempt's sandbox goes
/// just after its end is recorded).
async fn gone(id: &str) -> bool {
    for _ in 0..100 {
        if !exists(id) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

async fn attempt_view(w: &World, attempt: &str) -> Value {
    let (status, v) = w
        .api(Method::GET, &format!("/api/v1/attempts/{attempt}"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    v
}

fn progress(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "progress")
        .map(|e| format!("{}\n", e["message"].as_str().unwrap_or("")))
        .collect()
}

/// Prints what makes the sandbox its attempt's, then (when `hold`) waits.
const WHO_AM_I: &str = "echo \"token-${BACKSHIFT_MODEL_TOKEN:+set} branch-$BACKSHIFT_BRANCH\"; \
    git ls-remote backshift >/dev/null && echo git-endpoint-ok; \
    if [ \"$DEPLOY_TOKEN\" = pool-s3cret-5517 ]; then echo secret-ok; fi";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_starts_on_a_warm_sandbox_that_held_no_identity_until_it_was_claimed() {
    let w = World::start(None, "[sandbox]\nwarm = 1\n").await;
    let first = warm_ready(&w, default_env).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_anonymous(&first[0]);
    let (code, out, _) = w.cli(&["pool"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("1 ready per environment"), "{out}");

    // The first task takes it.
    let (task, view) = w.run_task("Who am I", &["--command", WHO_AM_I]).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let attempt = format!("{task}-1");
    let events = w.events(&attempt).await;
    let said = progress(&events);
    assert!(
        said.contains(&format!(
            "sandbox {} taken from the warm pool",
            &first[0][..12]
        )),
        "the attempt ran in the warm sandbox: {said}"
    );
    let output = common::command_output(&events);
    assert!(output.contains("token-set"), "{output}");
    let branch = attempt_view(&w, &attempt).await["branch"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(output.contains(&format!("branch-{branch}")), "{output}");
    assert!(output.contains("git-endpoint-ok"), "{output}");
    // Gone with its attempt.
    assert!(
        gone(&first[0]).await,
        "the claimed sandbox outlived its attempt"
    );

    // Refilled with a new one; the project now has a secret, which no
    // warm sandbox holds.
    let project = view["project_id"].as_str().unwrap().to_owned();
    let (code, out, err) = w
        .cli_with_stdin(&["secrets", "set", "DEPLOY_TOKEN"], &format!("{SECRET}\n"))
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = w
        .cli(&[
            "secrets",
            "grant",
            "DEPLOY_TOKEN",
            &project,
            "--as",
            "DEPLOY_TOKEN",
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let second = warm_ready(&w, default_env).await;
    assert_eq!(second.len(), 1, "{second:?}");
    assert_ne!(second, first, "the pool was refilled with a new sandbox");
    assert_anonymous(&second[0]);

    // The second task takes that one, and gets the secret through its
    // shim. While it runs, it is listed as its attempt's.
    let hold = format!("{WHO_AM_I}; echo holding; sleep 600");
    let (task2, attempt2) = w.run_until_output("Hold", &hold, "holding").await;
    let output = common::command_output(&w.events(&attempt2).await);
    assert!(output.contains("secret-ok"), "{output}");
    let (_, list) = w.api(Method::GET, "/api/v1/sandboxes", None).await;
    let mine = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == second[0].as_str())
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(mine["attempt_id"], attempt2.as_str(), "{mine}");
    assert_eq!(mine["task_id"], task2.as_str(), "{mine}");
    assert_eq!(mine["role"], "agent", "{mine}");
    assert_eq!(mine["from_pool"], true, "{mine}");
    // The secret is still not in the container's definition.
    let (env, _) = definition(&second[0]);
    assert!(!env.iter().any(|v| v.contains(SECRET)), "{env:?}");
    let (code, out, _) = w.cli(&["sandboxes"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("(from the warm pool)"), "{out}");
    let (code, out, err) = w.cli(&["cancel", &task2]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(w.wait(&task2).await["state"], "cancelled");
    assert!(
        gone(&second[0]).await,
        "the cancelled attempt's sandbox stayed"
    );

    let p = pool(&w).await;
    assert_eq!(p["hits"], 2, "{p}");
    assert_eq!(p["misses"], 0, "{p}");
    assert_eq!(p["hit_rate"], 1.0, "{p}");
    let (code, out, _) = w.cli(&["pool"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("hit rate 100%"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_sandbox_is_its_attempts_across_a_restart_and_a_pause() {
    let mut w = World::start(None, "[sandbox]\nwarm = 1\n").await;
    let first = warm_ready(&w, default_env).await;
    // Runs twice: the second run (after the pause) ends.
    let script = "echo run >> /tmp/runs; echo \"token-${BACKSHIFT_MODEL_TOKEN:+set}\"; \
        if [ $(wc -l < /tmp/runs) -ge 2 ]; then echo second-run; exit 0; fi; echo holding; sleep 600";
    let (task, attempt) = w.run_until_output("Hold", script, "holding").await;
    let taken = format!("sandbox {} taken from the warm pool", &first[0][..12]);
    assert!(progress(&w.events(&attempt).await).contains(&taken));
    // The warm sandbox made to replace it.
    let refill = loop {
        let now = warm_ready(&w, default_env).await;
        if now != first {
            break now;
        }
    };

    // Killed and started again: the claimed sandbox is found as the
    // attempt's and re-attached; the old run's spare is removed and a
    // new one made.
    w.kill_server().await;
    w.restart_server().await;
    for _ in 0..300 {
        if progress(&w.events(&attempt).await).contains("re-attached to sandbox") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let said = progress(&w.events(&attempt).await);
    assert!(
        said.contains(&format!("re-attached to sandbox {}", &first[0][..12])),
        "{said}"
    );
    assert!(exists(&first[0]));
    let after = warm_ready(&w, default_env).await;
    assert!(
        gone(&refill[0]).await,
        "the spare of the run before the restart stayed"
    );
    assert_ne!(after, refill);

    // Paused and resumed: the same container, and its shim still gives
    // the attempt's variables.
    let (code, out, err) = w.cli(&["pause", &task]).await;
    assert_eq!(code, 0, "{out}{err}");
    for _ in 0..300 {
        if attempt_view(&w, &attempt).await["state"] == "paused" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, err) = w.cli(&["resume", &task]).await;
    assert_eq!(code, 0, "{out}{err}");
    let view = w.wait(&task).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let output = common::command_output(&w.events(&attempt).await);
    assert!(output.contains("second-run"), "{output}");
    assert_eq!(
        output.matches("token-set").count(),
        2,
        "both runs had the token: {output}"
    );
    assert!(
        gone(&first[0]).await,
        "the claimed sandbox outlived its attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_a_task_asked_for_is_kept_warm_after_its_first_miss() {
    let w = World::start(None, "[sandbox]\nwarm = 1\n").await;
    warm_ready(&w, default_env).await;
    // The repository's own environment: the default image, one variable.
    let image = backshift_sandbox::image::default_image_tag();
    std::fs::create_dir_all(w.repo.join(".devcontainer")).unwrap();
    std::fs::write(
        w.repo.join(".devcontainer/devcontainer.json"),
        format!("{{ \"image\": \"{image}\", \"containerEnv\": {{ \"FLAVOUR\": \"warm\" }} }}"),
    )
    .unwrap();
    common::sh(&w.repo, "git add . && git commit -qm devcontainer").await;
    let script = "echo \"flavour-$FLAVOUR token-${BACKSHIFT_MODEL_TOKEN:+set}\"";

    let (task, view) = w.run_task("First", &["--command", script]).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let events = w.events(&format!("{task}-1")).await;
    let said = progress(&events);
    assert!(
        said.contains("no warm sandbox (this environment was not kept warm yet"),
        "{said}"
    );
    assert!(common::command_output(&events).contains("flavour-warm token-set"));

    // Now it is.
    let ready = warm_ready(&w, |e| e["default"] == false).await;
    let (env, _) = definition(
        ready
            .iter()
            .find(|id| definition(id).0.iter().any(|v| v == "FLAVOUR=warm"))
            .unwrap_or_else(|| panic!("no warm sandbox of the devcontainer's environment")),
    );
    assert!(env.iter().any(|v| v == "FLAVOUR=warm"));
    let (task, view) = w.run_task("Second", &["--command", script]).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let events = w.events(&format!("{task}-1")).await;
    assert!(progress(&events).contains("taken from the warm pool"));
    assert!(common::command_output(&events).contains("flavour-warm token-set"));
    let p = pool(&w).await;
    assert_eq!(p["hits"], 1, "{p}");
    assert_eq!(p["misses"], 1, "{p}");
    let envs = p["environments"].as_array().unwrap();
    assert_eq!(envs.len(), 2, "{p}");
    let asked = envs.iter().find(|e| e["default"] == false).unwrap();
    assert_eq!(
        (asked["hits"].as_u64(), asked["misses"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_driver_keeps_a_warm_pool_too() {
    let w = World::start(None, "[sandbox]\ndriver = \"process\"\nwarm = 1\n").await;
    let first = warm_ready(&w, default_env).await;
    assert_eq!(first.len(), 1, "{first:?}");
    let (task, view) = w.run_task("Who am I", &["--command", WHO_AM_I]).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let events = w.events(&format!("{task}-1")).await;
    let said = progress(&events);
    assert!(
        said.contains(&format!(
            "sandbox {} taken from the warm pool",
            &first[0][..12]
        )),
        "{said}"
    );
    let output = common::command_output(&events);
    assert!(output.contains("token-set"), "{output}");
    assert!(output.contains("git-endpoint-ok"), "{output}");
    let second = warm_ready(&w, default_env).await;
    assert_ne!(second, first, "refilled");
}
