//! A scripted model server, the one fake in backshift's tests (DESIGN
//! §8): OpenAI chat completions and responses, and Anthropic messages,
//! streamed or not, all from one [`Script`]. Real clients talk to it over
//! a real socket; it checks every request it receives, so a misbehaving
//! agent fails the test instead of passing by accident.

mod apis;
pub mod script;

use apis::Api;

pub use script::{Contains, Expect, Mode, Reply, Script, ScriptedCall, Step};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// What the server has seen.
#[derive(Debug, Default)]
struct Inner {
    script: Script,
    next: usize,
    requests: Vec<Value>,
    authorizations: Vec<Option<String>>,
    failures: Vec<String>,
    last_call_ids: Vec<String>,
    call_counter: u64,
}

/// A running fake model server. Dropping it stops the server.
pub struct FakeModel {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeModel {
    /// Starts serving `script` on a free loopback port.
    pub async fn start(script: Script) -> anyhow::Result<FakeModel> {
        Self::start_on("127.0.0.1:0".parse()?, script).await
    }

    /// Starts serving `script` on `addr`.
    pub async fn start_on(addr: SocketAddr, script: Script) -> anyhow::Result<FakeModel> {
        let inner = Arc::new(Mutex::new(Inner {
            script,
            ..Default::default()
        }));
        let app = router(inner.clone());
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeModel { addr, inner, task })
    }

    /// The OpenAI base URL to configure clients with (`http://.../v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request body received, in order.
    pub fn requests(&self) -> Vec<Value> {
        self.lock().requests.clone()
    }

