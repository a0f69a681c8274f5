//! API tokens: listed by name, made (the value shown once, only its
//! SHA-256 kept), revoked. Every token can do everything the API does.

use super::{ApiError, Caller};
use crate::serve::App;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use backshift_core::TaskId;
use backshift_protocol::{CreateToken, TokenCreated, TokenView, format_ts, now_ms};
use std::sync::Arc;

/// The API tokens.
#[utoipa::path(get, path = "/api/v1/tokens", responses((status = 200, body = [TokenView])))]
pub async fn list_tokens(State(app): State<Arc<App>>) -> Result<Json<Vec<TokenView>>, ApiError> {
    Ok(Json(
        app.store
            .list_tokens()
            .await?
            .into_iter()
            .map(|(name, at)| TokenView {
                name,
                created_at: format_ts(at),
            })
            .collect(),
    ))
}

/// Make a token; its value is in this answer and nowhere else.
#[utoipa::path(post, path = "/api/v1/tokens", request_body = CreateToken,
    responses((status = 201, body = TokenCreated), (status = 400, body = backshift_protocol::ErrorBody),
        (status = 409, description = "A token has that name", body = backshift_protocol::ErrorBody)))]
pub async fn create_token(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<CreateToken>, JsonRejection>,
) -> Result<(StatusCode, Json<TokenCreated>), ApiError> {
    let Json(req) = body.map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("the request body is not a token: {}", e.body_text()),
            Some("send {\"name\": \"ci\"}"),
        )
    })?;
    let name = req.name.trim();
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(ApiError::bad_request(
            "invalid_token_name",
            format!("{name:?} is not a token name"),
            Some("use 1 to 64 letters, digits, `-`, `_` or `.`"),
        ));
    }
    if app
        .store
        .list_tokens()
        .await?
        .iter()
        .any(|(n, _)| n == name)
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "token_exists",
            format!("a token named {name} exists"),
            Some("choose another name, or revoke that one first"),
        ));
    }
    let token = crate::auth::generate_token();
    app.store
        .insert_token(
            TaskId::generate().as_str(),
            name,
            &crate::auth::hash_token(&token),
            now_ms(),
        )
        .await?;
    app.audit(&caller.actor(), "token.create", name, serde_json::json!({}))
        .await;
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            name: name.to_owned(),
            token,
        }),
    ))
}

/// Revoke a token: requests carrying it are refused from now on.
#[utoipa::path(delete, path = "/api/v1/tokens/{name}", params(("name" = String, Path, description = "Token name")),
    responses((status = 204), (status = 404, body = backshift_protocol::ErrorBody),
        (status = 409, description = "The last token: revoking it would lock everyone out", body = backshift_protocol::ErrorBody)))]
pub async fn revoke_token(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tokens = app.store.list_tokens().await?;
    if !tokens.iter().any(|(n, _)| n == &name) {
        return Err(ApiError::not_found("token", &name));
    }
    if tokens.iter().all(|(n, _)| n == &name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "last_token",
            format!("{name} is the only token: revoking it would lock everyone out"),
            Some("make another token first (`backshift tokens create NAME`)"),
        ));
    }
    app.store.delete_token(&name).await?;
    app.audit(
        &caller.actor(),
        "token.revoke",
        &name,
        serde_json::json!({}),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}
