//! A stand-in forge on loopback: real git repositories served over smart
//! HTTP (the real `git upload-pack`/`receive-pack` behind Basic auth), and
//! the GitHub REST endpoints backshift's client uses, which check every
//! request's method, path, headers and body as GitHub documents them and
//! answer in GitHub's shapes. GitHub itself is unreachable here.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use backshift_git::http::{Service, Visible};
use base64::Engine;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// One API request as it arrived.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The method.
    pub method: String,
    /// The path and query.
    pub path: String,
    /// Its headers (lower-case names).
    pub headers: HashMap<String, String>,
    /// Its JSON body, if any.
    pub body: Value,
}

#[derive(Default)]
struct Seen {
    requests: Vec<Recorded>,
    failures: Vec<String>,
    pulls: Vec<Value>,
    comments: Vec<(String, u64, String)>,
    pushes: u32,
}

struct Inner {
    root: PathBuf,
    token: String,
    /// Speaks Gitea's API (`Authorization: token ...`) instead of GitHub's.
    gitea: bool,
    base: String,
    seen: Mutex<Seen>,
}

/// The forge; stopped when dropped.
pub struct FakeForge {
    inner: Arc<Inner>,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeForge {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeForge {
    /// Starts it; `token` is the only credential it accepts.
    pub async fn start(token: &str) -> anyhow::Result<FakeForge> {
        Self::start_as(token, false).await
    }

    /// Starts it speaking Gitea's API (its REST shapes are GitHub's, its
    /// credentials `Authorization: token <token>`).
    pub async fn start_gitea(token: &str) -> anyhow::Result<FakeForge> {
        Self::start_as(token, true).await
    }

    async fn start_as(token: &str, gitea: bool) -> anyhow::Result<FakeForge> {
        let dir = tempfile::tempdir()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            root: dir.path().to_owned(),
            token: token.to_owned(),
            gitea,
            base: format!("http://{addr}"),
            seen: Mutex::default(),
        });
        let app = Router::new()
            .route("/git/{owner}/{repo}/info/refs", get(info_refs))
            .route("/git/{owner}/{repo}/{service}", post(rpc))
            .route("/api/repos/{owner}/{repo}", get(repo_info))
            .route(
                "/api/repos/{owner}/{repo}/pulls",
                get(list_pulls).post(create_pull),
            )
            .route(
                "/api/repos/{owner}/{repo}/issues/{number}/comments",
                post(create_comment),
            )
            .fallback(unknown)
            .with_state(inner.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeForge {
            inner,
            addr,
            _dir: dir,
            server,
        })
    }

