//! The shim itself, running inside the sandbox as its main process.
//!
//! It owns the commands the control plane starts: each in its own process
//! group, its output appended to the journal (one JSON line per entry,
//! sequence numbers from 1 without gaps) as it is produced. The journal is
//! a file in the shim's directory, which the control plane bind-mounts
//! from the host, so it outlives both the control plane and the sandbox.
//! Clients follow the journal from any sequence number; nothing depends on
//! a client being connected.

use crate::proto::{
    DRAIN_MS, Entry, JOURNAL, KILL_GRACE_MS, Reply, Request, SESSION_ENV, SOCKET, SpawnRequest,
    Stream, VERSION,
};
use base64::Engine;
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

/// Largest request line (a spawn may carry a file's content as stdin).
const MAX_REQUEST: u64 = 64 * 1024 * 1024;
/// Output is read in pieces of at most this size.
const READ_CHUNK: usize = 64 * 1024;
/// Output journaled per command and stream; the rest is read and dropped
/// (the journal lives on the host's disk).
pub const MAX_JOURNALED: usize = 64 * 1024 * 1024;

/// Where the journal ends.
#[derive(Debug, Clone, Copy, Default)]
struct Pos {
    last_seq: u64,
    end: u64,
}

struct Writer {
    file: std::fs::File,
    /// Byte offset of entry `seq` is `offsets[seq - 1]`.
    offsets: Vec<u64>,
    end: u64,
}

/// A command's stdin, kept open for `write` requests.
type OpenStdin = Arc<tokio::sync::Mutex<Option<tokio::process::ChildStdin>>>;

struct Command {
    pid: Option<u32>,
    stdin: Option<OpenStdin>,
    first_seq: u64,
    /// Its `exited` entry, once written.
    exit_seq: Option<u64>,
    running: bool,
}

struct Shared {
    journal_path: PathBuf,
    writer: Mutex<Writer>,
    pos: watch::Sender<Pos>,
    commands: Mutex<HashMap<String, Command>>,
    /// The session's variables (`set_env`), given to every command.
    session_env: Mutex<Vec<(String, String)>>,
    dir: PathBuf,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Appends the entry `make` builds for the next sequence number.
    fn append(&self, make: impl FnOnce(u64) -> Entry) -> std::io::Result<u64> {
        let mut w = lock(&self.writer);
        let seq = w.offsets.len() as u64 + 1;
        let mut line = serde_json::to_vec(&make(seq)).map_err(std::io::Error::other)?;
        line.push(b'\n');
        w.file.write_all(&line)?;
        let start = w.end;
        w.offsets.push(start);
        w.end += line.len() as u64;
        let pos = Pos {
            last_seq: seq,
            end: w.end,
        };
        drop(w);
        self.pos.send_replace(pos);
        Ok(seq)
    }

    fn offset_of(&self, seq: u64) -> u64 {
        let w = lock(&self.writer);
        match usize::try_from(seq.saturating_sub(1)) {
            Ok(i) if i < w.offsets.len() => w.offsets[i],
            _ => w.end,
        }
    }
}

/// Accepts TCP connections on `listen` (loopback inside the sandbox) and
/// carries each to the Unix socket `to`; a connection that cannot reach it
/// is closed. This is how a sandbox without a network reaches the one
/// endpoint the control plane offers it.
pub async fn forward(listener: tokio::net::TcpListener, to: PathBuf) -> std::io::Result<()> {
    loop {
        let (mut tcp, _) = listener.accept().await?;
        let to = to.clone();
        tokio::spawn(async move {
            if let Ok(mut unix) = UnixStream::connect(&to).await {
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
            }
        });
    }
}

