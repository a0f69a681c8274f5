//! Attempts: show, events (a page, or a live SSE stream), diff, pause
//! and resume.

use super::{ApiError, Caller};
use crate::serve::App;
use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use backshift_core::AttemptState;
use backshift_protocol::{AttemptView, Event, EventKind, EventsQuery, now_ms};
use futures::Stream;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::broadcast::error::RecvError;

async fn load(
    app: &App,
    id: &str,
) -> Result<(backshift_store::TaskRow, backshift_store::AttemptRow), ApiError> {
    let a = app
        .store
        .attempt(id)
        .await?
        .ok_or_else(|| ApiError::not_found("attempt", id))?;
    let t = app
        .store
        .task(&a.task_id)
        .await?
        .ok_or_else(|| ApiError::not_found("task", &a.task_id))?;
    Ok((t, a))
}

/// One attempt.
#[utoipa::path(get, path = "/api/v1/attempts/{id}", params(("id" = String, Path, description = "Attempt id (TASK-N)")),
    responses((status = 200, body = AttemptView), (status = 404, body = backshift_protocol::ErrorBody)))]
pub async fn get_attempt(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<Json<AttemptView>, ApiError> {
    let (t, a) = load(&app, &id).await?;
    // Its rank needs its siblings: the task's view has it.
    let view = crate::results::task_view(&app, t).await?;
    view.attempts
        .into_iter()
        .find(|v| v.id == a.id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found("attempt", &id))
}

/// How long pause and resume wait for the attempt to get there before
/// answering with where it is.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(20);

/// The attempt's view once `done` holds of its state (or [`SETTLE`] ran
/// out: the view says where it is).
async fn settled(
    app: &Arc<App>,
    id: &str,
    done: impl Fn(AttemptState) -> bool,
) -> Result<Json<AttemptView>, ApiError> {
    let until = tokio::time::Instant::now() + SETTLE;
    loop {
        let (_, a) = load(app, id).await?;
        if done(a.state) || tokio::time::Instant::now() >= until {
            return get_attempt(State(app.clone()), Path(id.to_owned())).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Stops an attempt's sandbox, its files kept: the agent stops (an
/// installed agent is asked to cancel its turn), what runs in the sandbox
/// ends, pending approvals expire, and its wall time stops counting until
/// it is resumed. Answers once it is paused (or after 20 s, with the
/// request standing: `pause_requested`).
#[utoipa::path(post, path = "/api/v1/attempts/{id}/pause", params(("id" = String, Path, description = "Attempt id (TASK-N)")),
    responses((status = 200, body = AttemptView), (status = 404, body = backshift_protocol::ErrorBody),
        (status = 409, description = "The attempt is not running or waiting for approval", body = backshift_protocol::ErrorBody)))]
pub async fn pause_attempt(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<AttemptView>, ApiError> {
    let (_, a) = load(&app, &id).await?;
    match a.state {
        AttemptState::Paused => return get_attempt(State(app), Path(id)).await,
        AttemptState::Running | AttemptState::WaitingApproval => {}
        s => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_pausable",
                format!(
                    "attempt {id} is {s}: only a running attempt, or one waiting for approval, can be paused"
                ),
                Some(if s.is_terminal() {
                    "it has ended; nothing runs to pause"
                } else {
                    "try again once it is running"
                }),
            ));
        }
    }
    let actor = caller.actor();
    app.audit(
        &actor,
        "attempt.pause",
        &id,
        serde_json::json!({"state": a.state}),
    )
    .await;
    if !app.supervisor.pause(&id, format!("paused by {actor}")) {
        // Another replica drives it: it acts on its next heartbeat.
        app.store.request_pause(&id, now_ms()).await?;
    }
    settled(&app, &id, |s| {
        !matches!(s, AttemptState::Running | AttemptState::WaitingApproval)
    })
    .await
}

/// Starts a paused attempt's sandbox again with its files as they were;
/// the agent goes on from its last completed step, told what happened.
/// It waits for a free slot like a queued one (`resume_requested` until
/// then). Answers once it left `paused` (or after 20 s).
#[utoipa::path(post, path = "/api/v1/attempts/{id}/resume", params(("id" = String, Path, description = "Attempt id (TASK-N)")),
    responses((status = 200, body = AttemptView), (status = 404, body = backshift_protocol::ErrorBody),
        (status = 409, description = "The attempt is not paused", body = backshift_protocol::ErrorBody)))]
