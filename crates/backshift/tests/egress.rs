//! The fence, tested from inside a real sandbox: the only way out is the
//! egress proxy, which follows the policy. Every destination here is one
//! the test created (containers on Docker networks of its own, one of them
//! holding 169.254.169.254, one an IPv6 address of its own; names under
//! `.invalid`), and each is first shown to be live from the host, so a
//! failure from the sandbox means the fence held, not that nothing was
//! there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, docker, docker_quiet};
use serde_json::Value;
use std::process::Command;

/// Containers and networks this test owns, removed when it ends (and, by
/// label, when a crashed earlier run left them).
struct Targets {
    label: String,
    allowed: String,
    forbidden: String,
    /// The forbidden target's own IPv6 address.
    v6: String,
    /// A UDP listener on port 53 that logs every datagram (a resolver the
    /// sandbox must not reach).
    resolver: String,
    names: Vec<String>,
}

fn sweep(label: &str) {
    let filter = format!("label={label}");
    let ids = docker(&["ps", "-aq", "--filter", &filter]);
    for id in ids.split_whitespace() {
        docker_quiet(&["rm", "-f", id]);
    }
    let nets = docker(&["network", "ls", "-q", "--filter", &filter]);
    for id in nets.split_whitespace() {
        docker_quiet(&["network", "rm", id]);
    }
}

impl Drop for Targets {
    fn drop(&mut self) {
        sweep(&self.label);
    }
}

const HTTP_SERVER: &str = "mkdir -p /w && cd /w && printf %s \"$BODY\" > index.html && exec python3 -u -m http.server --bind :: 80";
const UDP_LOGGER: &str = "exec python3 -u -c 'import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind((\"0.0.0.0\",53))\nwhile True:\n d,a=s.recvfrom(4096)\n print(\"datagram\",a[0],d[:40],flush=True)'";

impl Targets {
    fn start() -> Targets {
        let label = "dev.backshift.test=egress-escape".to_owned();
        sweep(&label);
        let image = backshift_sandbox::image::default_image_tag();
        let tag = format!("{:x}", std::process::id() & 0xffff);
        let net = format!("bs-escape-{tag}");
        let meta_net = format!("bs-escape-meta-{tag}");
        docker(&[
            "network",
            "create",
            "--label",
            &label,
            "--ipv6",
            "--subnet",
            &format!("fd5b:b5e1:{tag}::/64"),
            &net,
        ]);
        docker(&[
            "network",
            "create",
            "--label",
            &label,
            "--subnet",
            "169.254.169.0/24",
            "--gateway",
            "169.254.169.1",
            &meta_net,
        ]);
        let run = |name: &str, network: &str, ip: Option<&str>, body: &str, cmd: &str| {
            let mut args = vec![
                "run",
                "-d",
                "--label",
                &label,
                "--name",
                name,
                "--network",
                network,
                "-e",
            ];
            let body = format!("BODY={body}");
            args.push(&body);
            if let Some(ip) = ip {
                args.extend(["--ip", ip]);
            }
            args.extend([image.as_str(), "sh", "-c", cmd]);
            docker(&args);
        };
        let names = [
            format!("bs-escape-allowed-{tag}"),
            format!("bs-escape-forbidden-{tag}"),
            format!("bs-escape-resolver-{tag}"),
            format!("bs-escape-metadata-{tag}"),
        ];
        run(&names[0], &net, None, "allowed-target", HTTP_SERVER);
        run(&names[1], &net, None, "forbidden-target", HTTP_SERVER);
        run(&names[2], &net, None, "", UDP_LOGGER);
        run(
            &names[3],
            &meta_net,
            Some("169.254.169.254"),
            "metadata-target",
            HTTP_SERVER,
        );
        let ip = |name: &str, field: &str| {
            docker(&[
                "inspect",
                "-f",
                &format!("{{{{range .NetworkSettings.Networks}}}}{{{{.{field}}}}}{{{{end}}}}"),
                name,
            ])
        };
        Targets {
            allowed: ip(&names[0], "IPAddress"),
            forbidden: ip(&names[1], "IPAddress"),
            v6: ip(&names[1], "GlobalIPv6Address"),
            resolver: ip(&names[2], "IPAddress"),
            names: names.to_vec(),
            label,
        }
    }

