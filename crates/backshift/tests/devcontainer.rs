//! A repository's devcontainer.json decides its sandboxes: a Dockerfile
//! built through the Docker API (output as events, cached by content),
//! its variables, `postCreateCommand` once per state of the lockfiles
//! (then the sandbox is committed and the next attempt starts from it:
//! an event says setup was skipped), `postStartCommand` every time, and a
//! warning naming what is not supported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::World;
use serde_json::Value;

const PROBE: &str = "cat /opt/greeting; echo \"$PROJECT_MODE $IMAGE_ENV\"; ~/.local/bin/greet; cat ~/setup-stamp; wc -l < ~/starts; cat ~/setup-secret; echo \"agent:${SETUP_TOKEN:-none}\"";

fn short_hash(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))[..8].to_owned()
}

async fn run(w: &World, prompt: &str) -> (String, Vec<Value>) {
    let (task, view) = w.run_task(prompt, &["--command", PROBE]).await;
    let evs = w.events(&format!("{task}-1")).await;
    assert_eq!(view["state"], "succeeded", "{view}\n{evs:#?}");
    (common::command_output(&evs), evs)
}

fn progress(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .filter(|e| e["type"] == "progress")
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devcontainer_builds_the_environment_and_setup_runs_once_per_lockfile_state() {
    let w = World::start(None, "").await;
    let image = backshift_sandbox::image::default_image_tag();
    std::fs::create_dir_all(w.repo.join(".devcontainer")).unwrap();
    std::fs::create_dir_all(w.repo.join("tools")).unwrap();
    std::fs::write(
        w.repo.join(".devcontainer/devcontainer.json"),
        r#"{
  // The test's environment: built, with variables and a setup.
  "name": "test",
  "build": { "dockerfile": "Dockerfile", "context": "..", "args": { "GREETING": "hello-from-the-build" } },
  "containerEnv": { "PROJECT_MODE": "devcontainer" },
  "postCreateCommand": "install -D -m 755 tools/greet $HOME/.local/bin/greet && echo stamp-$(date +%s%N) > $HOME/setup-stamp && printf %s \"${SETUP_TOKEN:-absent}\" | sha256sum | cut -c1-8 > $HOME/setup-secret",
  "postStartCommand": ["sh", "-c", "echo started >> $HOME/starts"],
  "forwardPorts": [8080],
  "features": {},
}
"#,
    )
    .unwrap();
    std::fs::write(
        w.repo.join(".devcontainer/Dockerfile"),
        // A line of this run's own: the build is new to the image cache.
        format!(
            "FROM {image}\nARG GREETING\nRUN echo \"$GREETING\" > /opt/greeting\nENV IMAGE_ENV=from-the-dockerfile\nLABEL dev.backshift.test-run=\"{}\"\n",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ),
    )
    .unwrap();
    std::fs::write(
        w.repo.join("tools/greet"),
        "#!/bin/sh\necho greet-installed\n",
    )
    .unwrap();
    std::fs::write(
        w.repo.join("package-lock.json"),
        "{\"lockfileVersion\": 3}\n",
    )
    .unwrap();
    common::sh(&w.repo, "git add -A && git commit -qm devcontainer").await;

    let (out, evs) = run(&w, "First").await;
    let project = {
        let (_, tasks) = w.api(reqwest::Method::GET, "/api/v1/tasks", None).await;
        tasks[0]["project_id"].as_str().unwrap().to_owned()
    };
    let _images = common::ProjectImages(project);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "hello-from-the-build", "{out}");
    assert_eq!(lines[1], "devcontainer from-the-dockerfile", "{out}");
    assert_eq!(lines[2], "greet-installed", "{out}");
    let stamp = lines[3].to_owned();
    assert!(stamp.starts_with("stamp-"), "{out}");
    assert_eq!(lines[4], "1", "postStartCommand ran once: {out}");
    let said = progress(&evs).join("\n");
    assert!(
        said.contains("environment from .devcontainer/devcontainer.json"),
        "{said}"
    );
    assert!(
        said.contains("building the environment image backshift-env:"),
        "{said}"
    );
    assert!(
        said.contains("build: Step 1/"),
        "the build's output streams: {said}"
    );
    assert!(said.contains("setup saved as backshift-setup:"), "{said}");
    let warnings: Vec<&str> = evs
        .iter()
        .filter(|e| e["type"] == "warning")
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        warnings.iter().any(|w| w.contains("ignored: features")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("forwardPorts is not supported")),
        "{warnings:?}"
    );
    let setup_calls: Vec<&str> = evs
        .iter()
        .filter(|e| e["type"] == "tool_result")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        setup_calls.contains(&"postCreateCommand") && setup_calls.contains(&"postStartCommand"),
        "{setup_calls:?}"
    );

    // Same lockfiles: setup is skipped (the stamp is the first one's),
    // postStartCommand runs again in the new sandbox.
    let (out, evs) = run(&w, "Second").await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[3], stamp, "setup was not run again: {out}");
    assert_eq!(lines[4], "1", "{out}");
    let said = progress(&evs).join("\n");
    assert!(
        said.contains("setup skipped: the sandbox starts from backshift-setup:"),
        "{said}"
    );
    assert!(
        said.contains("is built already"),
        "the image is cached by content: {said}"
    );
    assert!(!said.contains("build: "), "{said}");

    assert_eq!(lines[5], short_hash("absent"), "{out}");
    // A setup-only secret: the setup gets it, the agent never does.
    let (code, _, err) = w
        .cli_with_stdin(&["secrets", "set", "SETUP_TOKEN"], "registry-token-123\n")
        .await;
    assert_eq!(code, 0, "{err}");
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w
        .cli(&[
            "secrets",
            "grant",
            "SETUP_TOKEN",
            &repo,
            "--as",
            "SETUP_TOKEN",
            "--setup-only",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("its agents never do"), "{out}");
    // A lockfile changes: setup runs again.
    std::fs::write(
        w.repo.join("package-lock.json"),
        "{\"lockfileVersion\": 3, \"packages\": {}}\n",
    )
    .unwrap();
    common::sh(&w.repo, "git commit -qam 'a dependency'").await;
    let (out, evs) = run(&w, "Third").await;
    let lines: Vec<&str> = out.lines().collect();
    assert_ne!(lines[3], stamp, "{out}");
    assert_eq!(
        lines[5],
        short_hash("registry-token-123"),
        "the setup had the secret: {out}"
    );
    assert_eq!(lines[6], "agent:none", "the agent has not: {out}");
    let said = progress(&evs).join("\n");
    assert!(said.contains("setup saved as"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_devcontainer_or_a_failing_setup_ends_the_attempt_with_the_reason() {
    let w = World::start(None, "").await;
    std::fs::write(w.repo.join(".devcontainer.json"), "{ \"image\": \"x\", \n").unwrap();
    common::sh(&w.repo, "git add -A && git commit -qm broken").await;
    let (_, view) = w.run_task("Broken", &["--command", "true"]).await;
    let a = &view["attempts"][0];
    assert_eq!(a["reason"], "image_build_failed", "{view}");
    assert!(
        a["detail"]
            .as_str()
            .unwrap()
            .contains(".devcontainer.json is not valid JSON"),
        "{view}"
    );

    let image = backshift_sandbox::image::default_image_tag();
    std::fs::write(
        w.repo.join(".devcontainer.json"),
        format!("{{ \"image\": \"{image}\", \"postCreateCommand\": \"echo the setup broke >&2; exit 7\" }}"),
    )
    .unwrap();
    common::sh(&w.repo, "git commit -qam failing").await;
    let (_, view) = w.run_task("Failing", &["--command", "true"]).await;
    let a = &view["attempts"][0];
    assert_eq!(a["reason"], "setup_failed", "{view}");
    let detail = a["detail"].as_str().unwrap();
    assert!(
        detail.contains("postCreateCommand exited 7") && detail.contains("the setup broke"),
        "{detail}"
    );
}
