//! Smart HTTP over a store repository: the stateless upload-pack (fetch)
//! and receive-pack (push) protocols, answered by `git upload-pack` and
//! `git receive-pack`. Protocol v0 is used (no `GIT_PROTOCOL` is passed),
//! which every git client speaks. A caller may hide every ref but some
//! (`transfer.hideRefs`): hidden refs are neither advertised nor fetchable
//! nor pushable.

use crate::{GitError, Result, base_command};
use std::path::Path;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

/// Content type of the ref advertisement.
pub const ADVERTISEMENT_TYPE: &str = "application/x-git-upload-pack-advertisement";
/// Content type of the upload-pack result.
pub const RESULT_TYPE: &str = "application/x-git-upload-pack-result";

/// One of the two smart-HTTP services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Fetch.
    UploadPack,
    /// Push.
    ReceivePack,
}

impl Service {
    /// From `?service=` or the POST path's last segment.
    pub fn from_name(name: &str) -> Option<Service> {
        match name {
            "git-upload-pack" => Some(Service::UploadPack),
            "git-receive-pack" => Some(Service::ReceivePack),
            _ => None,
        }
    }

    /// `git-upload-pack` or `git-receive-pack`.
    pub fn name(self) -> &'static str {
        match self {
            Service::UploadPack => "git-upload-pack",
            Service::ReceivePack => "git-receive-pack",
        }
    }

    /// Content type of its ref advertisement.
    pub fn advertisement_type(self) -> String {
        format!("application/x-{}-advertisement", self.name())
    }

    /// Content type of its result.
    pub fn result_type(self) -> String {
        format!("application/x-{}-result", self.name())
    }
}

/// Which refs a client sees: all of them, or only these (full names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visible {
    /// Every ref.
    All,
    /// Only these refs; everything else is hidden.
    Only(Vec<String>),
}

impl Visible {
    fn config(&self) -> Vec<String> {
        match self {
            Visible::All => Vec::new(),
            Visible::Only(refs) => std::iter::once("transfer.hideRefs=refs/".to_owned())
                .chain(refs.iter().map(|r| format!("transfer.hideRefs=!{r}")))
                .flat_map(|c| ["-c".to_owned(), c])
                .collect(),
        }
    }
}

/// Body of `GET .../info/refs?service=git-upload-pack`.
pub async fn advertise_refs(repo: &Path) -> Result<Vec<u8>> {
    advertise(repo, Service::UploadPack, &Visible::All).await
}

/// Body of `POST .../git-upload-pack` for the (already decompressed)
/// request body.
pub async fn serve_upload_pack(repo: &Path, request: &[u8]) -> Result<Vec<u8>> {
    serve(repo, Service::UploadPack, request, &Visible::All).await
}

/// Body of `GET .../info/refs?service=...`.
pub async fn advertise(repo: &Path, service: Service, visible: &Visible) -> Result<Vec<u8>> {
    let mut body = pkt_line(&format!("# service={}\n", service.name()));
    body.extend_from_slice(b"0000");
    body.extend(run(repo, service, visible, &["--advertise-refs"], None).await?);
    Ok(body)
}

/// Body of `POST .../<service>` for the (already decompressed) request.
pub async fn serve(
    repo: &Path,
    service: Service,
    request: &[u8],
    visible: &Visible,
) -> Result<Vec<u8>> {
    run(repo, service, visible, &[], Some(request)).await
}

async fn run(
    repo: &Path,
    service: Service,
    visible: &Visible,
    extra: &[&str],
    input: Option<&[u8]>,
) -> Result<Vec<u8>> {
    let mut cmd = base_command(None);
    cmd.args(visible.config())
        .args([service.name().trim_start_matches("git-"), "--stateless-rpc"])
        .args(extra)
        .arg(repo)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(GitError::Spawn)?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        let data = data.to_vec();
        // Write concurrently with reading, or a large request deadlocks
        // against a full stdout pipe.
        tokio::spawn(async move {
            let _ = stdin.write_all(&data).await;
            let _ = stdin.shutdown().await;
        });
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        return Err(GitError::Failed {
            args: service.name().into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

fn pkt_line(s: &str) -> Vec<u8> {
    pkt_bytes(s.as_bytes())
}

fn pkt_bytes(b: &[u8]) -> Vec<u8> {
    let mut out = format!("{:04x}", b.len() + 4).into_bytes();
    out.extend_from_slice(b);
    out
}

/// A request body as sent, decompressed when the client gzipped it
/// (`Content-Encoding: gzip`, which git uses for large requests).
pub fn request_body(body: &[u8], gzip: bool) -> std::result::Result<Vec<u8>, String> {
    if !gzip {
        return Ok(body.to_vec());
    }
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body), &mut out)
        .map_err(|e| format!("the request body is not valid gzip: {e}"))?;
    Ok(out)
}

/// One ref update a push asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushCommand {
    /// The ref's current value as the client believes it (zeros: create).
    pub old: String,
    /// Its new value (zeros: delete).
    pub new: String,
    /// The ref.
    pub name: String,
}

