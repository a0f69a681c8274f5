//! `[sandbox] image` from a registry: pulled before the task when missing,
//! with progress in the attempt's record; an unreachable registry fails
//! the task with `image_missing` and says why. The registry is Debian's
//! `docker-registry` on a loopback port.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, script};
use serde_json::json;
use testkit::{Registry, docker};

fn progress(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "progress")
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_image_is_pulled_from_its_registry_and_used() {
    let registry = Registry::start().unwrap();
    let tag = format!("t{}", std::process::id());
    let reference = format!("{}/backshift-e2e/sandbox:{tag}", registry.host());
    let s = script(json!({"steps": [
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "cat /etc/debian_version"}}]}},
        {"expect": {"tool_results": [{"contains": "exit code: 0"}]},
         "reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Looked at the OS"}}]}}
    ]}));
    let w = World::start(Some(s), &format!("[sandbox]\nimage = \"{reference}\"\n")).await;

    // Not in the registry yet: readyz says so and what to do.
    let ready: serde_json::Value = reqwest::get(format!("{}/readyz", w.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let check = ready["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "image")
        .unwrap()
        .clone();
    assert_eq!(check["ok"], false, "{check}");
    assert!(
        check["fix"]
            .as_str()
            .unwrap()
            .contains("backshift image pull"),
        "{check}"
    );

    let local = backshift_sandbox::image::default_image_tag();
    let pushed = registry
        .push(&local, "backshift-e2e/sandbox", &tag)
        .unwrap();
    assert_eq!(pushed, reference);
    let (_, view) = w.run_task("Look at the OS", &[]).await;
    let pulled = docker(&["image", "inspect", &reference]).is_ok();
    let _ = docker(&["rmi", &reference]);
    let a = &view["attempts"][0];
    assert_eq!(
        a["state"],
        "succeeded",
        "{view}\nregistry: {}",
        registry.log()
    );
    assert!(pulled, "the image is on the Docker host after the task");
    let lines = progress(&w.events(a["id"].as_str().unwrap()).await);
    let pos = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no progress line with {needle:?} in {lines:#?}"))
    };
    assert!(pos(&format!("pulling {reference}")) < pos(&format!("image {reference} is ready")));
    assert!(
        pos(&format!("image {reference} is ready"))
            < pos(&format!("creating sandbox from {reference}"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_fails_the_task_with_image_missing() {
    // A loopback port nothing listens on: the registry is down.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let reference = format!("127.0.0.1:{port}/team/sandbox:v1");
    let w = World::start(
        Some(script(json!({"steps": []}))),
        &format!("[sandbox]\nimage = \"{reference}\"\n"),
    )
    .await;
    let (_, view) = w.run_task("x", &[]).await;
    let a = &view["attempts"][0];
    assert_eq!(
        (a["state"].as_str(), a["reason"].as_str()),
        (Some("failed"), Some("image_missing")),
        "{view}"
    );
    let detail = a["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!(
            "{reference} ([sandbox] image) is not on this Docker host and could not be pulled"
        )) && detail.contains("connection refused")
            && detail.contains("unset [sandbox] image"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devcontainer_image_is_pulled_from_its_registry() {
    let registry = Registry::start().unwrap();
    let tag = format!("dc{}", std::process::id());
    let local = backshift_sandbox::image::default_image_tag();
    let reference = registry
        .push(&local, "backshift-e2e/devcontainer", &tag)
        .unwrap();
    // Pushed, then gone from this host: the task has to pull it.
    let _ = docker(&["rmi", &reference]);
    let w = World::start(None, "").await;
    std::fs::write(
        w.repo.join(".devcontainer.json"),
        format!(
            "{{ \"image\": \"{reference}\", \"containerEnv\": {{ \"FROM_REGISTRY\": \"yes\" }} }}"
        ),
    )
    .unwrap();
    common::sh(&w.repo, "git add -A && git commit -qm devcontainer").await;
    let (task, view) = w
        .run_task("Where am I", &["--command", "echo \"$FROM_REGISTRY\""])
        .await;
    let pulled = docker(&["image", "inspect", &reference]).is_ok();
    let _ = docker(&["rmi", &reference]);
    assert_eq!(
        view["state"],
        "succeeded",
        "{view}\nregistry: {}",
        registry.log()
    );
    assert!(
        pulled,
        "the devcontainer's image is on the Docker host after the task"
    );
    let evs = w.events(&format!("{task}-1")).await;
    assert_eq!(common::command_output(&evs), "yes\n");
    let lines = progress(&evs);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("pulling {reference}"))),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("creating sandbox from {reference}"))),
        "{lines:#?}"
    );
}
