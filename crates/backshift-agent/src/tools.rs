//! The built-in agent's tools, run inside the sandbox as its user.
//!
//! Commands run as `setsid bash -c ...` under `timeout`, with their session
//! id written to a file, so that a command that outlives its deadline (or
//! whose background children keep its output open) can be killed as a
//! whole: Docker has no call to kill an exec.

use crate::EventSink;
use backshift_protocol::{EventKind, OutputStream};
use backshift_sandbox::{ExecSpec, OutputChunk, SandboxDriver, SandboxId};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Largest file `read_file` returns whole.
const MAX_READ: usize = 256 * 1024;
/// Command output kept for the model: head and tail.
const MODEL_HEAD: usize = 4 * 1024;
const MODEL_TAIL: usize = 12 * 1024;
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
}

impl ToolOutput {
    fn ok(output: impl Into<String>) -> Self {
        ToolOutput {
            ok: true,
            exit_code: None,
            output: output.into(),
        }
    }

    fn err(output: impl Into<String>) -> Self {
        ToolOutput {
            ok: false,
            exit_code: None,
            output: format!("error: {}", output.into()),
        }
    }
}

/// The tools, bound to one sandbox.
pub struct SandboxTools {
    driver: Arc<dyn SandboxDriver>,
    sandbox: SandboxId,
    workdir: String,
    command_timeout: Duration,
    counter: AtomicU64,
}

