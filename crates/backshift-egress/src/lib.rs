//! The egress proxy: the only way out of a sandbox.
//!
//! A sandbox has no network of its own. Its shim carries a loopback port
//! to a Unix socket where the control plane serves this proxy, one per
//! sandbox, so every connection is known to come from that sandbox. The
//! sandbox's `HTTP_PROXY`/`HTTPS_PROXY` point at it.
//!
//! It speaks HTTP/1.1 forward proxying: `CONNECT host:port` opens a tunnel
//! (HTTPS and anything else over TCP), and absolute-form requests
//! (`GET http://host/path`) are forwarded one by one. Each request is put
//! to a [`Decider`] (the policy, and a person when the policy says ask)
//! before anything is sent; an allowed one is then resolved and checked by
//! [`Network`] (no loopback, private or metadata addresses unless
//! allowed), and its outcome is reported back to the decider. A refused
//! request gets `403` with a body that tells the agent why, so it can
//! adapt instead of retrying blindly.

pub mod net;

pub use net::Network;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpStream, UnixListener};

/// How long connecting to an allowed destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest path kept in a request's record.
const MAX_PATH: usize = 512;

/// A request the sandbox asked the proxy to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempted {
    /// The host as the client wrote it (brackets removed from IPv6).
    pub host: String,
    /// The port.
    pub port: u16,
    /// Method and path of a plain HTTP request; `None` for a tunnel.
    pub http: Option<(String, String)>,
}

impl Attempted {
    /// The request as policy sees it.
    pub fn as_policy(&self) -> backshift_core::policy::Request<'_> {
        backshift_core::policy::Request {
            host: &self.host,
            port: self.port,
            http: self.http.as_ref().map(|(m, p)| (m.as_str(), p.as_str())),
        }
    }

    /// `CONNECT host:443` or `GET http://host:80/path`.
    pub fn describe(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match &self.http {
            None => format!("CONNECT {host}:{}", self.port),
            Some((m, p)) => format!("{m} http://{host}:{}{p}", self.port),
        }
    }
}

/// The decider's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the request may go.
    pub allow: bool,
    /// The rule (or approval) that decided, described.
    pub rule: Option<String>,
    /// Why, in a sentence for the agent and the record.
    pub reason: String,
}

/// What became of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Refused by the decider.
    Denied,
    /// Allowed, and connected to this address.
    Connected(SocketAddr),
    /// Allowed by the decider but not made: the address is refused, the
    /// name does not resolve, or the connection failed.
    Failed(String),
}

/// Decides requests and records what became of them.
#[async_trait::async_trait]
pub trait Decider: Send + Sync + 'static {
    /// Whether `req` may go; may wait (for a person's answer).
    async fn decide(&self, req: &Attempted) -> Verdict;
    /// What became of `req` after `verdict`.
    async fn record(&self, req: &Attempted, verdict: &Verdict, outcome: &Outcome);
}

type Body = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, reason: Option<String>, body: String) -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(reason) = reason
        && let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(reason.into_bytes())
    {
        res.extensions_mut().insert(phrase);
    }
    res
}

fn denied(req: &Attempted, why: &str) -> Response<Body> {
    let mut res = text(
        StatusCode::FORBIDDEN,
        Some("Forbidden by backshift egress policy".into()),
        format!(
            "backshift egress proxy: {} was refused: {why}\n\
             This sandbox reaches the network only through backshift's egress proxy, which \
             follows the project's and the server's egress rules. Do not retry it or look for \
             another way out; work without it, or say in your summary that the task needs it \
             (whoever runs backshift can allow the host).\n",
            req.describe()
        ),
    );
    res.headers_mut()
        .insert("x-backshift-egress", HeaderValue::from_static("denied"));
    res.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    res
}

/// Serves the proxy on `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, decider: Arc<dyn Decider>, network: Arc<Network>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("egress proxy: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let decider = decider.clone();
        let network = network.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let decider = decider.clone();
                let network = network.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(req, decider, network).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .preserve_header_case(true)
                .title_case_headers(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!("egress proxy connection ended: {e}");
            }
        });
    }
}

