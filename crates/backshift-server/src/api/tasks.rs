//! Tasks: create, list, show, cancel.

use super::{ApiError, Caller};
use crate::serve::App;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use backshift_core::limits::LimitsRequest;
use backshift_core::slug::branch_name;
use backshift_core::{AttemptId, AttemptState, TaskId, Transition};
use backshift_protocol::{
    AttemptView, CreateTaskRequest, TaskCreated, TaskView, format_ts, now_ms,
};
use backshift_store::{AttemptRow, NewAttempt, NewTask, TaskRow};
use std::sync::Arc;

const AGENTS: &[&str] = &["builtin", "command"];

/// Hand a task to backshift.
#[utoipa::path(post, path = "/api/v1/tasks", request_body = CreateTaskRequest, responses(
    (status = 201, description = "Created; its attempt is queued", body = TaskCreated),
    (status = 400, description = "Bad input: the error says which field and why", body = backshift_protocol::ErrorBody)))]
pub async fn create_task(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<CreateTaskRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<TaskCreated>), ApiError> {
    let Json(req) = body.map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("the request body is not a valid task: {}", e.body_text()),
            Some("send JSON with `prompt` and `repo` (see /openapi.json)"),
        )
    })?;
    let prompt = req.prompt.trim();
    if prompt.is_empty() {
        return Err(ApiError::bad_request(
            "prompt_empty",
            "the prompt is empty",
            Some("say what the agent should do"),
        ));
    }
    let command = req
        .command
        .as_deref()
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_owned);
    let verify = match req.verify.as_deref().map(str::trim) {
        None => None,
        Some("") => {
            return Err(ApiError::bad_request(
                "verify_empty",
                "`verify` is empty",
                Some(
                    "give the command that runs the tests (e.g. \"pytest -q\"), or leave `verify` out to use the repository's backshift.toml or the server's [verify] command",
                ),
            ));
        }
        Some(v) if v.len() > 10_000 => {
            return Err(ApiError::bad_request(
                "verify_too_long",
                format!("`verify` is {} bytes; at most 10000", v.len()),
                Some(
                    "put a long verify script in the repository and give the command that runs it",
                ),
            ));
        }
        Some(v) => Some(v.to_owned()),
    };
    let default_agent = if command.is_some() {
        "command"
    } else {
        "builtin"
    };
    let agent = req.agent.clone().unwrap_or_else(|| default_agent.into());
    let installable = crate::agents::recipe(&agent).is_some();
    if !AGENTS.contains(&agent.as_str()) && !installable {
        let known: Vec<&str> = AGENTS
            .iter()
            .copied()
            .chain(crate::agents::RECIPES.iter().map(|r| r.name))
            .collect();
        return Err(ApiError::bad_request(
            "unknown_agent",
            format!("unknown agent {agent:?}; available: {}", known.join(", ")),
            Some("omit `agent` for the built-in agent"),
        ));
    }
    if let Some((why, fix)) = crate::agents::not_runnable(&app.config, &agent) {
        return Err(ApiError::bad_request("agent_unavailable", why, Some(&fix)));
    }
    match (agent.as_str(), &command) {
        ("command", None) => {
            return Err(ApiError::bad_request(
                "command_missing",
                "the command agent needs a `command`: the script to run in the checkout",
                Some("send `command`, e.g. \"npx prettier --write .\" (CLI: --command)"),
            ));
        }
        ("command", Some(_)) | (_, None) => {}
        (other, Some(_)) => {
            return Err(ApiError::bad_request(
                "command_not_allowed",
                format!("`command` is only for the command agent, not {other:?}"),
                Some("omit `agent` (a command implies the command agent) or `command`"),
            ));
        }
    }
    let limits = req
        .limits
        .unwrap_or(LimitsRequest::default())
        .resolve(&app.config.limits)
        .map_err(|e| ApiError::bad_request("invalid_limits", e, None))?;
    if agent == "builtin" || installable {
        app.model_config().map_err(|e| {
            ApiError::bad_request(
                "model_not_configured",
                e,
                Some("see `backshift serve --help` and README: Configuration"),
            )
        })?;
    }
    let repo = resolve_repo(&req.repo, req.base_ref.as_deref()).await?;

    let now = now_ms();
    let project = app
        .store
        .project_for_source(&repo, TaskId::generate().as_str(), now)
        .await?;
    let id = TaskId::generate();
    let attempt = AttemptId::new(&id, 1);
    let detail = serde_json::json!({
        "project": project,
        "repo": repo,
        "base_ref": req.base_ref,
        "agent": agent,
        "prompt": prompt.chars().take(500).collect::<String>(),
        "command": command,
        "verify": verify,
        "limits": limits,
    });
    app.store
        .create_task(
            &NewTask {
                id: id.to_string(),
                project_id: project,
                prompt: prompt.to_owned(),
                repo,
                base_ref: req.base_ref.clone(),
                agent,
                command,
                verify,
                limits,
                created_at: now,
            },
            &[NewAttempt {
                id: attempt.to_string(),
                n: 1,
                branch: branch_name(&id, prompt, 1),
            }],
        )
        .await?;
    app.audit(&caller.actor(), "task.create", id.as_str(), detail)
        .await;
    app.supervisor.wake();
    Ok((
        StatusCode::CREATED,
        Json(TaskCreated {
            id: id.to_string(),
            attempts: vec![attempt.to_string()],
        }),
    ))
}

