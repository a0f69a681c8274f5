//! The event hub: numbers, persists and broadcasts every event, and
//! performs state transitions (checked by the pure state machine, written
//! compare-and-set together with their event).
//!
//! Events are written by one writer task with group commit: `emit`
//! numbers an event under its attempt's lock and queues it; the writer
//! takes everything queued, writes it in one transaction, and only then
//! broadcasts it (a subscriber never sees an event that is not stored).
//! The queue is FIFO and a failed write is retried until it succeeds, so
//! what is stored of an attempt's log is always a gapless prefix. A state
//! transition first waits for the attempt's queued events (`flush`), then
//! commits with its own event. A crash loses at most the events queued
//! since the last commit, never a seq in the middle.

use backshift_core::{AttemptState, Transition};
use backshift_protocol::{Event, EventKind, format_ts, now_ms};
use backshift_store::{StateChange, Store};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Mutex as AsyncMutex, broadcast, mpsc, oneshot};

/// The most events one group commit takes.
const MAX_BATCH: usize = 4096;

enum Item {
    Event(Box<Event>, i64),
    Flush(oneshot::Sender<()>),
}

struct Shared {
    store: Store,
    /// This replica: the `driver` of every event it writes.
    driver: String,
    channels: Mutex<HashMap<String, broadcast::Sender<Event>>>,
}

impl Shared {
    fn sender(&self, attempt: &str) -> broadcast::Sender<Event> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(attempt.to_owned())
            .or_insert_with(|| broadcast::channel(1024).0)
            .clone()
    }
}

/// Events of all attempts flow through here.
pub struct EventHub {
    shared: Arc<Shared>,
    queue: mpsc::UnboundedSender<Item>,
    /// Serializes writers per attempt so seqs are gapless.
    writers: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    /// The last seq given out per attempt (read from the store once).
    last_seqs: Mutex<HashMap<String, u64>>,
}

/// Why a transition did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TransitionFailed {
    /// The attempt is not in the state the caller believed.
    #[error("attempt is {actual}, not {expected}")]
    Moved {
        /// What the caller expected.
        expected: AttemptState,
        /// What it is.
        actual: AttemptState,
    },
    /// The state machine forbids it.
    #[error(transparent)]
    Illegal(#[from] backshift_core::TransitionError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] backshift_store::StoreError),
    /// The attempt does not exist.
    #[error("attempt {0} does not exist")]
    Missing(String),
}