/// Runs the shim in `dir`: creates the journal and the socket there and
/// serves until the process is killed, forwarding loopback ports
/// [`crate::proto::GATEWAY_PORT`], [`crate::proto::EGRESS_PORT`] and
/// [`crate::proto::GIT_PORT`] to the model gateway's, the egress proxy's
/// and the git endpoint's sockets in `dir`.
pub async fn serve(dir: &Path) -> std::io::Result<()> {
    for (port, socket, what) in [
        (
            crate::proto::GATEWAY_PORT,
            crate::proto::GATEWAY_SOCKET,
            "model gateway",
        ),
        (
            crate::proto::EGRESS_PORT,
            crate::proto::EGRESS_SOCKET,
            "egress proxy",
        ),
        (
            crate::proto::GIT_PORT,
            crate::proto::GIT_SOCKET,
            "git endpoint",
        ),
    ] {
        let listener =
            tokio::net::TcpListener::bind(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .await?;
        let to = dir.join(socket);
        tokio::spawn(async move {
            if let Err(e) = forward(listener, to).await {
                tracing::error!("the {what} forward stopped: {e}");
            }
        });
    }
    serve_commands(dir).await
}

/// The shim without its forward: commands and their journal, served on
/// the socket in `dir`.
pub async fn serve_commands(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let journal_path = dir.join(JOURNAL);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&journal_path)?;
    let socket = dir.join(SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket)?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
    let (pos, _) = watch::channel(Pos::default());
    // Set before a stop: the sandbox is still the same attempt's.
    let session_env = std::fs::read(dir.join(SESSION_ENV))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let shared = Arc::new(Shared {
        session_env: Mutex::new(session_env),
        dir: dir.to_owned(),
        journal_path,
        writer: Mutex::new(Writer {
            file,
            offsets: Vec::new(),
            end: 0,
        }),
        pos,
        commands: Mutex::new(HashMap::new()),
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(shared, stream).await {
                tracing::debug!("shim connection ended: {e}");
            }
        });
    }
}

async fn handle(shared: Arc<Shared>, stream: UnixStream) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            let reply = Reply {
                error: Some(format!("bad request: {e}")),
                ..Default::default()
            };
            return send(&mut write, &reply).await;
        }
    };
    match request {
        Request::Spawn(req) => {
            let reply = spawn(&shared, req);
            send(&mut write, &reply).await
        }
        Request::Kill { id } => {
            let pid = lock(&shared.commands)
                .get(&id)
                .filter(|c| c.running)
                .and_then(|c| c.pid);
            if let Some(pid) = pid {
                kill_group(pid, libc::SIGKILL);
            }
            send(
                &mut write,
                &Reply {
                    ok: true,
                    ..Default::default()
                },
            )
            .await
        }
        Request::Write {
            id,
            data_b64,
            close,
        } => {
            let reply = write_stdin(&shared, &id, &data_b64, close).await;
            send(&mut write, &reply).await
        }
        Request::Status => {
            let running = lock(&shared.commands)
                .iter()
                .filter(|(_, c)| c.running)
                .map(|(id, _)| id.clone())
                .collect();
            let reply = Reply {
                ok: true,
                version: VERSION,
                last_seq: shared.pos.borrow().last_seq,
                running,
                ..Default::default()
            };
            send(&mut write, &reply).await
        }
        Request::Follow {
            after,
            id,
            until_now,
        } => follow(&shared, after, id, until_now, &mut write).await,
        Request::SetEnv { env } => {
            let reply = match keep_session_env(&shared.dir, &env) {
                Ok(()) => {
                    *lock(&shared.session_env) = env;
                    Reply {
                        ok: true,
                        ..Default::default()
                    }
                }
                Err(e) => Reply {
                    error: Some(format!("cannot keep the session's variables: {e}")),
                    ..Default::default()
                },
            };
            send(&mut write, &reply).await
        }
    }
}

/// Writes the session's variables to their file in `dir` (mode 0600,
/// replaced whole, so a shim started again never reads half of it).
fn keep_session_env(dir: &Path, env: &[(String, String)]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let json = serde_json::to_vec(env).map_err(std::io::Error::other)?;
    let partial = dir.join(format!("{SESSION_ENV}.partial"));
    let _ = std::fs::remove_file(&partial);
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(&json)?;
    file.sync_all()?;
    std::fs::rename(&partial, dir.join(SESSION_ENV))
}

