//! Approvals: a request held until a person answers it, or denied when
//! nobody does in time (fail closed).
//!
//! [`ask`] is called by what holds the request (the egress proxy, with
//! the connection open). It first looks for a grant an earlier approval
//! "for the task" or "for the project" left; otherwise it records a
//! pending approval (an `approval_requested` event), moves the attempt to
//! `waiting_approval`, and waits. The answer comes through the API
//! ([`answer`]), which records it with its grant in one transaction and
//! wakes the waiters; a waiter on another replica sees it at its next
//! look (once a second). When the last pending approval of an attempt is
//! settled, the attempt goes back to `running`. Whoever changes an
//! approval records the `approval_answered` event.

use crate::serve::App;
use backshift_core::{AttemptState, TaskId, Transition};
use backshift_protocol::{
    AnswerApproval, ApprovalView, Decision, EventKind, Scope, format_ts, now_ms,
};
use backshift_store::{Answer, ApprovalRow, NewGrant};
use std::time::Duration;

/// What [`ask`] came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An earlier task- or project-wide approval covers it.
    Granted {
        /// That approval.
        approval: String,
    },
    /// A person approved it.
    Approved {
        /// The approval.
        approval: String,
        /// `once`, `task` or `project`.
        scope: String,
        /// Who.
        by: String,
    },
    /// A person denied it.
    Denied {
        /// The approval.
        approval: String,
        /// Who.
        by: String,
        /// Why, when said.
        reason: Option<String>,
    },
    /// Nobody answered in time, or the attempt ended first.
    Expired {
        /// The approval.
        approval: String,
        /// Why.
        why: String,
    },
}

/// What is asked.
#[derive(Debug, Clone)]
pub struct Question {
    /// `egress` or `permission`.
    pub kind: &'static str,
    /// One line for people.
    pub summary: String,
    /// Details (JSON object).
    pub subject: serde_json::Value,
    /// What a task- or project-wide approval grants (`host:port`, a
    /// tool's name).
    pub target: String,
}

/// Holds `question` for `attempt` until it is answered, expires after
/// `timeout`, or the attempt ends.
pub async fn ask(app: &App, attempt: &str, question: Question, timeout: Duration) -> Outcome {
    match ask_inner(app, attempt, question, timeout).await {
        Ok(outcome) => outcome,
        Err(e) => {
            tracing::error!(attempt, "an approval could not be asked: {e}");
            Outcome::Expired {
                approval: String::new(),
                why: format!(
                    "backshift could not ask for an approval ({e}), so the request is denied"
                ),
            }
        }
    }
}

async fn ask_inner(
    app: &App,
    attempt: &str,
    question: Question,
    timeout: Duration,
) -> Result<Outcome, backshift_store::StoreError> {
    let task_id = task_of(attempt);
    let task = app
        .store
        .task(&task_id)
        .await?
        .ok_or_else(|| backshift_store::StoreError::Write(format!("no task {task_id}")))?;
    if let Some(approval) = app
        .store
        .grant_for(&task.project_id, &task.id, question.kind, &question.target)
        .await?
    {
        return Ok(Outcome::Granted { approval });
    }
    let now = now_ms();
    let expires_at = now + i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX / 2);
    let id = format!("ap-{}", TaskId::generate().as_str());
    app.store
        .insert_approval(&ApprovalRow {
            id: id.clone(),
            attempt_id: attempt.to_owned(),
            kind: question.kind.to_owned(),
            subject: question.subject.to_string(),
            summary: question.summary.clone(),
            state: "pending".into(),
            scope: None,
            answered_by: None,
            reason: None,
            created_at: now,
            expires_at,
            answered_at: None,
        })
        .await?;
    app.audit(
        &format!("sandbox:{attempt}"),
        &format!("approval.request.{}", question.kind),
        &id,
        serde_json::json!({"attempt": attempt, "summary": question.summary, "subject": question.subject}),
    )
    .await;
    let _ = app
        .hub
        .emit(
            attempt,
            EventKind::ApprovalRequested {
                approval: id.clone(),
                kind: question.kind.to_owned(),
                summary: question.summary.clone(),
                expires_at: format_ts(expires_at),
            },
        )
        .await;
    hold(
        app,
        attempt,
        &format!("waiting for approval {id}: {}", question.summary),
    )
    .await;
    let outcome = wait(app, attempt, &id, expires_at).await;
    release(app, attempt).await;
    outcome
}

