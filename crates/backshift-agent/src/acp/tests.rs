use super::*;
use serde_json::json;

fn emitted(actions: &[Action]) -> Vec<&EventKind> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Emit(e) => Some(e),
            _ => None,
        })
        .collect()
}

/// Updates as OpenCode 1.18 sends them for a `write` then a `bash` call.
fn opencode_turn() -> Vec<Value> {
    vec![
        json!({"sessionUpdate": "tool_call", "toolCallId": "c1", "title": "write", "kind": "edit", "status": "pending", "locations": [], "rawInput": {}}),
        json!({"sessionUpdate": "tool_call_update", "toolCallId": "c1", "status": "in_progress", "kind": "edit", "title": "write", "locations": [{"path": "/workspace/hello.txt"}], "rawInput": {"filePath": "/workspace/hello.txt", "content": "hi\n"}}),
        json!({"sessionUpdate": "tool_call_update", "toolCallId": "c1", "status": "completed", "title": "hello.txt", "content": [{"type": "content", "content": {"type": "text", "text": "Wrote file successfully."}}], "rawOutput": {"output": "Wrote file successfully.", "metadata": {"exists": false}}}),
        json!({"sessionUpdate": "tool_call", "toolCallId": "c2", "title": "bash", "kind": "execute", "status": "pending", "locations": [{"path": "/workspace"}], "rawInput": {"cwd": "/workspace"}}),
        json!({"sessionUpdate": "tool_call_update", "toolCallId": "c2", "status": "in_progress", "kind": "execute", "title": "cat hello.txt; echo ran", "rawInput": {"command": "cat hello.txt; echo ran", "cwd": "/workspace"}}),
        json!({"sessionUpdate": "tool_call_update", "toolCallId": "c2", "status": "in_progress", "kind": "execute", "title": "cat hello.txt; echo ran", "content": [{"type": "content", "content": {"type": "text", "text": "hi\n"}}]}),
        json!({"sessionUpdate": "tool_call_update", "toolCallId": "c2", "status": "in_progress", "kind": "execute", "title": "cat hello.txt; echo ran", "content": [{"type": "content", "content": {"type": "text", "text": "hi\nran\n"}}]}),
        json!({"sessionUpdate": "tool_call_update", "toolCallId": "c2", "status": "completed", "title": "cat hello.txt; echo ran", "content": [{"type": "content", "content": {"type": "text", "text": "hi\nran\n"}}], "rawOutput": {"output": "hi\nran\n", "metadata": {"exit": 0}}}),
        json!({"sessionUpdate": "agent_message_chunk", "messageId": "m1", "content": {"type": "text", "text": "All "}}),
        json!({"sessionUpdate": "agent_message_chunk", "messageId": "m1", "content": {"type": "text", "text": "done."}}),
    ]
}

