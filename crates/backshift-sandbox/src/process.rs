//! The process driver: sandboxes made of Linux namespaces with
//! bubblewrap (`bwrap`), for hosts without Docker.
//!
//! A sandbox is a directory `<root>/<id>/` holding its record
//! (`sandbox.json`: labels, user, environment, mounts, limits, the pid of
//! its namespace's first process) and its writable areas (`fs/`): the
//! working directory, the home directory, `/tmp` and `/var`. Everything
//! else is the host's own filesystem, read-only, and only its system
//! trees (`/usr`, `/etc`, `/opt` and the `/bin`, `/lib`... links): no
//! `/home`, `/root`, `/srv`, `/mnt`, `/run` or `/sys` of the host, and the
//! paths given to [`ProcessDriver::new`] hidden under empty ones. Each
//! sandbox has its own user, mount, PID, network (loopback only), IPC,
//! UTS and cgroup namespaces; its processes run as its user, without
//! capabilities, with no-new-privileges.
//!
//! Commands run through `nsenter` into the sandbox's namespaces; files go
//! in and out through `tar` run *inside* the sandbox as its user, so a
//! link the sandbox planted never leads the host anywhere. Limits
//! (memory, processes, CPU) are cgroups (v1 or v2) made for the sandbox
//! when the server may make them (as root); a sandbox survives the
//! server's restart like a container does. Stop kills its processes and
//! keeps its directory; resume starts its main process again.
//!
//! Architecture invariant: as for every driver, nothing here knows of
//! tasks; and the host's files are never read or written on a sandbox's
//! behalf by the server itself.

use crate::{
    ExecSpec, OutputChunk, ResourceLimits, Result, SandboxDriver, SandboxError, SandboxId,
    SandboxInfo, SandboxSpec, SandboxUsage,
};
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The home directory of a process sandbox's user.
pub const HOME: &str = "/home/agent";

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The host's trees a sandbox sees (read-only), besides the `/bin`,
/// `/lib`... links into them.
const SHOWN: [&str; 3] = ["/usr", "/etc", "/opt"];

/// Sandboxes of Linux namespaces (see the module's documentation).
#[derive(Clone)]
pub struct ProcessDriver {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    bwrap: PathBuf,
    nsenter: PathBuf,
    cgroups: Cgroups,
    hide: Vec<PathBuf>,
    as_root: bool,
}

/// What is kept of a sandbox between calls (and server restarts).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    labels: BTreeMap<String, String>,
    uid: u32,
    gid: u32,
    workdir: String,
    env: Vec<(String, String)>,
    mounts: Vec<(PathBuf, String, bool)>,
    command: Vec<String>,
    memory_bytes: i64,
    nano_cpus: i64,
    pids: i64,
    /// Host pid of the first process of its PID namespace, while running.
    pid: Option<i32>,
    /// That process's start time (clock ticks since boot), so a pid
    /// reused by another process is not taken for it.
    pid_start: Option<u64>,
}

