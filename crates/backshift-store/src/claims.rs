//! Which attempt took which warm sandbox (a warm sandbox's labels name
//! no attempt: it was made before there was one). Claims are kept, like
//! the attempts they name.

use crate::{Result, Store};
use sqlx::Row;

/// A warm sandbox, taken by an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxClaim {
    /// The sandbox's id (the driver's).
    pub sandbox_id: String,
    /// The attempt that took it.
    pub attempt_id: String,
    /// That attempt's task.
    pub task_id: String,
    /// When, unix ms.
    pub claimed_at: i64,
}

impl Store {
    /// Records that `claim.attempt_id` took the sandbox; false when the
    /// sandbox had been claimed before (by anyone).
    pub async fn claim_sandbox(&self, claim: &SandboxClaim) -> Result<bool> {
        let inserted = sqlx::query(
            "INSERT INTO sandbox_claims (sandbox_id, attempt_id, task_id, claimed_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (sandbox_id) DO NOTHING",
        )
        .bind(&claim.sandbox_id)
        .bind(&claim.attempt_id)
        .bind(&claim.task_id)
        .bind(claim.claimed_at)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }

    /// The claims of these sandboxes (those never claimed are absent).
    pub async fn sandbox_claims(&self, sandbox_ids: &[String]) -> Result<Vec<SandboxClaim>> {
        let mut claims = Vec::new();
        // In slices, so no statement has too many parameters.
        for ids in sandbox_ids.chunks(200) {
            let list = (1..=ids.len())
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "SELECT sandbox_id, attempt_id, task_id, claimed_at FROM sandbox_claims \
                 WHERE sandbox_id IN ({list})"
            );
            // Only numbered placeholders are formatted in.
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in ids {
                query = query.bind(id);
            }
            for row in query.fetch_all(&self.pool).await? {
                claims.push(SandboxClaim {
                    sandbox_id: row.try_get("sandbox_id")?,
                    attempt_id: row.try_get("attempt_id")?,
                    task_id: row.try_get("task_id")?,
                    claimed_at: row.try_get("claimed_at")?,
                });
            }
        }
        Ok(claims)
    }
}
