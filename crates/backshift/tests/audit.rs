//! The audit log through the real server and CLI: mutations and policy
//! decisions are recorded with who did them; an edited, a deleted-inside
//! and a deleted-at-the-end row are each found by `backshift audit verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::World;
use serde_json::Value;

async fn db(w: &World) -> sqlx::SqlitePool {
    let path = w.dir.path().join("data").join("backshift.db");
    sqlx::sqlite::SqlitePoolOptions::new()
        .connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}

async fn verify(w: &World) -> (i32, String) {
    let (code, out, err) = w.cli(&["audit", "verify"]).await;
    (code, format!("{out}{err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_and_decisions_are_audited_and_tampering_is_found() {
    // A default-deny egress policy, so the task's one request is a
    // decision on the record.
    let w = World::start(None, "").await;
    let (task, view) = w
        .run_task(
            "Try the network",
            &[
                "--command",
                "curl -s -m 5 http://somewhere.invalid/ || true",
            ],
        )
        .await;
    assert_eq!(view["state"], "succeeded", "{view}");
    // Its result is chosen as its attempt ends (on the record too).
    for _ in 0..50 {
        let (_, v) = w
            .api(reqwest::Method::GET, &format!("/api/v1/tasks/{task}"), None)
            .await;
        if v["winner"].is_string() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (code, _, _) = w.cli(&["cancel", &task]).await;
    assert_eq!(code, 0);

    let (code, out, err) = w.cli(&["audit", "--jsonl"]).await;
    assert_eq!(code, 0, "{err}");
    let entries: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actions: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e["actor"].as_str().unwrap(), e["action"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("backshift", "token.create"),
            ("token:admin", "task.create"),
            ("policy", "egress.denied"),
            ("auto", "task.winner"),
            ("token:admin", "task.cancel"),
        ],
        "{out}"
    );
    assert_eq!(entries[1]["target"], task);
    assert_eq!(entries[1]["detail"]["prompt"], "Try the network");
    assert_eq!(entries[2]["target"], "somewhere.invalid:80");
    assert!(
        entries[2]["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains("the default is deny")
    );
    let seqs: Vec<i64> = entries.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    let (code, table, _) = w.cli(&["audit", "--after", "3"]).await;
    assert_eq!(code, 0);
    assert!(
        table.contains("task.cancel") && !table.contains("task.create"),
        "{table}"
    );

    let (code, out) = verify(&w).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("intact: 5 rows") && out.contains("ending at row 5"),
        "{out}"
    );

    // Someone with the database edits who created the task.
    let pool = db(&w).await;
    sqlx::query("UPDATE audit_log SET actor = 'token:nobody' WHERE seq = 2")
        .execute(&pool)
        .await
        .unwrap();
    let (code, out) = verify(&w).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("row 2 was edited"), "{out}");
    sqlx::query("UPDATE audit_log SET actor = 'token:admin' WHERE seq = 2")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(verify(&w).await.0, 0);

    // ... deletes the denied request from the middle.
    let saved: (i64, i64, String, String, String, String, String, String) = sqlx::query_as(
        "SELECT seq, ts, actor, action, target, detail, prev_hash, hash FROM audit_log WHERE seq = 3",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM audit_log WHERE seq = 3")
        .execute(&pool)
        .await
        .unwrap();
    let (code, out) = verify(&w).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("row 3 is missing (deleted)"), "{out}");
    sqlx::query("INSERT INTO audit_log VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
        .bind(saved.0)
        .bind(saved.1)
        .bind(saved.2)
        .bind(saved.3)
        .bind(saved.4)
        .bind(saved.5)
        .bind(saved.6)
        .bind(saved.7)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(verify(&w).await.0, 0);

    // ... or the last row, which leaves a shorter chain that is intact
    // by itself: the head kept outside the database tells.
    sqlx::query("DELETE FROM audit_log WHERE seq = 5")
        .execute(&pool)
        .await
        .unwrap();
    let (code, out) = verify(&w).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("the log ends at row 4, but row 5 was written"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_made_once_listed_by_name_and_revoked() {
    let w = World::start(None, "").await;
    let (code, out, err) = w.cli(&["tokens", "create", "ci"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let token = out.lines().last().unwrap().trim().to_owned();
    assert!(token.starts_with("bs_"), "{out}");
    // It works, like any token.
    let http = reqwest::Client::new();
    let ok = http
        .get(format!("{}/api/v1/tasks", w.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let (code, listed, _) = w.cli(&["tokens", "ls"]).await;
    assert_eq!(code, 0);
    assert!(
        listed.contains("admin") && listed.contains("ci"),
        "{listed}"
    );
    assert!(!listed.contains(&token), "a token's value is listed");
    // Names are unique and well-formed.
    let (status, body) = w
        .api(
            reqwest::Method::POST,
            "/api/v1/tokens",
            Some(serde_json::json!({"name": "ci"})),
        )
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = w
        .api(
            reqwest::Method::POST,
            "/api/v1/tokens",
            Some(serde_json::json!({"name": "a b"})),
        )
        .await;
    assert_eq!(status, 400);
    // Revoked: refused from now on; the last token cannot go.
    let (code, out, err) = w.cli(&["tokens", "revoke", "ci"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let refused = http
        .get(format!("{}/api/v1/tasks", w.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let (status, body) = w
        .api(reqwest::Method::DELETE, "/api/v1/tokens/admin", None)
        .await;
    assert_eq!(status, 409, "{body}");
    let (_, audit, _) = w.cli(&["audit"]).await;
    assert!(
        audit.contains("token.create") && audit.contains("token.revoke"),
        "{audit}"
    );
}
