//! The control plane's side: talks to a shim through its socket in the
//! shim's directory on the host (bind-mounted into the sandbox), so
//! reconnecting after a restart costs no call to the sandbox's driver.

use crate::proto::{Entry, Exit, Reply, Request, SOCKET, SpawnRequest, VERSION};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Control requests (not follows) that take longer than this fail.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong talking to a shim.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// No shim answers at the socket: it (and so its sandbox) is gone, or
    /// not started yet.
    #[error("the sandbox's shim does not answer at {path}: {message}")]
    Unreachable {
        /// The socket.
        path: String,
        /// Why.
        message: String,
    },
    /// The shim answered but refused.
    #[error("the shim refused: {0}")]
    Refused(String),
    /// The shim said something this control plane does not understand.
    #[error("the shim's answer is not understood: {0}")]
    Protocol(String),
}

/// Result alias for shim calls.
pub type Result<T> = std::result::Result<T, ShimError>;

/// A handle on one sandbox's shim.
#[derive(Debug, Clone)]
pub struct ShimClient {
    socket: PathBuf,
}

impl ShimClient {
    /// The shim whose directory (on the host) is `dir`.
    pub fn new(dir: &Path) -> ShimClient {
        ShimClient {
            socket: dir.join(SOCKET),
        }
    }

    fn unreachable(&self, message: impl Into<String>) -> ShimError {
        ShimError::Unreachable {
            path: self.socket.display().to_string(),
            message: message.into(),
        }
    }

