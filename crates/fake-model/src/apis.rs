//! The request and answer formats beyond chat completions: OpenAI's
//! responses API and Anthropic's messages API. Requests are normalized to
//! the chat-completions form the script's checks read (messages with
//! `tool_calls` and `tool` results, `tools` as functions); answers are
//! rendered in the API's own format, streamed as its server-sent events.

use crate::content_text;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Which API a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// OpenAI chat completions.
    Chat,
    /// OpenAI responses.
    Responses,
    /// Anthropic messages.
    Messages,
    /// Gemini `generateContent` (`stream`: `streamGenerateContent`).
    Gemini {
        /// Whether the answer is streamed.
        stream: bool,
    },
}

impl Api {
    /// `raw` in chat-completions form.
    pub fn normalize(self, raw: &Value) -> Value {
        match self {
            Api::Chat => raw.clone(),
            Api::Responses => responses_to_chat(raw),
            Api::Messages => messages_to_chat(raw),
            Api::Gemini { stream } => gemini_to_chat(raw, stream),
        }
    }

    /// An error in the API's format.
    pub fn error(self, status: StatusCode, kind: &str, message: &str) -> Response {
        let body = match self {
            Api::Messages => {
                json!({"type": "error", "error": {"type": kind, "message": message}})
            }
            Api::Gemini { .. } => {
                json!({"error": {"code": status.as_u16(), "message": message, "status": kind}})
            }
            _ => json!({"error": {"message": message, "type": kind}}),
        };
        (status, axum::Json(body)).into_response()
    }

    /// A reply in the API's format. `calls` are chat-completions tool
    /// calls (`id`, `function.name`, `function.arguments`).
    pub fn reply(
        self,
        model: &str,
        content: Option<&str>,
        calls: &[Value],
        finish: &str,
        (input, output): (u64, u64),
        stream: bool,
    ) -> Response {
        match self {
            Api::Chat => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
            Api::Responses => responses_reply(model, content, calls, (input, output), stream),
            Api::Messages => messages_reply(model, content, calls, finish, (input, output), stream),
            Api::Gemini { .. } => {
                gemini_reply(model, content, calls, finish, (input, output), stream)
            }
        }
    }
}

/// A chat request with `messages`, offering `tools` (each named by its
/// `name`), with `raw`'s model and stream flag.
fn chat_request(raw: &Value, messages: Vec<Value>, tools: Option<&Value>) -> Value {
    let tools: Vec<Value> = tools
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let name = t.get("name")?.clone();
            Some(json!({"type": "function", "function": {"name": name}}))
        })
        .collect();
    json!({"model": raw.get("model").cloned().unwrap_or(Value::Null),
           "stream": raw.get("stream").cloned().unwrap_or(Value::Bool(false)),
           "messages": messages, "tools": tools})
}

