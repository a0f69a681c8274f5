//! Event throughput: events durably stored per second through the event
//! hub (numbering, group commit, broadcast after the commit), with many
//! attempts writing at once, counted when the last one is stored; next to
//! raw sqlx in the same run writing the same rows with one commit per
//! event, on the same schema.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p backshift-server
//! --bench events -- --attempts 50 --events 2000`).
//!
//! Both databases: SQLite in WAL mode with `synchronous = NORMAL` (a
//! committed event survives kill -9 and a clean reboot; a power cut may
//! lose the last commits) and PostgreSQL with its default
//! `synchronous_commit = on` (commits are flushed to the WAL on disk). The
//! PostgreSQL run needs the server `cargo xtask setup` starts.

use backshift_core::Limits;
use backshift_protocol::{EventKind, now_ms};
use backshift_server::events::EventHub;
use backshift_store::{NewAttempt, NewTask, Store};
use sqlx::Executor;
use sqlx::any::AnyPoolOptions;
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
        println!("event throughput: {attempts} attempts x {per_attempt} events = {total}");
        println!(
            "{:<40} {:>12}   {:<44} {:>6}",
            "measure", "events/s", "baseline", "ratio"
        );
        let sqlite = |name: &str| format!("sqlite://{}?mode=rwc", dir.path().join(name).display());
        let sqlite_row =
            measure(&sqlite("hub.db"), &sqlite("raw.db"), attempts, per_attempt).await?;
        print_row("SQLite (WAL, synchronous=NORMAL)", sqlite_row);
        let hub_db = testkit::PgDatabase::create().await?;
        let raw_db = testkit::PgDatabase::create().await?;
        let pg_row = measure(&hub_db.url, &raw_db.url, attempts, per_attempt).await?;
        print_row("PostgreSQL 15 (synchronous_commit=on)", pg_row);
        Ok(())
    })
}

fn print_row(backend: &str, (hub, raw): (f64, f64)) {
    println!(
        "{:<40} {:>12.0}   {:<44} {:>5.1}x",
        format!("hub, {backend}"),
        hub,
        format!("sqlx insert + commit per event {raw:.0}/s"),
        hub / raw
    );
}

/// Events per second through the hub on `hub_url`, and with plain sqlx
/// (one INSERT and one commit per event) on `raw_url`, same schema.
async fn measure(
    hub_url: &str,
    raw_url: &str,
    attempts: usize,
    per_attempt: usize,
) -> BenchResult<(f64, f64)> {
    let total = (attempts * per_attempt) as f64;
    let (store, ids) = setup(hub_url, attempts).await?;
    let hub = Arc::new(EventHub::new(store.clone(), "bench"));
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

    // The baseline: the schema made by the store, rows written with plain
    // sqlx under the same durability settings.
    let (_schema, raw_ids) = setup(raw_url, attempts).await?;
    let sqlite = raw_url.starts_with("sqlite:");
    let pool = AnyPoolOptions::new()
        .max_connections(8)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if sqlite {
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    conn.execute("PRAGMA busy_timeout = 30000").await?;
                }
                Ok(())
            })
        })
        .connect(raw_url)
        .await?;
    let raw_took = timed(attempts, |i| {
        let pool = pool.clone();
        let id = raw_ids[i].clone();
        async move {
            for n in 0..per_attempt {
                let body = serde_json::to_string(&progress(n)).unwrap_or_default();
                sqlx::query(
                    "INSERT INTO events (attempt_id, seq, ts, kind, body) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(id.as_str())
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
    Ok((total / took.as_secs_f64(), total / raw_took.as_secs_f64()))
}

async fn setup(url: &str, attempts: usize) -> BenchResult<(Store, Vec<String>)> {
    let store = Store::open(url).await?;
    let project = store.project_for_source("/bench", "bench", 1).await?;
    let new_attempts: Vec<NewAttempt> = (1..=attempts)
        .map(|n| NewAttempt {
            agent: None,
            id: format!("benchmrk-{n}"),
            n: n as u32,
            branch: format!("backshift/bench-{n}"),
        })
        .collect();
    store
        .create_task(
            &NewTask {
                origin: None,
                command: None,
                verify: None,
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