    /// Makes `owner/repo` a bare clone of the local repository `from`.
    pub fn create_repo(
        &self,
        owner: &str,
        repo: &str,
        from: &std::path::Path,
    ) -> anyhow::Result<()> {
        let dest = self.inner.root.join(owner).join(format!("{repo}.git"));
        std::fs::create_dir_all(dest.parent().unwrap_or(&self.inner.root))?;
        let out = std::process::Command::new("git")
            .args(["clone", "--quiet", "--bare"])
            .arg(from)
            .arg(&dest)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "git clone --bare: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The bare repository of `owner/repo` on disk.
    pub fn repo_path(&self, owner: &str, repo: &str) -> PathBuf {
        self.inner.root.join(owner).join(format!("{repo}.git"))
    }

    /// `http://ADDR/git/` (repositories are `<this>OWNER/REPO.git`).
    pub fn git_url(&self) -> String {
        format!("http://{}/git/", self.addr)
    }

    /// `http://ADDR/api` (what `api_url` is for GitHub's client).
    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    /// Every API request, in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// What was wrong with requests (a real GitHub would have refused them).
    pub fn failures(&self) -> Vec<String> {
        self.lock().failures.clone()
    }

    /// The pull requests opened.
    pub fn pulls(&self) -> Vec<Value> {
        self.lock().pulls.clone()
    }

    /// Comments added: (`owner/repo`, issue or pull request number, body).
    pub fn comments(&self) -> Vec<(String, u64, String)> {
        self.lock().comments.clone()
    }

    /// Pushes received.
    pub fn pushes(&self) -> u32 {
        self.lock().pushes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.inner.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn repo(&self, owner: &str, repo: &str) -> Option<PathBuf> {
        let name = repo.trim_end_matches(".git");
        let path = self.root.join(owner).join(format!("{name}.git"));
        path.is_dir().then_some(path)
    }

    /// Git clients: Basic credentials whose password is the token.
    fn git_authorized(&self, headers: &HeaderMap) -> bool {
        let Some(v) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let Some(b64) = v.strip_prefix("Basic ") else {
            return false;
        };
        let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            return false;
        };
        let raw = String::from_utf8_lossy(&raw);
        raw.split_once(':').map(|(_, p)| p) == Some(self.token.as_str())
    }

    /// API clients, checked as GitHub documents its REST API.
    fn check_api(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &Value,
    ) -> Result<(), Box<Response>> {
        let h = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let mut seen = self.seen();
        seen.requests.push(Recorded {
            method: method.to_string(),
            path: uri.to_string(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
                .collect(),
            body: body.clone(),
        });
        let (scheme, want) = if self.gitea {
            ("token", format!("token {}", self.token))
        } else {
            ("Bearer", format!("Bearer {}", self.token))
        };
        if h("authorization") != want {
            seen.failures.push(format!(
                "{method} {uri}: Authorization is not `{scheme} <token>`"
            ));
            return Err(Box::new(
                (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"message": "Bad credentials"})),
                )
                    .into_response(),
            ));
        }
        let mut wrong = Vec::new();
        if !self.gitea && h("accept") != "application/vnd.github+json" {
            wrong.push("Accept is not application/vnd.github+json");
        }
        if !self.gitea && h("x-github-api-version").is_empty() {
            wrong.push("no X-GitHub-Api-Version");
        }
        if self.gitea
            && (body.get("draft").is_some() || body.get("maintainer_can_modify").is_some())
        {
            wrong.push("GitHub-only fields sent to Gitea");
        }
        if h("user-agent").is_empty() {
            wrong.push("no User-Agent (GitHub refuses those)");
        }
        if *method == Method::POST && !h("content-type").starts_with("application/json") {
            wrong.push("a POST body that is not JSON");
        }
        for w in wrong {
            seen.failures.push(format!("{method} {uri}: {w}"));
        }
        Ok(())
    }
}

/// GitHub's answer for a missing repository or endpoint.
fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"message": "Not Found"})),
    )
        .into_response()
}

async fn unknown(State(f): State<Arc<Inner>>, method: Method, uri: Uri) -> Response {
    f.seen()
        .failures
        .push(format!("{method} {uri}: no such endpoint"));
    not_found()
}

fn challenge() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic realm=\"fake forge\"")],
        "credentials required",
    )
        .into_response()
}

