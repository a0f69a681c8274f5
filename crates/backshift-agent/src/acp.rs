//! Agents that speak the Agent Client Protocol (OpenCode, Claude Code and
//! Codex through their adapters, Gemini CLI): the agent runs inside the
//! sandbox as a shim command with its stdin kept open; backshift is its
//! ACP client, writing JSON-RPC lines to its stdin and reading its stdout
//! from the shim's journal. Every `session/update` becomes one of our
//! events (see [`Mapper`]); `session/request_permission` is answered by
//! the configured [`PermissionPolicy`] and the decision is an event.
//!
//! A control plane that restarts does not re-attach to the running
//! agent's JSON-RPC exchange (its pending requests died with the old
//! connection): the old process is killed and a new one reopens the same
//! session with `session/load` when the agent supports it, then is told
//! to continue.

use crate::model::clip_at;
use crate::{AgentOutcome, EventSink, Journal};
use agent_client_protocol::schema::ProtocolVersion;
use agent_client_protocol::v1::ConnectionTo;
use agent_client_protocol::v1::schema::{
    CancelNotification, ContentBlock, InitializeRequest, LoadSessionRequest, NewSessionRequest,
    PermissionOptionKind, PromptRequest, RequestPermissionOutcome, RequestPermissionRequest,
    RequestPermissionResponse, SelectedPermissionOutcome, SessionNotification, StopReason,
    TextContent,
};
use agent_client_protocol::{Agent, Client, Lines};
use backshift_core::FailureReason;
use backshift_protocol::{EventKind, OutputStream, PlanEntry};
use backshift_shim::{Entry, ShimClient, SpawnRequest, Stream};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How an agent's permission requests are answered.
#[derive(Clone)]
pub enum PermissionPolicy {
    /// Allow, once: the sandbox is the fence.
    Allow,
    /// Reject, once: the agent is told no and carries on without.
    Deny,
    /// A person decides (the agent waits meanwhile).
    Ask(Arc<dyn Approver>),
}

impl std::fmt::Debug for PermissionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PermissionPolicy::Allow => "Allow",
            PermissionPolicy::Deny => "Deny",
            PermissionPolicy::Ask(_) => "Ask",
        })
    }
}

/// Decides an agent's permission requests: backshift's approvals, which
/// ask a person.
#[async_trait::async_trait]
pub trait Approver: Send + Sync {
    /// Whether tool call `call` (ACP's `toolCall`, as JSON) may go; may
    /// wait long (for a person).
    async fn decide(&self, call: &Value) -> PermissionAnswer;
}

/// An [`Approver`]'s answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermissionAnswer {
    /// Allowed or not.
    pub allow: bool,
    /// Who decided.
    pub by: String,
    /// Why.
    pub reason: String,
}

const ALLOW: &[PermissionOptionKind] = &[
    PermissionOptionKind::AllowOnce,
    PermissionOptionKind::AllowAlways,
];
const REJECT: &[PermissionOptionKind] = &[
    PermissionOptionKind::RejectOnce,
    PermissionOptionKind::RejectAlways,
];

/// The option of `request` that carries out a decision (the first of
/// `kinds` the agent offers), its `permission_decision` event, and the
/// response.
fn permission_answer(
    request: &RequestPermissionRequest,
    call: &Value,
    kinds: &[PermissionOptionKind],
    by: &str,
    reason: &str,
) -> (EventKind, RequestPermissionResponse) {
    let chosen = kinds.iter().find_map(|kind| {
        request
            .options
            .iter()
            .find(|o| o.kind == *kind)
            .map(|o| (o.option_id.clone(), *kind))
    });
    let event = EventKind::PermissionDecision {
        call_id: str_at(call, "toolCallId").unwrap_or_default(),
        title: str_at(call, "title").unwrap_or_default(),
        kind: str_at(call, "kind"),
        decision: match &chosen {
            Some((_, kind)) => json_name(kind),
            None => "cancelled".to_owned(),
        },
        by: by.to_owned(),
        reason: match chosen {
            Some(_) => reason.to_owned(),
            None => format!("{reason}, but the agent offered no such option"),
        },
    };
    let response = RequestPermissionResponse::new(match chosen {
        Some((option, _)) => {
            RequestPermissionOutcome::Selected(SelectedPermissionOutcome::new(option))
        }
        None => RequestPermissionOutcome::Cancelled,
    });
    (event, response)
}