impl ProcessDriver {
    /// A driver keeping its sandboxes under `root`, hiding `hide` (the
    /// server's data directory, its configuration) from them. Fails, saying
    /// what to install, when bubblewrap or nsenter is missing or this host
    /// does not let it make namespaces.
    pub async fn new(root: &Path, hide: Vec<PathBuf>) -> Result<ProcessDriver> {
        let find = |name: &str, package: &str| {
            ["/usr/bin", "/bin", "/usr/local/bin", "/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(name))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    SandboxError::Unreachable(format!(
                        "the process driver needs {name}, which is not installed: install {package} (`apt install {package}`)"
                    ))
                })
        };
        let bwrap = find("bwrap", "bubblewrap")?;
        let nsenter = find("nsenter", "util-linux")?;
        std::fs::create_dir_all(root)?;
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        let driver = ProcessDriver {
            inner: Arc::new(Inner {
                root: root.to_owned(),
                bwrap,
                nsenter,
                cgroups: Cgroups::detect(as_root),
                hide,
                as_root,
            }),
        };
        driver.probe().await?;
        Ok(driver)
    }

    /// Why limits cannot be applied here, when they cannot.
    pub fn limits_unsupported(&self) -> Option<&str> {
        match &self.inner.cgroups {
            Cgroups::Unavailable(why) => Some(why),
            _ => None,
        }
    }

    /// Makes one throwaway sandbox's namespaces, to fail early and clearly
    /// where the host forbids them.
    async fn probe(&self) -> Result<()> {
        let out = tokio::process::Command::new(&self.inner.bwrap)
            .args(["--unshare-all", "--ro-bind", "/usr", "/usr"])
            .args(system_links())
            .args(["--proc", "/proc", "--dev", "/dev", "true"])
            .stdin(Stdio::null())
            .output()
            .await?;
        if out.status.success() {
            return Ok(());
        }
        Err(SandboxError::Unreachable(format!(
            "bubblewrap cannot make namespaces on this host ({}); allow unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1) or run backshift where Docker is available",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }

    fn dir(&self, id: &str) -> Result<PathBuf> {
        // Ids are ours: letters, digits and dashes only.
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(SandboxError::NotFound(id.to_owned()));
        }
        Ok(self.inner.root.join(id))
    }

    async fn load(&self, id: &str) -> Result<Record> {
        let path = self.dir(id)?.join("sandbox.json");
        let text = match tokio::fs::read(&path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SandboxError::NotFound(id.to_owned()));
            }
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&text).map_err(|e| SandboxError::Backend {
            op: "read sandbox record",
            message: format!("{}: {e}", path.display()),
        })
    }

    async fn save(&self, r: &Record) -> Result<()> {
        let dir = self.dir(&r.id)?;
        let tmp = dir.join("sandbox.json.tmp");
        let text = serde_json::to_vec_pretty(r).map_err(|e| SandboxError::Backend {
            op: "write sandbox record",
            message: e.to_string(),
        })?;
        tokio::fs::write(&tmp, text).await?;
        tokio::fs::rename(&tmp, dir.join("sandbox.json")).await?;
        Ok(())
    }

    /// The host pid of the sandbox's namespace, when it runs.
    fn running_pid(r: &Record) -> Option<i32> {
        let pid = r.pid?;
        (start_time(pid)? == r.pid_start?).then_some(pid)
    }

    /// Starts the sandbox's main process in new namespaces and records
    /// its pid.
    async fn start(&self, r: &mut Record) -> Result<()> {
        let dir = self.dir(&r.id)?;
        let fs = dir.join("fs");
        // Run by root, bubblewrap makes no user namespace: the sandbox's
        // processes are the host's user `uid` (as in a container), made
        // so by setpriv, which also empties their capability sets.
        // Otherwise a user namespace maps `uid` to the server's own user.
        let mut args: Vec<String> = if self.inner.as_root {
            [
                "--unshare-ipc",
                "--unshare-pid",
                "--unshare-net",
                "--unshare-uts",
                "--unshare-cgroup-try",
            ]
            .map(String::from)
            .to_vec()
        } else {
            vec![
                "--unshare-all".into(),
                "--uid".into(),
                r.uid.to_string(),
                "--gid".into(),
                r.gid.to_string(),
            ]
        };
        args.extend(["--new-session", "--hostname", "sandbox"].map(String::from));
        for d in SHOWN {
            if Path::new(d).is_dir() {
                args.extend(["--ro-bind".into(), d.to_owned(), d.to_owned()]);
            }
        }
        args.extend(system_links());
        args.extend([
            "--proc".into(),
            "/proc".into(),
            "--dev".into(),
            "/dev".into(),
        ]);
        args.extend(["--tmpfs".into(), "/run".into()]);
        // The directories that hold mount points, as a system has them
        // (bubblewrap would make them private to root).
        let targets = [HOME, "/tmp", "/var", r.workdir.as_str()]
            .into_iter()
            .chain(r.mounts.iter().map(|(_, t, _)| t.as_str()));
        let mut parents: Vec<&Path> = targets
            .flat_map(|t| Path::new(t).ancestors().skip(1))
            .filter(|p| *p != Path::new("/") && !SHOWN.iter().any(|t| p.starts_with(t)))
            .collect();
        parents.sort_by_key(|p| p.components().count());
        parents.dedup();
        for p in parents {
            args.extend([
                "--perms".into(),
                "0755".into(),
                "--dir".into(),
                p.display().to_string(),
            ]);
        }
        for (area, target) in [
            ("home", HOME.to_owned()),
            ("tmp", "/tmp".to_owned()),
            ("var", "/var".to_owned()),
            ("workspace", r.workdir.clone()),
        ] {
            args.extend(["--bind".into(), fs.join(area).display().to_string(), target]);
        }
        for hidden in &self.inner.hide {
            // Only what the sandbox would see: the rest is absent anyway
            // (and naming it would make its path appear).
            if !SHOWN.iter().any(|t| hidden.starts_with(t)) {
                continue;
            }
            let Ok(meta) = std::fs::metadata(hidden) else {
                continue;
            };
            let shown = hidden.display().to_string();
            if meta.is_dir() {
                args.extend(["--tmpfs".into(), shown]);
            } else {
                args.extend(["--ro-bind".into(), "/dev/null".into(), shown]);
            }
        }
        for (host, target, read_only) in &r.mounts {
            let how = if *read_only { "--ro-bind" } else { "--bind" };
            args.extend([how.into(), host.display().to_string(), target.clone()]);
        }
        args.extend([
            "--chdir".into(),
            r.workdir.clone(),
            "--info-fd".into(),
            "3".into(),
        ]);
        args.push("--".into());
        if self.inner.as_root {
            args.extend(
                [
                    "setpriv",
                    "--reuid",
                    &r.uid.to_string(),
                    "--regid",
                    &r.gid.to_string(),
                    "--clear-groups",
                    "--bounding-set",
                    "-all",
                    "--inh-caps",
                    "-all",
                    "--no-new-privs",
                    "--",
                ]
                .map(String::from),
            );
        }
        args.extend(r.command.iter().cloned());

        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("main.log"))?;
        let (info_read, info_write) = std::io::pipe()?;
        let mut cmd = std::process::Command::new(&self.inner.bwrap);
        cmd.args(&args)
            .env_clear()
            .envs(base_env(r))
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let procs = self.inner.cgroups.procs_files(&r.id);
        let setup = ChildSetup {
            procs,
            info_fd: Some(info_write.as_raw_fd()),
            session: true,
        };
        // SAFETY: the closure only makes async-signal-safe system calls
        // on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || setup.apply());
        }
        let mut child = cmd.spawn().map_err(|e| SandboxError::Backend {
            op: "start bwrap",
            message: e.to_string(),
        })?;
        drop(info_write);
        let info = tokio::task::spawn_blocking(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut { info_read }, &mut text).map(|_| text)
        })
        .await
        .map_err(|e| SandboxError::Backend {
            op: "start bwrap",
            message: e.to_string(),
        })??;
        // Reap it whenever it ends (a stop, or its main process exiting).
        std::thread::spawn(move || child.wait());
        let pid = serde_json::from_str::<serde_json::Value>(&info)
            .ok()
            .and_then(|v| v.get("child-pid")?.as_i64())
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| SandboxError::Backend {
                op: "start bwrap",
                message: format!(
                    "bubblewrap did not start the sandbox: {}",
                    std::fs::read_to_string(dir.join("main.log"))
                        .unwrap_or_default()
                        .lines()
                        .last()
                        .unwrap_or("no output")
                ),
            })?;
        r.pid = Some(pid);
        r.pid_start = start_time(pid);
        self.save(r).await?;
        // Ready once bubblewrap has set the sandbox up and started its
        // main process (until then, the namespace is half made).
        for _ in 0..1000 {
            if main_started(pid) {
                return Ok(());
            }
            if start_time(pid) != r.pid_start {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Err(SandboxError::Backend {
            op: "start bwrap",
            message: format!(
                "the sandbox's main process did not start: {}",
                std::fs::read_to_string(dir.join("main.log"))
                    .unwrap_or_default()
                    .lines()
                    .last()
                    .unwrap_or("no output")
            ),
        })
    }

    /// Kills every process of the sandbox and waits until they are gone.
    async fn kill(&self, r: &mut Record) -> Result<()> {
        if let Some(pid) = Self::running_pid(r) {
            // The first process of a PID namespace takes all the others
            // with it.
            // SAFETY: kill has no memory preconditions.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            for _ in 0..500 {
                if start_time(pid) != r.pid_start {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // What entered from outside (nsenter) goes too.
        self.inner.cgroups.kill_all(&r.id).await;
        r.pid = None;
        r.pid_start = None;
        self.save(r).await
    }

    /// Runs `argv` in the sandbox as its user, in `workdir`.
    async fn run(
        &self,
        r: &Record,
        spec: &ExecSpec,
        on_output: &mut (dyn FnMut(OutputChunk) + Send),
    ) -> Result<i64> {
        let Some(pid) = Self::running_pid(r) else {
            return Err(SandboxError::Backend {
                op: "exec",
                message: format!("sandbox {} is stopped", r.id),
            });
        };
        if let Some(user) = &spec.user
            && *user != format!("{}:{}", r.uid, r.gid)
            && *user != r.uid.to_string()
        {
            return Err(SandboxError::Backend {
                op: "exec",
                message: format!(
                    "the process driver runs everything as the sandbox's user ({}:{}), not {user}",
                    r.uid, r.gid
                ),
            });
        }
        let workdir = spec.workdir.clone().unwrap_or_else(|| r.workdir.clone());
        let mut cmd = std::process::Command::new(&self.inner.nsenter);
        cmd.args(["-t", &pid.to_string()]);
        if !self.inner.as_root {
            cmd.arg("-U");
        }
        cmd.args(["-m", "-n", "-p", "-i", "-u", "-C", "-r", "-w"])
            .args(["-S", &r.uid.to_string(), "-G", &r.gid.to_string()])
            .args(["--", "env", "-C", &workdir, "--"])
            .args(&spec.argv)
            .env_clear()
            .envs(base_env(r))
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir("/")
            .stdin(if spec.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let setup = ChildSetup {
            procs: self.inner.cgroups.procs_files(&r.id),
            info_fd: None,
            session: false,
        };
        // SAFETY: as in `start`.
        unsafe {
            cmd.pre_exec(move || setup.apply());
        }
        let mut child =
            tokio::process::Command::from(cmd)
                .spawn()
                .map_err(|e| SandboxError::Backend {
                    op: "exec",
                    message: e.to_string(),
                })?;
        if let (Some(input), Some(mut stdin)) = (spec.stdin.clone(), child.stdin.take()) {
            tokio::spawn(async move {
                let _ = stdin.write_all(&input).await;
            });
        }
        let mut out = child.stdout.take().ok_or_else(|| SandboxError::Backend {
            op: "exec",
            message: "no stdout".into(),
        })?;
        let mut err = child.stderr.take().ok_or_else(|| SandboxError::Backend {
            op: "exec",
            message: "no stderr".into(),
        })?;
        let (mut out_buf, mut err_buf) = (vec![0u8; 32 * 1024], vec![0u8; 32 * 1024]);
        let (mut out_open, mut err_open) = (true, true);
        let mut status = None;
        // Once the command ended, what it left running in the background
        // may hold its output open: what is already written is read, then
        // the command is done (as `docker exec` is).
        let drained = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(drained);
        while out_open || err_open {
            tokio::select! {
                n = out.read(&mut out_buf), if out_open => match n {
                    Ok(0) | Err(_) => out_open = false,
                    Ok(n) => on_output(OutputChunk::Stdout(Bytes::copy_from_slice(&out_buf[..n]))),
                },
                n = err.read(&mut err_buf), if err_open => match n {
                    Ok(0) | Err(_) => err_open = false,
                    Ok(n) => on_output(OutputChunk::Stderr(Bytes::copy_from_slice(&err_buf[..n]))),
                },
                s = child.wait(), if status.is_none() => {
                    status = Some(s?);
                    drained.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(100));
                }
                () = &mut drained => break,
            }
        }
        let status = match status {
            Some(s) => s,
            None => child.wait().await?,
        };
        // nsenter failing because the sandbox went meanwhile is the
        // sandbox's end, not the command's.
        if !status.success() && Self::running_pid(r).is_none() {
            return Err(SandboxError::Backend {
                op: "exec",
                message: format!("sandbox {} stopped while the command ran", r.id),
            });
        }
        Ok(exit_code(status))
    }

    async fn run_collect(&self, r: &Record, spec: &ExecSpec) -> Result<crate::ExecOutput> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let exit_code = self
            .run(r, spec, &mut |c| match c {
                OutputChunk::Stdout(b) => stdout.extend_from_slice(&b),
                OutputChunk::Stderr(b) => stderr.extend_from_slice(&b),
            })
            .await?;
        Ok(crate::ExecOutput {
            exit_code,
            stdout,
            stderr,
        })
    }
}

/// The host's `/bin`, `/lib`... as they are there: links into `/usr` on a
/// merged-usr system, read-only directories otherwise.
fn system_links() -> Vec<String> {
    let mut args = Vec::new();
    for d in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(d);
        match std::fs::read_link(&host) {
            Ok(target) => args.extend([
                "--symlink".into(),
                target.display().to_string(),
                format!("/{d}"),
            ]),
            Err(_) if host.is_dir() => args.extend([
                "--ro-bind".into(),
                host.display().to_string(),
                format!("/{d}"),
            ]),
            Err(_) => {}
        }
    }
    args
}

