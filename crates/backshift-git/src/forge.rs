//! Forge clients: opening a pull request for a branch backshift pushed.
//! GitHub's REST API, and Gitea's (Forgejo's), which has the same shape
//! under `/api/v1`. The token is the control plane's own; it never enters
//! a sandbox.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::time::Duration;

/// Which API a forge speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForgeKind {
    /// GitHub (github.com or GitHub Enterprise: `api_url` is
    /// `https://api.github.com` or `https://HOST/api/v3`).
    Github,
    /// Gitea or Forgejo (`api_url` is `https://HOST/api/v1`).
    Gitea,
}

/// What went wrong talking to a forge.
#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    /// It could not be reached.
    #[error("cannot reach the forge at {url}: {error}")]
    Unreachable {
        /// The request's URL.
        url: String,
        /// Why.
        error: String,
    },
    /// It answered with an error.
    #[error("the forge answered {status} to {method} {url}: {message}")]
    Refused {
        /// The request's method.
        method: String,
        /// The request's URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// Its message.
        message: String,
    },
    /// It answered something we cannot read.
    #[error("unexpected answer from {url}: {0}", url = .1)]
    Unreadable(String, String),
}

/// A pull request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequest {
    /// Its number.
    pub number: u64,
    /// Its page.
    pub url: String,
    /// Whether this call opened it (false: it was open already).
    pub opened: bool,
}

/// What a pull request says.
#[derive(Debug, Clone)]
pub struct NewPullRequest<'a> {
    /// The branch with the work.
    pub head: &'a str,
    /// The branch it goes into.
    pub base: &'a str,
    /// Its title.
    pub title: &'a str,
    /// Its body (Markdown).
    pub body: &'a str,
    /// Open it as a draft (GitHub only).
    pub draft: bool,
}

/// A forge's API, with the control plane's token.
#[derive(Debug, Clone)]
pub struct Forge {
    kind: ForgeKind,
    api_url: String,
    token: String,
    http: reqwest::Client,
}

/// `owner` and `repo` of a repository URL (`https://host/owner/repo.git`,
/// `https://host/prefix/owner/repo`): its last two path segments.
pub fn owner_and_repo(url: &str) -> Option<(String, String)> {
    let path = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = path.split_once('/')?.1;
    let mut parts = path.trim_end_matches('/').rsplit('/');
    let repo = parts.next()?.trim_end_matches(".git");
    let owner = parts.next()?;
    if owner.is_empty() || repo.is_empty() {
        return None;
    }
    Some((owner.to_owned(), repo.to_owned()))
}