/// How to start an ACP agent in the sandbox.
#[derive(Debug, Clone)]
pub struct AcpLaunch {
    /// Its name (`opencode`).
    pub agent: String,
    /// Program and arguments that make it speak ACP on stdio.
    pub argv: Vec<String>,
    /// Its environment (the gateway's address and token, its config).
    pub env: Vec<(String, String)>,
    /// Directories put in front of its `PATH`.
    pub path_prepend: Vec<String>,
    /// The checkout: its working directory and the session's `cwd`.
    pub cwd: String,
    /// How its permission requests are answered.
    pub permissions: PermissionPolicy,
    /// Tool calls allowed before the session is cancelled (`max_turns`).
    pub max_tool_calls: u32,
}

/// Where an ACP agent starts from.
#[derive(Debug, Clone, Default)]
pub struct AcpResume {
    /// The process generation to start, from 1: its shim id is
    /// `acp:<generation>`; the one before it (if any) is killed first.
    pub generation: u32,
    /// The session to reopen with `session/load`.
    pub session_id: Option<String>,
    /// Why the agent is resumed (told to it), when it is.
    pub why: Option<String>,
    /// Tool calls already made in earlier generations.
    pub tool_calls: u32,
    /// The `agent_finished` event is recorded already.
    pub finished: bool,
    /// What the last failed verification found: the agent works on the
    /// task again, told this.
    pub feedback: Option<String>,
}

/// The shim's name for generation `n` of an attempt's ACP agent.
pub fn process_id(generation: u32) -> String {
    format!("acp:{generation}")
}

/// What the connection task reports to the runner, in order.
#[derive(Debug)]
enum Report {
    /// A `session/update` (as JSON: mapped by [`Mapper`]).
    Update(Value),
    /// A permission request waits for a person.
    Asking {
        /// The tool call asked about (ACP's `toolCall`, as JSON).
        call: Value,
    },
    /// A permission request was answered.
    Permission {
        /// The tool call asked about (ACP's `toolCall`, as JSON).
        call: Value,
        /// The decision.
        decision: EventKind,
    },
    /// The session is open; what follows is new (not a replay).
    SessionOpen {
        session_id: String,
        loaded: bool,
        agent_info: Option<String>,
        load_failed: Option<String>,
    },
}

