//! The Docker driver, on bollard. Works with engines from API 1.41 on: the
//! client negotiates the version and uses no newer field.

use crate::{
    ExecSpec, OutputChunk, ResourceLimits, Result, SandboxDriver, SandboxError, SandboxId,
    SandboxInfo, SandboxSpec, SandboxUsage,
};
use async_trait::async_trait;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
use bollard::query_parameters::{
    CommitContainerOptions, CreateContainerOptions, DownloadFromContainerOptions,
    ListContainersOptions, ListImagesOptions, RemoveContainerOptions, RemoveImageOptions,
    UploadToContainerOptions,
};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

/// Sandboxes as Docker containers: non-root, all capabilities dropped,
/// no-new-privileges, memory/CPU/pids limits, an init process, and no
/// network at all (until the egress proxy gives them a fenced one). The
/// only host paths mounted are the ones the spec names (backshift's binary
/// read-only, the shim's directory); never the Docker socket.
/// An image build (see [`DockerDriver::build_image`]).
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// A tar of the build context.
    pub context_tar: Vec<u8>,
    /// The Dockerfile, relative to the context.
    pub dockerfile: String,
    /// The image to make.
    pub tag: String,
    /// Build arguments.
    pub args: BTreeMap<String, String>,
    /// The image's labels.
    pub labels: BTreeMap<String, String>,
    /// Whether `RUN` steps get a network.
    pub network: bool,
}

#[derive(Clone)]
pub struct DockerDriver {
    docker: Docker,
}

impl DockerDriver {
    /// Connects to the local daemon (`DOCKER_HOST` or the default socket)
    /// and negotiates the API version.
    pub async fn connect() -> Result<DockerDriver> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| SandboxError::Unreachable(e.to_string()))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| SandboxError::Unreachable(e.to_string()))?;
        Ok(DockerDriver { docker })
    }

    /// The underlying client, for image management.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// Checks that the daemon answers; returns its version.
    pub async fn ping(&self) -> Result<String> {
        let v = self
            .docker
            .version()
            .await
            .map_err(|e| SandboxError::Unreachable(e.to_string()))?;
        Ok(format!(
            "engine {} (API {})",
            v.version.unwrap_or_default(),
            v.api_version.unwrap_or_default()
        ))
    }

    /// Builds `build.tag`, handing each line of the build's output to
    /// `line`. Without `build.network` the build's `RUN` steps have no
    /// network (the repository's Dockerfile runs on this host; it gets no
    /// way out unless the server allows it).
    pub async fn build_image(
        &self,
        build: BuildSpec,
        line: &mut (dyn FnMut(String) + Send),
    ) -> Result<()> {
        let tag = build.tag.clone();
        let options = bollard::query_parameters::BuildImageOptions {
            dockerfile: build.dockerfile,
            t: Some(build.tag),
            rm: true,
            forcerm: true,
            buildargs: Some(build.args.into_iter().collect()),
            labels: Some(build.labels.into_iter().collect()),
            networkmode: Some(if build.network { "default" } else { "none" }.to_owned()),
            ..Default::default()
        };
        let mut stream = self.docker.build_image(
            options,
            None,
            Some(bollard::body_full(Bytes::from(build.context_tar))),
        );
        let mut last = String::new();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| backend("build image", e))?;
            if let Some(text) = info.stream.as_deref().or(info.status.as_deref()) {
                for l in text.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
                    last = l.to_owned();
                    line(l.to_owned());
                }
            }
            if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                return Err(SandboxError::Backend {
                    op: "build image",
                    message: detail,
                });
            }
        }
        if !self.image_exists(&tag).await? {
            return Err(SandboxError::Backend {
                op: "build image",
                message: format!("the build ended without an image ({last})"),
            });
        }
        Ok(())
    }

    /// Makes image `reference` of `base` plus one layer, `layer_tar` (an
    /// uncompressed tar of the files it adds), with `labels` added to the
    /// base's, through `docker load`: the engine already has the base's
    /// layers, so it registers only the new one (one extraction, no
    /// container, no commit).
    pub async fn add_layer(
        &self,
        base: &str,
        layer_tar: Vec<u8>,
        reference: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<()> {
        use sha2::Digest;
        let image = self
            .docker
            .inspect_image(base)
            .await
            .map_err(|e| backend("inspect image", e))?;
        let mut config = image.config.unwrap_or_default();
        let mut all = config.labels.take().unwrap_or_default();
        all.extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        config.labels = Some(all);
        let mut diff_ids = image.root_fs.and_then(|r| r.layers).unwrap_or_default();
        diff_ids.push(format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(&layer_tar))
        ));
        let config_json = serde_json::json!({
            "architecture": image.architecture.unwrap_or_else(|| "amd64".into()),
            "os": image.os.unwrap_or_else(|| "linux".into()),
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        // Layers the engine has are not read: only the last file exists.
        let layers: Vec<String> = (0..diff_ids.len())
            .map(|i| format!("{i}/layer.tar"))
            .collect();
        let manifest = serde_json::json!([{
            "Config": "config.json",
            "RepoTags": [reference],
            "Layers": layers,
        }]);
        let mut archive = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            archive.append_data(&mut header, name, data)
        };
        let io = |e: std::io::Error| SandboxError::Io(e);
        add("config.json", config_json.to_string().as_bytes()).map_err(io)?;
        add("manifest.json", manifest.to_string().as_bytes()).map_err(io)?;
        add(&format!("{}/layer.tar", diff_ids.len() - 1), &layer_tar).map_err(io)?;
        let body = archive.into_inner().map_err(io)?;
        let mut load = self.docker.import_image(
            bollard::query_parameters::ImportImageOptions {
                quiet: true,
                ..Default::default()
            },
            bollard::body_full(Bytes::from(body)),
            None,
        );
        while let Some(said) = load.next().await {
            said.map_err(|e| backend("load image", e))?;
        }
        if !self.image_exists(reference).await? {
            return Err(SandboxError::Backend {
                op: "load image",
                message: format!("{reference} was not made"),
            });
        }
        Ok(())
    }

    /// The id of `image` when it exists locally.
    pub async fn image_id(&self, image: &str) -> Result<Option<String>> {
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(i.id),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(backend("inspect image", e)),
        }
    }

    /// Whether `image` exists locally.
    pub async fn image_exists(&self, image: &str) -> Result<bool> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(backend("inspect image", e)),
        }
    }
}

