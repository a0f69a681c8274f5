//! The command agent: a given bash script is the whole agent (batch jobs,
//! codemods, the same image run with different inputs). It runs in the
//! checkout through the shim, with the task's prompt in
//! `BACKSHIFT_PROMPT`, under the same lifecycle as any agent: its output
//! is streamed as events, a restarted control plane follows the run
//! already under way, and exit 0 means done (its changes are published).
//! After a failed verification it runs again (iteration N: call
//! `command:N`) with the report in `BACKSHIFT_VERIFY_REPORT`.

use crate::run::Replay;
use crate::tools::{CallKey, SandboxTools};
use crate::{AgentOutcome, EventSink, Journal};
use backshift_core::FailureReason;
use backshift_protocol::EventKind;
use serde_json::json;
use std::time::Instant;

/// The call id the command's events carry (in the first iteration).
pub const CALL_ID: &str = "command";

/// What the command agent runs.
#[derive(Debug, Clone)]
pub struct CommandRun<'a> {
    /// The script.
    pub script: &'a str,
    /// The task's prompt (`BACKSHIFT_PROMPT`).
    pub prompt: &'a str,
    /// Which time it runs, from 1 (`BACKSHIFT_ITERATION`).
    pub iteration: u32,
    /// What the last failed verification found
    /// (`BACKSHIFT_VERIFY_REPORT`).
    pub feedback: Option<&'a str>,
}

/// Runs `run.script` as the agent of a task, with `path` (installed
/// agents' commands) in front of its `PATH`.
pub async fn run_command_agent(
    tools: &SandboxTools,
    run: CommandRun<'_>,
    path: Vec<String>,
    sink: &dyn EventSink,
    journal: &dyn Journal,
    replay: &Replay,
) -> AgentOutcome {
    let CommandRun {
        script,
        prompt,
        iteration,
        feedback,
    } = run;
    let call_id = if iteration <= 1 {
        CALL_ID.to_owned()
    } else {
        format!("{CALL_ID}:{iteration}")
    };
    let call_id = call_id.as_str();
    let started = Instant::now();
    if !replay.announced.contains(call_id) {
        sink.emit(EventKind::ToolCall {
            call_id: call_id.into(),
            name: "command".into(),
            arguments: json!({ "command": script }),
            kind: Some("execute".into()),
            title: None,
        })
        .await;
    }
    let key = CallKey {
        turn: iteration.max(1),
        call_id: call_id.into(),
        output_recorded: replay.output_recorded.get(call_id).copied().unwrap_or(0),
    };
    let mut env = vec![
        ("BACKSHIFT_PROMPT".to_owned(), prompt.to_owned()),
        (
            "BACKSHIFT_ITERATION".to_owned(),
            iteration.max(1).to_string(),
        ),
    ];
    if let Some(report) = feedback {
        env.push(("BACKSHIFT_VERIFY_REPORT".to_owned(), report.to_owned()));
    }
    let run = tools.run_script(&key, script, env, path, sink).await;
    let exit = match run.exit {
        Ok(exit) => exit,
        Err(e) => {
            return AgentOutcome::Interrupted {
                detail: e.to_string(),
            };
        }
    };
    if !replay.reported.contains(call_id) {
        sink.emit(EventKind::ToolResult {
            call_id: call_id.into(),
            name: "command".into(),
            ok: exit.code == 0 && exit.error.is_none(),
            exit_code: Some(exit.code),
            output: run.for_model.clone(),
            duration_ms: started.elapsed().as_millis() as u64,
        })
        .await;
    }
    if let Some(error) = exit.error {
        return AgentOutcome::Stopped {
            reason: FailureReason::AgentCrashed,
            detail: format!("the command agent's script could not be started: {error}"),
        };
    }
    if exit.code != 0 {
        let tail = run.stderr_tail.trim();
        let said = if tail.is_empty() {
            "it wrote nothing to stderr".to_owned()
        } else {
            format!("the end of its stderr:\n{tail}")
        };
        return AgentOutcome::Stopped {
            reason: FailureReason::AgentCrashed,
            detail: format!(
                "the command agent's script exited {}; nothing is published. Fix the script (or the repository) and submit the task again; {said}",
                exit.code
            ),
        };
    }
    // The finished tree is checkpointed like a turn's end.
    if let Err(detail) = journal.turn_ended(iteration.max(1), &[]).await {
        return AgentOutcome::Interrupted { detail };
    }
    let subject = prompt
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or(prompt);
    let summary = format!(
        "{}\n\nMade by backshift's command agent, which ran:\n\n    {}\n",
        subject.trim(),
        script.trim().replace('\n', "\n    ")
    );
    if !replay.finished {
        sink.emit(EventKind::AgentFinished {
            summary: summary.clone(),
        })
        .await;
    }
    AgentOutcome::Finished { summary }
}