impl SandboxTools {
    /// Tools working in `workdir` of `sandbox`.
    pub fn new(
        driver: Arc<dyn SandboxDriver>,
        sandbox: SandboxId,
        workdir: &str,
        command_timeout: Duration,
    ) -> Self {
        SandboxTools {
            driver,
            sandbox,
            workdir: workdir.to_owned(),
            command_timeout,
            counter: AtomicU64::new(0),
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
        call_id: &str,
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
                    self.run_command(call_id, cmd, timeout, sink).await
                }
                None => ToolOutput::err("run_command needs a string `command`"),
            },
            "read_file" => match text("path") {
                Some(path) => self.read_file(path).await,
                None => ToolOutput::err("read_file needs a string `path`"),
            },
            "write_file" => match (text("path"), text("content")) {
                (Some(path), Some(content)) => self.write_file(path, content).await,
                _ => ToolOutput::err("write_file needs string `path` and `content`"),
            },
            "replace_in_file" => match (text("path"), text("old"), text("new")) {
                (Some(path), Some(old), Some(new)) => self.replace_in_file(path, old, new).await,
                _ => ToolOutput::err("replace_in_file needs string `path`, `old` and `new`"),
            },
            "list_files" => {
                let depth = args
                    .get("max_depth")
                    .and_then(Value::as_u64)
                    .unwrap_or(4)
                    .clamp(1, 20);
                self.list_files(text("path").unwrap_or("."), depth).await
            }
            other => ToolOutput::err(format!(
                "unknown tool {other:?}; the tools are run_command, read_file, write_file, replace_in_file, list_files, finish"
            )),
        }
    }

    async fn run_command(
        &self,
        call_id: &str,
        command: &str,
        timeout: Duration,
        sink: &dyn EventSink,
    ) -> ToolOutput {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let pidfile = format!("/tmp/.backshift-exec-{n}.sid");
        let secs = timeout.as_secs().max(1);
        let script = format!("echo $$ > {pidfile}; exec timeout -k 5 {secs} bash -c \"$0\"");
        let spec = ExecSpec {
            argv: vec![
                "setsid".into(),
                "--wait".into(),
                "bash".into(),
                "-c".into(),
                script,
                command.into(),
            ],
            workdir: Some(self.workdir.clone()),
            ..Default::default()
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<OutputChunk>();
        let driver = self.driver.clone();
        let sandbox = self.sandbox.clone();
        let exec = async move {
            let mut tx = Some(tx);
            driver
                .exec(&sandbox, &spec, &mut |chunk| {
                    if let Some(t) = &tx
                        && t.send(chunk).is_err()
                    {
                        tx = None;
                    }
                })
                .await
        };
        tokio::pin!(exec);
        // The in-sandbox `timeout` should end it; this is the backstop for
        // commands whose children keep the output open.
        let deadline = tokio::time::sleep(timeout + Duration::from_secs(10));
        tokio::pin!(deadline);
        let mut stream = OutputStreamer::new(call_id, sink);
        let mut ticker = tokio::time::interval(FLUSH_EVERY);
        let result = loop {
            tokio::select! {
                r = &mut exec => break Some(r),
                Some(chunk) = rx.recv() => stream.push(chunk).await,
                _ = ticker.tick() => stream.flush().await,
                _ = &mut deadline => break None,
            }
        };
        while let Ok(chunk) = rx.try_recv() {
            stream.push(chunk).await;
        }
        stream.flush().await;
        if !matches!(result, Some(Ok(code)) if code != 124 && code != 137) {
            // Timed out (or killed): take down whatever is left of its
            // session, background children included.
            self.kill_session(&pidfile).await;
        }
        let (exit_code, note) = match result {
            Some(Ok(124)) => (
                Some(124),
                format!("\n[backshift: the command was killed after its {secs}s timeout (exit 124)]"),
            ),
            Some(Ok(137)) => (
                Some(137),
                "\n[backshift: the command was killed by SIGKILL: its timeout, or the sandbox's memory limit]".to_owned(),
            ),
            Some(Ok(code)) => (Some(code), String::new()),
            Some(Err(e)) => return ToolOutput::err(format!("the command could not be run: {e}")),
            None => (
                None, format!("\n[backshift: the command was killed after its {secs}s timeout; its output stayed open]"),
            ),
        };
        let _ = self
            .driver
            .exec_collect(&self.sandbox, &ExecSpec::new(["rm", "-f", &pidfile]))
            .await;
        let body = stream.for_model();
        let code_text = exit_code.map_or("killed".to_owned(), |c| c.to_string());
        ToolOutput {
            ok: exit_code == Some(0),
            exit_code,
            output: format!("exit code: {code_text}\n{body}{note}"),
        }
    }

    async fn kill_session(&self, pidfile: &str) {
        let script = format!("sid=$(cat {pidfile} 2>/dev/null) && pkill -KILL -s \"$sid\"; true");
        let _ = self
            .driver
            .exec_collect(&self.sandbox, &ExecSpec::new(["bash", "-c", &script]))
            .await;
    }

    async fn read_file(&self, path: &str) -> ToolOutput {
        let spec = ExecSpec {
            argv: vec![
                "head".into(),
                "-c".into(),
                (MAX_READ + 1).to_string(),
                "--".into(),
                path.into(),
            ],
            workdir: Some(self.workdir.clone()),
            ..Default::default()
        };
        match self.driver.exec_collect(&self.sandbox, &spec).await {
            Ok(out) if out.exit_code == 0 => {
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
            Ok(out) => ToolOutput::err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            Err(e) => ToolOutput::err(format!("cannot read {path}: {e}")),
        }
    }

    async fn write_file(&self, path: &str, content: &str) -> ToolOutput {
        let spec = ExecSpec {
            argv: vec![
                "bash".into(),
                "-c".into(),
                "mkdir -p -- \"$(dirname -- \"$1\")\" && cat > \"$1\"".into(),
                "write_file".into(),
                path.into(),
            ],
            workdir: Some(self.workdir.clone()),
            stdin: Some(content.as_bytes().to_vec().into()),
            ..Default::default()
        };
        match self.driver.exec_collect(&self.sandbox, &spec).await {
            Ok(out) if out.exit_code == 0 => {
                ToolOutput::ok(format!("wrote {} bytes to {path}", content.len()))
            }
            Ok(out) => ToolOutput::err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            Err(e) => ToolOutput::err(format!("cannot write {path}: {e}")),
        }
    }

    async fn replace_in_file(&self, path: &str, old: &str, new: &str) -> ToolOutput {
        if old.is_empty() {
            return ToolOutput::err("`old` must not be empty");
        }
        let current = self.read_file(path).await;
        if !current.ok {
            return current;
        }
        match current.output.matches(old).count() {
            1 => {
                let updated = current.output.replacen(old, new, 1);
                let written = self.write_file(path, &updated).await;
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

    async fn list_files(&self, path: &str, depth: u64) -> ToolOutput {
        let spec = ExecSpec {
            argv: vec![
                "bash".into(),
                "-c".into(),
                "find \"$1\" -mindepth 1 -maxdepth \"$2\" -name .git -prune -o -print | sed 's|^\\./||' | sort | head -n 2000".into(),
                "list_files".into(),
                path.into(),
                depth.to_string(),
            ],
            workdir: Some(self.workdir.clone()),
            ..Default::default()
        };
        match self.driver.exec_collect(&self.sandbox, &spec).await {
            Ok(out) if out.stderr.is_empty() => {
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                if text.is_empty() {
                    ToolOutput::ok("(no files)")
                } else {
                    ToolOutput::ok(text)
                }
            }
            Ok(out) => ToolOutput::err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            Err(e) => ToolOutput::err(format!("cannot list {path}: {e}")),
        }
    }
}

/// Turns output chunks into `command_output` events (coalesced) and keeps
/// the head and tail for the model.
struct OutputStreamer<'a> {
    call_id: &'a str,
    sink: &'a dyn EventSink,
    pending: Vec<(OutputStream, Vec<u8>)>,
    pending_bytes: usize,
    streamed: usize,
    total: usize,
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl<'a> OutputStreamer<'a> {
    fn new(call_id: &'a str, sink: &'a dyn EventSink) -> Self {
        OutputStreamer {
            call_id,
            sink,
            pending: Vec::new(),
            pending_bytes: 0,
            streamed: 0,
            total: 0,
            head: Vec::new(),
            tail: Vec::new(),
        }
    }

    async fn push(&mut self, chunk: OutputChunk) {
        let (stream, bytes) = match chunk {
            OutputChunk::Stdout(b) => (OutputStream::Stdout, b),
            OutputChunk::Stderr(b) => (OutputStream::Stderr, b),
        };
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
        if self.streamed + self.pending_bytes < MAX_STREAMED {
            match self.pending.last_mut() {
                Some((s, buf)) if *s == stream => buf.extend_from_slice(&bytes),
                _ => self.pending.push((stream, bytes.to_vec())),
            }
            self.pending_bytes += bytes.len();
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