impl EventHub {
    /// A hub over `store` for replica `driver`; starts its writer task
    /// (call inside a Tokio runtime).
    pub fn new(store: Store, driver: &str) -> Self {
        let shared = Arc::new(Shared {
            store,
            driver: driver.to_owned(),
            channels: Mutex::new(HashMap::new()),
        });
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(shared.clone(), rx));
        EventHub {
            shared,
            queue,
            writers: Mutex::new(HashMap::new()),
            last_seqs: Mutex::new(HashMap::new()),
        }
    }

    /// Live events of `attempt` from now on (each one already stored).
    pub fn subscribe(&self, attempt: &str) -> broadcast::Receiver<Event> {
        self.shared.sender(attempt).subscribe()
    }

    fn writer(&self, attempt: &str) -> Arc<AsyncMutex<()>> {
        let mut map = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(attempt.to_owned()).or_default().clone()
    }

    /// The attempt's next event and its time. Callers hold the attempt's
    /// writer lock, and report the seq with [`Self::given_out`].
    async fn next_event(
        &self,
        attempt: &str,
        kind: EventKind,
    ) -> Result<(Event, i64), backshift_store::StoreError> {
        let cached = self
            .last_seqs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(attempt)
            .copied();
        let seq = match cached {
            Some(s) => s + 1,
            None => self.shared.store.last_seq(attempt).await? + 1,
        };
        let now = now_ms();
        // Secret values are hidden before anyone sees the event: the
        // store and the live streams get the same redacted one.
        let redactor = self.shared.store.redactor();
        // One serialization tells whether any value is there at all; only
        // then is the event rebuilt with its strings redacted.
        let holds_secret = !redactor.is_empty()
            && serde_json::to_string(&kind)
                .is_ok_and(|text| matches!(redactor.text(&text), std::borrow::Cow::Owned(_)));
        let kind = if holds_secret {
            match serde_json::to_value(&kind) {
                Ok(mut v) => {
                    redactor.json(&mut v);
                    serde_json::from_value(v).unwrap_or(kind)
                }
                Err(_) => kind,
            }
        } else {
            kind
        };
        let event = Event {
            attempt_id: attempt.to_owned(),
            seq,
            ts: format_ts(now),
            driver: Some(self.shared.driver.clone()),
            kind,
        };
        Ok((event, now))
    }

    /// Remembers `seq` as `attempt`'s last, or (`None`) forgets what it
    /// knew so the next event reads the store.
    fn given_out(&self, attempt: &str, seq: Option<u64>) {
        let mut map = self.last_seqs.lock().unwrap_or_else(|p| p.into_inner());
        match seq {
            Some(s) => {
                map.insert(attempt.to_owned(), s);
            }
            None => {
                map.remove(attempt);
            }
        }
    }

    /// Forgets what this hub knows of `attempt`'s numbering: the next event
    /// reads the last seq from the store (another replica may have
    /// written since).
    pub fn forget(&self, attempt: &str) {
        self.given_out(attempt, None);
    }

    /// Appends an event to `attempt`'s log. It is numbered and queued at
    /// once; it is stored with the next group commit and broadcast after
    /// that ([`Self::flush`] waits for it).
    pub async fn emit(
        &self,
        attempt: &str,
        kind: EventKind,
    ) -> Result<Event, backshift_store::StoreError> {
        let lock = self.writer(attempt);
        let _guard = lock.lock().await;
        let (event, now) = self.next_event(attempt, kind).await?;
        self.queue
            .send(Item::Event(Box::new(event.clone()), now))
            .map_err(|_| backshift_store::StoreError::Write("the event writer stopped".into()))?;
        self.given_out(attempt, Some(event.seq));
        Ok(event)
    }

    /// Waits until every event queued so far is stored.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.queue.send(Item::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Moves `attempt` from `from` by `transition`, recording `detail`.
    /// Returns the new state.
    pub async fn transition(
        &self,
        attempt: &str,
        from: AttemptState,
        transition: Transition,
        detail: Option<String>,
    ) -> Result<AttemptState, TransitionFailed> {
        let to = from.apply(transition)?;
        let reason = match transition {
            Transition::Fail(r) => Some(r),
            _ => None,
        };
        let lock = self.writer(attempt);
        let _guard = lock.lock().await;
        // The state change is written after everything the attempt said
        // before it.
        self.flush().await;
        let kind = EventKind::StateChanged {
            from: Some(from),
            to,
            reason,
            detail: detail.clone(),
        };
        let (event, now) = self.next_event(attempt, kind).await?;
        let change = StateChange {
            attempt_id: attempt,
            from,
            to,
            reason,
            detail,
        };
        let recorded = match self
            .shared
            .store
            .record_transition(&change, &event, now)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.given_out(attempt, None);
                return Err(e.into());
            }
        };
        if !recorded {
            let actual = self
                .shared
                .store
                .attempt(attempt)
                .await?
                .ok_or_else(|| TransitionFailed::Missing(attempt.to_owned()))?
                .state;
            return Err(TransitionFailed::Moved {
                expected: from,
                actual,
            });
        }
        self.given_out(attempt, Some(event.seq));
        let _ = self.shared.sender(attempt).send(event);
        if to.is_terminal() {
            // Keep the channel for subscribers still attached; drop the
            // writer lock entry, nothing more will be written.
            self.writers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(attempt);
            self.given_out(attempt, None);
        }
        Ok(to)
    }
}