async fn wait(
    app: &App,
    attempt: &str,
    id: &str,
    expires_at: i64,
) -> Result<Outcome, backshift_store::StoreError> {
    loop {
        let changed = app.approvals_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let row =
            app.store.approval(id).await?.ok_or_else(|| {
                backshift_store::StoreError::Write(format!("approval {id} vanished"))
            })?;
        match row.state.as_str() {
            "approved" => {
                return Ok(Outcome::Approved {
                    approval: row.id,
                    scope: row.scope.unwrap_or_else(|| "once".into()),
                    by: row.answered_by.unwrap_or_default(),
                });
            }
            "denied" => {
                return Ok(Outcome::Denied {
                    approval: row.id,
                    by: row.answered_by.unwrap_or_default(),
                    reason: row.reason,
                });
            }
            "expired" => {
                return Ok(Outcome::Expired {
                    approval: row.id,
                    why: row.reason.unwrap_or_default(),
                });
            }
            _ => {}
        }
        let ended = app
            .store
            .attempt(attempt)
            .await?
            .is_none_or(|a| a.state.is_terminal());
        let now = now_ms();
        if ended || now >= expires_at {
            let why = if ended {
                "the attempt ended before anyone answered".to_owned()
            } else {
                format!(
                    "nobody answered within {} s (approvals.timeout_secs), so it is denied",
                    (expires_at - row.created_at) / 1000
                )
            };
            expire(app, &row, &why).await?;
            continue;
        }
        let left = Duration::from_millis(u64::try_from(expires_at - now).unwrap_or(0));
        let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), changed).await;
    }
}

/// Marks a pending approval expired (by `timeout`), with its event.
async fn expire(
    app: &App,
    row: &ApprovalRow,
    why: &str,
) -> Result<(), backshift_store::StoreError> {
    let answer = Answer {
        state: "expired",
        scope: None,
        by: "timeout",
        reason: Some(why),
        at: now_ms(),
    };
    if app.store.answer_approval(&row.id, &answer, None).await? {
        app.audit(
            "timeout",
            "approval.expire",
            &row.id,
            serde_json::json!({"attempt": row.attempt_id, "summary": row.summary, "reason": why}),
        )
        .await;
        announce(app, row, &answer).await;
    }
    Ok(())
}

/// Records a settled approval's `approval_answered` event and wakes
/// whoever waits for it.
async fn announce(app: &App, row: &ApprovalRow, answer: &Answer<'_>) {
    let _ = app
        .hub
        .emit(
            &row.attempt_id,
            EventKind::ApprovalAnswered {
                approval: row.id.clone(),
                decision: answer.state.to_owned(),
                scope: answer.scope.map(str::to_owned),
                by: answer.by.to_owned(),
                reason: answer.reason.map(str::to_owned),
            },
        )
        .await;
    app.approvals_changed.notify_waiters();
}

/// Expires `attempt`'s pending approvals: what held them is gone (the
/// control plane restarted, or the attempt ended).
pub async fn expire_pending(app: &App, attempt: &str, why: &str) {
    let Ok(rows) = app.store.approvals_of(attempt).await else {
        return;
    };
    for row in rows.iter().filter(|r| r.state == "pending") {
        let _ = expire(app, row, why).await;
    }
}

/// Moves a running attempt to `waiting_approval`.
async fn hold(app: &App, attempt: &str, detail: &str) {
    if let Ok(Some(a)) = app.store.attempt(attempt).await
        && a.state == AttemptState::Running
    {
        let _ = app
            .hub
            .transition(
                attempt,
                a.state,
                Transition::ApprovalNeeded,
                Some(detail.to_owned()),
            )
            .await;
    }
}

/// Moves the attempt back to `running` when nothing of it is pending.
async fn release(app: &App, attempt: &str) {
    let pending = app
        .store
        .approvals_of(attempt)
        .await
        .map(|rows| rows.iter().any(|r| r.state == "pending"))
        .unwrap_or(true);
    if pending {
        return;
    }
    if let Ok(Some(a)) = app.store.attempt(attempt).await
        && a.state == AttemptState::WaitingApproval
    {
        let _ = app
            .hub
            .transition(attempt, a.state, Transition::ApprovalAnswered, None)
            .await;
    }
}

/// Puts an ACP agent's permission requests to people. A task- or
/// project-wide approval covers the same kind of tool call (ACP's
/// normalized `kind`: `execute`, `edit`, `fetch`...) from then on.
pub struct PermissionApprover {
    /// The server.
    pub app: std::sync::Arc<App>,
    /// The attempt whose agent asks.
    pub attempt: String,
}

