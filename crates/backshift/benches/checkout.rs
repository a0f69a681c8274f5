//! A large repository into a sandbox: the checkout backshift gives an
//! attempt, from its host-side mirror (the git store, fetched
//! incrementally), next to a plain `git clone` of the same repository in
//! the same run. The repository is generated: 50,000 files in 500
//! directories, 2,000 commits of history.
//!
//! backshift's side, timed per run, each way it has:
//! - copied in (small repositories): the working tree with its history
//!   exported from the store, archived, and copied into a running sandbox
//!   (created before the clock starts);
//! - the checkout image (large repositories, `checkout_image::ensure`):
//!   made from the whole tree the first time, then for a new commit (ten
//!   files changed) as a layer of the changes;
//! - what each attempt on that commit then pays: a sandbox created from
//!   the checkout image and its branch named (checked afterwards: a clean
//!   status and every file there).
//!
//! The baseline: `git clone --no-local` (no hard links) into a fresh
//! directory on the host. Also printed: an incremental fetch of the
//! mirror when nothing changed, and the first fetch.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p backshift --bench
//! checkout -- --runs 5 --files 50000 --commits 2000`). Needs dockerd and the
//! default image.

mod support;

use backshift_sandbox::docker::DockerDriver;
use backshift_sandbox::image::{SANDBOX_UID, default_image_tag};
use backshift_sandbox::tarball::{Owner, archive_dir};
use backshift_sandbox::{ExecSpec, ResourceLimits, SandboxDriver, SandboxSpec, labels};
use backshift_server::checkout_image;
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

/// A new commit on `source` changing ten files (run `i`'s own).
fn change(source: &std::path::Path, files: usize, i: usize) -> BenchResult<()> {
    for k in 0..10 {
        let f = (i * 7919 + k * 4099) % files;
        std::fs::write(
            source.join(format!("src/d{}/f{f}.rs", f % 500)),
            format!("// file {f}, bench run {i}\npub fn f{f}() -> u64 {{ {i} }}\n"),
        )?;
    }
    let ok = Command::new("git")
        .args(["commit", "-qam", &format!("bench run {i}")])
        .current_dir(source)
        .env("GIT_AUTHOR_NAME", "b")
        .env("GIT_AUTHOR_EMAIL", "b@example.invalid")
        .env("GIT_COMMITTER_NAME", "b")
        .env("GIT_COMMITTER_EMAIL", "b@example.invalid")
        .status()?
        .success();
    if !ok {
        return Err("git commit failed".into());
    }
    Ok(())
}

