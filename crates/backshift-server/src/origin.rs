//! Where a task came from, and its outcome reported back there once it
//! ended: a comment on the GitHub issue or pull request, or a signed POST
//! to a generic webhook's `callback_url`.

use crate::serve::App;
use backshift_core::AttemptState;
use backshift_git::forge::{Forge, ForgeKind, owner_and_repo};
use backshift_protocol::{TaskView, now_ms};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;
use std::sync::Arc;

/// A task's origin, stored with it as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Origin {
    /// A GitHub issue labelled for backshift, or a `/backshift` comment on
    /// one of its pull requests (`number` is the issue's or the PR's).
    Github {
        /// The repository's clone URL.
        repo_url: String,
        /// The issue or pull request.
        number: u64,
        /// Its page.
        html_url: String,
        /// Who asked.
        sender: String,
    },
    /// A Linear issue given the label.
    Linear {
        /// The issue's id (for the API).
        issue_id: String,
        /// Its identifier (`ENG-123`).
        identifier: String,
        /// Its page.
        url: String,
    },
    /// A Jira issue given the label.
    Jira {
        /// Its key (`CALC-7`).
        key: String,
        /// Its page.
        url: String,
    },
    /// The generic signed webhook.
    Generic {
        /// Where the outcome is posted, if anywhere.
        callback_url: Option<String>,
        /// The delivery that created it.
        delivery: String,
    },
}

/// HMAC-SHA256 keyed by `secret`, fed `"<prefix>."` first when given.
/// (`None` only if the key were refused, which HMAC never does.)
fn mac(secret: &str, prefix: Option<&str>) -> Option<Hmac<Sha256>> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).ok()?;
    if let Some(p) = prefix {
        mac.update(p.as_bytes());
        mac.update(b".");
    }
    Some(mac)
}

/// The signature of a generic webhook body (or callback): HMAC-SHA256 of
/// `"<timestamp>.<body>"`, as `sha256=<hex>`.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    let digest = mac(secret, Some(timestamp)).map(|mut m| {
        m.update(body);
        hex::encode(m.finalize().into_bytes())
    });
    format!("sha256={}", digest.unwrap_or_default())
}

/// Whether `signature` (`sha256=<hex>`) is `body`'s under `secret`, with
/// `prefix` (GitHub: none; generic: the timestamp). Constant time.
pub fn verify(secret: &str, prefix: Option<&str>, body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_sig) else {
        return false;
    };
    let Some(mut mac) = mac(secret, prefix) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

/// Reports the task's outcome where it came from, once, when every
/// attempt has ended (after its result was chosen and delivered).
pub async fn report(app: &Arc<App>, task_id: &str) {
    let Ok(Some(task)) = app.store.task(task_id).await else {
        return;
    };
    let Some(origin) = task
        .origin
        .as_deref()
        .and_then(|o| serde_json::from_str::<Origin>(o).ok())
    else {
        return;
    };
    let Ok(view) = crate::results::task_view(app, task).await else {
        return;
    };
    if view.attempts.iter().any(|a| !a.state.is_terminal()) {
        return;
    }
    if !matches!(app.store.claim_report(task_id, now_ms()).await, Ok(true)) {
        return;
    }
    let result = match origin {
        Origin::Github {
            repo_url, number, ..
        } => comment_on_github(app, &view, &repo_url, number).await,
        Origin::Generic {
            callback_url: Some(url),
            ..
        } => post_callback(app, &view, &url).await,
        Origin::Generic { .. } => Ok(()),
        Origin::Linear { issue_id, .. } => comment_on_linear(app, &view, &issue_id).await,
        Origin::Jira { key, .. } => comment_on_jira(app, &view, &key).await,
    };
    let (action, detail) = match &result {
        Ok(()) => ("task.report", serde_json::json!({})),
        Err(e) => ("task.report.failed", serde_json::json!({"error": e})),
    };
    if let Err(e) = &result {
        tracing::warn!(task = %task_id, "cannot report the outcome: {e}");
    }
    app.audit("backshift", action, task_id, detail).await;
}

/// What the comment says: the outcome, the pull request, or the handoff.
pub fn outcome_text(view: &TaskView) -> String {
    let delivered = view
        .delivery
        .as_ref()
        .and_then(|d| d.pull_request_url.clone());
    let winner = view
        .winner
        .as_deref()
        .and_then(|w| view.attempts.iter().find(|a| a.id == w));
    match (view.state, winner) {
        (AttemptState::Succeeded, Some(w)) => {
            let tests = match &w.verification {
                Some(v) => format!(
                    "the tests passed (`{}`: {} passed)",
                    v.command.trim(),
                    v.report.passed
                ),
                None => "no verify command is configured, so no tests were run".into(),
            };
            let kept = format!(
                "Branch `{}` is in backshift (`backshift checkout {}`).",
                w.branch, view.id
            );
            let place = match (delivered, view.delivery.as_ref()) {
                (Some(url), _) => format!("Pull request: {url}"),
                (None, Some(d)) if d.state == "failed" => format!(
                    "It could not be delivered: {}",
                    d.error.as_deref().unwrap_or("no reason recorded")
                ),
                (None, Some(d)) if d.state == "pushed" => format!(
                    "Branch `{}` is pushed to {}.",
                    d.branch,
                    d.remote.as_deref().unwrap_or("the repository")
                ),
                _ => kept,
            };
            format!(
                "✅ backshift finished task `{}`: {tests}.\n\n{place}\n\n{}",
                view.id,
                w.summary.as_deref().unwrap_or("").trim()
            )
        }
        _ => format!(
            "❌ backshift could not finish task `{}` ({}).\n\n{}",
            view.id,
            view.state,
            view.handoff.as_deref().unwrap_or("")
        ),
    }
}

