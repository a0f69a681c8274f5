//! The built-in agent's tools, run inside the sandbox as its user by the
//! sandbox's shim.
//!
//! Every tool call becomes shim commands named after the turn and the
//! call (`t3:call_7:read`): the shim starts a name only once, so a control
//! plane that restarts mid-call and asks again gets the journaled output
//! of the run already under way instead of a second run. Timeouts are the
//! shim's: it kills the command's whole process group.

use crate::EventSink;
use backshift_protocol::{EventKind, OutputStream};
use backshift_shim::{Entry, ShimClient, ShimError, SpawnRequest, Stream};
use base64::Engine;
use serde_json::{Value, json};
use std::time::Duration;

/// Largest file `read_file` returns whole.
const MAX_READ: usize = 256 * 1024;
/// Command output kept for the model: head and tail.
const MODEL_HEAD: usize = 4 * 1024;
const MODEL_TAIL: usize = 12 * 1024;
/// The end of stderr kept for a crash report.
const STDERR_TAIL: usize = 2 * 1024;
/// Command output streamed as events per command.
const MAX_STREAMED: usize = 1024 * 1024;
/// Output is streamed in events of at most this size...
const FLUSH_BYTES: usize = 8 * 1024;
/// ...or at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// The result of one tool call, as the model will see it.
#[derive(Debug, Clone)]
pub struct ToolOutput {
    /// False when the tool failed.
    pub ok: bool,
    /// A command's exit code.
    pub exit_code: Option<i64>,
    /// Text for the model.
    pub output: String,
    /// The sandbox's shim stopped answering: the sandbox is gone, and the
    /// call has no result.
    pub lost: Option<String>,
}

impl ToolOutput {
    fn ok(output: impl Into<String>) -> Self {
        ToolOutput {
            ok: true,
            exit_code: None,
            output: output.into(),
            lost: None,
        }
    }

    fn err(output: impl Into<String>) -> Self {
        ToolOutput {
            ok: false,
            exit_code: None,
            output: format!("error: {}", output.into()),
            lost: None,
        }
    }

    fn lost(e: &ShimError) -> Self {
        ToolOutput {
            lost: Some(e.to_string()),
            ..ToolOutput::err(e.to_string())
        }
    }
}

/// Where one tool call stands: its name for the shim, and how much of its
/// command output is already recorded as events (after a restart).
#[derive(Debug, Clone)]
pub struct CallKey {
    /// The turn the call belongs to.
    pub turn: u32,
    /// The model's id for the call.
    pub call_id: String,
    /// Output with a journal sequence up to this is already recorded.
    pub output_recorded: u64,
}

impl CallKey {
    fn command(&self, op: &str) -> String {
        format!("t{}:{}:{op}", self.turn, self.call_id)
    }
}

/// A command's collected result.
struct Collected {
    code: i64,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    error: Option<String>,
}

/// The tools, bound to one sandbox's shim.
pub struct SandboxTools {
    shim: ShimClient,
    workdir: String,
    command_timeout: Duration,
}

impl SandboxTools {
    /// Tools working in `workdir` through `shim`.
    pub fn new(shim: ShimClient, workdir: &str, command_timeout: Duration) -> Self {
        SandboxTools {
            shim,
            workdir: workdir.to_owned(),
            command_timeout,
        }
    }

    /// The tool definitions offered to the model (OpenAI function format).
    pub fn definitions() -> Value {
        let tool = |name: &str, description: &str, properties: Value, required: &[&str]| {
            json!({"type": "function", "function": {"name": name, "description": description,
                "parameters": {"type": "object", "properties": properties, "required": required}}})
        };
        json!([
            tool(
                "run_command",
                "Run a bash command in the repository root and return its exit code and output. Long output is cut in the middle.",
                json!({"command": {"type": "string"}, "timeout_secs": {"type": "integer", "description": "Kill the command after this many seconds (default and maximum: the task's command timeout)."}}),
                &["command"]
            ),
            tool(
                "read_file",
                "Read a text file (path relative to the repository root, or absolute).",
                json!({"path": {"type": "string"}}),
                &["path"]
            ),
            tool(
                "write_file",
                "Create or overwrite a file with the given content; parent directories are created.",
                json!({"path": {"type": "string"}, "content": {"type": "string"}}),
                &["path", "content"]
            ),
            tool(
                "replace_in_file",
                "Replace one exact occurrence of `old` with `new` in a file. Fails if `old` occurs zero or several times.",
                json!({"path": {"type": "string"}, "old": {"type": "string"}, "new": {"type": "string"}}),
                &["path", "old", "new"]
            ),
            tool(
                "list_files",
                "List files under a directory (default: the repository root), skipping .git.",
                json!({"path": {"type": "string"}, "max_depth": {"type": "integer"}}),
                &[]
            ),
            tool(
                "finish",
                "Finish the task. Call this once the work is done, with a summary of what you changed and why.",
                json!({"summary": {"type": "string"}}),
                &["summary"]
            ),
        ])
    }

