//! Persistence for tasks, attempts, events and API tokens.
//!
//! Architecture invariant: the store is the only writer of durable state
//! and the source of truth for the work lifecycle. State changes are
//! compare-and-set on the previous state and are written in the same
//! transaction as their `state_changed` event, so a reader never sees one
//! without the other. Queries are checked at run time (no build-time
//! database), so PostgreSQL can join behind the same interface.

mod approvals;
mod audit;
mod claims;
pub mod redact;
mod rows;
mod secrets;
mod writer;

pub use approvals::{Answer, ApprovalRow, NewGrant, ProjectRow};
pub use audit::{AuditRow, GENESIS, NewAudit, chain_hash};
pub use claims::SandboxClaim;
pub use rows::{AttemptRow, CheckpointRow, NewAttempt, NewTask, TaskRow};
pub use secrets::{SecretGrant, SecretRow};

use backshift_core::{AttemptState, FailureReason};
use backshift_protocol::{Event, EventKind};
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Executor, Row};
use std::path::Path;
use std::time::Duration;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed or refused the operation.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be decoded (corruption or a newer schema).
    #[error("stored data is not readable: {0}")]
    Corrupt(String),
    /// A batched write failed (the batch's error, as text).
    #[error("writing events failed: {0}")]
    Write(String),
    /// The database URL names no database backshift supports.
    #[error("unsupported database: {0}")]
    Unsupported(String),
}

/// Result alias for store operations.
pub type Result<T> = std::result::Result<T, StoreError>;

/// The database behind backshift.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// Secret values kept out of everything written.
    redactor: std::sync::Arc<redact::Redactor>,
}

/// Which database is behind a [`Store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite (the default; one server).
    Sqlite,
    /// PostgreSQL (teams; several servers can share it).
    Postgres,
}

/// A state change to record: compare-and-set from `from` to `to`.
#[derive(Debug, Clone)]
pub struct StateChange<'a> {
    /// The attempt.
    pub attempt_id: &'a str,
    /// The state it must currently be in.
    pub from: AttemptState,
    /// The state it moves to.
    pub to: AttemptState,
    /// Failure reason, for `failed`.
    pub reason: Option<FailureReason>,
    /// Explanation, for failed, timed-out and cancelled attempts.
    pub detail: Option<String>,
}

impl Store {
    /// The secret values this store keeps out of what it writes (shared by
    /// every clone of it).
    pub fn redactor(&self) -> &std::sync::Arc<redact::Redactor> {
        &self.redactor
    }

    /// Opens (creating if needed) the SQLite database at `path` and brings
    /// its schema up to date.
    pub async fn open_sqlite(path: &Path) -> Result<Store> {
        Store::open(&format!("sqlite://{}?mode=rwc", path.display())).await
    }