fn base_env(r: &Record) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_owned(), PATH.to_owned()),
        ("HOME".to_owned(), HOME.to_owned()),
    ];
    env.extend(r.env.iter().cloned());
    env
}

fn exit_code(status: std::process::ExitStatus) -> i64 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => i64::from(c),
        (None, Some(sig)) => 128 + i64::from(sig),
        (None, None) => -1,
    }
}

/// Whether bubblewrap's process `pid` (the first of the namespace) has a
/// child that is no longer bubblewrap: the main command, started once the
/// namespace is complete.
fn main_started(pid: i32) -> bool {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children.split_whitespace().any(|c| {
        std::fs::read_to_string(format!("/proc/{c}/comm")).is_ok_and(|comm| comm.trim() != "bwrap")
    })
}

/// A process's start time (field 22 of `/proc/<pid>/stat`).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: count from its closing paren.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What a child does between fork and exec, prepared beforehand.
struct ChildSetup {
    /// `cgroup.procs` files to join.
    procs: Vec<CString>,
    /// Where bubblewrap's `--info-fd 3` comes from.
    info_fd: Option<i32>,
    /// A session of its own (signals to the server's terminal do not
    /// reach it).
    session: bool,
}

impl ChildSetup {
    fn apply(&self) -> std::io::Result<()> {
        let last = || Err(std::io::Error::last_os_error());
        // SAFETY: async-signal-safe calls on memory owned by `self`, which
        // the child inherited intact.
        unsafe {
            let pid = libc::getpid();
            let mut digits = [0u8; 16];
            let mut n = digits.len();
            let mut p = pid as u32;
            loop {
                n -= 1;
                digits[n] = b'0' + (p % 10) as u8;
                p /= 10;
                if p == 0 {
                    break;
                }
            }
            for file in &self.procs {
                let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return last();
                }
                let written = libc::write(fd, digits[n..].as_ptr().cast(), digits.len() - n);
                libc::close(fd);
                if written < 0 {
                    return last();
                }
            }
            if let Some(fd) = self.info_fd
                && libc::dup2(fd, 3) < 0
            {
                return last();
            }
            if self.session && libc::setsid() < 0 {
                return last();
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                return last();
            }
        }
        Ok(())
    }
}

