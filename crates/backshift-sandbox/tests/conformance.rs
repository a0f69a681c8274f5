//! The driver conformance suite: what every sandbox driver must do,
//! written against the `SandboxDriver` trait only, and run against each
//! driver there is (Docker, for now). Needs dockerd and the default image
//! (`cargo xtask test` sets both up).
//!
//! Covered here: stop and resume keeping files, limits enforced as seen
//! from inside (processes, memory), isolation from each other (files,
//! processes, loopback ports) and from the host (no network, no host
//! files). `docker_driver.rs` covers the rest against the same trait:
//! create, exec with streaming and exit codes, stdin, files in and out,
//! hardening, list by label, destroy, snapshots, usage.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use backshift_sandbox::docker::DockerDriver;
use backshift_sandbox::image::{SANDBOX_UID, default_image_tag};
use backshift_sandbox::{ExecSpec, ResourceLimits, SandboxDriver, SandboxId, SandboxSpec, labels};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Every driver the suite runs against.
async fn drivers() -> Vec<Arc<dyn SandboxDriver>> {
    let docker = DockerDriver::connect().await.unwrap_or_else(|e| {
        panic!("the conformance suite needs a running Docker daemon ({e}); run `cargo xtask test`, which installs and starts it")
    });
    assert!(
        docker.image_exists(&default_image_tag()).await.unwrap(),
        "the default image is missing; run `cargo xtask test` or `backshift image bootstrap`"
    );
    vec![Arc::new(docker)]
}

fn spec(test: &str) -> SandboxSpec {
    SandboxSpec {
        image: default_image_tag(),
        name: format!("bs-conf-{test}"),
        labels: BTreeMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (
                "dev.backshift.test".to_owned(),
                format!("conformance-{test}"),
            ),
        ]),
        limits: ResourceLimits {
            memory_bytes: 128 * 1024 * 1024,
            nano_cpus: 500_000_000,
            pids: 64,
            disk_bytes: None,
        },
        user: format!("{SANDBOX_UID}:{SANDBOX_UID}"),
        workdir: "/workspace".into(),
        env: vec![],
        mounts: Vec::new(),
        command: None,
    }
}

/// A sandbox destroyed when dropped, even after a panic.
struct Sandbox {
    driver: Arc<dyn SandboxDriver>,
    id: SandboxId,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let (driver, id) = (self.driver.clone(), self.id.clone());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(driver.destroy(&id))
        })
        .join();
    }
}

async fn sandbox(driver: &Arc<dyn SandboxDriver>, test: &str) -> Sandbox {
    Sandbox {
        id: driver.create(&spec(test)).await.unwrap(),
        driver: driver.clone(),
    }
}

async fn sh(sb: &Sandbox, script: &str) -> (i64, String) {
    let out = sb
        .driver
        .exec_collect(&sb.id, &ExecSpec::new(["bash", "-c", script]))
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
async fn a_stopped_sandbox_keeps_its_files_and_resumes() {
    for driver in drivers().await {
        let sb = sandbox(&driver, "stop").await;
        let (code, out) = sh(
            &sb,
            "echo kept > /home/agent/state; sleep 300 & echo $! > /home/agent/pid",
        )
        .await;
        assert_eq!(code, 0, "{}: {out}", driver.name());
        driver.stop(&sb.id).await.unwrap();
        let listed = driver
            .list(&[("dev.backshift.test", "conformance-stop")])
            .await
            .unwrap();
        assert_eq!(
            listed.len(),
            1,
            "{}: a stopped sandbox is still listed",
            driver.name()
        );
        assert!(!listed[0].running, "{}: and not running", driver.name());
        assert!(
            driver
                .exec_collect(&sb.id, &ExecSpec::new(["true"]))
                .await
                .is_err(),
            "{}: nothing runs in a stopped sandbox",
            driver.name()
        );
        driver.resume(&sb.id).await.unwrap();
        let (code, out) = sh(&sb, "cat /home/agent/state; kill -0 $(cat /home/agent/pid) 2>/dev/null && echo alive || echo gone").await;
        assert_eq!(code, 0, "{}: {out}", driver.name());
        assert_eq!(
            out,
            "kept\ngone\n",
            "{}: files kept, processes not",
            driver.name()
        );
    }
}

/// Forks up to 100 sleeping children, says how many it got, kills them.
const FORKS: &str = r#"python3 -c '
import os, signal, time
pids = []
try:
    for i in range(100):
        pid = os.fork()
        if pid == 0:
            os.closerange(0, 3)
            time.sleep(30)
            os._exit(0)
        pids.append(pid)
except OSError:
    pass
print("started=%d" % len(pids), flush=True)
for p in pids:
    os.kill(p, signal.SIGKILL)
'"#;

#[tokio::test]
async fn limits_are_enforced_as_seen_from_inside() {
    for driver in drivers().await {
        let sb = sandbox(&driver, "limits").await;
        // Processes: 64 at most, whoever asks.
        let (_, out) = sh(&sb, FORKS).await;
        let started: usize = out
            .lines()
            .find_map(|l| l.strip_prefix("started="))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("{}: {out}", driver.name()));
        assert!(
            started < 64,
            "{}: {started} processes started under a limit of 64",
            driver.name()
        );
        // Memory: 128 MiB; a process asking for 400 is killed.
        let (code, out) = sh(
            &sb,
            "python3 -c 'b = bytearray(400 * 1024 * 1024); print(len(b))'",
        )
        .await;
        assert_ne!(
            code,
            0,
            "{}: 400 MiB allocated under a 128 MiB limit: {out}",
            driver.name()
        );
        assert_eq!(
            code,
            137,
            "{}: killed by the OOM killer: {out}",
            driver.name()
        );
        // And the sandbox lives on.
        assert_eq!(sh(&sb, "echo alive").await.1, "alive\n");
    }
}

#[tokio::test]
async fn sandboxes_are_isolated_from_each_other_and_from_the_host() {
    for driver in drivers().await {
        let a = sandbox(&driver, "iso-a").await;
        let b = sandbox(&driver, "iso-b").await;
        // A listens on its loopback and writes a file; B sees neither.
        let (code, out) = sh(&a, "echo secret-of-a > /tmp/a-file; (python3 -m http.server 18080 --bind 127.0.0.1 >/dev/null 2>&1 &); sleep 1; curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18080/").await;
        assert_eq!(
            (code, out.as_str()),
            (0, "200"),
            "{}: A's own server answers A",
            driver.name()
        );
        let (_, out) = sh(&b, "cat /tmp/a-file 2>&1; curl -s -m 2 -o /dev/null -w '%{http_code}' http://127.0.0.1:18080/; echo; ps -eo args | grep -c '[h]ttp.server'").await;
        assert!(
            out.contains("No such file"),
            "{}: B sees A's file: {out}",
            driver.name()
        );
        assert!(
            out.contains("000"),
            "{}: B reaches A's port: {out}",
            driver.name()
        );
        assert!(
            out.trim_end().ends_with('0'),
            "{}: B sees A's processes: {out}",
            driver.name()
        );
        // The host: no network interface but loopback, no host files.
        let (_, out) = sh(
            &b,
            "ls /sys/class/net; test -e /root/.cargo && echo host-home-visible; cat /etc/hostname",
        )
        .await;
        assert_eq!(out.lines().next(), Some("lo"), "{}: {out}", driver.name());
        assert!(
            !out.contains("host-home-visible"),
            "{}: {out}",
            driver.name()
        );
    }
}
