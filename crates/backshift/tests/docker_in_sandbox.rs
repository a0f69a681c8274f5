//! Docker inside a sandbox, for a project that opts in: the agent builds
//! a small image from local files and runs it through its sandbox's own
//! engine; the host's engine never sees it, and the host's socket is not
//! there to reach. The verification sandbox has an engine too. The
//! engine stops and starts with a paused sandbox and goes with it. Needs the engine image (`cargo xtask setup` builds it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, docker, docker_quiet};
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

/// Makes a one-file image of backshift's own static binary (the sandbox
/// has it read-only), runs it, and looks for the host's socket.
const SCRIPT: &str = r#"set -e
echo "engine $(docker version --format '{{.Server.Version}}')"
mkdir -p /tmp/img
cp /.backshift/bin/backshift /tmp/img/tool
tar -C /tmp/img -c . | docker import - backshift-test/tiny:1 > /dev/null
docker run --rm backshift-test/tiny:1 /tool --version
docker info --format 'name={{.Name}}'
for s in /var/run/docker.sock /run/docker.sock; do test -e "$s" && echo "host socket at $s"; done
echo checked > docker.txt
"#;

fn engines_of(attempt: &str) -> String {
    docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=dev.backshift.attempt={attempt}"),
        "--filter",
        "label=dev.backshift.role=engine",
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_runs_containers_through_its_own_engine_never_the_hosts() {
    let engine_image = backshift_sandbox::image::engine_image_tag();
    assert!(
        !docker_quiet(&["images", "-q", &engine_image]).is_empty(),
        "the engine image {engine_image} is missing: run `cargo xtask setup` (or `backshift image bootstrap --engine`)"
    );
    let w = World::start(None, "").await;
    // The project appears with its first task; it has no engine.
    let (first, view) = w
        .run_task("Look", &["--command", "echo ${DOCKER_HOST:-none}"])
        .await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let evs = w.events(&format!("{first}-1")).await;
    assert_eq!(common::command_output(&evs), "none\n");
    let project = view["project_id"].as_str().unwrap().to_owned();
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w.cli(&["docker", &repo, "on"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("get a Docker engine of their own"), "{out}");
    let (_, p) = w
        .api(Method::GET, &format!("/api/v1/projects/{project}"), None)
        .await;
    assert_eq!(p["docker_engine"], true, "{p}");

    // The tests backshift runs get an engine of their own too.
    let (task, view) = w
        .run_task(
            "Use Docker",
            &[
                "--command",
                SCRIPT,
                "--verify",
                "docker info --format 'verify-engine={{.Name}}'",
            ],
        )
        .await;
    assert_eq!(view["state"], "succeeded", "{view}");
    assert_eq!(
        view["attempts"][0]["verification"]["passed"], true,
        "{view}"
    );
    let attempt = format!("{task}-1");
    let evs = w.events(&attempt).await;
    let verify_output: String = evs
        .iter()
        .filter(|e| e["type"] == "command_output" && e["call_id"] == "verify:1")
        .map(|e| e["text"].as_str().unwrap_or(""))
        .collect();
    assert!(verify_output.contains("verify-engine="), "{verify_output}");
    let output = common::command_output(&evs);
    assert!(output.starts_with("engine "), "{output}");
    assert!(output.contains("backshift "), "the image ran: {output}");
    assert!(!output.contains("host socket"), "{output}");
    let host_name = docker(&["info", "--format", "{{.Name}}"]);
    assert!(output.contains("name="), "{output}");
    assert!(
        !output.contains(&format!("name={host_name}\n")),
        "its own engine, not the host's ({host_name}): {output}"
    );
    // The host's engine never had the image.
    assert_eq!(docker_quiet(&["images", "-q", "backshift-test/tiny:1"]), "");
    // Structurally: neither the sandbox nor its engine has the host's
    // socket mounted.
    assert!(
        evs.iter().any(|e| e["type"] == "progress"
            && e["message"]
                .as_str()
                .unwrap_or("")
                .contains("own Docker engine is up")),
        "{evs:?}"
    );
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(diff.contains("+checked"), "{diff}");
    // The engine and its data go with the attempt.
    let mut left = engines_of(&attempt);
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = engines_of(&attempt);
    }
    assert_eq!(left, "", "the engine is removed");
    let data = w.dir.path().join("data/engines").join(&attempt);
    for _ in 0..100 {
        if !data.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!data.exists(), "its data is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_pauses_and_resumes_with_its_sandbox_and_never_mounts_the_hosts_socket() {
    let w = World::start(None, "").await;
    let (_, view) = w.run_task("Look", &["--command", "true"]).await;
    let project = view["project_id"].as_str().unwrap().to_owned();
    let (status, p) = w
        .api(
            Method::PUT,
            &format!("/api/v1/projects/{project}/docker"),
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(status, 200, "{p}");
    let script = "if [ -e /tmp/mark ]; then docker version --format 'again {{.Server.Version}}' > again.txt; else touch /tmp/mark; docker version --format 'up {{.Server.Version}}'; sleep 600; fi";
    let (task, attempt) = w.run_until_output("Wait", script, "up ").await;
    let engine = engines_of(&attempt);
    assert_eq!(engine.lines().count(), 1, "{engine}");
    let mounts = docker(&[
        "inspect",
        "-f",
        "{{range .Mounts}}{{.Source}} {{end}}",
        &engine,
    ]);
    assert!(!mounts.contains("docker.sock"), "{mounts}");
    let (status, view) = w
        .api(
            Method::POST,
            &format!("/api/v1/attempts/{attempt}/pause"),
            None,
        )
        .await;
    assert_eq!(
        (status, view["state"].as_str()),
        (200, Some("paused")),
        "{view}"
    );
    // Recorded first, then carried out: the engine stops with its
    // sandbox.
    let mut running = String::new();
    for _ in 0..200 {
        running = docker(&["inspect", "-f", "{{.State.Running}}", &engine]);
        if running == "false" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(running, "false", "the engine stops with its sandbox");
    let (status, view) = w
        .api(
            Method::POST,
            &format!("/api/v1/attempts/{attempt}/resume"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{view}");
    let view = w.wait(&task).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(
        diff.contains("+again "),
        "the engine answered after the resume: {diff}"
    );
}
