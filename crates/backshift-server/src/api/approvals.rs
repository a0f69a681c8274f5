//! Approvals: list the pending ones, answer one.

use super::{ApiError, Caller};
use crate::approvals::AnswerError;
use crate::serve::App;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use backshift_protocol::{AnswerApproval, ApprovalView};
use serde::Deserialize;
use std::sync::Arc;

/// `GET /api/v1/approvals` parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListParams {
    /// `pending` (the default) or `all`.
    #[serde(default)]
    state: Option<String>,
}

/// Approvals, newest first: the pending ones, or all (`?state=all`).
#[utoipa::path(get, path = "/api/v1/approvals", params(ListParams),
    responses((status = 200, body = Vec<ApprovalView>), (status = 400, body = backshift_protocol::ErrorBody)))]
pub async fn list_approvals(
    State(app): State<Arc<App>>,
    Query(params): Query<ListParams>,
) -> Result<Json<Vec<ApprovalView>>, ApiError> {
    let pending_only = match params.state.as_deref() {
        None | Some("pending") => true,
        Some("all") => false,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_state",
                format!("`state={other}` is not a filter here"),
                Some("use `state=pending` (the default) or `state=all`"),
            ));
        }
    };
    let rows = app.store.approvals(pending_only, 500).await?;
    Ok(Json(rows.iter().map(crate::approvals::view).collect()))
}

/// One approval.
#[utoipa::path(get, path = "/api/v1/approvals/{id}", params(("id" = String, Path, description = "Approval id")),
    responses((status = 200, body = ApprovalView), (status = 404, body = backshift_protocol::ErrorBody)))]
pub async fn get_approval(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<ApprovalView>, ApiError> {
    let row = app
        .store
        .approval(&id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(crate::approvals::view(&row)))
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no approval {id}"),
        Some("list the pending ones with `backshift approvals` or GET /api/v1/approvals"),
    )
}

/// Answers a pending approval: approve (once, for the task, or for the
/// project) or deny. What waits for it goes on at once.
#[utoipa::path(post, path = "/api/v1/approvals/{id}", params(("id" = String, Path, description = "Approval id")),
    request_body = AnswerApproval,
    responses((status = 200, body = ApprovalView), (status = 400, body = backshift_protocol::ErrorBody),
        (status = 404, body = backshift_protocol::ErrorBody),
        (status = 409, description = "Answered already, or expired", body = backshift_protocol::ErrorBody)))]
pub async fn answer_approval(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<AnswerApproval>, JsonRejection>,
) -> Result<Json<ApprovalView>, ApiError> {
    let Json(answer) = body.map_err(|e| {
        ApiError::bad_request(
            "invalid_body",
            format!("the request body is not an answer: {}", e.body_text()),
            Some(r#"send {"decision": "approve" | "deny", "scope": "once" | "task" | "project", "reason": "..."}"#),
        )
    })?;
    match crate::approvals::answer(&app, &id, &answer, &caller.0).await {
        Ok(view) => Ok(Json(view)),
        Err(AnswerError::NotFound) => Err(not_found(&id)),
        Err(AnswerError::Settled(view)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "approval_settled",
            format!(
                "approval {id} is {} already{}",
                view.state,
                view.answered_by
                    .as_deref()
                    .map(|b| format!(" (by {b})"))
                    .unwrap_or_default()
            ),
            Some("nothing waits for it any more; if the agent asks again, a new approval appears"),
        )),
        Err(AnswerError::Store(e)) => Err(ApiError::internal(e)),
    }
}
