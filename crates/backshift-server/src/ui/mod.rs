//! The web UI: one page, its script and its style, all inside the binary
//! (no CDN, no build step, works offline), served at the root. A person
//! signs in with an API token, which is kept in an HttpOnly,
//! SameSite=Strict cookie; the page then uses the same REST API and
//! event streams as every other client.
//!
//! Requests authenticated by the cookie must carry `X-Backshift-UI: 1`
//! unless they only read: a cross-site page cannot set that header
//! without a CORS preflight, which this server never grants.

use crate::serve::App;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use std::sync::Arc;

/// The session cookie's name.
pub const COOKIE: &str = "backshift_session";
/// The header cookie-authenticated changes must carry.
pub const UI_HEADER: &str = "x-backshift-ui";

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// What the page may load and talk to: only this server.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The UI's routes (unauthenticated: the page itself holds no data).
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/", get(index))
        .route("/ui/app.js", get(script))
        .route("/ui/app.css", get(style))
        .route("/ui/session", get(whoami).post(sign_in).delete(sign_out))
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset(INDEX, "text/html; charset=utf-8")
}

async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

/// The session token in a request's cookies.
pub fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

fn problem(status: StatusCode, message: &str, hint: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": "sign_in", "message": message, "hint": hint}})),
    )
        .into_response()
}

/// `GET /ui/session`: who the cookie signs in, or 401.
async fn whoami(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let Some(token) = cookie_token(&headers) else {
        return problem(
            StatusCode::UNAUTHORIZED,
            "not signed in",
            "sign in with an API token",
        );
    };
    match app
        .store
        .token_by_hash(&crate::auth::hash_token(&token))
        .await
    {
        Ok(Some(name)) => Json(json!({"token": name})).into_response(),
        Ok(None) => problem(
            StatusCode::UNAUTHORIZED,
            "the session's token is no longer valid",
            "sign in again",
        ),
        Err(e) => problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            &e.to_string(),
            "see the server log",
        ),
    }
}

/// `POST /ui/session` with `{"token": "..."}`: checks the token and keeps
/// it in the session cookie.
async fn sign_in(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    if headers.get(UI_HEADER).is_none() {
        return problem(
            StatusCode::FORBIDDEN,
            "sign-in is only taken from backshift's own page",
            "open the server's address in a browser",
        );
    }
    let token = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["token"].as_str().map(|t| t.trim().to_owned()))
        .unwrap_or_default();
    if token.is_empty() || !token.chars().all(|c| c.is_ascii_graphic()) {
        return problem(
            StatusCode::BAD_REQUEST,
            "no token was given",
            "paste an API token: the one in the credentials file `backshift serve` wrote at first start",
        );
    }
    let name = match app
        .store
        .token_by_hash(&crate::auth::hash_token(&token))
        .await
    {
        Ok(Some(name)) => name,
        Ok(None) => {
            return problem(
                StatusCode::UNAUTHORIZED,
                "this token is not valid for this server",
                "check that it is this server's token (`cat ~/.config/backshift/credentials`)",
            );
        }
        Err(e) => {
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                &e.to_string(),
                "see the server log",
            );
        }
    };
    app.audit(&format!("token:{name}"), "ui.sign_in", &name, json!({}))
        .await;
    let cookie = format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        30 * 24 * 3600
    );
    ([(header::SET_COOKIE, cookie)], Json(json!({"token": name}))).into_response()
}

/// `DELETE /ui/session`: forgets the cookie.
async fn sign_out() -> Response {
    (
        StatusCode::NO_CONTENT,
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; backshift_session=tok en"),
        );
        assert_eq!(cookie_token(&h).as_deref(), Some("tok en"));
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("backshift_session="),
        );
        assert_eq!(cookie_token(&h), None);
        assert_eq!(cookie_token(&HeaderMap::new()), None);
    }
}
