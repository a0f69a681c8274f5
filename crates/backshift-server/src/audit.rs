//! The audit log: every API mutation and every policy decision (who,
//! what, on what, why), append-only and hash-chained in the database.
//!
//! Each row's hash covers its content and the previous row's hash, so an
//! edited row, or one inserted or deleted in the middle, breaks the chain.
//! A row deleted at the end leaves an intact but shorter chain: the end
//! of the chain is also written to `<data>/audit.head`, outside the
//! database, and [`verify`] compares the two.

use crate::serve::App;
use backshift_protocol::{AuditEntry, AuditVerification, format_ts, now_ms};
use backshift_store::{AuditRow, GENESIS, NewAudit, Store};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Appends to the audit log and keeps its head file.
pub struct Audit {
    store: Store,
    head: PathBuf,
    /// The largest seq written to the head file by this process.
    written: tokio::sync::Mutex<i64>,
}

/// The head file's name in the data directory.
pub const HEAD_FILE: &str = "audit.head";

impl Audit {
    /// The audit log of `store`, with its head file in `data_dir`.
    pub fn new(store: Store, data_dir: &Path) -> Audit {
        Audit {
            store,
            head: data_dir.join(HEAD_FILE),
            written: tokio::sync::Mutex::new(0),
        }
    }

    /// Records that `actor` did `action` on `target`. A failure is logged:
    /// the action itself has happened.
    pub async fn record(&self, actor: &str, action: &str, target: &str, detail: Value) {
        let detail = detail.to_string();
        let entry = NewAudit {
            ts: now_ms(),
            actor,
            action,
            target,
            detail: &detail,
        };
        match self.store.append_audit(&entry).await {
            Ok(row) => {
                let mut written = self.written.lock().await;
                if row.seq > *written {
                    let tmp = self.head.with_extension("head.tmp");
                    let content = format!("{} {}\n", row.seq, row.hash);
                    let saved = tokio::fs::write(&tmp, content).await.is_ok()
                        && tokio::fs::rename(&tmp, &self.head).await.is_ok();
                    if saved {
                        *written = row.seq;
                    } else {
                        tracing::error!("cannot write the audit head {}", self.head.display());
                    }
                }
            }
            Err(e) => tracing::error!(action, target, "cannot append to the audit log: {e}"),
        }
    }

    /// Checks the whole chain and its end against the head file.
    pub async fn verify(&self) -> Result<AuditVerification, backshift_store::StoreError> {
        let mut problems = Vec::new();
        let mut prev: Option<AuditRow> = None;
        let mut rows = 0u64;
        loop {
            let after = prev.as_ref().map_or(0, |r| r.seq);
            let page = self.store.audit_rows(after, 1000).await?;
            if page.is_empty() {
                break;
            }
            for row in page {
                rows += 1;
                let (want_seq, want_prev) = match &prev {
                    Some(p) => (p.seq + 1, p.hash.as_str()),
                    None => (1, GENESIS),
                };
                if row.seq != want_seq {
                    problems.push(if row.seq - want_seq == 1 {
                        format!("row {want_seq} is missing (deleted)")
                    } else {
                        format!("rows {want_seq} to {} are missing (deleted)", row.seq - 1)
                    });
                } else if row.prev_hash != want_prev {
                    problems.push(format!(
                        "row {} does not follow row {} (its previous hash differs: rows were replaced or inserted)",
                        row.seq,
                        row.seq - 1
                    ));
                }
                if row.hash != row.expected_hash() {
                    problems.push(format!(
                        "row {} was edited: its content ({} {} on {}) does not match its hash",
                        row.seq, row.actor, row.action, row.target
                    ));
                }
                prev = Some(row);
            }
        }
        let head = match tokio::fs::read_to_string(&self.head).await {
            Ok(text) => {
                let mut parts = text.split_whitespace();
                let seq = parts.next().and_then(|s| s.parse::<i64>().ok());
                let hash = parts.next().map(str::to_owned);
                match (seq, hash) {
                    (Some(seq), Some(hash)) => Some((seq, hash)),
                    _ => {
                        problems.push(format!(
                            "the head file {} is unreadable",
                            self.head.display()
                        ));
                        None
                    }
                }
            }
            Err(_) => None,
        };
        let last = prev.as_ref().map_or(0, |r| r.seq);
        if let Some((seq, hash)) = &head {
            if *seq > last {
                problems.push(format!(
                    "the log ends at row {last}, but row {seq} was written (rows at the end were deleted)"
                ));
            } else if let Some(row) = self.store.audit_rows(seq - 1, 1).await?.first()
                && row.seq == *seq
                && &row.hash != hash
            {
                problems.push(format!(
                    "row {seq} is not the row that was written (its hash differs from the head file's)"
                ));
            }
        }
        Ok(AuditVerification {
            ok: problems.is_empty(),
            rows,
            head_seq: head.map(|(s, _)| s),
            problems,
        })
    }
}

/// The API's view of a row.
pub fn entry(row: &AuditRow) -> AuditEntry {
    AuditEntry {
        seq: row.seq,
        ts: format_ts(row.ts),
        actor: row.actor.clone(),
        action: row.action.clone(),
        target: row.target.clone(),
        detail: serde_json::from_str(&row.detail).unwrap_or(Value::String(row.detail.clone())),
        hash: row.hash.clone(),
    }
}

impl App {
    /// Records an audit entry (see [`Audit::record`]).
    pub async fn audit(&self, actor: &str, action: &str, target: &str, detail: Value) {
        self.audit.record(actor, action, target, detail).await;
    }
}
