//! Tasks from webhooks, authenticated by their signature rather than an
//! API token: GitHub's (`X-Hub-Signature-256`: HMAC-SHA256 of the body)
//! and a generic one for internal backlogs (HMAC-SHA256 of
//! `"<timestamp>.<body>"`, with a timestamp window). Every delivery id is
//! accepted once: a replay is refused like a bad signature, and nothing
//! is created.

use super::ApiError;
use super::tasks::{Intake, create};
use crate::origin::{Origin, verify};
use crate::serve::App;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use backshift_protocol::{CreateTaskRequest, now_ms};
use serde_json::{Value, json};
use std::sync::Arc;

type Answer = Result<(StatusCode, Json<Value>), ApiError>;

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn refused(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "webhook_refused",
        why,
        Some("sign each delivery with the webhook's shared secret, once"),
    )
}

fn not_configured(which: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "webhook_not_configured",
        format!("this server takes no {which} webhooks"),
        Some(&format!("configure [webhooks.{which}] with its secret")),
    )
}

fn secret(
    env: Option<&str>,
    file: Option<&std::path::Path>,
    which: &str,
) -> Result<String, ApiError> {
    match crate::config::secret_from(env, file, &format!("[webhooks.{which}] secret")) {
        Ok(Some(s)) if !s.is_empty() => Ok(s),
        Ok(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "webhook_secret_missing",
            format!("[webhooks.{which}] has no secret, so no delivery can be trusted"),
            Some("set secret_env or secret_file"),
        )),
        Err(why) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "webhook_secret_missing",
            why,
            Some("fix the server's configuration"),
        )),
    }
}

fn ignored(why: impl Into<String>) -> Answer {
    Ok((StatusCode::ACCEPTED, Json(json!({"ignored": why.into()}))))
}

/// The delivery is new for `source`, or it is a replay.
async fn first_time(app: &App, source: &str, id: &str) -> Result<(), ApiError> {
    if app.store.first_delivery(source, id, now_ms()).await? {
        return Ok(());
    }
    app.audit(
        &format!("webhook:{source}"),
        "webhook.replay_refused",
        id,
        json!({}),
    )
    .await;
    Err(refused(
        "this delivery was received before: a replay is not accepted",
    ))
}

