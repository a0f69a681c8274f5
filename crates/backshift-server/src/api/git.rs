//! The git endpoint: smart HTTP (fetch only) over the store's
//! repositories, so clients fetch branches without touching the server's
//! data directory.

use super::ApiError;
use crate::serve::App;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use backshift_git::http::{ADVERTISEMENT_TYPE, RESULT_TYPE, advertise_refs, serve_upload_pack};
use std::sync::Arc;

#[derive(serde::Deserialize)]
pub struct InfoRefsQuery {
    service: Option<String>,
}

fn repo_path(app: &App, repo: &str) -> Result<std::path::PathBuf, ApiError> {
    let project = repo.strip_suffix(".git").unwrap_or(repo);
    let valid = !project.is_empty() && project.bytes().all(|b| b.is_ascii_alphanumeric());
    let path = app.git.repo_path(project);
    if !valid || !path.join("HEAD").exists() {
        return Err(ApiError::not_found("repository", repo));
    }
    Ok(path)
}

pub async fn info_refs(
    State(app): State<Arc<App>>,
    Path(repo): Path<String>,
    Query(q): Query<InfoRefsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    if q.service.as_deref() != Some("git-upload-pack") {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "fetch_only",
            "this endpoint serves fetches only (git-upload-pack)",
            None,
        ));
    }
    let path = repo_path(&app, &repo)?;
    let body = advertise_refs(&path).await.map_err(ApiError::internal)?;
    Ok((
        [
            (header::CONTENT_TYPE, ADVERTISEMENT_TYPE),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    ))
}

pub async fn upload_pack(
    State(app): State<Arc<App>>,
    Path(repo): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<impl IntoResponse, ApiError> {
    let path = repo_path(&app, &repo)?;
    let request = backshift_git::http::request_body(&body, crate::sandbox_git::gzipped(&headers))
        .map_err(|e| ApiError::bad_request("bad_gzip", e, None))?;
    let out = serve_upload_pack(&path, &request)
        .await
        .map_err(ApiError::internal)?;
    Ok((
        [
            (header::CONTENT_TYPE, RESULT_TYPE),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        out,
    ))
}
