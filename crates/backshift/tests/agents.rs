//! Agents installed once per host (by `cargo xtask setup`, from npm) are
//! mounted read-only into sandboxes, their commands on the PATH of what
//! the agent runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::World;
use reqwest::Method;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_agents_are_listed_and_run_in_the_sandbox_read_only() {
    let agents = testkit::agents_dir(&["opencode"]);
    let w = World::start(None, &format!("agents_dir = \"{}\"\n", agents.display())).await;
    let version = std::fs::read_to_string(agents.join("opencode/current")).unwrap();
    let version = version.trim();

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_backshift"))
        .args(["agents", "ls"])
        .env("BACKSHIFT_AGENTS_DIR", &agents)
        .output()
        .await
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listing}");
    assert!(
        listing.contains("opencode") && listing.contains(version),
        "{listing}"
    );
    // Without a server config naming a model, no agent can take tasks,
    // and the listing says what to set.
    assert!(
        listing.contains("not ready: opencode speaks the OpenAI API")
            && listing.contains("set [model] base_url"),
        "{listing}"
    );

    let repo = w.repo.to_string_lossy().into_owned();
    let script = "echo \"version $(opencode --version)\"; touch /.backshift/agents/opencode/x 2>/dev/null && echo writable || echo read-only";
    let (code, out, err) = w
        .cli(&[
            "run",
            "Ask opencode its version",
            "--repo",
            &repo,
            "--command",
            script,
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let view = w.wait(&task).await;
    let (_, evs) = w
        .api(
            Method::GET,
            &format!("/api/v1/attempts/{task}-1/events?limit=1000"),
            None,
        )
        .await;
    let output: String = evs
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "command_output")
        .map(|e: &Value| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(view["state"], "succeeded", "{view}\n{output}");
    assert_eq!(output, format!("version {version}\nread-only\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installing_an_unknown_agent_says_what_can_be_installed() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_backshift"))
        .args(["agents", "install", "vim"])
        .env("BACKSHIFT_AGENTS_DIR", dir.path())
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("unknown agent \"vim\"")
            && err.contains("opencode, claude-code, codex, gemini"),
        "{err}"
    );
}