/// A local path must be an absolute path to a git repository holding the
/// base ref; URLs are checked when the attempt fetches them.
async fn resolve_repo(repo: &str, base_ref: Option<&str>) -> Result<String, ApiError> {
    let repo = repo.trim();
    if repo.is_empty() {
        return Err(ApiError::bad_request(
            "repo_missing",
            "`repo` is empty",
            Some("give a local path or a git URL"),
        ));
    }
    if backshift_git::is_url(repo) {
        return Ok(repo.to_owned());
    }
    let path = std::path::Path::new(repo);
    if !path.is_absolute() {
        return Err(ApiError::bad_request(
            "repo_not_absolute",
            format!("{repo} is a relative path; the server cannot know what it is relative to"),
            Some("send an absolute path (the CLI does this for you)"),
        ));
    }
    backshift_git::validate_local_repo(path, base_ref)
        .await
        .map_err(|e| {
            ApiError::bad_request(
                "repo_invalid",
                e,
                Some("point `repo` at a git repository on the server's host, or use a git URL"),
            )
        })?;
    let canonical = tokio::fs::canonicalize(path)
        .await
        .map_err(ApiError::internal)?;
    Ok(canonical.to_string_lossy().into_owned())
}

/// Tasks, newest first.
#[utoipa::path(get, path = "/api/v1/tasks", responses((status = 200, body = [TaskView])))]
pub async fn list_tasks(State(app): State<Arc<App>>) -> Result<Json<Vec<TaskView>>, ApiError> {
    let mut out = Vec::new();
    for t in app.store.list_tasks(200).await? {
        out.push(task_view(&app, t).await?);
    }
    Ok(Json(out))
}

/// The task `id`, or a 404 saying so.
async fn find_task(app: &App, id: &str) -> Result<TaskRow, ApiError> {
    app.store
        .task(id)
        .await?
        .ok_or_else(|| ApiError::not_found("task", id))
}

/// One task with its attempts.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", params(("id" = String, Path, description = "Task id")),
    responses((status = 200, body = TaskView), (status = 404, body = backshift_protocol::ErrorBody)))]
pub async fn get_task(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    let task = find_task(&app, &id).await?;
    Ok(Json(task_view(&app, task).await?))
}

/// Cancels every active attempt of a task.
#[utoipa::path(post, path = "/api/v1/tasks/{id}/cancel", params(("id" = String, Path, description = "Task id")),
    responses((status = 200, body = TaskView), (status = 404, body = backshift_protocol::ErrorBody)))]
