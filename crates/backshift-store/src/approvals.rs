//! Approvals (decisions a person is asked for), the grants that
//! approvals "for the task" or "for the project" leave behind, and the
//! projects' own policy.

use crate::{Result, Store};
use sqlx::Row;
use sqlx::any::AnyRow;

/// A stored approval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRow {
    /// Its id.
    pub id: String,
    /// The attempt that asked.
    pub attempt_id: String,
    /// `egress` or `permission`.
    pub kind: String,
    /// What is asked about, as JSON (kind-specific).
    pub subject: String,
    /// One line for people (`CONNECT pypi.example:443`).
    pub summary: String,
    /// `pending`, `approved`, `denied` or `expired`.
    pub state: String,
    /// For an approval: `once`, `task` or `project`.
    pub scope: Option<String>,
    /// Who answered (a token's name; `timeout` when it expired).
    pub answered_by: Option<String>,
    /// Why, when given.
    pub reason: Option<String>,
    /// When it was asked, unix ms.
    pub created_at: i64,
    /// When it is denied unless answered, unix ms.
    pub expires_at: i64,
    /// When it was answered, unix ms.
    pub answered_at: Option<i64>,
}

/// An answer to record.
#[derive(Debug, Clone)]
pub struct Answer<'a> {
    /// `approved`, `denied` or `expired`.
    pub state: &'a str,
    /// `once`, `task` or `project` (approvals only).
    pub scope: Option<&'a str>,
    /// Who answered.
    pub by: &'a str,
    /// Why.
    pub reason: Option<&'a str>,
    /// When, unix ms.
    pub at: i64,
}

/// What a task- or project-wide approval allows from then on.
#[derive(Debug, Clone)]
pub struct NewGrant<'a> {
    /// Grant id.
    pub id: &'a str,
    /// The project.
    pub project_id: &'a str,
    /// The task, for a task-wide grant.
    pub task_id: Option<&'a str>,
    /// `egress` or `permission`.
    pub kind: &'a str,
    /// `host:port` (egress) or a tool's name (permission).
    pub target: &'a str,
}

macro_rules! select {
    () => {
        "SELECT id, attempt_id, kind, subject, summary, state, scope, answered_by, \
         reason, created_at, expires_at, answered_at FROM approvals"
    };
}

fn approval(r: &AnyRow) -> ApprovalRow {
    ApprovalRow {
        id: r.get(0),
        attempt_id: r.get(1),
        kind: r.get(2),
        subject: r.get(3),
        summary: r.get(4),
        state: r.get(5),
        scope: r.get(6),
        answered_by: r.get(7),
        reason: r.get(8),
        created_at: r.get(9),
        expires_at: r.get(10),
        answered_at: r.get(11),
    }
}

impl Store {
    /// Records a pending approval.
    pub async fn insert_approval(&self, a: &ApprovalRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO approvals (id, attempt_id, kind, subject, summary, state, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7)",
        )
        .bind(&a.id)
        .bind(&a.attempt_id)
        .bind(&a.kind)
        .bind(&a.subject)
        .bind(&a.summary)
        .bind(a.created_at)
        .bind(a.expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One approval.
    pub async fn approval(&self, id: &str) -> Result<Option<ApprovalRow>> {
        let row = sqlx::query(concat!(select!(), " WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(approval))
    }

    /// Approvals, newest first: pending ones only, or all of them.
    pub async fn approvals(&self, pending_only: bool, limit: u32) -> Result<Vec<ApprovalRow>> {
        let rows = sqlx::query(concat!(
            select!(),
            " WHERE state = 'pending' OR NOT $1 ORDER BY created_at DESC, id DESC LIMIT $2"
        ))
        .bind(pending_only)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(approval).collect())
    }

    /// An attempt's approvals, oldest first.
    pub async fn approvals_of(&self, attempt_id: &str) -> Result<Vec<ApprovalRow>> {
        let rows = sqlx::query(concat!(
            select!(),
            " WHERE attempt_id = $1 ORDER BY created_at, id"
        ))
        .bind(attempt_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(approval).collect())
    }

    /// Answers a pending approval, with the grant it leaves (if any) in
    /// the same transaction. False when it was not pending any more
    /// (someone else answered, or it expired).
    pub async fn answer_approval(
        &self,
        id: &str,
        answer: &Answer<'_>,
        grant: Option<&NewGrant<'_>>,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let updated = sqlx::query(
            "UPDATE approvals SET state = $1, scope = $2, answered_by = $3, reason = $4, answered_at = $5 \
             WHERE id = $6 AND state = 'pending'",
        )
        .bind(answer.state)
        .bind(answer.scope)
        .bind(answer.by)
        .bind(answer.reason)
        .bind(answer.at)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated != 1 {
            return Ok(false);
        }
        if let Some(g) = grant {
            sqlx::query(
                "INSERT INTO grants (id, project_id, task_id, kind, target, approval_id, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(g.id)
            .bind(g.project_id)
            .bind(g.task_id)
            .bind(g.kind)
            .bind(g.target)
            .bind(id)
            .bind(answer.at)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The approval that granted `kind` `target` to `task_id` or its whole
    /// project, if any.
    pub async fn grant_for(
        &self,
        project_id: &str,
        task_id: &str,
        kind: &str,
        target: &str,
    ) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT approval_id FROM grants WHERE project_id = $1 AND kind = $2 AND target = $3 \
             AND (task_id IS NULL OR task_id = $4) ORDER BY created_at LIMIT 1",
        )
        .bind(project_id)
        .bind(kind)
        .bind(target)
        .bind(task_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.get(0)))
    }
}

/// A stored project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRow {
    /// Its id.
    pub id: String,
    /// The repository (a path on the server's host or a URL).
    pub source: String,
    /// Its egress rules, as JSON.
    pub egress_rules: String,
    /// Creation time, unix ms.
    pub created_at: i64,
    /// Whether its sandboxes get a Docker engine of their own.
    pub docker_engine: bool,
}

fn project(r: &AnyRow) -> ProjectRow {
    ProjectRow {
        id: r.get(0),
        source: r.get(1),
        egress_rules: r.get(2),
        created_at: r.get(3),
        docker_engine: r.get::<i64, _>(4) != 0,
    }
}

impl Store {
    /// Every project, oldest first.
    pub async fn projects(&self) -> Result<Vec<ProjectRow>> {
        let rows = sqlx::query(
            "SELECT id, source, egress_rules, created_at, docker_engine FROM projects ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(project).collect())
    }

    /// One project.
    pub async fn project(&self, id: &str) -> Result<Option<ProjectRow>> {
        let row =
            sqlx::query("SELECT id, source, egress_rules, created_at, docker_engine FROM projects WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.as_ref().map(project))
    }

    /// Replaces a project's egress rules (JSON); false when there is no
    /// such project.
    pub async fn set_project_egress(&self, id: &str, rules: &str) -> Result<bool> {
        let updated = sqlx::query("UPDATE projects SET egress_rules = $1 WHERE id = $2")
            .bind(rules)
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(updated == 1)
    }

    /// Turns a project's own Docker engine on or off; false when there is
    /// no such project.
    pub async fn set_project_docker(&self, id: &str, on: bool) -> Result<bool> {
        let updated = sqlx::query("UPDATE projects SET docker_engine = $1 WHERE id = $2")
            .bind(i64::from(on))
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(updated == 1)
    }
}