/// Runs the agent described by `launch` on `prompt` until its prompt turn
/// ends, reporting to `sink` and checkpointing through `journal` after
/// every finished tool call.
pub async fn run_acp_agent(
    shim: &ShimClient,
    launch: &AcpLaunch,
    prompt: &str,
    sink: &dyn EventSink,
    journal: &dyn Journal,
    resume: AcpResume,
) -> AgentOutcome {
    let mut generation = resume.generation.max(1);
    if generation > 1 {
        // The previous generation's exchange is lost with the connection
        // that held it; its process must not go on editing files.
        let _ = shim.kill(&process_id(generation - 1)).await;
    }
    // A generation started before without reaching its session (the
    // control plane died in between) is stopped and skipped: its stdin
    // already had an exchange of its own.
    let id = loop {
        let id = process_id(generation);
        let spawned = shim
            .spawn(SpawnRequest {
                id: id.clone(),
                argv: launch.argv.clone(),
                cwd: Some(launch.cwd.clone()),
                env: launch.env.clone(),
                path_prepend: launch.path_prepend.clone(),
                stdin_b64: None,
                stdin_open: true,
                timeout_ms: None,
            })
            .await;
        match spawned {
            Ok(false) => break id,
            Ok(true) if generation < resume.generation.max(1) + 16 => {
                let _ = shim.kill(&id).await;
                generation += 1;
            }
            Ok(true) => {
                return AgentOutcome::Stopped {
                    reason: FailureReason::Internal,
                    detail: format!(
                        "{} was started 16 times in this sandbox without opening a session",
                        launch.agent
                    ),
                };
            }
            Err(e) => {
                return AgentOutcome::Interrupted {
                    detail: format!("cannot start {} in the sandbox: {e}", launch.agent),
                };
            }
        }
    };

    // stdout lines feed the connection; stderr is kept for a crash report.
    let (line_tx, line_rx) = mpsc::unbounded_channel::<std::io::Result<String>>();
    let stderr = Arc::new(Mutex::new(Tail::default()));
    let reader = {
        let shim = shim.clone();
        let id = id.clone();
        let stderr = stderr.clone();
        tokio::spawn(async move {
            let mut pending = String::new();
            let mut on_entry = |entry: &Entry| {
                if let Entry::Output {
                    stream,
                    text,
                    id: of,
                    ..
                } = entry
                    && *of == id
                {
                    match stream {
                        Stream::Stdout => {
                            pending.push_str(text);
                            while let Some(end) = pending.find('\n') {
                                let line: String = pending.drain(..=end).collect();
                                let line = line.trim();
                                // Only JSON-RPC goes to the connection; an
                                // agent's stray prints are kept as stderr.
                                if line.starts_with('{') {
                                    let _ = line_tx.send(Ok(line.to_owned()));
                                } else if !line.is_empty() {
                                    lock(&stderr).push(line);
                                }
                            }
                        }
                        Stream::Stderr => lock(&stderr).push(text),
                    }
                }
            };
            shim.follow(&id, 0, &mut on_entry).await
        })
    };
    let outgoing = {
        let shim = shim.clone();
        let id = id.clone();
        futures::sink::unfold((), move |(), line: String| {
            let shim = shim.clone();
            let id = id.clone();
            async move {
                shim.write(&id, format!("{line}\n").as_bytes(), false)
                    .await
                    .map_err(std::io::Error::other)
            }
        })
    };
    let incoming = tokio_stream::wrappers::UnboundedReceiverStream::new(line_rx);
    let transport = Lines::new(Box::pin(outgoing), incoming);

    let (report_tx, mut reports) = mpsc::unbounded_channel::<Report>();
    // The connection, once open: for cancelling the session.
    let open: Arc<Mutex<Option<ConnectionTo<Agent>>>> = Arc::default();
    let feedback = resume
        .feedback
        .as_deref()
        .map(|f| format!("\n\n{f}"))
        .unwrap_or_default();
    let new_prompt = match &resume.why {
        // A new session after an interruption: the files are as the last
        // checkpoint left them.
        Some(why) => format!(
            "{prompt}\n\n[backshift] An earlier session on this task was interrupted ({why}); the files are as it left them at its last checkpoint. Continue the task from there.{feedback}"
        ),
        None => format!("{prompt}{feedback}"),
    };
    let load_prompt = match (&resume.why, &resume.feedback) {
        // Its session, reopened for another iteration.
        (None, Some(f)) => f.clone(),
        (why, _) => format!(
            "[backshift] This session was interrupted ({}) and reopened. Anything that was running then is gone. Continue with the task.{feedback}",
            why.as_deref().unwrap_or("the control plane restarted")
        ),
    };
    let connection = {
        let cwd = launch.cwd.clone();
        let policy = launch.permissions.clone();
        let session_to_load = resume.session_id.clone();
        let updates = report_tx.clone();
        let permissions = report_tx.clone();
        let reports = report_tx;
        let open = open.clone();
        tokio::spawn(
            Client
                .v1()
                .name("backshift")
                .on_receive_notification(
                    async move |n: SessionNotification, _cx| {
                        if let Ok(v) = serde_json::to_value(&n.update) {
                            let _ = updates.send(Report::Update(v));
                        }
                        Ok(())
                    },
                    agent_client_protocol::on_receive_notification!(),
                )
                .on_receive_request(
                    async move |request: RequestPermissionRequest, responder, cx| {
                        let call = serde_json::to_value(&request.tool_call).unwrap_or(Value::Null);
                        let (kinds, by, reason) = match &policy {
                            PermissionPolicy::Allow => (ALLOW, "policy", "the permission policy allows tool calls inside the sandbox (agents.permission_policy = \"allow\")"),
                            PermissionPolicy::Deny => (REJECT, "policy", "the permission policy rejects what agents ask about (agents.permission_policy = \"deny\")"),
                            PermissionPolicy::Ask(approver) => {
                                // Announced now; answered when a person
                                // decides, without holding up the
                                // connection meanwhile.
                                let _ = permissions.send(Report::Asking { call: call.clone() });
                                let approver = approver.clone();
                                let permissions = permissions.clone();
                                return cx.spawn(async move {
                                    let answer = approver.decide(&call).await;
                                    let kinds = if answer.allow { ALLOW } else { REJECT };
                                    let (event, response) = permission_answer(
                                        &request,
                                        &call,
                                        kinds,
                                        &answer.by,
                                        &answer.reason,
                                    );
                                    let _ = permissions.send(Report::Permission {
                                        call,
                                        decision: event,
                                    });
                                    responder.respond(response)
                                });
                            }
                        };
                        let (event, response) =
                            permission_answer(&request, &call, kinds, by, reason);
                        let _ = permissions.send(Report::Permission {
                            call,
                            decision: event,
                        });
                        responder.respond(response)
                    },
                    agent_client_protocol::on_receive_request!(),
                )
                .connect_with(transport, async move |cx: ConnectionTo<Agent>| {
                    *lock(&open) = Some(cx.clone());
                    let init = cx
                        .send_request(InitializeRequest::new(ProtocolVersion::V1))
                        .block_task()
                        .await?;
                    let agent_info = init
                        .agent_info
                        .as_ref()
                        .map(|i| format!("{} {}", i.name, i.version));
                    let mut load_failed = None;
                    let mut opened = None;
                    if let Some(session) = session_to_load {
                        if init.agent_capabilities.load_session {
                            match cx
                                .send_request(LoadSessionRequest::new(session.clone(), cwd.clone()))
                                .block_task()
                                .await
                            {
                                Ok(_) => opened = Some(session),
                                Err(e) => load_failed = Some(e.to_string()),
                            }
                        } else {
                            load_failed = Some("the agent cannot load sessions".into());
                        }
                    }
                    let loaded = opened.is_some();
                    let session = match opened {
                        Some(s) => s,
                        None => cx
                            .send_request(NewSessionRequest::new(cwd.clone()))
                            .block_task()
                            .await?
                            .session_id
                            .to_string(),
                    };
                    let _ = reports.send(Report::SessionOpen {
                        session_id: session.clone(),
                        loaded,
                        agent_info,
                        load_failed,
                    });
                    let text = if loaded { load_prompt } else { new_prompt };
                    let response = cx
                        .send_request(PromptRequest::new(
                            session,
                            vec![ContentBlock::Text(TextContent::new(text))],
                        ))
                        .block_task()
                        .await?;
                    Ok(response.stop_reason)
                }),
        )
    };

    // Dropped (the attempt stopped): the helpers stop with it.
    let _tasks = AbortOnDrop(vec![reader.abort_handle(), connection.abort_handle()]);
    let mut mapper = Mapper::new();
    let mut session: Option<String> = None;
    let mut replaying = true;
    let mut tool_calls = resume.tool_calls;
    let mut cancelled_for_turns = false;
    let mut connection = connection;
    let mut ended = None;
    // Reports are handled in order; once the connection ends, those it
    // sent before (all of its updates) are handled before its result.
    loop {
        let report = match ended {
            None => tokio::select! {
                biased;
                report = reports.recv() => match report {
                    Some(report) => Some(report),
                    None => {
                        ended = Some((&mut connection).await);
                        continue;
                    }
                },
                result = &mut connection => {
                    ended = Some(result);
                    continue;
                }
            },
            Some(_) => reports.try_recv().ok(),
        };
        let Some(report) = report else { break };
        let actions = match report {
            // A loaded session replays its history first.
            Report::Update(_) if replaying => continue,
            Report::Update(v) => mapper.update(&v),
            Report::Asking { call } => mapper.asking(&call),
            Report::Permission { call, decision } => {
                let mut actions = mapper.asking(&call);
                actions.push(Action::Emit(decision));
                actions
            }
            Report::SessionOpen {
                session_id,
                loaded,
                agent_info,
                load_failed,
            } => {
                replaying = false;
                if let Some(why) = load_failed {
                    sink.emit(EventKind::Progress {
                        message: format!(
                            "{} could not reopen its session ({why}); starting a new one on the checkpoint's files",
                            launch.agent
                        ),
                    })
                    .await;
                }
                session = Some(session_id.clone());
                vec![Action::Emit(EventKind::AgentSession {
                    agent: launch.agent.clone(),
                    agent_info,
                    session_id,
                    process: id.clone(),
                    loaded,
                })]
            }
        };
        for action in actions {
            match action {
                Action::Emit(kind) => sink.emit(kind).await,
                Action::ToolStarted => {
                    tool_calls += 1;
                    if tool_calls > launch.max_tool_calls && !cancelled_for_turns {
                        cancelled_for_turns = true;
                        let cx = lock(&open).clone();
                        if let (Some(cx), Some(s)) = (cx, &session) {
                            let _ = cx.send_notification(CancelNotification::new(s.clone()));
                        }
                    }
                }
                Action::ToolFinished => {
                    if let Err(detail) = journal.turn_ended(tool_calls, &[]).await {
                        reader.abort();
                        return AgentOutcome::Interrupted { detail };
                    }
                }
            }
        }
    }
    let Some(ended) = ended else {
        // The loop ends only once the connection has.
        return AgentOutcome::Stopped {
            reason: FailureReason::Internal,
            detail: "the ACP connection's reports ended before it did".into(),
        };
    };
    for e in mapper.flush() {
        sink.emit(e).await;
    }
    let stop = match ended {
        Ok(Ok(stop)) => stop,
        Ok(Err(e)) => {
            return crashed(shim, &id, launch, reader, &stderr, Some(e.to_string())).await;
        }
        Err(join) => {
            return AgentOutcome::Stopped {
                reason: FailureReason::Internal,
                detail: format!("the ACP connection task failed: {join}"),
            };
        }
    };
    match stop {
        StopReason::EndTurn => {}
        StopReason::Cancelled if cancelled_for_turns => {
            return AgentOutcome::Stopped {
                reason: FailureReason::MaxTurns,
                detail: format!(
                    "{} made more than {} tool calls (limits.max_turns counts an ACP agent's tool calls); its session was cancelled",
                    launch.agent, launch.max_tool_calls
                ),
            };
        }
        StopReason::MaxTokens | StopReason::MaxTurnRequests => {
            return AgentOutcome::Stopped {
                reason: FailureReason::AgentError,
                detail: format!(
                    "{} ended its turn early ({}): the model hit its output or request limit. Raise the agent's limits or split the task.",
                    launch.agent,
                    json_name(&stop)
                ),
            };
        }
        other => {
            return AgentOutcome::Stopped {
                reason: FailureReason::AgentError,
                detail: format!(
                    "{} ended its turn without finishing ({}); nothing is published",
                    launch.agent,
                    json_name(&other)
                ),
            };
        }
    }
    if let Err(detail) = journal.turn_ended(tool_calls, &[]).await {
        return AgentOutcome::Interrupted { detail };
    }
    // Its work is done: the process goes, its session stays on disk.
    let _ = shim.write(&id, b"", true).await;
    reader.abort();
    let summary = mapper
        .last_message
        .clone()
        .filter(|m| !m.trim().is_empty())
        .unwrap_or_else(|| format!("{} ended its turn without a summary.", launch.agent));
    let summary = format!(
        "{}\n\nMade by {} through backshift.",
        summary.trim(),
        launch.agent
    );
    if !resume.finished {
        sink.emit(EventKind::AgentFinished {
            summary: summary.clone(),
        })
        .await;
    }
    AgentOutcome::Finished { summary }
}

