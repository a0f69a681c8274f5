//! A task's results as the API shows them: each attempt with its
//! evidence (verification, the size of its change, cost, time), the
//! attempts ranked, and the winner, chosen automatically once every
//! attempt ended or picked by a person.

use crate::serve::App;
use backshift_core::AttemptState;
use backshift_core::rank::{Candidate, Verdict, rank, why_first};
use backshift_protocol::{AttemptView, DiffSummary, EventKind, TaskView, format_ts, now_ms};
use backshift_store::{AttemptRow, StoreError, TaskRow};

/// A task with its attempts, ranked, and its handoff note when it ended
/// without a result.
pub async fn task_view(app: &App, t: TaskRow) -> Result<TaskView, StoreError> {
    view(app, t, true).await
}

/// [`task_view`] for a list of tasks: without the handoff note, which
/// reads every failed attempt's branch from the git store (the board asks
/// for the list every few seconds).
pub async fn task_list_view(app: &App, t: TaskRow) -> Result<TaskView, StoreError> {
    view(app, t, false).await
}

async fn view(app: &App, t: TaskRow, handoff: bool) -> Result<TaskView, StoreError> {
    let mut attempts = Vec::new();
    for a in app.store.attempts_of(&t.id).await? {
        attempts.push(attempt_view(app, &t, a).await?);
    }
    let candidates: Vec<Candidate> = attempts.iter().map(candidate).collect();
    let order = rank(&candidates);
    for (place, &i) in order.iter().enumerate() {
        attempts[i].rank = place as u32 + 1;
    }
    let state = task_state(&attempts);
    let project = t.project_id.clone();
    let mut view = TaskView {
        state,
        ranking: order.iter().map(|&i| attempts[i].id.clone()).collect(),
        winner: t.winner,
        winner_by: t.winner_by,
        delivery: t
            .delivery
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok()),
        handoff: None,
        id: t.id,
        project_id: t.project_id,
        prompt: app.store.redactor().text(&t.prompt).into_owned(),
        repo: t.repo,
        base_ref: t.base_ref,
        agent: t.agent,
        command: t
            .command
            .map(|c| app.store.redactor().text(&c).into_owned()),
        limits: t.limits,
        verify: t.verify,
        created_at: format_ts(t.created_at),
        attempts,
    };
    // Every attempt ended and none succeeded: the handoff note.
    if handoff
        && view.attempts.iter().all(|a| a.state.is_terminal())
        && !view.attempts.is_empty()
        && view.state != AttemptState::Succeeded
    {
        let mut work = Vec::new();
        for a in &view.attempts {
            let commit = app
                .git
                .ref_commit(&project, &format!("refs/heads/{}", a.branch))
                .await
                .ok()
                .flatten();
            work.push((a.id.clone(), commit));
        }
        view.handoff = Some(crate::notes::handoff(&view, &work));
    }
    Ok(view)
}

/// One attempt (`rank` 0: see [`task_view`]).
async fn attempt_view(app: &App, t: &TaskRow, a: AttemptRow) -> Result<AttemptView, StoreError> {
    let last_seq = app.store.last_seq(&a.id).await?;
    let ended_badly = a.state.is_terminal() && a.state != AttemptState::Succeeded;
    let log_tail = if ended_badly {
        log_tail(&app.store.last_events(&a.id, 40).await?)
    } else {
        Vec::new()
    };
    let driver = if a.state.is_terminal() { None } else { a.owner };
    let usage = app.store.model_usage(&a.id).await?;
    let verifications = crate::attempt::verifications(app, &a.id).await?;
    let diff = match &a.head_commit {
        Some(_) => app
            .store
            .events_of_kinds(&a.id, &["diff_stat"], 0)
            .await?
            .into_iter()
            .rev()
            .find_map(|e| match e.kind {
                EventKind::DiffStat {
                    files_changed,
                    insertions,
                    deletions,
                    ..
                } => Some(DiffSummary {
                    files_changed,
                    insertions,
                    deletions,
                }),
                _ => None,
            }),
        None => None,
    };
    let duration_ms = a.started_at.map(|start| {
        let end = if a.state.is_terminal() {
            a.updated_at
        } else {
            now_ms()
        };
        (end - start).max(0) as u64
    });
    Ok(AttemptView {
        id: a.id,
        task_id: a.task_id,
        n: a.n,
        agent: a.agent.unwrap_or_else(|| t.agent.clone()),
        rank: 0,
        diff,
        duration_ms,
        state: a.state,
        reason: a.reason,
        detail: a.detail,
        branch: a.branch,
        base_commit: a.base_commit,
        head_commit: a.head_commit,
        summary: a.summary,
        git_path: format!("/git/{}.git", t.project_id),
        last_seq,
        created_at: format_ts(a.created_at),
        updated_at: format_ts(a.updated_at),
        driver,
        log_tail,
        usage,
        verifications: verifications.len() as u32,
        verification: verifications.into_iter().last(),
        pause_requested: a.pause_requested.is_some(),
        resume_requested: a.resume_requested.is_some(),
    })
}