    fn logs(&self, i: usize) -> String {
        let out = Command::new("docker")
            .args(["logs", &self.names[i]])
            .env("DOCKER_API_VERSION", "1.41")
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// Fetches `url` from the host (curl, no proxy), retrying while the
/// target's server starts.
async fn from_host(url: &str) -> String {
    for _ in 0..50 {
        let out = tokio::process::Command::new("curl")
            .args(["-s", "-m", "2", "--noproxy", "*", "-g", url])
            .output()
            .await
            .unwrap();
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).to_string();
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    panic!("the test's own target {url} does not answer from the host");
}

/// What the probe does inside the sandbox: each line of its output is one
/// JSON result.
const PROBE: &str = r#"
import json, os, socket, subprocess, sys
allowed, forbidden, v6, resolver, server_port = sys.argv[1:6]
def out(name, **kv):
    print(json.dumps(dict(probe=name, **kv)), flush=True)
def curl(name, *args):
    p = subprocess.run(["curl", "-s", "-m", "5", "-g", "-w", "\n%{http_code} %{http_connect}"] + list(args), capture_output=True, text=True)
    body, _, codes = p.stdout.rpartition("\n")
    code, _, connect = codes.partition(" ")
    out(name, code=code, connect=connect, body=body, exit=p.returncode, err=p.stderr[-300:])
def connect(name, family, addr):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect(addr)
        out(name, connected=True)
    except OSError as e:
        out(name, connected=False, error=str(e))
curl("allowed_http", "http://allowed.backshift-test.invalid/")
curl("allowed_tunnel", "-p", "http://allowed.backshift-test.invalid/")
curl("forbidden_http", "http://forbidden.backshift-test.invalid/")
curl("forbidden_tunnel", "-p", "http://forbidden.backshift-test.invalid/")
curl("allowed_by_ip", "http://%s/" % allowed)
curl("metadata_by_allowed_name", "http://metadata.backshift-test.invalid/latest/meta-data/")
curl("metadata_by_ip", "http://169.254.169.254/latest/meta-data/")
curl("v6_by_proxy", "http://[%s]/" % v6)
curl("no_proxy_bypass", "--noproxy", "*", "http://%s/" % allowed)
curl("host_loopback_via_proxy", "--noproxy", "", "-x", "http://127.0.0.1:47012", "http://127.0.0.1:%s/healthz" % server_port)
curl("loopback_by_allowed_name", "http://loopback.backshift-test.invalid:%s/healthz" % server_port)
curl("host_loopback_direct", "http://127.0.0.1:%s/healthz" % server_port)
connect("direct_allowed", socket.AF_INET, (allowed, 80))
connect("direct_forbidden", socket.AF_INET, (forbidden, 80))
connect("direct_metadata", socket.AF_INET, ("169.254.169.254", 80))
connect("direct_v6", socket.AF_INET6, (v6, 80, 0, 0))
try:
    out("resolve", addrs=[a[4][0] for a in socket.getaddrinfo("exfil.backshift-test.invalid", 80)])
except OSError as e:
    out("resolve", addrs=[], error=str(e))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    u.sendto(b"\x12\x34 exfil query", (resolver, 53))
    out("dns_datagram", sent=True)
except OSError as e:
    out("dns_datagram", sent=False, error=str(e))
routes = [l.split()[:3] for l in open("/proc/net/route").read().splitlines()[1:]]
routes6 = [l.split()[-1] for l in open("/proc/net/ipv6_route").read().splitlines()]
ifaces = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
addrs6 = [l.split()[-1] for l in open("/proc/net/if_inet6").read().splitlines()]
out("structure", routes=routes, routes6=sorted(set(routes6)), ifaces=ifaces, addrs6=addrs6, resolv=open("/etc/resolv.conf").read() if os.path.exists("/etc/resolv.conf") else "")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_reaches_only_what_the_policy_allows_through_the_proxy() {
    let t = Targets::start();
    // Every target is live: what fails from the sandbox fails because of
    // the fence.
    assert_eq!(
        from_host(&format!("http://{}/", t.allowed)).await,
        "allowed-target"
    );
    assert_eq!(
        from_host(&format!("http://{}/", t.forbidden)).await,
        "forbidden-target"
    );
    assert_eq!(
        from_host(&format!("http://[{}]/", t.v6)).await,
        "forbidden-target"
    );
    let route = String::from_utf8(
        Command::new("ip")
            .args(["route", "get", "169.254.169.254"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        route.contains("src 169.254.169.1"),
        "169.254.169.254 must be the test's own container: {route}"
    );
    assert_eq!(
        from_host("http://169.254.169.254/").await,
        "metadata-target"
    );
    let udp = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    udp.send_to(b"control", (t.resolver.as_str(), 53)).unwrap();
    for _ in 0..50 {
        if t.logs(2).contains("b'control'") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        t.logs(2).contains("b'control'"),
        "the test's resolver is live: {}",
        t.logs(2)
    );
    let host_requests = |i: usize| t.logs(i).matches("\"GET /").count();
    let forbidden_before = host_requests(1);
    let metadata_before = host_requests(3);

    let config = format!(
        r#"
[egress]
allow_networks = ["{allowed}/32"]
hosts = {{ "allowed.backshift-test.invalid" = "{allowed}", "forbidden.backshift-test.invalid" = "{forbidden}", "metadata.backshift-test.invalid" = "169.254.169.254", "loopback.backshift-test.invalid" = "127.0.0.1" }}

[[egress.rules]]
host = "*.backshift-test.invalid"
action = "allow"

[[egress.rules]]
host = "forbidden.backshift-test.invalid"
action = "deny"
"#,
        allowed = t.allowed,
        forbidden = t.forbidden
    );
    let w = World::start(None, &config).await;
    std::fs::write(w.repo.join("probe.py"), PROBE).unwrap();
    common::sh(&w.repo, "git add probe.py && git commit -qm probe").await;
    // The server's own port on the host's loopback: the API, which a
    // sandbox must not reach by any way.
    let server_port = w
        .url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_owned();
    let command = format!(
        "python3 probe.py {} {} {} {} {server_port}",
        t.allowed, t.forbidden, t.v6, t.resolver
    );
    let (task, view) = w
        .run_task("Probe the fence", &["--command", &command])
        .await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let evs = w.events(&format!("{task}-1")).await;
    let results: Vec<Value> = common::command_output(&evs)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let probe = |name: &str| {
        results
            .iter()
            .find(|r| r["probe"] == name)
            .unwrap_or_else(|| panic!("no {name} in {results:?}"))
            .clone()
    };

    // The allowed host works, plain and through a tunnel.
    for name in ["allowed_http", "allowed_tunnel"] {
        let r = probe(name);
        assert_eq!(
            (r["code"].as_str(), r["body"].as_str()),
            (Some("200"), Some("allowed-target")),
            "{r}"
        );
    }
    // The forbidden one gets the deny response, which says why.
    let r = probe("forbidden_http");
    assert_eq!(r["code"], "403", "{r}");
    let body = r["body"].as_str().unwrap();
    assert!(
        body.contains("refused: denied by deny forbidden.backshift-test.invalid (server rule 2)"),
        "{body}"
    );
    assert!(body.contains("Do not retry"), "{body}");
    let r = probe("forbidden_tunnel");
    assert_eq!(r["connect"], "403", "the tunnel is refused: {r}");
    // An IP address is not a name any rule allows; a name that is allowed
    // but points at the metadata address is refused after resolution.
    assert_eq!(probe("allowed_by_ip")["code"], "403");
    let r = probe("metadata_by_allowed_name");
    assert_eq!(r["code"], "403", "{r}");
    assert!(r["body"].as_str().unwrap().contains("link-local"), "{r}");
    assert_eq!(probe("metadata_by_ip")["code"], "403");
    assert_eq!(probe("v6_by_proxy")["code"], "403");
    // The host's own services (backshift's API on loopback): refused by
    // the proxy, by address or by name, and unreachable directly (the
    // sandbox's loopback is its own).
    assert_eq!(probe("host_loopback_via_proxy")["code"], "403");
    let r = probe("loopback_by_allowed_name");
    assert_eq!(r["code"], "403", "{r}");
    assert!(
        r["body"].as_str().unwrap().contains("the host's loopback"),
        "{r}"
    );
    assert_eq!(probe("host_loopback_direct")["code"], "000");
    // Nothing but the proxy: no direct connection, by IPv4 or IPv6, to
    // any target, and no resolver.
    let r = probe("no_proxy_bypass");
    assert_eq!(r["code"], "000", "{r}");
    for name in [
        "direct_allowed",
        "direct_forbidden",
        "direct_metadata",
        "direct_v6",
    ] {
        let r = probe(name);
        assert_eq!(r["connected"], false, "{r}");
        // No route (IPv4), or not even a source address (IPv6).
        let error = r["error"].as_str().unwrap();
        assert!(
            error.contains("Network is unreachable")
                || error.contains("Cannot assign requested address"),
            "{r}"
        );
    }
    let r = probe("resolve");
    assert_eq!(r["addrs"], serde_json::json!([]), "{r}");
    assert_eq!(probe("dns_datagram")["sent"], false);
    // The structural facts: loopback only, no route at all.
    let s = probe("structure");
    assert_eq!(s["ifaces"], serde_json::json!(["lo"]), "{s}");
    assert_eq!(s["routes"], serde_json::json!([]), "{s}");
    assert!(
        s["routes6"].as_array().unwrap().iter().all(|d| d == "lo"),
        "{s}"
    );
    assert_eq!(
        s["addrs6"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| *d != "lo")
            .count(),
        0,
        "{s}"
    );

    // The forbidden targets heard nothing from the sandbox.
    assert_eq!(host_requests(1), forbidden_before, "{}", t.logs(1));
    assert_eq!(host_requests(3), metadata_before, "{}", t.logs(3));
    assert!(!t.logs(2).contains("exfil"), "{}", t.logs(2));

    // Every decision is on the record.
    let egress: Vec<&Value> = evs.iter().filter(|e| e["type"] == "egress").collect();
    let find = |host: &str, decision: &str, tunnel: bool| {
        egress
            .iter()
            .find(|e| {
                e["host"] == host && e["decision"] == decision && e["method"].is_null() == tunnel
            })
            .unwrap_or_else(|| {
                panic!("no {decision} egress to {host} (tunnel: {tunnel}) in {egress:?}")
            })
    };
    let e = find("allowed.backshift-test.invalid", "allowed", false);
    assert_eq!(e["method"], "GET");
    assert_eq!(e["rule"], "allow *.backshift-test.invalid (server rule 1)");
    assert_eq!(e["address"], format!("{}:80", t.allowed));
    find("allowed.backshift-test.invalid", "allowed", true);
    let e = find("forbidden.backshift-test.invalid", "denied", false);
    assert_eq!(
        e["rule"],
        "deny forbidden.backshift-test.invalid (server rule 2)"
    );
    find("forbidden.backshift-test.invalid", "denied", true);
    let e = find(&t.allowed, "denied", false);
    assert!(
        e["rule"].is_null()
            && e["reason"]
                .as_str()
                .unwrap()
                .contains("the default is deny"),
        "{e}"
    );
    let e = find("metadata.backshift-test.invalid", "failed", false);
    assert!(
        e["reason"]
            .as_str()
            .unwrap()
            .contains("never reachable from a sandbox"),
        "{e}"
    );
    find(&t.v6, "denied", false);
    // The human log shows them too.
    let (_, logs, _) = w.cli(&["logs", &task]).await;
    assert!(
        logs.contains("⇄ egress GET http://forbidden.backshift-test.invalid:80/: denied"),
        "{logs}"
    );
}

/// One HTTP target on a network of the test's own.
struct Target {
    label: String,
    ip: String,
}

impl Drop for Target {
    fn drop(&mut self) {
        sweep(&self.label);
    }
}

impl Target {
    fn start(label: &str, body: &str) -> Target {
        let label = label.to_owned();
        sweep(&label);
        // Unique per test (tests may share a process) and per run.
        let tag = format!(
            "{}-{:x}",
            label.rsplit('=').next().unwrap_or("t"),
            std::process::id() & 0xffff
        );
        let net = format!("bs-{tag}");
        docker(&["network", "create", "--label", &label, &net]);
        let name = format!("bs-{tag}-target");
        let image = backshift_sandbox::image::default_image_tag();
        let body = format!("BODY={body}");
        docker(&[
            "run",
            "-d",
            "--label",
            &label,
            "--name",
            &name,
            "--network",
            &net,
            "-e",
            &body,
            &image,
            "sh",
            "-c",
            HTTP_SERVER,
        ]);
        let ip = docker(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &name,
        ]);
        Target { label, ip }
    }
}

/// The first pending approval whose summary mentions `host`, once the
/// attempt shows `waiting_approval`.
async fn pending_for(w: &World, attempt: &str, host: &str) -> Value {
    for _ in 0..300 {
        let (_, list) = w.api(reqwest::Method::GET, "/api/v1/approvals", None).await;
        if let Some(a) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["summary"].as_str().unwrap().contains(host))
        {
            let (_, view) = w
                .api(
                    reqwest::Method::GET,
                    &format!("/api/v1/attempts/{attempt}"),
                    None,
                )
                .await;
            if view["state"] == "waiting_approval" {
                return a.clone();
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("no pending approval for {host}");
}

const ASKER: &str = r#"
for host in asked asked asked unanswered refused; do
  printf '%s %s\n' "$host" "$(curl -s -m 60 -w ' %{http_code}' http://$host.backshift-test.invalid/ | tr '\n' ' ')"
done
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_rule_holds_the_request_until_a_person_answers_or_time_runs_out() {
    let t = Target::start("dev.backshift.test=egress-ask", "asked-target");
    assert_eq!(
        from_host(&format!("http://{}/", t.ip)).await,
        "asked-target"
    );
    let config = format!(
        r#"
[approvals]
timeout_secs = 4

[egress]
allow_networks = ["{ip}/32"]
hosts = {{ "asked.backshift-test.invalid" = "{ip}", "unanswered.backshift-test.invalid" = "{ip}", "refused.backshift-test.invalid" = "{ip}" }}

[[egress.rules]]
host = "*.backshift-test.invalid"
action = "ask"
"#,
        ip = t.ip
    );
    let w = World::start(None, &config).await;
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, out, err) = w
        .cli(&[
            "run",
            "Ask for the network",
            "--repo",
            &repo,
            "--command",
            ASKER,
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let attempt = format!("{task}-1");

    // Held: the attempt waits for a person; the CLI lists it.
    let first = pending_for(&w, &attempt, "asked.").await;
    let id = first["id"].as_str().unwrap().to_owned();
    assert_eq!(first["kind"], "egress");
    assert_eq!(
        first["summary"],
        "GET http://asked.backshift-test.invalid:80/"
    );
    assert_eq!(first["subject"]["host"], "asked.backshift-test.invalid");
    let (code, listed, _) = w.cli(&["approvals"]).await;
    assert_eq!(code, 0);
    assert!(
        listed.contains(&id) && listed.contains("pending until"),
        "{listed}"
    );
    let (_, shown, _) = w.cli(&["show", &task]).await;
    assert!(
        shown.contains(&format!(
            "waiting  {id}: GET http://asked.backshift-test.invalid:80/"
        )),
        "{shown}"
    );
    // Approved once: the held request completes.
    let (code, out, err) = w.cli(&["approve", &id, "--reason", "docs fetch"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("approved (once) by"), "{out}");
    // Answered once only.
    let (code, _, err) = w.cli(&["deny", &id]).await;
    assert_ne!(code, 0);
    assert!(err.contains("is approved already"), "{err}");

    // Asked again (once was once); approved for the task this time.
    let second = pending_for(&w, &attempt, "asked.").await;
    assert_ne!(second["id"], first["id"]);
    let (code, out, err) = w
        .cli(&["approve", second["id"].as_str().unwrap(), "--for", "task"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    // The third request is covered by that grant: no approval is asked.
    // The fourth is never answered and is denied at the timeout.
    let unanswered = pending_for(&w, &attempt, "unanswered.").await;
    // The fifth is denied by a person, with a reason.
    let refused = pending_for(&w, &attempt, "refused.").await;
    let (code, out, err) = w
        .cli(&[
            "deny",
            refused["id"].as_str().unwrap(),
            "--reason",
            "not for this task",
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");

    let view = w.wait(&task).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let evs = w.events(&attempt).await;
    let output = common::command_output(&evs);
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines[0], "asked asked-target 200", "{output}");
    assert_eq!(lines[1], "asked asked-target 200", "{output}");
    assert_eq!(lines[2], "asked asked-target 200", "{output}");
    assert!(
        lines[3].starts_with("unanswered ") && lines[3].ends_with(" 403"),
        "{output}"
    );
    assert!(lines[3].contains("nobody answered within 4 s"), "{output}");
    assert!(
        lines[4].ends_with(" 403") && lines[4].contains("denied by "),
        "{output}"
    );
    assert!(lines[4].contains("not for this task"), "{output}");

    // Four approvals were asked (the grant spared the third request).
    let (_, all) = w
        .api(reqwest::Method::GET, "/api/v1/approvals?state=all", None)
        .await;
    let mine: Vec<&Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["attempt_id"] == attempt)
        .collect();
    assert_eq!(mine.len(), 4, "{all}");
    let states: Vec<(&str, Option<&str>)> = mine
        .iter()
        .rev()
        .map(|a| (a["state"].as_str().unwrap(), a["scope"].as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("approved", Some("once")),
            ("approved", Some("task")),
            ("expired", None),
            ("denied", None)
        ]
    );
    let expired = mine.iter().find(|a| a["id"] == unanswered["id"]).unwrap();
    assert_eq!(expired["answered_by"], "timeout");
    // The record: held, answered, and the state went to waiting_approval
    // and back each time.
    let requested = evs
        .iter()
        .filter(|e| e["type"] == "approval_requested")
        .count();
    let answered: Vec<&str> = evs
        .iter()
        .filter(|e| e["type"] == "approval_answered")
        .map(|e| e["decision"].as_str().unwrap())
        .collect();
    assert_eq!(requested, 4);
    assert_eq!(answered, ["approved", "approved", "expired", "denied"]);
    let waits = evs
        .iter()
        .filter(|e| e["type"] == "state_changed" && e["to"] == "waiting_approval")
        .count();
    assert_eq!(waits, 4);
    let egress: Vec<(&str, &str)> = evs
        .iter()
        .filter(|e| e["type"] == "egress")
        .map(|e| {
            (
                e["decision"].as_str().unwrap(),
                e["rule"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(egress.len(), 5, "{egress:?}");
    assert_eq!(
        egress[2],
        (
            "allowed",
            format!("approval {}", second["id"].as_str().unwrap()).as_str()
        )
    );
    assert_eq!(egress[3].0, "denied");
    // Unknown or malformed answers are clear 4xx.
    let (status, body) = w
        .api(
            reqwest::Method::POST,
            "/api/v1/approvals/ap-nothing",
            Some(serde_json::json!({"decision": "approve"})),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = w
        .api(
            reqwest::Method::POST,
            &format!("/api/v1/approvals/{}", refused["id"].as_str().unwrap()),
            Some(serde_json::json!({"decision": "maybe"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projects_own_rules_apply_to_its_next_request_and_server_denials_still_win() {
    let t = Target::start("dev.backshift.test=egress-project", "project-target");
    assert_eq!(
        from_host(&format!("http://{}/", t.ip)).await,
        "project-target"
    );
    let config = format!(
        r#"
[egress]
allow_networks = ["{ip}/32"]
hosts = {{ "project.backshift-test.invalid" = "{ip}", "blocked.backshift-test.invalid" = "{ip}" }}

[[egress.rules]]
host = "blocked.backshift-test.invalid"
action = "deny"
"#,
        ip = t.ip
    );
    let w = World::start(None, &config).await;
    let fetch = "for h in project blocked; do printf '%s %s\\n' $h \"$(curl -s -o /dev/null -m 10 -w '%{http_code}' http://$h.backshift-test.invalid/)\"; done";
    let (task, view) = w.run_task("Fetch", &["--command", fetch]).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let out = common::command_output(&w.events(&format!("{task}-1")).await);
    assert_eq!(out, "project 403\nblocked 403\n", "the default denies both");

    // The project allows its whole test domain.
    let repo = w.repo.to_string_lossy().into_owned();
    let (code, listed, _) = w.cli(&["projects"]).await;
    assert_eq!(code, 0);
    assert!(
        listed.contains(&format!(
            "{}  {}",
            view["project_id"].as_str().unwrap(),
            std::fs::canonicalize(&w.repo).unwrap().display()
        )),
        "{listed}"
    );
    let (code, out, err) = w
        .cli(&[
            "egress",
            &repo,
            "--add",
            "allow *.backshift-test.invalid:80,8080",
            "--add",
            "ask other.invalid GET /x/",
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("1. allow *.backshift-test.invalid:80,8080")
            && out.contains("2. ask other.invalid GET /x/*"),
        "{out}"
    );
    let (code, out, err) = w.cli(&["egress", &repo, "--remove", "2"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("other.invalid"), "{out}");
    let (task, view) = w.run_task("Fetch again", &["--command", fetch]).await;
    assert_eq!(view["state"], "succeeded", "{view}");
    let evs = w.events(&format!("{task}-1")).await;
    assert_eq!(
        common::command_output(&evs),
        "project 200\nblocked 403\n",
        "the server's deny still wins"
    );
    let allowed = evs
        .iter()
        .find(|e| e["type"] == "egress" && e["decision"] == "allowed")
        .unwrap();
    assert_eq!(
        allowed["rule"],
        "allow *.backshift-test.invalid:80,8080 (project rule 1)"
    );
    let denied = evs
        .iter()
        .find(|e| e["type"] == "egress" && e["decision"] == "denied")
        .unwrap();
    assert_eq!(
        denied["rule"],
        "deny blocked.backshift-test.invalid (server rule 1)"
    );

    // Bad rules are refused with the reason, and nothing changes.
    let (code, _, err) = w.cli(&["egress", &repo, "--add", "permit x"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("not allow, deny or ask"), "{err}");
    let project = view["project_id"].as_str().unwrap();
    let (status, body) = w
        .api(
            reqwest::Method::PUT,
            &format!("/api/v1/projects/{project}/egress"),
            Some(serde_json::json!({"rules": [{"host": "a*b", "action": "allow"}]})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rule 1"),
        "{body}"
    );
    let (status, _) = w
        .api(
            reqwest::Method::PUT,
            "/api/v1/projects/nope/egress",
            Some(serde_json::json!({"rules": []})),
        )
        .await;
    assert_eq!(status, 404);
    let (_, p) = w
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/projects/{project}"),
            None,
        )
        .await;
    assert_eq!(p["egress_rules"].as_array().unwrap().len(), 1, "{p}");
    // The change is on the audit record, with who made it.
    let (_, audit, _) = w.cli(&["audit"]).await;
    assert!(audit.contains("token:admin  project.egress.set"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_setup_phase_reaches_what_its_rules_allow_and_the_agent_does_not() {
    let t = Target::start("dev.backshift.test=egress-setup", "registry-target");
    assert_eq!(
        from_host(&format!("http://{}/", t.ip)).await,
        "registry-target"
    );
    let config = format!(
        r#"
[egress]
allow_networks = ["{ip}/32"]
hosts = {{ "registry.backshift-test.invalid" = "{ip}" }}

[[egress.setup_rules]]
host = "registry.backshift-test.invalid"
action = "allow"
"#,
        ip = t.ip
    );
    let w = World::start(None, &config).await;
    let image = backshift_sandbox::image::default_image_tag();
    std::fs::write(
        w.repo.join(".devcontainer.json"),
        format!(
            "{{ \"image\": \"{image}\", \"postCreateCommand\": \"curl -s -m 10 http://registry.backshift-test.invalid/ > $HOME/fetched\" }}"
        ),
    )
    .unwrap();
    common::sh(&w.repo, "git add -A && git commit -qm devcontainer").await;
    let (task, view) = w
        .run_task(
            "Use the registry",
            &["--command", "cat ~/fetched; echo; curl -s -o /dev/null -w '%{http_code}' http://registry.backshift-test.invalid/"],
        )
        .await;
    // The setup image is the project's: removed with the test.
    let project = view["project_id"].as_str().unwrap().to_owned();
    let _cleanup = common::ProjectImages(project);
    assert_eq!(view["state"], "succeeded", "{view}");
    let evs = w.events(&format!("{task}-1")).await;
    assert_eq!(
        common::command_output(&evs),
        "registry-target\n403",
        "setup fetched, the agent could not"
    );
    let egress: Vec<&Value> = evs.iter().filter(|e| e["type"] == "egress").collect();
    assert_eq!(egress.len(), 2, "{egress:?}");
    assert_eq!(egress[0]["decision"], "allowed");
    assert_eq!(
        egress[0]["rule"],
        "allow registry.backshift-test.invalid (setup rule 1)"
    );
    assert_eq!(egress[1]["decision"], "denied");
}
