//! Batched event inserts: many events, one transaction, a few multi-row
//! statements. The event hub's group commit writes through here.

use crate::{Result, StoreError};
use backshift_protocol::Event;
use sqlx::{QueryBuilder, Sqlite, SqliteConnection};

/// Rows per INSERT statement: 5 parameters each, well under SQLite's
/// limit of 32766 parameters.
const ROWS_PER_STATEMENT: usize = 1000;

/// Inserts `events` (each with its storage time) inside the caller's
/// transaction; idempotent on `(attempt_id, seq)`.
pub(crate) async fn insert_events(
    conn: &mut SqliteConnection,
    events: &[(Event, i64)],
) -> Result<()> {
    let mut rows = Vec::with_capacity(events.len());
    for (e, now) in events {
        let body =
            serde_json::to_string(&e.kind).map_err(|err| StoreError::Corrupt(err.to_string()))?;
        rows.push((e, *now, body));
    }
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut q: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO events (attempt_id, seq, ts, kind, body) ");
        q.push_values(chunk, |mut b, (e, now, body)| {
            b.push_bind(&e.attempt_id)
                .push_bind(e.seq as i64)
                .push_bind(*now)
                .push_bind(e.kind.type_name())
                .push_bind(body);
        });
        q.push(" ON CONFLICT (attempt_id, seq) DO NOTHING");
        q.build().execute(&mut *conn).await?;
    }
    Ok(())
}
