//! How long an installed agent takes to be ready for its prompt: from the
//! attempt entering `running` to its `agent_session` event (backshift
//! writes the agent's config, starts it through the shim, and opens an
//! ACP session: `initialize` then `session/new`). Beside it, in the same
//! run, the raw baseline: the same agent with the same launch (argv,
//! environment, config) started by a script inside a container of the
//! same image with the same limits, in a one-commit git checkout,
//! timing its own `initialize` and `session/new` exchange over a pipe (no
//! shim, no events, no docker exec in the measure).
//!
//! Run with `cargo xtask bench` (or `cargo bench -p backshift --bench
//! agent_start -- --starts 10`). Needs dockerd, the default image and the
//! tests' agents (`cargo xtask setup`).

mod support;

use backshift_server::agents;
use fake_model::FakeModel;
use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{BenchResult, get, median, start_server, token, ts_ms};

fn main() {
    support::main("agent_start", run());
}

/// Starts the agent with `argv` and times `initialize` + `session/new`,
/// printing milliseconds.
const PROBE: &str = r#"
import json, os, subprocess, sys, time
argv, work = json.loads(sys.argv[1]), sys.argv[2]
# A checkout like the sandbox's: a one-commit git repository.
os.makedirs(work)
open(os.path.join(work, "README.md"), "w").write("bench\n")
subprocess.run("git init -q -b main && git add . && git -c user.name=b -c user.email=b@example.invalid commit -qm init",
               shell=True, cwd=work, check=True)
t = time.monotonic()
p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=work)
def send(i, method, params):
    p.stdin.write((json.dumps({"jsonrpc": "2.0", "id": i, "method": method, "params": params}) + "\n").encode())
    p.stdin.flush()
def wait(i):
    for line in p.stdout:
        m = json.loads(line)
        if m.get("id") == i and "method" not in m:
            return m
    sys.exit("the agent exited")
send(1, "initialize", {"protocolVersion": 1, "clientCapabilities": {}})
wait(1)
send(2, "session/new", {"cwd": work, "mcpServers": []})
r = wait(2)
print("%.1f" % ((time.monotonic() - t) * 1000))
p.kill()
"#;