/// The lines of the last events that explain how an attempt ended:
/// progress, command output, tool results, model retries, state changes.
/// At most 30 lines of at most 300 characters.
fn log_tail(events: &[backshift_protocol::Event]) -> Vec<String> {
    use backshift_protocol::EventKind as K;
    let mut lines = Vec::new();
    for e in events {
        match &e.kind {
            K::Progress { message } => lines.push(message.clone()),
            K::CommandOutput { text, .. } => {
                lines.extend(text.lines().map(str::to_owned));
            }
            K::ToolCall {
                name, arguments, ..
            } => lines.push(format!("→ {name} {}", arguments)),
            K::ToolResult {
                name,
                ok,
                exit_code,
                ..
            } => lines.push(format!(
                "{} {name}{}",
                if *ok { "✔" } else { "✗" },
                exit_code.map(|c| format!(" exit {c}")).unwrap_or_default()
            )),
            K::ModelRetry { error, retry, .. } => {
                lines.push(format!("model request failed (retry {retry}): {error}"))
            }
            K::StateChanged { to, detail, .. } => lines.push(match detail {
                Some(d) => format!("state → {to}: {d}"),
                None => format!("state → {to}"),
            }),
            _ => {}
        }
    }
    let skip = lines.len().saturating_sub(30);
    lines
        .into_iter()
        .skip(skip)
        .map(|l| {
            if l.chars().count() > 300 {
                l.chars().take(299).chain(['…']).collect()
            } else {
                l
            }
        })
        .collect()
}

/// What ranking reads of an attempt's view.
fn candidate(v: &AttemptView) -> Candidate {
    let verdict = match &v.verification {
        Some(r) if r.passed => Verdict::Passed,
        Some(_) => Verdict::Failed,
        None => Verdict::None,
    };
    Candidate {
        succeeded: v.state == AttemptState::Succeeded,
        verdict,
        tests_failed: v.verification.as_ref().map_or(0, |r| r.report.failed),
        diff_lines: v.diff.map_or(0, |d| d.insertions + d.deletions),
        cost_usd: v.usage.and_then(|u| u.cost_usd),
        tokens: v.usage.map_or(0, |u| u.input_tokens + u.output_tokens),
        duration_ms: v.duration_ms.unwrap_or(0),
    }
}

/// A task's state from its attempts': the first one still active (by
/// number); once all ended, `succeeded` when one did, else the last one's.
fn task_state(attempts: &[AttemptView]) -> AttemptState {
    if let Some(active) = attempts.iter().find(|a| !a.state.is_terminal()) {
        return active.state;
    }
    if attempts.iter().any(|a| a.state == AttemptState::Succeeded) {
        return AttemptState::Succeeded;
    }
    attempts
        .last()
        .map(|a| a.state)
        .unwrap_or(AttemptState::Queued)
}

/// Once every attempt of `task` has ended, the best ranked one that
/// succeeded becomes the task's result (unless a person picked one),
/// with a `winner` event on it saying why. Called when an attempt ends;
/// safe to call twice (the choice is compare-and-set). Returns whether
/// it chose (the result is then delivered).
pub async fn choose_winner(app: &App, task_id: &str) -> Result<bool, StoreError> {
    let Some(task) = app.store.task(task_id).await? else {
        return Ok(false);
    };
    if task.winner.is_some() {
        return Ok(false);
    }
    let view = task_view(app, task).await?;
    if view.attempts.iter().any(|a| !a.state.is_terminal()) {
        return Ok(false);
    }
    let by_rank: Vec<&AttemptView> = view
        .ranking
        .iter()
        .filter_map(|id| view.attempts.iter().find(|a| &a.id == id))
        .collect();
    let Some(best) = by_rank
        .first()
        .filter(|a| a.state == AttemptState::Succeeded)
    else {
        return Ok(false);
    };
    if !app
        .store
        .set_winner(&view.id, &best.id, "auto", true)
        .await?
    {
        return Ok(false);
    }
    let next = by_rank.get(1).map(|a| candidate(a));
    let why = why_first(&candidate(best), next.as_ref());
    let _ = app
        .hub
        .emit(
            &best.id,
            EventKind::Winner {
                by: "auto".into(),
                rank: 1,
                of: view.attempts.len() as u32,
                why: why.clone(),
            },
        )
        .await;
    app.audit(
        "auto",
        "task.winner",
        &view.id,
        serde_json::json!({"attempt": best.id, "why": why}),
    )
    .await;
    Ok(true)
}