/// The ref updates at the start of a receive-pack request, and the
/// capabilities the client asked for.
pub fn push_commands(
    request: &[u8],
) -> std::result::Result<(Vec<PushCommand>, Vec<String>), String> {
    let mut commands = Vec::new();
    let mut caps = Vec::new();
    let mut at = 0;
    loop {
        let len = request
            .get(at..at + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| usize::from_str_radix(h, 16).ok())
            .ok_or("the push request is not pkt-lines")?;
        if len == 0 {
            break;
        }
        if len < 4 {
            return Err("the push request has a malformed pkt-line".into());
        }
        let line = request
            .get(at + 4..at + len)
            .ok_or("the push request ends inside a pkt-line")?;
        at += len;
        let (command, rest) = match line.iter().position(|b| *b == 0) {
            Some(nul) => (&line[..nul], Some(&line[nul + 1..])),
            None => (line, None),
        };
        if let Some(rest) = rest {
            caps = String::from_utf8_lossy(rest)
                .split_whitespace()
                .map(str::to_owned)
                .collect();
        }
        let text = String::from_utf8_lossy(command);
        let mut parts = text.trim_end_matches('\n').splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(old), Some(new), Some(name)) if old.len() >= 40 && new.len() >= 40 => {
                commands.push(PushCommand {
                    old: old.to_owned(),
                    new: new.to_owned(),
                    name: name.to_owned(),
                });
            }
            _ => return Err(format!("`{text}` is not a ref update")),
        }
    }
    Ok((commands, caps))
}

/// A receive-pack result refusing every command with `reason` (shown by
/// git as `! [remote rejected] REF (reason)`), and `message` on the
/// progress channel when the client has one (shown as `remote: ...`).
pub fn refusal(commands: &[PushCommand], caps: &[String], reason: &str, message: &str) -> Vec<u8> {
    let reason = reason.replace('\n', " ");
    let mut report = pkt_line("unpack ok\n");
    for c in commands {
        report.extend(pkt_line(&format!("ng {} {reason}\n", c.name)));
    }
    report.extend_from_slice(b"0000");
    let band = caps
        .iter()
        .any(|c| c == "side-band-64k" || c == "side-band");
    if !band {
        return report;
    }
    let max = if caps.iter().any(|c| c == "side-band-64k") {
        65515
    } else {
        995
    };
    let mut out = Vec::new();
    for line in message.lines() {
        let mut data = vec![2u8];
        data.extend_from_slice(format!("{line}\n").as_bytes());
        out.extend(pkt_bytes(&data));
    }
    for chunk in report.chunks(max - 1) {
        let mut data = vec![1u8];
        data.extend_from_slice(chunk);
        out.extend(pkt_bytes(&data));
    }
    out.extend_from_slice(b"0000");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkt_lines_carry_their_length() {
        assert_eq!(
            pkt_line("# service=git-upload-pack\n"),
            b"001e# service=git-upload-pack\n"
        );
    }

    #[test]
    fn push_commands_are_read_up_to_the_flush() {
        let zero = "0".repeat(40);
        let new = "a".repeat(40);
        let mut req = pkt_bytes(
            format!("{zero} {new} refs/heads/x\0report-status side-band-64k\n").as_bytes(),
        );
        req.extend(pkt_line(&format!("{new} {zero} refs/heads/y\n")));
        req.extend_from_slice(b"0000PACK....");
        let (cmds, caps) = push_commands(&req).unwrap();
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0].name, "refs/heads/x");
        assert_eq!(cmds[1].new, zero);
        assert_eq!(caps, ["report-status", "side-band-64k"]);
        assert!(push_commands(b"zzzz").is_err());
        let refused = refusal(&cmds, &caps, "not yours", "backshift: no");
        assert!(refused.starts_with(b"0013\x02backshift: no\n"));
        assert!(String::from_utf8_lossy(&refused).contains("ng refs/heads/y not yours"));
        let plain = refusal(&cmds, &[], "not yours", "x");
        assert!(plain.starts_with(b"000eunpack ok\n"));
    }
}
