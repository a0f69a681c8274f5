//! Secrets: set (value in, never out), list, delete, grant to projects,
//! rotate the key.

use super::{ApiError, Caller};
use crate::serve::App;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use backshift_protocol::{
    GrantSecret, RotationView, SecretGrantView, SecretView, SetSecret, format_ts, now_ms,
};
use backshift_store::redact::MIN_SECRET_LEN;
use std::sync::Arc;

/// Longest value accepted.
const MAX_VALUE: usize = 64 * 1024;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

fn valid_var(var: &str) -> bool {
    let mut chars = var.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn no_secret(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no secret {name}"),
        Some("list them with `backshift secrets ls` or GET /api/v1/secrets"),
    )
}

async fn views(app: &App) -> Result<Vec<SecretView>, ApiError> {
    let grants = app.store.secret_grants(None).await?;
    Ok(app
        .store
        .secrets()
        .await?
        .into_iter()
        .map(|s| SecretView {
            grants: grants
                .iter()
                .filter(|g| g.secret == s.name)
                .map(|g| SecretGrantView {
                    project_id: g.project_id.clone(),
                    var: g.var.clone(),
                    setup_only: g.setup_only,
                })
                .collect(),
            name: s.name,
            key_id: s.key_id,
            created_at: format_ts(s.created_at),
            updated_at: format_ts(s.updated_at),
        })
        .collect())
}

async fn view(app: &App, name: &str) -> Result<SecretView, ApiError> {
    views(app)
        .await?
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| no_secret(name))
}

/// Every secret, without values.
#[utoipa::path(get, path = "/api/v1/secrets", responses((status = 200, body = Vec<SecretView>)))]
pub async fn list_secrets(State(app): State<Arc<App>>) -> Result<Json<Vec<SecretView>>, ApiError> {
    Ok(Json(views(&app).await?))
}

/// Sets a secret's value (sealed at once; never returned).
#[utoipa::path(put, path = "/api/v1/secrets/{name}", params(("name" = String, Path, description = "Secret name")),
    request_body = SetSecret,
    responses((status = 201, body = SecretView), (status = 200, body = SecretView), (status = 400, body = backshift_protocol::ErrorBody)))]
pub async fn set_secret(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Result<Json<SetSecret>, JsonRejection>,
) -> Result<(StatusCode, Json<SecretView>), ApiError> {
    // The rejection's text could quote the body; it is not repeated.
    let Json(req) = body.map_err(|_| {
        ApiError::bad_request(
            "invalid_body",
            "the request body is not a secret",
            Some(r#"send {"value": "..."}"#),
        )
    })?;
    if !valid_name(&name) {
        return Err(ApiError::bad_request(
            "invalid_name",
            format!("`{name}` is not a secret name"),
            Some("use letters, digits, `_`, `-` and `.`, at most 64"),
        ));
    }
    if req.value.len() < MIN_SECRET_LEN || req.value.len() > MAX_VALUE {
        return Err(ApiError::bad_request(
            "invalid_value",
            format!(
                "the value is {} bytes; it must be {MIN_SECRET_LEN} to {MAX_VALUE} (shorter ones could not be redacted reliably)",
                req.value.len()
            ),
            None,
        ));
    }
    let (key_id, sealed) = app.keyring.seal(&req.value).map_err(ApiError::internal)?;
    let created = app
        .store
        .put_secret(&name, &sealed, &key_id, now_ms())
        .await?;
    crate::secrets::refresh_redactor(&app).await?;
    app.audit(
        &caller.actor(),
        if created {
            "secret.create"
        } else {
            "secret.update"
        },
        &name,
        serde_json::json!({"key_id": key_id}),
    )
    .await;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view(&app, &name).await?)))
}

/// Deletes a secret and its grants.
#[utoipa::path(delete, path = "/api/v1/secrets/{name}", params(("name" = String, Path, description = "Secret name")),
    responses((status = 204), (status = 404, body = backshift_protocol::ErrorBody)))]