/// The agent's connection broke: it crashed, exited, or wrote something
/// that is not ACP. Its exit and stderr say which.
async fn crashed(
    shim: &ShimClient,
    id: &str,
    launch: &AcpLaunch,
    reader: tokio::task::JoinHandle<backshift_shim::client::Result<backshift_shim::Exit>>,
    stderr: &Mutex<Tail>,
    error: Option<String>,
) -> AgentOutcome {
    // The process may still be running (a protocol error): it goes.
    let exit = match tokio::time::timeout(Duration::from_secs(3), reader).await {
        Ok(Ok(Ok(exit))) => Some(exit),
        Ok(Ok(Err(e))) => {
            return AgentOutcome::Interrupted {
                detail: format!("lost the sandbox while {} ran: {e}", launch.agent),
            };
        }
        _ => {
            let _ = shim.kill(id).await;
            None
        }
    };
    let tail = lock(stderr).text();
    let said = if tail.trim().is_empty() {
        "it wrote nothing to stderr".to_owned()
    } else {
        format!("the end of its stderr:\n{}", tail.trim_end())
    };
    let how = match exit {
        Some(e) if e.error.is_some() => {
            format!("could not be started ({})", e.error.unwrap_or_default())
        }
        Some(e) => format!("exited with code {} before finishing its turn", e.code),
        None => format!(
            "broke the ACP exchange ({})",
            error.unwrap_or_else(|| "no reason given".into())
        ),
    };
    AgentOutcome::Stopped {
        reason: FailureReason::AgentCrashed,
        detail: format!(
            "{} {how}; nothing is published. Check the agent's installation (`backshift agents ls`) and the model settings; {said}",
            launch.agent
        ),
    }
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The last 4 KiB of what the agent wrote to stderr.
#[derive(Default)]
struct Tail(String);

impl Tail {
    const MAX: usize = 4096;

    fn push(&mut self, text: &str) {
        self.0.push_str(text);
        if !text.ends_with('\n') {
            self.0.push('\n');
        }
        if self.0.len() > Self::MAX {
            let mut cut = self.0.len() - Self::MAX;
            while !self.0.is_char_boundary(cut) {
                cut += 1;
            }
            self.0.drain(..cut);
        }
    }

    fn text(&self) -> String {
        self.0.clone()
    }
}

/// A serde enum's wire name (`allow_once`, `end_turn`).
fn json_name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => "unknown".into(),
    }
}