    /// Runs tool `name` with `args`. `finish` is handled by the loop.
    pub async fn call(
        &self,
        key: &CallKey,
        name: &str,
        args: &Value,
        sink: &dyn EventSink,
    ) -> ToolOutput {
        let text = |key: &str| args.get(key).and_then(Value::as_str);
        match name {
            "run_command" => match text("command") {
                Some(cmd) => {
                    let asked = args
                        .get("timeout_secs")
                        .and_then(Value::as_u64)
                        .map(Duration::from_secs);
                    let timeout = asked.map_or(self.command_timeout, |t| {
                        t.min(self.command_timeout).max(Duration::from_secs(1))
                    });
                    self.run_command(key, cmd, timeout, sink).await
                }
                None => ToolOutput::err("run_command needs a string `command`"),
            },
            "read_file" => match text("path") {
                Some(path) => self.read_file(key, "read", path).await,
                None => ToolOutput::err("read_file needs a string `path`"),
            },
            "write_file" => match (text("path"), text("content")) {
                (Some(path), Some(content)) => self.write_file(key, "write", path, content).await,
                _ => ToolOutput::err("write_file needs string `path` and `content`"),
            },
            "replace_in_file" => match (text("path"), text("old"), text("new")) {
                (Some(path), Some(old), Some(new)) => {
                    self.replace_in_file(key, path, old, new).await
                }
                _ => ToolOutput::err("replace_in_file needs string `path`, `old` and `new`"),
            },
            "list_files" => {
                let depth = args
                    .get("max_depth")
                    .and_then(Value::as_u64)
                    .unwrap_or(4)
                    .clamp(1, 20);
                self.list_files(key, text("path").unwrap_or("."), depth)
                    .await
            }
            other => ToolOutput::err(format!(
                "unknown tool {other:?}; the tools are run_command, read_file, write_file, replace_in_file, list_files, finish"
            )),
        }
    }

    /// Runs one shim command to its end and collects its output.
    async fn collect(
        &self,
        id: String,
        argv: Vec<String>,
        stdin: Option<&str>,
    ) -> Result<Collected, ShimError> {
        let req = SpawnRequest {
            id,
            argv,
            cwd: Some(self.workdir.clone()),
            stdin_b64: stdin.map(|s| base64::engine::general_purpose::STANDARD.encode(s)),
            timeout_ms: Some(self.command_timeout.as_millis() as u64),
            ..Default::default()
        };
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let (exit, _) = self
            .shim
            .run(req, 0, &mut |e| {
                if let Entry::Output { stream, text, .. } = e {
                    match stream {
                        Stream::Stdout => stdout.extend_from_slice(text.as_bytes()),
                        Stream::Stderr => stderr.extend_from_slice(text.as_bytes()),
                    }
                }
            })
            .await?;
        Ok(Collected {
            code: exit.code,
            stdout,
            stderr,
            error: exit.error,
        })
    }

    async fn run_command(
        &self,
        key: &CallKey,
        command: &str,
        timeout: Duration,
        sink: &dyn EventSink,
    ) -> ToolOutput {
        let secs = timeout.as_secs().max(1);
        let req = SpawnRequest {
            id: key.command("run"),
            argv: vec!["bash".into(), "-c".into(), command.into()],
            cwd: Some(self.workdir.clone()),
            timeout_ms: Some(secs * 1000),
            ..Default::default()
        };
        let streamed = self.stream(key, req, sink).await;
        let exit = match streamed.exit {
            Ok(exit) => exit,
            Err(e) => return ToolOutput::lost(&e),
        };
        if let Some(error) = exit.error {
            return ToolOutput::err(format!("the command could not be run: {error}"));
        }
        let note = if exit.timed_out {
            format!("\n[backshift: the command was killed after its {secs}s timeout (exit 124)]")
        } else if exit.code == 137 {
            "\n[backshift: the command was killed by SIGKILL: the sandbox's memory limit, or a kill]".to_owned()
        } else {
            String::new()
        };
        ToolOutput {
            ok: exit.code == 0,
            exit_code: Some(exit.code),
            output: format!("exit code: {}\n{}{note}", exit.code, streamed.for_model),
            lost: None,
        }
    }