async fn comment_on_github(
    app: &App,
    view: &TaskView,
    repo_url: &str,
    number: u64,
) -> Result<(), String> {
    let forge = app
        .config
        .forge_for(repo_url)
        .filter(|f| f.kind.is_some())
        .ok_or_else(|| format!("no [[forges]] entry with a `kind` matches {repo_url}"))?;
    let token = forge.token()?.unwrap_or_default();
    let (owner, repo) =
        owner_and_repo(repo_url).ok_or_else(|| format!("cannot read {repo_url}"))?;
    let client = Forge::new(
        forge.kind.unwrap_or(ForgeKind::Github),
        forge.api_url.as_deref().unwrap_or_default(),
        &token,
    )
    .map_err(|e| e.to_string())?;
    client
        .comment(&owner, &repo, number, &outcome_text(view))
        .await
        .map_err(|e| e.to_string())
}

/// The API endpoint and token of a tracker webhook's comments.
fn tracker_api(
    cfg: Option<&crate::config::TrackerWebhook>,
    which: &str,
) -> Result<(crate::config::TrackerWebhook, String, String), String> {
    let cfg = cfg
        .cloned()
        .ok_or(format!("[webhooks.{which}] is no longer configured"))?;
    let api = cfg.api_url.clone().ok_or(format!(
        "[webhooks.{which}] has no api_url: no comment is made"
    ))?;
    let token = crate::config::secret_from(
        cfg.token_env.as_deref(),
        cfg.token_file.as_deref(),
        &format!("[webhooks.{which}] token"),
    )?
    .ok_or(format!("[webhooks.{which}] has no token"))?;
    Ok((cfg, api, token))
}

async fn answer_ok(resp: reqwest::Response, what: &str) -> Result<Value, String> {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        return Err(format!("{what} answered {status}: {body}"));
    }
    Ok(body)
}

async fn comment_on_linear(app: &App, view: &TaskView, issue_id: &str) -> Result<(), String> {
    let (_, api, token) = tracker_api(app.config.webhooks.linear.as_ref(), "linear")?;
    let query = "mutation CommentCreate($input: CommentCreateInput!) { commentCreate(input: $input) { success } }";
    let resp = reqwest::Client::new()
        .post(&api)
        .header("Authorization", token)
        .json(&serde_json::json!({
            "query": query,
            "variables": {"input": {"issueId": issue_id, "body": outcome_text(view)}},
        }))
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| format!("cannot reach Linear at {api}: {e}"))?;
    let body = answer_ok(resp, "Linear").await?;
    if body.pointer("/data/commentCreate/success") != Some(&Value::Bool(true)) {
        return Err(format!("Linear did not create the comment: {body}"));
    }
    Ok(())
}

async fn comment_on_jira(app: &App, view: &TaskView, key: &str) -> Result<(), String> {
    let (cfg, api, token) = tracker_api(app.config.webhooks.jira.as_ref(), "jira")?;
    let email = cfg
        .user_email
        .ok_or("[webhooks.jira] has no user_email for its token")?;
    // Atlassian Document Format: a paragraph per line.
    let paragraphs: Vec<Value> = outcome_text(view)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::json!({"type": "paragraph", "content": [{"type": "text", "text": l}]}))
        .collect();
    let url = format!(
        "{}/rest/api/3/issue/{key}/comment",
        api.trim_end_matches('/')
    );
    let resp = reqwest::Client::new()
        .post(&url)
        .basic_auth(email, Some(token))
        .header("Accept", "application/json")
        .json(&serde_json::json!({"body": {"type": "doc", "version": 1, "content": paragraphs}}))
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| format!("cannot reach Jira at {url}: {e}"))?;
    answer_ok(resp, "Jira").await.map(|_| ())
}

async fn post_callback(app: &App, view: &TaskView, url: &str) -> Result<(), String> {
    let cfg = app
        .config
        .webhooks
        .generic
        .as_ref()
        .ok_or("[webhooks.generic] is no longer configured")?;
    let secret = crate::config::secret_from(
        cfg.secret_env.as_deref(),
        cfg.secret_file.as_deref(),
        "[webhooks.generic] secret",
    )?
    .ok_or("[webhooks.generic] has no secret")?;
    let body = serde_json::to_vec(&serde_json::json!({
        "task": view.id,
        "state": view.state,
        "winner": view.winner,
        "delivery": view.delivery,
        "handoff": view.handoff,
        "text": outcome_text(view),
    }))
    .map_err(|e| e.to_string())?;
    let ts = (now_ms() / 1000).to_string();
    let resp = reqwest::Client::new()
        .post(url)
        .header("Content-Type", "application/json")
        .header("X-Backshift-Timestamp", &ts)
        .header("X-Backshift-Signature", sign(&secret, &ts, &body))
        .timeout(std::time::Duration::from_secs(30))
        .body(body)
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url} answered {}", resp.status()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_only_with_the_right_secret_prefix_and_body() {
        let s = sign("k", "1700000000", b"{}");
        assert!(verify("k", Some("1700000000"), b"{}", &s));
        assert!(!verify("k", Some("1700000001"), b"{}", &s));
        assert!(!verify("x", Some("1700000000"), b"{}", &s));
        assert!(!verify("k", Some("1700000000"), b"{ }", &s));
        assert!(!verify("k", Some("1700000000"), b"{}", "sha1=00"));
        assert!(!verify("k", Some("1700000000"), b"{}", "sha256=zz"));
        // GitHub's: HMAC-SHA256 of the body alone (the documented example).
        assert!(verify(
            "It's a Secret to Everybody",
            None,
            b"Hello, World!",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        ));
    }
}
