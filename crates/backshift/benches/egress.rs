//! Egress proxy overhead: the time of one HTTP request made with curl
//! inside a sandbox, through the shim's forward and the egress proxy
//! (policy decided, name resolved and checked, decision recorded as an
//! event and an audit row), next to the same curl request made on the
//! host straight to the same target, in the same run. The target is a
//! small HTTP server in a container on a Docker network the bench
//! creates. curl's own `time_total` is the measure on both sides.
//!
//! Run with `cargo xtask bench` (or `cargo bench -p backshift --bench
//! egress -- --requests 200`). Needs dockerd and the default image.

mod support;

use serde_json::json;
use std::process::Command;
use support::BenchResult;

fn main() {
    support::main("egress", run());
}

fn docker(args: &[&str]) -> BenchResult<String> {
    let out = Command::new("docker")
        .args(args)
        .env("DOCKER_API_VERSION", "1.41")
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The target container and its network, removed on drop.
struct Target {
    name: String,
    net: String,
    ip: String,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.name]);
        let _ = docker(&["network", "rm", &self.net]);
    }
}

fn target() -> BenchResult<Target> {
    let tag = std::process::id();
    let net = format!("bs-bench-egress-{tag}");
    let name = format!("bs-bench-egress-target-{tag}");
    docker(&["network", "create", &net])?;
    let image = backshift_sandbox::image::default_image_tag();
    let started = docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &net,
        &image,
        "sh",
        "-c",
        "mkdir -p /w && cd /w && echo ok > index.html && exec python3 -m http.server 80",
    ]);
    let mut t = Target {
        ip: String::new(),
        name: name.clone(),
        net,
    };
    started?;
    t.ip = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &name,
    ])?;
    Ok(t)
}

async fn run() -> BenchResult<()> {
    let n = support::count_arg("--requests", 3, 200)?;
    let t = target()?;
    // Wait until it answers.
    for _ in 0..100 {
        let ok = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-m",
                "1",
                "--noproxy",
                "*",
                &format!("http://{}/", t.ip),
            ])
            .status()?
            .success();
        if ok {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let extra = format!(
        "[egress]\nallow_networks = [\"{ip}/32\"]\nhosts = {{ \"target.bench.invalid\" = \"{ip}\" }}\n[[egress.rules]]\nhost = \"target.bench.invalid\"\naction = \"allow\"\n",
        ip = t.ip
    );
    // No model: the tasks are command agents.
    let support::Served {
        repo,
        url,
        token,
        http,
        ..
    } = &support::serve("http://127.0.0.1:9/v1", &extra)?;

    println!("egress: {n} sequential requests each way");
    let script = format!(
        "for i in $(seq 1 {n}); do curl -s -o /dev/null -w '%{{time_total}}\\n' http://target.bench.invalid/; done"
    );
    let task = support::submit(
        http,
        url,
        token,
        json!({"prompt": "fetch", "repo": repo, "command": script}),
    )
    .await?;
    let output = support::stdout_of(http, url, token, &task).await?;
    let host_loop = format!(
        "for i in $(seq 1 {n}); do curl -s -o /dev/null --noproxy '*' -w '%{{time_total}}\\n' http://{}/; done",
        t.ip
    );
    support::compare_with_host(
        "HTTP GET through the egress proxy",
        "egress proxy",
        n,
        &output,
        &host_loop,
    )?;
    Ok(())
}
