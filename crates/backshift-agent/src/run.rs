//! The loop: ask the model, run the tools it calls, feed the results back,
//! until it calls `finish` or a limit ends it.

use crate::model::{ModelClient, ModelFailure, elapsed_ms};
use crate::tools::{CallKey, SandboxTools};
use crate::{EventSink, Journal};
use async_trait::async_trait;
use backshift_core::FailureReason;
use backshift_protocol::{EventKind, ToolCallRecord};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// How the agent's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentOutcome {
    /// It called `finish` (or stopped talking after a reminder).
    Finished {
        /// Its summary of the work.
        summary: String,
    },
    /// A limit or an error stopped it.
    Stopped {
        /// Machine-readable reason.
        reason: FailureReason,
        /// What happened and what to do.
        detail: String,
    },
    /// The journal could not keep the turn (the sandbox is gone): resume
    /// from the last checkpoint.
    Interrupted {
        /// What the journal said.
        detail: String,
    },
}

/// The conversation the agent starts from.
#[derive(Debug, Clone)]
pub struct Conversation {
    /// System prompt, task, and every turn so far.
    pub messages: Vec<Value>,
    /// Turns already taken.
    pub turns: u32,
    /// Model tokens already used (input and output).
    pub tokens_used: u64,
    /// What the event log already holds of the interrupted turn's calls.
    pub replay: Replay,
}

/// What the event log already holds of an interrupted turn's tool calls,
/// so that resuming it records nothing twice.
#[derive(Debug, Clone, Default)]
pub struct Replay {
    /// Calls whose `tool_call` event is recorded.
    pub announced: HashSet<String>,
    /// Calls whose `tool_result` event is recorded.
    pub reported: HashSet<String>,
    /// Per call: its command output up to this journal seq is recorded.
    pub output_recorded: HashMap<String, u64>,
    /// The `agent_finished` event is recorded.
    pub finished: bool,
}

impl Conversation {
    /// A new conversation about `prompt`.
    pub fn new(prompt: &str, workdir: &str) -> Conversation {
        Conversation {
            messages: vec![
                json!({"role": "system", "content": SYSTEM_PROMPT.replace("{workdir}", workdir)}),
                json!({"role": "user", "content": prompt}),
            ],
            turns: 0,
            tokens_used: 0,
            replay: Replay::default(),
        }
    }

    /// A conversation continued exactly where it was: the sandbox and
    /// what ran in it survived, so nothing needs saying. When the last
    /// message holds tool calls without results, the agent carries them
    /// out (a command already running is followed, not started again).
    pub fn continued(
        messages: Vec<Value>,
        turns: u32,
        tokens_used: u64,
        replay: Replay,
    ) -> Conversation {
        Conversation {
            messages,
            turns,
            tokens_used,
            replay,
        }
    }

    /// A conversation resumed from a checkpoint after `turns` turns, with a
    /// note telling the model what happened.
    pub fn resumed(
        mut messages: Vec<Value>,
        turns: u32,
        tokens_used: u64,
        why: &str,
    ) -> Conversation {
        messages.push(json!({"role": "user", "content": format!(
            "[backshift] This session was interrupted ({why}) and resumed from the checkpoint taken after your last completed step. The files are as they were then; anything started after it, including running commands and background processes, is gone. Continue with the task."
        )}));
        Conversation {
            messages,
            turns,
            tokens_used,
            replay: Replay::default(),
        }
    }

    /// A conversation taken up again after its sandbox was stopped and
    /// started again (a person paused the attempt): `messages` ends with a
    /// completed turn; the files are as the stop left them.
    pub fn after_stop(mut messages: Vec<Value>, turns: u32, tokens_used: u64) -> Conversation {
        messages.push(json!({"role": "user", "content":
            "[backshift] A person paused this task: the sandbox was stopped and has now been started again. The files are as they were when it stopped, including whatever a step that was cut short had changed; commands and background processes that were running then were ended. Continue with the task."
        }));
        Conversation {
            messages,
            turns,
            tokens_used,
            replay: Replay::default(),
        }
    }