    /// Runs `script` with bash in the checkout as the whole agent (the
    /// command agent): no timeout of its own, output streamed as
    /// `command_output` events of `key`'s call.
    pub async fn run_script(
        &self,
        key: &CallKey,
        script: &str,
        env: Vec<(String, String)>,
        path_prepend: Vec<String>,
        sink: &dyn EventSink,
    ) -> Streamed {
        let req = SpawnRequest {
            id: key.command("script"),
            argv: vec!["bash".into(), "-c".into(), script.into()],
            cwd: Some(self.workdir.clone()),
            env,
            path_prepend,
            ..Default::default()
        };
        self.stream(key, req, sink).await
    }

    /// Runs a shim command (or follows the run already under way) to its
    /// end, streaming its output as events.
    async fn stream(&self, key: &CallKey, req: SpawnRequest, sink: &dyn EventSink) -> Streamed {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Entry>();
        let shim = self.shim.clone();
        let run = async move {
            let mut tx = Some(tx);
            shim.run(req, 0, &mut |e| {
                if let Some(t) = &tx
                    && t.send(e.clone()).is_err()
                {
                    tx = None;
                }
            })
            .await
        };
        tokio::pin!(run);
        let mut stream = OutputStreamer::new(&key.call_id, sink, key.output_recorded);
        let mut ticker = tokio::time::interval(FLUSH_EVERY);
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                Some(entry) = rx.recv() => stream.push(&entry).await,
                _ = ticker.tick() => stream.flush().await,
            }
        };
        while let Ok(entry) = rx.try_recv() {
            stream.push(&entry).await;
        }
        stream.flush().await;
        Streamed {
            exit: result.map(|(exit, _)| exit),
            for_model: stream.for_model(),
            stderr_tail: String::from_utf8_lossy(&stream.stderr_tail).into_owned(),
        }
    }

    async fn read_file(&self, key: &CallKey, op: &str, path: &str) -> ToolOutput {
        let argv = vec![
            "head".into(),
            "-c".into(),
            (MAX_READ + 1).to_string(),
            "--".into(),
            path.into(),
        ];
        match self.collect(key.command(op), argv, None).await {
            Ok(out) if out.code == 0 && out.error.is_none() => {
                if out.stdout.contains(&0) {
                    return ToolOutput::err(format!("{path} is a binary file"));
                }
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                if out.stdout.len() > MAX_READ {
                    let mut end = MAX_READ;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text.truncate(end);
                    text.push_str(&format!(
                        "\n[backshift: {path} is longer than {MAX_READ} bytes; the rest was cut]"
                    ));
                }
                ToolOutput::ok(text)
            }
            Ok(out) => ToolOutput::err(failure_text(&out)),
            Err(e) => ToolOutput::lost(&e),
        }
    }

    async fn write_file(&self, key: &CallKey, op: &str, path: &str, content: &str) -> ToolOutput {
        let argv = vec![
            "bash".into(),
            "-c".into(),
            "mkdir -p -- \"$(dirname -- \"$1\")\" && cat > \"$1\"".into(),
            "write_file".into(),
            path.into(),
        ];
        match self.collect(key.command(op), argv, Some(content)).await {
            Ok(out) if out.code == 0 && out.error.is_none() => {
                ToolOutput::ok(format!("wrote {} bytes to {path}", content.len()))
            }
            Ok(out) => ToolOutput::err(failure_text(&out)),
            Err(e) => ToolOutput::lost(&e),
        }
    }

    async fn replace_in_file(&self, key: &CallKey, path: &str, old: &str, new: &str) -> ToolOutput {
        if old.is_empty() {
            return ToolOutput::err("`old` must not be empty");
        }
        let current = self.read_file(key, "read", path).await;
        if !current.ok {
            return current;
        }
        match current.output.matches(old).count() {
            1 => {
                let updated = current.output.replacen(old, new, 1);
                let written = self.write_file(key, "write", path, &updated).await;
                if written.ok {
                    ToolOutput::ok(format!("replaced 1 occurrence in {path}"))
                } else {
                    written
                }
            }
            0 => ToolOutput::err(format!(
                "`old` does not occur in {path}; read the file and copy the text exactly"
            )),
            n => ToolOutput::err(format!(
                "`old` occurs {n} times in {path}; include more surrounding text so it is unique"
            )),
        }
    }

    async fn list_files(&self, key: &CallKey, path: &str, depth: u64) -> ToolOutput {
        let argv = vec![
            "bash".into(),
            "-c".into(),
            "find \"$1\" -mindepth 1 -maxdepth \"$2\" -name .git -prune -o -print | sed 's|^\\./||' | sort | head -n 2000".into(),
            "list_files".into(),
            path.into(),
            depth.to_string(),
        ];
        match self.collect(key.command("list"), argv, None).await {
            Ok(out) if out.stderr.is_empty() && out.error.is_none() => {
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                if text.is_empty() {
                    ToolOutput::ok("(no files)")
                } else {
                    ToolOutput::ok(text)
                }
            }
            Ok(out) => ToolOutput::err(failure_text(&out)),
            Err(e) => ToolOutput::lost(&e),
        }
    }
}