fn str_at(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// What a session update asks of the runner.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Record this event.
    Emit(EventKind),
    /// A tool call started (counted against the limit).
    ToolStarted,
    /// A tool call finished: a checkpoint.
    ToolFinished,
}

/// A tool call as far as the updates have told it.
#[derive(Debug, Default)]
struct Call {
    name: Option<String>,
    kind: Option<String>,
    title: Option<String>,
    /// The first file it touches.
    location: Option<String>,
    input: Value,
    announced: bool,
    started: Option<Instant>,
    /// Text output already recorded as command output.
    streamed: String,
    /// Paths whose diff is recorded.
    diffed: Vec<String>,
    done: bool,
}

impl Call {
    fn announce(&mut self, id: &str) -> Vec<Action> {
        if self.announced {
            return Vec::new();
        }
        self.announced = true;
        self.started = Some(Instant::now());
        vec![
            Action::ToolStarted,
            Action::Emit(EventKind::ToolCall {
                call_id: id.to_owned(),
                name: self.name(),
                arguments: self.input.clone(),
                kind: self.kind.clone(),
                // A title that only repeats the tool's name says less
                // than the file it works on.
                title: match (&self.title, &self.location) {
                    (Some(t), Some(path)) if Some(t) == self.name.as_ref() => Some(path.clone()),
                    (t, _) => t.clone(),
                },
            }),
        ]
    }