    /// The messages up to the last completed turn: a last assistant
    /// message whose tool calls do not all have results is dropped with
    /// the results it has.
    pub fn completed_prefix(mut messages: Vec<Value>) -> Vec<Value> {
        let pending = pending_calls(&messages);
        if !pending.is_empty()
            && let Some(last) = messages
                .iter()
                .rposition(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
        {
            messages.truncate(last);
        }
        messages
    }
}

/// The tool calls of the conversation's last assistant message that have
/// no result yet.
fn pending_calls(messages: &[Value]) -> Vec<ToolCallRecord> {
    let Some(last) = messages
        .iter()
        .rposition(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
    else {
        return Vec::new();
    };
    let answered: HashSet<&str> = messages[last + 1..]
        .iter()
        .filter_map(|m| m.get("tool_call_id").and_then(Value::as_str))
        .collect();
    messages[last]
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let call_id = c.get("id")?.as_str()?.to_owned();
            let f = c.get("function")?;
            Some(ToolCallRecord {
                name: f.get("name")?.as_str()?.to_owned(),
                arguments: f
                    .get("arguments")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                call_id,
            })
        })
        .filter(|c| !answered.contains(c.call_id.as_str()))
        .collect()
}

/// The summary of a `finish` call in the conversation's last assistant
/// message that succeeded: the agent had finished when it was interrupted.
fn finished_summary(messages: &[Value]) -> Option<String> {
    let last = messages
        .iter()
        .rposition(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))?;
    let call = messages[last]
        .get("tool_calls")?
        .as_array()?
        .iter()
        .find(|c| c.pointer("/function/name").and_then(Value::as_str) == Some("finish"))?;
    let id = call.get("id")?.as_str()?;
    // Told something after it (a failed verification's report): not done.
    if messages[last + 1..]
        .iter()
        .any(|m| m.get("role").and_then(Value::as_str) == Some("user"))
    {
        return None;
    }
    let accepted = messages[last + 1..].iter().any(|m| {
        m.get("tool_call_id").and_then(Value::as_str) == Some(id)
            && m.get("content").and_then(Value::as_str) == Some("finished")
    });
    if !accepted {
        return None;
    }
    let args: Value = serde_json::from_str(call.pointer("/function/arguments")?.as_str()?).ok()?;
    Some(args.get("summary")?.as_str()?.trim().to_owned())
}

/// A sink that records nothing: for a call whose events the log has.
struct Silent;

#[async_trait]
impl EventSink for Silent {
    async fn emit(&self, _: EventKind) {}
}

/// Conversations larger than this have old tool output elided.
const CONTEXT_BUDGET_BYTES: usize = 400 * 1024;
/// The newest messages never elided.
const KEEP_RECENT: usize = 8;

const SYSTEM_PROMPT: &str = "You are backshift's coding agent, working unattended in an isolated \
sandbox on a git checkout of the user's repository (the current directory, {workdir}), on a branch \
of its own. Do the task with the tools: inspect the code, make focused changes, and run commands \
(tests, builds) to check them. Commands have no network access. Do not commit: backshift commits \
your changes when you finish. When the work is done, call `finish` with a short summary of what you \
changed and why; its first line becomes the commit subject.";

