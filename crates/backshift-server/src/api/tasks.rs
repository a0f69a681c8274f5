//! Tasks: create, list, show, cancel.

use super::{ApiError, Caller};
use crate::serve::App;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use backshift_core::slug::branch_name;
use backshift_core::{AttemptId, AttemptState, TaskId, Transition};
use backshift_protocol::{CreateTaskRequest, PickAttempt, TaskCreated, TaskView, now_ms};
use backshift_store::{NewAttempt, NewTask, TaskRow};
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
    let created = create(&app, &req, &caller.actor(), &Intake::default()).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Where a task came from, when not from the API directly: what to tell
/// when it ends, and the branch it continues.
#[derive(Debug, Default, Clone)]
pub struct Intake {
    /// Where the outcome is reported (JSON; see `crate::origin`).
    pub origin: Option<String>,
    /// Its attempt works on this branch (a follow-up on a pull request
    /// backshift opened) instead of a new one.
    pub branch: Option<String>,
}

/// Creates a task from `req` on behalf of `actor`: checked, stored with
/// its queued attempts, audited, and the supervisor woken.
pub async fn create(
    app: &Arc<App>,
    req: &CreateTaskRequest,
    actor: &str,
    intake: &Intake,
) -> Result<TaskCreated, ApiError> {
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
    // One agent per attempt, in turn.
    let agents: Vec<String> = match (&req.agents, &req.agent) {
        (Some(list), _) if list.is_empty() => {
            return Err(ApiError::bad_request(
                "agents_empty",
                "`agents` is empty",
                Some("name at least one agent, or leave `agents` out"),
            ));
        }
        (Some(list), _) => list.iter().map(|a| a.trim().to_owned()).collect(),
        (None, Some(a)) => vec![a.clone()],
        (None, None) => vec![default_agent.to_owned()],
    };
    let count = req.attempts.unwrap_or(agents.len() as u32);
    if !(1..=MAX_ATTEMPTS).contains(&count) {
        return Err(ApiError::bad_request(
            "invalid_attempts",
            format!("`attempts` must be between 1 and {MAX_ATTEMPTS}, got {count}"),
            Some("each attempt is a sandbox of its own; ask for fewer"),
        ));
    }
    if (agents.len() as u32) > count {
        return Err(ApiError::bad_request(
            "invalid_attempts",
            format!(
                "{} agents for {count} attempt(s): every agent needs an attempt",
                agents.len()
            ),
            Some("leave `attempts` out (one per agent) or raise it"),
        ));
    }
    let mut distinct: Vec<&str> = Vec::new();
    for agent in &agents {
        if !distinct.contains(&agent.as_str()) {
            check_agent(app, agent, command.as_deref())?;
            distinct.push(agent);
        }
    }
    let agent = agents[0].clone();
    let limits = req
        .limits
        .unwrap_or_default()
        .resolve(&app.config.limits)
        .map_err(|e| ApiError::bad_request("invalid_limits", e, None))?;
    if distinct
        .iter()
        .any(|a| *a == "builtin" || crate::agents::recipe(a).is_some())
    {
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
    let attempts: Vec<NewAttempt> = (1..=count)
        .map(|n| {
            let own = &agents[(n as usize - 1) % agents.len()];
            NewAttempt {
                id: AttemptId::new(&id, n).to_string(),
                n,
                branch: match (&intake.branch, n) {
                    (Some(b), 1) => b.clone(),
                    _ => branch_name(&id, prompt, n),
                },
                agent: (own != &agent).then(|| own.clone()),
            }
        })
        .collect();
    let detail = serde_json::json!({
        "project": project,
        "repo": repo,
        "base_ref": req.base_ref,
        "agent": agent,
        "agents": agents,
        "attempts": count,
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
                origin: intake.origin.clone(),
            },
            &attempts,
        )
        .await?;
    app.audit(actor, "task.create", id.as_str(), detail).await;
    app.supervisor.wake();
    Ok(TaskCreated {
        id: id.to_string(),
        attempts: attempts.into_iter().map(|a| a.id).collect(),
    })
}

/// Most attempts one task may run side by side.
const MAX_ATTEMPTS: u32 = 10;

/// Whether `agent` can run this task (with the command agent's `command`).
fn check_agent(app: &App, agent: &str, command: Option<&str>) -> Result<(), ApiError> {
    let installable = crate::agents::recipe(agent).is_some();
    if !AGENTS.contains(&agent) && !installable {
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
    if let Some((why, fix)) = crate::agents::not_runnable(&app.config, agent) {
        return Err(ApiError::bad_request("agent_unavailable", why, Some(&fix)));
    }
    match (agent, command) {
        ("command", None) => Err(ApiError::bad_request(
            "command_missing",
            "the command agent needs a `command`: the script to run in the checkout",
            Some("send `command`, e.g. \"npx prettier --write .\" (CLI: --command)"),
        )),
        ("command", Some(_)) | (_, None) => Ok(()),
        (other, Some(_)) => Err(ApiError::bad_request(
            "command_not_allowed",
            format!("`command` is only for the command agent, not {other:?}"),
            Some("omit `agent` (a command implies the command agent) or `command`"),
        )),
    }
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
        out.push(crate::results::task_list_view(&app, t).await?);
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
    find_task(&app, &id).await?;
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
        // A paused one is ended by a runner the supervisor starts.
        app.supervisor.wake();
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
    // Attempts cancelled in place end no runner that would choose and
    // report.
    let chosen = crate::results::choose_winner(&app, &id).await?;
    let (app2, task_id) = (app.clone(), id.clone());
    tokio::spawn(async move {
        if chosen && let Err(e) = crate::deliver::deliver(&app2, &task_id).await {
            tracing::warn!(task = %task_id, "cannot record the delivery: {e}");
        }
        crate::origin::report(&app2, &task_id).await;
    });
    let task = find_task(&app, &id).await?;
    Ok(Json(task_view(&app, task).await?))
}

/// Choose the attempt that is the task's result (over the automatic
/// choice, or before every attempt ended).
#[utoipa::path(post, path = "/api/v1/tasks/{id}/pick", request_body = PickAttempt,
    params(("id" = String, Path, description = "Task id")),
    responses((status = 200, body = TaskView), (status = 400, body = backshift_protocol::ErrorBody),
        (status = 404, body = backshift_protocol::ErrorBody), (status = 409, description = "The attempt did not succeed: it has no published branch", body = backshift_protocol::ErrorBody)))]
