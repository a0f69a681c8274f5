//! Real agents from npm speaking ACP inside Docker sandboxes, against the
//! scripted model through the gateway: OpenCode makes a scripted edit and
//! runs a command; its updates become our normalized events; a permission
//! request is answered by the policy; an agent that dies early ends the
//! attempt `agent_crashed` with its stderr.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::World;
use reqwest::Method;
use serde_json::{Value, json};

/// OpenCode writes a file, then (asking permission first) runs a command
/// that reads it, then says what it did. Its title request (no tools) gets
/// the untooled reply.
fn opencode_script() -> fake_model::Script {
    common::script(json!({
        "untooled": {"content": "Greeting file"},
        "steps": [
            {"expect": {"user_contains": "greeting", "tools_include": ["bash", "write", "edit", "read"]},
             "reply": {"content": "I will write the file.",
                       "tool_calls": [{"name": "write", "arguments": {"filePath": "/workspace/hello.txt", "content": "hello from opencode\n"}}]}},
            {"expect": {"tool_results": [{"contains": "Wrote file"}]},
             "reply": {"tool_calls": [{"name": "bash", "arguments": {"command": "cat hello.txt && echo ran-it", "description": "Show the file"}}]}},
            {"expect": {"tool_results": [{"contains": "ran-it"}]},
             "reply": {"content": "Wrote hello.txt and checked it with cat."}}
        ]
    }))
}

fn of_type<'a>(evs: &'a [Value], t: &str) -> Vec<&'a Value> {
    evs.iter().filter(|e| e["type"] == t).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opencode_edits_and_runs_a_command_through_the_gateway() {
    let agents = testkit::agents_dir(&["opencode"]);
    let w = World::start(
        Some(opencode_script()),
        &format!(
            "agents_dir = \"{}\"\n[agents]\npermission_policy = \"allow\"\nask = [\"bash\"]\n",
            agents.display()
        ),
    )
    .await;
    let (task, view) = w
        .run_task(
            "Write a greeting file and check it",
            &["--agent", "opencode"],
        )
        .await;
    let attempt = format!("{task}-1");
    let evs = w.events(&attempt).await;
    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    assert_eq!(view["state"], "succeeded", "{view}\n{evs:#?}");
    assert_eq!(view["agent"], "opencode");

    // The session, announced once.
    let sessions = of_type(&evs, "agent_session");
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["agent"], "opencode");
    assert_eq!(sessions[0]["loaded"], false);
    assert!(
        sessions[0]["agent_info"]
            .as_str()
            .unwrap()
            .starts_with("OpenCode "),
        "{}",
        sessions[0]
    );

    // Its tool calls, normalized: name, kind, input, result.
    let calls = of_type(&evs, "tool_call");
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0]["name"], "write");
    assert_eq!(calls[0]["kind"], "edit");
    assert_eq!(calls[0]["arguments"]["filePath"], "/workspace/hello.txt");
    assert_eq!(calls[1]["name"], "bash");
    assert_eq!(calls[1]["kind"], "execute");
    assert_eq!(calls[1]["title"], "cat hello.txt && echo ran-it");
    let results = of_type(&evs, "tool_result");
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(results.iter().all(|r| r["ok"] == true), "{results:?}");
    assert_eq!(results[1]["exit_code"], 0);
    assert_eq!(
        common::command_output(&evs),
        "hello from opencode\nran-it\n"
    );

    // The bash call asked first; the policy allowed it, on the record,
    // before the command ran.
    let decisions = of_type(&evs, "permission_decision");
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert_eq!(decisions[0]["decision"], "allow_once");
    assert_eq!(decisions[0]["by"], "policy");
    assert_eq!(decisions[0]["call_id"], calls[1]["call_id"]);
    let pos = |e: &Value| evs.iter().position(|x| x == e).unwrap();
    assert!(pos(decisions[0]) < pos(results[1]));

    // Its messages, joined from their chunks; the last is the summary.
    let messages: Vec<&str> = of_type(&evs, "agent_message")
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert!(messages.contains(&"I will write the file."), "{messages:?}");
    assert_eq!(
        messages.last(),
        Some(&"Wrote hello.txt and checked it with cat.")
    );
    let summary = view["attempts"][0]["summary"].as_str().unwrap();
    assert!(summary.starts_with("Wrote hello.txt"), "{summary}");

    // Every model call went through the gateway, which added the real key
    // and counted the tokens.
    let model_calls = of_type(&evs, "model_call");
    assert!(model_calls.len() >= 4, "title + 3 turns: {model_calls:?}");
    assert!(
        fake.authorizations()
            .iter()
            .all(|a| a.as_deref() == Some(&format!("Bearer {}", common::PROVIDER_KEY))),
        "{:?}",
        fake.authorizations()
    );
    let (_, attempt_view) = w
        .api(Method::GET, &format!("/api/v1/attempts/{attempt}"), None)
        .await;
    assert!(
        attempt_view["usage"]["calls"].as_u64().unwrap() >= 4,
        "{attempt_view}"
    );

    // No event carries the provider's key.
    let all = serde_json::to_string(&evs).unwrap();
    assert!(!all.contains(common::PROVIDER_KEY));

    // The change is on the branch; the log reads as a story.
    let (code, diff, _) = w.cli(&["diff", &task]).await;
    assert_eq!(code, 0);
    assert!(diff.contains("+hello from opencode"), "{diff}");
    let (code, logs, _) = w.cli(&["logs", &task]).await;
    assert_eq!(code, 0);
    for want in [
        "opencode (OpenCode",
        "→ write [edit] /workspace/hello.txt",
        "→ bash [execute] cat hello.txt && echo ran-it",
        "? permission for cat hello.txt && echo ran-it: allow_once by policy",
        "| ran-it",
        "» Wrote hello.txt and checked it with cat.",
    ] {
        assert!(logs.contains(want), "missing {want:?} in:\n{logs}");
    }
}

