//! The driver conformance suite: what every sandbox driver must do,
//! written against the `SandboxDriver` trait only, and run against each
//! driver there is: Docker and the process driver (bubblewrap). Needs
//! dockerd, the default image and bubblewrap (`cargo xtask setup` sets
//! them up).
//!
//! Covered here: create, exec with streaming, exit codes and stdin, files
//! in and out owned by the sandbox's user, list by label, destroy, stop
//! and resume keeping files, limits enforced as seen from inside
//! (processes, memory), isolation from each other (files, processes,
//! loopback ports) and from the host (no network, no host files).
//! `docker_driver.rs` covers what is Docker's own: images, snapshots,
//! the capability bounding set, usage through the daemon.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use backshift_sandbox::docker::DockerDriver;
use backshift_sandbox::image::{SANDBOX_UID, default_image_tag};
use backshift_sandbox::process::ProcessDriver;
use backshift_sandbox::tarball::{Owner, archive_dir, archive_file, first_file};
use backshift_sandbox::{
    ExecSpec, OutputChunk, ResourceLimits, SandboxDriver, SandboxId, SandboxSpec, labels,
};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

/// Where the process driver keeps this run's sandboxes.
static PROCESS_ROOT: OnceLock<tempfile::TempDir> = OnceLock::new();

/// Every driver the suite runs against.
async fn drivers() -> Vec<Arc<dyn SandboxDriver>> {
    let docker = DockerDriver::connect().await.unwrap_or_else(|e| {
        panic!("the conformance suite needs a running Docker daemon ({e}); run `cargo xtask test`, which installs and starts it")
    });
    assert!(
        docker.image_exists(&default_image_tag()).await.unwrap(),
        "the default image is missing; run `cargo xtask test` or `backshift image bootstrap`"
    );
    let root = PROCESS_ROOT.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("bs-process-")
            .tempdir()
            .unwrap()
    });
    let process = ProcessDriver::new(root.path(), Vec::new())
        .await
        .unwrap_or_else(|e| {
            panic!("the conformance suite runs the process driver too ({e}); run `cargo xtask setup`, which installs bubblewrap")
        });
    assert_eq!(
        process.limits_unsupported(),
        None,
        "the suite runs as root, where limits apply"
    );
    vec![Arc::new(docker), Arc::new(process)]
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
        env: vec![("BACKSHIFT_TEST".into(), "1".into())],
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
        id: driver
            .create(&spec(test))
            .await
            .unwrap_or_else(|e| panic!("{}: create: {e}", driver.name())),
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
            "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; test -e /root/.cargo && echo host-home-visible; ls /var/run/docker.sock /run/docker.sock 2>/dev/null; hostname",
        )
        .await;
        assert_eq!(out.lines().next(), Some("lo"), "{}: {out}", driver.name());
        assert!(
            !out.contains("docker.sock"),
            "{}: the Docker socket: {out}",
            driver.name()
        );
        assert!(
            !out.contains("host-home-visible"),
            "{}: {out}",
            driver.name()
        );
    }
}

#[tokio::test]
async fn exec_streams_output_in_order_and_reports_exit_codes() {
    for driver in drivers().await {
        let sb = sandbox(&driver, "exec").await;
        let mut chunks = Vec::new();
        let code = driver
            .exec(
                &sb.id,
                &ExecSpec::new([
                    "bash",
                    "-c",
                    "echo one; echo two >&2; sleep 0.2; echo three; exit 7",
                ]),
                &mut |c| chunks.push(c),
            )
            .await
            .unwrap();
        assert_eq!(code, 7, "{}", driver.name());
        let text: String = chunks
            .iter()
            .map(|c| match c {
                OutputChunk::Stdout(b) => format!("out:{}", String::from_utf8_lossy(b)),
                OutputChunk::Stderr(b) => format!("err:{}", String::from_utf8_lossy(b)),
            })
            .collect();
        assert!(text.contains("out:one"), "{}: {text}", driver.name());
        assert!(text.contains("err:two"), "{}: {text}", driver.name());
        assert!(text.find("one").unwrap() < text.find("three").unwrap());
        let (code, out) = sh(&sb, "echo $BACKSHIFT_TEST; pwd; id -u").await;
        assert_eq!(
            (code, out.as_str()),
            (0, format!("1\n/workspace\n{SANDBOX_UID}\n").as_str()),
            "{}",
            driver.name()
        );
        // Killed by a signal: 128 + its number.
        let (code, _) = sh(&sb, "kill -9 $$").await;
        assert_eq!(code, 137, "{}", driver.name());
        // Its own working directory and variables.
        let mut spec = ExecSpec::new(["sh", "-c", "pwd; echo $EXTRA"]);
        spec.workdir = Some("/tmp".into());
        spec.env = vec![("EXTRA".into(), "x".into())];
        let out = driver.exec_collect(&sb.id, &spec).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "/tmp\nx\n",
            "{}",
            driver.name()
        );
    }
}

