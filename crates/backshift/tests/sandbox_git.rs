//! The sandbox's own git endpoint, from inside a real sandbox: it pushes
//! its attempt's branch; a push anywhere else is refused as git reports
//! it and recorded; other refs are invisible; a wrong token or another
//! project's repository gets nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::World;
use serde_json::Value;

const SCRIPT: &str = r#"
git -c user.name=agent -c user.email=agent@example.invalid commit -q --allow-empty -m "work in progress"
git push backshift "HEAD:refs/heads/$BACKSHIFT_BRANCH" >/dev/null 2>&1; echo "own=$?"
git push backshift HEAD:refs/heads/main 2>&1 | grep -o 'remote rejected.*' ; echo "main=${PIPESTATUS[0]}"
git push backshift HEAD:refs/tags/v1 >/dev/null 2>&1; echo "tag=$?"
echo "refs=$(git ls-remote backshift | awk '{print $2}' | tr '\n' ' ')"
echo "stolen=$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer bsm_nope' "$BACKSHIFT_GIT_URL/info/refs?service=git-upload-pack")"
echo "elsewhere=$(git ls-remote http://127.0.0.1:47013/otherproject.git 2>&1 | grep -c 'not found')"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_pushes_its_own_branch_and_nothing_else() {
    let w = World::start(None, "").await;
    // Another attempt's branch exists in the store: it must stay hidden.
    let (first, _) = w
        .run_task("First", &["--command", "echo one > one.txt"])
        .await;
    let (task, view) = w.run_task("Push", &["--command", SCRIPT]).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let attempt = format!("{task}-1");
    let branch = view["attempts"][0]["branch"].as_str().unwrap().to_owned();
    let evs = w.events(&attempt).await;
    let out = common::command_output(&evs);
    assert!(out.contains("own=0"), "{out}");
    assert!(
        out.contains("remote rejected] HEAD -> main (backshift: only this attempt's branch)"),
        "{out}"
    );
    assert!(out.contains("main=1"), "{out}");
    assert!(out.contains("tag=1"), "{out}");
    assert!(
        out.contains(&format!("refs=refs/heads/{branch} ")),
        "only its own branch is visible: {out}"
    );
    let (_, first_view) = w
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/tasks/{first}"),
            None,
        )
        .await;
    let other = first_view["attempts"][0]["branch"].as_str().unwrap();
    assert!(!out.contains(other), "{out}");
    assert!(out.contains("stolen=401"), "{out}");
    assert!(out.contains("elsewhere=1"), "{out}");

    let pushes: Vec<&Value> = evs.iter().filter(|e| e["type"] == "git_push").collect();
    assert_eq!(pushes.len(), 3, "{pushes:?}");
    assert_eq!(pushes[0]["decision"], "accepted");
    assert_eq!(pushes[0]["refs"][0], format!("refs/heads/{branch}"));
    assert_eq!(pushes[1]["decision"], "refused");
    assert_eq!(pushes[1]["refs"][0], "refs/heads/main");
    assert!(
        pushes[1]["reason"]
            .as_str()
            .unwrap()
            .contains("may push only its own branch")
    );
    assert_eq!(pushes[2]["refs"][0], "refs/tags/v1");
    let (_, audit, _) = w.cli(&["audit"]).await;
    assert!(
        audit.contains(&format!("sandbox:{attempt}  git.push.refused")),
        "{audit}"
    );
    // The refused refs were not written to the store; the branch was.
    let project = view["project_id"].as_str().unwrap();
    let url = w
        .url
        .replace("http://", &format!("http://x:{}@", w.token()));
    let refs = common::sh(&w.repo, &format!("git ls-remote {url}/git/{project}.git")).await;
    assert!(
        !refs.contains("refs/heads/main") && !refs.contains("refs/tags/v1"),
        "{refs}"
    );
    assert!(refs.contains(&format!("refs/heads/{branch}")), "{refs}");
    let (_, logs, _) = w.cli(&["logs", &task]).await;
    assert!(
        logs.contains("⇡ git push refs/heads/main: refused"),
        "{logs}"
    );
}