    /// The `Authorization` header of every request, in order.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.lock().authorizations.clone()
    }

    /// Every check that failed, in order. Empty when the client behaved.
    pub fn failures(&self) -> Vec<String> {
        self.lock().failures.clone()
    }

    /// Steps not consumed yet.
    pub fn remaining(&self) -> usize {
        let inner = self.lock();
        inner.script.steps.len().saturating_sub(inner.next)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The server's routes, for embedding.
fn router(inner: Arc<Mutex<Inner>>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/chat/completions", post(completions))
        .route("/v1/responses", post(responses))
        .route("/v1/messages", post(messages))
        .route("/v1beta/models/{action}", post(gemini))
        .route("/_fake/status", get(status))
        .route("/_fake/requests", get(requests))
        .with_state(inner)
}

async fn status(State(inner): State<Arc<Mutex<Inner>>>) -> impl IntoResponse {
    let inner = inner.lock().unwrap_or_else(|p| p.into_inner());
    axum::Json(json!({
        "served": inner.requests.len(),
        "remaining": inner.script.steps.len().saturating_sub(inner.next),
        "failures": inner.failures,
    }))
}

/// Every request body received, for looking at what a client sends.
async fn requests(State(inner): State<Arc<Mutex<Inner>>>) -> impl IntoResponse {
    let inner = inner.lock().unwrap_or_else(|p| p.into_inner());
    axum::Json(Value::Array(inner.requests.clone()))
}

async fn completions(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Response {
    serve(inner, Api::Chat, headers, body).await
}

async fn responses(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Response {
    serve(inner, Api::Responses, headers, body).await
}

async fn messages(
    State(inner): State<Arc<Mutex<Inner>>>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Response {
    serve(inner, Api::Messages, headers, body).await
}

/// Gemini's `models/{model}:{method}`.
async fn gemini(
    State(inner): State<Arc<Mutex<Inner>>>,
    axum::extract::Path(action): axum::extract::Path<String>,
    headers: axum::http::HeaderMap,
    body: String,
) -> Response {
    let method = action.split_once(':').map_or("", |(_, m)| m);
    let api = Api::Gemini {
        stream: method == "streamGenerateContent",
    };
    serve(inner, api, headers, body).await
}

/// One request of any API: recorded as sent, checked and answered in
/// the chat-completions form it normalizes to, the answer rendered in
/// the API's own format.
async fn serve(
    inner: Arc<Mutex<Inner>>,
    api: Api,
    headers: axum::http::HeaderMap,
    body: String,
) -> Response {
    let (reply, stream, model, call_ids, prompt_tokens) = {
        let mut guard = inner.lock().unwrap_or_else(|p| p.into_inner());
        let auth = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| {
                ["x-api-key", "x-goog-api-key"].iter().find_map(|h| {
                    headers
                        .get(*h)
                        .and_then(|v| v.to_str().ok())
                        .map(|k| format!("{h} {k}"))
                })
            });
        guard.authorizations.push(auth);
        let raw: Value = match serde_json::from_str(&body) {
            Ok(v) => v,
            Err(e) => return fail(&mut guard, api, format!("request is not JSON: {e}")),
        };
        guard.requests.push(raw.clone());
        let request = api.normalize(&raw);
        let n = guard.requests.len();
        let offers_tools = request
            .get("tools")
            .and_then(Value::as_array)
            .is_some_and(|t| !t.is_empty());
        if !offers_tools && let Some(reply) = guard.script.untooled.clone() {
            let stream = request
                .get("stream")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let model = request
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("fake")
                .to_owned();
            (reply, stream, model, Vec::new(), (body.len() / 4) as u64)
        } else {
            let (index, expected_ids) = match guard.script.mode {
                Mode::Sequence => (guard.next, guard.last_call_ids.clone()),
                Mode::Turn => conversation_turn(&request),
            };
            let total = guard.script.steps.len();
            let Some(step) = guard.script.steps.get(index).cloned() else {
                return fail(
                    &mut guard,
                    api,
                    format!(
                        "request {n} asks for step {} but the script has {total} steps",
                        index + 1
                    ),
                );
            };
            guard.next = guard.next.max(index + 1);
            let problems = check(&request, &step.expect, &expected_ids);
            if !problems.is_empty() {
                return fail(
                    &mut guard,
                    api,
                    format!("request {n}: {}", problems.join("; ")),
                );
            }
            let ids: Vec<String> = match guard.script.mode {
                Mode::Sequence => step
                    .reply
                    .tool_calls
                    .iter()
                    .map(|_| {
                        guard.call_counter += 1;
                        format!("call_{}", guard.call_counter)
                    })
                    .collect(),
                // The same step always answers with the same ids.
                Mode::Turn => (0..step.reply.tool_calls.len())
                    .map(|i| format!("call_{}_{}", index + 1, i + 1))
                    .collect(),
            };
            if step.reply.status.is_none() {
                guard.last_call_ids = ids.clone();
            }
            let stream = request
                .get("stream")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let model = request
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("fake")
                .to_owned();
            (step.reply, stream, model, ids, (body.len() / 4) as u64)
        }
    };
    if let Some(ms) = reply.delay_ms {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    if let Some(status) = reply.status {
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let msg = reply
            .error
            .clone()
            .unwrap_or_else(|| "scripted error".into());
        return api.error(code, "scripted", &msg);
    }
    let calls: Vec<Value> = reply
        .tool_calls
        .iter()
        .zip(&call_ids)
        .map(|(c, id)| {
            let args = c
                .raw_arguments
                .clone()
                .unwrap_or_else(|| c.arguments.to_string());
            json!({"id": id, "type": "function", "function": {"name": c.name, "arguments": args}})
        })
        .collect();
    let finish = reply.finish_reason.clone().unwrap_or_else(|| {
        if calls.is_empty() {
            "stop".into()
        } else {
            "tool_calls".into()
        }
    });
    let completion_tokens =
        (reply.content.as_deref().unwrap_or("").len() / 4 + calls.len() * 10) as u64;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens});
    match api {
        Api::Chat => {}
        other => {
            return other.reply(
                &model,
                reply.content.as_deref(),
                &calls,
                &finish,
                (prompt_tokens, completion_tokens),
                stream,
            );
        }
    }
    if stream {
        return sse(&model, reply.content.as_deref(), &calls, &finish, usage);
    }
    let mut message = json!({"role": "assistant", "content": reply.content});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    axum::Json(json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    }))
    .into_response()
}