/// `input` items (and `instructions`) as chat messages; consecutive
/// `function_call`s become one assistant message's `tool_calls`.
fn responses_to_chat(raw: &Value) -> Value {
    let mut messages: Vec<Value> = Vec::new();
    if let Some(i) = raw.get("instructions").and_then(Value::as_str) {
        messages.push(json!({"role": "system", "content": i}));
    }
    let items: Vec<Value> = match raw.get("input") {
        Some(Value::String(s)) => vec![json!({"type": "message", "role": "user", "content": s})],
        Some(Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    for item in items {
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        match kind {
            "message" => {
                let role = match item.get("role").and_then(Value::as_str) {
                    Some("developer") | Some("system") => "system",
                    Some(r) => r,
                    None => "user",
                };
                let text = item.get("content").map(content_text).unwrap_or_default();
                messages.push(json!({"role": role, "content": text}));
            }
            "function_call" | "custom_tool_call" | "local_shell_call" => {
                let call = json!({"id": item.get("call_id").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {"name": item.get("name").cloned().unwrap_or(Value::Null),
                                 "arguments": item.get("arguments").or_else(|| item.get("input")).cloned().unwrap_or(Value::Null)}});
                match messages.last_mut() {
                    Some(m)
                        if m["role"] == "assistant"
                            && m.get("tool_calls").is_some_and(Value::is_array) =>
                    {
                        if let Some(calls) = m["tool_calls"].as_array_mut() {
                            calls.push(call);
                        }
                    }
                    Some(m) if m["role"] == "assistant" && m.get("tool_calls").is_none() => {
                        m["tool_calls"] = json!([call]);
                    }
                    _ => messages
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            "function_call_output" | "custom_tool_call_output" => {
                let output = item.get("output").map(content_text).unwrap_or_default();
                messages.push(json!({"role": "tool",
                    "tool_call_id": item.get("call_id").cloned().unwrap_or(Value::Null),
                    "content": output}));
            }
            _ => {}
        }
    }
    chat_request(raw, messages, raw.get("tools"))
}

/// Anthropic messages as chat messages: `tool_use` blocks become
/// `tool_calls`, `tool_result` blocks `tool` messages.
fn messages_to_chat(raw: &Value) -> Value {
    let mut messages: Vec<Value> = Vec::new();
    if let Some(system) = raw.get("system") {
        messages.push(json!({"role": "system", "content": content_text(system)}));
    }
    for m in raw
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let blocks: Vec<Value> = match m.get("content") {
            Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
            Some(Value::Array(a)) => a.clone(),
            _ => Vec::new(),
        };
        let mut text = String::new();
        let mut calls = Vec::new();
        for b in &blocks {
            match b.get("type").and_then(Value::as_str) {
                Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                Some("tool_use") => calls.push(json!({"id": b.get("id").cloned().unwrap_or(Value::Null),
                    "type": "function",
                    "function": {"name": b.get("name").cloned().unwrap_or(Value::Null),
                                 "arguments": b.get("input").map(Value::to_string).unwrap_or_default()}})),
                Some("tool_result") => messages.push(json!({"role": "tool",
                    "tool_call_id": b.get("tool_use_id").cloned().unwrap_or(Value::Null),
                    "content": b.get("content").map(content_text).unwrap_or_default()})),
                _ => {}
            }
        }
        if role == "assistant" {
            let mut msg = json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            messages.push(msg);
        } else if !text.is_empty() {
            messages.push(json!({"role": role, "content": text}));
        }
    }
    chat_request(raw, messages, raw.get("tools"))
}

fn sse_events(events: &[(&str, Value)]) -> Response {
    let mut out = String::new();
    for (name, data) in events {
        out.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    }
    ([("content-type", "text/event-stream")], out).into_response()
}

fn call_parts(call: &Value) -> (Value, Value, String) {
    (
        call.get("id").cloned().unwrap_or(Value::Null),
        call.pointer("/function/name")
            .cloned()
            .unwrap_or(Value::Null),
        call.pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
    )
}

/// A call's id, name and arguments as JSON (`{}` when they are not).
fn call_input(call: &Value) -> (Value, Value, Value) {
    let (id, name, args) = call_parts(call);
    (
        id,
        name,
        serde_json::from_str(&args).unwrap_or_else(|_| json!({})),
    )
}

fn responses_reply(
    model: &str,
    content: Option<&str>,
    calls: &[Value],
    (input, output): (u64, u64),
    stream: bool,
) -> Response {
    let message = |text: &str| {
        json!({"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
               "content": [{"type": "output_text", "text": text, "annotations": []}]})
    };
    let mut items = Vec::new();
    if let Some(text) = content.filter(|t| !t.is_empty()) {
        items.push(message(text));
    }
    for (i, call) in calls.iter().enumerate() {
        let (id, name, args) = call_parts(call);
        items.push(
            json!({"type": "function_call", "id": format!("fc_fake_{i}"), "call_id": id,
                          "name": name, "arguments": args, "status": "completed"}),
        );
    }
    let usage = json!({"input_tokens": input, "output_tokens": output, "total_tokens": input + output,
                       "input_tokens_details": {"cached_tokens": 0},
                       "output_tokens_details": {"reasoning_tokens": 0}});
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": "resp_fake", "object": "response", "created_at": 0, "status": status,
               "model": model, "output": output, "usage": usage})
    };
    if !stream {
        return axum::Json(response("completed", Value::Array(items), usage)).into_response();
    }
    let mut seq = 0u64;
    let mut events: Vec<(&str, Value)> = Vec::new();
    let mut push = |name: &'static str, mut data: Value| {
        data["type"] = json!(name);
        data["sequence_number"] = json!(seq);
        seq += 1;
        events.push((name, data));
    };
    push(
        "response.created",
        json!({"response": response("in_progress", json!([]), Value::Null)}),
    );
    for (index, item) in items.iter().enumerate() {
        match item["type"].as_str() {
            Some("message") => {
                let text = item
                    .pointer("/content/0/text")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                push(
                    "response.output_item.added",
                    json!({"output_index": index,
                    "item": {"type": "message", "id": "msg_fake", "status": "in_progress", "role": "assistant", "content": []}}),
                );
                push(
                    "response.content_part.added",
                    json!({"item_id": "msg_fake", "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": []}}),
                );
                for piece in super::pieces(text, 7) {
                    push(
                        "response.output_text.delta",
                        json!({"item_id": "msg_fake", "output_index": index, "content_index": 0, "delta": piece}),
                    );
                }
                push(
                    "response.output_text.done",
                    json!({"item_id": "msg_fake", "output_index": index, "content_index": 0, "text": text}),
                );
                push(
                    "response.content_part.done",
                    json!({"item_id": "msg_fake", "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": text, "annotations": []}}),
                );
            }
            _ => {
                let id = item["id"].clone();
                let args = item["arguments"].as_str().unwrap_or("").to_owned();
                let mut added = item.clone();
                added["arguments"] = json!("");
                added["status"] = json!("in_progress");
                push(
                    "response.output_item.added",
                    json!({"output_index": index, "item": added}),
                );
                for piece in super::pieces(&args, 9) {
                    push(
                        "response.function_call_arguments.delta",
                        json!({"item_id": id, "output_index": index, "delta": piece}),
                    );
                }
                push(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": index, "arguments": args}),
                );
            }
        }
        push(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
    }
    push(
        "response.completed",
        json!({"response": response("completed", Value::Array(items), usage)}),
    );
    sse_events(&events)
}