#[async_trait::async_trait]
impl backshift_agent::acp::Approver for PermissionApprover {
    async fn decide(&self, call: &serde_json::Value) -> backshift_agent::acp::PermissionAnswer {
        let text = |k: &str| {
            call.get(k)
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
        };
        let kind = match text("kind") {
            "" => "other",
            k => k,
        };
        let title = text("title");
        let question = Question {
            kind: "permission",
            summary: format!("{kind}: {title}"),
            subject: serde_json::json!({
                "tool_call": text("toolCallId"),
                "title": title,
                "tool_kind": kind,
                "input": call.get("rawInput"),
                "target": kind,
            }),
            target: kind.to_owned(),
        };
        let timeout = Duration::from_secs(self.app.config.approvals.timeout_secs);
        let (allow, by, reason) = match ask(&self.app, &self.attempt, question, timeout).await {
            Outcome::Granted { approval } => (
                true,
                "approval".to_owned(),
                format!("{kind} calls were approved for this task or project by {approval}"),
            ),
            Outcome::Approved {
                approval,
                scope,
                by,
            } => (true, by, format!("approved ({scope}) in {approval}")),
            Outcome::Denied {
                approval,
                by,
                reason,
            } => (
                false,
                by,
                match reason {
                    Some(r) => format!("denied in {approval}: {r}"),
                    None => format!("denied in {approval}"),
                },
            ),
            Outcome::Expired { approval, why } => {
                (false, "timeout".to_owned(), format!("{approval}: {why}"))
            }
        };
        backshift_agent::acp::PermissionAnswer { allow, by, reason }
    }
}

/// Why an answer was not recorded.
#[derive(Debug)]
pub enum AnswerError {
    /// No such approval.
    NotFound,
    /// It was answered already, or expired.
    Settled(Box<ApprovalView>),
    /// The store failed.
    Store(backshift_store::StoreError),
}

impl From<backshift_store::StoreError> for AnswerError {
    fn from(e: backshift_store::StoreError) -> Self {
        AnswerError::Store(e)
    }
}

/// Records `by`'s answer to approval `id`, with the grant a task- or
/// project-wide approval leaves, and wakes whoever waits for it.
pub async fn answer(
    app: &App,
    id: &str,
    answer: &AnswerApproval,
    by: &str,
) -> Result<ApprovalView, AnswerError> {
    let row = app.store.approval(id).await?.ok_or(AnswerError::NotFound)?;
    if row.state != "pending" {
        return Err(AnswerError::Settled(Box::new(view(&row))));
    }
    let task_id = task_of(&row.attempt_id);
    let task = app
        .store
        .task(&task_id)
        .await?
        .ok_or(AnswerError::NotFound)?;
    let subject: serde_json::Value = serde_json::from_str(&row.subject).unwrap_or_default();
    let target = subject["target"].as_str().unwrap_or_default().to_owned();
    let (state, scope) = match answer.decision {
        Decision::Approve => ("approved", Some(answer.scope)),
        Decision::Deny => ("denied", None),
    };
    let grant_id = format!("gr-{}", TaskId::generate().as_str());
    let grant = match scope {
        Some(Scope::Task | Scope::Project) if !target.is_empty() => Some(NewGrant {
            id: &grant_id,
            project_id: &task.project_id,
            task_id: (scope == Some(Scope::Task)).then_some(task.id.as_str()),
            kind: &row.kind,
            target: &target,
        }),
        _ => None,
    };
    let reason = answer
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty());
    let settled = Answer {
        state,
        scope: scope.map(Scope::as_str),
        by,
        reason,
        at: now_ms(),
    };
    let recorded = app
        .store
        .answer_approval(id, &settled, grant.as_ref())
        .await?;
    let now = app.store.approval(id).await?.ok_or(AnswerError::NotFound)?;
    if !recorded {
        return Err(AnswerError::Settled(Box::new(view(&now))));
    }
    app.audit(
        &format!("token:{by}"),
        match answer.decision {
            Decision::Approve => "approval.approve",
            Decision::Deny => "approval.deny",
        },
        id,
        serde_json::json!({
            "attempt": row.attempt_id,
            "summary": row.summary,
            "scope": scope.map(Scope::as_str),
            "reason": reason,
            "grant": grant.as_ref().map(|g| g.target),
        }),
    )
    .await;
    announce(app, &row, &settled).await;
    Ok(view(&now))
}

/// The task of attempt `attempt` (`TASK-N`).
fn task_of(attempt: &str) -> String {
    backshift_core::AttemptId::parse(attempt)
        .map_or_else(|| attempt.to_owned(), |a| a.task_id().as_str().to_owned())
}

/// The API's view of a stored approval.
pub fn view(row: &ApprovalRow) -> ApprovalView {
    ApprovalView {
        id: row.id.clone(),
        task_id: task_of(&row.attempt_id),
        attempt_id: row.attempt_id.clone(),
        kind: row.kind.clone(),
        summary: row.summary.clone(),
        subject: serde_json::from_str(&row.subject).unwrap_or_default(),
        state: row.state.clone(),
        scope: row.scope.clone(),
        answered_by: row.answered_by.clone(),
        reason: row.reason.clone(),
        created_at: format_ts(row.created_at),
        expires_at: format_ts(row.expires_at),
        answered_at: row.answered_at.map(format_ts),
    }
}
