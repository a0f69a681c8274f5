//! The model gateway: the only model endpoint a sandbox can reach.
//!
//! Each sandbox gets its own gateway, a Unix socket in its shim directory
//! (`gateway.sock`), which the shim forwards to loopback port
//! [`GATEWAY_PORT`] inside the sandbox: the sandbox has no network, so
//! this is its one way to a model. Calls carry the attempt's own token
//! (the sandbox's `OPENAI_API_KEY`; only its SHA-256 is stored, and it is
//! valid while the attempt is active). The gateway swaps it for the real
//! provider key from the server's environment on the way out, so the key
//! never enters a sandbox. It serves OpenAI chat completions and
//! responses (forwarded to `[model] base_url`) and Anthropic messages
//! (forwarded to `[model] anthropic_base_url`) and Gemini's
//! `generateContent` (to `[model] gemini_base_url`), streamed or not, and
//! answers `/v1/models`. It counts each call's tokens, records each
//! call as a `model_call` event (no secrets in it), and enforces the
//! task's token budget: once spent, calls get 429 and the attempt ends
//! `budget_exhausted`.

use crate::auth::hash_token;
use crate::serve::App;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use backshift_core::{FailureReason, Transition};
use backshift_protocol::{EventKind, TokenUsage};
use backshift_shim::proto::{GATEWAY_PORT, GATEWAY_SOCKET};
use futures::Stream;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// The gateway's base URL as agents inside the sandbox see it.
pub fn base_url_in_sandbox() -> String {
    format!("http://127.0.0.1:{GATEWAY_PORT}/v1")
}

/// A sandbox's gateway; it stops when this is dropped.
pub struct Gateway {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A new token for `attempt`'s sandbox; only its hash is stored (a new one
/// replaces the old: a rebuilt sandbox does not inherit it).
pub async fn issue_token(app: &App, attempt: &str) -> Result<String, backshift_store::StoreError> {
    let token = format!(
        "bsm_{}",
        crate::auth::generate_token().trim_start_matches("bs_")
    );
    app.store
        .set_gateway_token(attempt, &hash_token(&token))
        .await?;
    Ok(token)
}

/// The attempt whose sandbox holds `token` (its own, while it is active),
/// or why not.
pub(crate) async fn sandbox_token(
    app: &App,
    attempt: &str,
    token: Option<&str>,
) -> Result<backshift_store::AttemptRow, &'static str> {
    let Some(token) = token else {
        return Err("no token was sent");
    };
    let attempt = match app.store.attempt(attempt).await {
        Ok(Some(a)) => a,
        _ => return Err("this sandbox's attempt is unknown"),
    };
    if attempt.gateway_token_sha256.as_deref() != Some(hash_token(token).as_str()) {
        return Err("the token is not this sandbox's");
    }
    if attempt.state.is_terminal() {
        return Err("the attempt has ended; its token is no longer valid");
    }
    Ok(attempt)
}

struct GatewayState {
    app: Arc<App>,
    attempt: String,
    http: reqwest::Client,
}

/// Serves `attempt`'s gateway on the socket in its shim directory `dir`.
pub fn start(app: Arc<App>, attempt: &str, dir: &Path) -> std::io::Result<Gateway> {
    let path = dir.join(GATEWAY_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    // The shim (the sandbox's user) connects to it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    let state = Arc::new(GatewayState {
        app,
        attempt: attempt.to_owned(),
        http: reqwest::Client::new(),
    });
    let router = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/responses", post(responses))
        .route("/v1/messages", post(messages))
        .route("/v1beta/models/{action}", post(gemini))
        .route("/v1/models", get(models))
        .fallback(unsupported)
        .with_state(state);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::warn!("model gateway stopped: {e}");
        }
    });
    Ok(Gateway { task })
}

/// An error in the OpenAI format, which every client understands.
fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    let body = json!({"error": {"message": message.into(), "type": kind, "code": kind}});
    (status, axum::Json(body)).into_response()
}

async fn unsupported(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_supported",
        format!(
            "backshift's model gateway serves POST /v1/chat/completions, /v1/responses (OpenAI), /v1/messages (Anthropic), /v1beta/models/MODEL:generateContent (Gemini) and GET /v1/models; {method} {} is not supported",
            uri.path()
        ),
    )
}

