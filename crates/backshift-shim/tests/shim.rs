//! The shim against real processes: served from a temporary directory,
//! spoken to through its socket exactly as the control plane does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use backshift_shim::proto::{JOURNAL, SOCKET};
use backshift_shim::{Entry, ShimClient, ShimError, SpawnRequest, Stream};
use std::path::Path;
use std::time::{Duration, Instant};

async fn shim() -> (tempfile::TempDir, ShimClient) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    tokio::spawn(async move { backshift_shim::server::serve_commands(&path).await });
    let client = ShimClient::new(dir.path());
    client.wait_ready(Duration::from_secs(5)).await.unwrap();
    (dir, client)
}

fn bash(id: &str, script: &str) -> SpawnRequest {
    SpawnRequest {
        id: id.into(),
        argv: vec!["bash".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// Runs and collects: (entries, exit).
async fn collect(
    client: &ShimClient,
    req: SpawnRequest,
    after: u64,
) -> (Vec<Entry>, backshift_shim::Exit, bool) {
    let mut entries = Vec::new();
    let (exit, existing) = client
        .run(req, after, &mut |e| entries.push(e.clone()))
        .await
        .unwrap();
    (entries, exit, existing)
}

fn text(entries: &[Entry], want: Stream) -> String {
    entries
        .iter()
        .filter_map(|e| match e {
            Entry::Output { stream, text, .. } if *stream == want => Some(text.as_str()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_command_runs_and_its_output_is_journaled_in_order() {
    let (dir, client) = shim().await;
    let req = SpawnRequest {
        env: vec![("GREETING".into(), "héllo".into())],
        cwd: Some("/tmp".into()),
        ..bash(
            "c1",
            "echo \"$GREETING from $(pwd)\"; echo oops >&2; exit 3",
        )
    };
    let (entries, exit, existing) = collect(&client, req, 0).await;
    assert!(!existing);
    assert_eq!(exit.code, 3);
    assert!(!exit.timed_out);
    assert_eq!(text(&entries, Stream::Stdout), "héllo from /tmp\n");
    assert_eq!(text(&entries, Stream::Stderr), "oops\n");
    assert!(matches!(entries.first(), Some(Entry::Started { .. })));
    assert!(matches!(
        entries.last(),
        Some(Entry::Exited { code: Some(3), .. })
    ));
    // The journal on disk holds the same entries, numbered 1.. without gaps.
    let journal = std::fs::read_to_string(dir.path().join(JOURNAL)).unwrap();
    let seqs: Vec<u64> = journal
        .lines()
        .map(|l| serde_json::from_str::<Entry>(l).unwrap().seq())
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(seqs.len(), entries.len());
    let status = client.status().await.unwrap();
    assert_eq!(status.last_seq, seqs.len() as u64);
    assert!(status.running.is_empty());
}

#[tokio::test]
async fn spawning_the_same_id_again_runs_nothing_and_replays_the_journal() {
    let (dir, client) = shim().await;
    let counter = dir.path().join("runs");
    let script = format!("echo run >> {}; echo done", counter.display());
    let (first, exit1, existing1) = collect(&client, bash("once", &script), 0).await;
    let (again, exit2, existing2) = collect(&client, bash("once", &script), 0).await;
    assert!(!existing1 && existing2);
    assert_eq!(exit1, exit2);
    assert_eq!(first, again, "the same entries, the same seqs");
    assert_eq!(std::fs::read_to_string(&counter).unwrap(), "run\n");
    // Following after a seq sends only what is newer (the end always).
    let last_output = first
        .iter()
        .filter(|e| matches!(e, Entry::Output { .. }))
        .map(Entry::seq)
        .max()
        .unwrap();
    let mut later = Vec::new();
    client
        .follow("once", last_output, &mut |e| later.push(e.clone()))
        .await
        .unwrap();
    assert_eq!(later.len(), 1);
    assert!(matches!(later[0], Entry::Exited { .. }));
    // The whole journal up to now, without waiting for more.
    let all = client.journal(0).await.unwrap();
    assert_eq!(all, first);
    assert_eq!(client.journal(last_output).await.unwrap(), later);
}

#[tokio::test]
async fn a_command_keeps_running_without_a_client_and_is_caught_up_later() {
    let (_dir, client) = shim().await;
    let req = bash(
        "long",
        "for i in 1 2 3 4 5; do echo line$i; sleep 0.1; done",
    );
    // A follower that goes away at once (a control plane killed mid-run).
    let mut seen = Vec::new();
    let cut = tokio::time::timeout(
        Duration::from_millis(150),
        client.run(req.clone(), 0, &mut |e| seen.push(e.seq())),
    )
    .await;
    assert!(cut.is_err(), "the follower was cut off before the end");
    assert_eq!(client.status().await.unwrap().running, vec!["long"]);
    let stored = seen.iter().copied().max().unwrap_or(0);
    // A new follower from the last stored seq gets the rest, nothing twice.
    let (rest, exit, existing) = collect(&client, req, stored).await;
    assert!(existing);
    assert_eq!(exit.code, 0);
    assert!(rest.iter().all(|e| e.seq() > stored));
    let mut all: Vec<u64> = seen.clone();
    all.extend(rest.iter().map(Entry::seq));
    assert_eq!(all, (1..=all.len() as u64).collect::<Vec<_>>());
    let (everything, _, _) = collect(&client, bash("long", "true"), 0).await;
    assert_eq!(
        text(&everything, Stream::Stdout),
        "line1\nline2\nline3\nline4\nline5\n"
    );
}

#[tokio::test]
async fn a_timeout_kills_the_whole_process_group() {
    let (dir, client) = shim().await;
    let marker = dir.path().join("survivor");
    let script = format!(
        "(sleep 2; touch {}) & echo started; sleep 30",
        marker.display()
    );
    let started = Instant::now();
    let req = SpawnRequest {
        timeout_ms: Some(300),
        ..bash("slow", &script)
    };
    let (entries, exit, _) = collect(&client, req, 0).await;
    assert!(exit.timed_out);
    assert_eq!(exit.code, 124);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(text(&entries, Stream::Stdout), "started\n");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !marker.exists(),
        "the background child was killed with its group"
    );
}

#[tokio::test]
async fn a_background_child_holding_the_output_does_not_hold_the_command() {
    let (_dir, client) = shim().await;
    let started = Instant::now();
    let (entries, exit, _) =
        collect(&client, bash("bg", "sleep 30 & echo served; exit 0"), 0).await;
    assert_eq!(exit.code, 0);
    assert_eq!(text(&entries, Stream::Stdout), "served\n");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    client.kill("bg").await.unwrap();
}

#[tokio::test]
async fn kill_ends_a_running_command_by_signal() {
    let (_dir, client) = shim().await;
    client.spawn(bash("k", "sleep 30")).await.unwrap();
    client.kill("k").await.unwrap();
    let exit = client.follow("k", 0, &mut |_| {}).await.unwrap();
    assert_eq!(exit.code, 128 + 9);
}

#[tokio::test]
async fn stdin_is_delivered_and_a_missing_program_is_an_exit_not_a_hang() {
    let (_dir, client) = shim().await;
    use base64::Engine;
    let req = SpawnRequest {
        id: "cat".into(),
        argv: vec!["cat".into()],
        stdin_b64: Some(base64::engine::general_purpose::STANDARD.encode("piped ✓")),
        ..Default::default()
    };
    let (entries, exit, _) = collect(&client, req, 0).await;
    assert_eq!(
        (exit.code, text(&entries, Stream::Stdout)),
        (0, "piped ✓".into())
    );
    let missing = SpawnRequest {
        id: "nope".into(),
        argv: vec!["/no/such/program".into()],
        ..Default::default()
    };
    let (_, exit, _) = collect(&client, missing, 0).await;
    assert_eq!(exit.code, 127);
    assert!(exit.error.unwrap().contains("/no/such/program"));
}

#[tokio::test]
async fn mistakes_get_clear_refusals() {
    let (dir, client) = shim().await;
    match client.follow("never-started", 0, &mut |_| {}).await {
        Err(ShimError::Refused(msg)) => assert!(msg.contains("never-started"), "{msg}"),
        other => panic!("{other:?}"),
    }
    match client
        .spawn(SpawnRequest {
            id: "x".into(),
            ..Default::default()
        })
        .await
    {
        Err(ShimError::Refused(msg)) => assert!(msg.contains("argv"), "{msg}"),
        other => panic!("{other:?}"),
    }
    // A link planted where the socket was is never followed.
    let socket = dir.path().join(SOCKET);
    std::fs::remove_file(&socket).unwrap();
    std::os::unix::fs::symlink("/var/run/docker.sock", &socket).unwrap();
    match client.status().await {
        Err(ShimError::Unreachable { message, .. }) => assert!(message.contains("not a socket")),
        other => panic!("{other:?}"),
    }
    let gone = ShimClient::new(Path::new("/nonexistent-backshift-dir"));
    assert!(matches!(
        gone.status().await,
        Err(ShimError::Unreachable { .. })
    ));
}

#[tokio::test]
async fn large_output_arrives_whole() {
    let (_dir, client) = shim().await;
    let (entries, exit, _) = collect(
        &client,
        bash("big", "head -c 3000000 /dev/zero | tr '\\0' 'x'"),
        0,
    )
    .await;
    assert_eq!(exit.code, 0);
    assert_eq!(text(&entries, Stream::Stdout).len(), 3_000_000);
}

#[tokio::test]
async fn a_flood_of_output_is_capped_in_the_journal_and_the_command_still_ends() {
    let (_dir, client) = shim().await;
    let max = backshift_shim::server::MAX_JOURNALED;
    let script = format!(
        "head -c {} /dev/zero | tr '\\0' 'x'; echo end >&2",
        max + 5_000_000
    );
    let (entries, exit, _) = collect(&client, bash("flood", &script), 0).await;
    assert_eq!(exit.code, 0);
    let out = text(&entries, Stream::Stdout);
    assert!(out.starts_with(&"x".repeat(1000)));
    assert!(
        out.ends_with("the rest is not kept]\n"),
        "{}",
        &out[out.len() - 100..]
    );
    assert!(out.len() < max + 200_000, "{}", out.len());
    assert_eq!(
        text(&entries, Stream::Stderr),
        "end\n",
        "each stream has its own cap"
    );
}

#[tokio::test]
async fn the_forward_carries_loopback_connections_to_a_unix_socket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gateway.sock");
    let unix = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = unix.accept().await {
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&[b"echo:".as_slice(), &buf].concat())
                .await
                .unwrap();
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(backshift_shim::server::forward(listener, socket.clone()));
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tcp.write_all(b"hello").await.unwrap();
    let mut answer = [0u8; 10];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"echo:hello");
    // With nothing listening on the socket, a connection is closed, not hung.
    std::fs::remove_file(&socket).unwrap();
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn a_command_with_open_stdin_is_spoken_to_and_its_input_journaled() {
    let (_dir, client) = shim().await;
    let req = SpawnRequest {
        id: "agent".into(),
        argv: vec!["cat".into()],
        stdin_open: true,
        ..Default::default()
    };
    assert!(!client.spawn(req).await.unwrap());
    client
        .write("agent", b"{\"jsonrpc\":\"2.0\"}\n", false)
        .await
        .unwrap();
    client
        .write("agent", "second ✓\n".as_bytes(), true)
        .await
        .unwrap();
    let mut entries = Vec::new();
    let exit = client
        .follow("agent", 0, &mut |e| entries.push(e.clone()))
        .await
        .unwrap();
    assert_eq!(exit.code, 0, "cat ends when its stdin closes");
    assert_eq!(
        text(&entries, Stream::Stdout),
        "{\"jsonrpc\":\"2.0\"}\nsecond ✓\n"
    );
    let inputs: Vec<&str> = entries
        .iter()
        .filter_map(|e| match e {
            Entry::Input { text, .. } => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(inputs, ["{\"jsonrpc\":\"2.0\"}\n", "second ✓\n"]);
    match client.write("agent", b"late", false).await {
        Err(ShimError::Refused(msg)) => assert!(msg.contains("closed"), "{msg}"),
        other => panic!("{other:?}"),
    }
    match client.write("nope", b"x", false).await {
        Err(ShimError::Refused(msg)) => assert!(msg.contains("stdin_open"), "{msg}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn session_variables_reach_every_later_command_and_outlive_the_shim() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, client) = shim().await;
    let echo = "echo \"${TOKEN:-none} ${MINE:-none}\"";
    let (entries, _, _) = collect(&client, bash("before", echo), 0).await;
    assert_eq!(text(&entries, Stream::Stdout), "none none\n");
    client
        .set_env(vec![
            ("TOKEN".into(), "t-1".into()),
            ("MINE".into(), "session".into()),
        ])
        .await
        .unwrap();
    // A command's own variables win over the session's.
    let req = SpawnRequest {
        env: vec![("MINE".into(), "own".into())],
        ..bash("after", echo)
    };
    let (entries, _, _) = collect(&client, req, 0).await;
    assert_eq!(text(&entries, Stream::Stdout), "t-1 own\n");
    let file = dir.path().join(backshift_shim::proto::SESSION_ENV);
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the session's variables are private");
    // Replaced whole, not merged.
    client
        .set_env(vec![("TOKEN".into(), "t-2".into())])
        .await
        .unwrap();
    // A shim started again in the same directory (a resumed sandbox)
    // still has them.
    let path = dir.path().to_owned();
    let _ = std::fs::remove_file(path.join(SOCKET));
    tokio::spawn(async move { backshift_shim::server::serve_commands(&path).await });
    let again = ShimClient::new(dir.path());
    let started = Instant::now();
    while !path_is_socket(&dir.path().join(SOCKET)) && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    again.wait_ready(Duration::from_secs(5)).await.unwrap();
    let (entries, _, _) = collect(&again, bash("restarted", echo), 0).await;
    assert_eq!(text(&entries, Stream::Stdout), "t-2 none\n");
}

fn path_is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}
