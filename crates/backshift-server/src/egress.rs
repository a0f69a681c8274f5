//! Each sandbox's egress proxy (`backshift-egress`), decided by the
//! server's `[egress]` policy, every decision an `egress` event on the
//! attempt.
//!
//! The proxy listens on `egress.sock` in the sandbox's shim directory; the
//! shim carries loopback port [`PROXY_PORT`] inside the sandbox to it, and
//! the sandbox's proxy variables point there. The sandbox has no network
//! of its own, so there is no other way out.

use crate::approvals::{self, Question};
use crate::serve::App;
use backshift_core::AttemptState;
use backshift_core::policy::{self, Action, Origin};
use backshift_egress::{Attempted, Decider, Outcome, Verdict};
use backshift_protocol::EventKind;
use backshift_shim::proto::{EGRESS_PORT as PROXY_PORT, EGRESS_SOCKET as PROXY_SOCKET};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The proxy's URL as tools inside the sandbox see it.
pub fn proxy_url_in_sandbox() -> String {
    format!("http://127.0.0.1:{PROXY_PORT}")
}

/// The environment that points a sandbox's tools at the proxy: the
/// standard variables in both cases (curl, git, pip, cargo, npm read
/// them), Node's opt-in, and the loopback exceptions (the model gateway).
pub fn sandbox_env() -> Vec<(String, String)> {
    let url = proxy_url_in_sandbox();
    let no_proxy = "127.0.0.1,localhost,::1".to_owned();
    [
        ("HTTP_PROXY", url.clone()),
        ("HTTPS_PROXY", url.clone()),
        ("http_proxy", url.clone()),
        ("https_proxy", url),
        ("NO_PROXY", no_proxy.clone()),
        ("no_proxy", no_proxy),
        ("NODE_USE_ENV_PROXY", "1".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// A sandbox's proxy; it stops when this is dropped.
pub struct Egress {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Egress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `attempt`'s proxy on the socket in its shim directory `dir`.
pub fn start(app: Arc<App>, attempt: &str, dir: &Path) -> std::io::Result<Egress> {
    let path = dir.join(PROXY_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    // The shim (the sandbox's user) connects to it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666))?;
    let network = Arc::new(app.config.egress.network());
    let decider = Arc::new(AttemptPolicy {
        app,
        attempt: attempt.to_owned(),
        project: tokio::sync::OnceCell::new(),
    });
    let task = tokio::spawn(backshift_egress::serve(listener, decider, network));
    Ok(Egress { task })
}

/// The policy of one attempt's sandbox.
struct AttemptPolicy {
    app: Arc<App>,
    attempt: String,
    /// The attempt's project, looked up once.
    project: tokio::sync::OnceCell<String>,
}

impl AttemptPolicy {
    /// The project's own rules, as they are now (a change applies to the
    /// next request). Unreadable ones are logged and left out: the
    /// server's rules and default decide.
    async fn project_rules(&self) -> Vec<policy::Rule> {
        let project = self
            .project
            .get_or_init(|| async {
                let task = backshift_core::AttemptId::parse(&self.attempt)
                    .map(|a| a.task_id().as_str().to_owned())
                    .unwrap_or_default();
                match self.app.store.task(&task).await {
                    Ok(Some(t)) => t.project_id,
                    _ => String::new(),
                }
            })
            .await;
        match self.app.store.project(project).await {
            Ok(Some(p)) => serde_json::from_str(&p.egress_rules).unwrap_or_else(|e| {
                tracing::error!(project = %p.id, "unreadable egress rules: {e}");
                Vec::new()
            }),
            _ => Vec::new(),
        }
    }

    /// Holds `req` for a person's answer (or an earlier approval's grant).
    async fn ask(&self, req: &Attempted, rule: Option<String>) -> Verdict {
        let target = format!("{}:{}", req.host, req.port);
        let (method, path) = match &req.http {
            Some((m, p)) => (Some(m.as_str()), Some(p.as_str())),
            None => (None, None),
        };
        let question = Question {
            kind: "egress",
            summary: req.describe(),
            subject: serde_json::json!({
                "host": req.host,
                "port": req.port,
                "method": method,
                "path": path,
                "rule": rule,
                "target": target,
            }),
            target,
        };
        let timeout = Duration::from_secs(self.app.config.approvals.timeout_secs);
        match approvals::ask(&self.app, &self.attempt, question, timeout).await {
            approvals::Outcome::Granted { approval } => Verdict {
                allow: true,
                reason: format!("allowed by approval {approval}, given earlier for this host"),
                rule: Some(format!("approval {approval}")),
            },
            approvals::Outcome::Approved {
                approval,
                scope,
                by,
            } => Verdict {
                allow: true,
                reason: format!("approved by {by} ({scope})"),
                rule: Some(format!("approval {approval}")),
            },
            approvals::Outcome::Denied {
                approval,
                by,
                reason,
            } => Verdict {
                allow: false,
                reason: match reason {
                    Some(r) => format!("denied by {by}: {r}"),
                    None => format!("denied by {by}"),
                },
                rule: Some(format!("approval {approval}")),
            },
            approvals::Outcome::Expired { approval, why } => Verdict {
                allow: false,
                reason: why,
                rule: (!approval.is_empty()).then(|| format!("approval {approval}")),
            },
        }
    }
}

#[async_trait::async_trait]
impl Decider for AttemptPolicy {
    async fn decide(&self, req: &Attempted) -> Verdict {
        let egress = &self.app.config.egress;
        let project = self.project_rules().await;
        // The setup phase (a devcontainer's commands, while the attempt
        // is preparing) has rules of its own on top.
        let setup = matches!(
            self.app.store.attempt(&self.attempt).await,
            Ok(Some(a)) if matches!(a.state, AttemptState::Provisioning | AttemptState::Preparing)
        );
        let none: &[policy::Rule] = &[];
        let default = match (setup, egress.setup_default) {
            (true, Some(d)) => d,
            _ => egress.default,
        };
        let decision = policy::evaluate(
            &[
                (Origin::Project, &project[..]),
                (Origin::Server, &egress.rules[..]),
                (
                    Origin::Setup,
                    if setup { &egress.setup_rules[..] } else { none },
                ),
            ],
            default,
            &req.as_policy(),
        );
        let by = decision
            .rule
            .clone()
            .unwrap_or_else(|| format!("the default ({default})"));
        match decision.action {
            Action::Allow => Verdict {
                allow: true,
                rule: decision.rule,
                reason: format!("allowed by {by}"),
            },
            Action::Ask => self.ask(req, decision.rule).await,
            Action::Deny => Verdict {
                allow: false,
                reason: match &decision.rule {
                    Some(rule) => format!("denied by {rule}"),
                    None => format!(
                        "no egress rule allows {}:{}, and the default is {default}",
                        req.host, req.port
                    ),
                },
                rule: decision.rule,
            },
        }
    }

    async fn record(&self, req: &Attempted, verdict: &Verdict, outcome: &Outcome) {
        let (decision, reason, address) = match outcome {
            Outcome::Denied => ("denied", verdict.reason.clone(), None),
            Outcome::Connected(addr) => ("allowed", verdict.reason.clone(), Some(addr.to_string())),
            Outcome::Failed(why) => ("failed", format!("{}; but {why}", verdict.reason), None),
        };
        let (method, path) = match &req.http {
            Some((m, p)) => (Some(m.clone()), Some(p.clone())),
            None => (None, None),
        };
        let actor = if verdict
            .rule
            .as_deref()
            .is_some_and(|r| r.starts_with("approval "))
        {
            "approval"
        } else {
            "policy"
        };
        self.app
            .audit(
                actor,
                &format!("egress.{decision}"),
                &format!("{}:{}", req.host, req.port),
                serde_json::json!({
                    "attempt": self.attempt,
                    "method": method,
                    "path": path,
                    "rule": verdict.rule,
                    "reason": reason,
                    "address": address,
                }),
            )
            .await;
        let event = EventKind::Egress {
            host: req.host.clone(),
            port: req.port,
            method,
            path,
            decision: decision.into(),
            rule: verdict.rule.clone(),
            reason,
            address,
        };
        if let Err(e) = self.app.hub.emit(&self.attempt, event).await {
            tracing::warn!(attempt = %self.attempt, "cannot record an egress decision: {e}");
        }
    }
}
