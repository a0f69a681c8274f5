//! Smart HTTP (fetch side) over a store repository: the two requests of
//! the stateless upload-pack protocol, answered by `git upload-pack`.
//! Protocol v0 is used (no `GIT_PROTOCOL` is passed), which every git
//! client speaks.

use crate::{GitError, Result, base_command};
use std::path::Path;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

/// Content type of the ref advertisement.
pub const ADVERTISEMENT_TYPE: &str = "application/x-git-upload-pack-advertisement";
/// Content type of the upload-pack result.
pub const RESULT_TYPE: &str = "application/x-git-upload-pack-result";

/// Body of `GET .../info/refs?service=git-upload-pack`.
pub async fn advertise_refs(repo: &Path) -> Result<Vec<u8>> {
    let mut body = pkt_line("# service=git-upload-pack\n");
    body.extend_from_slice(b"0000");
    body.extend(upload_pack(repo, &["--advertise-refs"], None).await?);
    Ok(body)
}

/// Body of `POST .../git-upload-pack` for the (already decompressed)
/// request body.
pub async fn serve_upload_pack(repo: &Path, request: &[u8]) -> Result<Vec<u8>> {
    upload_pack(repo, &[], Some(request)).await
}

async fn upload_pack(repo: &Path, extra: &[&str], input: Option<&[u8]>) -> Result<Vec<u8>> {
    let mut cmd = base_command(None);
    cmd.args(["upload-pack", "--stateless-rpc"])
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
            args: "upload-pack".into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

fn pkt_line(s: &str) -> Vec<u8> {
    format!("{:04x}{s}", s.len() + 4).into_bytes()
}

#[cfg(test)]
mod tests {
    #[test]
    fn pkt_lines_carry_their_length() {
        assert_eq!(
            super::pkt_line("# service=git-upload-pack\n"),
            b"001e# service=git-upload-pack\n"
        );
    }
}