impl GatewayState {
    /// Checks the caller's token against the attempt's; the attempt must
    /// still be active.
    async fn authorize(
        &self,
        headers: &HeaderMap,
    ) -> Result<backshift_store::AttemptRow, Response> {
        // OpenAI clients send a bearer token; Anthropic's send `x-api-key`.
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .or_else(|| headers.get("x-goog-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim);
        let refused = |why: &str| {
            error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                format!(
                    "{why}: use the sandbox's OPENAI_API_KEY (or BACKSHIFT_MODEL_TOKEN) as the bearer token or x-api-key"
                ),
            )
        };
        sandbox_token(&self.app, &self.attempt, token)
            .await
            .map_err(refused)
    }

    async fn record(&self, kind: EventKind) {
        if let Err(e) = self.app.hub.emit(&self.attempt, kind).await {
            tracing::error!(attempt = %self.attempt, "cannot record a model call: {e}");
        }
    }

    /// When the budget is spent: ends the attempt and says why.
    async fn over_budget(&self, attempt: &backshift_store::AttemptRow) -> Option<String> {
        let task = self.app.store.task(&attempt.task_id).await.ok()??;
        let budget = task.limits.max_tokens?;
        // Calls recorded a moment ago count: stored before the sum.
        self.app.hub.flush().await;
        let used = self.app.store.model_tokens_used(&self.attempt).await.ok()?;
        if used < budget {
            return None;
        }
        let detail = format!(
            "the agent used {used} model tokens of the {budget} allowed (limits.max_tokens) without finishing; retry with a larger budget or a narrower task"
        );
        self.app
            .audit(
                "policy",
                "budget.exhausted",
                &self.attempt,
                serde_json::json!({"used": used, "budget": budget}),
            )
            .await;
        if let Some(stop) = self.app.supervisor.stop_handle(&self.attempt) {
            stop.stop(
                Transition::Fail(FailureReason::BudgetExhausted),
                detail.clone(),
            );
        }
        Some(detail)
    }
}

async fn models(State(gw): State<Arc<GatewayState>>, headers: HeaderMap) -> Response {
    if let Err(r) = gw.authorize(&headers).await {
        return r;
    }
    let model = gw.app.config.model.model.clone();
    axum::Json(json!({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "backshift"}]}))
        .into_response()
}

/// The model APIs the gateway serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// OpenAI chat completions (`/v1/chat/completions`).
    Chat,
    /// OpenAI responses (`/v1/responses`).
    Responses,
    /// Anthropic messages (`/v1/messages`).
    Messages,
    /// Gemini (`/v1beta/models/<model>:generateContent`, or
    /// `:streamGenerateContent`).
    Gemini {
        /// Streamed.
        stream: bool,
    },
}

impl Api {
    /// Its name in `model_call` events.
    pub fn name(self) -> &'static str {
        match self {
            Api::Chat => "chat.completions",
            Api::Responses => "responses",
            Api::Messages => "messages",
            Api::Gemini { .. } => "gemini.generate_content",
        }
    }

    /// The upstream URL of a call to `model` at `base_url`.
    fn url(self, base_url: &str, model: &str) -> String {
        let base = base_url.trim_end_matches('/');
        match self {
            Api::Chat => format!("{base}/chat/completions"),
            Api::Responses => format!("{base}/responses"),
            Api::Messages => format!("{base}/messages"),
            Api::Gemini { stream: true } => {
                format!("{base}/v1beta/models/{model}:streamGenerateContent?alt=sse")
            }
            Api::Gemini { stream: false } => {
                format!("{base}/v1beta/models/{model}:generateContent")
            }
        }
    }
}

/// Where calls of one API go: the upstream's base URL, model and key.
struct Upstream {
    base_url: String,
    model: String,
    key: Option<String>,
}

fn upstream(app: &App, api: Api) -> Result<Upstream, String> {
    match api {
        Api::Chat | Api::Responses => {
            let c = app.model_config()?;
            Ok(Upstream {
                base_url: c.base_url,
                model: c.model,
                key: c.api_key,
            })
        }
        Api::Messages => {
            let m = &app.config.model;
            other_upstream(
                m,
                "Anthropic",
                "anthropic",
                m.anthropic_base_url.as_deref(),
                m.anthropic_model.as_deref(),
                m.anthropic_api_key_env.as_deref(),
            )
        }
        Api::Gemini { .. } => {
            let m = &app.config.model;
            other_upstream(
                m,
                "Gemini",
                "gemini",
                m.gemini_base_url.as_deref(),
                m.gemini_model.as_deref(),
                m.gemini_api_key_env.as_deref(),
            )
        }
    }
}

/// The upstream of an API configured by `[model] <prefix>_base_url`,
/// `<prefix>_model` (the main model when absent) and
/// `<prefix>_api_key_env`.
fn other_upstream(
    m: &crate::config::ModelSection,
    what: &str,
    prefix: &str,
    base_url: Option<&str>,
    model: Option<&str>,
    key_env: Option<&str>,
) -> Result<Upstream, String> {
    let base_url = base_url.ok_or_else(|| {
        format!("no {what} endpoint is configured: set [model] {prefix}_base_url (and {prefix}_model, {prefix}_api_key_env) in the server's config")
    })?;
    Ok(Upstream {
        base_url: base_url.to_owned(),
        model: model.unwrap_or(&m.model).to_owned(),
        key: crate::config::ModelSection::key_from_env(key_env, &format!("{prefix}_api_key_env"))?,
    })
}

