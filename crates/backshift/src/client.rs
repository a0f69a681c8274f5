//! The HTTP client of the CLI: every command talks to the server over its
//! API, so the CLI works the same against a remote server.

use anyhow::{Context, bail};
use backshift_protocol::ErrorBody;
use serde::de::DeserializeOwned;

/// A server and the token to use with it.
pub struct Client {
    /// Base URL, without a trailing slash.
    pub url: String,
    /// API token.
    pub token: String,
    http: reqwest::Client,
}

impl Client {
    /// Resolves the token from `BACKSHIFT_TOKEN` or the credentials file.
    pub fn new(url: &str) -> anyhow::Result<Client> {
        let url = url.trim_end_matches('/').to_owned();
        let token = match std::env::var("BACKSHIFT_TOKEN") {
            Ok(t) if !t.is_empty() => t,
            _ => crate::credentials::load(&url).with_context(|| {
                format!(
                    "no API token for {url}: set BACKSHIFT_TOKEN, or start the server once on this machine (it saves its first token to {})",
                    crate::credentials::path().display()
                )
            })?,
        };
        Ok(Client {
            url,
            token,
            http: reqwest::Client::new(),
        })
    }

    /// A request builder with auth.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.token)
    }

    /// Sends and decodes JSON, turning API errors into readable ones.
    pub async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let resp = self.send_raw(req).await?;
        resp.json()
            .await
            .context("the server's answer is not what this CLI expects")
    }

    /// Sends and checks the status.
    pub async fn send_raw(
        &self,
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the backshift server at {}: {e}\nStart it with `backshift serve` (or set --server / BACKSHIFT_URL).",
                self.url
            )
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => {
                let hint = body
                    .error
                    .hint
                    .map(|h| format!("\nhint: {h}"))
                    .unwrap_or_default();
                bail!(
                    "{} ({}, {status}){hint}",
                    body.error.message,
                    body.error.code
                )
            }
            Err(_) => bail!("the server answered {status}: {text}"),
        }
    }
}