async fn send(write: &mut (impl AsyncWriteExt + Unpin), reply: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    write.flush().await
}

/// The fields of a journal line that following needs.
#[derive(serde::Deserialize)]
struct Head {
    kind: String,
    id: String,
}

async fn follow(
    shared: &Shared,
    after: u64,
    id: Option<String>,
    until_now: bool,
    write: &mut (impl AsyncWriteExt + Unpin),
) -> std::io::Result<()> {
    let mut from = after + 1;
    if let Some(id) = &id {
        let known = lock(&shared.commands)
            .get(id)
            .map(|c| (c.first_seq, c.exit_seq));
        match known {
            // A follower that has seen everything of an ended command still
            // gets its end.
            Some((first, exit)) => from = from.max(first).min(exit.unwrap_or(u64::MAX)),
            None => {
                let reply = Reply {
                    error: Some(format!("no command {id:?} was started in this sandbox")),
                    ..Default::default()
                };
                return send(write, &reply).await;
            }
        }
    }
    let mut rx = shared.pos.subscribe();
    let mut offset = shared.offset_of(from);
    let mut file = tokio::fs::File::open(&shared.journal_path).await?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut buf = Vec::new();
    loop {
        let end = rx.borrow_and_update().end;
        if offset >= end {
            if until_now {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Ok(());
            }
            continue;
        }
        let want = usize::try_from(end - offset)
            .unwrap_or(usize::MAX)
            .min(1 << 20);
        buf.resize(want, 0);
        file.read_exact(&mut buf).await?;
        offset += want as u64;
        // Only whole lines are below `end`; a piece cut at 1 MiB keeps its
        // unfinished last line for the next read.
        let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if complete < buf.len() {
            let back = (buf.len() - complete) as u64;
            offset -= back;
            file.seek(std::io::SeekFrom::Start(offset)).await?;
        }
        let mut out = Vec::with_capacity(complete);
        let mut done = false;
        for line in buf[..complete].split_inclusive(|b| *b == b'\n') {
            if let Some(id) = &id {
                let Ok(head) = serde_json::from_slice::<Head>(line) else {
                    continue;
                };
                if &head.id != id {
                    continue;
                }
                out.extend_from_slice(line);
                if head.kind == "exited" {
                    done = true;
                    break;
                }
            } else {
                out.extend_from_slice(line);
            }
        }
        if !out.is_empty() {
            write.write_all(&out).await?;
            write.flush().await?;
        }
        if done {
            return Ok(());
        }
    }
}

async fn write_stdin(shared: &Shared, id: &str, data_b64: &str, close: bool) -> Reply {
    let fail = |error: String| Reply {
        error: Some(error),
        ..Default::default()
    };
    let bytes = match base64::engine::general_purpose::STANDARD.decode(data_b64) {
        Ok(b) => b,
        Err(e) => return fail(format!("data is not base64: {e}")),
    };
    let slot = lock(&shared.commands).get(id).and_then(|c| c.stdin.clone());
    let Some(slot) = slot else {
        return fail(format!(
            "command {id:?} does not exist or was not started with stdin_open"
        ));
    };
    let mut guard = slot.lock().await;
    let Some(input) = guard.as_mut() else {
        return fail(format!("the stdin of {id:?} is closed"));
    };
    if let Err(e) = input.write_all(&bytes).await {
        return fail(format!("cannot write to {id:?}: {e}"));
    }
    let _ = input.flush().await;
    if !bytes.is_empty()
        && let Err(e) = shared.append(|seq| Entry::Input {
            seq,
            id: id.to_owned(),
            text: String::from_utf8_lossy(&bytes).into_owned(),
        })
    {
        return fail(format!("cannot write the journal: {e}"));
    }
    if close && let Some(mut input) = guard.take() {
        let _ = input.shutdown().await;
    }
    Reply {
        ok: true,
        ..Default::default()
    }
}

fn kill_group(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) with a negative pid signals that process group;
        // it has no memory-safety preconditions.
        unsafe {
            libc::kill(-pid, signal);
        }
    }
}