/// Adds what one JSON body or stream event says about tokens to `u`:
/// chat completions' `usage`, a response's (or `response.completed`'s)
/// `usage`, Anthropic's `message_start` input and `message_delta`
/// (cumulative) output counts.
fn add_usage(api: Api, v: &Value, u: &mut Option<TokenUsage>) {
    let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64);
    match api {
        Api::Chat => {
            if let Some(x) = v.get("usage")
                && let (Some(i), Some(o)) = (n(x, "prompt_tokens"), n(x, "completion_tokens"))
            {
                *u = Some(TokenUsage {
                    input_tokens: i,
                    output_tokens: o,
                });
            }
        }
        Api::Responses => {
            let x = v.pointer("/response/usage").or_else(|| v.get("usage"));
            if let Some(x) = x
                && let (Some(i), Some(o)) = (n(x, "input_tokens"), n(x, "output_tokens"))
            {
                *u = Some(TokenUsage {
                    input_tokens: i,
                    output_tokens: o,
                });
            }
        }
        Api::Gemini { .. } => {
            // Each chunk's counts are the totals so far.
            if let Some(x) = v.get("usageMetadata")
                && let Some(i) = n(x, "promptTokenCount")
            {
                *u = Some(TokenUsage {
                    input_tokens: i,
                    output_tokens: n(x, "candidatesTokenCount").unwrap_or(0)
                        + n(x, "thoughtsTokenCount").unwrap_or(0),
                });
            }
        }
        Api::Messages => {
            let x = v.pointer("/message/usage").or_else(|| v.get("usage"));
            if let Some(x) = x {
                let now = u.get_or_insert_with(TokenUsage::default);
                if let Some(i) = n(x, "input_tokens") {
                    now.input_tokens = i
                        + n(x, "cache_read_input_tokens").unwrap_or(0)
                        + n(x, "cache_creation_input_tokens").unwrap_or(0);
                }
                if let Some(o) = n(x, "output_tokens") {
                    now.output_tokens = o;
                }
            }
        }
    }
}

async fn chat(gw: State<Arc<GatewayState>>, headers: HeaderMap, body: Bytes) -> Response {
    forward(gw, Api::Chat, headers, body).await
}

async fn responses(gw: State<Arc<GatewayState>>, headers: HeaderMap, body: Bytes) -> Response {
    forward(gw, Api::Responses, headers, body).await
}

async fn messages(gw: State<Arc<GatewayState>>, headers: HeaderMap, body: Bytes) -> Response {
    forward(gw, Api::Messages, headers, body).await
}

/// `/v1beta/models/<model>:<method>`: the model in the path is replaced
/// by the configured one.
async fn gemini(
    gw: State<Arc<GatewayState>>,
    axum::extract::Path(action): axum::extract::Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let stream = match action.split_once(':').map(|(_, m)| m) {
        Some("streamGenerateContent") => true,
        Some("generateContent") => false,
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                "not_supported",
                format!(
                    "backshift's model gateway serves Gemini's generateContent and streamGenerateContent, not {action}"
                ),
            );
        }
    };
    forward(gw, Api::Gemini { stream }, headers, body).await
}

/// An error in the format of `api`'s clients.
fn api_error(api: Api, status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    match api {
        Api::Messages => {
            let body = json!({"type": "error", "error": {"type": kind, "message": message.into()}});
            (status, axum::Json(body)).into_response()
        }
        Api::Gemini { .. } => {
            let body = json!({"error": {"code": status.as_u16(), "message": message.into(), "status": kind}});
            (status, axum::Json(body)).into_response()
        }
        _ => error(status, kind, message),
    }
}