/// A sandbox's own Docker engine: what [`DockerDriver::create_engine`]
/// makes.
#[derive(Debug, Clone)]
pub struct EngineSpec {
    /// The sandbox whose network namespace the engine joins (its
    /// loopback is the only network either has).
    pub sandbox: SandboxId,
    /// Image with `dockerd` (see [`crate::image::ENGINE`]).
    pub image: String,
    /// A readable name prefix.
    pub name: String,
    /// Labels (the sandbox's, with its role).
    pub labels: BTreeMap<String, String>,
    /// Limits (the sandbox's: what the engine runs counts against them).
    pub limits: ResourceLimits,
    /// Host directory for the engine's images and containers.
    pub data_dir: PathBuf,
    /// Host directory where the engine makes `docker.sock`, which the
    /// sandbox has mounted.
    pub socket_dir: PathBuf,
    /// The group given the socket (the sandbox user's).
    pub socket_gid: u64,
    /// Environment of `dockerd` (the egress proxy, for pulls).
    pub env: Vec<(String, String)>,
}

/// Where the engine container has its socket directory.
const ENGINE_SOCKET_DIR: &str = "/run/backshift-docker";

impl DockerDriver {
    /// Starts a Docker engine for one sandbox: a privileged container
    /// running `dockerd` in the sandbox's network namespace, with its
    /// data in `data_dir` and its socket in `socket_dir` (never the
    /// host's socket). It has no bridge and no iptables: its containers
    /// get the sandbox's loopback with `--network host`, else none.
    /// Removing it (`destroy`) removes everything it ran.
    pub async fn create_engine(&self, spec: &EngineSpec) -> Result<SandboxId> {
        if !self.image_exists(&spec.image).await? {
            return Err(SandboxError::ImageMissing(spec.image.clone()));
        }
        let suffix: u32 = rand::rng().random();
        let name = format!("{}-{suffix:08x}", spec.name);
        let bind = |host: &Path, target: &str| Mount {
            target: Some(target.into()),
            source: Some(host.display().to_string()),
            typ: Some(MountType::BIND),
            read_only: Some(false),
            ..Default::default()
        };
        let host_config = HostConfig {
            // dockerd makes namespaces, cgroups and mounts: it gets every
            // capability (but CAP_SYS_RESOURCE, which some hosts' daemons
            // do not hold themselves, so `privileged` fails there), no
            // seccomp or AppArmor profile, and the host's cgroup tree,
            // writable (its containers go under its own group). This is
            // the risk the README states.
            cap_add: Some(vec!["ALL".into()]),
            cap_drop: Some(vec!["SYS_RESOURCE".into()]),
            security_opt: Some(vec![
                "seccomp=unconfined".into(),
                "apparmor=unconfined".into(),
            ]),
            // /proc and /sys as they are (`systempaths=unconfined`).
            masked_paths: Some(Vec::new()),
            readonly_paths: Some(Vec::new()),
            memory: Some(spec.limits.memory_bytes),
            memory_swap: Some(spec.limits.memory_bytes),
            nano_cpus: Some(spec.limits.nano_cpus),
            pids_limit: Some(spec.limits.pids),
            init: Some(true),
            network_mode: Some(format!("container:{}", spec.sandbox.0)),
            mounts: Some(vec![
                bind(&spec.data_dir, "/var/lib/docker"),
                bind(&spec.socket_dir, ENGINE_SOCKET_DIR),
                bind(Path::new("/sys/fs/cgroup"), "/sys/fs/cgroup"),
            ]),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            user: Some("0:0".into()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(spec.labels.clone().into_iter().collect::<HashMap<_, _>>()),
            // Its containers' groups under the engine's own (found at
            // start: cgroup v1 shows the host's path, v2 its namespace's
            // root), so the engine's limits hold them too.
            cmd: Some(vec![
                "sh".into(),
                "-c".into(),
                format!(
                    r#"parent=$(awk -F: '$2 == "memory" || $2 == "" {{ print $3; exit }}' /proc/self/cgroup); exec dockerd --host=unix://{ENGINE_SOCKET_DIR}/docker.sock --group={} --bridge=none --iptables=false --ip6tables=false --userland-proxy=false --storage-driver=overlay2 --cgroup-parent="${{parent%/}}/engine""#,
                    spec.socket_gid
                ),
            ]),
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| backend("create engine container", e))?;
        let id = SandboxId(created.id);
        if let Err(e) = self.docker.start_container(&id.0, None).await {
            let _ = self.destroy(&id).await;
            return Err(backend("start engine container", e));
        }
        Ok(id)
    }

    /// The end of a container's output (an engine that would not start
    /// says why there).
    pub async fn log_tail(&self, id: &SandboxId, lines: usize) -> String {
        let options = bollard::query_parameters::LogsOptions {
            stdout: true,
            stderr: true,
            tail: lines.to_string(),
            ..Default::default()
        };
        let mut out = String::new();
        let mut logs = self.docker.logs(&id.0, Some(options));
        while let Some(Ok(chunk)) = logs.next().await {
            out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
        }
        out
    }
}

/// A Docker `filters` value matching everything that carries all of
/// `labels`.
fn label_filters(labels: &[(&str, &str)]) -> HashMap<String, Vec<String>> {
    HashMap::from([(
        "label".to_owned(),
        labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
    )])
}

fn backend(op: &'static str, e: bollard::errors::Error) -> SandboxError {
    match e {
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            message,
        } => SandboxError::NotFound(message),
        bollard::errors::Error::DockerResponseServerError { message, .. } => {
            SandboxError::Backend { op, message }
        }
        other => {
            let message = other.to_string();
            if message.contains("connect") || message.contains("No such file") {
                SandboxError::Unreachable(message)
            } else {
                SandboxError::Backend { op, message }
            }
        }
    }
}