fn spawn(shared: &Arc<Shared>, req: SpawnRequest) -> Reply {
    let ok = |existing| Reply {
        ok: true,
        existing,
        ..Default::default()
    };
    let fail = |error: String| Reply {
        error: Some(error),
        ..Default::default()
    };
    let stdin = match &req.stdin_b64 {
        Some(b) => match base64::engine::general_purpose::STANDARD.decode(b) {
            Ok(bytes) => Some(bytes),
            Err(e) => return fail(format!("stdin is not base64: {e}")),
        },
        None => None,
    };
    let Some((program, args)) = req.argv.split_first() else {
        return fail("argv is empty".into());
    };
    let mut commands = lock(&shared.commands);
    if commands.contains_key(&req.id) {
        return ok(true);
    }
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(lock(&shared.session_env).iter().map(|(k, v)| (k, v)))
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(if stdin.is_some() || req.stdin_open {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    if !req.path_prepend.is_empty() {
        let own = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
        cmd.env("PATH", format!("{}:{own}", req.path_prepend.join(":")));
    }
    let id = req.id.clone();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            let error = format!("cannot start {program:?}: {e}");
            let appended = shared.append(|seq| Entry::Exited {
                seq,
                id: id.clone(),
                code: None,
                signal: None,
                timed_out: false,
                error: Some(error.clone()),
            });
            return match appended {
                Ok(seq) => {
                    commands.insert(
                        id,
                        Command {
                            pid: None,
                            stdin: None,
                            first_seq: seq,
                            exit_seq: Some(seq),
                            running: false,
                        },
                    );
                    ok(false)
                }
                Err(e) => fail(format!("cannot write the journal: {e}")),
            };
        }
    };
    let pid = child.id().unwrap_or(0);
    let open_stdin: Option<OpenStdin> = if req.stdin_open {
        Some(Arc::new(tokio::sync::Mutex::new(None)))
    } else {
        None
    };
    let first_seq = match shared.append(|seq| Entry::Started {
        seq,
        id: id.clone(),
        pid,
    }) {
        Ok(seq) => seq,
        Err(e) => {
            kill_group(pid, libc::SIGKILL);
            return fail(format!("cannot write the journal: {e}"));
        }
    };
    commands.insert(
        id.clone(),
        Command {
            pid: Some(pid),
            stdin: open_stdin.clone(),
            first_seq,
            exit_seq: None,
            running: true,
        },
    );
    drop(commands);
    match (child.stdin.take(), open_stdin) {
        (Some(mut input), Some(slot)) => {
            // Held locked until the initial bytes are in: writes queue
            // behind them.
            let mut guard = slot.try_lock_owned().ok();
            tokio::spawn(async move {
                if let Some(bytes) = stdin {
                    let _ = input.write_all(&bytes).await;
                }
                if let Some(g) = guard.as_mut() {
                    **g = Some(input);
                }
            });
        }
        (Some(mut input), None) => {
            if let Some(bytes) = stdin {
                tokio::spawn(async move {
                    let _ = input.write_all(&bytes).await;
                    let _ = input.shutdown().await;
                });
            }
        }
        (None, _) => {}
    }
    let readers: Vec<_> = [
        child.stdout.take().map(|s| {
            (
                Stream::Stdout,
                Box::new(s) as Box<dyn AsyncRead + Send + Unpin>,
            )
        }),
        child.stderr.take().map(|s| {
            (
                Stream::Stderr,
                Box::new(s) as Box<dyn AsyncRead + Send + Unpin>,
            )
        }),
    ]
    .into_iter()
    .flatten()
    .map(|(stream, reader)| tokio::spawn(pump(shared.clone(), id.clone(), stream, reader)))
    .collect();
    let shared = shared.clone();
    let timeout = req.timeout_ms.map(Duration::from_millis);
    tokio::spawn(async move {
        let mut timed_out = false;
        let status = match timeout {
            None => child.wait().await,
            Some(t) => match tokio::time::timeout(t, child.wait()).await {
                Ok(s) => s,
                Err(_) => {
                    timed_out = true;
                    kill_group(pid, libc::SIGTERM);
                    match tokio::time::timeout(Duration::from_millis(KILL_GRACE_MS), child.wait())
                        .await
                    {
                        Ok(s) => s,
                        Err(_) => {
                            kill_group(pid, libc::SIGKILL);
                            child.wait().await
                        }
                    }
                }
            },
        };
        if timed_out {
            // Whatever of its group survived the main process goes too.
            kill_group(pid, libc::SIGKILL);
        }
        // Background children may keep the output open: read what is
        // there, then stop listening.
        let drain = tokio::time::sleep(Duration::from_millis(DRAIN_MS));
        tokio::pin!(drain);
        for mut reader in readers {
            tokio::select! {
                _ = &mut reader => {}
                () = &mut drain => reader.abort(),
            }
        }
        let (code, signal) = match &status {
            Ok(s) => (s.code(), s.signal()),
            Err(_) => (None, None),
        };
        let error = status
            .err()
            .map(|e| format!("cannot wait for the command: {e}"));
        // Under the commands lock: a follower never sees the command
        // ended without its exit entry.
        let mut commands = lock(&shared.commands);
        let appended = shared.append(|seq| Entry::Exited {
            seq,
            id: id.clone(),
            code,
            signal,
            timed_out,
            error,
        });
        if let Some(c) = commands.get_mut(&id) {
            c.running = false;
            c.exit_seq = appended.as_ref().ok().copied();
        }
        drop(commands);
        if let Err(e) = appended {
            tracing::error!("cannot journal the end of {id}: {e}");
        }
    });
    ok(false)
}