/// An "opencode" that dies at once: a script in a test agents directory.
fn crashing_agents_dir(dir: &std::path::Path) -> std::path::PathBuf {
    let agents = dir.join("agents");
    let version = agents.join("opencode/0.0.0-crash");
    let bin = version.join("node_modules/.bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = bin.join("opencode");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'starting up' >&2\necho 'fatal: cannot open the session database: disk I/O error' >&2\nexit 2\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        version.join("backshift-agent.json"),
        json!({"name": "opencode", "package": "opencode-ai", "version": "0.0.0-crash",
               "node": null, "bin": "opencode", "installed_at": 1})
        .to_string(),
    )
    .unwrap();
    std::fs::write(agents.join("opencode/current"), "0.0.0-crash\n").unwrap();
    agents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_dies_early_ends_agent_crashed_with_its_stderr() {
    let scratch = tempfile::tempdir().unwrap();
    let agents = crashing_agents_dir(scratch.path());
    let w = World::start(
        Some(common::script(json!({"steps": []}))),
        &format!("agents_dir = \"{}\"\n", agents.display()),
    )
    .await;
    let (_, view) = w.run_task("Anything", &["--agent", "opencode"]).await;
    let attempt = &view["attempts"][0];
    assert_eq!(attempt["state"], "failed", "{view}");
    assert_eq!(attempt["reason"], "agent_crashed", "{view}");
    let detail = attempt["detail"].as_str().unwrap();
    assert!(
        detail.contains("exited with code 2")
            && detail.contains("fatal: cannot open the session database"),
        "{detail}"
    );
}

/// Submits a task for `agent` through the API, which must refuse it
/// with 400; the error.
async fn refused(w: &World, agent: &str) -> Value {
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, body) = w
        .api(
            Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "x", "repo": repo, "agent": agent})),
        )
        .await;
    assert_eq!(code, 400, "{body}");
    body["error"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_that_cannot_run_are_refused_at_submission() {
    let scratch = tempfile::tempdir().unwrap();
    let empty = scratch.path().join("agents");
    std::fs::create_dir_all(&empty).unwrap();
    let w = World::start(
        Some(common::script(json!({"steps": []}))),
        &format!("agents_dir = \"{}\"\n", empty.display()),
    )
    .await;
    let error = refused(&w, "opencode").await;
    assert_eq!(error["code"], "agent_unavailable", "{error}");
    let hint = error["hint"].as_str().unwrap();
    assert!(
        hint.contains("backshift agents install opencode"),
        "{error}"
    );
    let error = refused(&w, "emacs").await;
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("opencode, claude-code, codex, gemini"),
        "{error}"
    );

    // Installed, but the model API it speaks has no endpoint.
    let agents = testkit::agents_dir(&["claude-code"]);
    let w = World::start(
        Some(common::script(json!({"steps": []}))),
        &format!("agents_dir = \"{}\"\n", agents.display()),
    )
    .await;
    let error = refused(&w, "claude-code").await;
    assert_eq!(error["code"], "agent_unavailable", "{error}");
    assert!(
        error["hint"]
            .as_str()
            .unwrap()
            .contains("anthropic_base_url"),
        "{error}"
    );
    let (_, tasks) = w.api(Method::GET, "/api/v1/tasks", None).await;
    assert_eq!(
        tasks.as_array().map(Vec::len),
        Some(0),
        "nothing was created: {tasks}"
    );
}