async fn forward(
    State(gw): State<Arc<GatewayState>>,
    api: Api,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let attempt = match gw.authorize(&headers).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let prices = gw.app.config.model.prices();
    let target = upstream(&gw.app, api);
    let model = match &target {
        Ok(t) => t.model.clone(),
        Err(_) => gw.app.config.model.model.clone(),
    };
    let call =
        move |status: u16, stream: bool, usage: Option<TokenUsage>, error: Option<String>| {
            EventKind::ModelCall {
                api: api.name().into(),
                model: model.clone(),
                stream,
                status,
                usage,
                cost_usd: prices.zip(usage).map(|(p, u)| p.cost(&u)),
                latency_ms: started.elapsed().as_millis() as u64,
                error,
            }
        };
    if let Some(detail) = gw.over_budget(&attempt).await {
        gw.record(call(429, false, None, Some(detail.clone())))
            .await;
        let kind = match api {
            Api::Messages => "rate_limit_error",
            _ => "insufficient_quota",
        };
        return api_error(api, StatusCode::TOO_MANY_REQUESTS, kind, detail);
    }
    let target = match target {
        Ok(t) => t,
        Err(e) => {
            gw.record(call(503, false, None, Some(e.clone()))).await;
            return api_error(api, StatusCode::SERVICE_UNAVAILABLE, "api_error", e);
        }
    };
    let mut request: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return api_error(
                api,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("the body is not a JSON object (a {} request)", api.name()),
            );
        }
    };
    // One upstream model per API and server (Gemini names it in the path).
    let stream = match api {
        Api::Gemini { stream } => stream,
        _ => {
            request["model"] = json!(target.model);
            request.get("stream").and_then(Value::as_bool) == Some(true)
        }
    };
    if stream && api == Api::Chat {
        // Streamed chat completions report their usage only when asked.
        request["stream_options"] = json!({"include_usage": true});
    }
    let url = api.url(&target.base_url, &target.model);
    let mut upstream = gw.http.post(&url).json(&request);
    match (api, &target.key) {
        (Api::Messages, key) => {
            let version = headers
                .get("anthropic-version")
                .cloned()
                .unwrap_or(header::HeaderValue::from_static("2023-06-01"));
            upstream = upstream.header("anthropic-version", version);
            if let Some(beta) = headers.get("anthropic-beta") {
                upstream = upstream.header("anthropic-beta", beta.clone());
            }
            if let Some(key) = key {
                upstream = upstream.header("x-api-key", key);
            }
        }
        (Api::Gemini { .. }, Some(key)) => upstream = upstream.header("x-goog-api-key", key),
        (_, Some(key)) => upstream = upstream.bearer_auth(key),
        (_, None) => {}
    }
    let response = match upstream.send().await {
        Ok(r) => r,
        Err(e) => {
            let why = format!("the model endpoint ([model]) cannot be reached: {e}");
            gw.record(call(502, stream, None, Some(why.clone()))).await;
            return api_error(api, StatusCode::BAD_GATEWAY, "api_error", why);
        }
    };
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(header::HeaderValue::from_static("application/json"));
    if !stream || !response.status().is_success() {
        let bytes = response.bytes().await.unwrap_or_default();
        let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
        let mut usage = None;
        if let Some(v) = &parsed {
            add_usage(api, v, &mut usage);
        }
        let failure = (status >= 400).then(|| {
            parsed
                .as_ref()
                .and_then(|v| v.pointer("/error/message"))
                .and_then(Value::as_str)
                .unwrap_or("the model endpoint refused the call")
                .to_owned()
        });
        gw.record(call(status, stream, usage, failure)).await;
        return Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(bytes))
            .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response());
    }
    // Streamed: passed through as it comes, watched for token counts;
    // the call is recorded when the stream ends (or the client leaves).
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tap = UsageTap {
        api,
        inner: Box::pin(futures::StreamExt::map(response.bytes_stream(), |r| {
            r.map_err(std::io::Error::other)
        })),
        line: Vec::new(),
        usage: None,
        done: Some(tx),
    };
    let gw2 = gw.clone();
    tokio::spawn(async move {
        let usage = rx.await.ok().flatten();
        gw2.record(call(status, true, usage, None)).await;
    });
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from_stream(tap))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Passes a server-sent-event stream through, noting the `usage` of its
/// chunks; reports it once, at the end (or when dropped).
struct UsageTap {
    api: Api,
    inner: ByteStream,
    line: Vec<u8>,
    usage: Option<TokenUsage>,
    done: Option<tokio::sync::oneshot::Sender<Option<TokenUsage>>>,
}

impl UsageTap {
    fn watch(&mut self, bytes: &[u8]) {
        for b in bytes {
            if *b != b'\n' {
                self.line.push(*b);
                continue;
            }
            let line = std::mem::take(&mut self.line);
            if let Some(data) = line.strip_prefix(b"data:")
                && let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii())
            {
                add_usage(self.api, &v, &mut self.usage);
            }
        }
    }

    fn finish(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(self.usage);
        }
    }
}

impl Stream for UsageTap {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let polled = self.inner.as_mut().poll_next(cx);
        match &polled {
            Poll::Ready(Some(Ok(bytes))) => {
                let bytes = bytes.clone();
                self.watch(&bytes);
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }
}

impl Drop for UsageTap {
    fn drop(&mut self) {
        self.finish();
    }
}
