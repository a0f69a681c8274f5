//! The sandboxes this server runs, with what each uses now.

use super::ApiError;
use crate::serve::App;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use backshift_protocol::SandboxView;
use backshift_sandbox::labels;
use std::sync::Arc;

/// Every sandbox of this server: its attempt, CPU, memory, processes and
/// disk (each sampled over a second, all at once).
#[utoipa::path(get, path = "/api/v1/sandboxes", responses((status = 200, body = Vec<SandboxView>),
    (status = 503, description = "Docker is not reachable", body = backshift_protocol::ErrorBody)))]
pub async fn list_sandboxes(
    State(app): State<Arc<App>>,
) -> Result<Json<Vec<SandboxView>>, ApiError> {
    let driver = app.driver().await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "docker_unreachable",
            e,
            Some("start the Docker daemon (`cargo xtask up` does)"),
        )
    })?;
    let sandboxes = crate::pool::sandboxes(&app, None)
        .await
        .map_err(ApiError::internal)?;
    let states: std::collections::HashMap<String, backshift_core::AttemptState> = app
        .store
        .attempts_in_states(
            &backshift_core::AttemptState::ALL
                .into_iter()
                .filter(|s| !s.is_terminal())
                .collect::<Vec<_>>(),
        )
        .await?
        .into_iter()
        .map(|a| (a.id, a.state))
        .collect();
    let note = app
        .config
        .sandbox
        .disk_mb
        .and(app.disk_limit_unsupported.get().cloned());
    let views = futures::future::join_all(sandboxes.into_iter().map(|s| {
        let driver = driver.clone();
        let note = note.clone();
        let attempt_state = s
            .labels
            .get(labels::ATTEMPT)
            .and_then(|a| states.get(a))
            .copied();
        async move {
            let usage = driver.usage(&s.id).await.unwrap_or_default();
            SandboxView {
                id: s.id.0.clone(),
                attempt_id: s.labels.get(labels::ATTEMPT).cloned(),
                task_id: s.labels.get(labels::TASK).cloned(),
                attempt_state,
                role: s.labels.get(labels::ROLE).cloned(),
                from_pool: s.labels.contains_key(crate::pool::POOL_LABEL),
                running: usage.running,
                cpu_percent: usage.cpu_percent,
                memory_bytes: usage.memory_bytes,
                memory_limit_bytes: usage.memory_limit_bytes,
                pids: usage.pids,
                disk_bytes: usage.disk_bytes,
                disk_limit_bytes: usage.disk_limit_bytes,
                disk_limit_note: note.filter(|_| usage.disk_limit_bytes.is_none()),
            }
        }
    }))
    .await;
    Ok(Json(views))
}

/// The warm pool: its environments, what is ready, and how often an
/// attempt found a sandbox ready.
#[utoipa::path(get, path = "/api/v1/pool", responses((status = 200, body = backshift_protocol::PoolView)))]
pub async fn pool(State(app): State<Arc<App>>) -> Json<backshift_protocol::PoolView> {
    Json(app.pool.view(&app))
}
