//! Event throughput: events durably stored per second through the event
//! hub (numbering, group commit, broadcast after the commit), with many
//! attempts writing at once, counted when the last one is stored; next to
//! raw sqlx in the same run writing the same rows with one commit per
//! event, on the same schema.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p backshift-server
//! --bench events -- --attempts 50 --events 2000`).
//!
//! "Durable" here is SQLite in WAL mode with `synchronous = NORMAL`: a
//! committed event survives the process being killed (kill -9) and a clean
//! reboot; a power cut may lose the last commits.

use backshift_core::Limits;
use backshift_protocol::{EventKind, now_ms};
use backshift_server::events::EventHub;
use backshift_store::{NewAttempt, NewTask, Store};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() {
    if let Err(e) = run() {
        eprintln!("events: {e}");
        std::process::exit(1);
    }
}

fn arg(name: &str, default: usize) -> BenchResult<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => Ok(args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{name} needs a positive number"))?),
        None => Ok(default),
    }
}

fn run() -> BenchResult<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    // Under `cargo test --benches` a tiny pass proves the harness works.
    let (attempts, per_attempt) = if bench {
        (arg("--attempts", 50)?, arg("--events", 2000)?)
    } else {
        (4, 10)
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let dir = tempfile::tempdir()?;
        let total = attempts * per_attempt;
        println!(
            "event throughput: {attempts} attempts x {per_attempt} events = {total}, SQLite (WAL, synchronous=NORMAL)"
        );
        let (store, ids) = setup(&dir.path().join("hub.db"), attempts).await?;
        let hub = Arc::new(EventHub::new(store.clone()));
        let took = timed(attempts, |i| {
            let hub = hub.clone();
            let id = ids[i].clone();
            async move {
                for n in 0..per_attempt {
                    hub.emit(&id, progress(n)).await?;
                }
                // Counted when stored, not when queued.
                hub.flush().await;
                Ok(())
            }
        })
        .await?;
        for id in &ids {
            let last = store.last_seq(id).await?;
            if last != per_attempt as u64 {
                return Err(format!("{id}: {last} events stored, {per_attempt} emitted").into());
            }
        }
        let hub_rate = total as f64 / took.as_secs_f64();
        // The baseline: the same schema (made by the store), written with
        // plain sqlx, one INSERT and one commit per event.
        let raw_path = dir.path().join("raw.db");
        let (_schema, raw_ids) = setup(&raw_path, attempts).await?;
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", raw_path.display()))?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        let raw_took = timed(attempts, |i| {
            let pool = pool.clone();
            let id = raw_ids[i].clone();
            async move {
                for n in 0..per_attempt {
                    let body = serde_json::to_string(&progress(n)).unwrap_or_default();
                    sqlx::query(
                        "INSERT INTO events (attempt_id, seq, ts, kind, body) VALUES (?, ?, ?, ?, ?)",
                    )
                    .bind(&id)
                    .bind(n as i64 + 1)
                    .bind(now_ms())
                    .bind("progress")
                    .bind(body)
                    .execute(&pool)
                    .await
                    .map_err(backshift_store::StoreError::from)?;
                }
                Ok(())
            }
        })
        .await?;
        let raw_rate = total as f64 / raw_took.as_secs_f64();
        println!(
            "{:<40} {:>14} {:>44} {:>7}",
            "measure", "events/s", "baseline", "ratio"
        );
        println!(
            "{:<40} {:>14.0} {:>44} {:>6.1}x",
            "event hub emit (group commit)",
            hub_rate,
            format!("sqlx insert + commit per event {raw_rate:.0}/s"),
            hub_rate / raw_rate
        );
        Ok(())
    })
}

async fn setup(path: &std::path::Path, attempts: usize) -> BenchResult<(Store, Vec<String>)> {
    let store = Store::open_sqlite(path).await?;
    let project = store.project_for_source("/bench", "bench", 1).await?;
    let new_attempts: Vec<NewAttempt> = (1..=attempts)
        .map(|n| NewAttempt {
            id: format!("benchmrk-{n}"),
            n: n as u32,
            branch: format!("backshift/bench-{n}"),
        })
        .collect();
    store
        .create_task(
            &NewTask {
                id: "benchmrk".into(),
                project_id: project,
                prompt: "bench".into(),
                repo: "/bench".into(),
                base_ref: None,
                agent: "builtin".into(),
                limits: Limits::default(),
                created_at: 1,
            },
            &new_attempts,
        )
        .await?;
    Ok((store, new_attempts.into_iter().map(|a| a.id).collect()))
}

/// Runs `work(i)` for every attempt at once; returns the wall time.
async fn timed<F, Fut>(attempts: usize, work: F) -> BenchResult<Duration>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), backshift_store::StoreError>> + Send + 'static,
{
    let start = Instant::now();
    let handles: Vec<_> = (0..attempts).map(|i| tokio::spawn(work(i))).collect();
    for h in handles {
        h.await??;
    }
    Ok(start.elapsed())
}

fn progress(n: usize) -> EventKind {
    EventKind::Progress {
        message: format!("step {n}: compiling crate number {n} of the workspace"),
    }
}
