//! What a running sandbox uses, through the API and the CLI: CPU of a busy
//! loop, memory against its limit, processes, and the bytes written to its
//! filesystem; and the disk limit, applied where Docker's storage driver
//! can, otherwise said to be missing (an event on the attempt and a note
//! in the listing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::World;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_sandboxs_usage_and_disk_limit_are_visible() {
    let w = World::start(None, "[sandbox]\ndisk_mb = 512\n").await;
    let repo = w.repo.to_string_lossy().into_owned();
    let script = "head -c 30000000 /dev/urandom > $HOME/big.bin; timeout 8 sh -c 'while :; do :; done'; echo done";
    let (code, out, err) = w
        .cli(&["run", "Busy", "--repo", &repo, "--command", script])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let attempt = format!("{task}-1");
    let mut seen: Option<Value> = None;
    for _ in 0..40 {
        let (status, list) = w.api(reqwest::Method::GET, "/api/v1/sandboxes", None).await;
        assert_eq!(status, 200, "{list}");
        if let Some(s) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["attempt_id"] == attempt)
            && s["disk_bytes"].as_u64().unwrap_or(0) >= 30_000_000
            && s["cpu_percent"].as_f64().unwrap_or(0.0) > 30.0
        {
            seen = Some(s.clone());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    let s = seen.expect("the busy sandbox never showed its CPU and disk use");
    // One container for the attempt: a refused disk limit left none behind.
    let out = std::process::Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=dev.backshift.attempt={attempt}"),
        ])
        .env("DOCKER_API_VERSION", "1.41")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .count(),
        1
    );
    assert_eq!(s["task_id"], task);
    assert_eq!(s["running"], true, "{s}");
    assert!(
        s["cpu_percent"].as_f64().unwrap() <= 110.0,
        "limited to one CPU: {s}"
    );
    assert_eq!(s["memory_limit_bytes"], 2048u64 * 1024 * 1024, "{s}");
    assert!(s["memory_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(s["pids"].as_u64().unwrap() >= 2, "{s}");
    let (code, table, _) = w.cli(&["sandboxes"]).await;
    assert_eq!(code, 0);
    assert!(
        table.contains(&attempt) && table.contains("/ 2048 MiB"),
        "{table}"
    );

    let view = w.wait(&task).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let evs = w.events(&attempt).await;
    match s["disk_limit_bytes"].as_u64() {
        // A storage driver that limits a container's disk.
        Some(limit) => assert_eq!(limit, 512 * 1024 * 1024, "{s}"),
        // One that cannot (overlay2 on ext4, as here): said so.
        None => {
            let note = s["disk_limit_note"]
                .as_str()
                .expect("a note says why there is no limit");
            assert!(note.contains("storage-opt"), "{note}");
            let warning = evs
                .iter()
                .find(|e| e["type"] == "warning")
                .unwrap_or_else(|| panic!("no warning in {evs:#?}"));
            assert!(
                warning["message"]
                    .as_str()
                    .unwrap()
                    .contains("the disk limit ([sandbox] disk_mb) is not applied"),
                "{warning}"
            );
            assert!(table.contains("no disk limit is applied"), "{table}");
        }
    }
}
