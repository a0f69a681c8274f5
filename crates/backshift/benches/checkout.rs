//! A large repository into a sandbox: the checkout backshift gives an
//! attempt, from its host-side mirror (the git store, fetched
//! incrementally), next to a plain `git clone` of the same repository in
//! the same run. The repository is generated: 50,000 files in 500
//! directories, 2,000 commits of history.
//!
//! backshift's side, timed per run: the working tree with its history
//! exported from the store (`GitStore::export_checkout`), archived, and
//! copied into a running sandbox (the container is created before the
//! clock starts). The baseline: `git clone --no-local` (no hard links) into
//! a fresh directory on the host. Also printed: an incremental fetch of
//! the mirror when nothing changed, and the first fetch.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p backshift --bench
//! checkout -- --runs 5 --files 50000 --commits 2000`). Needs dockerd and the
//! default image.

mod support;

use backshift_sandbox::docker::DockerDriver;
use backshift_sandbox::image::{SANDBOX_UID, default_image_tag};
use backshift_sandbox::tarball::{Owner, archive_dir};
use backshift_sandbox::{ResourceLimits, SandboxDriver, SandboxSpec, labels};
use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;
use support::{BenchResult, median};

fn main() {
    support::main("checkout", run());
}

/// Writes a repository of `files` files and `commits` commits at `dir`
/// with `git fast-import`.
fn generate(dir: &std::path::Path, files: usize, commits: usize) -> BenchResult<()> {
    let status = Command::new("git")
        .args(["init", "-q", "-b", "main"])
        .arg(dir)
        .status()?;
    if !status.success() {
        return Err("git init failed".into());
    }
    let mut child = Command::new("git")
        .args(["fast-import", "--quiet"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .spawn()?;
    {
        let mut w = std::io::BufWriter::new(child.stdin.take().ok_or("no stdin")?);
        // Blobs first, one per file, then the first commit names them all.
        for i in 0..files {
            let body = format!("// file {i}\npub fn f{i}() -> u64 {{ {i} }}\n");
            writeln!(w, "blob\nmark :{}\ndata {}\n{body}", i + 1, body.len())?;
        }
        let mut mark = files + 1;
        for c in 0..commits {
            // Later commits change ten files each.
            let mut changes = Vec::new();
            if c > 0 {
                for k in 0..10 {
                    let f = (c * 37 + k * 4099) % files;
                    let body = format!("// file {f}, commit {c}\npub fn f{f}() -> u64 {{ {c} }}\n");
                    writeln!(w, "blob\nmark :{mark}\ndata {}\n{body}", body.len())?;
                    changes.push((f, mark));
                    mark += 1;
                }
            }
            let msg = format!("commit {c}");
            writeln!(
                w,
                "commit refs/heads/main\ncommitter Bench <bench@example.invalid> {} +0000\ndata {}\n{msg}",
                1_700_000_000 + c,
                msg.len()
            )?;
            if c == 0 {
                for i in 0..files {
                    writeln!(w, "M 100644 :{} src/d{}/f{i}.rs", i + 1, i % 500)?;
                }
            } else {
                for (f, m) in changes {
                    writeln!(w, "M 100644 :{m} src/d{}/f{f}.rs", f % 500)?;
                }
            }
            writeln!(w)?;
        }
        w.flush()?;
    }
    if !child.wait()?.success() {
        return Err("git fast-import failed".into());
    }
    let status = Command::new("git")
        .args(["checkout", "-q", "main"])
        .current_dir(dir)
        .status()?;
    if !status.success() {
        return Err("git checkout failed".into());
    }
    Ok(())
}

fn arg(flag: &str, quick: usize, default: usize) -> BenchResult<usize> {
    support::count_arg(flag, quick, default)
}

async fn run() -> BenchResult<()> {
    let runs = arg("--runs", 1, 5)?;
    let files = arg("--files", 2_000, 50_000)?;
    let commits = arg("--commits", 50, 2_000)?;
    let scratch = tempfile::tempdir()?;
    let source = scratch.path().join("source");
    let started = Instant::now();
    generate(&source, files, commits)?;
    println!(
        "checkout: a repository of {files} files and {commits} commits, generated in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let store = backshift_git::GitStore::new(scratch.path().join("store"));
    let project = "bench";
    let pin = "refs/backshift/base/bench";
    let t = Instant::now();
    let base = store
        .fetch_source(project, &source.display().to_string(), None, pin)
        .await?;
    let first_fetch = t.elapsed().as_secs_f64() * 1000.0;
    let t = Instant::now();
    store
        .fetch_source(project, &source.display().to_string(), None, pin)
        .await?;
    let incremental = t.elapsed().as_secs_f64() * 1000.0;

    let driver = DockerDriver::connect().await?;
    let spec = SandboxSpec {
        image: default_image_tag(),
        name: "bs-bench-checkout".into(),
        labels: BTreeMap::from([(labels::MANAGED.to_owned(), "true".to_owned())]),
        limits: ResourceLimits {
            memory_bytes: 2 * 1024 * 1024 * 1024,
            nano_cpus: 2_000_000_000,
            pids: 512,
            disk_bytes: None,
        },
        user: format!("{SANDBOX_UID}:{SANDBOX_UID}"),
        workdir: "/workspace".into(),
        env: vec![],
        mounts: vec![],
        command: None,
    };
    let (mut ours, mut clone) = (Vec::new(), Vec::new());
    for i in 0..runs {
        // The baseline: a plain clone.
        let dest = scratch.path().join(format!("clone-{i}"));
        let t = Instant::now();
        let status = Command::new("git")
            .args(["clone", "--no-local", "--quiet"])
            .arg(&source)
            .arg(&dest)
            .status()?;
        clone.push(t.elapsed().as_secs_f64() * 1000.0);
        if !status.success() {
            return Err("git clone failed".into());
        }
        std::fs::remove_dir_all(&dest)?;
        // Ours: the store's checkout, into a sandbox made beforehand.
        let id = driver.create(&spec).await?;
        let tree = scratch.path().join(format!("tree-{i}"));
        let t = Instant::now();
        let result = async {
            store
                .export_checkout(project, pin, &base, "backshift/bench", &tree)
                .await?;
            let owner = Owner {
                uid: SANDBOX_UID,
                gid: SANDBOX_UID,
            };
            let tar = archive_dir(&tree, "workspace", owner)?;
            driver.copy_in(&id, "/", tar.into()).await?;
            BenchResult::Ok(())
        }
        .await;
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
        let _ = driver.destroy(&id).await;
        result?;
        std::fs::remove_dir_all(&tree)?;
    }
    let (o, c) = (median(&mut ours), median(&mut clone));
    println!(
        "{:<44} {:>10}   {:<36} {:>7}",
        "measure", "p50", "baseline p50", "ratio"
    );
    println!(
        "{:<44} {:>10}   {:<36} {:>6.2}x",
        "checkout into a sandbox, from the mirror",
        format!("{o:.0} ms"),
        format!("git clone --no-local {c:.0} ms"),
        o / c
    );
    println!(
        "mirror: first fetch {first_fetch:.0} ms, incremental fetch (nothing new) {incremental:.0} ms"
    );
    Ok(())
}
