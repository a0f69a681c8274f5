//! Checkout images: with `[sandbox] checkout_image_files = 1` every
//! repository counts as large, so each attempt's checkout comes in an
//! image layer made from the mirror: the whole tree the first time, a
//! layer of what changed for a later commit, nothing for the same commit
//! again (and going back to an older commit needs no new objects). The
//! agent sees exactly the checkout it would have got copied in: its own
//! branch, the commit's files, a clean `git status`, history; what it
//! commits comes back as its branch. A setup image under it keeps the
//! setup's ignored files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{ProjectImages, World, docker, sh};
use serde_json::Value;

/// What the agent sees of its checkout, then a change of its own.
const LOOK: &str = "echo \"branch=$(git branch --show-current)\"; \
    echo \"commits=$(git rev-list --count HEAD)\"; \
    echo \"readme=$(cat README.md)\"; \
    ls src; \
    echo \"status=[$(git status --porcelain | tr '\\n' ' ')]\"; \
    ls -a | grep -c deps-installed || true; \
    echo made-by-agent > agent.txt";

fn progress(evs: &[Value]) -> String {
    evs.iter()
        .filter(|e| e["type"] == "progress")
        .filter_map(|e| e["message"].as_str())
        .map(|m| format!("{m}\n"))
        .collect()
}

async fn run(w: &World, prompt: &str, extra: &[&str]) -> (Value, String, String) {
    let mut args = vec!["--command", LOOK];
    args.extend_from_slice(extra);
    let (task, view) = w.run_task(prompt, &args).await;
    let evs = w.events(&format!("{task}-1")).await;
    assert_eq!(view["state"], "succeeded", "{view}\n{evs:#?}");
    (view, common::command_output(&evs), progress(&evs))
}

