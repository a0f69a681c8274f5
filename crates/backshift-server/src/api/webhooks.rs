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
    let p: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("the payload is not JSON: {e}"),
            None,
        )
    })?;
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
    let now = now_ms() / 1000;
    let fresh = ts
        .parse::<i64>()
        .is_ok_and(|t| (now - t).unsigned_abs() <= cfg.tolerance_secs);
    if !fresh {
        return Err(refused(&format!(
            "the delivery's timestamp is more than {} s from now: a replay or a wrong clock",
            cfg.tolerance_secs
        )));
    }
    first_time(&app, "generic", delivery).await?;
    let mut v: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("the payload is not JSON: {e}"),
            None,
        )
    })?;
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