/// The sandboxes' control groups: v1 hierarchies or the v2 tree, under
/// `backshift/<id>`; unavailable where the server may not make them.
enum Cgroups {
    V1(PathBuf),
    V2(PathBuf),
    Unavailable(String),
}

const V1_CONTROLLERS: [&str; 4] = ["memory", "pids", "cpu", "cpuacct"];

impl Cgroups {
    fn detect(as_root: bool) -> Cgroups {
        let base = Path::new("/sys/fs/cgroup");
        if !as_root {
            return Cgroups::Unavailable(
                "the server does not run as root, so it cannot make control groups: memory, process and CPU limits are not applied".into(),
            );
        }
        if base.join("cgroup.controllers").is_file() {
            let ours = base.join("backshift");
            let made = std::fs::create_dir_all(&ours).and_then(|()| {
                for (dir, controllers) in
                    [(base, "+memory +pids +cpu"), (&ours, "+memory +pids +cpu")]
                {
                    std::fs::write(dir.join("cgroup.subtree_control"), controllers)?;
                }
                Ok(())
            });
            return match made {
                Ok(()) => Cgroups::V2(ours),
                Err(e) => Cgroups::Unavailable(format!(
                    "cannot enable the memory, pids and cpu controllers in {}: {e}",
                    ours.display()
                )),
            };
        }
        let missing: Vec<&str> = V1_CONTROLLERS
            .into_iter()
            .filter(|c| !base.join(c).join("cgroup.procs").is_file())
            .collect();
        if missing.is_empty() {
            Cgroups::V1(base.to_owned())
        } else {
            Cgroups::Unavailable(format!(
                "no cgroup v2 tree and no v1 hierarchy for {} under {}",
                missing.join(", "),
                base.display()
            ))
        }
    }

