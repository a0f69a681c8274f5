//! Live events over Server-Sent Events resume with `Last-Event-ID`: a
//! client cut off mid-stream (here by the server dying with SIGKILL and
//! coming back) reconnects and gets every event exactly once, in order.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, script};
use futures::StreamExt;
use serde_json::json;
use std::time::Duration;

/// One SSE event: (id, event type).
type Seen = (u64, String);

/// Reads `url`'s stream from `last` until `stop_after` events (or `end`).
/// Returns the events and whether `end` came.
async fn read(url: &str, token: &str, last: Option<u64>, stop_after: usize) -> (Vec<Seen>, bool) {
    let mut req = reqwest::Client::new().get(url).bearer_auth(token);
    if let Some(l) = last {
        req = req.header("last-event-id", l.to_string());
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut seen = Vec::new();
    let (mut id, mut kind) = (None, String::new());
    while let Ok(Some(Ok(chunk))) = tokio::time::timeout(Duration::from_secs(60), body.next()).await
    {
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(nl) = buf.find('\n') {
            let line = buf[..nl].trim_end_matches('\r').to_owned();
            buf.drain(..=nl);
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("event:") {
                kind = v.trim().to_owned();
            } else if line.is_empty() && !kind.is_empty() {
                if kind == "end" {
                    return (seen, true);
                }
                if let Some(i) = id.take() {
                    seen.push((i, std::mem::take(&mut kind)));
                    if seen.len() >= stop_after {
                        return (seen, false);
                    }
                }
                kind.clear();
            }
        }
    }
    (seen, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_by_a_server_restart_resumes_without_gaps_or_duplicates() {
    let s = script(json!({"mode": "turn", "steps": [
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "for i in 1 2 3; do echo line $i; done"}}]}},
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "sleep 2; echo slept"}}]}},
        {"reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "f.txt", "content": "f\n"}}]}},
        {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Done"}}]}}
    ]}));
    let mut w = World::start(Some(s), "").await;
    let repo = w.repo.to_string_lossy().into_owned();
    let (_, out, _) = w.cli(&["run", "Stream", "--repo", &repo]).await;
    let task = out.split_whitespace().nth(1).unwrap().to_owned();
    let url = format!("{}/api/v1/attempts/{task}-1/events/stream", w.url);
    let token = w.token();

    // Read a few events, then the server dies under the open stream.
    let (first, ended) = read(&url, &token, None, 12).await;
    assert!(!ended && first.len() == 12, "{first:?}");
    w.kill_server().await;
    w.restart_server().await;
    let last = first.last().unwrap().0;
    let (rest, ended) = read(&url, &token, Some(last), usize::MAX).await;
    assert!(ended, "the resumed stream ends with `end`");

    let ids: Vec<u64> = first.iter().chain(&rest).map(|(i, _)| *i).collect();
    let want: Vec<u64> = (1..=*ids.last().unwrap()).collect();
    assert_eq!(ids, want, "every event once, in order");
    assert!(rest.iter().any(|(_, k)| k == "restored"), "{rest:?}");
    assert_eq!(w.wait(&task).await["state"], "succeeded");
}
