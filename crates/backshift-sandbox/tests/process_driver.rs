//! What is the process driver's own: the host's filesystem seen read-only
//! with its private trees and the paths it is told to hide absent, the
//! hardening of every process (the main one and each command), usage
//! from its control groups, no disk limit (said so), and sandboxes that
//! outlive the driver that made them (a restarted server finds them).
//! Needs bubblewrap (`cargo xtask setup` installs it) and root, which the
//! suite runs as (for control groups).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use backshift_sandbox::process::ProcessDriver;
use backshift_sandbox::{
    ExecSpec, ResourceLimits, SandboxDriver, SandboxError, SandboxId, SandboxSpec, labels,
};
use std::collections::BTreeMap;
use std::path::Path;

async fn driver(root: &Path, hide: Vec<std::path::PathBuf>) -> ProcessDriver {
    ProcessDriver::new(root, hide).await.unwrap_or_else(|e| {
        panic!("these tests need bubblewrap ({e}); run `cargo xtask setup`, which installs it")
    })
}

fn spec(test: &str) -> SandboxSpec {
    SandboxSpec {
        image: "ignored-by-the-process-driver".into(),
        name: format!("bs-proc-{test}"),
        labels: BTreeMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            ("dev.backshift.test".to_owned(), test.to_owned()),
        ]),
        limits: ResourceLimits {
            memory_bytes: 256 * 1024 * 1024,
            nano_cpus: 500_000_000,
            pids: 128,
            disk_bytes: None,
        },
        user: "1000:1000".into(),
        workdir: "/workspace".into(),
        env: vec![],
        mounts: Vec::new(),
        command: None,
    }
}

async fn sh(d: &ProcessDriver, id: &SandboxId, script: &str) -> (i64, String) {
    let out = d
        .exec_collect(id, &ExecSpec::new(["bash", "-c", script]))
        .await
        .unwrap();
    (
        out.exit_code,
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn the_host_is_seen_read_only_and_its_private_trees_not_at_all() {
    let root = tempfile::tempdir().unwrap();
    let secret = tempfile::Builder::new()
        .prefix("bs-hidden-")
        .tempdir_in("/opt")
        .unwrap();
    std::fs::write(secret.path().join("key"), "server secret").unwrap();
    let d = driver(root.path(), vec![secret.path().to_owned()]).await;
    let id = d.create(&spec("host")).await.unwrap();
    let (_, out) = sh(
        &d,
        &id,
        &format!(
            "ls /root /srv /mnt 2>&1; ls /home; cat {}/key 2>&1; cat /etc/shadow 2>&1; touch /usr/x /etc/x 2>&1; test -x /usr/bin/git && echo has-git",
            secret.path().display()
        ),
    )
    .await;
    for absent in ["/root", "/srv", "/mnt"] {
        assert!(
            out.contains(&format!("cannot access '{absent}'")),
            "{absent}: {out}"
        );
    }
    assert!(!out.contains("server secret"), "a hidden path: {out}");
    assert!(out.contains("Permission denied"), "/etc/shadow: {out}");
    assert_eq!(out.matches("Read-only file system").count(), 2, "{out}");
    assert!(out.contains("has-git"), "the host's tools: {out}");
    // Only the sandbox's own home under /home.
    assert!(out.contains("agent\n"), "{out}");
    d.destroy(&id).await.unwrap();
}

#[tokio::test]
async fn every_process_is_unprivileged() {
    let root = tempfile::tempdir().unwrap();
    let d = driver(root.path(), Vec::new()).await;
    let mut s = spec("hardening");
    // The main process reports on itself into the checkout.
    s.command = Some(vec![
        "bash".into(),
        "-c".into(),
        "cat /proc/self/status > /workspace/main-status; exec sleep infinity".into(),
    ]);
    let id = d.create(&s).await.unwrap();
    let (_, exec_status) = sh(&d, &id, "cat /proc/self/status").await;
    let mut main_status = String::new();
    for _ in 0..100 {
        main_status = sh(&d, &id, "cat /workspace/main-status").await.1;
        if main_status.contains("NoNewPrivs") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for (who, status) in [
        ("a command", &exec_status),
        ("the main process", &main_status),
    ] {
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or_else(|| panic!("{who}: {name} missing: {status}"))
                .to_owned()
        };
        assert_eq!(field("Uid:"), "1000", "{who}");
        assert_eq!(field("CapEff:"), "0000000000000000", "{who}");
        assert_eq!(field("CapPrm:"), "0000000000000000", "{who}");
        assert_eq!(field("NoNewPrivs:"), "1", "{who}");
    }
    assert!(
        main_status.contains("CapBnd:\t0000000000000000"),
        "the main process has an empty bounding set: {main_status}"
    );
    let (code, _) = sh(
        &d,
        &id,
        "sudo -n true 2>/dev/null || su -c true 2>/dev/null",
    )
    .await;
    assert_ne!(code, 0, "cannot become root");
    d.destroy(&id).await.unwrap();
}

#[tokio::test]
async fn usage_comes_from_its_control_groups_and_a_disk_limit_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let d = driver(root.path(), Vec::new()).await;
    let id = d.create(&spec("usage")).await.unwrap();
    let (code, out) = sh(
        &d,
        &id,
        "head -c 20000000 /dev/zero > /workspace/big; (timeout 3 sh -c 'while :; do :; done' &); python3 -c 'b = bytearray(60 * 1024 * 1024); import time; time.sleep(3)' & sleep 1; echo started",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let u = d.usage(&id).await.unwrap();
    assert!(u.running);
    assert_eq!(u.memory_limit_bytes, 256 * 1024 * 1024);
    assert!(u.memory_bytes >= 50 * 1024 * 1024, "{u:?}");
    assert!(u.pids >= 3, "{u:?}");
    let cpu = u.cpu_percent.unwrap();
    assert!(
        cpu > 20.0 && cpu <= 60.0,
        "busy, limited to half a CPU: {u:?}"
    );
    assert!(u.disk_bytes.unwrap() >= 20_000_000, "{u:?}");
    assert_eq!(u.disk_limit_bytes, None);
    d.destroy(&id).await.unwrap();

    let mut s = spec("disk");
    s.limits.disk_bytes = Some(1 << 30);
    match d.create(&s).await {
        Err(SandboxError::DiskLimitUnsupported(why)) => assert!(why.contains("quota"), "{why}"),
        other => panic!("a disk limit cannot be applied: {other:?}"),
    }
    assert!(
        d.list(&[("dev.backshift.test", "disk")])
            .await
            .unwrap()
            .is_empty(),
        "nothing left of the refused one"
    );
}

#[tokio::test]
async fn a_sandbox_outlives_the_driver_that_made_it() {
    let root = tempfile::tempdir().unwrap();
    let id = {
        let d = driver(root.path(), Vec::new()).await;
        let id = d.create(&spec("outlive")).await.unwrap();
        sh(&d, &id, "echo kept > /workspace/f").await;
        id
    };
    // A new driver on the same directory: a restarted server.
    let d = driver(root.path(), Vec::new()).await;
    let found = d.list(&[("dev.backshift.test", "outlive")]).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id, id);
    assert!(found[0].running);
    assert_eq!(sh(&d, &id, "cat /workspace/f").await.1, "kept\n");
    d.destroy(&id).await.unwrap();
    assert!(
        std::fs::read_dir(root.path()).unwrap().next().is_none(),
        "its directory is gone"
    );
}
