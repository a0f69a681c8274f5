//! Chaos: twenty tasks work while the server is killed with SIGKILL at
//! random moments five times and restarted. Every task ends in the state
//! its script implies, every attempt's event log is gapless without
//! duplicates, and no sandbox is left behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, script};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;
use testkit::docker;

/// Six turns with short commands and files in between. Tasks submitted
/// with `--max-turns 3` cannot finish: they must end `failed(max_turns)`.
fn working_script() -> fake_model::Script {
    let mut steps = Vec::new();
    for i in 1..=5 {
        steps.push(json!({"reply": {"tool_calls": [
            {"name": "write_file", "arguments": {"path": format!("step{i}.txt"), "content": format!("step {i}\n")}},
            {"name": "run_command", "arguments": {"command": format!("sleep 0.{i}; cat step{i}.txt")}}
        ]}}));
    }
    steps.push(json!({"reply": {"tool_calls": [
        {"name": "finish", "arguments": {"summary": "Five steps"}}
    ]}}));
    script(json!({"mode": "turn", "steps": steps}))
}

/// A small deterministic generator; the seed is printed so that a failing
/// run can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_tasks_survive_five_sigkills() {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("chaos seed {seed} (set CHAOS_SEED to replay)");
    let mut rng = Lcg(seed);
    let mut w = World::start(Some(working_script()), "max_concurrent_attempts = 6\n").await;
    let repo = w.repo.to_string_lossy().into_owned();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let short = i % 5 == 4;
        let mut args = vec!["run", "Work in five steps", "--repo", &repo];
        if short {
            args.extend(["--max-turns", "3"]);
        }
        let (code, out, err) = w.cli(&args).await;
        assert_eq!(code, 0, "{out}{err}");
        let id = out.split_whitespace().nth(1).unwrap().to_owned();
        tasks.push((id, short));
    }
    for kill in 1..=5 {
        tokio::time::sleep(Duration::from_millis(800 + rng.next(3000))).await;
        w.kill_server().await;
        println!("kill {kill}");
        tokio::time::sleep(Duration::from_millis(rng.next(500))).await;
        w.restart_server().await;
    }

    let mut recovered = 0;
    for (task, short) in &tasks {
        let view = w.wait(task).await;
        let a = &view["attempts"][0];
        if *short {
            assert_eq!(
                (a["state"].as_str(), a["reason"].as_str()),
                (Some("failed"), Some("max_turns")),
                "seed {seed}: {view}"
            );
        } else {
            assert_eq!(a["state"], "succeeded", "seed {seed}: {view}");
            let (_, diff, _) = w.cli(&["diff", task]).await;
            for i in 1..=5 {
                assert!(diff.contains(&format!("+step {i}")), "seed {seed}: {diff}");
            }
        }
        let attempt = a["id"].as_str().unwrap();
        let (_, evs) = w
            .api(
                Method::GET,
                &format!("/api/v1/attempts/{attempt}/events?limit=10000"),
                None,
            )
            .await;
        let evs: &Vec<Value> = evs.as_array().unwrap();
        for (i, e) in evs.iter().enumerate() {
            assert_eq!(e["seq"], i as u64 + 1, "seed {seed}: {attempt} gapless");
        }
        recovered += evs.iter().filter(|e| e["type"] == "restored").count();
    }
    let fake = w.fake.as_ref().unwrap();
    assert!(
        fake.failures().is_empty(),
        "seed {seed}: {:?}",
        fake.failures()
    );
    assert!(
        recovered >= 5,
        "seed {seed}: only {recovered} attempts were interrupted; the chaos did not bite"
    );
    println!("{recovered} recoveries");
    for (task, _) in &tasks {
        let left = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=dev.backshift.task={task}"),
        ])
        .unwrap();
        assert_eq!(
            left.trim(),
            "",
            "seed {seed}: sandbox of {task} left behind"
        );
    }
}
