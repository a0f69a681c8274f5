//! A sandbox's own git endpoint: smart HTTP on `git.sock` in its shim
//! directory (loopback port 47013 inside the sandbox), for its project's
//! repository in the git store only, authenticated by the sandbox's token.
//! It sees and may update one ref: its attempt's branch. Every other ref
//! is hidden (not advertised, not fetchable); a push to anything else is
//! refused as git reports it (`! [remote rejected]`), and every push is a
//! `git_push` event and an audit row.

use crate::serve::App;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use backshift_git::http::{PushCommand, Service, Visible, push_commands, refusal};
use backshift_protocol::EventKind;
use backshift_shim::proto::{GIT_PORT, GIT_SOCKET};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

/// The endpoint's URL for `project` as the sandbox sees it.
pub fn url_in_sandbox(project: &str) -> String {
    format!("http://127.0.0.1:{GIT_PORT}/{project}.git")
}

/// The environment that makes `git push backshift` work in the sandbox:
/// a remote named `backshift` and the token as a header for that URL,
/// through git's environment configuration (nothing written to files).
pub fn sandbox_env(project: &str, branch: &str, token: &str) -> Vec<(String, String)> {
    let url = url_in_sandbox(project);
    let config = [
        ("remote.backshift.url", url.clone()),
        (
            "remote.backshift.fetch",
            format!("+refs/heads/{branch}:refs/remotes/backshift/{branch}"),
        ),
        (
            "http.http://127.0.0.1:47013/.extraHeader",
            format!("Authorization: Bearer {token}"),
        ),
    ];
    let mut env = vec![("GIT_CONFIG_COUNT".to_owned(), config.len().to_string())];
    for (i, (k, v)) in config.into_iter().enumerate() {
        env.push((format!("GIT_CONFIG_KEY_{i}"), k.to_owned()));
        env.push((format!("GIT_CONFIG_VALUE_{i}"), v));
    }
    env.push(("BACKSHIFT_GIT_URL".into(), url));
    env.push(("BACKSHIFT_BRANCH".into(), branch.to_owned()));
    env
}

/// A sandbox's git endpoint; it stops when this is dropped.
pub struct SandboxGit {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SandboxGit {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct GitState {
    app: Arc<App>,
    attempt: String,
}

/// Serves `attempt`'s git endpoint on the socket in its shim directory.
pub fn start(app: Arc<App>, attempt: &str, dir: &std::path::Path) -> std::io::Result<SandboxGit> {
    let path = dir.join(GIT_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    let state = Arc::new(GitState {
        app,
        attempt: attempt.to_owned(),
    });
    let router = Router::new()
        .route("/{repo}/info/refs", get(info_refs))
        .route("/{repo}/{service}", post(rpc))
        .fallback(|| async { plain(StatusCode::NOT_FOUND, "this is the sandbox's git endpoint: git fetch/push backshift (see $BACKSHIFT_GIT_URL)") })
        .with_state(state);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::warn!("sandbox git endpoint stopped: {e}");
        }
    });
    Ok(SandboxGit { task })
}

/// Whether the client gzipped the request body.
pub(crate) fn gzipped(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"))
}

fn plain(status: StatusCode, text: &str) -> Response {
    (status, format!("backshift: {text}\n")).into_response()
}

#[derive(serde::Deserialize)]
struct InfoRefs {
    service: Option<String>,
}

/// What this sandbox may reach: its project's repository, its branch.
struct Scope {
    repo: std::path::PathBuf,
    branch_ref: String,
}