    fn name(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.kind.clone())
            .unwrap_or_else(|| "tool".into())
    }
}

/// Turns `session/update`s (as JSON, ACP's wire form) into our events:
/// message and thought chunks are joined into one event per message; a
/// tool call is announced once its input is known, its execute output
/// streamed as command output, its diffs recorded, and its end reported
/// with the agent's text for it.
#[derive(Debug, Default)]
pub struct Mapper {
    calls: HashMap<String, Call>,
    message: String,
    /// The `messageId` of the message being joined, when the agent
    /// gives one: a new id starts a new message.
    message_id: Option<String>,
    thought: String,
    /// The agent's last complete message: its summary when it ends.
    pub last_message: Option<String>,
}

/// Output kept per tool result event.
const RESULT_MAX: usize = 16 * 1024;
/// Diff text kept per file diff event.
const DIFF_MAX: usize = 256 * 1024;

impl Mapper {
    /// A mapper with nothing seen yet.
    pub fn new() -> Mapper {
        Mapper::default()
    }

    /// The joined message or thought text not recorded yet.
    pub fn flush(&mut self) -> Vec<EventKind> {
        let mut out = Vec::new();
        if !self.thought.trim().is_empty() {
            out.push(EventKind::AgentThought {
                text: std::mem::take(&mut self.thought),
            });
        }
        self.thought.clear();
        if !self.message.trim().is_empty() {
            let text = std::mem::take(&mut self.message);
            self.last_message = Some(text.clone());
            out.push(EventKind::AgentMessage { text });
        }
        self.message.clear();
        out
    }