fn checkout_images(project: &str) -> Vec<String> {
    docker(&[
        "images",
        "--format",
        "{{.Repository}}:{{.Tag}}",
        "--filter",
        "label=dev.backshift.kind=checkout",
        "--filter",
        &format!("label=dev.backshift.project={project}"),
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_repositorys_checkout_comes_in_an_image_layer_made_once_per_commit() {
    let w = World::start(None, "[sandbox]\ncheckout_image_files = 1\n").await;
    sh(
        &w.repo,
        "printf 'gone\\n' > src/old.py && git add . && git commit -qm second",
    )
    .await;

    // The first time: the whole tree, from the mirror.
    let (view, out, said) = run(&w, "First", &[]).await;
    let project = view["project_id"].as_str().unwrap().to_owned();
    let _images = ProjectImages(project.clone());
    let branch = view["attempts"][0]["branch"].as_str().unwrap().to_owned();
    assert!(
        said.contains("the checkout comes in an image layer"),
        "{said}"
    );
    assert!(
        said.contains("made in") && said.contains("from the mirror"),
        "{said}"
    );
    assert!(
        said.contains("the sandbox's image backshift-checkout:"),
        "{said}"
    );
    assert!(out.contains(&format!("branch={branch}")), "{out}");
    assert!(out.contains("commits=2"), "{out}");
    assert!(out.contains("readme=# Demo"), "{out}");
    assert!(out.contains("app.py\nold.py"), "{out}");
    // Nothing looks changed but what the agent did.
    assert!(out.contains("status=[]"), "{out}");
    let (code, diff, _) = w.cli(&["diff", view["id"].as_str().unwrap()]).await;
    assert_eq!(code, 0);
    assert!(diff.contains("+made-by-agent"), "{diff}");
    assert_eq!(checkout_images(&project).len(), 1);

    // The same commit again: nothing to make.
    let (_, out, said) = run(&w, "Again", &[]).await;
    assert!(said.contains("made before"), "{said}");
    assert!(out.contains("status=[]"), "{out}");

    // A new commit: a layer of what changed.
    sh(
        &w.repo,
        "printf '# Demo, changed\\n' > README.md && git rm -q src/old.py && printf 'y = 2\\n' > src/new.py && git add . && git commit -qm third",
    )
    .await;
    let second = sh(&w.repo, "git rev-parse HEAD~1").await;
    let (_, out, said) = run(&w, "Third", &[]).await;
    assert!(
        said.contains(&format!(
            "a layer of what changed since {}",
            &second.trim()[..12]
        )),
        "{said}"
    );
    assert!(out.contains("commits=3"), "{out}");
    assert!(out.contains("readme=# Demo, changed"), "{out}");
    assert!(out.contains("app.py\nnew.py\n"), "{out}");
    assert!(!out.contains("old.py"), "{out}");
    assert!(out.contains("status=[]"), "{out}");
    assert_eq!(checkout_images(&project).len(), 2);

    // Back to the older commit: its objects are in the layer already.
    let (_, out, said) = run(&w, "Older", &["--base", second.trim()]).await;
    assert!(said.contains("made before"), "{said}");
    assert!(out.contains("commits=2") && out.contains("old.py"), "{out}");
    let first = sh(&w.repo, "git rev-parse HEAD~2").await;
    let (_, out, said) = run(&w, "Oldest", &["--base", first.trim()]).await;
    assert!(said.contains("a layer of what changed since"), "{said}");
    assert!(out.contains("commits=1"), "{out}");
    assert!(!out.contains("old.py") && !out.contains("new.py"), "{out}");
    assert!(out.contains("status=[]"), "{out}");
    // At most three kept.
    assert_eq!(
        checkout_images(&project).len(),
        3,
        "{:?}",
        checkout_images(&project)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_image_on_a_setup_image_keeps_what_setup_installed() {
    on_a_setup_image(true).await;
}

/// The same with the checkout copied in (a small repository): the setup
/// image's old checkout goes, its ignored files stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_copied_onto_a_setup_image_keeps_what_setup_installed() {
    on_a_setup_image(false).await;
}

async fn on_a_setup_image(layered: bool) {
    let files = if layered { 1 } else { 0 };
    let mut w = World::start(
        None,
        &format!("[sandbox]\ncheckout_image_files = {files}\n"),
    )
    .await;
    let image = backshift_sandbox::image::default_image_tag();
    std::fs::write(w.repo.join(".gitignore"), ".deps-installed\n").unwrap();
    std::fs::write(
        w.repo.join(".devcontainer.json"),
        format!("{{ \"image\": \"{image}\", \"postCreateCommand\": \"touch .deps-installed\" }}"),
    )
    .unwrap();
    sh(&w.repo, "git add . && git commit -qm devcontainer").await;
    let (view, out, said) = run(&w, "Setup", &[]).await;
    let project = view["project_id"].as_str().unwrap().to_owned();
    let _images = ProjectImages(project.clone());
    assert!(said.contains("setup saved as"), "{said}");
    assert!(out.contains("status=[]"), "{out}");
    // The setup image is no attempt's: a restart's sweep of what no
    // attempt owns leaves it, and it names none.
    w.stop_server().await;
    w.restart_server().await;
    let setup = docker(&[
        "images",
        "--format",
        "{{.Repository}}:{{.Tag}}",
        "--filter",
        "label=dev.backshift.kind=setup",
        "--filter",
        &format!("label=dev.backshift.project={project}"),
    ]);
    assert!(!setup.is_empty(), "the setup image is gone");
    let labels = docker(&[
        "inspect",
        "--format",
        "{{json .Config.Labels}}",
        setup.trim(),
    ]);
    let labels: Value = serde_json::from_str(&labels).unwrap();
    for key in [
        "dev.backshift.attempt",
        "dev.backshift.task",
        "dev.backshift.instance",
    ] {
        assert_eq!(
            labels.get(key).and_then(Value::as_str).unwrap_or(""),
            "",
            "{labels}"
        );
    }
    assert!(
        out.lines().any(|l| l.trim() == "1"),
        "the setup's ignored file is there: {out}\n{said}"
    );

    // A new commit: the setup image is the base; its ignored files stay.
    sh(
        &w.repo,
        "printf '# Demo 2\\n' > README.md && git commit -qam next",
    )
    .await;
    let (_, out, said) = run(&w, "Next", &[]).await;
    assert!(said.contains("setup skipped"), "{said}");
    assert_eq!(said.contains("from the mirror"), layered, "{said}");
    assert!(out.contains("readme=# Demo 2"), "{out}");
    assert!(out.contains("status=[]"), "{out}");
    assert!(
        out.lines().any(|l| l.trim() == "1"),
        "the setup's ignored file is there: {out}"
    );
}