/// `POST /webhooks/github`.
pub async fn github(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Answer {
    let Some(cfg) = app.config.webhooks.github.clone() else {
        return Err(not_configured("github"));
    };
    let secret = secret(
        cfg.secret_env.as_deref(),
        cfg.secret_file.as_deref(),
        "github",
    )?;
    let Some(signature) = header(&headers, "x-hub-signature-256") else {
        return Err(refused(
            "the delivery is not signed (no X-Hub-Signature-256)",
        ));
    };
    if !verify(&secret, None, &body, signature) {
        return Err(refused("the delivery's signature does not match its body"));
    }
    let Some(delivery) = header(&headers, "x-github-delivery") else {
        return Err(ApiError::bad_request(
            "delivery_id_missing",
            "no X-GitHub-Delivery header",
            None,
        ));
    };
    let event = header(&headers, "x-github-event").unwrap_or("").to_owned();
    first_time(&app, "github", delivery).await?;
    let p = json_payload(&body)?;
    let s = |ptr: &str| {
        p.pointer(ptr)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let repo_url = s("/repository/clone_url");
    let sender = s("/sender/login");
    let actor = format!("github:{sender}");
    match (event.as_str(), s("/action").as_str()) {
        ("ping", _) => Ok((StatusCode::OK, Json(json!({"ok": "pong"})))),
        ("issues", action @ ("labeled" | "opened")) => {
            let labelled = match action {
                "labeled" => s("/label/name") == cfg.label,
                _ => p
                    .pointer("/issue/labels")
                    .and_then(Value::as_array)
                    .is_some_and(|l| l.iter().any(|l| l["name"] == cfg.label.as_str())),
            };
            if !labelled {
                return ignored(format!("the issue is not labelled {:?}", cfg.label));
            }
            let number = p
                .pointer("/issue/number")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let html_url = s("/issue/html_url");
            let prompt = format!(
                "{}\n\n{}\n\n(GitHub issue #{number}: {html_url})",
                s("/issue/title").trim(),
                s("/issue/body").trim()
            );
            let req = CreateTaskRequest {
                prompt,
                repo: repo_url.clone(),
                base_ref: None,
                agent: cfg.agent.clone(),
                command: None,
                limits: None,
                verify: None,
                attempts: None,
                agents: None,
            };
            let origin = Origin::Github {
                repo_url,
                number,
                html_url,
                sender,
            };
            created(&app, &req, &actor, origin, None).await
        }
        ("issue_comment", "created") => {
            let comment = s("/comment/body");
            let Some(instruction) = comment.trim().strip_prefix("/backshift") else {
                return ignored("not a /backshift comment");
            };
            let instruction = instruction.trim();
            if p.pointer("/issue/pull_request").is_none() {
                return ignored("/backshift comments are read on backshift's pull requests");
            }
            if instruction.is_empty() {
                return ignored("the /backshift comment says nothing to do");
            }
            let number = p
                .pointer("/issue/number")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            // The task whose pull request this is.
            let Some((task, branch, agent)) = pull_request_task(&app, &repo_url, number).await?
            else {
                return ignored(format!(
                    "pull request #{number} was not opened by backshift"
                ));
            };
            let prompt = format!(
                "{instruction}\n\n(A follow-up on pull request #{number} ({}), branch {branch}, from {sender}. The earlier task was: {})",
                s("/issue/html_url"),
                task.prompt.lines().next().unwrap_or("").trim()
            );
            let req = CreateTaskRequest {
                prompt,
                repo: repo_url.clone(),
                base_ref: Some(branch.clone()),
                agent: Some(agent),
                command: None,
                limits: None,
                verify: task.verify.clone(),
                attempts: None,
                agents: None,
            };
            let origin = Origin::Github {
                repo_url,
                number,
                html_url: s("/issue/html_url"),
                sender,
            };
            created(&app, &req, &actor, origin, Some(branch)).await
        }
        (other, action) => ignored(format!("backshift does not act on {other}/{action}")),
    }
}

/// The task that delivered pull request `number` of `repo_url`: its row,
/// its result's branch and agent.
async fn pull_request_task(
    app: &App,
    repo_url: &str,
    number: u64,
) -> Result<Option<(backshift_store::TaskRow, String, String)>, ApiError> {
    for t in app.store.list_tasks(1000).await? {
        if t.repo != repo_url {
            continue;
        }
        let Some(d) = t
            .delivery
            .as_deref()
            .and_then(|d| serde_json::from_str::<backshift_protocol::Delivery>(d).ok())
        else {
            continue;
        };
        if d.pull_request == Some(number) {
            let agent = match app.store.attempt(&d.attempt).await? {
                Some(a) => a.agent.unwrap_or_else(|| t.agent.clone()),
                None => t.agent.clone(),
            };
            return Ok(Some((t, d.branch, agent)));
        }
    }
    Ok(None)
}

async fn created(
    app: &Arc<App>,
    req: &CreateTaskRequest,
    actor: &str,
    origin: Origin,
    branch: Option<String>,
) -> Answer {
    let intake = Intake {
        origin: serde_json::to_string(&origin).ok(),
        branch,
    };
    let task = create(app, req, actor, &intake).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"task": task.id, "attempts": task.attempts})),
    ))
}

/// `POST /webhooks/generic`: a task from an internal system. The body is
/// a task as `POST /api/v1/tasks` takes it, plus an optional
/// `callback_url` that gets the outcome (signed the same way).
pub async fn generic(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Answer {
    let Some(cfg) = app.config.webhooks.generic.clone() else {
        return Err(not_configured("generic"));
    };
    let secret = secret(
        cfg.secret_env.as_deref(),
        cfg.secret_file.as_deref(),
        "generic",
    )?;
    let (Some(signature), Some(ts), Some(delivery)) = (
        header(&headers, "x-backshift-signature"),
        header(&headers, "x-backshift-timestamp"),
        header(&headers, "x-backshift-delivery"),
    ) else {
        return Err(refused(
            "the delivery is not signed (X-Backshift-Signature, X-Backshift-Timestamp and X-Backshift-Delivery are required)",
        ));
    };
    if !verify(&secret, Some(ts), &body, signature) {
        return Err(refused(
            "the delivery's signature does not match its timestamp and body",
        ));
    }
    fresh(
        ts.parse::<i64>().ok().map(|t| t.saturating_mul(1000)),
        "timestamp",
        cfg.tolerance_secs,
    )?;
    first_time(&app, "generic", delivery).await?;
    let mut v = json_payload(&body)?;
    let callback_url = v
        .as_object_mut()
        .and_then(|o| o.remove("callback_url"))
        .and_then(|c| c.as_str().map(str::to_owned));
    let req: CreateTaskRequest = serde_json::from_value(v).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("the payload is not a task: {e}"),
            Some("send the fields of POST /api/v1/tasks, plus an optional callback_url"),
        )
    })?;
    let origin = Origin::Generic {
        callback_url,
        delivery: delivery.to_owned(),
    };
    created(&app, &req, "webhook:generic", origin, None).await
}

