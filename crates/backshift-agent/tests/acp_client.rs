//! The ACP client against a real shim (served from a temporary directory)
//! and a small ACP agent written in Python: what it reports becomes
//! events, a generation left over from a dead control plane is skipped,
//! and an agent that breaks off its turn is `agent_crashed`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use async_trait::async_trait;
use backshift_agent::{
    AcpLaunch, AcpResume, AgentOutcome, EventSink, Journal, PermissionPolicy, run_acp_agent,
};
use backshift_core::FailureReason;
use backshift_protocol::EventKind;
use backshift_shim::{ShimClient, SpawnRequest};
use serde_json::Value;
use std::sync::Mutex;
use std::time::Duration;

/// An ACP agent: answers `initialize` and `session/new`; on a prompt it
/// reports a message and a finished command, asks permission for
/// something, then ends its turn. With `BREAK=1` it prints garbage and
/// exits in the middle of the turn instead.
const AGENT: &str = r#"
import json, os, sys
def send(m):
    sys.stdout.write(json.dumps(m) + "\n"); sys.stdout.flush()
def update(u):
    send({"jsonrpc": "2.0", "method": "session/update", "params": {"sessionId": "s1", "update": u}})
for line in sys.stdin:
    m = json.loads(line)
    method, i = m.get("method"), m.get("id")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": i, "result": {"protocolVersion": 1, "agentCapabilities": {"loadSession": False}, "agentInfo": {"name": "mini", "version": "0.1"}}})
    elif method == "session/new":
        send({"jsonrpc": "2.0", "id": i, "result": {"sessionId": "s1"}})
    elif method == "session/prompt":
        update({"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": "Working on it."}})
        if os.environ.get("BREAK") == "1":
            print("panic: out of cheese", file=sys.stderr); sys.stderr.flush()
            sys.stdout.write("not json at all\n"); sys.stdout.flush()
            sys.exit(7)
        update({"sessionUpdate": "tool_call", "toolCallId": "c1", "title": "ls", "kind": "execute", "status": "in_progress", "rawInput": {"command": "ls"}})
        send({"jsonrpc": "2.0", "id": 100, "method": "session/request_permission", "params": {"sessionId": "s1",
              "toolCall": {"toolCallId": "c1", "title": "ls", "kind": "execute"},
              "options": [{"optionId": "yes", "kind": "allow_once", "name": "Allow"}, {"optionId": "no", "kind": "reject_once", "name": "Reject"}]}})
        answer = json.loads(sys.stdin.readline())
        chosen = answer["result"]["outcome"].get("optionId")
        update({"sessionUpdate": "tool_call_update", "toolCallId": "c1", "status": "completed",
                "rawOutput": {"output": "README.md\n", "metadata": {"exit": 0}}})
        update({"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": "Chose " + chosen + "."}})
        send({"jsonrpc": "2.0", "id": i, "result": {"stopReason": "end_turn"}})
"#;

#[derive(Default)]
struct Record(Mutex<Vec<EventKind>>);

#[async_trait]
impl EventSink for Record {
    async fn emit(&self, kind: EventKind) {
        self.0.lock().unwrap().push(kind);
    }
}

#[async_trait]
impl Journal for Record {
    async fn progressed(&self, _: &[Value]) -> Result<(), String> {
        Ok(())
    }
    async fn turn_ended(&self, _: u32, _: &[Value]) -> Result<(), String> {
        Ok(())
    }
}

async fn shim() -> (tempfile::TempDir, ShimClient) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    tokio::spawn(async move { backshift_shim::server::serve_commands(&path).await });
    let client = ShimClient::new(dir.path());
    client.wait_ready(Duration::from_secs(5)).await.unwrap();
    (dir, client)
}

fn launch(dir: &std::path::Path, env: Vec<(String, String)>) -> AcpLaunch {
    let script = dir.join("agent.py");
    std::fs::write(&script, AGENT).unwrap();
    AcpLaunch {
        agent: "mini".into(),
        argv: vec!["python3".into(), script.display().to_string()],
        env,
        path_prepend: Vec::new(),
        cwd: dir.display().to_string(),
        permissions: PermissionPolicy::Allow,
        max_tool_calls: 10,
    }
}

#[tokio::test]
async fn a_leftover_generation_is_stopped_and_skipped() {
    let (dir, shim) = shim().await;
    // A control plane died after starting generation 1 and before its
    // session opened.
    shim.spawn(SpawnRequest {
        id: "acp:1".into(),
        argv: vec!["sleep".into(), "60".into()],
        stdin_open: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let record = Record::default();
    let outcome = run_acp_agent(
        &shim,
        &launch(dir.path(), Vec::new()),
        "list the files",
        &record,
        &record,
        AcpResume {
            generation: 1,
            ..Default::default()
        },
    )
    .await;
    let events = record.0.lock().unwrap().clone();
    match &outcome {
        AgentOutcome::Finished { summary } => {
            assert!(summary.starts_with("Chose yes."), "{summary}")
        }
        other => panic!("{other:?}\n{events:#?}"),
    }
    let session = events
        .iter()
        .find_map(|e| match e {
            EventKind::AgentSession {
                process,
                agent_info,
                ..
            } => Some((process.clone(), agent_info.clone())),
            _ => None,
        })
        .unwrap();
    assert_eq!(session, ("acp:2".into(), Some("mini 0.1".into())));
    let status = shim.status().await.unwrap();
    assert!(
        !status.running.contains(&"acp:1".to_owned()),
        "{:?}",
        status.running
    );
    let types: Vec<&str> = events.iter().map(EventKind::type_name).collect();
    assert_eq!(
        types,
        [
            "agent_session",
            "agent_message",
            "tool_call",
            "permission_decision",
            "command_output",
            "tool_result",
            "agent_message",
            "agent_finished"
        ]
    );
}

#[tokio::test]
async fn an_agent_that_breaks_off_its_turn_is_agent_crashed_with_its_stderr() {
    let (dir, shim) = shim().await;
    let record = Record::default();
    let outcome = run_acp_agent(
        &shim,
        &launch(dir.path(), vec![("BREAK".into(), "1".into())]),
        "list the files",
        &record,
        &record,
        AcpResume::default(),
    )
    .await;
    match outcome {
        AgentOutcome::Stopped {
            reason: FailureReason::AgentCrashed,
            detail,
        } => {
            assert!(detail.contains("exited with code 7"), "{detail}");
            assert!(detail.contains("panic: out of cheese"), "{detail}");
            assert!(
                detail.contains("not json at all"),
                "stray stdout is kept: {detail}"
            );
        }
        other => panic!("{other:?}"),
    }
    // What it said before breaking off is on the record.
    let events = record.0.lock().unwrap().clone();
    assert!(events.contains(&EventKind::AgentMessage {
        text: "Working on it.".into()
    }));
}
