//! The proxy over a real Unix socket, to a real upstream on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use backshift_egress::{Attempted, Decider, Network, Outcome, Verdict};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};

/// Allows the hosts it lists; remembers every record.
struct Hosts {
    allowed: Vec<&'static str>,
    records: Mutex<Vec<(Attempted, bool, Outcome)>>,
}

#[async_trait::async_trait]
impl Decider for Hosts {
    async fn decide(&self, req: &Attempted) -> Verdict {
        let allow = self.allowed.contains(&req.host.as_str());
        Verdict {
            allow,
            rule: None,
            reason: if allow {
                "listed".into()
            } else {
                format!("{} is not on the list", req.host)
            },
        }
    }
    async fn record(&self, req: &Attempted, verdict: &Verdict, outcome: &Outcome) {
        self.records
            .lock()
            .unwrap()
            .push((req.clone(), verdict.allow, outcome.clone()));
    }
}

/// An upstream that answers every request with what it received.
async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if got.starts_with(b"PING") {
                        // A raw protocol inside a tunnel: echo.
                        s.write_all(&got).await.unwrap();
                        got.clear();
                        continue;
                    }
                    if got.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let echo = String::from_utf8_lossy(&got).to_string();
                let res = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{echo}",
                    echo.len()
                );
                s.write_all(res.as_bytes()).await.unwrap();
            });
        }
    });
    addr
}

struct Fixture {
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    decider: Arc<Hosts>,
    up: SocketAddr,
}

async fn fixture(allow_loopback: bool) -> Fixture {
    let up = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("egress.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let decider = Arc::new(Hosts {
        allowed: vec!["up.test.invalid", "127.0.0.1"],
        records: Mutex::new(Vec::new()),
    });
    let network = Network {
        hosts: BTreeMap::from([("up.test.invalid".to_owned(), up.ip())]),
        allow_networks: if allow_loopback {
            vec!["127.0.0.1/32".parse().unwrap()]
        } else {
            vec![]
        },
    };
    tokio::spawn(backshift_egress::serve(
        listener,
        decider.clone(),
        Arc::new(network),
    ));
    Fixture {
        _dir: dir,
        socket,
        decider,
        up,
    }
}

impl Fixture {
    /// The records, once there are `n` (a connection's record is written
    /// alongside the request).
    async fn records(&self, n: usize) -> Vec<(Attempted, bool, Outcome)> {
        for _ in 0..100 {
            let records = self.decider.records.lock().unwrap().clone();
            if records.len() >= n {
                return records;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("fewer than {n} records");
    }
}

async fn exchange(socket: &std::path::Path, request: &str) -> String {
    let mut s = UnixStream::connect(socket).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test]
async fn an_allowed_request_is_forwarded_in_origin_form_without_proxy_headers() {
    let f = fixture(true).await;
    let port = f.up.port();
    let res = exchange(
        &f.socket,
        &format!(
            "GET http://up.test.invalid:{port}/hello?x=1 HTTP/1.1\r\nHost: elsewhere.invalid\r\nProxy-Authorization: Basic c2VjcmV0\r\nX-Kept: yes\r\nConnection: close, X-Dropped\r\nX-Dropped: 1\r\n\r\n"
        ),
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    assert!(
        res.contains("GET /hello?x=1 HTTP/1.1"),
        "origin form upstream: {res}"
    );
    assert!(
        res.contains(&format!("Host: up.test.invalid:{port}")),
        "{res}"
    );
    assert!(res.contains("X-Kept: yes"), "{res}");
    assert!(
        !res.to_ascii_lowercase().contains("proxy-authorization"),
        "{res}"
    );
    assert!(
        !res.contains("X-Dropped"),
        "headers named in Connection are hop-by-hop: {res}"
    );
    let records = f.decider.records.lock().unwrap().clone();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].0.http, Some(("GET".into(), "/hello?x=1".into())));
    assert_eq!(records[0].2, Outcome::Connected(f.up));
}

#[tokio::test]
async fn an_allowed_tunnel_carries_bytes_both_ways() {
    let f = fixture(true).await;
    let mut s = UnixStream::connect(&f.socket).await.unwrap();
    s.write_all(
        format!(
            "CONNECT up.test.invalid:{} HTTP/1.1\r\nHost: up.test.invalid\r\n\r\n",
            f.up.port()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 1024];
    let n = s.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"PING through the tunnel").await.unwrap();
    let mut echo = vec![0u8; 64];
    let n = s.read(&mut echo).await.unwrap();
    assert_eq!(&echo[..n], b"PING through the tunnel");
    let records = f.records(1).await;
    assert_eq!(records[0].0.http, None);
    assert_eq!(
        records[0].0.describe(),
        format!("CONNECT up.test.invalid:{}", f.up.port())
    );
}

#[tokio::test]
async fn a_denied_request_gets_403_with_the_reason_and_nothing_is_sent() {
    let f = fixture(true).await;
    let res = exchange(
        &f.socket,
        "GET http://forbidden.test.invalid/ HTTP/1.1\r\nHost: forbidden.test.invalid\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        res.starts_with("HTTP/1.1 403 Forbidden by backshift egress policy"),
        "{res}"
    );
    assert!(res.contains("X-Backshift-Egress: denied"), "{res}");
    assert!(
        res.contains("forbidden.test.invalid is not on the list"),
        "{res}"
    );
    assert!(res.contains("Do not retry"), "{res}");
    let res = exchange(
        &f.socket,
        "CONNECT forbidden.test.invalid:443 HTTP/1.1\r\n\r\n",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 403"), "{res}");
    let records = f.decider.records.lock().unwrap().clone();
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| !r.1 && r.2 == Outcome::Denied));
}

#[tokio::test]
async fn an_allowed_name_that_resolves_to_a_refused_address_is_refused() {
    let f = fixture(false).await;
    let res = exchange(
        &f.socket,
        &format!(
            "GET http://127.0.0.1:{}/ HTTP/1.1\r\nConnection: close\r\n\r\n",
            f.up.port()
        ),
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 403"), "{res}");
    assert!(res.contains("the host's loopback"), "{res}");
    let records = f.decider.records.lock().unwrap().clone();
    assert!(records[0].1, "the decider allowed it");
    assert!(matches!(&records[0].2, Outcome::Failed(why) if why.contains("allow_networks")));
}

#[tokio::test]
async fn requests_that_are_not_proxy_requests_are_explained() {
    let f = fixture(true).await;
    let res = exchange(
        &f.socket,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");
    assert!(
        res.contains("egress proxy; it takes absolute URLs"),
        "{res}"
    );
    let res = exchange(
        &f.socket,
        "GET https://up.test.invalid/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(res.contains("must use CONNECT"), "{res}");
    assert!(f.decider.records.lock().unwrap().is_empty());
}
