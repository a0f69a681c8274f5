//! What is the Docker driver's own (images, snapshots, hardening as
//! Docker applies it, usage through the daemon), against a real daemon
//! and the real default image; `conformance.rs` holds what every driver
//! must do. Needs dockerd running and the image built: `cargo xtask
//! test` sets both up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use backshift_sandbox::docker::DockerDriver;
use backshift_sandbox::image::{SANDBOX_UID, default_image_tag};
use backshift_sandbox::{ExecSpec, ResourceLimits, SandboxDriver, SandboxId, SandboxSpec, labels};
use std::collections::BTreeMap;

struct Sandbox {
    driver: DockerDriver,
    id: SandboxId,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let driver = self.driver.clone();
        let id = self.id.clone();
        // Clean up even when the test panicked.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(driver.destroy(&id))
        })
        .join();
    }
}

async fn driver() -> DockerDriver {
    let driver = DockerDriver::connect().await.unwrap_or_else(|e| {
        panic!("these tests need a running Docker daemon ({e}); run `cargo xtask test`, which installs and starts it")
    });
    let image = default_image_tag();
    assert!(
        driver.image_exists(&image).await.unwrap(),
        "the default image {image} is missing; run `cargo xtask test` or `backshift image bootstrap`"
    );
    driver
}

fn spec(test: &str) -> SandboxSpec {
    SandboxSpec {
        image: default_image_tag(),
        name: format!("bs-test-{test}"),
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
        user: format!("{SANDBOX_UID}:{SANDBOX_UID}"),
        workdir: "/workspace".into(),
        env: vec![("BACKSHIFT_TEST".into(), "1".into())],
        mounts: Vec::new(),
        command: None,
    }
}

async fn sandbox(test: &str) -> Sandbox {
    let driver = driver().await;
    let id = driver.create(&spec(test)).await.unwrap();
    Sandbox { driver, id }
}