    /// The sandbox's group directories (one per v1 hierarchy, without
    /// repeats where controllers share one).
    fn dirs(&self, id: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V1(base) => {
                let mut seen: Vec<PathBuf> = Vec::new();
                let mut dirs = Vec::new();
                for c in V1_CONTROLLERS {
                    let hierarchy = base.join(c);
                    let real = std::fs::canonicalize(&hierarchy).unwrap_or(hierarchy.clone());
                    if !seen.contains(&real) {
                        seen.push(real);
                        dirs.push(hierarchy.join("backshift").join(id));
                    }
                }
                dirs
            }
            Cgroups::V2(ours) => vec![ours.join(id)],
            Cgroups::Unavailable(_) => Vec::new(),
        }
    }

    fn dir_of(&self, id: &str, controller: &str) -> Option<PathBuf> {
        match self {
            Cgroups::V1(base) => Some(base.join(controller).join("backshift").join(id)),
            Cgroups::V2(ours) => Some(ours.join(id)),
            Cgroups::Unavailable(_) => None,
        }
    }

    fn create(&self, id: &str, limits: &ResourceLimits) -> std::io::Result<()> {
        for dir in self.dirs(id) {
            std::fs::create_dir_all(&dir)?;
        }
        let quota = limits.nano_cpus.saturating_mul(100_000) / 1_000_000_000;
        match self {
            Cgroups::V1(_) => {
                let at = |c: &str, file: &str| self.dir_of(id, c).unwrap_or_default().join(file);
                std::fs::write(
                    at("memory", "memory.limit_in_bytes"),
                    limits.memory_bytes.to_string(),
                )?;
                // No swap beyond it, where swap is accounted.
                let memsw = at("memory", "memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    std::fs::write(memsw, limits.memory_bytes.to_string())?;
                }
                std::fs::write(at("pids", "pids.max"), limits.pids.to_string())?;
                std::fs::write(at("cpu", "cpu.cfs_period_us"), "100000")?;
                std::fs::write(at("cpu", "cpu.cfs_quota_us"), quota.max(1000).to_string())?;
            }
            Cgroups::V2(ours) => {
                let dir = ours.join(id);
                std::fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    std::fs::write(swap, "0")?;
                }
                std::fs::write(dir.join("pids.max"), limits.pids.to_string())?;
                std::fs::write(dir.join("cpu.max"), format!("{} 100000", quota.max(1000)))?;
            }
            Cgroups::Unavailable(_) => {}
        }
        Ok(())
    }

    fn procs_files(&self, id: &str) -> Vec<CString> {
        self.dirs(id)
            .into_iter()
            .filter_map(|d| {
                CString::new(d.join("cgroup.procs").into_os_string().into_encoded_bytes()).ok()
            })
            .collect()
    }

    /// Kills whatever is left in the sandbox's groups.
    async fn kill_all(&self, id: &str) {
        for _ in 0..200 {
            let mut left = false;
            for dir in self.dirs(id) {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    left = true;
                    // SAFETY: kill has no memory preconditions.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            if !left {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn remove(&self, id: &str) {
        self.kill_all(id).await;
        for dir in self.dirs(id) {
            for _ in 0..100 {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
    }

    fn read(&self, id: &str, controller: &str, file: &str) -> Option<String> {
        std::fs::read_to_string(self.dir_of(id, controller)?.join(file)).ok()
    }

    fn read_u64(&self, id: &str, controller: &str, file: &str) -> Option<u64> {
        self.read(id, controller, file)?.trim().parse().ok()
    }

    /// Memory in use less what the kernel could drop at once.
    fn memory(&self, id: &str) -> Option<u64> {
        let (current, stat_key) = match self {
            Cgroups::V1(_) => (
                self.read_u64(id, "memory", "memory.usage_in_bytes")?,
                "total_inactive_file",
            ),
            Cgroups::V2(_) => (
                self.read_u64(id, "memory", "memory.current")?,
                "inactive_file",
            ),
            Cgroups::Unavailable(_) => return None,
        };
        let stat = self.read(id, "memory", "memory.stat").unwrap_or_default();
        let inactive = stat
            .lines()
            .find_map(|l| l.strip_prefix(stat_key)?.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Some(current.saturating_sub(inactive))
    }

    /// CPU time used, nanoseconds.
    fn cpu_ns(&self, id: &str) -> Option<u64> {
        match self {
            Cgroups::V1(_) => self.read_u64(id, "cpuacct", "cpuacct.usage"),
            Cgroups::V2(_) => self
                .read(id, "cpu", "cpu.stat")?
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse::<u64>().ok())
                .map(|us| us * 1000),
            Cgroups::Unavailable(_) => None,
        }
    }
}

/// Bytes of the files under `dir`, links not followed.
fn disk_use(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = e.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

/// Removes a tree the sandbox may have made unwritable to its owner.
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => {
            let mut stack = vec![dir.to_owned()];
            while let Some(d) = stack.pop() {
                let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700));
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
            std::fs::remove_dir_all(dir)
        }
    }
}

fn parse_user(user: &str) -> Result<(u32, u32)> {
    let bad = || SandboxError::Backend {
        op: "create sandbox",
        message: format!("the process driver needs a numeric uid:gid, not {user:?}"),
    };
    let (u, g) = user.split_once(':').unwrap_or((user, user));
    Ok((u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?))
}

#[async_trait]
impl SandboxDriver for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<SandboxId> {
        if spec.limits.disk_bytes.is_some() {
            return Err(SandboxError::DiskLimitUnsupported(
                "the process driver keeps a sandbox's files in a directory of the host, without a quota".into(),
            ));
        }
        let (uid, gid) = parse_user(&spec.user)?;
        if uid == 0 {
            return Err(SandboxError::Backend {
                op: "create sandbox",
                message: "a sandbox never runs as root".into(),
            });
        }
        let prefix: String = spec
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(40)
            .collect();
        let id = format!("{prefix}-{}", hex::encode(rand::random::<[u8; 6]>()));
        let dir = self.dir(&id)?;
        let fs = dir.join("fs");
        for area in ["home", "tmp", "var/tmp", "workspace"] {
            std::fs::create_dir_all(fs.join(area))?;
        }
        if self.inner.as_root {
            for area in ["home", "tmp", "var", "var/tmp", "workspace"] {
                std::os::unix::fs::chown(fs.join(area), Some(uid), Some(gid))?;
            }
        }
        let mut record = Record {
            id: id.clone(),
            labels: spec.labels.clone(),
            uid,
            gid,
            workdir: spec.workdir.clone(),
            env: spec.env.clone(),
            mounts: spec
                .mounts
                .iter()
                .map(|m| (m.host.clone(), m.target.clone(), m.read_only))
                .collect(),
            command: spec
                .command
                .clone()
                .unwrap_or_else(|| vec!["sleep".into(), "infinity".into()]),
            memory_bytes: spec.limits.memory_bytes,
            nano_cpus: spec.limits.nano_cpus,
            pids: spec.limits.pids,
            pid: None,
            pid_start: None,
        };
        self.save(&record).await?;
        let started = async {
            self.inner
                .cgroups
                .create(&id, &spec.limits)
                .map_err(|e| SandboxError::Backend {
                    op: "apply limits",
                    message: e.to_string(),
                })?;
            self.start(&mut record).await
        }
        .await;
        if let Err(e) = started {
            let _ = self.destroy(&SandboxId(id)).await;
            return Err(e);
        }
        Ok(SandboxId(id))
    }

    async fn exec(
        &self,
        id: &SandboxId,
        spec: &ExecSpec,
        on_output: &mut (dyn FnMut(OutputChunk) + Send),
    ) -> Result<i64> {
        let r = self.load(&id.0).await?;
        self.run(&r, spec, on_output).await
    }

    async fn copy_in(&self, id: &SandboxId, dest: &str, tar: Bytes) -> Result<()> {
        let r = self.load(&id.0).await?;
        let mut spec = ExecSpec::new(["tar", "-x", "-p", "-f", "-", "-C", dest]);
        spec.stdin = Some(tar);
        let out = self.run_collect(&r, &spec).await?;
        if out.exit_code != 0 {
            return Err(SandboxError::Backend {
                op: "copy in",
                message: format!(
                    "into {dest}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(())
    }

    async fn copy_out(&self, id: &SandboxId, path: &str) -> Result<Bytes> {
        let r = self.load(&id.0).await?;
        let p = Path::new(path);
        let (parent, name) = match (p.parent(), p.file_name()) {
            (Some(parent), Some(name)) => (
                parent.display().to_string(),
                name.to_string_lossy().into_owned(),
            ),
            _ => ("/".to_owned(), ".".to_owned()),
        };
        let spec = ExecSpec::new(["tar", "-c", "-f", "-", "-C", &parent, "--", &name]);
        let out = self.run_collect(&r, &spec).await?;
        if out.exit_code != 0 {
            let why = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if why.contains("No such file") {
                return Err(SandboxError::NotFound(format!(
                    "{path} in sandbox {}",
                    id.0
                )));
            }
            return Err(SandboxError::Backend {
                op: "copy out",
                message: format!("{path}: {why}"),
            });
        }
        Ok(out.stdout.into())
    }

    async fn destroy(&self, id: &SandboxId) -> Result<()> {
        let dir = self.dir(&id.0)?;
        match self.load(&id.0).await {
            Ok(mut r) => self.kill(&mut r).await?,
            Err(SandboxError::NotFound(_)) if !dir.exists() => return Ok(()),
            Err(_) => {}
        }
        self.inner.cgroups.remove(&id.0).await;
        tokio::task::spawn_blocking(move || remove_tree(&dir))
            .await
            .map_err(|e| SandboxError::Backend {
                op: "remove sandbox",
                message: e.to_string(),
            })??;
        Ok(())
    }

    async fn list(&self, wanted: &[(&str, &str)]) -> Result<Vec<SandboxInfo>> {
        let mut found = Vec::new();
        let mut entries = tokio::fs::read_dir(&self.inner.root).await?;
        while let Some(entry) = entries.next_entry().await? {
            let id = entry.file_name().to_string_lossy().into_owned();
            let Ok(r) = self.load(&id).await else {
                continue;
            };
            if wanted
                .iter()
                .all(|(k, v)| r.labels.get(*k).map(String::as_str) == Some(*v))
            {
                found.push(SandboxInfo {
                    running: Self::running_pid(&r).is_some(),
                    id: SandboxId(id),
                    labels: r.labels,
                });
            }
        }
        found.sort_by(|a, b| a.id.0.cmp(&b.id.0));
        Ok(found)
    }

    async fn usage(&self, id: &SandboxId) -> Result<SandboxUsage> {
        let r = self.load(&id.0).await?;
        let running = Self::running_pid(&r).is_some();
        let cg = &self.inner.cgroups;
        let before = cg.cpu_ns(&id.0);
        let t0 = std::time::Instant::now();
        if running && before.is_some() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let cpu_percent = match (before, cg.cpu_ns(&id.0)) {
            (Some(a), Some(b)) if running => {
                Some(b.saturating_sub(a) as f64 / t0.elapsed().as_nanos() as f64 * 100.0)
            }
            _ => None,
        };
        let fs = self.dir(&id.0)?.join("fs");
        let disk = tokio::task::spawn_blocking(move || disk_use(&fs))
            .await
            .unwrap_or(0);
        Ok(SandboxUsage {
            running,
            cpu_percent,
            memory_bytes: if running {
                cg.memory(&id.0).unwrap_or(0)
            } else {
                0
            },
            memory_limit_bytes: u64::try_from(r.memory_bytes).unwrap_or(0),
            pids: if running {
                cg.read_u64(&id.0, "pids", "pids.current").unwrap_or(0)
            } else {
                0
            },
            disk_bytes: Some(disk),
            disk_limit_bytes: None,
        })
    }

    async fn stop(&self, id: &SandboxId) -> Result<()> {
        let mut r = self.load(&id.0).await?;
        self.kill(&mut r).await
    }

    async fn resume(&self, id: &SandboxId) -> Result<()> {
        let mut r = self.load(&id.0).await?;
        if Self::running_pid(&r).is_some() {
            return Ok(());
        }
        self.inner.cgroups.kill_all(&id.0).await;
        self.start(&mut r).await
    }
}
