//! Delivering a task's result: the chosen attempt's branch pushed to the
//! repository the task came from, and a pull request opened there, with
//! credentials only the control plane holds (`[[forges]]`). Only
//! `backshift/*` branches, never forced. The pull request's body is the
//! record a reviewer needs: the summary, the tests backshift ran, the
//! approvals and denials, the blocked network calls.
//!
//! A delivery is idempotent (pushing the same commit again is a no-op; an
//! open pull request for the branch is found, not duplicated), so one cut
//! short by a restart is simply done again (`resume`).

use crate::notes::{Blocked, Decision};
use crate::serve::App;
use backshift_git::forge::{Forge, NewPullRequest, owner_and_repo};
use backshift_protocol::{Delivery, EventKind, format_ts, now_ms};
use backshift_store::StoreError;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Delivers the task's chosen result, if it has one and a forge serves
/// its repository.
pub async fn deliver(app: &Arc<App>, task_id: &str) -> Result<(), StoreError> {
    let Some(task) = app.store.task(task_id).await? else {
        return Ok(());
    };
    let Some(winner) = task.winner.clone() else {
        return Ok(());
    };
    let Some(attempt) = app.store.attempt(&winner).await? else {
        return Ok(());
    };
    let mut record = Delivery {
        state: "pushing".into(),
        attempt: attempt.id.clone(),
        remote: None,
        branch: attempt.branch.clone(),
        commit: attempt.head_commit.clone(),
        pull_request: None,
        pull_request_url: None,
        error: None,
        at: format_ts(now_ms()),
    };
    let Some(forge) = app.config.forge_for(&task.repo).cloned() else {
        record.state = "kept".into();
        record.error = Some(format!(
            "no [[forges]] entry matches {}: the branch stays in backshift's git store (`backshift checkout {}`)",
            task.repo, task.id
        ));
        return settle(app, &task.id, &attempt.id, record, false).await;
    };
    record.remote = Some(task.repo.clone());
    let fail = |mut record: Delivery, why: String| {
        record.state = "failed".into();
        record.error = Some(why);
        record
    };
    // The invariant, checked where it matters.
    if !attempt.branch.starts_with("backshift/") {
        let r = fail(
            record,
            format!(
                "refusing to push {}: backshift only pushes backshift/* branches",
                attempt.branch
            ),
        );
        return settle(app, &task.id, &attempt.id, r, true).await;
    }
    let Some(commit) = attempt.head_commit.clone() else {
        let r = fail(
            record,
            format!("attempt {} has no published commit", attempt.id),
        );
        return settle(app, &task.id, &attempt.id, r, true).await;
    };
    let token = match forge.token() {
        Ok(t) => t,
        Err(why) => {
            let r = fail(
                record,
                format!("{why}; set it and run `backshift deliver {}`", task.id),
            );
            return settle(app, &task.id, &attempt.id, r, true).await;
        }
    };
    app.store.set_delivery(&task.id, &to_json(&record)).await?;
    if let Err(e) = app
        .git
        .push_branch(
            &task.project_id,
            &task.repo,
            &commit,
            &attempt.branch,
            token.as_deref(),
        )
        .await
    {
        let r = fail(
            record,
            format!(
                "the push of {} to {} failed: {e}. backshift never force-pushes: if the branch exists there with other commits, delete it or pick another attempt; then run `backshift deliver {}`",
                attempt.branch, task.repo, task.id
            ),
        );
        return settle(app, &task.id, &attempt.id, r, true).await;
    }
    record.state = "pushed".into();
    let (Some(kind), Some(api_url)) = (forge.kind, forge.api_url.as_deref()) else {
        return settle(app, &task.id, &attempt.id, record, true).await;
    };
    let opened = async {
        let (owner, repo) = owner_and_repo(&task.repo)
            .ok_or_else(|| format!("cannot tell the owner and repository from {}", task.repo))?;
        let client = Forge::new(kind, api_url, token.as_deref().unwrap_or_default())
            .map_err(|e| e.to_string())?;
        let base = match task.base_ref.as_deref() {
            Some(b) if !looks_like_commit(b) => b.trim_start_matches("refs/heads/").to_owned(),
            _ => client
                .default_branch(&owner, &repo)
                .await
                .map_err(|e| e.to_string())?,
        };
        let view = crate::results::task_view(app, task.clone())
            .await
            .map_err(|e| e.to_string())?;
        let winner_view = view
            .attempts
            .iter()
            .find(|a| a.id == attempt.id)
            .ok_or("the attempt is not in its task's view")?;
        let (decisions, blocked) = record_of(app, &attempt.id)
            .await
            .map_err(|e| e.to_string())?;
        let body = crate::notes::pr_body(&view, winner_view, &decisions, &blocked);
        let title = crate::notes::pr_title(attempt.summary.as_deref(), &task.prompt);
        client
            .open_pull_request(
                &owner,
                &repo,
                &NewPullRequest {
                    head: &attempt.branch,
                    base: &base,
                    title: &title,
                    body: &body,
                    draft: forge.draft,
                },
            )
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    let record = match opened {
        Ok(pr) => Delivery {
            state: "opened".into(),
            pull_request: Some(pr.number),
            pull_request_url: Some(pr.url),
            ..record
        },
        Err(why) => fail(
            record,
            format!(
                "the branch is pushed but the pull request could not be opened: {why}. Fix the forge settings ([[forges]] for {}) and run `backshift deliver {}`",
                forge.url, task.id
            ),
        ),
    };
    settle(app, &task.id, &attempt.id, record, true).await
}

/// Stores the delivery's outcome and (`announce`) puts it on the
/// attempt's record and the audit log.
async fn settle(
    app: &Arc<App>,
    task: &str,
    attempt: &str,
    record: Delivery,
    announce: bool,
) -> Result<(), StoreError> {
    app.store.set_delivery(task, &to_json(&record)).await?;
    if announce {
        app.audit(
            "delivery",
            &format!("task.deliver.{}", record.state),
            task,
            serde_json::json!({
                "attempt": attempt,
                "remote": record.remote,
                "branch": record.branch,
                "commit": record.commit,
                "pull_request": record.pull_request_url,
                "error": record.error,
            }),
        )
        .await;
        let _ = app
            .hub
            .emit(
                attempt,
                EventKind::Delivered {
                    delivery: Box::new(record),
                },
            )
            .await;
    }
    Ok(())
}

fn to_json(d: &Delivery) -> String {
    serde_json::to_string(d).unwrap_or_default()
}

fn looks_like_commit(s: &str) -> bool {
    s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The decisions and blocked requests on an attempt's record.
async fn record_of(app: &App, attempt: &str) -> Result<(Vec<Decision>, Vec<Blocked>), StoreError> {
    let events = app
        .store
        .events_of_kinds(
            attempt,
            &[
                "approval_requested",
                "approval_answered",
                "permission_decision",
                "egress",
            ],
            0,
        )
        .await?;
    let mut asked: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut decisions = Vec::new();
    let mut blocked: Vec<Blocked> = Vec::new();
    for e in events {
        match e.kind {
            EventKind::ApprovalRequested {
                approval,
                kind,
                summary,
                ..
            } => {
                asked.insert(approval, (kind, summary));
            }
            EventKind::ApprovalAnswered {
                approval,
                decision,
                scope,
                by,
                reason,
            } => {
                let what = asked
                    .get(&approval)
                    .map(|(k, s)| format!("{k}: {s}"))
                    .unwrap_or_else(|| format!("approval {approval}"));
                decisions.push(Decision {
                    what,
                    decision: match scope {
                        Some(scope) => format!("{decision} ({scope})"),
                        None => decision,
                    },
                    by,
                    reason,
                });
            }
            // What a person answered is above; the policy's refusals
            // are decisions too.
            EventKind::PermissionDecision {
                title,
                decision,
                by,
                reason,
                ..
            } if by == "policy" && decision.starts_with("reject") => {
                decisions.push(Decision {
                    what: format!("permission: {title}"),
                    decision,
                    by,
                    reason: Some(reason),
                });
            }
            EventKind::Egress {
                host,
                port,
                method,
                path,
                decision,
                reason,
                ..
            } if decision != "allowed" => {
                let what = match method {
                    Some(m) => format!("{m} {host}:{port}{}", path.unwrap_or_default()),
                    None => format!("CONNECT {host}:{port}"),
                };
                let reason = format!("{decision}: {reason}");
                match blocked
                    .iter_mut()
                    .find(|b| b.what == what && b.reason == reason)
                {
                    Some(b) => b.count += 1,
                    None => blocked.push(Blocked {
                        what,
                        reason,
                        count: 1,
                    }),
                }
            }
            _ => {}
        }
    }
    Ok((decisions, blocked))
}

/// Delivers again what a restart cut short (or never started).
pub async fn resume(app: Arc<App>) {
    let tasks = match app.store.undelivered_tasks().await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("cannot list undelivered tasks: {e}");
            return;
        }
    };
    for t in tasks {
        if let Err(e) = deliver(&app, &t.id).await {
            tracing::warn!(task = %t.id, "delivery failed: {e}");
        }
    }
}