async fn info_refs(
    State(f): State<Arc<Inner>>,
    Path((owner, repo)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !f.git_authorized(&headers) {
        return challenge();
    }
    let Some(path) = f.repo(&owner, &repo) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(service) = q.get("service").and_then(|s| Service::from_name(s)) else {
        return (StatusCode::FORBIDDEN, "smart HTTP only").into_response();
    };
    match backshift_git::http::advertise(&path, service, &Visible::All).await {
        Ok(body) => ([(header::CONTENT_TYPE, service.advertisement_type())], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn rpc(
    State(f): State<Arc<Inner>>,
    Path((owner, repo, service)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !f.git_authorized(&headers) {
        return challenge();
    }
    let Some(path) = f.repo(&owner, &repo) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(service) = Service::from_name(&service) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() == b"gzip");
    let Ok(request) = backshift_git::http::request_body(&body, gzip) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if service == Service::ReceivePack {
        f.seen().pushes += 1;
    }
    match backshift_git::http::serve(&path, service, &request, &Visible::All).await {
        Ok(out) => ([(header::CONTENT_TYPE, service.result_type())], out).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn repo_info(
    State(f): State<Arc<Inner>>,
    Path((owner, repo)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = f.check_api(&method, &uri, &headers, &Value::Null) {
        return *r;
    }
    if f.repo(&owner, &repo).is_none() {
        return not_found();
    }
    axum::Json(json!({
        "full_name": format!("{owner}/{repo}"),
        "default_branch": "main",
        "html_url": format!("{}/{owner}/{repo}", f.base),
    }))
    .into_response()
}

fn branch_exists(repo: &std::path::Path, branch: &str) -> bool {
    std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repo)
        .args([
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("refs/heads/{branch}"),
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

async fn list_pulls(
    State(f): State<Arc<Inner>>,
    Path((owner, repo)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = f.check_api(&method, &uri, &headers, &Value::Null) {
        return *r;
    }
    let want_head = q.get("head").cloned();
    let state = q.get("state").cloned().unwrap_or_else(|| "open".into());
    let pulls: Vec<Value> = f
        .seen()
        .pulls
        .iter()
        .filter(|p| p["base"]["repo"]["full_name"] == format!("{owner}/{repo}"))
        .filter(|p| state == "all" || p["state"] == state.as_str())
        .filter(|p| {
            want_head
                .as_deref()
                .is_none_or(|h| h == format!("{owner}:{}", p["head"]["ref"].as_str().unwrap_or("")))
        })
        .cloned()
        .collect();
    axum::Json(Value::Array(pulls)).into_response()
}

async fn create_pull(
    State(f): State<Arc<Inner>>,
    Path((owner, repo)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Err(r) = f.check_api(&method, &uri, &headers, &body) {
        return *r;
    }
    let Some(path) = f.repo(&owner, &repo) else {
        return not_found();
    };
    let s = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let mut errors = Vec::new();
    for field in ["title", "head", "base"] {
        if s(field).is_empty() {
            errors
                .push(json!({"resource": "PullRequest", "field": field, "code": "missing_field"}));
        }
    }
    if body.get("body").is_some_and(|b| !b.is_string()) {
        errors.push(json!({"resource": "PullRequest", "field": "body", "code": "invalid"}));
    }
    if body.get("draft").is_some_and(|b| !b.is_boolean()) {
        errors.push(json!({"resource": "PullRequest", "field": "draft", "code": "invalid"}));
    }
    if !s("head").is_empty() && !branch_exists(&path, &s("head")) {
        errors.push(json!({"resource": "PullRequest", "field": "head", "code": "invalid"}));
    }
    if !s("base").is_empty() && !branch_exists(&path, &s("base")) {
        errors.push(json!({"resource": "PullRequest", "field": "base", "code": "invalid"}));
    }
    let mut seen = f.seen();
    if seen
        .pulls
        .iter()
        .any(|p| p["head"]["ref"] == s("head").as_str() && p["state"] == "open")
    {
        errors.push(json!({"resource": "PullRequest", "code": "custom", "message": format!("A pull request already exists for {owner}:{}.", s("head"))}));
    }
    if !errors.is_empty() {
        seen.failures.push(format!(
            "POST {uri}: refused with {}",
            Value::Array(errors.clone())
        ));
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"message": "Validation Failed", "errors": errors})),
        )
            .into_response();
    }
    let number = seen.pulls.len() as u64 + 1;
    let pull = json!({
        "number": number,
        "state": "open",
        "title": s("title"),
        "body": body.get("body").cloned().unwrap_or(Value::Null),
        "draft": body.get("draft").and_then(Value::as_bool).unwrap_or(false),
        "html_url": format!("{}/{owner}/{repo}/pull/{number}", f.base),
        "head": {"ref": s("head"), "repo": {"full_name": format!("{owner}/{repo}")}},
        "base": {"ref": s("base"), "repo": {"full_name": format!("{owner}/{repo}")}},
    });
    seen.pulls.push(pull.clone());
    (StatusCode::CREATED, axum::Json(pull)).into_response()
}

async fn create_comment(
    State(f): State<Arc<Inner>>,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Err(r) = f.check_api(&method, &uri, &headers, &body) {
        return *r;
    }
    let Some(text) = body.get("body").and_then(Value::as_str) else {
        f.seen()
            .failures
            .push(format!("POST {uri}: a comment without a string `body`"));
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"message": "Validation Failed"})),
        )
            .into_response();
    };
    let mut seen = f.seen();
    seen.comments
        .push((format!("{owner}/{repo}"), number, text.to_owned()));
    let id = seen.comments.len();
    (
        StatusCode::CREATED,
        axum::Json(json!({
            "id": id,
            "body": text,
            "html_url": format!("{}/{owner}/{repo}/issues/{number}#issuecomment-{id}", f.base),
        })),
    )
        .into_response()
}