/// A streamed command's end.
#[derive(Debug)]
pub struct Streamed {
    /// How it ended; `Err` when the shim stopped answering (the sandbox
    /// is gone).
    pub exit: Result<backshift_shim::Exit, ShimError>,
    /// Its output's head and tail, as the model sees it.
    pub for_model: String,
    /// The end of its stderr.
    pub stderr_tail: String,
}

/// What a failed helper command said.
fn failure_text(out: &Collected) -> String {
    match &out.error {
        Some(e) => e.clone(),
        None => String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    }
}

/// Turns output chunks into `command_output` events (coalesced) and keeps
/// the head and tail for the model.
struct OutputStreamer<'a> {
    call_id: &'a str,
    sink: &'a dyn EventSink,
    /// Output up to this journal seq is already recorded as events.
    recorded: u64,
    /// The journal seq of the newest pending output.
    pending_seq: u64,
    pending: Vec<(OutputStream, Vec<u8>)>,
    pending_bytes: usize,
    streamed: usize,
    total: usize,
    head: Vec<u8>,
    tail: Vec<u8>,
    stderr_tail: Vec<u8>,
}

impl<'a> OutputStreamer<'a> {
    fn new(call_id: &'a str, sink: &'a dyn EventSink, recorded: u64) -> Self {
        OutputStreamer {
            call_id,
            sink,
            recorded,
            pending_seq: 0,
            pending: Vec::new(),
            pending_bytes: 0,
            streamed: 0,
            total: 0,
            head: Vec::new(),
            tail: Vec::new(),
            stderr_tail: Vec::new(),
        }
    }

    async fn push(&mut self, entry: &Entry) {
        let Entry::Output {
            seq, stream, text, ..
        } = entry
        else {
            return;
        };
        let stream = match stream {
            Stream::Stdout => OutputStream::Stdout,
            Stream::Stderr => OutputStream::Stderr,
        };
        let bytes = text.as_bytes();
        if stream == OutputStream::Stderr {
            self.stderr_tail.extend_from_slice(bytes);
            if self.stderr_tail.len() > STDERR_TAIL {
                let cut = self.stderr_tail.len() - STDERR_TAIL;
                self.stderr_tail.drain(..cut);
            }
        }
        self.total += bytes.len();
        let room = MODEL_HEAD.saturating_sub(self.head.len());
        self.head.extend_from_slice(&bytes[..room.min(bytes.len())]);
        if bytes.len() > room {
            self.tail.extend_from_slice(&bytes[room..]);
            if self.tail.len() > MODEL_TAIL {
                let cut = self.tail.len() - MODEL_TAIL;
                self.tail.drain(..cut);
            }
        }
        if *seq <= self.recorded {
            // Recorded before a restart: the model needs it, the log has it.
            self.streamed += bytes.len();
            return;
        }
        if self.streamed + self.pending_bytes < MAX_STREAMED {
            match self.pending.last_mut() {
                Some((s, buf)) if *s == stream => buf.extend_from_slice(bytes),
                _ => self.pending.push((stream, bytes.to_vec())),
            }
            self.pending_bytes += bytes.len();
            self.pending_seq = *seq;
            if self.pending_bytes >= FLUSH_BYTES {
                self.flush().await;
            }
        }
    }

    async fn flush(&mut self) {
        for (stream, buf) in std::mem::take(&mut self.pending) {
            self.streamed += buf.len();
            self.sink
                .emit(EventKind::CommandOutput {
                    call_id: self.call_id.to_owned(),
                    stream,
                    text: String::from_utf8_lossy(&buf).into_owned(),
                    journal_seq: Some(self.pending_seq),
                })
                .await;
        }
        if self.pending_bytes > 0 && self.streamed >= MAX_STREAMED {
            self.sink
                .emit(EventKind::Progress {
                    message: format!(
                        "output of {} exceeds {MAX_STREAMED} bytes; no more is streamed",
                        self.call_id
                    ),
                })
                .await;
        }
        self.pending_bytes = 0;
    }

    fn for_model(&self) -> String {
        let head = String::from_utf8_lossy(&self.head);
        if self.tail.is_empty() {
            return head.into_owned();
        }
        let omitted = self.total - self.head.len() - self.tail.len();
        let tail = String::from_utf8_lossy(&self.tail);
        if omitted == 0 {
            format!("{head}{tail}")
        } else {
            format!("{head}\n[backshift: {omitted} bytes of output omitted]\n{tail}")
        }
    }
}
