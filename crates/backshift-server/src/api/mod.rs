//! The REST API under `/api/v1`, the git endpoint under `/git`, and the
//! unauthenticated `/healthz`, `/readyz` and `/openapi.json`.

mod approvals;
mod attempts;
mod audit;
mod error;
mod git;
mod health;
mod projects;
mod sandboxes;
mod secrets;
mod tasks;
mod tokens;
mod webhooks;

pub use error::ApiError;

use crate::auth::{hash_token, token_from_header};
use crate::serve::App;
use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use std::sync::Arc;
use utoipa::OpenApi;

/// The OpenAPI description of the API.
#[derive(OpenApi)]
#[openapi(
    info(title = "backshift", description = "A self-hosted runtime for background coding agents."),
    paths(
        tasks::create_task, tasks::list_tasks, tasks::get_task, tasks::cancel_task, tasks::pick, tasks::deliver,
        approvals::list_approvals, approvals::get_approval, approvals::answer_approval,
        audit::list_audit, audit::verify_audit,
        projects::list_projects, projects::get_project, projects::set_egress, projects::set_docker,
        secrets::list_secrets, secrets::set_secret, secrets::delete_secret, secrets::grant_secret,
        secrets::revoke_secret, secrets::rotate, sandboxes::list_sandboxes, sandboxes::pool,
        tokens::list_tokens, tokens::create_token, tokens::revoke_token,
        attempts::get_attempt, attempts::pause_attempt, attempts::resume_attempt, attempts::list_events, attempts::stream_events, attempts::get_diff,
        health::healthz, health::readyz,
    ),
    components(schemas(
        backshift_protocol::CreateTaskRequest, backshift_protocol::TaskView, backshift_protocol::AttemptView,
        backshift_protocol::TaskCreated, backshift_protocol::ErrorBody, backshift_protocol::ReadyView,
        backshift_protocol::Event, backshift_protocol::EventKind,
        backshift_protocol::TokenView, backshift_protocol::CreateToken, backshift_protocol::TokenCreated,
        backshift_protocol::PickAttempt, backshift_protocol::DiffSummary, backshift_protocol::Delivery,
        backshift_protocol::VerificationResult, backshift_protocol::TestReport, backshift_protocol::TestFailure,
        backshift_protocol::ApprovalView, backshift_protocol::AnswerApproval,
        backshift_protocol::Decision, backshift_protocol::Scope,
        backshift_protocol::AuditEntry, backshift_protocol::AuditVerification,
        backshift_protocol::ProjectView, backshift_protocol::SetEgressRules, backshift_protocol::SetDockerEngine,
        backshift_protocol::SecretView, backshift_protocol::SecretGrantView, backshift_protocol::SetSecret,
        backshift_protocol::GrantSecret, backshift_protocol::RotationView, backshift_protocol::SandboxView, backshift_protocol::PoolView, backshift_protocol::PoolEnvironmentView,
        backshift_core::policy::Rule, backshift_core::policy::Action,
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// All routes.
pub fn router(app: Arc<App>) -> Router {
    let protected = Router::new()
        .route(
            "/api/v1/tasks",
            post(tasks::create_task).get(tasks::list_tasks),
        )
        .route("/api/v1/tasks/{id}", get(tasks::get_task))
        .route("/api/v1/tasks/{id}/cancel", post(tasks::cancel_task))
        .route("/api/v1/tasks/{id}/pick", post(tasks::pick))
        .route("/api/v1/tasks/{id}/deliver", post(tasks::deliver))
        .route("/api/v1/approvals", get(approvals::list_approvals))
        .route(
            "/api/v1/approvals/{id}",
            get(approvals::get_approval).post(approvals::answer_approval),
        )
        .route("/api/v1/projects", get(projects::list_projects))
        .route("/api/v1/projects/{id}", get(projects::get_project))
        .route("/api/v1/projects/{id}/egress", put(projects::set_egress))
        .route("/api/v1/projects/{id}/docker", put(projects::set_docker))
        .route(
            "/api/v1/projects/{id}/secrets/{name}",
            put(secrets::grant_secret).delete(secrets::revoke_secret),
        )
        .route("/api/v1/sandboxes", get(sandboxes::list_sandboxes))
        .route("/api/v1/pool", get(sandboxes::pool))
        .route(
            "/api/v1/tokens",
            get(tokens::list_tokens).post(tokens::create_token),
        )
        .route("/api/v1/tokens/{name}", delete(tokens::revoke_token))
        .route("/api/v1/secrets", get(secrets::list_secrets))
        .route("/api/v1/secrets/rotate", post(secrets::rotate))
        .route(
            "/api/v1/secrets/{name}",
            put(secrets::set_secret).delete(secrets::delete_secret),
        )
        .route("/api/v1/audit", get(audit::list_audit))
        .route("/api/v1/audit/verify", get(audit::verify_audit))
        .route("/api/v1/attempts/{id}", get(attempts::get_attempt))
        .route("/api/v1/attempts/{id}/pause", post(attempts::pause_attempt))
        .route(
            "/api/v1/attempts/{id}/resume",
            post(attempts::resume_attempt),
        )
        .route("/api/v1/attempts/{id}/events", get(attempts::list_events))
        .route(
            "/api/v1/attempts/{id}/events/stream",
            get(attempts::stream_events),
        )
        .route("/api/v1/attempts/{id}/diff", get(attempts::get_diff))
        .route("/git/{repo}/info/refs", get(git::info_refs))
        .route("/git/{repo}/git-upload-pack", post(git::upload_pack))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .merge(crate::ui::routes())
        // Signed by their senders instead of carrying a token.
        .route("/webhooks/github", post(webhooks::github))
        .route("/webhooks/generic", post(webhooks::generic))
        .route("/webhooks/linear", post(webhooks::linear))
        .route("/webhooks/jira", post(webhooks::jira))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(openapi))
        .merge(protected)
        .fallback(|| async { ApiError::not_found("route", "this path") })
        .with_state(app)
}

async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

/// Who is calling: the name of the API token the request carried.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

impl Caller {
    /// As the audit log names it.
    pub fn actor(&self) -> String {
        format!("token:{}", self.0)
    }
}

async fn require_token(
    State(app): State<Arc<App>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let git = req.uri().path().starts_with("/git/");
    let header_token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(token_from_header);
    // The web UI's session cookie; a change it authenticates must come
    // from the UI's own page (a header no cross-site page can send).
    let token = match header_token {
        Some(t) => Some(t),
        None => match crate::ui::cookie_token(req.headers()) {
            Some(t) => {
                let reads = matches!(
                    *req.method(),
                    axum::http::Method::GET | axum::http::Method::HEAD
                );
                if !reads && req.headers().get(crate::ui::UI_HEADER).is_none() {
                    return Err(ApiError::new(
                        axum::http::StatusCode::FORBIDDEN,
                        "cross_site_refused",
                        "a change authenticated by the UI's cookie came without the UI's header",
                        Some(
                            "send the API token as `Authorization: Bearer`, or use backshift's own page",
                        ),
                    ));
                }
                Some(t)
            }
            None => None,
        },
    };
    let Some(token) = token else {
        return Err(ApiError::unauthorized(git, "no API token was sent"));
    };
    match app.store.token_by_hash(&hash_token(&token)).await {
        Ok(Some(name)) => {
            req.extensions_mut().insert(Caller(name));
            Ok(next.run(req).await)
        }
        Ok(None) => Err(ApiError::unauthorized(
            git,
            "the API token is not valid for this server",
        )),
        Err(e) => Err(ApiError::internal(e)),
    }
}