/// The payload, as JSON.
fn json_payload(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("the payload is not JSON: {e}"),
            None,
        )
    })
}

/// Refuses a delivery whose `field` (`ts`, unix ms) is not within
/// `tolerance` seconds of now.
fn fresh(ts: Option<i64>, field: &str, tolerance: u64) -> Result<(), ApiError> {
    if ts.is_some_and(|t| ((now_ms() - t) / 1000).unsigned_abs() <= tolerance) {
        return Ok(());
    }
    Err(refused(&format!(
        "the delivery's {field} is more than {tolerance} s from now: a replay or a wrong clock"
    )))
}

/// The tracker's config and secret, or why it takes no deliveries.
fn tracker(
    cfg: Option<&crate::config::TrackerWebhook>,
    which: &str,
) -> Result<(crate::config::TrackerWebhook, String), ApiError> {
    let cfg = cfg.cloned().ok_or_else(|| not_configured(which))?;
    let secret = secret(cfg.secret_env.as_deref(), cfg.secret_file.as_deref(), which)?;
    Ok((cfg, secret))
}

/// A task for a tracker's issue, on the repository configured for its
/// team or project.
async fn tracker_task(
    app: &Arc<App>,
    cfg: &crate::config::TrackerWebhook,
    which: &str,
    key: &str,
    prompt: String,
    actor: &str,
    origin: Origin,
) -> Answer {
    let Some(repo) = cfg.repo_for(key) else {
        return ignored(format!(
            "no repository is configured for {key} ([webhooks.{which}] repo or repos)"
        ));
    };
    let req = CreateTaskRequest {
        prompt,
        repo: repo.to_owned(),
        base_ref: None,
        agent: cfg.agent.clone(),
        command: None,
        limits: None,
        verify: None,
        attempts: None,
        agents: None,
    };
    created(app, &req, actor, origin, None).await
}

/// `POST /webhooks/linear`: `Linear-Signature` is the hex HMAC-SHA256 of
/// the body; `webhookTimestamp` must be recent; `Linear-Delivery` is
/// taken once. An issue created with the label, or given it, is a task.
pub async fn linear(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Answer {
    let (cfg, secret) = tracker(app.config.webhooks.linear.as_ref(), "linear")?;
    let Some(signature) = header(&headers, "linear-signature") else {
        return Err(refused("the delivery is not signed (no Linear-Signature)"));
    };
    if !verify(
        &secret,
        None,
        &body,
        &format!("sha256={}", signature.trim()),
    ) {
        return Err(refused("the delivery's signature does not match its body"));
    }
    let p = json_payload(&body)?;
    fresh(
        p["webhookTimestamp"].as_i64(),
        "webhookTimestamp",
        cfg.tolerance_secs,
    )?;
    let delivery = header(&headers, "linear-delivery")
        .map(str::to_owned)
        .or_else(|| {
            p["webhookId"]
                .as_str()
                .map(|w| format!("{w}:{}", p["webhookTimestamp"]))
        })
        .unwrap_or_default();
    first_time(&app, "linear", &delivery).await?;
    if p["type"] != "Issue" {
        return ignored(format!("backshift does not act on Linear {}", p["type"]));
    }
    let data = &p["data"];
    let label = data["labels"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["name"] == cfg.label.as_str()));
    let Some(label) = label else {
        return ignored(format!("the issue is not labelled {:?}", cfg.label));
    };
    let newly = match p["action"].as_str() {
        Some("create") => true,
        Some("update") => p["updatedFrom"]["labelIds"]
            .as_array()
            .is_some_and(|before| !before.contains(&label["id"])),
        _ => false,
    };
    if !newly {
        return ignored("the label was not just given");
    }
    let s = |v: &Value| v.as_str().unwrap_or("").trim().to_owned();
    let identifier = s(&data["identifier"]);
    let url = s(&data["url"]);
    let prompt = format!(
        "{}\n\n{}\n\n(Linear issue {identifier}: {url})",
        s(&data["title"]),
        s(&data["description"])
    );
    let origin = Origin::Linear {
        issue_id: s(&data["id"]),
        identifier,
        url,
    };
    let actor = format!("linear:{}", s(&p["actor"]["name"]));
    tracker_task(
        &app,
        &cfg,
        "linear",
        &s(&data["team"]["key"]),
        prompt,
        &actor,
        origin,
    )
    .await
}