pub async fn cancel_task(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    let task = find_task(&app, &id).await?;
    let active: Vec<String> = app
        .store
        .attempts_of(&id)
        .await?
        .into_iter()
        .filter(|a| !a.state.is_terminal())
        .map(|a| a.id)
        .collect();
    app.audit(
        &caller.actor(),
        "task.cancel",
        &id,
        serde_json::json!({"active_attempts": active}),
    )
    .await;
    for a in app.store.attempts_of(&id).await? {
        if a.state.is_terminal() {
            continue;
        }
        if app.supervisor.cancel(&a.id) {
            continue;
        }
        // Not running here: the replica that drives it (or takes it over)
        // acts on the request.
        app.store.request_cancel(&a.id, now_ms()).await?;
        if a.state == AttemptState::Queued {
            // Not started: cancel it in place. If it started meanwhile, the
            // compare-and-set fails and the runner's token is used instead.
            if app
                .hub
                .transition(
                    &a.id,
                    AttemptState::Queued,
                    Transition::Cancel,
                    Some("cancelled before it started".into()),
                )
                .await
                .is_err()
            {
                app.supervisor.cancel(&a.id);
            }
        }
    }
    // Give a running attempt (here or on another replica) a moment to
    // record its end.
    for _ in 0..50 {
        let attempts = app.store.attempts_of(&id).await?;
        if attempts.iter().all(|a| a.state.is_terminal()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(Json(task_view(&app, task).await?))
}

pub(super) async fn task_view(app: &App, t: TaskRow) -> Result<TaskView, ApiError> {
    let mut attempts = Vec::new();
    for a in app.store.attempts_of(&t.id).await? {
        attempts.push(attempt_view(app, &t, a).await?);
    }
    Ok(TaskView {
        state: attempts
            .last()
            .map(|a| a.state)
            .unwrap_or(AttemptState::Queued),
        id: t.id,
        project_id: t.project_id,
        prompt: app.store.redactor().text(&t.prompt).into_owned(),
        repo: t.repo,
        base_ref: t.base_ref,
        agent: t.agent,
        command: t
            .command
            .map(|c| app.store.redactor().text(&c).into_owned()),
        limits: t.limits,
        verify: t.verify,
        created_at: format_ts(t.created_at),
        attempts,
    })
}

pub(super) async fn attempt_view(
    app: &App,
    t: &TaskRow,
    a: AttemptRow,
) -> Result<AttemptView, ApiError> {
    let last_seq = app.store.last_seq(&a.id).await?;
    let ended_badly = a.state.is_terminal() && a.state != AttemptState::Succeeded;
    let log_tail = if ended_badly {
        log_tail(&app.store.last_events(&a.id, 40).await?)
    } else {
        Vec::new()
    };
    let driver = if a.state.is_terminal() { None } else { a.owner };
    let usage = app.store.model_usage(&a.id).await?;
    let verifications = crate::attempt::verifications(app, &a.id).await?;
    Ok(AttemptView {
        id: a.id,
        task_id: a.task_id,
        n: a.n,
        state: a.state,
        reason: a.reason,
        detail: a.detail,
        branch: a.branch,
        base_commit: a.base_commit,
        head_commit: a.head_commit,
        summary: a.summary,
        git_path: format!("/git/{}.git", t.project_id),
        last_seq,
        created_at: format_ts(a.created_at),
        updated_at: format_ts(a.updated_at),
        driver,
        log_tail,
        usage,
        verifications: verifications.len() as u32,
        verification: verifications.into_iter().last(),
    })
}

/// The lines of the last events that explain how an attempt ended:
/// progress, command output, tool results, model retries, state changes.
/// At most 30 lines of at most 300 characters.
fn log_tail(events: &[backshift_protocol::Event]) -> Vec<String> {
    use backshift_protocol::EventKind as K;
    let mut lines = Vec::new();
    for e in events {
        match &e.kind {
            K::Progress { message } => lines.push(message.clone()),
            K::CommandOutput { text, .. } => {
                lines.extend(text.lines().map(str::to_owned));
            }
            K::ToolCall {
                name, arguments, ..
            } => lines.push(format!("→ {name} {}", arguments)),
            K::ToolResult {
                name,
                ok,
                exit_code,
                ..
            } => lines.push(format!(
                "{} {name}{}",
                if *ok { "✔" } else { "✗" },
                exit_code.map(|c| format!(" exit {c}")).unwrap_or_default()
            )),
            K::ModelRetry { error, retry, .. } => {
                lines.push(format!("model request failed (retry {retry}): {error}"))
            }
            K::StateChanged { to, detail, .. } => lines.push(match detail {
                Some(d) => format!("state → {to}: {d}"),
                None => format!("state → {to}"),
            }),
            _ => {}
        }
    }
    let skip = lines.len().saturating_sub(30);
    lines
        .into_iter()
        .skip(skip)
        .map(|l| {
            if l.chars().count() > 300 {
                l.chars().take(299).chain(['…']).collect()
            } else {
                l
            }
        })
        .collect()
}