    async fn connect(&self) -> Result<UnixStream> {
        // The directory is writable from inside the sandbox: connect only
        // to a socket, never through a link planted there.
        let meta = tokio::fs::symlink_metadata(&self.socket)
            .await
            .map_err(|e| self.unreachable(e.to_string()))?;
        if !meta.file_type().is_socket() {
            return Err(self.unreachable("not a socket (refusing to follow it)"));
        }
        UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.unreachable(e.to_string()))
    }

    async fn open(&self, request: &Request) -> Result<BufReader<UnixStream>> {
        let mut stream = self.connect().await?;
        let mut line =
            serde_json::to_vec(request).map_err(|e| ShimError::Protocol(e.to_string()))?;
        line.push(b'\n');
        stream
            .write_all(&line)
            .await
            .map_err(|e| self.unreachable(format!("cannot send: {e}")))?;
        Ok(BufReader::new(stream))
    }

    async fn request(&self, request: &Request) -> Result<Reply> {
        let exchange = async {
            let mut reader = self.open(request).await?;
            let mut line = String::new();
            let n = reader
                .read_line(&mut line)
                .await
                .map_err(|e| self.unreachable(format!("cannot read the answer: {e}")))?;
            if n == 0 {
                return Err(self.unreachable("the shim hung up without an answer"));
            }
            let reply: Reply =
                serde_json::from_str(&line).map_err(|e| ShimError::Protocol(e.to_string()))?;
            if reply.ok {
                Ok(reply)
            } else {
                Err(ShimError::Refused(reply.error.unwrap_or_default()))
            }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| self.unreachable("no answer within 10 s"))?
    }

    /// The shim's version, last journal sequence and running commands.
    pub async fn status(&self) -> Result<Reply> {
        let reply = self.request(&Request::Status).await?;
        if reply.version != VERSION {
            return Err(ShimError::Protocol(format!(
                "the shim speaks version {}, this control plane {VERSION}",
                reply.version
            )));
        }
        Ok(reply)
    }

    /// Waits until the shim answers (it starts with its sandbox).
    pub async fn wait_ready(&self, within: Duration) -> Result<Reply> {
        let started = Instant::now();
        loop {
            match self.status().await {
                Ok(r) => return Ok(r),
                Err(e @ (ShimError::Protocol(_) | ShimError::Refused(_))) => return Err(e),
                Err(e) if started.elapsed() >= within => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Starts a command; `Ok(true)` when one with its id had been started
    /// before (nothing new was started).
    pub async fn spawn(&self, request: SpawnRequest) -> Result<bool> {
        Ok(self.request(&Request::Spawn(request)).await?.existing)
    }

    /// Writes `data` to command `id`'s open stdin (journaled), closing it
    /// afterwards when `close`.
    pub async fn write(&self, id: &str, data: &[u8], close: bool) -> Result<()> {
        use base64::Engine;
        self.request(&Request::Write {
            id: id.to_owned(),
            data_b64: base64::engine::general_purpose::STANDARD.encode(data),
            close,
        })
        .await
        .map(|_| ())
    }

    /// Sets the variables every command started from now on gets
    /// (replacing those set before); see [`Request::SetEnv`].
    pub async fn set_env(&self, env: Vec<(String, String)>) -> Result<()> {
        self.request(&Request::SetEnv { env }).await.map(|_| ())
    }

    /// Kills command `id`'s process group.
    pub async fn kill(&self, id: &str) -> Result<()> {
        self.request(&Request::Kill { id: id.to_owned() })
            .await
            .map(|_| ())
    }

    /// Follows command `id`'s journal entries after `after`, handing each
    /// to `on_entry`, until it exits.
    pub async fn follow(
        &self,
        id: &str,
        after: u64,
        on_entry: &mut (dyn FnMut(&Entry) + Send),
    ) -> Result<Exit> {
        let mut reader = self
            .open(&Request::Follow {
                after,
                id: Some(id.to_owned()),
                until_now: false,
            })
            .await?;
        let mut line = String::new();
        loop {
            if !self.next_line(&mut reader, &mut line).await? {
                return Err(self.unreachable("the shim ended the journal stream"));
            }
            let value: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| ShimError::Protocol(e.to_string()))?;
            if value.get("kind").is_none() {
                let reply: Reply = serde_json::from_value(value)
                    .map_err(|e| ShimError::Protocol(e.to_string()))?;
                return Err(ShimError::Refused(reply.error.unwrap_or_default()));
            }
            let entry: Entry =
                serde_json::from_value(value).map_err(|e| ShimError::Protocol(e.to_string()))?;
            on_entry(&entry);
            if let Entry::Exited {
                code,
                signal,
                timed_out,
                error,
                ..
            } = entry
            {
                return Ok(Exit::from_entry(code, signal, timed_out, error));
            }
        }
    }

    /// Reads the journal stream's next line into `line`; `false` at its end.
    async fn next_line(
        &self,
        reader: &mut BufReader<UnixStream>,
        line: &mut String,
    ) -> Result<bool> {
        line.clear();
        let n = reader
            .read_line(line)
            .await
            .map_err(|e| self.unreachable(format!("the journal stream broke: {e}")))?;
        Ok(n > 0)
    }

    /// Every journal entry after `after`, up to the journal's end now.
    pub async fn journal(&self, after: u64) -> Result<Vec<Entry>> {
        let read = async {
            let mut reader = self
                .open(&Request::Follow {
                    after,
                    id: None,
                    until_now: true,
                })
                .await?;
            let mut entries = Vec::new();
            let mut line = String::new();
            while self.next_line(&mut reader, &mut line).await? {
                entries.push(
                    serde_json::from_str(&line).map_err(|e| ShimError::Protocol(e.to_string()))?,
                );
            }
            Ok(entries)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, read)
            .await
            .map_err(|_| self.unreachable("the journal was not read within 10 s"))?
    }

    /// Starts `request` (or finds it started before) and follows it to its
    /// end from journal sequence `after`. Returns how it ended and whether
    /// it had been started before.
    pub async fn run(
        &self,
        request: SpawnRequest,
        after: u64,
        on_entry: &mut (dyn FnMut(&Entry) + Send),
    ) -> Result<(Exit, bool)> {
        let id = request.id.clone();
        let existing = self.spawn(request).await?;
        let exit = self.follow(&id, after, on_entry).await?;
        Ok((exit, existing))
    }
}