/// A server whose agents are the tests' (OpenCode among them), its
/// model scripted by `script`.
async fn with_opencode(script: Value) -> World {
    let agents = testkit::agents_dir(&["opencode"]);
    World::start(
        Some(common::script(script)),
        &format!("agents_dir = \"{}\"\n", agents.display()),
    )
    .await
}

/// Submits a task for OpenCode without waiting: its task and attempt ids.
async fn submit_to_opencode(w: &World, prompt: &str) -> (String, String) {
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w
        .cli(&["run", prompt, "--repo", &repo, "--agent", "opencode"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let attempt = format!("{task}-1");
    (task, attempt)
}

/// Waits until the attempt has an event for which `ready` holds.
async fn wait_for(w: &World, attempt: &str, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    for _ in 0..600 {
        let evs = w.events(attempt).await;
        if ready(&evs) {
            return evs;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{attempt}: the awaited event did not come in 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denying_policy_rejects_what_the_agent_asks_and_it_carries_on() {
    let agents = testkit::agents_dir(&["opencode"]);
    let script = common::script(json!({
        "untooled": {"content": "Greeting file"},
        "steps": [
            {"reply": {"tool_calls": [{"name": "write", "arguments": {"filePath": "/workspace/hello.txt", "content": "hello\n"}}]}},
            {"reply": {"tool_calls": [{"name": "bash", "arguments": {"command": "echo ran-it > ran.txt", "description": "Run"}}]}},
            {"reply": {"content": "The command was not allowed; the file is written."}}
        ]
    }));
    let w = World::start(
        Some(script),
        &format!(
            "agents_dir = \"{}\"\n[agents]\npermission_policy = \"deny\"\nask = [\"bash\"]\n",
            agents.display()
        ),
    )
    .await;
    let (task, view) = w
        .run_task("Write a greeting file", &["--agent", "opencode"])
        .await;
    let evs = w.events(&format!("{task}-1")).await;
    assert_eq!(view["state"], "succeeded", "{view}\n{evs:#?}");
    let decisions = of_type(&evs, "permission_decision");
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert_eq!(decisions[0]["decision"], "reject_once");
    let bash = of_type(&evs, "tool_result")
        .into_iter()
        .find(|r| r["name"] == "bash")
        .cloned()
        .unwrap();
    assert_eq!(bash["ok"], false, "{bash}");
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(diff.contains("+hello"), "{diff}");
    assert!(
        !diff.contains("ran.txt"),
        "the rejected command ran: {diff}"
    );
}

/// The attempt's pending approval, once the attempt waits for it.
async fn pending_approval(w: &World, attempt: &str) -> Value {
    for _ in 0..600 {
        let (_, list) = w.api(Method::GET, "/api/v1/approvals", None).await;
        let (_, view) = w
            .api(Method::GET, &format!("/api/v1/attempts/{attempt}"), None)
            .await;
        if let Some(a) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["attempt_id"] == attempt)
            && view["state"] == "waiting_approval"
        {
            return a.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("{attempt}: no pending approval in 60 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_asking_policy_puts_the_agents_permission_requests_to_a_person() {
    let agents = testkit::agents_dir(&["opencode"]);
    let script = common::script(json!({
        "untooled": {"content": "Two commands"},
        "steps": [
            {"reply": {"tool_calls": [{"name": "bash", "arguments": {"command": "echo one > first.txt", "description": "First"}}]}},
            {"reply": {"tool_calls": [{"name": "bash", "arguments": {"command": "echo two > second.txt", "description": "Second"}}]}},
            {"reply": {"content": "The first command ran; the second was refused."}}
        ]
    }));
    let w = World::start(
        Some(script),
        &format!(
            "agents_dir = \"{}\"\n[agents]\npermission_policy = \"ask\"\nask = [\"bash\"]\n",
            agents.display()
        ),
    )
    .await;
    let (task, attempt) = submit_to_opencode(&w, "Run two commands").await;
    // The agent waits for a person; the request is in the approvals.
    let first = pending_approval(&w, &attempt).await;
    assert_eq!(first["kind"], "permission", "{first}");
    assert_eq!(first["summary"], "execute: echo one > first.txt", "{first}");
    assert_eq!(first["subject"]["tool_kind"], "execute");
    let id = first["id"].as_str().unwrap();
    let (code, out, err) = w.cli(&["approve", id]).await;
    assert_eq!(code, 0, "{out}{err}");
    // The second is denied, with a reason the agent hears.
    let second = loop {
        let a = pending_approval(&w, &attempt).await;
        if a["id"] != first["id"] {
            break a;
        }
    };
    assert_eq!(second["summary"], "execute: echo two > second.txt");
    let (code, out, err) = w
        .cli(&[
            "deny",
            second["id"].as_str().unwrap(),
            "--reason",
            "one is enough",
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let view = w.wait(&task).await;
    let evs = w.events(&attempt).await;
    assert_eq!(view["state"], "succeeded", "{view}\n{evs:#?}");
    let decisions = of_type(&evs, "permission_decision");
    assert_eq!(decisions.len(), 2, "{decisions:?}");
    assert_eq!(decisions[0]["decision"], "allow_once");
    assert_ne!(decisions[0]["by"], "policy");
    assert_eq!(decisions[1]["decision"], "reject_once");
    assert!(
        decisions[1]["reason"]
            .as_str()
            .unwrap()
            .contains("one is enough"),
        "{}",
        decisions[1]
    );
    // The approval events sit before the decisions, and the attempt went
    // to waiting_approval and back for each.
    assert_eq!(of_type(&evs, "approval_requested").len(), 2);
    let waits = evs
        .iter()
        .filter(|e| e["type"] == "state_changed" && e["to"] == "waiting_approval")
        .count();
    assert_eq!(waits, 2);
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(diff.contains("first.txt"), "{diff}");
    assert!(
        !diff.contains("second.txt"),
        "the denied command ran: {diff}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_asks_the_agent_to_stop_its_turn() {
    let w = with_opencode(json!({
        "untooled": {"content": "Slow work"},
        "steps": [
            {"reply": {"tool_calls": [{"name": "write", "arguments": {"filePath": "/workspace/a.txt", "content": "a\n"}}]}},
            {"reply": {"delay_ms": 60000, "content": "too late"}}
        ]
    })).await;
    let (task, attempt) = submit_to_opencode(&w, "Slow work").await;
    wait_for(&w, &attempt, |evs| {
        evs.iter().any(|e| e["type"] == "checkpoint")
    })
    .await;
    let (code, out, err) = w.cli(&["cancel", &task]).await;
    assert_eq!(code, 0, "{out}{err}");
    let view = w.wait(&task).await;
    assert_eq!(view["state"], "cancelled", "{view}");
    let evs = w.events(&attempt).await;
    let said: Vec<&str> = of_type(&evs, "progress")
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert!(
        said.contains(&"asked opencode to cancel its turn (session/cancel); it stopped"),
        "{said:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_reopens_the_agents_session_and_it_finishes() {
    // By conversation state: the reopened session asks again from where
    // its history stands.
    let mut w = with_opencode(json!({
        "mode": "turn",
        "untooled": {"content": "Two files"},
        "steps": [
            {"reply": {"tool_calls": [{"name": "write", "arguments": {"filePath": "/workspace/one.txt", "content": "one\n"}}]}},
            {"reply": {"delay_ms": 4000, "tool_calls": [{"name": "write", "arguments": {"filePath": "/workspace/two.txt", "content": "two\n"}}]}},
            {"reply": {"content": "Both files are written."}},
            {"reply": {"content": "Both files are written."}}
        ]
    }))
    .await;
    let (task, attempt) = submit_to_opencode(&w, "Write two files").await;
    // The first file is written and checkpointed; the model is slow with
    // the second.
    wait_for(&w, &attempt, |evs| {
        evs.iter().any(|e| e["type"] == "checkpoint")
    })
    .await;
    w.kill_server().await;
    w.restart_server().await;
    let view = w.wait(&task).await;
    let evs = w.events(&attempt).await;
    assert_eq!(view["state"], "succeeded", "{view}\n{evs:#?}");
    let sessions = of_type(&evs, "agent_session");
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert_eq!(sessions[1]["loaded"], true, "{sessions:?}");
    assert_eq!(sessions[1]["process"], "acp:2");
    assert_eq!(sessions[0]["session_id"], sessions[1]["session_id"]);
    let restored = of_type(&evs, "restored");
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0]["adopted"], true, "{restored:?}");
    // The reopened session was told what happened.
    let fake = w.fake.as_ref().unwrap();
    assert!(
        fake.requests()
            .iter()
            .any(|r| r.to_string().contains("This session was interrupted")),
        "no request carried the resume note"
    );
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(diff.contains("+one") && diff.contains("+two"), "{diff}");
}

/// A task for `agent` whose scripted model has it run `command` with its
/// shell tool (`tool`, its arguments built by `args`), then end its turn.
async fn agent_runs_a_command(
    agent: &str,
    tool: &str,
    args: Value,
    config: &str,
) -> (World, String, Value, Vec<Value>) {
    let script = common::script(json!({
        "untooled": {"content": "Greeting file"},
        "steps": [
            {"expect": {"user_contains": "greeting", "tools_include": [tool]},
             "reply": {"tool_calls": [{"name": tool, "arguments": args}]}},
            {"expect": {"tool_results": [{"contains": "ran-it"}]},
             "reply": {"content": "Wrote hello.txt and showed it."}}
        ]
    }));
    let w = World::start(Some(script), config).await;
    let (task, view) = w
        .run_task("Write a greeting file and show it", &["--agent", agent])
        .await;
    let evs = w.events(&format!("{task}-1")).await;
    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    assert_eq!(view["state"], "succeeded", "{view}\n{evs:#?}");
    assert_eq!(view["agent"], agent);
    let sessions = of_type(&evs, "agent_session");
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let calls = of_type(&evs, "tool_call");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["kind"], "execute");
    let results = of_type(&evs, "tool_result");
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["ok"], true, "{results:?}");
    assert!(
        common::command_output(&evs).contains("ran-it"),
        "{}",
        common::command_output(&evs)
    );
    let summary = view["attempts"][0]["summary"].as_str().unwrap();
    let (_, logs, _) = w.cli(&["logs", &task]).await;
    assert!(summary.starts_with("Wrote hello.txt"), "{summary}\n{logs}");
    let all = serde_json::to_string(&evs).unwrap();
    assert!(!all.contains(common::PROVIDER_KEY));
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(diff.contains(&format!("+hello from {agent}")), "{diff}");
    (w, task, view, evs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_runs_a_command_through_the_gateways_responses_api() {
    let agents = testkit::agents_dir(&["codex"]);
    let (w, task, _, evs) = agent_runs_a_command(
        "codex",
        "exec_command",
        json!({"cmd": "printf 'hello from codex\\n' > hello.txt && cat hello.txt && echo ran-it"}),
        &format!("agents_dir = \"{}\"\n", agents.display()),
    )
    .await;
    let sessions = of_type(&evs, "agent_session");
    assert!(
        sessions[0]["agent_info"]
            .as_str()
            .unwrap()
            .contains("codex"),
        "{sessions:?}"
    );
    let calls = of_type(&evs, "model_call");
    assert!(!calls.is_empty());
    assert!(calls.iter().all(|c| c["api"] == "responses"), "{calls:?}");
    let results = of_type(&evs, "tool_result");
    assert_eq!(results[0]["exit_code"], 0);
    let (_, logs, _) = w.cli(&["logs", &task]).await;
    assert!(logs.contains("→ execute printf"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_runs_a_command_through_the_gateways_messages_api() {
    let agents = testkit::agents_dir(&["claude-code"]);
    let config = format!(
        "agents_dir = \"{}\"\n[model]\nbase_url = \"{{fake_url}}\"\nmodel = \"scripted\"\napi_key_env = \"{env}\"\nanthropic_base_url = \"{{fake_url}}\"\nanthropic_model = \"scripted-claude\"\nanthropic_api_key_env = \"{env}\"\n",
        agents.display(),
        env = common::PROVIDER_KEY_ENV
    );
    let (w, _, _, evs) = agent_runs_a_command(
        "claude-code",
        "Bash",
        json!({"command": "printf 'hello from claude-code\\n' > hello.txt && cat hello.txt && echo ran-it", "description": "Write the file"}),
        &config,
    )
    .await;
    let calls = of_type(&evs, "tool_call");
    assert_eq!(calls[0]["name"], "Bash");
    // Claude Code asks before running a command; the policy allowed it.
    let decisions = of_type(&evs, "permission_decision");
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    assert!(
        decisions[0]["decision"]
            .as_str()
            .unwrap()
            .starts_with("allow"),
        "{decisions:?}"
    );
    let model_calls = of_type(&evs, "model_call");
    assert!(
        model_calls
            .iter()
            .all(|c| c["api"] == "messages" && c["model"] == "scripted-claude"),
        "{model_calls:?}"
    );
    let x_api_key = format!("x-api-key {}", common::PROVIDER_KEY);
    assert!(
        w.fake
            .as_ref()
            .unwrap()
            .authorizations()
            .iter()
            .all(|a| a.as_deref() == Some(x_api_key.as_str())),
        "the gateway speaks to Anthropic with the real key, as x-api-key"
    );
}

/// Run by the agent itself, while it and every installed agent are
/// there: the provider key searched for in the environment, every
/// process's arguments and environment, and every file. The needle is
/// assembled at run time so that it appears in no command line; the
/// sandbox's own token is searched the same way as a control.
const LEAK_SEARCH: &str = r#"needle="$(printf '%s%s' 'sk-provider-' 'SECRET-4242')"
leaks=""
env | grep -qF "$needle" && leaks="$leaks env"
for p in /proc/[0-9]*; do tr '\0' '\n' < "$p/cmdline"; echo; tr '\0' '\n' < "$p/environ"; echo; done > /tmp/procs.txt 2>/dev/null
grep -qF "$needle" /tmp/procs.txt && leaks="$leaks processes"
files=$(grep -rlIF "$needle" / --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev 2>/dev/null)
[ -n "$files" ] && leaks="$leaks files:$files"
grep -qF "$OPENAI_API_KEY" /tmp/procs.txt && echo "control:found"
echo "leaks:[$leaks]"; echo ran-it"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_key_is_nowhere_in_an_agents_sandbox() {
    let agents = testkit::agents_dir(&["opencode", "codex", "claude-code"]);
    let script = common::script(json!({
        "untooled": {"content": "Leak search"},
        "steps": [
            {"reply": {"tool_calls": [{"name": "bash", "arguments": {"command": LEAK_SEARCH, "description": "Search"}}]}},
            {"expect": {"tool_results": [{"contains": "ran-it"}]}, "reply": {"content": "Searched."}}
        ]
    }));
    let w = World::start(
        Some(script),
        &format!("agents_dir = \"{}\"\n", agents.display()),
    )
    .await;
    let (task, view) = w
        .run_task("Search for the key", &["--agent", "opencode"])
        .await;
    let evs = w.events(&format!("{task}-1")).await;
    let output = common::command_output(&evs);
    assert_eq!(view["state"], "succeeded", "{view}\n{output}");
    assert!(output.contains("control:found"), "{output}");
    assert!(output.contains("leaks:[]"), "{output}");
    let all = serde_json::to_string(&evs).unwrap();
    assert!(!all.contains(common::PROVIDER_KEY));
    // Yet the model was called with it, by the gateway.
    assert!(
        w.fake
            .as_ref()
            .unwrap()
            .authorizations()
            .iter()
            .all(|a| a.as_deref() == Some(&format!("Bearer {}", common::PROVIDER_KEY)))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_runs_a_command_through_the_gateways_gemini_api() {
    let agents = testkit::agents_dir(&["gemini"]);
    let script = common::script(json!({
        "steps": [
            {"expect": {"user_contains": "greeting", "tools_include": ["run_shell_command", "write_file"]},
             "reply": {"tool_calls": [{"name": "run_shell_command", "arguments": {"command": "printf 'hello from gemini\\n' > hello.txt && cat hello.txt", "description": "Write the file"}}]}},
            // What the command printed reached the model. (Only its
            // first line is asserted: under load Gemini CLI's shell tool
            // once returned the output without its last line.)
            {"expect": {"tool_results": [{"contains": "hello from gemini"}]},
             "reply": {"content": "Wrote hello.txt and showed it."}}
        ]
    }));
    let config = format!(
        "agents_dir = \"{}\"\n[model]\nbase_url = \"{{fake_url}}\"\nmodel = \"scripted\"\napi_key_env = \"{env}\"\ngemini_base_url = \"{{fake_root}}\"\ngemini_model = \"scripted-gemini\"\ngemini_api_key_env = \"{env}\"\n",
        agents.display(),
        env = common::PROVIDER_KEY_ENV
    );
    let w = World::start(Some(script), &config).await;
    let (task, view) = w
        .run_task("Write a greeting file and show it", &["--agent", "gemini"])
        .await;
    let evs = w.events(&format!("{task}-1")).await;
    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    assert_eq!(view["state"], "succeeded", "{view}\n{evs:#?}");
    let calls = of_type(&evs, "tool_call");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["kind"], "execute");
    assert!(
        calls[0]["title"].as_str().unwrap().starts_with("printf"),
        "{calls:?}"
    );
    // Gemini CLI asks before running a command; the policy allowed it.
    let decisions = of_type(&evs, "permission_decision");
    assert_eq!(decisions.len(), 1, "{decisions:?}");
    let pos = |e: &Value| evs.iter().position(|x| x == e).unwrap();
    assert!(pos(calls[0]) < pos(decisions[0]));
    let results = of_type(&evs, "tool_result");
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["ok"], true);
    let model_calls = of_type(&evs, "model_call");
    assert!(
        model_calls
            .iter()
            .all(|c| c["api"] == "gemini.generate_content" && c["model"] == "scripted-gemini"),
        "{model_calls:?}"
    );
    let key = format!("x-goog-api-key {}", common::PROVIDER_KEY);
    assert!(
        fake.authorizations()
            .iter()
            .all(|a| a.as_deref() == Some(key.as_str())),
        "{:?}",
        fake.authorizations()
    );
    let summary = view["attempts"][0]["summary"].as_str().unwrap();
    assert!(summary.starts_with("Wrote hello.txt"), "{summary}");
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(diff.contains("+hello from gemini"), "{diff}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_sandbox_is_rebuilt_and_the_agent_goes_on_from_the_checkpoint() {
    let agents = testkit::agents_dir(&["opencode"]);
    // By conversation state: the rebuilt sandbox's agent is asked for
    // what comes next from where its history stands.
    let script = common::script(json!({
        "mode": "turn",
        "untooled": {"content": "Two files"},
        "steps": [
            {"reply": {"tool_calls": [{"name": "write", "arguments": {"filePath": "/workspace/one.txt", "content": "one\n"}}]}},
            {"reply": {"delay_ms": 3000, "tool_calls": [{"name": "write", "arguments": {"filePath": "/workspace/two.txt", "content": "two\n"}}]}},
            {"reply": {"content": "Both files are written."}},
            {"reply": {"content": "Both files are written."}}
        ]
    }));
    let w = World::start(
        Some(script),
        &format!(
            "agents_dir = \"{}\"\n[sandbox]\nsnapshot_every_secs = 0\n",
            agents.display()
        ),
    )
    .await;
    let (task, attempt) = submit_to_opencode(&w, "Write two files").await;
    wait_for(&w, &attempt, |evs| {
        evs.iter().any(|e| e["type"] == "checkpoint")
    })
    .await;
    let ids = testkit::docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=dev.backshift.attempt={attempt}"),
    ])
    .unwrap();
    let id = ids.split_whitespace().next().unwrap().to_owned();
    testkit::docker(&["kill", &id]).unwrap();
    let view = w.wait(&task).await;
    let evs = w.events(&attempt).await;
    assert_eq!(view["state"], "succeeded", "{view}\n{evs:#?}");
    let restored = of_type(&evs, "restored");
    assert_eq!(restored.len(), 1, "{restored:?}");
    assert_eq!(restored[0]["adopted"], false);
    let sessions = of_type(&evs, "agent_session");
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    // The snapshot taken at the checkpoint kept the agent's own state.
    assert_eq!(sessions[1]["loaded"], true, "{sessions:?}");
    assert_eq!(sessions[1]["process"], "acp:2");
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(diff.contains("+one") && diff.contains("+two"), "{diff}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_over_its_tool_call_limit_is_cancelled_and_fails_max_turns() {
    let w = with_opencode(json!({
        "untooled": {"content": "Many files"},
        "steps": [
            {"reply": {"tool_calls": [{"name": "write", "arguments": {"filePath": "/workspace/a.txt", "content": "a\n"}}]}},
            {"reply": {"tool_calls": [{"name": "write", "arguments": {"filePath": "/workspace/b.txt", "content": "b\n"}}]}},
            {"reply": {"delay_ms": 5000, "content": "Done."}}
        ]
    })).await;
    let (task, view) = w
        .run_task("Write files", &["--agent", "opencode", "--max-turns", "1"])
        .await;
    let attempt = &view["attempts"][0];
    assert_eq!(attempt["state"], "failed", "{view}");
    assert_eq!(attempt["reason"], "max_turns", "{view}");
    assert!(
        attempt["detail"]
            .as_str()
            .unwrap()
            .contains("more than 1 tool calls"),
        "{view}"
    );
    let evs = w.events(&format!("{task}-1")).await;
    assert_eq!(of_type(&evs, "agent_finished").len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_over_its_token_budget_is_stopped_budget_exhausted() {
    let w = with_opencode(json!({
        "untooled": {"content": "Budget"},
        "steps": [
            {"reply": {"tool_calls": [{"name": "write", "arguments": {"filePath": "/workspace/a.txt", "content": "a\n"}}]}},
            {"reply": {"content": "never reached"}}
        ]
    })).await;
    // OpenCode's first real request alone is several thousand tokens.
    let (task, view) = w
        .run_task(
            "Write a file",
            &["--agent", "opencode", "--max-tokens", "3000"],
        )
        .await;
    let attempt = &view["attempts"][0];
    assert_eq!(attempt["state"], "failed", "{view}");
    assert_eq!(attempt["reason"], "budget_exhausted", "{view}");
    let evs = w.events(&format!("{task}-1")).await;
    let refused: Vec<&Value> = of_type(&evs, "model_call")
        .into_iter()
        .filter(|c| c["status"] == 429)
        .collect();
    assert!(!refused.is_empty(), "the gateway refused a call");
    assert_eq!(
        w.fake.as_ref().unwrap().remaining(),
        1,
        "the call over budget never reached the model"
    );
    assert_eq!(of_type(&evs, "agent_finished").len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_verification_reopens_the_agents_session_with_the_report() {
    let w = with_opencode(json!({
        "untooled": {"content": "State file"},
        "steps": [
            {"expect": {"user_contains": "Write the state"},
             "reply": {"tool_calls": [{"name": "write", "arguments": {"filePath": "/workspace/state.txt", "content": "one\n"}}]}},
            {"reply": {"content": "Wrote it."}},
            {"expect": {"user_contains": "Verification 1 of 2 failed"},
             "reply": {"tool_calls": [{"name": "write", "arguments": {"filePath": "/workspace/state.txt", "content": "two\n"}}]}},
            {"reply": {"content": "Now it says two."}}
        ]
    }))
    .await;
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w
        .cli(&[
            "run",
            "Write the state file",
            "--repo",
            &repo,
            "--agent",
            "opencode",
            "--verify",
            "grep -qx two state.txt || { echo \"state.txt says $(cat state.txt)\"; exit 1; }",
            "--max-iterations",
            "2",
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let view = w.wait(&task).await;
    let evs = w.events(&format!("{task}-1")).await;
    let fake = w.fake.as_ref().unwrap();
    assert!(fake.failures().is_empty(), "{:?}", fake.failures());
    assert_eq!(view["state"], "succeeded", "{view}\n{evs:#?}");
    let verifications = of_type(&evs, "verification");
    assert_eq!(verifications.len(), 2);
    assert_eq!(verifications[0]["passed"], false);
    assert!(
        verifications[0]["output_tail"]
            .as_str()
            .unwrap()
            .contains("state.txt says one")
    );
    assert_eq!(verifications[1]["passed"], true);
    // The same session, reopened by a new process, was told the report.
    let sessions = of_type(&evs, "agent_session");
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    assert_eq!(sessions[1]["process"], "acp:2");
    assert_eq!(sessions[1]["loaded"], true, "{sessions:?}");
    assert_eq!(sessions[0]["session_id"], sessions[1]["session_id"]);
    assert!(
        !fake
            .requests()
            .iter()
            .any(|r| r.to_string().contains("This session was interrupted")),
        "an iteration is not an interruption"
    );
    let (_, diff, _) = w.cli(&["diff", &task]).await;
    assert!(diff.contains("+two"), "{diff}");
}
