use super::*;

async fn sh(dir: &Path, script: &str) -> String {
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t.invalid")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn upstream(dir: &Path) -> PathBuf {
    let up = dir.join("upstream");
    std::fs::create_dir_all(&up).unwrap();
    sh(&up, "git init -q -b main && echo one > a.txt && git add . && git commit -qm one && echo two >> a.txt && git commit -qam two").await;
    up
}

#[tokio::test]
async fn a_branch_goes_out_as_a_checkout_and_comes_back_as_a_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream(dir.path()).await;
    let store = GitStore::new(dir.path().join("store"));
    let base = store
        .fetch_source("p1", up.to_str().unwrap(), None, "refs/backshift/base/a-1")
        .await
        .unwrap();
    assert_eq!(base, sh(&up, "git rev-parse HEAD").await);

    let work = dir.path().join("work");
    store
        .export_checkout(
            "p1",
            "refs/backshift/base/a-1",
            &base,
            "backshift/a-x",
            &work,
        )
        .await
        .unwrap();
    assert_eq!(
        sh(&work, "git branch --show-current").await,
        "backshift/a-x"
    );
    assert_eq!(
        sh(&work, "git log --format=%s | wc -l").await,
        "2",
        "history is kept"
    );
    assert_eq!(
        sh(&work, "git remote | wc -l").await,
        "0",
        "no remote leaks the host path"
    );

    sh(&work, "echo new > b.txt && git add . && git commit -qm agent && git bundle create ../b.bundle backshift/a-x ^HEAD~1").await;
    let head = store
        .import_bundle("p1", &dir.path().join("b.bundle"), "backshift/a-x")
        .await
        .unwrap();
    assert_eq!(head, sh(&work, "git rev-parse HEAD").await);
    let stat = store.diff_stat("p1", &base, &head).await.unwrap();
    assert_eq!(
        (stat.files_changed, stat.insertions, stat.deletions),
        (1, 1, 0)
    );
    assert!(
        store
            .diff("p1", &base, &head)
            .await
            .unwrap()
            .contains("+new")
    );
}

#[tokio::test]
async fn base_refs_can_be_branches_or_commits() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream(dir.path()).await;
    let first = sh(&up, "git rev-parse HEAD~1").await;
    let store = GitStore::new(dir.path().join("store"));
    let got = store
        .fetch_source(
            "p1",
            up.to_str().unwrap(),
            Some(&first),
            "refs/backshift/base/x",
        )
        .await
        .unwrap();
    assert_eq!(got, first);
    let got = store
        .fetch_source(
            "p1",
            up.to_str().unwrap(),
            Some("main"),
            "refs/backshift/base/y",
        )
        .await
        .unwrap();
    assert_eq!(got, sh(&up, "git rev-parse main").await);
}

#[tokio::test]
async fn local_repos_are_validated_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream(dir.path()).await;
    assert!(validate_local_repo(&up, None).await.is_ok());
    assert!(validate_local_repo(&up, Some("main")).await.is_ok());
    let e = validate_local_repo(&up, Some("nope")).await.unwrap_err();
    assert!(e.contains("nope is not a branch"), "{e}");
    let e = validate_local_repo(&dir.path().join("missing"), None)
        .await
        .unwrap_err();
    assert!(e.contains("does not exist"), "{e}");
    let e = validate_local_repo(dir.path(), None).await.unwrap_err();
    assert!(e.contains("not a git repository"), "{e}");
}

#[test]
fn urls_are_told_from_paths() {
    assert!(is_url("https://example.invalid/r.git"));
    assert!(is_url("git@example.invalid:o/r.git"));
    assert!(!is_url("/home/me/repo"));
    assert!(!is_url("./repo"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_survives_killed_and_concurrent_git_processes() {
    let dir = tempfile::tempdir().unwrap();
    let up = upstream(dir.path()).await;
    let store = GitStore::new(dir.path().join("store"));

    // Ten attempts of one project creating its repository at once.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let store = store.clone();
        let up = up.clone();
        tasks.push(tokio::spawn(async move {
            store
                .fetch_source(
                    "p",
                    up.to_str().unwrap(),
                    None,
                    &format!("refs/backshift/base/a-{i}"),
                )
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }

    // A repository half-made by a killed `git init` is made again.
    let half = store.repo_path("q");
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("HEAD"), "ref: refs/heads/main\n").unwrap();
    store
        .fetch_source("q", up.to_str().unwrap(), None, "refs/backshift/base/q-1")
        .await
        .unwrap();

    // A ref lock left by a killed fetch does not block the attempt's next
    // update of that ref.
    let repo = store.repo_path("p");
    let base = store
        .fetch_source("p", up.to_str().unwrap(), None, "refs/backshift/base/a-0")
        .await
        .unwrap();
    std::fs::create_dir_all(repo.join("refs/heads/backshift")).unwrap();
    std::fs::write(repo.join("refs/heads/backshift/x.lock"), "").unwrap();
    store.set_branch("p", "backshift/x", &base).await.unwrap();
    std::fs::write(repo.join("refs/backshift/base/a-0.lock"), "").unwrap();
    store
        .fetch_source("p", up.to_str().unwrap(), None, "refs/backshift/base/a-0")
        .await
        .unwrap();
}

#[tokio::test]
async fn protected_paths_come_back_as_the_base_had_them() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("w");
    std::fs::create_dir_all(&work).unwrap();
    sh(&work, "git init -q -b main && mkdir tests && echo runner > run.sh && echo t1 > tests/t1 && echo code > app && git add . && git commit -qm base").await;
    let base = sh(&work, "git rev-parse HEAD").await;
    // Unprotected work stays; the runner edited, a test deleted and one
    // added under a protected directory are all undone.
    sh(&work, "echo 'exit 0' > run.sh && rm tests/t1 && echo fake > tests/t2 && echo new > app && git add -A && git commit -qm agent").await;
    let changed = restore_paths(
        &work,
        &base,
        &["run.sh".into(), "tests".into(), "missing".into()],
    )
    .await
    .unwrap();
    assert_eq!(changed, ["run.sh", "tests/t1", "tests/t2"]);
    assert_eq!(sh(&work, "cat run.sh").await, "runner");
    assert_eq!(sh(&work, "ls tests").await, "t1");
    assert_eq!(sh(&work, "cat app").await, "new");
    // Nothing changed: nothing to do.
    assert!(
        restore_paths(&work, &base, &["app2".into()])
            .await
            .unwrap()
            .is_empty()
    );
}
