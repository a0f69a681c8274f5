//! The audit log: read it, export it, verify its chain.

use super::ApiError;
use crate::serve::App;
use axum::Json;
use axum::extract::{Query, State};
use backshift_protocol::{AuditEntry, AuditVerification};
use serde::Deserialize;
use std::sync::Arc;

/// `GET /api/v1/audit` parameters.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AuditParams {
    /// Entries after this seq (default 0: from the start).
    #[serde(default)]
    after: i64,
    /// At most this many (default and maximum 1000).
    #[serde(default)]
    limit: Option<u32>,
}

/// Audit entries in order, a page at a time (`after` = the last seq seen).
#[utoipa::path(get, path = "/api/v1/audit", params(AuditParams),
    responses((status = 200, body = Vec<AuditEntry>)))]
pub async fn list_audit(
    State(app): State<Arc<App>>,
    Query(params): Query<AuditParams>,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let limit = params.limit.unwrap_or(1000).clamp(1, 1000);
    let rows = app.store.audit_rows(params.after, limit).await?;
    Ok(Json(rows.iter().map(crate::audit::entry).collect()))
}

/// Checks the chain: no row edited, inserted or deleted.
#[utoipa::path(get, path = "/api/v1/audit/verify",
    responses((status = 200, body = AuditVerification)))]
pub async fn verify_audit(
    State(app): State<Arc<App>>,
) -> Result<Json<AuditVerification>, ApiError> {
    Ok(Json(app.audit.verify().await?))
}
