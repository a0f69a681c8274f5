//! The OpenAI chat-completions client, with retries for what is worth
//! retrying (connection failures, timeouts, 429 and 5xx) and a clear
//! failure for what is not.

use backshift_protocol::{TokenUsage, ToolCallRecord};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Where the model is and how to talk to it.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Base URL ending before `/chat/completions` (e.g. `http://host/v1`).
    pub base_url: String,
    /// Model name.
    pub model: String,
    /// API key, sent as a bearer token when present.
    pub api_key: Option<String>,
    /// Retries after a retryable failure before giving up.
    pub max_retries: u32,
    /// First backoff; doubled after each retry, capped at 30 s.
    pub retry_base: Duration,
    /// Timeout of one request.
    pub request_timeout: Duration,
    /// Maximum tokens of one response, when set.
    pub max_tokens: Option<u32>,
    /// What tokens cost, when known.
    pub prices: Option<backshift_protocol::Prices>,
}

/// One assistant reply.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Text, if any.
    pub text: Option<String>,
    /// Tool calls, in order.
    pub tool_calls: Vec<ToolCallRecord>,
    /// Finish reason.
    pub finish_reason: Option<String>,
    /// Token counts.
    pub usage: Option<TokenUsage>,
}

/// Why the model could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelFailure {
    /// No answer at all after the retries (down, refused, timing out).
    #[error("model endpoint {url} unreachable after {tries} tries: {last}")]
    Unreachable {
        /// The endpoint.
        url: String,
        /// Requests sent.
        tries: u32,
        /// The last error.
        last: String,
    },
    /// An answer we cannot use (auth, bad request, unparsable body).
    #[error("model endpoint {url} answered {status}: {body}")]
    Rejected {
        /// The endpoint.
        url: String,
        /// HTTP status (0 when the body was unusable).
        status: u16,
        /// The body or the parse error.
        body: String,
    },
}

/// A retry about to happen, for the caller to record.
#[derive(Debug, Clone)]
pub struct Retry {
    /// Which retry, from 1.
    pub retry: u32,
    /// What went wrong.
    pub error: String,
    /// Wait before the retry.
    pub wait: Duration,
}

/// Talks to the configured endpoint.
#[derive(Debug, Clone)]
pub struct ModelClient {
    http: reqwest::Client,
    config: ModelConfig,
}

impl ModelClient {
    /// A client for `config`.
    pub fn new(config: ModelConfig) -> Result<Self, ModelFailure> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| ModelFailure::Rejected {
                url: config.base_url.clone(),
                status: 0,
                body: format!("cannot build HTTP client: {e}"),
            })?;
        Ok(ModelClient { http, config })
    }

    /// What tokens cost, when configured.
    pub fn prices(&self) -> Option<backshift_protocol::Prices> {
        self.config.prices
    }

    /// The endpoint URL.
    pub fn url(&self) -> String {
        format!(
            "{}/chat/completions",
            self.config.base_url.trim_end_matches('/')
        )
    }

    /// Sends one request; `on_retry` hears about each retry before its wait.
    pub async fn complete(
        &self,
        messages: &[Value],
        tools: &Value,
        on_retry: &mut (dyn FnMut(Retry) + Send),
    ) -> Result<Completion, ModelFailure> {
        let url = self.url();
        let mut body = json!({
            "model": self.config.model,
            "messages": messages,
            "tools": tools,
            "tool_choice": "auto",
            "stream": false,
        });
        if let Some(max) = self.config.max_tokens {
            body["max_tokens"] = json!(max);
        }
        let mut tries = 0;
        loop {
            tries += 1;
            let mut req = self.http.post(&url).json(&body);
            if let Some(key) = &self.config.api_key {
                req = req.bearer_auth(key);
            }
            let (error, retry_after) = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = resp.text().await.unwrap_or_default();
                    if status.is_success() {
                        return parse(&text).map_err(|e| ModelFailure::Rejected {
                            url: url.clone(),
                            status: 0,
                            body: format!("unusable completion ({e}): {}", clip(&text)),
                        });
                    }
                    if status.as_u16() != 429 && !status.is_server_error() {
                        return Err(ModelFailure::Rejected {
                            url,
                            status: status.as_u16(),
                            body: clip(&text),
                        });
                    }
                    (format!("HTTP {status}: {}", clip(&text)), retry_after)
                }
                Err(e) => (describe(&e), None),
            };
            if tries > self.config.max_retries {
                return Err(ModelFailure::Unreachable {
                    url,
                    tries,
                    last: error,
                });
            }
            let backoff = self.config.retry_base * 2u32.saturating_pow(tries - 1);
            let wait = retry_after.unwrap_or(backoff).min(Duration::from_secs(30));
            on_retry(Retry {
                retry: tries,
                error,
                wait,
            });
            tokio::time::sleep(wait).await;
        }
    }
}

fn describe(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    if e.is_timeout() {
        s.push_str(" (timed out)");
    }
    s
}

fn parse(text: &str) -> Result<Completion, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let choice = v
        .pointer("/choices/0")
        .ok_or_else(|| "no choices".to_owned())?;
    let message = choice
        .get("message")
        .ok_or_else(|| "no message".to_owned())?;
    let text = message
        .get("content")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let tool_calls = message
        .get("tool_calls")
        .and_then(Value::as_array)
        .map(|calls| {
            calls
                .iter()
                .enumerate()
                .map(|(i, c)| ToolCallRecord {
                    call_id: c
                        .get("id")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .unwrap_or_else(|| format!("call_{i}")),
                    name: c
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    arguments: match c.pointer("/function/arguments") {
                        Some(Value::String(s)) => s.clone(),
                        Some(other) => other.to_string(),
                        None => String::new(),
                    },
                })
                .collect()
        })
        .unwrap_or_default();
    let usage = v.get("usage").map(|u| TokenUsage {
        input_tokens: u.get("prompt_tokens").and_then(Value::as_u64).unwrap_or(0),
        output_tokens: u
            .get("completion_tokens")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    });
    Ok(Completion {
        text,
        tool_calls,
        finish_reason: choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
        usage,
    })
}

/// Shortens long text for error messages.
pub(crate) fn clip(s: &str) -> String {
    clip_at(s, 500)
}

/// Shortens text to at most `max` bytes (at a character boundary), saying
/// how long it was.
pub(crate) fn clip_at(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// Measures a request.
pub(crate) fn elapsed_ms(start: Instant) -> u64 {
    start.elapsed().as_millis() as u64
}