pub async fn resume_attempt(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<AttemptView>, ApiError> {
    load(&app, &id).await?;
    if !app.store.request_resume(&id, now_ms()).await? {
        let (_, a) = load(&app, &id).await?;
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_paused",
            format!(
                "attempt {id} is {}: only a paused attempt can be resumed",
                a.state
            ),
            None,
        ));
    }
    app.audit(
        &caller.actor(),
        "attempt.resume",
        &id,
        serde_json::json!({}),
    )
    .await;
    app.supervisor.wake();
    settled(&app, &id, |s| s != AttemptState::Paused).await
}

/// A page of an attempt's events, in order.
#[utoipa::path(get, path = "/api/v1/attempts/{id}/events", params(("id" = String, Path, description = "Attempt id"), EventsQuery),
    responses((status = 200, body = [Event]), (status = 404, body = backshift_protocol::ErrorBody)))]
pub async fn list_events(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<Json<Vec<Event>>, ApiError> {
    load(&app, &id).await?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    Ok(Json(
        app.store
            .events_after(&id, q.after.unwrap_or(0), limit)
            .await?,
    ))
}

/// The attempt's events as Server-Sent Events: stored ones after
/// `Last-Event-ID` (or `?after=`), then live ones as they happen. Each SSE
/// `id` is the event's seq and `event` its type. When the attempt has
/// ended, an `end` event closes the stream.
#[utoipa::path(get, path = "/api/v1/attempts/{id}/events/stream", params(("id" = String, Path, description = "Attempt id"), EventsQuery),
    responses((status = 200, description = "text/event-stream of Event"), (status = 404, body = backshift_protocol::ErrorBody)))]
pub async fn stream_events(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    load(&app, &id).await?;
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .or(q.after)
        .unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(256);
    tokio::spawn(pump(app, id, resume, tx));
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let stream = futures::StreamExt::map(stream, Ok);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Feeds one SSE client: subscribe first, then replay from the store, then
/// forward live events, skipping any seq already sent. A lagging client
/// is caught up from the store. Ends with `end` once the attempt is over.
async fn pump(app: Arc<App>, id: String, mut last: u64, tx: tokio::sync::mpsc::Sender<SseEvent>) {
    let mut live = app.hub.subscribe(&id);
    loop {
        // Replay everything stored after `last`.
        loop {
            let page = match app.store.events_after(&id, last, 500).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!("event stream for {id}: {e}");
                    return;
                }
            };
            if page.is_empty() {
                break;
            }
            for e in page {
                last = e.seq;
                if tx.send(sse(&e)).await.is_err() {
                    return;
                }
            }
        }
        match app.store.attempt(&id).await {
            Ok(Some(a)) if a.state.is_terminal() => {
                let _ = tx
                    .send(SseEvent::default().event("end").data(a.state.as_str()))
                    .await;
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
        // Wait for live events.
        loop {
            match live.recv().await {
                Ok(e) if e.seq <= last => continue,
                Ok(e) if e.seq == last + 1 => {
                    last = e.seq;
                    let terminal =
                        matches!(&e.kind, EventKind::StateChanged { to, .. } if to.is_terminal());
                    if tx.send(sse(&e)).await.is_err() {
                        return;
                    }
                    if terminal {
                        break;
                    }
                }
                // A gap or a lag: catch up from the store.
                Ok(_) | Err(RecvError::Lagged(_)) => break,
                Err(RecvError::Closed) => return,
            }
        }
    }
}

fn sse(e: &Event) -> SseEvent {
    let data = serde_json::to_string(e).unwrap_or_default();
    SseEvent::default()
        .id(e.seq.to_string())
        .event(e.kind.type_name())
        .data(data)
}

/// The attempt's change as a unified diff (text/plain).
#[utoipa::path(get, path = "/api/v1/attempts/{id}/diff", params(("id" = String, Path, description = "Attempt id")),
    responses((status = 200, description = "Unified diff", content_type = "text/plain"),
              (status = 409, description = "The attempt has no branch yet", body = backshift_protocol::ErrorBody)))]
pub async fn get_diff(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let (t, a) = load(&app, &id).await?;
    let (Some(base), Some(head)) = (a.base_commit, a.head_commit) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no_branch_yet",
            format!("attempt {id} is {} and has no published branch", a.state),
            Some(
                "a diff exists once the attempt has succeeded; follow it with `backshift logs -f`",
            ),
        ));
    };
    let diff = app
        .git
        .diff(&t.project_id, &base, &head)
        .await
        .map_err(ApiError::internal)?;
    // A secret the agent wrote into a file stays in its branch, but not
    // in what the API shows.
    let diff = app.store.redactor().text(&diff).into_owned();
    Ok(([("content-type", "text/plain; charset=utf-8")], diff))
}