#[async_trait]
impl SandboxDriver for DockerDriver {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<SandboxId> {
        if !self.image_exists(&spec.image).await? {
            return Err(SandboxError::ImageMissing(spec.image.clone()));
        }
        let suffix: u32 = rand::rng().random();
        let name = format!("{}-{suffix:08x}", spec.name);
        let host_config = HostConfig {
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            memory: Some(spec.limits.memory_bytes),
            memory_swap: Some(spec.limits.memory_bytes),
            nano_cpus: Some(spec.limits.nano_cpus),
            pids_limit: Some(spec.limits.pids),
            init: Some(true),
            network_mode: Some("none".into()),
            privileged: Some(false),
            storage_opt: spec
                .limits
                .disk_bytes
                .map(|b| HashMap::from([("size".to_owned(), b.to_string())])),
            mounts: (!spec.mounts.is_empty()).then(|| {
                spec.mounts
                    .iter()
                    .map(|m| Mount {
                        target: Some(m.target.clone()),
                        source: Some(m.host.display().to_string()),
                        typ: Some(MountType::BIND),
                        read_only: Some(m.read_only),
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            user: Some(spec.user.clone()),
            working_dir: Some(spec.workdir.clone()),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(spec.labels.clone().into_iter().collect::<HashMap<_, _>>()),
            cmd: Some(
                spec.command
                    .clone()
                    .unwrap_or_else(|| vec!["sleep".into(), "infinity".into()]),
            ),
            hostname: Some("sandbox".into()),
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        let created = self.docker.create_container(Some(options), body).await;
        if created.is_err() {
            // Docker can leave a half-made container behind a refusal (a
            // storage option it cannot apply): it goes.
            let _ = self
                .docker
                .remove_container(
                    &name,
                    Some(RemoveContainerOptions {
                        force: true,
                        ..Default::default()
                    }),
                )
                .await;
        }
        let created = created.map_err(|e| match e {
            // overlay2 on anything but xfs with project quotas, and
            // most other storage drivers.
            bollard::errors::Error::DockerResponseServerError { message, .. }
                if spec.limits.disk_bytes.is_some() && message.contains("storage-opt") =>
            {
                SandboxError::DiskLimitUnsupported(message)
            }
            e => backend("create container", e),
        })?;
        let id = SandboxId(created.id);
        if let Err(e) = self.docker.start_container(&id.0, None).await {
            let _ = self.destroy(&id).await;
            return Err(backend("start container", e));
        }
        Ok(id)
    }

    async fn exec(
        &self,
        id: &SandboxId,
        spec: &ExecSpec,
        on_output: &mut (dyn FnMut(OutputChunk) + Send),
    ) -> Result<i64> {
        let options = CreateExecOptions {
            cmd: Some(spec.argv.clone()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            attach_stdin: Some(spec.stdin.is_some()),
            user: spec.user.clone(),
            working_dir: spec.workdir.clone(),
            env: (!spec.env.is_empty())
                .then(|| spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            ..Default::default()
        };
        let exec = self
            .docker
            .create_exec(&id.0, options)
            .await
            .map_err(|e| backend("create exec", e))?;
        match self
            .docker
            .start_exec(&exec.id, None)
            .await
            .map_err(|e| backend("start exec", e))?
        {
            StartExecResults::Attached {
                mut output,
                mut input,
            } => {
                if let Some(data) = &spec.stdin {
                    input.write_all(data).await?;
                    input.shutdown().await?;
                }
                drop(input);
                while let Some(item) = output.next().await {
                    match item.map_err(|e| backend("read exec output", e))? {
                        LogOutput::StdOut { message } => on_output(OutputChunk::Stdout(message)),
                        LogOutput::StdErr { message } => on_output(OutputChunk::Stderr(message)),
                        LogOutput::Console { message } => on_output(OutputChunk::Stdout(message)),
                        LogOutput::StdIn { .. } => {}
                    }
                }
            }
            StartExecResults::Detached => {
                return Err(SandboxError::Backend {
                    op: "start exec",
                    message: "the daemon detached an attached exec".into(),
                });
            }
        }
        // The output stream ends when the process exits; the daemon may
        // record the exit code a moment later.
        for _ in 0..50 {
            let inspect = self
                .docker
                .inspect_exec(&exec.id)
                .await
                .map_err(|e| backend("inspect exec", e))?;
            if inspect.running != Some(true)
                && let Some(code) = inspect.exit_code
            {
                return Ok(code);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Err(SandboxError::Backend {
            op: "inspect exec",
            message: "the command's output ended but it never reported an exit code".into(),
        })
    }

    async fn copy_in(&self, id: &SandboxId, dest: &str, tar: Bytes) -> Result<()> {
        let options = UploadToContainerOptions {
            path: dest.to_owned(),
            ..Default::default()
        };
        self.docker
            .upload_to_container(&id.0, Some(options), bollard::body_full(tar))
            .await
            .map_err(|e| backend("copy into sandbox", e))
    }

    async fn copy_out(&self, id: &SandboxId, path: &str) -> Result<Bytes> {
        let options = DownloadFromContainerOptions {
            path: path.to_owned(),
        };
        let chunks: Vec<Bytes> = self
            .docker
            .download_from_container(&id.0, Some(options))
            .try_collect()
            .await
            .map_err(|e| backend("copy out of sandbox", e))?;
        Ok(chunks.concat().into())
    }

    async fn destroy(&self, id: &SandboxId) -> Result<()> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match self.docker.remove_container(&id.0, Some(options)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            // Removal already under way (e.g. a concurrent destroy).
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(backend("remove container", e)),
        }
    }

    async fn list(&self, labels: &[(&str, &str)]) -> Result<Vec<SandboxInfo>> {
        let filters = label_filters(labels);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let list = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| backend("list containers", e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                Some(SandboxInfo {
                    id: SandboxId(c.id?),
                    labels: c.labels.unwrap_or_default().into_iter().collect(),
                    // Paused (while a snapshot is written) is alive too.
                    running: c
                        .state
                        .map(|s| matches!(s.to_string().as_str(), "running" | "paused"))
                        .unwrap_or(false),
                })
            })
            .collect())
    }

    async fn stop(&self, id: &SandboxId) -> Result<()> {
        self.docker
            .stop_container(
                &id.0,
                Some(bollard::query_parameters::StopContainerOptions {
                    t: Some(10),
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| backend("stop container", e))
    }

    async fn resume(&self, id: &SandboxId) -> Result<()> {
        self.docker
            .start_container(&id.0, None)
            .await
            .map_err(|e| backend("start container", e))
    }

    async fn usage(&self, id: &SandboxId) -> Result<SandboxUsage> {
        // Not one-shot: the daemon takes a second sample a second later,
        // so CPU use can be worked out.
        let options = bollard::query_parameters::StatsOptions {
            stream: false,
            one_shot: false,
        };
        let stats = self
            .docker
            .stats(&id.0, Some(options))
            .next()
            .await
            .ok_or_else(|| SandboxError::NotFound(id.0.clone()))?
            .map_err(|e| backend("container stats", e))?;
        let cpu_percent = (|| {
            let now = stats.cpu_stats.as_ref()?;
            let before = stats.precpu_stats.as_ref()?;
            let used = now.cpu_usage.as_ref()?.total_usage? as f64
                - before.cpu_usage.as_ref()?.total_usage? as f64;
            let system = now.system_cpu_usage? as f64 - before.system_cpu_usage? as f64;
            let cpus = f64::from(now.online_cpus.unwrap_or(1));
            (system > 0.0).then(|| (used / system * cpus * 100.0).max(0.0))
        })();
        let memory = stats.memory_stats.as_ref();
        // What the kernel could drop at once (page cache) is not use.
        let cache = memory
            .and_then(|m| m.stats.as_ref())
            .and_then(|s| {
                s.get("inactive_file")
                    .or_else(|| s.get("total_inactive_file"))
            })
            .copied()
            .unwrap_or(0);
        let inspect = self
            .docker
            .inspect_container(
                &id.0,
                Some(bollard::query_parameters::InspectContainerOptions { size: true }),
            )
            .await
            .map_err(|e| backend("inspect container", e))?;
        let state = inspect.state.as_ref();
        Ok(SandboxUsage {
            running: state.and_then(|s| s.running).unwrap_or(false)
                || state.and_then(|s| s.paused).unwrap_or(false),
            cpu_percent,
            memory_bytes: memory
                .and_then(|m| m.usage)
                .unwrap_or(0)
                .saturating_sub(cache),
            memory_limit_bytes: memory.and_then(|m| m.limit).unwrap_or(0),
            pids: stats
                .pids_stats
                .as_ref()
                .and_then(|p| p.current)
                .unwrap_or(0),
            disk_bytes: inspect.size_rw.and_then(|s| u64::try_from(s).ok()),
            disk_limit_bytes: inspect
                .host_config
                .and_then(|h| h.storage_opt)
                .and_then(|o| o.get("size").and_then(|s| s.parse().ok())),
        })
    }

    async fn snapshot(
        &self,
        id: &SandboxId,
        reference: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<bool> {
        let (repo, tag) = match reference.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, t),
            _ => (reference, "latest"),
        };
        let options = CommitContainerOptions {
            container: Some(id.0.clone()),
            repo: Some(repo.to_owned()),
            tag: Some(tag.to_owned()),
            comment: Some("backshift sandbox snapshot".into()),
            // Paused while its layer is written: a consistent filesystem.
            pause: true,
            ..Default::default()
        };
        // The sandbox's environment (its token, granted secrets) is not the
        // image's: a commit would keep it in the snapshot's config, and a
        // sandbox made from the snapshot would inherit what was revoked
        // since. Every variable the sandbox got beyond its image's is
        // blanked (a commit merges the container's variables back in, so
        // they are overridden, not left out).
        let container = self
            .docker
            .inspect_container(&id.0, None)
            .await
            .map_err(|e| backend("inspect container", e))?;
        let env = container
            .config
            .as_ref()
            .and_then(|c| c.env.clone())
            .unwrap_or_default();
        let base_env = match container.image.as_deref() {
            Some(image) => self
                .docker
                .inspect_image(image)
                .await
                .ok()
                .and_then(|i| i.config)
                .and_then(|c| c.env)
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let blanked: Vec<String> = env
            .iter()
            .filter(|e| !base_env.contains(e))
            .filter_map(|e| e.split_once('=').map(|(k, _)| format!("{k}=")))
            .collect();
        // A commit keeps the container's labels too: backshift's own that
        // the snapshot is not given (the sandbox's attempt, task, shim
        // directory) are blanked, or every sandbox made from it would
        // claim them.
        let mut image_labels: HashMap<String, String> = labels.clone().into_iter().collect();
        for key in container
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .into_iter()
            .flat_map(|l| l.keys())
        {
            if key.starts_with("dev.backshift.") && !labels.contains_key(key) {
                image_labels.insert(key.clone(), String::new());
            }
        }
        let config = bollard::models::ContainerConfig {
            labels: Some(image_labels),
            env: Some(blanked),
            ..Default::default()
        };
        self.docker
            .commit_container(options, config)
            .await
            .map_err(|e| backend("commit container", e))?;
        Ok(true)
    }

    async fn remove_snapshot(&self, reference: &str) -> Result<()> {
        let options = RemoveImageOptions {
            force: true,
            ..Default::default()
        };
        match self
            .docker
            .remove_image(reference, Some(options), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(backend("remove image", e)),
        }
    }

    async fn list_snapshots(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<(String, BTreeMap<String, String>)>> {
        let filters = label_filters(labels);
        let options = ListImagesOptions {
            filters: Some(filters),
            ..Default::default()
        };
        let images = self
            .docker
            .list_images(Some(options))
            .await
            .map_err(|e| backend("list images", e))?;
        Ok(images
            .into_iter()
            .flat_map(|i| {
                let labels: BTreeMap<String, String> = i.labels.into_iter().collect();
                i.repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .map(move |t| (t, labels.clone()))
            })
            .collect())
    }
}
