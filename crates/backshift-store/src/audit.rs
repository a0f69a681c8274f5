//! The audit log: append-only, each row chained to the one before by a
//! SHA-256 over its content and the previous hash.

use crate::{Result, Store, StoreError};
use sha2::{Digest, Sha256};
use sqlx::Row;

/// An entry to append.
#[derive(Debug, Clone)]
pub struct NewAudit<'a> {
    /// When, unix ms.
    pub ts: i64,
    /// Who: `token:NAME`, `sandbox:ATTEMPT`, `policy`, `timeout`...
    pub actor: &'a str,
    /// What: `task.create`, `egress.denied`, `approval.answer`...
    pub action: &'a str,
    /// On what: a task, attempt or approval id, a host.
    pub target: &'a str,
    /// Why and the details, as JSON.
    pub detail: &'a str,
}

/// A stored entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// Position in the log, from 1, without gaps.
    pub seq: i64,
    /// When, unix ms.
    pub ts: i64,
    /// Who.
    pub actor: String,
    /// What.
    pub action: String,
    /// On what.
    pub target: String,
    /// Details (JSON).
    pub detail: String,
    /// The previous row's hash (64 zeros for the first).
    pub prev_hash: String,
    /// This row's hash.
    pub hash: String,
}

/// The hash before the first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of a row with this content after `prev_hash`. Each field is
/// length-prefixed, so no two different rows hash the same input.
pub fn chain_hash(
    seq: i64,
    ts: i64,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
    prev_hash: &str,
) -> String {
    let mut h = Sha256::new();
    for field in [
        seq.to_string().as_str(),
        ts.to_string().as_str(),
        actor,
        action,
        target,
        detail,
        prev_hash,
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

impl AuditRow {
    /// The hash this row's content calls for.
    pub fn expected_hash(&self) -> String {
        chain_hash(
            self.seq,
            self.ts,
            &self.actor,
            &self.action,
            &self.target,
            &self.detail,
            &self.prev_hash,
        )
    }
}

impl Store {
    /// Appends an entry at the end of the chain; returns it. Several
    /// writers (replicas) may race: the loser of a sequence number tries
    /// again on the new end.
    pub async fn append_audit(&self, entry: &NewAudit<'_>) -> Result<AuditRow> {
        let mut last_error = None;
        for _ in 0..20 {
            let mut tx = self.pool.begin().await?;
            let last = sqlx::query("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
            let (prev_seq, prev_hash) = match last {
                Some(r) => (r.get::<i64, _>(0), r.get::<String, _>(1)),
                None => (0, GENESIS.to_owned()),
            };
            let row = AuditRow {
                seq: prev_seq + 1,
                ts: entry.ts,
                actor: entry.actor.to_owned(),
                action: entry.action.to_owned(),
                target: entry.target.to_owned(),
                detail: entry.detail.to_owned(),
                hash: chain_hash(
                    prev_seq + 1,
                    entry.ts,
                    entry.actor,
                    entry.action,
                    entry.target,
                    entry.detail,
                    &prev_hash,
                ),
                prev_hash,
            };
            let inserted = sqlx::query(
                "INSERT INTO audit_log (seq, ts, actor, action, target, detail, prev_hash, hash) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(row.seq)
            .bind(row.ts)
            .bind(&row.actor)
            .bind(&row.action)
            .bind(&row.target)
            .bind(&row.detail)
            .bind(&row.prev_hash)
            .bind(&row.hash)
            .execute(&mut *tx)
            .await;
            match inserted {
                Ok(_) => match tx.commit().await {
                    Ok(()) => return Ok(row),
                    Err(e) => last_error = Some(e),
                },
                Err(e) => last_error = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Err(StoreError::Write(format!(
            "the audit log could not be appended to: {}",
            last_error.map(|e| e.to_string()).unwrap_or_default()
        )))
    }

    /// Entries after `after`, in order, at most `limit`.
    pub async fn audit_rows(&self, after: i64, limit: u32) -> Result<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT seq, ts, actor, action, target, detail, prev_hash, hash FROM audit_log \
             WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| AuditRow {
                seq: r.get(0),
                ts: r.get(1),
                actor: r.get(2),
                action: r.get(3),
                target: r.get(4),
                detail: r.get(5),
                prev_hash: r.get(6),
                hash: r.get(7),
            })
            .collect())
    }
}
