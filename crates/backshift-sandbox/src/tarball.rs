//! Tar archives for moving files into and out of sandboxes. Entries are
//! written with explicit owners so files land owned by the sandbox user.

use std::io::Read;
use std::path::Path;

/// Owner of entries written into a sandbox.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    /// User id.
    pub uid: u64,
    /// Group id.
    pub gid: u64,
}

/// Archives directory `src` under the name `prefix` (e.g. `workspace`),
/// including hidden files such as `.git`, with every entry owned by
/// `owner`. Symlinks are stored as symlinks, never followed. Files keep
/// their modification times (whole seconds): a git checkout's index
/// then still matches its files, and git need not read them all again.
pub fn archive_dir(src: &Path, prefix: &str, owner: Owner) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let mut stack = vec![(src.to_path_buf(), prefix.to_owned())];
    while let Some((dir, name)) = stack.pop() {
        let meta = std::fs::symlink_metadata(&dir)?;
        append_dir(&mut builder, &name, mode_of(&meta), owner)?;
        let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let entry_name = format!("{name}/{}", entry.file_name().to_string_lossy());
            let meta = std::fs::symlink_metadata(&path)?;
            let ft = meta.file_type();
            if ft.is_dir() {
                stack.push((path, entry_name));
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&path)?;
                let mut header = header(tar::EntryType::Symlink, 0o777, 0, owner);
                builder.append_link(&mut header, &entry_name, &target)?;
            } else if ft.is_file() {
                let mut header = header(tar::EntryType::Regular, mode_of(&meta), meta.len(), owner);
                header.set_mtime(mtime_of(&meta));
                let file = std::fs::File::open(&path)?;
                builder.append_data(&mut header, &entry_name, file)?;
            }
            // Sockets, fifos and devices have no place in a checkout.
        }
    }
    builder.into_inner()
}

/// An archive holding one file `name` with `content`.
pub fn archive_file(
    name: &str,
    content: &[u8],
    mode: u32,
    owner: Owner,
) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = header(tar::EntryType::Regular, mode, content.len() as u64, owner);
    builder.append_data(&mut header, name, content)?;
    builder.into_inner()
}

/// The content of the first regular file in `archive` (as produced by
/// [`crate::SandboxDriver::copy_out`] of a file path).
pub fn first_file(archive: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut ar = tar::Archive::new(archive);
    for entry in ar.entries()? {
        let mut entry = entry?;
        if entry.header().entry_type().is_file() {
            let mut out = Vec::new();
            entry.read_to_end(&mut out)?;
            return Ok(out);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        "the archive holds no regular file",
    ))
}

fn append_dir(
    builder: &mut tar::Builder<Vec<u8>>,
    name: &str,
    mode: u32,
    owner: Owner,
) -> std::io::Result<()> {
    let mut header = header(tar::EntryType::Directory, mode, 0, owner);
    builder.append_data(&mut header, format!("{name}/"), std::io::empty())
}

fn header(kind: tar::EntryType, mode: u32, size: u64, owner: Owner) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(owner.uid);
    h.set_gid(owner.gid);
    h.set_mtime(0);
    h
}

fn mtime_of(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    u64::try_from(meta.mtime()).unwrap_or(0)
}

fn mode_of(meta: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o7777
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_keep_hidden_files_symlinks_and_owner() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".git/objects")).unwrap();
        std::fs::write(dir.path().join(".git/HEAD"), "ref: x\n").unwrap();
        std::fs::write(dir.path().join("a.txt"), "hello").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let bytes = archive_dir(
            dir.path(),
            "workspace",
            Owner {
                uid: 1000,
                gid: 1000,
            },
        )
        .unwrap();
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut names = Vec::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            assert_eq!(e.header().uid().unwrap(), 1000);
            let name = e.path().unwrap().to_string_lossy().into_owned();
            if name == "workspace/link" {
                assert!(e.header().entry_type().is_symlink());
            }
            names.push(name);
        }
        for want in [
            "workspace/",
            "workspace/a.txt",
            "workspace/.git/HEAD",
            "workspace/link",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
    }

    #[test]
    fn files_keep_their_modification_times() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "a").unwrap();
        let mtime = std::fs::metadata(dir.path().join("a.txt")).unwrap().mtime();
        assert!(mtime > 0);
        let bytes = archive_dir(dir.path(), "w", Owner { uid: 1, gid: 1 }).unwrap();
        let mut ar = tar::Archive::new(&bytes[..]);
        let entry = ar
            .entries()
            .unwrap()
            .map(Result::unwrap)
            .find(|e| e.path().unwrap().ends_with("a.txt"))
            .unwrap();
        assert_eq!(entry.header().mtime().unwrap(), mtime as u64);
    }

    #[test]
    fn a_single_file_round_trips() {
        let bytes = archive_file("x/y.txt", b"data", 0o644, Owner { uid: 1, gid: 1 }).unwrap();
        assert_eq!(first_file(&bytes).unwrap(), b"data");
    }
}