pub async fn pick(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<PickAttempt>, JsonRejection>,
) -> Result<Json<TaskView>, ApiError> {
    let Json(req) = body.map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("the request body is not a pick: {}", e.body_text()),
            Some("send JSON like {\"attempt\": \"2\"}"),
        )
    })?;
    let task = find_task(&app, &id).await?;
    let wanted = req.attempt.trim();
    let attempts = app.store.attempts_of(&id).await?;
    let Some(a) = attempts
        .iter()
        .find(|a| a.id == wanted || a.n.to_string() == wanted)
    else {
        let known: Vec<String> = attempts.iter().map(|a| a.n.to_string()).collect();
        return Err(ApiError::bad_request(
            "unknown_attempt",
            format!("task {id} has no attempt {wanted:?}"),
            Some(&format!(
                "give an attempt number ({}) or id",
                known.join(", ")
            )),
        ));
    };
    if a.state != AttemptState::Succeeded {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "attempt_not_succeeded",
            format!(
                "attempt {} is {}: only an attempt that succeeded has a branch to deliver",
                a.id, a.state
            ),
            Some("see `backshift compare` for the attempts that succeeded"),
        ));
    }
    let by = caller.actor();
    app.store.set_winner(&id, &a.id, &by, false).await?;
    let count = attempts.len() as u32;
    let view = task_view(&app, task).await?;
    let rank = view
        .attempts
        .iter()
        .find(|v| v.id == a.id)
        .map_or(0, |v| v.rank);
    let _ = app
        .hub
        .emit(
            &a.id,
            backshift_protocol::EventKind::Winner {
                by: by.clone(),
                rank,
                of: count,
                why: format!("picked by {by}"),
            },
        )
        .await;
    app.audit(&by, "task.pick", &id, serde_json::json!({"attempt": a.id}))
        .await;
    spawn_delivery(&app, &id);
    let task = find_task(&app, &id).await?;
    Ok(Json(task_view(&app, task).await?))
}

/// Deliver the task's result again (after fixing what made its delivery
/// fail): its branch pushed and the pull request opened.
#[utoipa::path(post, path = "/api/v1/tasks/{id}/deliver",
    params(("id" = String, Path, description = "Task id")),
    responses((status = 202, description = "Delivery started; follow it in the task's `delivery`", body = TaskView),
        (status = 404, body = backshift_protocol::ErrorBody), (status = 409, description = "The task has no result to deliver", body = backshift_protocol::ErrorBody)))]
pub async fn deliver(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<TaskView>), ApiError> {
    let task = find_task(&app, &id).await?;
    if task.winner.is_none() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_result",
            format!("task {id} has no result to deliver: no attempt was chosen"),
            Some("wait until its attempts end, or pick one that succeeded (`backshift pick`)"),
        ));
    }
    app.audit(&caller.actor(), "task.deliver", &id, serde_json::json!({}))
        .await;
    spawn_delivery(&app, &id);
    Ok((StatusCode::ACCEPTED, Json(task_view(&app, task).await?)))
}

/// Delivers the task's result in the background (it talks to a forge).
fn spawn_delivery(app: &Arc<App>, task: &str) {
    let (app, task) = (app.clone(), task.to_owned());
    tokio::spawn(async move {
        if let Err(e) = crate::deliver::deliver(&app, &task).await {
            tracing::warn!(%task, "cannot record the delivery: {e}");
        }
    });
}

pub(super) async fn task_view(app: &App, t: TaskRow) -> Result<TaskView, ApiError> {
    Ok(crate::results::task_view(app, t).await?)
}