/// The plain text of a Jira field: a string, or an Atlassian Document
/// Format tree (its text nodes, a line per paragraph).
fn jira_text(v: &Value) -> String {
    fn walk(v: &Value, out: &mut String) {
        if let Some(t) = v["text"].as_str() {
            out.push_str(t);
        }
        if let Some(children) = v["content"].as_array() {
            for c in children {
                walk(c, out);
            }
            if matches!(
                v["type"].as_str(),
                Some("paragraph" | "heading" | "listItem")
            ) {
                out.push('\n');
            }
        }
    }
    match v {
        Value::String(s) => s.clone(),
        Value::Object(_) => {
            let mut out = String::new();
            walk(v, &mut out);
            out.trim().to_owned()
        }
        _ => String::new(),
    }
}

/// `POST /webhooks/jira`: `X-Hub-Signature` is `sha256=<hex HMAC-SHA256
/// of the body>` (a Jira webhook with a secret); `timestamp` must be
/// recent; `X-Atlassian-Webhook-Identifier` is taken once. An issue
/// created with the label, or given it, is a task.
pub async fn jira(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Answer {
    let (cfg, secret) = tracker(app.config.webhooks.jira.as_ref(), "jira")?;
    let Some(signature) = header(&headers, "x-hub-signature") else {
        return Err(refused("the delivery is not signed (no X-Hub-Signature)"));
    };
    if !verify(&secret, None, &body, signature) {
        return Err(refused("the delivery's signature does not match its body"));
    }
    let p = json_payload(&body)?;
    fresh(p["timestamp"].as_i64(), "timestamp", cfg.tolerance_secs)?;
    let Some(delivery) = header(&headers, "x-atlassian-webhook-identifier") else {
        return Err(ApiError::bad_request(
            "delivery_id_missing",
            "no X-Atlassian-Webhook-Identifier header",
            None,
        ));
    };
    first_time(&app, "jira", delivery).await?;
    let fields = &p["issue"]["fields"];
    let labelled = fields["labels"]
        .as_array()
        .is_some_and(|l| l.iter().any(|l| l == cfg.label.as_str()));
    if !labelled {
        return ignored(format!("the issue is not labelled {:?}", cfg.label));
    }
    let has = |s: &Value| {
        s.as_str()
            .is_some_and(|s| s.split_whitespace().any(|l| l == cfg.label))
    };
    let newly = match p["webhookEvent"].as_str() {
        Some("jira:issue_created") => true,
        Some("jira:issue_updated") => p["changelog"]["items"].as_array().is_some_and(|items| {
            items
                .iter()
                .any(|i| i["field"] == "labels" && has(&i["toString"]) && !has(&i["fromString"]))
        }),
        _ => false,
    };
    if !newly {
        return ignored("the label was not just given");
    }
    let key = p["issue"]["key"].as_str().unwrap_or("").to_owned();
    let project = fields["project"]["key"].as_str().unwrap_or("").to_owned();
    let url = cfg
        .api_url
        .as_deref()
        .map(|base| format!("{}/browse/{key}", base.trim_end_matches('/')))
        .unwrap_or_else(|| p["issue"]["self"].as_str().unwrap_or("").to_owned());
    let prompt = format!(
        "{}\n\n{}\n\n(Jira issue {key}: {url})",
        jira_text(&fields["summary"]).trim(),
        jira_text(&fields["description"]).trim()
    );
    let actor = format!(
        "jira:{}",
        p["user"]["displayName"].as_str().unwrap_or("unknown")
    );
    let origin = Origin::Jira { key, url };
    tracker_task(&app, &cfg, "jira", &project, prompt, &actor, origin).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jira_descriptions_in_document_format_read_as_text() {
        let adf = json!({"type": "doc", "version": 1, "content": [
            {"type": "paragraph", "content": [{"type": "text", "text": "Add "}, {"type": "text", "text": "mul", "marks": [{"type": "code"}]}]},
            {"type": "paragraph", "content": [{"type": "text", "text": "to calc."}]}
        ]});
        assert_eq!(jira_text(&adf), "Add mul\nto calc.");
        assert_eq!(jira_text(&json!("plain")), "plain");
        assert_eq!(jira_text(&Value::Null), "");
    }
}