pub async fn delete_secret(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    if !app.store.delete_secret(&name).await? {
        return Err(no_secret(&name));
    }
    // Its value stays redacted: what was written while it existed keeps
    // its marker, and a value seen again is hidden too.
    app.audit(
        &caller.actor(),
        "secret.delete",
        &name,
        serde_json::json!({}),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Gives a project's sandboxes the secret as an environment variable.
#[utoipa::path(put, path = "/api/v1/projects/{id}/secrets/{name}",
    params(("id" = String, Path, description = "Project id"), ("name" = String, Path, description = "Secret name")),
    request_body = GrantSecret,
    responses((status = 200, body = SecretView), (status = 400, body = backshift_protocol::ErrorBody), (status = 404, body = backshift_protocol::ErrorBody)))]
pub async fn grant_secret(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path((project, name)): Path<(String, String)>,
    body: Result<Json<GrantSecret>, JsonRejection>,
) -> Result<Json<SecretView>, ApiError> {
    let Json(req) = body.map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("the request body is not a grant: {}", e.body_text()),
            Some(r#"send {"as": "ENV_VAR_NAME"}"#),
        )
    })?;
    if !valid_var(&req.var) || crate::secrets::reserved_var(&req.var) {
        return Err(ApiError::bad_request(
            "invalid_variable",
            format!("`{}` cannot be a secret's variable", req.var),
            Some(
                "use a shell variable name (letters, digits, `_`) that backshift does not set itself (HOME, PATH, the proxy, model and BACKSHIFT_ variables)",
            ),
        ));
    }
    if app.store.project(&project).await?.is_none() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no project {project}"),
            Some("list them with `backshift projects`"),
        ));
    }
    view(&app, &name).await?;
    let clash = app
        .store
        .secret_grants(Some(&project))
        .await?
        .into_iter()
        .find(|g| g.var == req.var && g.secret != name);
    if let Some(other) = clash {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "variable_taken",
            format!(
                "project {project} already gets secret {} as {}",
                other.secret, req.var
            ),
            Some("revoke that grant first, or choose another variable"),
        ));
    }
    app.store
        .grant_secret(&name, &project, &req.var, req.setup_only, now_ms())
        .await?;
    app.audit(
        &caller.actor(),
        "secret.grant",
        &name,
        serde_json::json!({"project": project, "as": req.var, "setup_only": req.setup_only}),
    )
    .await;
    Ok(Json(view(&app, &name).await?))
}

/// Takes a grant back (sandboxes created from now on lack it).
#[utoipa::path(delete, path = "/api/v1/projects/{id}/secrets/{name}",
    params(("id" = String, Path, description = "Project id"), ("name" = String, Path, description = "Secret name")),
    responses((status = 204), (status = 404, body = backshift_protocol::ErrorBody)))]
pub async fn revoke_secret(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path((project, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    if !app.store.revoke_secret(&name, &project).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("project {project} has no grant of secret {name}"),
            Some("see the grants with `backshift secrets ls`"),
        ));
    }
    app.audit(
        &caller.actor(),
        "secret.revoke",
        &name,
        serde_json::json!({"project": project}),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

/// Re-seals every secret with the current key (after a key change, with
/// the old key in `previous_key_files`).
#[utoipa::path(post, path = "/api/v1/secrets/rotate", responses((status = 200, body = RotationView)))]
pub async fn rotate(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<RotationView>, ApiError> {
    let mut resealed = 0;
    for s in app.store.secrets().await? {
        if s.key_id == app.keyring.key_id() {
            continue;
        }
        let value = app.keyring.open(&s.key_id, &s.sealed).map_err(|e| {
            ApiError::new(
                StatusCode::CONFLICT,
                "secret_unopenable",
                format!("secret {} cannot be re-sealed: {e}", s.name),
                Some("add the key that sealed it to [secrets] previous_key_files and restart the server, or set the secret again"),
            )
        })?;
        let (key_id, sealed) = app.keyring.seal(&value).map_err(ApiError::internal)?;
        app.store.reseal_secret(&s.name, &sealed, &key_id).await?;
        resealed += 1;
    }
    let key_id = app.keyring.key_id().to_owned();
    app.audit(
        &caller.actor(),
        "secret.rotate",
        &key_id,
        serde_json::json!({"resealed": resealed}),
    )
    .await;
    Ok(Json(RotationView { resealed, key_id }))
}