#[tokio::test]
async fn stdin_is_delivered_and_closed() {
    for driver in drivers().await {
        let sb = sandbox(&driver, "stdin").await;
        let mut spec = ExecSpec::new(["bash", "-c", "cat > /tmp/in.txt && wc -c < /tmp/in.txt"]);
        spec.stdin = Some(vec![b'x'; 100_000].into());
        let out = driver.exec_collect(&sb.id, &spec).await.unwrap();
        assert_eq!(out.exit_code, 0, "{}", driver.name());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "100000",
            "{}",
            driver.name()
        );
    }
}

#[tokio::test]
async fn files_go_in_owned_by_the_sandbox_user_and_come_back_out() {
    for driver in drivers().await {
        let sb = sandbox(&driver, "files").await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/a.txt"), "hello").unwrap();
        let owner = Owner {
            uid: SANDBOX_UID,
            gid: SANDBOX_UID,
        };
        let tar = archive_dir(dir.path(), "workspace", owner).unwrap();
        driver.copy_in(&sb.id, "/", tar.into()).await.unwrap();
        let (code, out) = sh(
            &sb,
            "stat -c '%u %n' /workspace /workspace/sub/a.txt && echo more >> sub/a.txt",
        )
        .await;
        assert_eq!(code, 0, "{}: {out}", driver.name());
        assert_eq!(
            out,
            "1000 /workspace\n1000 /workspace/sub/a.txt\n",
            "{}",
            driver.name()
        );
        let back = driver
            .copy_out(&sb.id, "/workspace/sub/a.txt")
            .await
            .unwrap();
        assert_eq!(
            first_file(&back).unwrap(),
            b"hellomore\n",
            "{}",
            driver.name()
        );
        let one = archive_file("note.txt", b"n", 0o644, owner).unwrap();
        driver.copy_in(&sb.id, "/tmp", one.into()).await.unwrap();
        assert_eq!(
            sh(&sb, "cat /tmp/note.txt").await.1,
            "n",
            "{}",
            driver.name()
        );
        assert!(
            driver.copy_out(&sb.id, "/nope").await.is_err(),
            "{}",
            driver.name()
        );
        // A link the sandbox made leads nowhere outside it: what comes
        // out is the link, never the file it names on the host.
        sh(&sb, "ln -s /etc/shadow /workspace/shadow").await;
        let out = driver.copy_out(&sb.id, "/workspace/shadow").await.unwrap();
        let mut archive = tar::Archive::new(&out[..]);
        let entry = archive.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(
            entry.header().entry_type(),
            tar::EntryType::Symlink,
            "{}",
            driver.name()
        );
    }
}

#[tokio::test]
async fn sandboxes_are_listed_by_label_and_destroyed() {
    for driver in drivers().await {
        let sb = sandbox(&driver, "listing").await;
        let found = driver
            .list(&[("dev.backshift.test", "conformance-listing")])
            .await
            .unwrap();
        assert_eq!(found.len(), 1, "{}", driver.name());
        assert_eq!(found[0].id, sb.id);
        assert!(found[0].running, "{}", driver.name());
        assert_eq!(
            found[0].labels.get(labels::MANAGED).map(String::as_str),
            Some("true")
        );
        driver.destroy(&sb.id).await.unwrap();
        driver.destroy(&sb.id).await.unwrap(); // idempotent
        assert!(
            driver
                .list(&[("dev.backshift.test", "conformance-listing")])
                .await
                .unwrap()
                .is_empty(),
            "{}",
            driver.name()
        );
        assert!(
            driver
                .exec_collect(&sb.id, &ExecSpec::new(["true"]))
                .await
                .is_err(),
            "{}: nothing runs in a destroyed sandbox",
            driver.name()
        );
    }
}