#[test]
fn an_opencode_turn_becomes_normalized_events() {
    let mut m = Mapper::new();
    let mut actions = Vec::new();
    for u in opencode_turn() {
        actions.extend(m.update(&u));
    }
    actions.extend(m.flush().into_iter().map(Action::Emit));
    let started = actions
        .iter()
        .filter(|a| **a == Action::ToolStarted)
        .count();
    let finished = actions
        .iter()
        .filter(|a| **a == Action::ToolFinished)
        .count();
    assert_eq!((started, finished), (2, 2));
    let events = emitted(&actions);
    let names: Vec<&str> = events.iter().map(|e| e.type_name()).collect();
    assert_eq!(
        names,
        [
            "tool_call",
            "tool_result",
            "tool_call",
            "command_output",
            "command_output",
            "tool_result",
            "agent_message"
        ]
    );
    // The write is announced with its input, under the tool's own name.
    match events[0] {
        EventKind::ToolCall {
            call_id,
            name,
            arguments,
            kind,
            ..
        } => {
            assert_eq!(call_id, "c1");
            assert_eq!(name, "write");
            assert_eq!(kind.as_deref(), Some("edit"));
            assert_eq!(arguments["filePath"], "/workspace/hello.txt");
        }
        other => panic!("{other:?}"),
    }
    match events[2] {
        EventKind::ToolCall { name, title, .. } => {
            assert_eq!(name, "bash");
            assert_eq!(title.as_deref(), Some("cat hello.txt; echo ran"));
        }
        other => panic!("{other:?}"),
    }
    // Growing output is streamed as its new part only.
    match (events[3], events[4]) {
        (EventKind::CommandOutput { text: a, .. }, EventKind::CommandOutput { text: b, .. }) => {
            assert_eq!((a.as_str(), b.as_str()), ("hi\n", "ran\n"))
        }
        other => panic!("{other:?}"),
    }
    match events[5] {
        EventKind::ToolResult {
            ok,
            exit_code,
            output,
            ..
        } => {
            assert!(ok);
            assert_eq!(*exit_code, Some(0));
            assert_eq!(output, "hi\nran\n");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        events[6],
        &EventKind::AgentMessage {
            text: "All done.".into()
        }
    );
    assert_eq!(m.last_message.as_deref(), Some("All done."));
}

#[test]
fn failed_commands_diffs_thoughts_and_plans() {
    let mut m = Mapper::new();
    let mut actions = Vec::new();
    for u in [
        json!({"sessionUpdate": "agent_thought_chunk", "content": {"type": "text", "text": "Need to "}}),
        json!({"sessionUpdate": "agent_thought_chunk", "content": {"type": "text", "text": "fix it."}}),
        json!({"sessionUpdate": "plan", "entries": [{"content": "fix", "status": "in_progress", "priority": "high"}]}),
        json!({"sessionUpdate": "tool_call", "toolCallId": "e", "title": "Edit a.txt", "kind": "edit", "status": "in_progress",
               "content": [{"type": "diff", "path": "/w/a.txt", "oldText": "one\ntwo\n", "newText": "one\n2\n"}]}),
        json!({"sessionUpdate": "tool_call_update", "toolCallId": "e", "status": "completed",
               "content": [{"type": "diff", "path": "/w/a.txt", "oldText": "one\ntwo\n", "newText": "one\n2\n"}]}),
        json!({"sessionUpdate": "tool_call", "toolCallId": "x", "title": "false", "kind": "execute", "status": "in_progress", "rawInput": {"command": "false"}}),
        json!({"sessionUpdate": "tool_call_update", "toolCallId": "x", "status": "completed", "rawOutput": {"output": "", "metadata": {"exit": 1}}}),
        json!({"sessionUpdate": "tool_call_update", "toolCallId": "x", "status": "completed"}),
        json!({"sessionUpdate": "available_commands_update", "availableCommands": []}),
    ] {
        actions.extend(m.update(&u));
    }
    let events = emitted(&actions);
    let names: Vec<&str> = events.iter().map(|e| e.type_name()).collect();
    assert_eq!(
        names,
        [
            "agent_thought",
            "plan",
            "tool_call",
            "file_diff",
            "tool_result",
            "tool_call",
            "tool_result"
        ],
        "a finished call reports once"
    );
    assert_eq!(
        events[0],
        &EventKind::AgentThought {
            text: "Need to fix it.".into()
        }
    );
    match events[3] {
        EventKind::FileDiff { path, diff, .. } => {
            assert_eq!(path, "/w/a.txt");
            assert!(diff.contains("-two\n+2\n"), "{diff}");
        }
        other => panic!("{other:?}"),
    }
    match events[6] {
        EventKind::ToolResult { ok, exit_code, .. } => {
            assert!(!ok, "exit 1 is a failure");
            assert_eq!(*exit_code, Some(1));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn stderr_tail_keeps_the_end() {
    let mut t = Tail::default();
    for i in 0..2000 {
        t.push(&format!("line {i}"));
    }
    let text = t.text();
    assert!(text.len() <= Tail::MAX);
    assert!(text.ends_with("line 1999\n"));
}

#[test]
fn a_codex_command_reports_its_output_and_exit_code_at_the_end() {
    let mut m = Mapper::new();
    let mut actions = Vec::new();
    for u in [
        json!({"sessionUpdate": "tool_call", "toolCallId": "call_1", "title": "printf 'hi' > hello.txt && cat hello.txt",
               "kind": "execute", "status": "in_progress",
               "rawInput": {"command": ["/bin/bash", "-lc", "printf 'hi' > hello.txt && cat hello.txt"], "cwd": "/w"}}),
        json!({"sessionUpdate": "tool_call_update", "toolCallId": "call_1", "status": "completed",
               "rawOutput": {"stdout": "hi", "stderr": "", "aggregated_output": "hi", "exit_code": 0,
                             "formatted_output": "hi"}}),
        json!({"sessionUpdate": "usage_update", "used": 10, "size": 100}),
    ] {
        actions.extend(m.update(&u));
    }
    let events = emitted(&actions);
    let names: Vec<&str> = events.iter().map(|e| e.type_name()).collect();
    assert_eq!(names, ["tool_call", "command_output", "tool_result"]);
    match events[0] {
        EventKind::ToolCall { name, title, .. } => {
            assert_eq!(name, "execute", "a described call is named by its kind");
            assert!(title.as_deref().unwrap().starts_with("printf"));
        }
        other => panic!("{other:?}"),
    }
    match events[2] {
        EventKind::ToolResult {
            ok,
            exit_code,
            output,
            ..
        } => {
            assert!(ok);
            assert_eq!(*exit_code, Some(0));
            assert_eq!(output, "hi");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn claude_codes_pending_description_is_not_command_output() {
    let mut m = Mapper::new();
    let mut actions = Vec::new();
    let meta = json!({"claudeCode": {"toolName": "Bash"}});
    for u in [
        json!({"_meta": meta, "toolCallId": "t1", "sessionUpdate": "tool_call", "rawInput": {}, "status": "pending", "title": "Terminal", "kind": "execute", "content": []}),
        json!({"_meta": meta, "toolCallId": "t1", "sessionUpdate": "tool_call", "rawInput": {"command": "echo ran-it", "description": "Say it"},
               "status": "pending", "title": "`echo ran-it`", "kind": "execute",
               "content": [{"type": "content", "content": {"type": "text", "text": "Say it"}}]}),
    ] {
        actions.extend(m.update(&u));
    }
    assert!(
        emitted(&actions).is_empty(),
        "nothing until it runs or asks"
    );
    // It asks permission: announced then, under its own name.
    let asked = m.asking(&json!({"toolCallId": "t1", "title": "`echo ran-it`", "kind": "execute"}));
    match emitted(&asked)[..] {
        [
            EventKind::ToolCall {
                name, arguments, ..
            },
        ] => {
            assert_eq!(name, "Bash");
            assert_eq!(arguments["command"], "echo ran-it");
        }
        ref other => panic!("{other:?}"),
    }
    let done = m.update(&json!({"_meta": meta, "toolCallId": "t1", "sessionUpdate": "tool_call_update", "status": "completed",
        "rawOutput": "ran-it", "content": [{"type": "content", "content": {"type": "text", "text": "ran-it"}}]}));
    let names: Vec<&str> = emitted(&done).iter().map(|e| e.type_name()).collect();
    assert_eq!(names, ["command_output", "tool_result"]);
    assert_eq!(
        emitted(&done)[0],
        &EventKind::CommandOutput {
            call_id: "t1".into(),
            stream: OutputStream::Stdout,
            text: "ran-it".into(),
            journal_seq: None
        }
    );
}

#[test]
fn a_call_first_heard_of_in_a_permission_request_is_announced_then() {
    let mut m = Mapper::new();
    let asked = m.asking(
        &json!({"toolCallId": "run_shell_command__call_1", "status": "pending",
        "title": "echo hi", "kind": "execute", "locations": []}),
    );
    match emitted(&asked)[..] {
        [
            EventKind::ToolCall {
                call_id,
                name,
                title,
                ..
            },
        ] => {
            assert_eq!(call_id, "run_shell_command__call_1");
            assert_eq!(name, "execute");
            assert_eq!(title.as_deref(), Some("echo hi"));
        }
        ref other => panic!("{other:?}"),
    }
    let done = m.update(
        &json!({"sessionUpdate": "tool_call_update", "toolCallId": "run_shell_command__call_1",
        "status": "completed", "content": [], "kind": "execute"}),
    );
    let names: Vec<&str> = emitted(&done).iter().map(|e| e.type_name()).collect();
    assert_eq!(names, ["tool_result"], "announced once");
}

#[test]
fn a_new_message_id_starts_a_new_message() {
    let mut m = Mapper::new();
    let mut actions = Vec::new();
    for (id, text) in [("a", "Warming "), ("a", "up."), ("b", "Done.")] {
        actions.extend(m.update(
            &json!({"sessionUpdate": "agent_message_chunk", "messageId": id,
            "content": {"type": "text", "text": text}}),
        ));
    }
    actions.extend(m.flush().into_iter().map(Action::Emit));
    let texts: Vec<&str> = emitted(&actions)
        .iter()
        .map(|e| match e {
            EventKind::AgentMessage { text } => text.as_str(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(texts, ["Warming up.", "Done."]);
    assert_eq!(m.last_message.as_deref(), Some("Done."));
}