/// The group commit: everything queued, one transaction, then broadcast
/// and flush acknowledgements, in queue order.
async fn write_loop(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Item>) {
    while let Some(first) = rx.recv().await {
        // Let the emitters that are about to queue do so: a bigger batch
        // costs one commit like a small one.
        tokio::task::yield_now().await;
        let mut items = vec![first];
        while items.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        let mut events = Vec::new();
        let mut flushes = Vec::new();
        for item in items {
            match item {
                Item::Event(e, now) => events.push((*e, now)),
                Item::Flush(done) => flushes.push(done),
            }
        }
        if !events.is_empty() {
            let mut wait = Duration::from_millis(50);
            // Retried until stored: skipping a batch would leave a gap.
            while let Err(e) = shared.store.append_events(&events).await {
                tracing::error!(
                    "cannot store {} events ({e}); retrying in {wait:?}",
                    events.len()
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            for (e, _) in events {
                let _ = shared.sender(&e.attempt_id).send(e);
            }
        }
        for done in flushes {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use backshift_core::Limits;
    use backshift_store::{NewAttempt, NewTask};

    async fn hub_with_attempts(n: usize) -> (tempfile::TempDir, Arc<EventHub>, Store, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db")).await.unwrap();
        let project = store.project_for_source("/r", "p", 1).await.unwrap();
        let attempts: Vec<NewAttempt> = (1..=n)
            .map(|i| NewAttempt {
                agent: None,
                id: format!("hubtest0-{i}"),
                n: i as u32,
                branch: format!("b{i}"),
            })
            .collect();
        store
            .create_task(
                &NewTask {
                    origin: None,
                    command: None,
                    verify: None,
                    id: "hubtest0".into(),
                    project_id: project,
                    prompt: "p".into(),
                    repo: "/r".into(),
                    base_ref: None,
                    agent: "builtin".into(),
                    limits: Limits::default(),
                    created_at: 1,
                },
                &attempts,
            )
            .await
            .unwrap();
        let ids = attempts.into_iter().map(|a| a.id).collect();
        (
            dir,
            Arc::new(EventHub::new(store.clone(), "r1")),
            store,
            ids,
        )
    }

    fn progress(i: usize) -> EventKind {
        EventKind::Progress {
            message: format!("{i}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_emits_are_stored_gapless_and_broadcast_only_once_stored() {
        let (_dir, hub, store, ids) = hub_with_attempts(5).await;
        let mut rx = hub.subscribe(&ids[0]);
        let mut tasks = Vec::new();
        for id in ids.clone() {
            let hub = hub.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200 {
                    hub.emit(&id, progress(i)).await.unwrap();
                }
            }));
        }
        // Every broadcast event is already in the store.
        for want in 1..=200u64 {
            let e = rx.recv().await.unwrap();
            assert_eq!(e.seq, want);
            assert!(store.last_seq(&ids[0]).await.unwrap() >= want);
        }
        for t in tasks {
            t.await.unwrap();
        }
        hub.flush().await;
        for id in &ids {
            let events = store.events_after(id, 0, 1000).await.unwrap();
            let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (1..=200).collect::<Vec<u64>>(), "{id}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transition_is_written_after_the_events_before_it() {
        let (_dir, hub, store, ids) = hub_with_attempts(1).await;
        let id = &ids[0];
        for i in 0..50 {
            hub.emit(id, progress(i)).await.unwrap();
        }
        let to = hub
            .transition(id, AttemptState::Queued, Transition::Start, None)
            .await
            .unwrap();
        assert_eq!(to, AttemptState::Provisioning);
        let events = store.events_after(id, 0, 1000).await.unwrap();
        assert_eq!(events.len(), 51);
        assert_eq!(events[50].kind.type_name(), "state_changed");
        assert_eq!(events[50].seq, 51);
        // A hub started over the same store continues the numbering.
        let again = EventHub::new(store.clone(), "r1");
        let next = again.emit(id, progress(0)).await.unwrap();
        assert_eq!(next.seq, 52);
    }
}
