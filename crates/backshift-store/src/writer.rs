//! Batched event inserts: many events, one transaction, a few multi-row
//! statements. The event hub's group commit writes through here.

use crate::{Backend, Result, StoreError};
use backshift_protocol::Event;
use sqlx::AnyConnection;
use std::fmt::Write;

/// Rows per INSERT statement: 6 parameters each, well under SQLite's
/// limit of 32766 parameters (PostgreSQL allows 65535).
const ROWS_PER_STATEMENT: usize = 1000;

/// Inserts `events` (each with its storage time) inside the caller's
/// transaction; idempotent on `(attempt_id, seq)`.
pub(crate) async fn insert_events(
    conn: &mut AnyConnection,
    backend: Backend,
    events: &[(Event, i64)],
    redactor: &crate::redact::Redactor,
) -> Result<()> {
    let mut rows = Vec::with_capacity(events.len());
    for (e, now) in events {
        let body =
            serde_json::to_string(&e.kind).map_err(|err| StoreError::Corrupt(err.to_string()))?;
        let body = if redactor.is_empty() {
            body
        } else {
            redactor.text(&body).into_owned()
        };
        rows.push((e, *now, body));
    }
    for chunk in rows.chunks(ROWS_PER_STATEMENT) {
        let mut sql =
            String::from("INSERT INTO events (attempt_id, seq, ts, kind, body, driver) VALUES ");
        for i in 0..chunk.len() {
            let sep = if i == 0 { "" } else { ", " };
            match backend {
                // Positional: sqlx maps `$N` on SQLite by parameter name,
                // which costs quadratic time in a statement this size.
                Backend::Sqlite => {
                    let _ = write!(sql, "{sep}(?, ?, ?, ?, ?, ?)");
                }
                Backend::Postgres => {
                    let p = i * 6;
                    let _ = write!(
                        sql,
                        "{sep}(${}, ${}, ${}, ${}, ${}, ${})",
                        p + 1,
                        p + 2,
                        p + 3,
                        p + 4,
                        p + 5,
                        p + 6
                    );
                }
            }
        }
        sql.push_str(" ON CONFLICT (attempt_id, seq) DO NOTHING");
        // Only placeholders are generated; every value is bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (e, now, body) in chunk {
            q = q
                .bind(e.attempt_id.as_str())
                .bind(e.seq as i64)
                .bind(*now)
                .bind(e.kind.type_name())
                .bind(body.as_str())
                .bind(e.driver.as_deref());
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}