    /// The agent asks permission for tool call `call` (ACP's `toolCall`),
    /// which may be pending or not reported at all yet: what it says is
    /// taken in, and the call is announced now.
    pub fn asking(&mut self, call: &Value) -> Vec<Action> {
        let Some(id) = str_at(call, "toolCallId") else {
            return self.flush().into_iter().map(Action::Emit).collect();
        };
        let known = self.calls.contains_key(&id);
        let mut pending = call.clone();
        pending["status"] = Value::from("pending");
        let mut out = self.tool(&pending, !known);
        if let Some(c) = self.calls.get_mut(&id) {
            out.extend(c.announce(&id));
        }
        out
    }

    /// What one update means.
    pub fn update(&mut self, v: &Value) -> Vec<Action> {
        let kind = v.get("sessionUpdate").and_then(Value::as_str).unwrap_or("");
        match kind {
            "agent_message_chunk" => {
                let mut out = Vec::new();
                if !self.thought.is_empty() {
                    out.push(Action::Emit(EventKind::AgentThought {
                        text: std::mem::take(&mut self.thought),
                    }));
                }
                let id = str_at(v, "messageId");
                if id.is_some() && id != self.message_id {
                    if !self.message.is_empty() {
                        out.extend(self.flush().into_iter().map(Action::Emit));
                    }
                    self.message_id = id;
                }
                self.message.push_str(&chunk_text(v));
                out
            }
            "agent_thought_chunk" => {
                let mut out = Vec::new();
                if !self.message.is_empty() {
                    out = self.flush().into_iter().map(Action::Emit).collect();
                }
                self.thought.push_str(&chunk_text(v));
                out
            }
            "plan" => {
                let mut out: Vec<Action> = self.flush().into_iter().map(Action::Emit).collect();
                let entries = v
                    .get("entries")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|e| PlanEntry {
                        content: str_at(e, "content").unwrap_or_default(),
                        status: str_at(e, "status").unwrap_or_else(|| "pending".into()),
                        priority: str_at(e, "priority").unwrap_or_else(|| "medium".into()),
                    })
                    .collect();
                out.push(Action::Emit(EventKind::Plan { entries }));
                out
            }
            "tool_call" | "tool_call_update" => self.tool(v, kind == "tool_call"),
            _ => Vec::new(),
        }
    }

    fn tool(&mut self, v: &Value, first: bool) -> Vec<Action> {
        let Some(id) = str_at(v, "toolCallId") else {
            return Vec::new();
        };
        let mut out: Vec<Action> = self.flush().into_iter().map(Action::Emit).collect();
        let call = self.calls.entry(id.clone()).or_default();
        if call.done {
            return out;
        }
        // The tool's own name: ACP's `name`, or where an adapter puts
        // it (Claude Code: `_meta.claudeCode.toolName`).
        let meta_name = v
            .get("_meta")
            .and_then(Value::as_object)
            .and_then(|m| m.values().find_map(|x| str_at(x, "toolName")));
        if let Some(name) = str_at(v, "name").or(meta_name) {
            call.name = Some(name);
        }
        if let Some(title) = str_at(v, "title") {
            // The first title some agents send is the tool's own name.
            // (a single word); others describe the call from the start.
            if first && call.name.is_none() && !title.contains(char::is_whitespace) {
                call.name = Some(title.clone());
            }
            call.title = Some(title);
        }
        if let Some(kind) = str_at(v, "kind") {
            call.kind = Some(kind);
        }
        if call.location.is_none() {
            call.location = v
                .pointer("/locations/0/path")
                .and_then(Value::as_str)
                .map(str::to_owned);
        }
        if let Some(input) = v.get("rawInput").filter(|i| non_empty(i)) {
            call.input = input.clone();
        }
        let status = str_at(v, "status").unwrap_or_else(|| "pending".into());
        let finished = status == "completed" || status == "failed";
        // Announced once under way (its input is complete by then), or
        // when the agent asks permission for it.
        if status != "pending" {
            out.extend(call.announce(&id));
        }
        let contents = v.get("content").and_then(Value::as_array);
        let mut text = String::new();
        for c in contents.into_iter().flatten() {
            match c.get("type").and_then(Value::as_str) {
                Some("content") => {
                    if let Some(t) = c.pointer("/content/text").and_then(Value::as_str) {
                        text.push_str(t);
                    }
                }
                Some("diff") => {
                    let path = str_at(c, "path").unwrap_or_default();
                    if !call.diffed.contains(&path) {
                        call.diffed.push(path.clone());
                        let old = c.get("oldText").and_then(Value::as_str).unwrap_or("");
                        let new = c.get("newText").and_then(Value::as_str).unwrap_or("");
                        out.push(Action::Emit(EventKind::FileDiff {
                            call_id: id.clone(),
                            diff: unified_diff(&path, old, new),
                            path,
                        }));
                    }
                }
                _ => {}
            }
        }
        // A command's output so far, as it grows (what a pending call
        // shows is its description, not output).
        if call.kind.as_deref() == Some("execute")
            && status != "pending"
            && !text.is_empty()
            && text.starts_with(call.streamed.as_str())
            && text.len() > call.streamed.len()
        {
            out.push(Action::Emit(EventKind::CommandOutput {
                call_id: id.clone(),
                stream: OutputStream::Stdout,
                text: text[call.streamed.len()..].to_owned(),
                journal_seq: None,
            }));
            call.streamed = text.clone();
        }
        if finished {
            call.done = true;
            out.extend(call.announce(&id));
            let output = if text.is_empty() {
                v.get("rawOutput").map(raw_output_text).unwrap_or_default()
            } else {
                text
            };
            // A command whose output was not streamed: all of it now.
            if call.kind.as_deref() == Some("execute")
                && call.streamed.is_empty()
                && !output.is_empty()
            {
                out.push(Action::Emit(EventKind::CommandOutput {
                    call_id: id.clone(),
                    stream: OutputStream::Stdout,
                    text: clip_at(&output, RESULT_MAX),
                    journal_seq: None,
                }));
            }
            let exit_code = v
                .pointer("/rawOutput/metadata/exit")
                .or_else(|| v.pointer("/rawOutput/exit_code"))
                .and_then(Value::as_i64);
            out.push(Action::Emit(EventKind::ToolResult {
                call_id: id,
                name: call.name(),
                ok: status == "completed" && exit_code.is_none_or(|c| c == 0),
                exit_code,
                output: clip_at(&output, RESULT_MAX),
                duration_ms: call.started.map_or(0, |s| s.elapsed().as_millis() as u64),
            }));
            out.push(Action::ToolFinished);
        }
        out
    }
}