/// Runs the agent from `start` until it finishes, a limit stops it, or the
/// journal interrupts it; at most `max_turns` turns in all (counting those
/// before `start`).
pub async fn run_agent(
    model: &ModelClient,
    tools: &SandboxTools,
    sink: &dyn EventSink,
    journal: &dyn Journal,
    start: Conversation,
    max_turns: u32,
    max_tokens: Option<u64>,
) -> AgentOutcome {
    let definitions = SandboxTools::definitions();
    let mut messages = start.messages;
    let mut tokens_used = start.tokens_used;
    let replay = start.replay;
    let mut plain_replies = 0;
    // An interrupted turn whose calls were decided: carry them out first.
    let mut resumed_calls = pending_calls(&messages);
    // Interrupted after its `finish` was accepted: it is done.
    if resumed_calls.is_empty()
        && let Some(summary) = finished_summary(&messages)
    {
        if !replay.finished {
            sink.emit(EventKind::AgentFinished {
                summary: summary.clone(),
            })
            .await;
        }
        return AgentOutcome::Finished { summary };
    }
    for turn in start.turns + 1..=max_turns {
        let calls = if !resumed_calls.is_empty() {
            std::mem::take(&mut resumed_calls)
        } else {
            elide_old_output(&mut messages);
            let bytes: usize = messages.iter().map(|m| m.to_string().len()).sum();
            sink.emit(EventKind::ModelRequest {
                turn,
                messages: messages.len(),
                bytes,
            })
            .await;
            let started = Instant::now();
            let mut retries = Vec::new();
            let result = model
                .complete(&messages, &definitions, &mut |r| retries.push(r))
                .await;
            // Retries are reported after the fact, in order; the request's
            // latency includes their waits.
            for r in retries {
                sink.emit(EventKind::ModelRetry {
                    turn,
                    retry: r.retry,
                    error: r.error,
                    wait_ms: r.wait.as_millis() as u64,
                })
                .await;
            }
            let completion = match result {
                Ok(c) => c,
                Err(e @ ModelFailure::Unreachable { .. }) => {
                    return AgentOutcome::Stopped {
                        reason: FailureReason::ModelUnreachable,
                        detail: format!(
                            "{e}. Check that the model endpoint in the server config ([model] base_url) is up and reachable from the server."
                        ),
                    };
                }
                Err(e @ ModelFailure::Rejected { .. }) => {
                    return AgentOutcome::Stopped {
                        reason: FailureReason::ModelError,
                        detail: format!(
                            "{e}. Check the model name and API key in the server config ([model])."
                        ),
                    };
                }
            };
            sink.emit(EventKind::ModelResponse {
                turn,
                text: completion.text.clone(),
                tool_calls: completion.tool_calls.clone(),
                finish_reason: completion.finish_reason.clone(),
                usage: completion.usage,
                cost_usd: model
                    .prices()
                    .zip(completion.usage)
                    .map(|(p, u)| p.cost(&u)),
                latency_ms: elapsed_ms(started),
            })
            .await;

            if let Some(u) = &completion.usage {
                tokens_used += u.input_tokens + u.output_tokens;
            }
            if let Some(budget) = max_tokens
                && tokens_used >= budget
            {
                return AgentOutcome::Stopped {
                    reason: FailureReason::BudgetExhausted,
                    detail: format!(
                        "the agent used {tokens_used} model tokens of the {budget} allowed (limits.max_tokens) without finishing; retry with a larger budget or a narrower task"
                    ),
                };
            }

            let mut assistant = json!({"role": "assistant", "content": completion.text.clone().unwrap_or_default()});
            if !completion.tool_calls.is_empty() {
                assistant["tool_calls"] = Value::Array(
                completion
                    .tool_calls
                    .iter()
                    .map(|c| json!({"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                    .collect(),
            );
            }
            messages.push(assistant);

            if completion.tool_calls.is_empty() {
                let truncated = completion.finish_reason.as_deref() == Some("length");
                if truncated {
                    messages.push(json!({"role": "user", "content":
                    "Your reply was cut off at the output token limit. Continue with smaller steps: one tool call at a time, shorter file contents."}));
                    if let Err(detail) = journal.turn_ended(turn, &messages).await {
                        return AgentOutcome::Interrupted { detail };
                    }
                    continue;
                }
                plain_replies += 1;
                if plain_replies >= 2 {
                    let summary = completion
                        .text
                        .unwrap_or_else(|| "The agent stopped without a summary.".into());
                    sink.emit(EventKind::AgentFinished {
                        summary: summary.clone(),
                    })
                    .await;
                    return AgentOutcome::Finished { summary };
                }
                messages.push(json!({"role": "user", "content":
                "Use the tools to work on the task. If the task is complete, call `finish` with a summary."}));
                if let Err(detail) = journal.turn_ended(turn, &messages).await {
                    return AgentOutcome::Interrupted { detail };
                }
                continue;
            }
            plain_replies = 0;
            // The decided calls are kept before any runs: a restart carries
            // them out instead of asking the model again.
            if let Err(detail) = journal.progressed(&messages).await {
                return AgentOutcome::Interrupted { detail };
            }
            completion.tool_calls
        };

        let mut finished = None;
        for call in &calls {
            let started = Instant::now();
            let parsed: Result<Value, String> = if call.arguments.trim().is_empty() {
                Ok(json!({}))
            } else {
                serde_json::from_str::<Value>(&call.arguments)
                    .map_err(|e| e.to_string())
                    .and_then(|v| {
                        if v.is_object() {
                            Ok(v)
                        } else {
                            Err("arguments must be a JSON object".into())
                        }
                    })
            };
            let shown = parsed
                .clone()
                .unwrap_or_else(|_| json!({"raw": call.arguments}));
            // A call resumed after a restart: its events are not recorded
            // twice.
            let reported = replay.reported.contains(&call.call_id);
            let call_sink: &dyn EventSink = if reported { &Silent } else { sink };
            if !replay.announced.contains(&call.call_id) {
                call_sink
                    .emit(EventKind::ToolCall {
                        call_id: call.call_id.clone(),
                        name: call.name.clone(),
                        arguments: shown,
                        kind: None,
                        title: None,
                    })
                    .await;
            }
            let (ok, exit_code, output) = match (&parsed, call.name.as_str()) {
                (Err(e), _) => (
                    false,
                    None,
                    format!(
                        "error: the arguments are not valid JSON ({e}); send the call again with a valid JSON object"
                    ),
                ),
                (Ok(args), "finish") => {
                    let summary = args
                        .get("summary")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .trim()
                        .to_owned();
                    if summary.is_empty() {
                        (
                            false,
                            None,
                            "error: finish needs a non-empty `summary`".to_owned(),
                        )
                    } else {
                        finished = Some(summary);
                        (true, None, "finished".to_owned())
                    }
                }
                (Ok(args), name) => {
                    let key = CallKey {
                        turn,
                        call_id: call.call_id.clone(),
                        output_recorded: replay
                            .output_recorded
                            .get(&call.call_id)
                            .copied()
                            .unwrap_or(0),
                    };
                    let out = tools.call(&key, name, args, call_sink).await;
                    if let Some(detail) = out.lost {
                        return AgentOutcome::Interrupted { detail };
                    }
                    (out.ok, out.exit_code, out.output)
                }
            };
            call_sink
                .emit(EventKind::ToolResult {
                    call_id: call.call_id.clone(),
                    name: call.name.clone(),
                    ok,
                    exit_code,
                    output: output.clone(),
                    duration_ms: elapsed_ms(started),
                })
                .await;
            messages.push(json!({"role": "tool", "tool_call_id": call.call_id, "content": output}));
            if let Err(detail) = journal.progressed(&messages).await {
                return AgentOutcome::Interrupted { detail };
            }
        }
        // The turn is kept before it counts: an interrupted turn is taken
        // again from the previous checkpoint.
        if let Err(detail) = journal.turn_ended(turn, &messages).await {
            return AgentOutcome::Interrupted { detail };
        }
        if let Some(summary) = finished {
            sink.emit(EventKind::AgentFinished {
                summary: summary.clone(),
            })
            .await;
            return AgentOutcome::Finished { summary };
        }
    }
    AgentOutcome::Stopped {
        reason: FailureReason::MaxTurns,
        detail: format!(
            "the agent used all {max_turns} turns without finishing; retry with a larger limits.max_turns or a narrower task"
        ),
    }
}

/// Keeps the conversation under budget by replacing the content of old
/// tool results (the bulk of any conversation) with a note.
fn elide_old_output(messages: &mut [Value]) {
    let mut total: usize = messages.iter().map(|m| m.to_string().len()).sum();
    // First the old results; then, if the recent ones alone are too big,
    // all but the newest result.
    let newest_tool = messages
        .iter()
        .rposition(|m| m.get("role").and_then(Value::as_str) == Some("tool"));
    let protect_from = messages.len().saturating_sub(KEEP_RECENT);
    for limit in [protect_from, newest_tool.unwrap_or(0)] {
        for m in messages[..limit].iter_mut() {
            if total <= CONTEXT_BUDGET_BYTES {
                return;
            }
            if m.get("role").and_then(Value::as_str) == Some("tool") {
                let len = m.get("content").and_then(Value::as_str).map_or(0, str::len);
                if len > 200 {
                    m["content"] = json!(ELIDED);
                    total -= len;
                }
            }
        }
    }
}

const ELIDED: &str =
    "[backshift: output elided to keep the conversation small; run the tool again if you need it]";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_after_a_stop_keeps_completed_turns_only() {
        let call = |id: &str| json!({"id": id, "type": "function", "function": {"name": "run_command", "arguments": "{}"}});
        let done = vec![
            json!({"role": "system", "content": "s"}),
            json!({"role": "user", "content": "u"}),
            json!({"role": "assistant", "content": "", "tool_calls": [call("a")]}),
            json!({"role": "tool", "tool_call_id": "a", "content": "done"}),
        ];
        assert_eq!(Conversation::completed_prefix(done.clone()), done);
        let mut cut = done.clone();
        cut.push(json!({"role": "assistant", "content": "", "tool_calls": [call("b"), call("c")]}));
        cut.push(json!({"role": "tool", "tool_call_id": "b", "content": "done"}));
        assert_eq!(
            Conversation::completed_prefix(cut),
            done,
            "the cut turn goes"
        );
        let c = Conversation::after_stop(done.clone(), 1, 42);
        assert_eq!(c.messages.len(), 5);
        assert_eq!((c.turns, c.tokens_used), (1, 42));
        let note = c.messages[4]["content"].as_str().unwrap();
        assert!(
            note.contains("stopped") && note.contains("were ended"),
            "{note}"
        );
        assert!(pending_calls(&c.messages).is_empty());
    }

    #[test]
    fn pending_calls_are_the_last_assistant_calls_without_results() {
        let call = |id: &str| json!({"id": id, "type": "function", "function": {"name": "run_command", "arguments": "{}"}});
        let mut messages = vec![
            json!({"role": "system", "content": "s"}),
            json!({"role": "user", "content": "u"}),
            json!({"role": "assistant", "content": "", "tool_calls": [call("a")]}),
            json!({"role": "tool", "tool_call_id": "a", "content": "done"}),
        ];
        assert!(pending_calls(&messages).is_empty(), "all answered");
        messages.push(
            json!({"role": "assistant", "content": "", "tool_calls": [call("b"), call("c")]}),
        );
        messages.push(json!({"role": "tool", "tool_call_id": "b", "content": "done"}));
        let pending = pending_calls(&messages);
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].call_id, "c");
        assert_eq!(pending[0].name, "run_command");
        assert!(pending_calls(&messages[..2]).is_empty(), "no assistant yet");
        assert_eq!(finished_summary(&messages), None);
        let finish = json!({"id": "f", "type": "function", "function": {"name": "finish", "arguments": "{\"summary\": \" Done \"}"}});
        messages.push(json!({"role": "tool", "tool_call_id": "c", "content": "done"}));
        messages.push(json!({"role": "assistant", "content": "", "tool_calls": [finish]}));
        assert_eq!(finished_summary(&messages), None, "not yet accepted");
        messages.push(json!({"role": "tool", "tool_call_id": "f", "content": "finished"}));
        assert_eq!(finished_summary(&messages).as_deref(), Some("Done"));
        assert!(pending_calls(&messages).is_empty());
        // A failed verification's report after it: another iteration.
        messages.push(json!({"role": "user", "content": "[backshift] Verification 1 of 3 failed"}));
        assert_eq!(finished_summary(&messages), None);
        assert!(pending_calls(&messages).is_empty());
    }

    #[test]
    fn old_tool_output_is_elided_first_and_recent_kept() {
        let big = "x".repeat(100 * 1024);
        let mut messages = vec![
            json!({"role": "system", "content": "s"}),
            json!({"role": "user", "content": "u"}),
        ];
        for i in 0..12 {
            messages.push(json!({"role": "assistant", "content": format!("a{i}")}));
            messages.push(json!({"role": "tool", "tool_call_id": i.to_string(), "content": big}));
        }
        elide_old_output(&mut messages);
        let total: usize = messages.iter().map(|m| m.to_string().len()).sum();
        assert!(total <= CONTEXT_BUDGET_BYTES, "{total}");
        assert_eq!(
            messages.last().unwrap()["content"],
            big,
            "the newest result is intact"
        );
        assert_eq!(messages[1]["content"], "u", "the task is never elided");
        assert!(messages[3]["content"].as_str().unwrap().contains("elided"));
    }
}