async fn run() -> BenchResult<()> {
    let n = support::count_arg("--starts", 1, 5)?;
    let agents_dir = std::path::PathBuf::from(testkit::AGENTS_DIR);
    let installed = agents::installed(&agents_dir);
    if installed.is_empty() {
        return Err(format!(
            "no agents in {}: run `cargo xtask setup`",
            agents_dir.display()
        )
        .into());
    }
    println!("agent_start: {n} starts per agent, each way");
    println!(
        "{:<14} {:>14}   {:<34} {:>7}",
        "agent", "ready p50", "baseline p50", "ratio"
    );
    for agent in &installed {
        let name = agent.manifest.name.as_str();
        let steps: Vec<Value> = (0..n)
            .map(|_| json!({"reply": {"content": "ok"}}))
            .collect();
        let fake = FakeModel::start(serde_json::from_value(json!({
            "steps": steps, "untooled": {"content": "title"}
        }))?)
        .await?;
        let url_of_fake = fake.base_url();
        let root = url_of_fake.trim_end_matches("/v1");
        let (dir, repo, config) = support::bench_setup(
            &url_of_fake,
            &format!("agents_dir = \"{}\"", agents_dir.display()),
        )?;
        // Every model API the agents speak goes to the scripted model.
        let mut text = std::fs::read_to_string(&config)?;
        text.push_str(&format!(
            "anthropic_base_url = \"{url_of_fake}\"\ngemini_base_url = \"{root}\"\n"
        ));
        std::fs::write(&config, text)?;
        let (_server, url) = start_server(dir.path(), &config)?;
        let token = token(dir.path(), &url)?;
        let http = reqwest::Client::new();
        let mut ours = Vec::new();
        for _ in 0..n {
            let task = support::submit(
                &http,
                &url,
                &token,
                json!({"prompt": "say ok", "repo": repo, "agent": name}),
            )
            .await?;
            let started = Instant::now();
            let events = loop {
                let evs = get(
                    &http,
                    &format!("{url}/api/v1/attempts/{task}-1/events?limit=1000"),
                    &token,
                )
                .await?;
                let done = evs.as_array().into_iter().flatten().any(|e| {
                    e["type"] == "state_changed"
                        && ["succeeded", "failed", "cancelled", "timed_out"]
                            .contains(&e["to"].as_str().unwrap_or(""))
                });
                if done {
                    break evs;
                }
                if started.elapsed() > Duration::from_secs(300) {
                    return Err(format!("{name}'s task did not end in 5 minutes").into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let events = events.as_array().cloned().unwrap_or_default();
            let running = events
                .iter()
                .find(|e| e["type"] == "state_changed" && e["to"] == "running")
                .ok_or("no running state")?;
            let session = events
                .iter()
                .find(|e| e["type"] == "agent_session")
                .ok_or_else(|| format!("{name} opened no session: {events:?}"))?;
            ours.push(ts_ms(session)? - ts_ms(running)?);
        }
        let mut base = baseline(agent, n)?;
        let (ours, base) = (median(&mut ours), median(&mut base));
        println!(
            "{:<14} {:>14}   {:<34} {:>6.2}x",
            name,
            format!("{ours:.0} ms"),
            format!("same launch, piped, raw {base:.0} ms"),
            ours / base
        );
    }
    Ok(())
}

/// `n` raw starts of `agent` in one container of the default image, with
/// the launch backshift uses (config written to a directory mounted where
/// the shim directory would be).
fn baseline(agent: &agents::Installed, n: usize) -> BenchResult<Vec<f64>> {
    let run_dir = tempfile::tempdir()?;
    let (argv, env) = agents::launch(
        agent,
        run_dir.path(),
        &agents::AgentSetup {
            model: "scripted",
            anthropic_model: "scripted",
            gemini_model: "scripted",
            ask: &[],
        },
    )?;
    std::fs::write(run_dir.path().join("probe.py"), PROBE)?;
    let image = backshift_server::config::Config::default().image();
    let name = format!("backshift-bench-agent-{}", std::process::id());
    let mut create = Command::new("docker");
    create.args(["run", "-d", "--rm", "--name", &name, "--network", "none"]);
    // The limits of a default sandbox.
    let limits = backshift_server::config::Config::default().sandbox;
    create.args(["--cpus", &limits.cpus.to_string()]);
    create.args(["--memory", &format!("{}m", limits.memory_mb)]);
    create.args(["--pids-limit", &limits.pids.to_string()]);
    create.args(["-u", "1000:1000", "-e", "HOME=/tmp"]);
    create.args(["-e", "OPENAI_BASE_URL=http://127.0.0.1:9/v1"]);
    create.args(["-e", "OPENAI_API_KEY=unused"]);
    let path = format!("{}:/usr/local/bin:/usr/bin:/bin", agent.sandbox_bin_dir());
    create.args(["-e", &format!("PATH={path}")]);
    for (k, v) in &env {
        create.args(["-e", &format!("{k}={v}")]);
    }
    create.args([
        "-v",
        &format!("{}:{}:ro", agent.dir.display(), agent.sandbox_dir()),
        "-v",
        &format!("{}:/.backshift/run:ro", run_dir.path().display()),
        "--tmpfs",
        "/workspace:uid=1000",
        &image,
        "sleep",
        "infinity",
    ]);
    let out = create.output()?;
    if !out.status.success() {
        return Err(format!(
            "cannot start the baseline container: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    let mut samples = Vec::new();
    let result = (|| -> BenchResult<()> {
        for i in 0..n {
            // A fresh home each time, as each sandbox has.
            let out = Command::new("docker")
                .args(["exec", "-e", &format!("HOME=/tmp/h{i}"), &name])
                .args([
                    "python3",
                    "/.backshift/run/probe.py",
                    &serde_json::to_string(&argv)?,
                ])
                .arg(format!("/workspace/w{i}"))
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            samples.push(text.trim().parse::<f64>().map_err(|_| {
                format!(
                    "the raw start printed {text:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?);
        }
        Ok(())
    })();
    let _ = Command::new("docker").args(["rm", "-f", &name]).output();
    result.map(|()| samples)
}
