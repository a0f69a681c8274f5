//! Projects and their own egress rules.

use super::{ApiError, Caller};
use crate::serve::App;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use backshift_protocol::{ProjectView, SetDockerEngine, SetEgressRules, format_ts};
use backshift_store::ProjectRow;
use std::sync::Arc;

fn view(row: &ProjectRow) -> ProjectView {
    ProjectView {
        id: row.id.clone(),
        source: row.source.clone(),
        egress_rules: serde_json::from_str(&row.egress_rules).unwrap_or_default(),
        created_at: format_ts(row.created_at),
        docker_engine: row.docker_engine,
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no project {id}"),
        Some(
            "list them with `backshift projects` or GET /api/v1/projects; a project appears with its first task",
        ),
    )
}

async fn find(app: &App, id: &str) -> Result<ProjectRow, ApiError> {
    app.store.project(id).await?.ok_or_else(|| not_found(id))
}

/// Every project (one per repository), oldest first.
#[utoipa::path(get, path = "/api/v1/projects", responses((status = 200, body = Vec<ProjectView>)))]
pub async fn list_projects(
    State(app): State<Arc<App>>,
) -> Result<Json<Vec<ProjectView>>, ApiError> {
    Ok(Json(app.store.projects().await?.iter().map(view).collect()))
}

/// One project.
#[utoipa::path(get, path = "/api/v1/projects/{id}", params(("id" = String, Path, description = "Project id")),
    responses((status = 200, body = ProjectView), (status = 404, body = backshift_protocol::ErrorBody)))]
pub async fn get_project(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<ProjectView>, ApiError> {
    Ok(Json(view(&find(&app, &id).await?)))
}

/// Replaces a project's egress rules; they apply to its sandboxes' next
/// requests at once.
#[utoipa::path(put, path = "/api/v1/projects/{id}/egress", params(("id" = String, Path, description = "Project id")),
    request_body = SetEgressRules,
    responses((status = 200, body = ProjectView), (status = 400, body = backshift_protocol::ErrorBody),
        (status = 404, body = backshift_protocol::ErrorBody)))]
pub async fn set_egress(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<SetEgressRules>, JsonRejection>,
) -> Result<Json<ProjectView>, ApiError> {
    let Json(req) = body.map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!(
                "the request body is not a list of egress rules: {}",
                e.body_text()
            ),
            Some(
                r#"send {"rules": [{"host": "*.example.com", "ports": [443], "action": "allow"}]}"#,
            ),
        )
    })?;
    for (i, rule) in req.rules.iter().enumerate() {
        rule.check().map_err(|e| {
            ApiError::bad_request(
                "invalid_rule",
                format!("rule {}: {e}", i + 1),
                Some("a rule is a host pattern, optional ports, methods and path_prefix, and an action (allow, deny, ask)"),
            )
        })?;
    }
    let before = find(&app, &id).await?;
    let json = serde_json::to_string(&req.rules).map_err(ApiError::internal)?;
    if !app.store.set_project_egress(&id, &json).await? {
        return Err(not_found(&id));
    }
    app.audit(
        &caller.actor(),
        "project.egress.set",
        &id,
        serde_json::json!({
            "before": serde_json::from_str::<serde_json::Value>(&before.egress_rules).unwrap_or_default(),
            "after": req.rules,
        }),
    )
    .await;
    Ok(Json(view(&find(&app, &id).await?)))
}

/// Turns a project's own Docker engine on or off, for its next sandboxes:
/// each then gets a `dockerd` of its own (a privileged container in the
/// sandbox's network namespace; never the host's socket) and the engine
/// image, which has the `docker` CLI. Docker only.
#[utoipa::path(put, path = "/api/v1/projects/{id}/docker", params(("id" = String, Path, description = "Project id")),
    request_body = SetDockerEngine,
    responses((status = 200, body = ProjectView), (status = 400, body = backshift_protocol::ErrorBody),
        (status = 404, body = backshift_protocol::ErrorBody),
        (status = 409, description = "This server's sandboxes are not Docker containers", body = backshift_protocol::ErrorBody)))]
pub async fn set_docker(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<SetDockerEngine>, JsonRejection>,
) -> Result<Json<ProjectView>, ApiError> {
    let Json(req) = body.map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("the request body is not a setting: {}", e.body_text()),
            Some(r#"send {"enabled": true} or {"enabled": false}"#),
        )
    })?;
    if req.enabled && !app.uses_docker() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_docker",
            format!(
                "a sandbox's own Docker engine runs as a Docker container, and this server's sandboxes are not: {}",
                app.driver_choice
            ),
            Some("run the server where Docker is available ([sandbox] driver = \"docker\")"),
        ));
    }
    let before = find(&app, &id).await?;
    if !app.store.set_project_docker(&id, req.enabled).await? {
        return Err(not_found(&id));
    }
    app.audit(
        &caller.actor(),
        "project.docker.set",
        &id,
        serde_json::json!({"before": before.docker_engine, "after": req.enabled}),
    )
    .await;
    Ok(Json(view(&find(&app, &id).await?)))
}