/// The checkout image of `commit` on the default image, as an attempt
/// asks for it.
async fn ensure(
    driver: &DockerDriver,
    store: &backshift_git::GitStore,
    project: &str,
    pin: &str,
    commit: &str,
) -> BenchResult<checkout_image::Prepared> {
    let limits = ResourceLimits {
        memory_bytes: 2 * 1024 * 1024 * 1024,
        nano_cpus: 2_000_000_000,
        pids: 512,
        disk_bytes: None,
    };
    let source = checkout_image::Source {
        git: store,
        project,
        pin,
        commit,
    };
    Ok(checkout_image::ensure(
        driver,
        &source,
        &default_image_tag(),
        limits,
        ("bench", "bench"),
    )
    .await?)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
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
    let project = format!("bench{:08x}", rand_u32());
    let pin = "refs/backshift/base/bench";
    let url = source.display().to_string();
    let t = Instant::now();
    let mut base = store.fetch_source(&project, &url, None, pin).await?;
    let first_fetch = ms(t);
    let t = Instant::now();
    store.fetch_source(&project, &url, None, pin).await?;
    let incremental = ms(t);

    let driver = DockerDriver::connect().await?;
    let limits = ResourceLimits {
        memory_bytes: 2 * 1024 * 1024 * 1024,
        nano_cpus: 2_000_000_000,
        pids: 512,
        disk_bytes: None,
    };
    let spec = |image: String| SandboxSpec {
        image,
        name: format!("bs-bench-checkout-{:08x}", rand_u32()),
        labels: BTreeMap::from([(labels::MANAGED.to_owned(), "true".to_owned())]),
        limits,
        user: format!("{SANDBOX_UID}:{SANDBOX_UID}"),
        workdir: "/workspace".into(),
        env: vec![],
        mounts: vec![],
        command: Some(vec!["sleep".into(), "infinity".into()]),
    };
    let owner = Owner {
        uid: SANDBOX_UID,
        gid: SANDBOX_UID,
    };
    let (mut copied, mut clone, mut whole, mut layer, mut sandbox) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        // The baseline: a plain clone.
        let dest = scratch.path().join(format!("clone-{i}"));
        let t = Instant::now();
        let status = Command::new("git")
            .args(["clone", "--no-local", "--quiet"])
            .arg(&source)
            .arg(&dest)
            .status()?;
        clone.push(ms(t));
        if !status.success() {
            return Err("git clone failed".into());
        }
        std::fs::remove_dir_all(&dest)?;

        // A small repository's way: the store's checkout copied into a
        // sandbox made beforehand.
        let id = driver.create(&spec(default_image_tag())).await?;
        let tree = scratch.path().join(format!("tree-{i}"));
        let t = Instant::now();
        let result = async {
            store
                .export_checkout(&project, pin, &base, "backshift/bench", &tree)
                .await?;
            let tar = archive_dir(&tree, "workspace", owner)?;
            driver.copy_in(&id, "/", tar.into()).await?;
            BenchResult::Ok(())
        }
        .await;
        copied.push(ms(t));
        let _ = driver.destroy(&id).await;
        result?;
        std::fs::remove_dir_all(&tree)?;

        // A large one's: its checkout image, made the first time from the
        // whole tree (every earlier one removed first) ...
        for (image, _) in driver
            .list_snapshots(&[("dev.backshift.project", project.as_str())])
            .await?
        {
            driver.remove_snapshot(&image).await?;
        }
        let t = Instant::now();
        let p = ensure(&driver, &store, &project, pin, &base).await?;
        whole.push(ms(t));
        if p.made != checkout_image::Made::Whole {
            return Err(format!("expected a whole-tree image, got {:?}", p.made).into());
        }
        // ... then for a new commit (ten files changed): a layer.
        change(&source, files, i)?;
        base = store.fetch_source(&project, &url, None, pin).await?;
        let t = Instant::now();
        let p = ensure(&driver, &store, &project, pin, &base).await?;
        layer.push(ms(t));
        if !matches!(p.made, checkout_image::Made::Advanced { .. }) {
            return Err(format!("expected a layer, got {:?}", p.made).into());
        }
        // Each attempt on that commit: a sandbox from the image, its
        // branch named, a first command.
        let t = Instant::now();
        let id = driver.create(&spec(p.image.clone())).await?;
        let named = driver
            .exec_collect(
                &id,
                &ExecSpec {
                    argv: vec![
                        "git".into(),
                        "branch".into(),
                        "-m".into(),
                        checkout_image::BRANCH.into(),
                        "backshift/bench".into(),
                    ],
                    workdir: Some("/workspace".into()),
                    ..Default::default()
                },
            )
            .await?;
        sandbox.push(ms(t));
        let listed = driver
            .exec_collect(
                &id,
                &ExecSpec {
                    argv: vec![
                        "bash".into(),
                        "-c".into(),
                        "git status --porcelain | wc -l; git ls-files | wc -l".into(),
                    ],
                    workdir: Some("/workspace".into()),
                    ..Default::default()
                },
            )
            .await?;
        let _ = driver.destroy(&id).await;
        let said = String::from_utf8_lossy(&listed.stdout).into_owned();
        if named.exit_code != 0
            || said.split_whitespace().collect::<Vec<_>>() != ["0", &files.to_string()]
        {
            return Err(format!(
                "the sandbox's checkout is not the commit's: {said} {}",
                String::from_utf8_lossy(&named.stderr)
            )
            .into());
        }
    }
    for (image, _) in driver
        .list_snapshots(&[("dev.backshift.project", project.as_str())])
        .await?
    {
        let _ = driver.remove_snapshot(&image).await;
    }
    let c = median(&mut clone);
    println!(
        "{:<52} {:>10}   {:<32} {:>7}",
        "measure", "p50", "baseline p50", "ratio"
    );
    for (what, values) in [
        (
            "checkout copied into a sandbox (small repositories)",
            &mut copied,
        ),
        ("checkout image, first time (whole tree)", &mut whole),
        (
            "checkout image, next commit (a layer of changes)",
            &mut layer,
        ),
        ("sandbox on the checkout image, branch named", &mut sandbox),
    ] {
        let o = median(values);
        println!(
            "{:<52} {:>10}   {:<32} {:>6.2}x",
            what,
            format!("{o:.0} ms"),
            format!("git clone --no-local {c:.0} ms"),
            o / c
        );
    }
    println!(
        "mirror: first fetch {first_fetch:.0} ms, incremental fetch (nothing new) {incremental:.0} ms"
    );
    Ok(())
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