/// What the client asked for, or why it makes no sense.
fn parse(req: &Request<Incoming>) -> Result<Attempted, String> {
    let uri = req.uri();
    if req.method() == Method::CONNECT {
        let authority = uri
            .authority()
            .ok_or_else(|| format!("CONNECT needs host:port, not `{uri}`"))?;
        let port = authority
            .port_u16()
            .ok_or_else(|| format!("CONNECT {authority} has no port"))?;
        return Ok(Attempted {
            host: bare(authority.host()),
            port,
            http: None,
        });
    }
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(format!(
                "{other}:// URLs go through a tunnel: the client must use CONNECT (curl, git, pip and npm do)"
            ));
        }
        None => {
            return Err(format!(
                "this is backshift's egress proxy; it takes absolute URLs (`GET http://host/path`) or CONNECT, not `{} {uri}`",
                req.method()
            ));
        }
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{uri}` has no host"))?;
    let mut path = uri
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    if path.len() > MAX_PATH {
        let mut cut = MAX_PATH;
        while !path.is_char_boundary(cut) {
            cut -= 1;
        }
        path.truncate(cut);
    }
    Ok(Attempted {
        host: bare(authority.host()),
        port: authority.port_u16().unwrap_or(80),
        http: Some((req.method().as_str().to_owned(), path)),
    })
}

fn bare(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

async fn handle(
    req: Request<Incoming>,
    decider: Arc<dyn Decider>,
    network: Arc<Network>,
) -> Response<Body> {
    let attempted = match parse(&req) {
        Ok(a) => a,
        Err(why) => {
            return text(
                StatusCode::BAD_REQUEST,
                None,
                format!("backshift egress proxy: {why}\n"),
            );
        }
    };
    let verdict = decider.decide(&attempted).await;
    if !verdict.allow {
        decider.record(&attempted, &verdict, &Outcome::Denied).await;
        return denied(&attempted, &verdict.reason);
    }
    let stream = match connect(&network, &attempted).await {
        Ok(s) => s,
        Err(Failure::Refused(why)) => {
            decider
                .record(&attempted, &verdict, &Outcome::Failed(why.clone()))
                .await;
            return denied(&attempted, &why);
        }
        Err(Failure::Unreachable(why)) => {
            decider
                .record(&attempted, &verdict, &Outcome::Failed(why.clone()))
                .await;
            return text(
                StatusCode::BAD_GATEWAY,
                None,
                format!(
                    "backshift egress proxy: {} is allowed, but {why}\n",
                    attempted.describe()
                ),
            );
        }
    };
    if let Ok(peer) = stream.peer_addr() {
        // Recorded alongside the request, not before it: the record is a
        // database write the request need not wait for.
        let (decider, attempted, verdict) = (decider.clone(), attempted.clone(), verdict.clone());
        tokio::spawn(async move {
            decider
                .record(&attempted, &verdict, &Outcome::Connected(peer))
                .await;
        });
    }
    if attempted.http.is_none() {
        tunnel(req, stream)
    } else {
        forward(req, stream, &attempted).await
    }
}

enum Failure {
    /// The address is one a sandbox may not reach.
    Refused(String),
    /// The name does not resolve or nothing answers.
    Unreachable(String),
}

async fn connect(network: &Network, req: &Attempted) -> Result<TcpStream, Failure> {
    let addrs = network.resolve(&req.host, req.port).await.map_err(|why| {
        if why.contains("does not resolve") {
            Failure::Unreachable(why)
        } else {
            Failure::Refused(why)
        }
    })?;
    let mut last = String::new();
    for addr in addrs {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => last = format!("connecting to {addr} failed: {e}"),
            Err(_) => last = format!("connecting to {addr} timed out after {CONNECT_TIMEOUT:?}"),
        }
    }
    Err(Failure::Unreachable(last))
}

/// Answers the CONNECT and splices the client to `upstream` once hyper
/// hands the connection over.
fn tunnel(req: Request<Incoming>, mut upstream: TcpStream) -> Response<Body> {
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            Err(e) => tracing::debug!("egress tunnel was not upgraded: {e}"),
        }
    });
    Response::new(http_body_util::Empty::new().map_err(|n| match n {}).boxed())
}

/// Headers that belong to one hop, never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    // Headers the client named in `Connection` are hop-by-hop too.
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for name in HOP_BY_HOP.iter().copied().map(str::to_owned).chain(named) {
        headers.remove(name.as_str());
    }
}

/// Sends a plain HTTP request on `upstream` in origin form and streams the
/// answer back.
async fn forward(
    req: Request<Incoming>,
    upstream: TcpStream,
    attempted: &Attempted,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .unwrap_or_default();
    let origin_form = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = match origin_form.parse() {
        Ok(u) => u,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                None,
                format!("backshift egress proxy: {e}\n"),
            );
        }
    };
    strip_hop_by_hop(&mut parts.headers);
    // The host the proxy connected to is the host the server hears about.
    if let Ok(v) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, v);
    }
    let (mut sender, conn) = match hyper::client::conn::http1::Builder::new()
        .preserve_header_case(true)
        .title_case_headers(true)
        .handshake(TokioIo::new(upstream))
        .await
    {
        Ok(x) => x,
        Err(e) => {
            return text(
                StatusCode::BAD_GATEWAY,
                None,
                format!("backshift egress proxy: {}: {e}\n", attempted.describe()),
            );
        }
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("egress upstream connection ended: {e}");
        }
    });
    match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(res) => {
            let (mut parts, body) = res.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => text(
            StatusCode::BAD_GATEWAY,
            None,
            format!(
                "backshift egress proxy: {} failed: {e}\n",
                attempted.describe()
            ),
        ),
    }
}