/// The number of assistant messages in a request, and the tool call ids
/// of the last one (which the request must answer).
fn conversation_turn(request: &Value) -> (usize, Vec<String>) {
    let empty = Vec::new();
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let assistants: Vec<&Value> = messages
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
        .collect();
    let ids = assistants
        .last()
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
        .map(|calls| {
            calls
                .iter()
                .filter_map(|c| c.get("id").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (assistants.len(), ids)
}

/// The always-made checks plus the step's own.
fn check(request: &Value, expect: &Expect, last_call_ids: &[String]) -> Vec<String> {
    let mut problems = Vec::new();
    let empty = Vec::new();
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    if messages.is_empty() {
        problems.push("no messages".to_owned());
    }
    let tools: Vec<&str> = request
        .get("tools")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    for want in &expect.tools_include {
        if !tools.contains(&want.as_str()) {
            problems.push(format!("tool {want} not offered (offered: {tools:?})"));
        }
    }
    // The tool messages after the last assistant message must answer
    // every call of the previous reply, by id, in order. A request with
    // no assistant message starts a new conversation (another task),
    // which answers nothing.
    let last_assistant = messages
        .iter()
        .rposition(|m| m.get("role").and_then(Value::as_str) == Some("assistant"));
    let tail_start = last_assistant.map_or(messages.len(), |i| i + 1);
    let results: Vec<&Value> = messages[tail_start..]
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
        .collect();
    let answered: Vec<&str> = results
        .iter()
        .filter_map(|m| m.get("tool_call_id").and_then(Value::as_str))
        .collect();
    for id in last_call_ids.iter().filter(|_| last_assistant.is_some()) {
        if !answered.contains(&id.as_str()) {
            problems.push(format!(
                "tool call {id} of the previous reply got no tool message (got {answered:?})"
            ));
        }
    }
    for (i, want) in expect.tool_results.iter().enumerate() {
        let got = results
            .get(i)
            .and_then(|m| m.get("content"))
            .map(content_text)
            .unwrap_or_default();
        if !got.contains(&want.contains) {
            problems.push(format!(
                "tool result {} should contain {:?} but is {:?}",
                i + 1,
                want.contains,
                clip(&got)
            ));
        }
    }
    if let Some(want) = &expect.user_contains {
        let found = messages.iter().any(|m| {
            m.get("role").and_then(Value::as_str) == Some("user")
                && m.get("content")
                    .map(content_text)
                    .unwrap_or_default()
                    .contains(want.as_str())
        });
        if !found {
            problems.push(format!("no user message contains {want:?}"));
        }
    }
    problems
}

pub(crate) fn content_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

fn clip(s: &str) -> String {
    if s.len() > 300 {
        let mut end = 300;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    } else {
        s.to_owned()
    }
}

fn fail(inner: &mut Inner, api: Api, message: String) -> Response {
    inner.failures.push(message.clone());
    api.error(
        StatusCode::BAD_REQUEST,
        "script_mismatch",
        &format!("fake-model: {message}"),
    )
}

/// A streamed answer in OpenAI's SSE chunk format: role, content in
/// pieces, each tool call's name then its arguments in pieces, the finish
/// reason, usage, then `[DONE]`.
fn sse(
    model: &str,
    content: Option<&str>,
    calls: &[Value],
    finish: &str,
    usage: Value,
) -> Response {
    let chunk = |delta: Value, finish: Option<&str>| {
        let c = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {c}\n\n")
    };
    let mut out = chunk(json!({"role": "assistant", "content": ""}), None);
    if let Some(text) = content {
        for piece in pieces(text, 7) {
            out.push_str(&chunk(json!({"content": piece}), None));
        }
    }
    for (i, call) in calls.iter().enumerate() {
        let name = call
            .pointer("/function/name")
            .cloned()
            .unwrap_or(Value::Null);
        let id = call.get("id").cloned().unwrap_or(Value::Null);
        out.push_str(&chunk(
            json!({"tool_calls": [{"index": i, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
            None,
        ));
        let args = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("");
        for piece in pieces(args, 9) {
            out.push_str(&chunk(
                json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}),
                None,
            ));
        }
    }
    out.push_str(&chunk(json!({}), Some(finish)));
    let usage_chunk = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                             "model": model, "choices": [], "usage": usage});
    out.push_str(&format!("data: {usage_chunk}\n\n"));
    out.push_str("data: [DONE]\n\n");
    ([("content-type", "text/event-stream")], out).into_response()
}

fn pieces(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    chars.chunks(n).map(|c| c.iter().collect()).collect()
}

#[cfg(test)]
mod tests;