fn messages_reply(
    model: &str,
    content: Option<&str>,
    calls: &[Value],
    finish: &str,
    (input, output): (u64, u64),
    stream: bool,
) -> Response {
    let stop_reason = match finish {
        "tool_calls" => "tool_use",
        "length" => "max_tokens",
        _ => "end_turn",
    };
    let mut blocks = Vec::new();
    if let Some(text) = content.filter(|t| !t.is_empty()) {
        blocks.push(json!({"type": "text", "text": text}));
    }
    for call in calls {
        let (id, name, input) = call_input(call);
        blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
    }
    let message = |content: Value, stop: Value, out: u64| {
        json!({"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
               "content": content, "stop_reason": stop, "stop_sequence": null,
               "usage": {"input_tokens": input, "output_tokens": out}})
    };
    if !stream {
        return axum::Json(message(Value::Array(blocks), json!(stop_reason), output))
            .into_response();
    }
    let mut events: Vec<(&str, Value)> = vec![(
        "message_start",
        json!({"type": "message_start", "message": message(json!([]), Value::Null, 1)}),
    )];
    for (index, block) in blocks.iter().enumerate() {
        if block["type"] == "text" {
            events.push((
                "content_block_start",
                json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "text", "text": ""}}),
            ));
            for piece in super::pieces(block["text"].as_str().unwrap_or(""), 7) {
                events.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": piece}}),
                ));
            }
        } else {
            events.push(("content_block_start", json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}})));
            for piece in super::pieces(&block["input"].to_string(), 9) {
                events.push((
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": piece}}),
                ));
            }
        }
        events.push((
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
    }
    events.push((
        "message_delta",
        json!({"type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": null},
        "usage": {"output_tokens": output}}),
    ));
    events.push(("message_stop", json!({"type": "message_stop"})));
    sse_events(&events)
}