/// The text of a tool's raw output, as the agents we know report it
/// (OpenCode: `output`; Codex: `formatted_output`, `aggregated_output`,
/// or `stdout` and `stderr`); the JSON itself otherwise.
fn raw_output_text(o: &Value) -> String {
    if let Value::String(s) = o {
        return s.clone();
    }
    for key in ["output", "formatted_output", "aggregated_output"] {
        if let Some(s) = o.get(key).and_then(Value::as_str) {
            return s.to_owned();
        }
    }
    match (str_at(o, "stdout"), str_at(o, "stderr")) {
        (None, None) => o.to_string(),
        (out, err) => out.unwrap_or_default() + &err.unwrap_or_default(),
    }
}

fn non_empty(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::String(s) => !s.is_empty(),
        _ => true,
    }
}

fn chunk_text(v: &Value) -> String {
    v.pointer("/content/text")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned()
}

/// A unified diff of `path` from `old` to `new`, cut at [`DIFF_MAX`].
fn unified_diff(path: &str, old: &str, new: &str) -> String {
    let diff = similar::TextDiff::from_lines(old, new);
    let text = diff
        .unified_diff()
        .context_radius(3)
        .header(&format!("a{path}"), &format!("b{path}"))
        .to_string();
    clip_at(&text, DIFF_MAX)
}

#[cfg(test)]
mod tests;
