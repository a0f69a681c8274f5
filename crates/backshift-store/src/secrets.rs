//! Secrets (sealed; the store never sees a plain value) and their grants
//! to projects.

use crate::{Result, Store};
use sqlx::Row;

/// A stored secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRow {
    /// Its name.
    pub name: String,
    /// The value, sealed (nonce and ciphertext, base64).
    pub sealed: String,
    /// Which key sealed it.
    pub key_id: String,
    /// Created, unix ms.
    pub created_at: i64,
    /// Last set, unix ms.
    pub updated_at: i64,
}

/// A grant: `project_id`'s sandboxes get `secret` as variable `var`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretGrant {
    /// The secret's name.
    pub secret: String,
    /// The project.
    pub project_id: String,
    /// The environment variable.
    pub var: String,
    /// Given to the setup phase only (`postCreateCommand`), not to the
    /// sandbox's environment.
    pub setup_only: bool,
}

impl Store {
    /// Creates or replaces a secret; true when it is new.
    pub async fn put_secret(
        &self,
        name: &str,
        sealed: &str,
        key_id: &str,
        now: i64,
    ) -> Result<bool> {
        let existed = sqlx::query("SELECT 1 FROM secrets WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .is_some();
        sqlx::query(
            "INSERT INTO secrets (name, sealed, key_id, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (name) DO UPDATE SET sealed = excluded.sealed, key_id = excluded.key_id, \
             updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(sealed)
        .bind(key_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(!existed)
    }

    /// Re-seals a secret (key rotation) without touching its times.
    pub async fn reseal_secret(&self, name: &str, sealed: &str, key_id: &str) -> Result<()> {
        sqlx::query("UPDATE secrets SET sealed = $1, key_id = $2 WHERE name = $3")
            .bind(sealed)
            .bind(key_id)
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every secret, by name.
    pub async fn secrets(&self) -> Result<Vec<SecretRow>> {
        let rows = sqlx::query(
            "SELECT name, sealed, key_id, created_at, updated_at FROM secrets ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| SecretRow {
                name: r.get(0),
                sealed: r.get(1),
                key_id: r.get(2),
                created_at: r.get(3),
                updated_at: r.get(4),
            })
            .collect())
    }

    /// Deletes a secret and its grants; false when there was none.
    pub async fn delete_secret(&self, name: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM secret_grants WHERE secret = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        let deleted = sqlx::query("DELETE FROM secrets WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(deleted == 1)
    }

    /// Grants `secret` to `project_id` as `var`, for the setup phase only
    /// or not (replacing an earlier grant of it to that project).
    pub async fn grant_secret(
        &self,
        secret: &str,
        project_id: &str,
        var: &str,
        setup_only: bool,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM secret_grants WHERE secret = $1 AND project_id = $2")
            .bind(secret)
            .bind(project_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO secret_grants (secret, project_id, var, created_at, setup_only) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(secret)
        .bind(project_id)
        .bind(var)
        .bind(now)
        .bind(i64::from(setup_only))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Takes a grant back; false when there was none.
    pub async fn revoke_secret(&self, secret: &str, project_id: &str) -> Result<bool> {
        let deleted =
            sqlx::query("DELETE FROM secret_grants WHERE secret = $1 AND project_id = $2")
                .bind(secret)
                .bind(project_id)
                .execute(&self.pool)
                .await?
                .rows_affected();
        Ok(deleted == 1)
    }

    /// Every grant (of one project, when given).
    pub async fn secret_grants(&self, project_id: Option<&str>) -> Result<Vec<SecretGrant>> {
        let rows = sqlx::query(
            "SELECT secret, project_id, var, setup_only FROM secret_grants \
             WHERE $1 IS NULL OR project_id = $1 ORDER BY project_id, var",
        )
        .bind(project_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| SecretGrant {
                secret: r.get(0),
                project_id: r.get(1),
                var: r.get(2),
                setup_only: r.get::<i64, _>(3) != 0,
            })
            .collect())
    }
}