/// Gemini `contents` as chat messages: `functionCall` parts become
/// `tool_calls`, `functionResponse` parts `tool` messages (matched by
/// their `id`, or by name when the client sends none).
fn gemini_to_chat(raw: &Value, stream: bool) -> Value {
    let mut messages: Vec<Value> = Vec::new();
    if let Some(system) = raw.get("systemInstruction") {
        let text = system.get("parts").map(content_text).unwrap_or_default();
        messages.push(json!({"role": "system", "content": text}));
    }
    for c in raw
        .get("contents")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let role = c.get("role").and_then(Value::as_str).unwrap_or("user");
        let parts = c
            .get("parts")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut text = String::new();
        let mut calls = Vec::new();
        for p in &parts {
            if let Some(t) = p.get("text").and_then(Value::as_str) {
                text.push_str(t);
            } else if let Some(f) = p.get("functionCall") {
                let id = f
                    .get("id")
                    .or_else(|| f.get("name"))
                    .cloned()
                    .unwrap_or(Value::Null);
                calls.push(json!({"id": id, "type": "function",
                    "function": {"name": f.get("name").cloned().unwrap_or(Value::Null),
                                 "arguments": f.get("args").map(Value::to_string).unwrap_or_default()}}));
            } else if let Some(f) = p.get("functionResponse") {
                let id = f
                    .get("id")
                    .or_else(|| f.get("name"))
                    .cloned()
                    .unwrap_or(Value::Null);
                messages.push(json!({"role": "tool", "tool_call_id": id,
                    "content": f.get("response").map(Value::to_string).unwrap_or_default()}));
            }
        }
        if role == "model" {
            let mut msg = json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            messages.push(msg);
        } else if !text.is_empty() {
            messages.push(json!({"role": "user", "content": text}));
        }
    }
    let declarations: Vec<Value> = raw
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("functionDeclarations").and_then(Value::as_array))
        .flatten()
        .cloned()
        .collect();
    // The model is named in the path, the stream in the method.
    chat_request(
        &json!({"stream": stream}),
        messages,
        Some(&Value::Array(declarations)),
    )
}

fn gemini_reply(
    model: &str,
    content: Option<&str>,
    calls: &[Value],
    finish: &str,
    (input, output): (u64, u64),
    stream: bool,
) -> Response {
    let reason = match finish {
        "length" => "MAX_TOKENS",
        _ => "STOP",
    };
    let usage = json!({"promptTokenCount": input, "candidatesTokenCount": output,
                       "totalTokenCount": input + output});
    let chunk = |parts: Vec<Value>, finish: Option<&str>, usage: Option<&Value>| {
        let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
        if let Some(f) = finish {
            candidate["finishReason"] = json!(f);
        }
        let mut c = json!({"candidates": [candidate], "modelVersion": model});
        if let Some(u) = usage {
            c["usageMetadata"] = u.clone();
        }
        c
    };
    let call_parts: Vec<Value> = calls
        .iter()
        .map(|call| {
            let (id, name, args) = call_input(call);
            json!({"functionCall": {"id": id, "name": name, "args": args}})
        })
        .collect();
    if !stream {
        let mut parts = Vec::new();
        if let Some(text) = content.filter(|t| !t.is_empty()) {
            parts.push(json!({"text": text}));
        }
        parts.extend(call_parts);
        return axum::Json(chunk(parts, Some(reason), Some(&usage))).into_response();
    }
    let mut chunks = Vec::new();
    if let Some(text) = content.filter(|t| !t.is_empty()) {
        for piece in super::pieces(text, 7) {
            chunks.push(chunk(vec![json!({"text": piece})], None, None));
        }
    }
    if !call_parts.is_empty() {
        chunks.push(chunk(call_parts, None, None));
    }
    chunks.push(chunk(Vec::new(), Some(reason), Some(&usage)));
    let mut out = String::new();
    for c in chunks {
        out.push_str(&format!("data: {c}\r\n\r\n"));
    }
    ([("content-type", "text/event-stream")], out).into_response()
}