/// Copies one output stream into the journal, cutting text at character
/// boundaries.
async fn pump(
    shared: Arc<Shared>,
    id: String,
    stream: Stream,
    mut reader: Box<dyn AsyncRead + Send + Unpin>,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut carry: Vec<u8> = Vec::new();
    let mut journaled = 0usize;
    let append = |text: String| {
        if let Err(e) = shared.append(|seq| Entry::Output {
            seq,
            id: id.clone(),
            stream,
            text,
        }) {
            tracing::error!("cannot journal output of {id}: {e}");
        }
    };
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        if n == 0 {
            if !carry.is_empty() && journaled < MAX_JOURNALED {
                append(String::from_utf8_lossy(&carry).into_owned());
            }
            return;
        }
        if journaled >= MAX_JOURNALED {
            continue;
        }
        journaled += n;
        carry.extend_from_slice(&buf[..n]);
        let keep = incomplete_tail(&carry);
        let cut = carry.len() - keep;
        let text = String::from_utf8_lossy(&carry[..cut]).into_owned();
        carry.drain(..cut);
        if !text.is_empty() {
            append(text);
        }
        if journaled >= MAX_JOURNALED {
            append(format!(
                "\n[backshift shim: more than {} MiB of output; the rest is not kept]\n",
                MAX_JOURNALED >> 20
            ));
        }
    }
}

/// How many bytes at the end of `bytes` start a UTF-8 character that is
/// not complete yet.
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=3.min(bytes.len()) {
        let b = bytes[bytes.len() - back];
        if b & 0b1100_0000 != 0b1000_0000 {
            // A lead byte (or ASCII): how long its character is.
            let len = match b {
                0x00..=0x7f => 1,
                0xc0..=0xdf => 2,
                0xe0..=0xef => 3,
                0xf0..=0xf7 => 4,
                _ => 1,
            };
            return if len > back { back } else { 0 };
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::incomplete_tail;

    #[test]
    fn an_unfinished_character_is_kept_back() {
        let s = "aé€😀".as_bytes();
        assert_eq!(incomplete_tail(s), 0);
        assert_eq!(incomplete_tail(&s[..2]), 1, "half of é");
        assert_eq!(incomplete_tail(&s[..5]), 2, "two thirds of €");
        assert_eq!(
            incomplete_tail(&s[..s.len() - 1]),
            3,
            "three quarters of 😀"
        );
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail(&[0xff]), 0, "invalid bytes are not held");
    }
}
