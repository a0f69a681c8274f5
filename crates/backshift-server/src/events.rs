//! The event hub: numbers, persists and broadcasts every event, and
//! performs state transitions (checked by the pure state machine, written
//! compare-and-set together with their event).

use backshift_core::{AttemptState, Transition};
use backshift_protocol::{Event, EventKind, format_ts, now_ms};
use backshift_store::{StateChange, Store};
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::{Mutex as AsyncMutex, broadcast};

/// Events of all attempts flow through here.
pub struct EventHub {
    store: Store,
    channels: Mutex<HashMap<String, broadcast::Sender<Event>>>,
    /// Serializes writers per attempt so seqs are gapless.
    writers: Mutex<HashMap<String, std::sync::Arc<AsyncMutex<()>>>>,
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
    /// A hub over `store`.
    pub fn new(store: Store) -> Self {
        EventHub {
            store,
            channels: Mutex::new(HashMap::new()),
            writers: Mutex::new(HashMap::new()),
        }
    }

    /// Live events of `attempt` from now on.
    pub fn subscribe(&self, attempt: &str) -> broadcast::Receiver<Event> {
        self.sender(attempt).subscribe()
    }

    fn sender(&self, attempt: &str) -> broadcast::Sender<Event> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(attempt.to_owned())
            .or_insert_with(|| broadcast::channel(1024).0)
            .clone()
    }

    fn writer(&self, attempt: &str) -> std::sync::Arc<AsyncMutex<()>> {
        let mut map = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(attempt.to_owned()).or_default().clone()
    }

    /// The attempt's next event (seq after the last stored one) and its
    /// time. Callers hold the attempt's writer lock.
    async fn next_event(
        &self,
        attempt: &str,
        kind: EventKind,
    ) -> Result<(Event, i64), backshift_store::StoreError> {
        let seq = self.store.last_seq(attempt).await? + 1;
        let now = now_ms();
        let event = Event {
            attempt_id: attempt.to_owned(),
            seq,
            ts: format_ts(now),
            kind,
        };
        Ok((event, now))
    }

    /// Appends an event to `attempt`'s log.
    pub async fn emit(
        &self,
        attempt: &str,
        kind: EventKind,
    ) -> Result<Event, backshift_store::StoreError> {
        let lock = self.writer(attempt);
        let _guard = lock.lock().await;
        let (event, now) = self.next_event(attempt, kind).await?;
        self.store.append_event(&event, now).await?;
        let _ = self.sender(attempt).send(event.clone());
        Ok(event)
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
        if !self.store.record_transition(&change, &event, now).await? {
            let actual = self
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
        let _ = self.sender(attempt).send(event);
        if to.is_terminal() {
            // Keep the channel for subscribers still attached; drop the
            // writer lock entry, nothing more will be written.
            self.writers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(attempt);
        }
        Ok(to)
    }
}