impl GitState {
    async fn scope(&self, headers: &HeaderMap, repo: &str) -> Result<Scope, Response> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::token_from_header);
        let attempt = crate::gateway::sandbox_token(&self.app, &self.attempt, token.as_deref())
            .await
            .map_err(|why| {
                let mut r = plain(
                    StatusCode::UNAUTHORIZED,
                    &format!("{why}; the sandbox's git configuration sends its token"),
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Basic realm=\"backshift\""),
                );
                r
            })?;
        let task = self
            .app
            .store
            .task(&attempt.task_id)
            .await
            .ok()
            .flatten()
            .ok_or_else(|| plain(StatusCode::NOT_FOUND, "this sandbox's task is unknown"))?;
        if repo.strip_suffix(".git").unwrap_or(repo) != task.project_id {
            return Err(plain(
                StatusCode::NOT_FOUND,
                &format!(
                    "no repository {repo} here: this sandbox reaches its own project only ({})",
                    url_in_sandbox(&task.project_id)
                ),
            ));
        }
        Ok(Scope {
            repo: self.app.git.repo_path(&task.project_id),
            branch_ref: format!("refs/heads/{}", attempt.branch),
        })
    }

    async fn record(&self, commands: &[PushCommand], decision: &str, reason: &str) {
        let refs: Vec<String> = commands.iter().map(|c| c.name.clone()).collect();
        self.app
            .audit(
                &format!("sandbox:{}", self.attempt),
                &format!("git.push.{decision}"),
                &self.attempt,
                serde_json::json!({
                    "refs": commands.iter().map(|c| serde_json::json!({"ref": c.name, "old": c.old, "new": c.new})).collect::<Vec<_>>(),
                    "reason": reason,
                }),
            )
            .await;
        let _ = self
            .app
            .hub
            .emit(
                &self.attempt,
                EventKind::GitPush {
                    refs,
                    decision: decision.into(),
                    reason: reason.into(),
                },
            )
            .await;
    }
}

async fn info_refs(
    State(st): State<Arc<GitState>>,
    Path(repo): Path<String>,
    Query(q): Query<InfoRefs>,
    headers: HeaderMap,
) -> Response {
    let scope = match st.scope(&headers, &repo).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(service) = q.service.as_deref().and_then(Service::from_name) else {
        return plain(
            StatusCode::FORBIDDEN,
            "only smart HTTP (git-upload-pack, git-receive-pack) is served",
        );
    };
    match backshift_git::http::advertise(
        &scope.repo,
        service,
        &Visible::Only(vec![scope.branch_ref]),
    )
    .await
    {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, service.advertisement_type()),
                (header::CACHE_CONTROL, "no-cache".to_owned()),
            ],
            body,
        )
            .into_response(),
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn rpc(
    State(st): State<Arc<GitState>>,
    Path((repo, service)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let scope = match st.scope(&headers, &repo).await {
        Ok(s) => s,
        Err(r) => return r,
    };
    let Some(service) = Service::from_name(&service) else {
        return plain(
            StatusCode::NOT_FOUND,
            "only git-upload-pack and git-receive-pack are served",
        );
    };
    let request = match backshift_git::http::request_body(&body, gzipped(&headers)) {
        Ok(r) => r,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &e),
    };
    let result_type = service.result_type();
    if service == Service::ReceivePack {
        let (commands, caps) = match push_commands(&request) {
            Ok(x) => x,
            Err(e) => return plain(StatusCode::BAD_REQUEST, &e),
        };
        let foreign: Vec<&str> = commands
            .iter()
            .filter(|c| c.name != scope.branch_ref)
            .map(|c| c.name.as_str())
            .collect();
        if !foreign.is_empty() {
            let reason = format!(
                "this sandbox may push only its own branch ({}), not {}",
                scope.branch_ref,
                foreign.join(", ")
            );
            st.record(&commands, "refused", &reason).await;
            let body = refusal(
                &commands,
                &caps,
                "backshift: only this attempt's branch",
                &format!(
                    "backshift: {reason}; push with `git push backshift HEAD:{}`",
                    scope.branch_ref
                ),
            );
            return ([(header::CONTENT_TYPE, result_type)], Body::from(body)).into_response();
        }
        let out = backshift_git::http::serve(
            &scope.repo,
            service,
            &request,
            &Visible::Only(vec![scope.branch_ref.clone()]),
        )
        .await;
        return match out {
            Ok(body) => {
                st.record(&commands, "accepted", "the attempt's own branch")
                    .await;
                ([(header::CONTENT_TYPE, result_type)], Body::from(body)).into_response()
            }
            Err(e) => {
                st.record(&commands, "refused", &e.to_string()).await;
                plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string())
            }
        };
    }
    match backshift_git::http::serve(
        &scope.repo,
        service,
        &request,
        &Visible::Only(vec![scope.branch_ref]),
    )
    .await
    {
        Ok(body) => ([(header::CONTENT_TYPE, result_type)], Body::from(body)).into_response(),
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}
