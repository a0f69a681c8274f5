//! Custom CA certificates: a TLS server the test creates, with a
//! certificate from a CA the test makes (so nothing on this host trusts
//! it), is reached from inside a sandbox through the egress proxy's
//! tunnel by curl and by Python, because `[sandbox] ca_certificates`
//! names that CA; the public CAs stay trusted too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, docker, docker_quiet};
use std::process::Command;

fn run(dir: &std::path::Path, script: &str) {
    let out = Command::new("bash")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Server {
    name: String,
    net: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        docker_quiet(&["rm", "-f", &self.name]);
        docker_quiet(&["network", "rm", &self.net]);
    }
}

const TLS_SERVER: &str = "mkdir -p /w && cd /w && echo tls-target > index.html && exec python3 -c \"import http.server, ssl; s = http.server.HTTPServer(('', 443), http.server.SimpleHTTPRequestHandler); c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.load_cert_chain('/certs/srv.pem', '/certs/srv.key'); s.socket = c.wrap_socket(s.socket, server_side=True); s.serve_forever()\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_trusts_the_configured_ca_through_the_proxy_tunnel() {
    // A CA of the test's own, and a server certificate it signs.
    let certs = tempfile::tempdir().unwrap();
    run(
        certs.path(),
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj '/CN=backshift test CA' 2>/dev/null \
         && openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj '/CN=tls.backshift-test.invalid' 2>/dev/null \
         && printf 'subjectAltName=DNS:tls.backshift-test.invalid\\n' > ext \
         && openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext 2>/dev/null \
         && chmod 644 srv.key",
    );
    let tag = format!("{:x}", std::process::id() & 0xffff);
    let server = Server {
        name: format!("bs-certs-{tag}"),
        net: format!("bs-certs-{tag}"),
    };
    docker(&["network", "create", &server.net]);
    let image = backshift_sandbox::image::default_image_tag();
    let mount = format!("{}:/certs:ro", certs.path().display());
    docker(&[
        "run",
        "-d",
        "--name",
        &server.name,
        "--network",
        &server.net,
        "-v",
        &mount,
        &image,
        "sh",
        "-c",
        TLS_SERVER,
    ]);
    let ip = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &server.name,
    ]);
    // Live, and trusted only with the test's CA.
    let resolve = format!("tls.backshift-test.invalid:443:{ip}");
    let mut trusted = String::new();
    for _ in 0..50 {
        let out = Command::new("curl")
            .args([
                "-s",
                "-m",
                "2",
                "--noproxy",
                "*",
                "--resolve",
                &resolve,
                "--cacert",
            ])
            .arg(certs.path().join("ca.pem"))
            .arg("https://tls.backshift-test.invalid/")
            .output()
            .unwrap();
        trusted = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(trusted, "tls-target\n");
    let untrusted = Command::new("curl")
        .args([
            "-s",
            "-m",
            "2",
            "--noproxy",
            "*",
            "--resolve",
            &resolve,
            "https://tls.backshift-test.invalid/",
        ])
        .status()
        .unwrap();
    assert_eq!(
        untrusted.code(),
        Some(60),
        "nothing on this host trusts the test's CA"
    );

    let config = format!(
        r#"
[sandbox]
ca_certificates = "{ca}"

[egress]
allow_networks = ["{ip}/32"]
hosts = {{ "tls.backshift-test.invalid" = "{ip}" }}

[[egress.rules]]
host = "tls.backshift-test.invalid"
ports = [443]
action = "allow"
"#,
        ca = certs.path().join("ca.pem").display()
    );
    let w = World::start(None, &config).await;
    let script = "curl -s https://tls.backshift-test.invalid/; \
                  python3 -c \"import urllib.request; print(urllib.request.urlopen('https://tls.backshift-test.invalid/').read().decode().strip())\"; \
                  grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt; \
                  grep -c 'BEGIN CERTIFICATE' \"$NODE_EXTRA_CA_CERTS\"";
    let (task, view) = w.run_task("Fetch over TLS", &["--command", script]).await;
    let evs = w.events(&format!("{task}-1")).await;
    assert_eq!(view["state"], "succeeded", "{view}\n{evs:#?}");
    let out = common::command_output(&evs);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "tls-target", "curl: {out}");
    assert_eq!(lines[1], "tls-target", "python: {out}");
    let system: usize = lines[2].parse().unwrap();
    assert!(
        system > 100,
        "the public CAs are still trusted ({system} certificates): {out}"
    );
    assert_eq!(lines[3], "1", "{out}");
    // Through the proxy's tunnel, as one allowed CONNECT.
    let tunnel = evs
        .iter()
        .find(|e| e["type"] == "egress" && e["host"] == "tls.backshift-test.invalid")
        .unwrap();
    assert_eq!(tunnel["decision"], "allowed");
    assert!(tunnel["method"].is_null(), "a tunnel: {tunnel}");
}