impl Forge {
    /// A client for the forge at `api_url`.
    pub fn new(kind: ForgeKind, api_url: &str, token: &str) -> Result<Forge, ForgeError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("backshift/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| ForgeError::Unreachable {
                url: api_url.to_owned(),
                error: e.to_string(),
            })?;
        Ok(Forge {
            kind,
            api_url: api_url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), ForgeError> {
        let url = format!("{}{path}", self.api_url);
        let mut req = self.http.request(method.clone(), &url);
        req = match self.kind {
            ForgeKind::Github => req
                .bearer_auth(&self.token)
                .header("Accept", "application/vnd.github+json")
                .header("X-GitHub-Api-Version", "2022-11-28"),
            ForgeKind::Gitea => req
                .header("Authorization", format!("token {}", self.token))
                .header("Accept", "application/json"),
        };
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| ForgeError::Unreachable {
            url: url.clone(),
            error: e.to_string(),
        })?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    fn refused(method: &str, url: String, status: u16, v: &Value) -> ForgeError {
        let mut message = v
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string());
        if let Some(errors) = v.get("errors") {
            message.push_str(&format!(" ({errors})"));
        }
        ForgeError::Refused {
            method: method.to_owned(),
            url,
            status,
            message,
        }
    }

    /// The repository's default branch.
    pub async fn default_branch(&self, owner: &str, repo: &str) -> Result<String, ForgeError> {
        let path = format!("/repos/{owner}/{repo}");
        let (status, v) = self.call(reqwest::Method::GET, &path, None).await?;
        if status != 200 {
            return Err(Self::refused("GET", self.url(&path), status, &v));
        }
        v.get("default_branch")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ForgeError::Unreadable("no default_branch".into(), self.url(&path)))
    }

    /// Opens a pull request of `pr.head` into `pr.base`, or finds the one
    /// open already for that branch (so delivering twice opens one).
    pub async fn open_pull_request(
        &self,
        owner: &str,
        repo: &str,
        pr: &NewPullRequest<'_>,
    ) -> Result<PullRequest, ForgeError> {
        if let Some(existing) = self.find_open(owner, repo, pr.head).await? {
            return Ok(existing);
        }
        let path = format!("/repos/{owner}/{repo}/pulls");
        let mut body = json!({
            "title": pr.title,
            "head": pr.head,
            "base": pr.base,
            "body": pr.body,
        });
        if self.kind == ForgeKind::Github {
            body["draft"] = json!(pr.draft);
            body["maintainer_can_modify"] = json!(false);
        }
        let (status, v) = self.call(reqwest::Method::POST, &path, Some(&body)).await?;
        if status != 201 {
            return Err(Self::refused("POST", self.url(&path), status, &v));
        }
        let mut opened = read_pull(&v).ok_or_else(|| {
            ForgeError::Unreadable(format!("no number or html_url in {v}"), self.url(&path))
        })?;
        opened.opened = true;
        Ok(opened)
    }

    /// Adds a comment to issue (or pull request) `number`.
    pub async fn comment(
        &self,
        owner: &str,
        repo: &str,
        number: u64,
        body: &str,
    ) -> Result<(), ForgeError> {
        let path = format!("/repos/{owner}/{repo}/issues/{number}/comments");
        let (status, v) = self
            .call(reqwest::Method::POST, &path, Some(&json!({ "body": body })))
            .await?;
        if status != 201 {
            return Err(Self::refused("POST", self.url(&path), status, &v));
        }
        Ok(())
    }

    /// The open pull request whose head is `branch`, if any.
    async fn find_open(
        &self,
        owner: &str,
        repo: &str,
        branch: &str,
    ) -> Result<Option<PullRequest>, ForgeError> {
        let path = match self.kind {
            ForgeKind::Github => {
                format!("/repos/{owner}/{repo}/pulls?state=open&head={owner}:{branch}")
            }
            ForgeKind::Gitea => format!("/repos/{owner}/{repo}/pulls?state=open"),
        };
        let (status, v) = self.call(reqwest::Method::GET, &path, None).await?;
        if status != 200 {
            return Err(Self::refused("GET", self.url(&path), status, &v));
        }
        Ok(v.as_array().and_then(|list| {
            list.iter()
                .find(|p| p.pointer("/head/ref").and_then(Value::as_str) == Some(branch))
                .and_then(read_pull)
        }))
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api_url)
    }
}

fn read_pull(v: &Value) -> Option<PullRequest> {
    Some(PullRequest {
        number: v.get("number")?.as_u64()?,
        url: v.get("html_url")?.as_str()?.to_owned(),
        opened: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_and_repo_come_from_the_urls_last_segments() {
        for (url, want) in [
            (
                "https://github.com/acme/widgets.git",
                Some(("acme", "widgets")),
            ),
            ("https://github.com/acme/widgets", Some(("acme", "widgets"))),
            (
                "http://127.0.0.1:9/git/acme/widgets.git/",
                Some(("acme", "widgets")),
            ),
            ("https://host/only", None),
        ] {
            let got = owner_and_repo(url);
            assert_eq!(
                got.as_ref().map(|(o, r)| (o.as_str(), r.as_str())),
                want,
                "{url}"
            );
        }
    }
}
