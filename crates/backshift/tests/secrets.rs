//! Secrets through the real server, CLI and a real sandbox: set from
//! stdin, granted to a project, seen by the task as its variable, and
//! then nowhere else: not in the database files (or anything else in the
//! data directory), the events, the task's logs, the server's log or any
//! API response.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::World;
use reqwest::Method;

const VALUE: &str = "tok-SUPER-s3cret-9431";

/// Every file under `dir` that contains `needle` (bytes), by path.
fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file()
                && let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_secret_reaches_its_sandbox_and_nothing_else() {
    // The server logs at debug (its own lines and its libraries': every
    // SQL statement, every request).
    let w = World::start_logging(None, "", "debug").await;
    // The project exists once a task ran on the repository.
    let (_, view) = w.run_task("First", &["--command", "true"]).await;
    let project = view["project_id"].as_str().unwrap().to_owned();

    let (code, out, err) = w
        .cli_with_stdin(&["secrets", "set", "DEPLOY_TOKEN"], &format!("{VALUE}\n"))
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("secret DEPLOY_TOKEN is set"), "{out}");
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w
        .cli(&[
            "secrets",
            "grant",
            "DEPLOY_TOKEN",
            &repo,
            "--as",
            "DEPLOY_TOKEN",
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, listed, _) = w.cli(&["secrets", "ls"]).await;
    assert_eq!(code, 0);
    assert!(
        listed.contains(&format!("granted to {project} as DEPLOY_TOKEN")),
        "{listed}"
    );

    // The task prints it, in several ways, and writes it into a file.
    let script = "echo \"token=$DEPLOY_TOKEN\"; printf '%s' \"$DEPLOY_TOKEN\" | base64; echo \"$DEPLOY_TOKEN\" >&2; echo \"$DEPLOY_TOKEN\" > leaked.txt; test -n \"$DEPLOY_TOKEN\"";
    let (task, view) = w.run_task("Print the token", &["--command", script]).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let attempt = format!("{task}-1");
    let evs = w.events(&attempt).await;
    let output = common::command_output(&evs);
    // The sandbox had the value (its base64 is not the value) ...
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(VALUE);
    assert!(output.contains(&b64), "the script saw the secret: {output}");
    // ... and the record has the marker instead.
    assert!(output.contains("token=[redacted:DEPLOY_TOKEN]"), "{output}");

    // Not in any API response.
    let token = w.token();
    let http = reqwest::Client::new();
    let mut paths = vec![
        "/api/v1/tasks".to_owned(),
        format!("/api/v1/tasks/{task}"),
        format!("/api/v1/attempts/{attempt}"),
        format!("/api/v1/attempts/{attempt}/events"),
        format!("/api/v1/attempts/{attempt}/diff"),
        "/api/v1/secrets".to_owned(),
        "/api/v1/projects".to_owned(),
        "/api/v1/audit".to_owned(),
        "/api/v1/approvals?state=all".to_owned(),
        "/openapi.json".to_owned(),
    ];
    paths.push(format!("/api/v1/attempts/{attempt}/events/stream"));
    for path in &paths {
        let mut req = http.get(format!("{}{path}", w.url)).bearer_auth(&token);
        if path.ends_with("/stream") {
            req = req.timeout(std::time::Duration::from_secs(2));
        }
        let body = match req.send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        assert!(!body.contains(VALUE), "{path} shows the secret: {body}");
    }
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(diff.contains("+[redacted:DEPLOY_TOKEN]"), "{diff}");
    // Not in the task's logs, nor in `show`.
    for args in [
        vec!["logs", task.as_str()],
        vec!["show", task.as_str(), "--json"],
        vec!["audit", "--jsonl"],
    ] {
        let (_, out, err) = w.cli(&args).await;
        assert!(
            !out.contains(VALUE) && !err.contains(VALUE),
            "{args:?}: {out}{err}"
        );
    }
    // Not in the server's log.
    let log = std::fs::read_to_string(w.dir.path().join("server.log")).unwrap_or_default();
    assert!(
        !log.is_empty(),
        "the server logged nothing: is its log captured?"
    );
    assert!(
        !log.contains(VALUE),
        "the server's log shows the secret: {log}"
    );
    // Not in the database (its files, the WAL included), nor anywhere else
    // in the data directory (the sandbox's shim journal went with it).
    let data = w.dir.path().join("data");
    let hits = files_containing(&data, VALUE.as_bytes());
    assert!(hits.is_empty(), "the value is stored in {hits:?}");
    // (Its base64, printed above, is there: redaction knows values, not
    // what a script makes of them.)

    // Bad input is refused with the reason and changes nothing.
    let (status, body) = w
        .api(
            Method::PUT,
            "/api/v1/secrets/SHORT",
            Some(serde_json::json!({"value": "abc"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = w
        .api(
            Method::PUT,
            &format!("/api/v1/projects/{project}/secrets/DEPLOY_TOKEN"),
            Some(serde_json::json!({"as": "OPENAI_API_KEY"})),
        )
        .await;
    assert_eq!(
        status, 400,
        "a sandbox's own variables cannot be replaced: {body}"
    );
    let (status, _) = w
        .api(
            Method::PUT,
            "/api/v1/projects/nope/secrets/DEPLOY_TOKEN",
            Some(serde_json::json!({"as": "X"})),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = w.api(Method::DELETE, "/api/v1/secrets/NOPE", None).await;
    assert_eq!(status, 404);

    // Revoked: the next sandbox lacks it.
    let (code, _, err) = w.cli(&["secrets", "revoke", "DEPLOY_TOKEN", &repo]).await;
    assert_eq!(code, 0, "{err}");
    let (task, view) = w
        .run_task(
            "Again",
            &["--command", "echo \"token=${DEPLOY_TOKEN:-none}\""],
        )
        .await;
    assert_eq!(view["state"], "succeeded");
    assert_eq!(
        common::command_output(&w.events(&format!("{task}-1")).await),
        "token=none\n"
    );
    // Rotation with nothing sealed under another key re-seals nothing.
    let (code, out, _) = w.cli(&["secrets", "rotate"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("0 secrets re-sealed"), "{out}");
    // Every change is audited, without the value.
    let (_, audit, _) = w.cli(&["audit"]).await;
    for action in [
        "secret.create",
        "secret.grant",
        "secret.revoke",
        "secret.rotate",
    ] {
        assert!(audit.contains(action), "{action}: {audit}");
    }
}
