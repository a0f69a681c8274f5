//! API errors: a status, a stable code, what went wrong and what to do.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use backshift_protocol::{ErrorBody, ErrorDetail};

/// An error answered to an API client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    hint: Option<String>,
    basic_challenge: bool,
}

impl ApiError {
    /// A 4xx with a code, message and hint.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
        hint: Option<&str>,
    ) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            hint: hint.map(str::to_owned),
            basic_challenge: false,
        }
    }

    /// 400 for bad input.
    pub fn bad_request(code: &'static str, message: impl Into<String>, hint: Option<&str>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message, hint)
    }

    /// 404 for a missing thing.
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no {what} {id}"),
            Some("list what exists with `backshift ls` or GET /api/v1/tasks"),
        )
    }

    /// 401. Git clients get a Basic challenge so they can prompt.
    pub fn unauthorized(git: bool, why: &str) -> Self {
        let mut e = Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            why,
            Some(
                "send `Authorization: Bearer <token>`; the token was printed when the server first started and saved in the credentials file the CLI reads",
            ),
        );
        e.basic_challenge = git;
        e
    }

    /// 500 for our own failures, logged with their cause.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error: {e}"),
            Some("this is a bug in backshift; the server log has details"),
        )
    }
}

impl From<backshift_store::StoreError> for ApiError {
    fn from(e: backshift_store::StoreError) -> Self {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                hint: self.hint,
            },
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
        if self.basic_challenge
            && let Ok(v) = "Basic realm=\"backshift\"".parse()
        {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        resp
    }
}