    /// Opens the database at `url` (`sqlite://PATH` or `postgres://...`)
    /// and brings its schema up to date.
    pub async fn open(url: &str) -> Result<Store> {
        install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            return Err(StoreError::Unsupported(format!(
                "{url:?}: the database URL must start with sqlite:// or postgres://"
            )));
        };
        let options = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 8 } else { 16 })
            .acquire_timeout(Duration::from_secs(30));
        let options = if backend == Backend::Sqlite {
            options.after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL: readers never block the writer; NORMAL: a commit
                    // survives a killed process. Per connection: the rest.
                    for pragma in [
                        "PRAGMA journal_mode = WAL",
                        "PRAGMA synchronous = NORMAL",
                        "PRAGMA foreign_keys = ON",
                        "PRAGMA busy_timeout = 10000",
                    ] {
                        conn.execute(pragma).await?;
                    }
                    Ok(())
                })
            })
        } else {
            options
        };
        let pool = options.connect(url).await?;
        match backend {
            Backend::Sqlite => sqlx::migrate!("./migrations/sqlite").run(&pool).await?,
            Backend::Postgres => sqlx::migrate!("./migrations/postgres").run(&pool).await?,
        }
        Ok(Store {
            pool,
            backend,
            redactor: Default::default(),
        })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// A value from the `meta` table.
    pub async fn meta_get(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Sets a value in the `meta` table only if it is not set yet; returns
    /// the value that is stored afterwards.
    pub async fn meta_init(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await?;
        self.meta_get(key)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("meta key {key} vanished")))
    }

    /// Number of API tokens.
    pub async fn token_count(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM api_tokens")
            .fetch_one(&self.pool)
            .await?
            .get(0))
    }

    /// Stores a token by the SHA-256 of its value (never the value).
    pub async fn insert_token(&self, id: &str, name: &str, sha256: &str, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_tokens (id, name, sha256, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(name)
        .bind(sha256)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The name of the token with this hash, if there is one.
    pub async fn token_by_hash(&self, sha256: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT name FROM api_tokens WHERE sha256 = $1")
            .bind(sha256)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The project of a repository source, created with `new_id` if new.
    pub async fn project_for_source(&self, source: &str, new_id: &str, now: i64) -> Result<String> {
        sqlx::query(
            "INSERT INTO projects (id, source, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (source) DO NOTHING",
        )
        .bind(new_id)
        .bind(source)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let row = sqlx::query("SELECT id FROM projects WHERE source = $1")
            .bind(source)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get(0))
    }

    /// Creates a task and its attempts (all `queued`) in one transaction.
    pub async fn create_task(&self, task: &NewTask, attempts: &[NewAttempt]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO tasks (id, project_id, prompt, repo, base_ref, agent, limits, created_at, command, verify, origin) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&task.id)
        .bind(&task.project_id)
        .bind(&task.prompt)
        .bind(&task.repo)
        .bind(&task.base_ref)
        .bind(&task.agent)
        .bind(serde_json::to_string(&task.limits).map_err(|e| StoreError::Corrupt(e.to_string()))?)
        .bind(task.created_at)
        .bind(&task.command)
        .bind(&task.verify)
        .bind(&task.origin)
        .execute(&mut *tx)
        .await?;
        for a in attempts {
            sqlx::query(
                "INSERT INTO attempts (id, task_id, n, state, branch, created_at, updated_at, agent) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(&a.id)
            .bind(&task.id)
            .bind(i64::from(a.n))
            .bind(AttemptState::Queued.as_str())
            .bind(&a.branch)
            .bind(task.created_at)
            .bind(task.created_at)
            .bind(&a.agent)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records `attempt` as the task's result, chosen `by` (`auto`, or a
    /// token's name). With `only_if_unset`, a winner already chosen stays
    /// (an automatic choice never overrides a person's). Returns whether
    /// it was recorded.
    pub async fn set_winner(
        &self,
        task_id: &str,
        attempt_id: &str,
        by: &str,
        only_if_unset: bool,
    ) -> Result<bool> {
        let sql = if only_if_unset {
            "UPDATE tasks SET winner = $1, winner_by = $2 WHERE id = $3 AND winner IS NULL"
        } else {
            "UPDATE tasks SET winner = $1, winner_by = $2 WHERE id = $3"
        };
        let done = sqlx::query(sql)
            .bind(attempt_id)
            .bind(by)
            .bind(task_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records where the task's result was delivered (JSON).
    pub async fn set_delivery(&self, task_id: &str, delivery: &str) -> Result<()> {
        sqlx::query("UPDATE tasks SET delivery = $1 WHERE id = $2")
            .bind(delivery)
            .bind(task_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Tasks with a chosen result whose delivery is not settled (never
    /// tried, or cut short): after a restart they are delivered again.
    pub async fn undelivered_tasks(&self) -> Result<Vec<TaskRow>> {
        let rows = sqlx::query(concat!(
            rows::task_select!(),
            " WHERE t.winner IS NOT NULL AND (t.delivery IS NULL OR t.delivery LIKE '%\"state\":\"pushing\"%')"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(TaskRow::from_row).collect()
    }

    /// The API tokens' names and creation times (never their hashes),
    /// oldest first.
    pub async fn list_tokens(&self) -> Result<Vec<(String, i64)>> {
        let rows = sqlx::query("SELECT name, created_at FROM api_tokens ORDER BY created_at, name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Deletes the tokens named `name`; returns how many there were.
    pub async fn delete_token(&self, name: &str) -> Result<u64> {
        let done = sqlx::query("DELETE FROM api_tokens WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Records a webhook delivery's id for `source`; false when it was
    /// seen before (a replay).
    pub async fn first_delivery(&self, source: &str, id: &str, now: i64) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO webhook_deliveries (source, delivery_id, received_at) VALUES ($1, $2, $3) \
             ON CONFLICT (source, delivery_id) DO NOTHING",
        )
        .bind(source)
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Claims the report of a task's outcome to where it came from: true
    /// for the one caller that may send it.
    pub async fn claim_report(&self, task_id: &str, now: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tasks SET reported_at = $1 WHERE id = $2 AND reported_at IS NULL AND origin IS NOT NULL",
        )
        .bind(now)
        .bind(task_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Tasks, newest first.
    pub async fn list_tasks(&self, limit: u32) -> Result<Vec<TaskRow>> {
        let rows = sqlx::query(concat!(
            rows::task_select!(),
            " ORDER BY created_at DESC, id LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(TaskRow::from_row).collect()
    }

    /// One task.
    pub async fn task(&self, id: &str) -> Result<Option<TaskRow>> {
        let row = sqlx::query(concat!(rows::task_select!(), " WHERE t.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(TaskRow::from_row).transpose()
    }

    /// A task's attempts, first to last.
    pub async fn attempts_of(&self, task_id: &str) -> Result<Vec<AttemptRow>> {
        let rows = sqlx::query(concat!(
            rows::attempt_select!(),
            " WHERE task_id = $1 ORDER BY n"
        ))
        .bind(task_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(AttemptRow::from_row).collect()
    }

    /// One attempt.
    pub async fn attempt(&self, id: &str) -> Result<Option<AttemptRow>> {
        let row = sqlx::query(concat!(rows::attempt_select!(), " WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(AttemptRow::from_row).transpose()
    }

    /// Attempts in any of `states`, oldest first.
    pub async fn attempts_in_states(&self, states: &[AttemptState]) -> Result<Vec<AttemptRow>> {
        if states.is_empty() {
            return Ok(Vec::new());
        }
        // One query: `state IN ($1, $2, ...)`, every state bound.
        let placeholders: Vec<String> = (1..=states.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "{} WHERE state IN ({}) ORDER BY created_at, id",
            rows::attempt_select!(),
            placeholders.join(", ")
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for s in states {
            q = q.bind(s.as_str());
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(AttemptRow::from_row).collect()
    }

    /// Moves an attempt from `change.from` to `change.to` and appends the
    /// `state_changed` event `event` in one transaction. Returns `false`
    /// (and writes nothing) when the attempt was no longer in `from`.
    pub async fn record_transition(
        &self,
        change: &StateChange<'_>,
        event: &Event,
        now: i64,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        // Leaving a state that holds the wall-time clock adds its stay.
        let held = if change.from.holds_wall_time() {
            "$4 - updated_at"
        } else {
            "0"
        };
        // A pause request is carried out by pausing (or moot once the
        // attempt ends); a resume request by leaving `paused`.
        let mut settled = String::new();
        if change.to == AttemptState::Paused || change.to.is_terminal() {
            settled.push_str(", pause_requested = NULL");
        }
        if change.from == AttemptState::Paused || change.to.is_terminal() {
            settled.push_str(", resume_requested = NULL");
        }
        let sql = format!(
            "UPDATE attempts SET state = $1, reason = COALESCE($2, reason), detail = COALESCE($3, detail), \
             held_ms = held_ms + {held}, updated_at = $4{settled} WHERE id = $5 AND state = $6"
        );
        let detail = change
            .detail
            .as_deref()
            .map(|d| self.redactor.text(d).into_owned());
        let updated = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(change.to.as_str())
            .bind(change.reason.map(|r| r.as_str()))
            .bind(detail)
            .bind(now)
            .bind(change.attempt_id)
            .bind(change.from.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if updated == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        insert_event(&mut *tx, event, now, &self.redactor).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records facts learnt about an attempt; `None` fields are left alone.
    pub async fn update_attempt(&self, id: &str, update: &AttemptUpdate<'_>) -> Result<()> {
        sqlx::query(
            "UPDATE attempts SET base_commit = COALESCE($1, base_commit), \
             head_commit = COALESCE($2, head_commit), summary = COALESCE($3, summary), \
             sandbox_id = COALESCE($4, sandbox_id), started_at = COALESCE(started_at, $5), \
             prepared_sandbox = COALESCE($6, prepared_sandbox) WHERE id = $7",
        )
        .bind(update.base_commit)
        .bind(update.head_commit)
        .bind(update.summary.map(|t| self.redactor.text(t).into_owned()))
        .bind(update.sandbox_id)
        .bind(update.started_at)
        .bind(update.prepared_sandbox)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Appends an event. Idempotent on `(attempt_id, seq)`: writing the
    /// same seq twice keeps the first.
    pub async fn append_event(&self, event: &Event, now: i64) -> Result<()> {
        self.append_events(&[(event.clone(), now)]).await
    }

    /// Appends events (each with its storage time) in one transaction,
    /// idempotent like [`Store::append_event`]. Returns once committed.
    pub async fn append_events(&self, events: &[(Event, i64)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        writer::insert_events(&mut tx, self.backend, events, &self.redactor).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Events of an attempt with seq > `after`, in order, at most `limit`.
    pub async fn events_after(
        &self,
        attempt_id: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Event>> {
        let rows = sqlx::query(
            "SELECT seq, ts, body, driver FROM events WHERE attempt_id = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3",
        )
        .bind(attempt_id)
        .bind(after as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| event_from_row(attempt_id, r)).collect()
    }

    /// Records checkpoint `cp` and the conversation messages from index
    /// `first` on (`messages[i]` is message `first + i`), in one
    /// transaction. A message index written again is overwritten: after a
    /// resume the conversation continues from an earlier length.
    /// With `live`, the conversation's current length is set to
    /// `cp.messages` too (a turn's end).
    pub async fn record_checkpoint(
        &self,
        cp: &CheckpointRow,
        first: u32,
        messages: &[String],
        live: bool,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        upsert_messages(&mut tx, &cp.attempt_id, first, messages, &self.redactor).await?;
        if live {
            set_conversation_len(&mut *tx, &cp.attempt_id, cp.messages).await?;
        }
        sqlx::query(
            "INSERT INTO checkpoints (attempt_id, n, seq, turn, messages, commit_sha, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&cp.attempt_id)
        .bind(i64::from(cp.n))
        .bind(cp.seq as i64)
        .bind(i64::from(cp.turn))
        .bind(i64::from(cp.messages))
        .bind(&cp.commit_sha)
        .bind(cp.created_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores the conversation's messages from index `first` on and sets
    /// its current length to `len`, in one transaction: the conversation
    /// mid-turn.
    pub async fn save_messages(
        &self,
        attempt_id: &str,
        first: u32,
        messages: &[String],
        len: u32,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        upsert_messages(&mut tx, attempt_id, first, messages, &self.redactor).await?;
        set_conversation_len(&mut *tx, attempt_id, len).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Starts another iteration of the agent after a failed verification,
    /// in one transaction: the message telling it what failed is stored
    /// at index `first` of the conversation (whose length becomes
    /// `first + 1`; `None`: an agent without a stored conversation), and
    /// the summary of its previous finish is cleared (it has not finished
    /// this iteration).
    pub async fn begin_iteration(
        &self,
        attempt_id: &str,
        first: u32,
        message: Option<&str>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if let Some(message) = message {
            upsert_messages(
                &mut tx,
                attempt_id,
                first,
                &[message.to_owned()],
                &self.redactor,
            )
            .await?;
            set_conversation_len(&mut *tx, attempt_id, first + 1).await?;
        }
        sqlx::query("UPDATE attempts SET summary = NULL WHERE id = $1")
            .bind(attempt_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Sets the SHA-256 of the attempt's model-gateway token.
    pub async fn set_gateway_token(&self, attempt_id: &str, sha256: &str) -> Result<()> {
        sqlx::query("UPDATE attempts SET gateway_token_sha256 = $1 WHERE id = $2")
            .bind(sha256)
            .bind(attempt_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the attempt's newest filesystem snapshot (`None`: none).
    pub async fn set_snapshot(&self, attempt_id: &str, image: Option<&str>) -> Result<()> {
        sqlx::query("UPDATE attempts SET snapshot_image = $1 WHERE id = $2")
            .bind(image)
            .bind(attempt_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Sets the conversation's current length (a recovery that goes back
    /// to a checkpoint shortens it).
    pub async fn set_conversation_len(&self, attempt_id: &str, len: u32) -> Result<()> {
        set_conversation_len(&self.pool, attempt_id, len).await
    }

    /// The conversation as it is now, mid-turn included.
    pub async fn live_messages(&self, attempt_id: &str) -> Result<Vec<String>> {
        let row = sqlx::query("SELECT COALESCE(conversation_len, 0) FROM attempts WHERE id = $1")
            .bind(attempt_id)
            .fetch_optional(&self.pool)
            .await?;
        let len = row.map_or(0, |r| r.get::<i64, _>(0));
        self.messages(attempt_id, len as u32).await
    }

    /// The attempt's events of the given kinds with a seq above `after`,
    /// in order.
    pub async fn events_of_kinds(
        &self,
        attempt_id: &str,
        kinds: &[&str],
        after: u64,
    ) -> Result<Vec<Event>> {
        let marks: Vec<String> = (0..kinds.len()).map(|i| format!("${}", i + 3)).collect();
        let sql = format!(
            "SELECT seq, ts, body, driver FROM events WHERE attempt_id = $1 AND seq > $2 \
             AND kind IN ({}) ORDER BY seq",
            marks.join(", ")
        );
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(attempt_id)
            .bind(after as i64);
        for k in kinds {
            query = query.bind(*k);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(|r| event_from_row(attempt_id, r)).collect()
    }

    /// The seq of the attempt's last event of `kind` (0 when none).
    pub async fn last_seq_of_kind(&self, attempt_id: &str, kind: &str) -> Result<u64> {
        let row = sqlx::query(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE attempt_id = $1 AND kind = $2",
        )
        .bind(attempt_id)
        .bind(kind)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.get::<i64, _>(0) as u64)
    }

    /// The attempt's newest checkpoint.
    pub async fn latest_checkpoint(&self, attempt_id: &str) -> Result<Option<CheckpointRow>> {
        let row = sqlx::query(
            "SELECT n, seq, turn, messages, commit_sha, created_at FROM checkpoints \
             WHERE attempt_id = $1 ORDER BY n DESC LIMIT 1",
        )
        .bind(attempt_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| CheckpointRow {
            attempt_id: attempt_id.to_owned(),
            n: r.get::<i64, _>(0) as u32,
            seq: r.get::<i64, _>(1) as u64,
            turn: r.get::<i64, _>(2) as u32,
            messages: r.get::<i64, _>(3) as u32,
            commit_sha: r.get(4),
            created_at: r.get(5),
        }))
    }

    /// The first `count` messages of the attempt's conversation. Fails
    /// when one is missing: a checkpoint promised them.
    pub async fn messages(&self, attempt_id: &str, count: u32) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT idx, body FROM agent_messages WHERE attempt_id = $1 AND idx < $2 ORDER BY idx",
        )
        .bind(attempt_id)
        .bind(i64::from(count))
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            let idx: i64 = r.get(0);
            if idx != i as i64 {
                break;
            }
            out.push(r.get::<String, _>(1));
        }
        if out.len() != count as usize {
            return Err(StoreError::Corrupt(format!(
                "attempt {attempt_id}: the conversation has {} of its {count} checkpointed messages",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Takes (or keeps) the lease on an attempt for `owner` until
    /// `until`: only when nobody holds it, `owner` already does, or the
    /// holder's lease ran out before `now`. Returns whether `owner` holds
    /// it now.
    pub async fn claim(&self, attempt_id: &str, owner: &str, now: i64, until: i64) -> Result<bool> {
        let updated = sqlx::query(
            "UPDATE attempts SET owner = $1, lease_until = $2 WHERE id = $3 \
             AND (owner IS NULL OR owner = $1 OR lease_until < $4)",
        )
        .bind(owner)
        .bind(until)
        .bind(attempt_id)
        .bind(now)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(updated == 1)
    }

    /// Extends `owner`'s lease on an attempt; false when `owner` no longer
    /// holds it (another replica took it over).
    pub async fn renew(&self, attempt_id: &str, owner: &str, until: i64) -> Result<bool> {
        let updated =
            sqlx::query("UPDATE attempts SET lease_until = $1 WHERE id = $2 AND owner = $3")
                .bind(until)
                .bind(attempt_id)
                .bind(owner)
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(updated == 1)
    }

    /// Records that a person asked to cancel an attempt (for the replica
    /// that drives it to act on).
    pub async fn request_cancel(&self, attempt_id: &str, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE attempts SET cancel_requested = COALESCE(cancel_requested, $1) WHERE id = $2",
        )
        .bind(now)
        .bind(attempt_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Attempts `owner` drives that someone asked to cancel.
    pub async fn cancel_requests(&self, owner: &str) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT id FROM attempts WHERE owner = $1 AND cancel_requested IS NOT NULL",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Records that a person asked to stop (pause) an attempt, for the
    /// replica that drives it to act on.
    pub async fn request_pause(&self, attempt_id: &str, now: i64) -> Result<()> {
        sqlx::query(
            "UPDATE attempts SET pause_requested = COALESCE(pause_requested, $1) WHERE id = $2",
        )
        .bind(now)
        .bind(attempt_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Forgets a pause request that cannot be carried out (the attempt had
    /// moved on to a state that cannot pause).
    pub async fn drop_pause_request(&self, attempt_id: &str) -> Result<()> {
        sqlx::query("UPDATE attempts SET pause_requested = NULL WHERE id = $1")
            .bind(attempt_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Attempts `owner` drives that someone asked to pause.
    pub async fn pause_requests(&self, owner: &str) -> Result<Vec<String>> {
        let rows =
            sqlx::query("SELECT id FROM attempts WHERE owner = $1 AND pause_requested IS NOT NULL")
                .bind(owner)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Records that a person asked to resume a paused attempt; false when
    /// it is not paused.
    pub async fn request_resume(&self, attempt_id: &str, now: i64) -> Result<bool> {
        let updated = sqlx::query(
            "UPDATE attempts SET resume_requested = COALESCE(resume_requested, $1) \
             WHERE id = $2 AND state = 'paused'",
        )
        .bind(now)
        .bind(attempt_id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(updated == 1)
    }

    /// Gives up `owner`'s lease on an attempt (it ended, or the replica
    /// stops driving it).
    pub async fn release(&self, attempt_id: &str, owner: &str) -> Result<()> {
        sqlx::query(
            "UPDATE attempts SET owner = NULL, lease_until = NULL WHERE id = $1 AND owner = $2",
        )
        .bind(attempt_id)
        .bind(owner)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The attempt's last `n` events, in order.
    pub async fn last_events(&self, attempt_id: &str, n: u32) -> Result<Vec<Event>> {
        let last = self.last_seq(attempt_id).await?;
        self.events_after(attempt_id, last.saturating_sub(u64::from(n)), n)
            .await
    }

    /// Model calls, tokens and cost of an attempt, from its
    /// `model_response` and `model_call` events (`None`: no call yet).
    pub async fn model_usage(
        &self,
        attempt_id: &str,
    ) -> Result<Option<backshift_protocol::ModelUsage>> {
        let rows = sqlx::query(
            "SELECT body FROM events WHERE attempt_id = $1 \
             AND kind IN ('model_response', 'model_call')",
        )
        .bind(attempt_id)
        .fetch_all(&self.pool)
        .await?;
        let mut total = backshift_protocol::ModelUsage::default();
        for r in &rows {
            let body: String = r.get(0);
            let (usage, cost) = match serde_json::from_str(&body) {
                Ok(EventKind::ModelResponse {
                    usage, cost_usd, ..
                })
                | Ok(EventKind::ModelCall {
                    usage, cost_usd, ..
                }) => (usage, cost_usd),
                _ => continue,
            };
            total.calls += 1;
            if let Some(u) = usage {
                total.input_tokens += u.input_tokens;
                total.output_tokens += u.output_tokens;
            }
            if let Some(c) = cost {
                total.cost_usd = Some(total.cost_usd.unwrap_or(0.0) + c);
            }
        }
        Ok((total.calls > 0).then_some(total))
    }

    /// Model tokens (input + output) an attempt has used, from its
    /// `model_response` events (the built-in agent) and `model_call`
    /// events (agents in the sandbox, through the gateway): the budget
    /// survives recoveries.
    pub async fn model_tokens_used(&self, attempt_id: &str) -> Result<u64> {
        Ok(self
            .model_usage(attempt_id)
            .await?
            .map_or(0, |u| u.input_tokens + u.output_tokens))
    }

    /// The seq of an attempt's last event (0 when it has none).
    pub async fn last_seq(&self, attempt_id: &str) -> Result<u64> {
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) FROM events WHERE attempt_id = $1")
            .bind(attempt_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.get::<i64, _>(0) as u64)
    }
}

/// Facts learnt about an attempt while it runs.
#[derive(Debug, Clone, Default)]
pub struct AttemptUpdate<'a> {
    /// Commit the branch starts from.
    pub base_commit: Option<&'a str>,
    /// Commit at the branch's tip.
    pub head_commit: Option<&'a str>,
    /// The agent's summary.
    pub summary: Option<&'a str>,
    /// The sandbox serving the attempt.
    pub sandbox_id: Option<&'a str>,
    /// The sandbox whose checkout is completely in place.
    pub prepared_sandbox: Option<&'a str>,
    /// When it left the queue (kept once set).
    pub started_at: Option<i64>,
}

/// An event from a `seq, ts, body, driver` row.
fn event_from_row(attempt_id: &str, r: &sqlx::any::AnyRow) -> Result<Event> {
    let seq: i64 = r.get(0);
    let ts: i64 = r.get(1);
    let body: String = r.get(2);
    let kind: EventKind = serde_json::from_str(&body)
        .map_err(|e| StoreError::Corrupt(format!("event {attempt_id}/{seq}: {e}")))?;
    Ok(Event {
        attempt_id: attempt_id.to_owned(),
        driver: r.get(3),
        seq: seq as u64,
        ts: backshift_protocol::format_ts(ts),
        kind,
    })
}

async fn upsert_messages(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    attempt_id: &str,
    first: u32,
    messages: &[String],
    redactor: &redact::Redactor,
) -> Result<()> {
    for (i, body) in messages.iter().enumerate() {
        let body = redactor.text(body);
        sqlx::query(
            "INSERT INTO agent_messages (attempt_id, idx, body) VALUES ($1, $2, $3) \
             ON CONFLICT (attempt_id, idx) DO UPDATE SET body = excluded.body",
        )
        .bind(attempt_id)
        .bind(i64::from(first) + i as i64)
        .bind(body.as_ref())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

async fn set_conversation_len<'e, E>(executor: E, attempt_id: &str, len: u32) -> Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    sqlx::query("UPDATE attempts SET conversation_len = $1 WHERE id = $2")
        .bind(i64::from(len))
        .bind(attempt_id)
        .execute(executor)
        .await?;
    Ok(())
}

async fn insert_event<'e, E>(
    executor: E,
    event: &Event,
    now: i64,
    redactor: &redact::Redactor,
) -> Result<()>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let body =
        serde_json::to_string(&event.kind).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let body = if redactor.is_empty() {
        body
    } else {
        redactor.text(&body).into_owned()
    };
    sqlx::query(
        "INSERT INTO events (attempt_id, seq, ts, kind, body, driver) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (attempt_id, seq) DO NOTHING",
    )
    .bind(&event.attempt_id)
    .bind(event.seq as i64)
    .bind(now)
    .bind(event.kind.type_name())
    .bind(body)
    .bind(event.driver.as_deref())
    .execute(executor)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests;