async fn sh(sb: &Sandbox, script: &str) -> (i64, String, String) {
    let out = sb
        .driver
        .exec_collect(&sb.id, &ExecSpec::new(["bash", "-c", script]))
        .await
        .unwrap();
    (
        out.exit_code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The hardening, read from inside the sandbox as the agent would see it.
#[tokio::test]
async fn sandboxes_are_hardened_as_seen_from_inside() {
    let sb = sandbox("hardening").await;
    let (_, status, _) = sh(&sb, "cat /proc/self/status").await;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or_else(|| panic!("{name} missing from /proc/self/status"))
            .to_owned()
    };
    assert_ne!(field("Uid:"), "0", "runs as non-root");
    assert_eq!(
        field("CapEff:"),
        "0000000000000000",
        "no effective capabilities"
    );
    assert_eq!(
        field("CapPrm:"),
        "0000000000000000",
        "no permitted capabilities"
    );
    assert_eq!(field("CapBnd:"), "0000000000000000", "empty bounding set");
    assert_eq!(field("NoNewPrivs:"), "1", "no-new-privileges");

    // cgroup v1 or v2, whichever the host runs.
    let (_, mem, _) = sh(&sb, "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes").await;
    assert_eq!(mem.trim(), (256 * 1024 * 1024).to_string(), "memory limit");
    let (_, pids, _) = sh(
        &sb,
        "cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max",
    )
    .await;
    assert_eq!(pids.trim(), "128", "pids limit");
    let (_, cpu, _) = sh(&sb, "cat /sys/fs/cgroup/cpu.max 2>/dev/null || echo $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us) $(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us)").await;
    let parts: Vec<f64> = cpu.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert!(
        (parts[0] / parts[1] - 0.5).abs() < 0.01,
        "cpu limit 0.5, got {cpu}"
    );

    let (code, _, _) = sh(&sb, "ls /var/run/docker.sock /run/docker.sock").await;
    assert_ne!(code, 0, "no Docker socket inside");
    let (_, mounts, _) = sh(&sb, "cat /proc/self/mounts").await;
    assert!(!mounts.contains("docker.sock"), "{mounts}");
    let (_, ifaces, _) = sh(&sb, "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '").await;
    assert_eq!(ifaces.trim(), "lo", "no network interface but loopback");
    let (code, _, _) = sh(&sb, "sudo true || su -c true").await;
    assert_ne!(code, 0, "cannot become root");
}

#[tokio::test]
async fn a_missing_image_is_reported_as_such() {
    let driver = driver().await;
    let mut s = spec("noimage");
    s.image = "backshift-missing:nope".into();
    match driver.create(&s).await {
        Err(backshift_sandbox::SandboxError::ImageMissing(i)) => {
            assert_eq!(i, "backshift-missing:nope")
        }
        other => panic!("expected ImageMissing, got {other:?}"),
    }
}

#[tokio::test]
async fn a_snapshot_starts_sandboxes_with_its_files_and_a_paused_sandbox_is_alive() {
    let sb = sandbox("snapshot").await;
    let (code, _, err) = sh(&sb, "echo kept > /home/agent/dep").await;
    assert_eq!(code, 0, "{err}");
    // While a snapshot is written the sandbox is paused: still alive.
    sb.driver.client().pause_container(&sb.id.0).await.unwrap();
    let listed = sb
        .driver
        .list(&[("dev.backshift.test", "snapshot")])
        .await
        .unwrap();
    sb.driver
        .client()
        .unpause_container(&sb.id.0)
        .await
        .unwrap();
    assert!(listed[0].running, "paused is alive");

    let suffix: u32 = rand_suffix();
    let image = format!("backshift-snapshot:test-{suffix:08x}");
    let labels = BTreeMap::from([(
        "dev.backshift.test".to_owned(),
        format!("snap-{suffix:08x}"),
    )]);
    assert!(sb.driver.snapshot(&sb.id, &image, &labels).await.unwrap());
    let found = sb
        .driver
        .list_snapshots(&[("dev.backshift.test", &format!("snap-{suffix:08x}"))])
        .await
        .unwrap();
    assert_eq!(
        found.iter().map(|(r, _)| r.as_str()).collect::<Vec<_>>(),
        [image.as_str()]
    );
    // The sandbox's own variables are not kept in the snapshot.
    let config = sb
        .driver
        .client()
        .inspect_image(&image)
        .await
        .unwrap()
        .config
        .unwrap();
    let env = config.env.unwrap_or_default();
    assert!(env.contains(&"BACKSHIFT_TEST=".to_owned()), "{env:?}");
    assert!(!env.contains(&"BACKSHIFT_TEST=1".to_owned()), "{env:?}");
    assert!(
        env.iter().any(|e| e.starts_with("PATH=/")),
        "the image's own stay: {env:?}"
    );
    let mut s = spec("from-snapshot");
    s.image = image.clone();
    s.env = vec![];
    let second = Sandbox {
        id: sb.driver.create(&s).await.unwrap(),
        driver: sb.driver.clone(),
    };
    let (_, out, _) = sh(&second, "cat /home/agent/dep; echo \"[${BACKSHIFT_TEST}]\"").await;
    assert_eq!(out, "kept\n[]\n", "files kept, variables not");
    drop(second);
    sb.driver.remove_snapshot(&image).await.unwrap();
    sb.driver.remove_snapshot(&image).await.unwrap(); // idempotent
    assert!(!sb.driver.image_exists(&image).await.unwrap());
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ std::process::id())
        .unwrap_or(1)
}

#[tokio::test]
async fn a_running_sandbox_is_listed_running_with_its_usage() {
    let sb = sandbox("usage").await;
    let listed = sb
        .driver
        .list(&[("dev.backshift.test", "usage")])
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].running, "{listed:?}");
    let (code, _, err) = sh(&sb, "head -c 5000000 /dev/zero > /home/agent/five-mb").await;
    assert_eq!(code, 0, "{err}");
    let usage = sb.driver.usage(&sb.id).await.unwrap();
    assert!(usage.disk_bytes.unwrap() >= 5_000_000, "{usage:?}");
    assert_eq!(usage.memory_limit_bytes, 256 * 1024 * 1024, "{usage:?}");
    assert!(usage.pids >= 1, "{usage:?}");
    assert!(usage.running, "{usage:?}");
    assert!(usage.cpu_percent.is_some(), "{usage:?}");
    assert_eq!(usage.disk_limit_bytes, None);
}
