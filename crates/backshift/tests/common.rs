//! A world per test: a scripted model, a `backshift serve` process on a
//! free port with its own data and config directories, a temp git repo.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use fake_model::{FakeModel, Script};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};

pub struct World {
    pub dir: tempfile::TempDir,
    pub url: String,
    pub fake: Option<FakeModel>,
    pub repo: PathBuf,
    server: tokio::process::Child,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.server.start_kill();
        // The server's sandboxes outlive it (that is the point of them):
        // the test's go with the test, found by their shim directories.
        let mine = self.dir.path().display().to_string();
        let listed = docker_quiet(&[
            "ps",
            "-aq",
            "--filter",
            "label=dev.backshift.managed=true",
            "--format",
            "{{.ID}} {{.Label \"dev.backshift.shim-dir\"}}",
        ]);
        for line in listed.lines() {
            if let Some((id, dir)) = line.split_once(' ')
                && dir.starts_with(&mine)
            {
                docker_quiet(&["rm", "-f", id]);
            }
        }
    }
}

pub fn script(v: Value) -> Script {
    serde_json::from_value(v).unwrap()
}

pub async fn sh(dir: &Path, script: &str) -> String {
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Dev")
        .env("GIT_AUTHOR_EMAIL", "dev@example.invalid")
        .env("GIT_COMMITTER_NAME", "Dev")
        .env("GIT_COMMITTER_EMAIL", "dev@example.invalid")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Starts `backshift serve` and waits until it says it is ready (or what
/// it says instead); returns the process and its URL.
/// The provider key the test servers hold (in their environment, named by
/// `[model] api_key_env`): it must never reach a sandbox or an event.
pub const PROVIDER_KEY: &str = "sk-provider-SECRET-4242";
/// The variable that holds it.
pub const PROVIDER_KEY_ENV: &str = "TEST_PROVIDER_API_KEY";

pub async fn spawn_server(config_path: &Path, dir: &Path) -> (tokio::process::Child, String) {
    spawn_server_logging(config_path, dir, "warn").await
}

/// [`spawn_server`] with the server's log at `level` (`BACKSHIFT_LOG`).
pub async fn spawn_server_logging(
    config_path: &Path,
    dir: &Path,
    level: &str,
) -> (tokio::process::Child, String) {
    spawn_server_with(config_path, dir, level, &[]).await
}

/// [`spawn_server_logging`] with more environment variables.
pub async fn spawn_server_with(
    config_path: &Path,
    dir: &Path,
    level: &str,
    env: &[(&str, &str)],
) -> (tokio::process::Child, String) {
    // No warm pool unless the test's config asks for one: the tests
    // count and name the sandboxes they make.
    let config = std::fs::read_to_string(config_path).unwrap_or_default();
    let warm = if config.contains("warm =") {
        None
    } else {
        Some("0")
    };
    let mut server = tokio::process::Command::new(env!("CARGO_BIN_EXE_backshift"))
        .args(["serve", "--config"])
        .arg(config_path)
        .envs(warm.map(|w| ("BACKSHIFT_SANDBOX__WARM", w)))
        .env("BACKSHIFT_CONFIG_DIR", dir.join("config"))
        .env("BACKSHIFT_LOG", level)
        .env(PROVIDER_KEY_ENV, PROVIDER_KEY)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The server's log goes to the test's output and to `<dir>/server.log`
    // (tests search it).
    let stderr = server.stderr.take().unwrap();
    let log_path = dir.join("server.log");
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut lines = BufReader::new(stderr).lines();
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .await
            .ok();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("{line}");
            if let Some(f) = file.as_mut() {
                let _ = f.write_all(format!("{line}\n").as_bytes()).await;
                let _ = f.flush().await;
            }
        }
    });
    let stdout = server.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut url = None;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while let Ok(Ok(Some(line))) = tokio::time::timeout_at(deadline, lines.next_line()).await {
        if let Some(u) = line.strip_prefix("backshift listening on ") {
            url = Some(u.trim().to_owned());
        }
        if line.contains("ready for tasks") {
            break;
        }
    }
    // Keep draining the server's stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let url = url.expect("the server did not say where it listens");
    (server, url)
}

impl World {
    /// Starts a server whose config is `extra` TOML appended to the basics.
    pub async fn start(script: Option<Script>, extra: &str) -> World {
        Self::start_logging(script, extra, "warn").await
    }

    /// [`World::start`] with the server's log at `level`.
    pub async fn start_logging(script: Option<Script>, extra: &str, level: &str) -> World {
        Self::start_with(script, extra, level, &[]).await
    }

    /// [`World::start_logging`] with more environment variables for the
    /// server.
    pub async fn start_with(
        script: Option<Script>,
        extra: &str,
        level: &str,
        env: &[(&str, &str)],
    ) -> World {
        let dir = tempfile::tempdir().unwrap();
        let fake = match script {
            Some(s) => Some(FakeModel::start(s).await.unwrap()),
            None => None,
        };
        let model_url = fake.as_ref().map(|f| f.base_url()).unwrap_or_default();
        let mut config = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            dir.path().join("data").display()
        );
        // `extra` comes first so that it may set top-level keys too; a
        // `[model]` of its own may name the fake as `{fake_url}`.
        // (`{fake_root}`: the same without `/v1`, for Gemini's API.)
        config.push_str(
            &extra
                .replace("{fake_url}", &model_url)
                .replace("{fake_root}", model_url.trim_end_matches("/v1")),
        );
        if !extra.contains("[model]") {
            config.push_str(&format!("\n[model]\nbase_url = \"{model_url}\"\nmodel = \"scripted\"\nmax_retries = 1\nretry_base_ms = 50\napi_key_env = \"{PROVIDER_KEY_ENV}\"\n"));
        }
        let config_path = dir.path().join("backshift.toml");
        std::fs::write(&config_path, config).unwrap();

        let repo = dir.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        sh(&repo, "git init -q -b main && printf '# Demo\\n' > README.md && mkdir src && printf 'x = 1\\n' > src/app.py && git add . && git commit -qm init").await;

        let (server, url) = spawn_server_with(&config_path, dir.path(), level, env).await;
        // Restarts come back on the same address (the CLI's credentials
        // are keyed by it).
        let config = std::fs::read_to_string(&config_path).unwrap().replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{}\"", url.trim_start_matches("http://")),
        );
        std::fs::write(&config_path, config).unwrap();
        World {
            dir,
            url,
            fake,
            repo,
            server,
        }
    }

    /// Kills the server with SIGKILL (no shutdown of any kind) and waits
    /// until it is gone.
    pub async fn kill_server(&mut self) {
        self.server.start_kill().unwrap();
        self.server.wait().await.unwrap();
    }

    /// Stops the server the way a service manager does (SIGTERM) and
    /// waits until it has exited.
    pub async fn stop_server(&mut self) {
        let pid = self.server.id().unwrap();
        let status = tokio::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(std::time::Duration::from_secs(30), self.server.wait())
            .await
            .expect("the server did not stop within 30 s of SIGTERM")
            .unwrap();
        assert!(exit.success(), "the server exited {exit}");
    }

    /// Starts the server again on the same address, data and config.
    pub async fn restart_server(&mut self) {
        let (server, url) =
            spawn_server(&self.dir.path().join("backshift.toml"), self.dir.path()).await;
        assert_eq!(url, self.url, "the server came back on another address");
        self.server = server;
    }

    /// All events of `attempt`, in order.
    pub async fn events(&self, attempt: &str) -> Vec<Value> {
        let (status, v) = self
            .api(
                reqwest::Method::GET,
                &format!("/api/v1/attempts/{attempt}/events?limit=10000"),
                None,
            )
            .await;
        assert_eq!(
            status, 200,
            "the events of {attempt} could not be read: {v}"
        );
        v.as_array().cloned().unwrap_or_default()
    }

    /// Runs the CLI; returns (exit code, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.cli_with_stdin(args, "").await
    }

    /// Runs the CLI with `input` on its stdin.
    pub async fn cli_with_stdin(&self, args: &[&str], input: &str) -> (i32, String, String) {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_backshift"))
            .args(args)
            .current_dir(&self.repo)
            .env("BACKSHIFT_URL", &self.url)
            .env("BACKSHIFT_CONFIG_DIR", self.dir.path().join("config"))
            .env_remove("BACKSHIFT_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(input.as_bytes()).await;
        drop(stdin);
        let out = child.wait_with_output().await.unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn token(&self) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("config/credentials.toml")).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        v["servers"][&self.url]["token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(self.token());
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Submits a task through the CLI and waits for it to end.
    pub async fn run_task(&self, prompt: &str, extra: &[&str]) -> (String, Value) {
        let repo = self.repo.to_string_lossy().into_owned();
        let mut args = vec!["run", prompt, "--repo", &repo];
        args.extend_from_slice(extra);
        let (code, out, err) = self.cli(&args).await;
        assert_eq!(code, 0, "run failed: {out}\n{err}");
        let id = out.split_whitespace().nth(1).unwrap().to_owned();
        (id.clone(), self.wait(&id).await)
    }

    /// Submits a task whose agent is `command` and waits (up to 60 s)
    /// until its first attempt's command output holds `needle`; returns
    /// (task, attempt).
    pub async fn run_until_output(
        &self,
        prompt: &str,
        command: &str,
        needle: &str,
    ) -> (String, String) {
        let repo = self.repo.to_string_lossy().into_owned();
        let (code, out, err) = self
            .cli(&["run", prompt, "--repo", &repo, "--command", command])
            .await;
        assert_eq!(code, 0, "run failed: {out}\n{err}");
        let task = out.split_whitespace().nth(1).unwrap().to_owned();
        let attempt = format!("{task}-1");
        for _ in 0..600 {
            if command_output(&self.events(&attempt).await).contains(needle) {
                return (task, attempt);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!(
            "{attempt}'s output never held {needle:?}: {:?}",
            self.events(&attempt).await
        );
    }

    pub async fn wait(&self, task: &str) -> Value {
        for _ in 0..600 {
            let (_, v) = self
                .api(reqwest::Method::GET, &format!("/api/v1/tasks/{task}"), None)
                .await;
            let state = v["state"].as_str().unwrap_or("");
            if ["succeeded", "failed", "cancelled", "timed_out"].contains(&state) {
                return v;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        panic!("task {task} did not end in 120 s");
    }
}

/// Checks that events are numbered from 1 without gaps or repeats.
pub fn assert_gapless(events: &[Value]) {
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1, "gapless, no duplicates: {e}");
    }
}

/// The states an attempt went through, in order, from its events.
pub fn states(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .filter(|e| e["type"] == "state_changed")
        .filter_map(|e| e["to"].as_str())
        .collect()
}

/// The text of every `command_output` event, joined.
pub fn command_output(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["type"] == "command_output")
        .filter_map(|e| e["text"].as_str())
        .collect()
}

/// Removes, when dropped, the images a test's project left on the Docker
/// host (its environment and setup images, labelled with the project).
pub struct ProjectImages(pub String);

impl Drop for ProjectImages {
    fn drop(&mut self) {
        let filter = format!("label=dev.backshift.project={}", self.0);
        // A setup image is a child of its environment image, which goes
        // only once the child has: a few passes.
        for _ in 0..3 {
            let ids = docker_quiet(&["images", "-q", "--filter", &filter]);
            if ids.is_empty() {
                return;
            }
            for id in ids.split_whitespace() {
                docker_quiet(&["rmi", "-f", id]);
            }
        }
    }
}

/// Runs the docker CLI; its stdout, or a failure that says what to install.
pub fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .env("DOCKER_API_VERSION", "1.41")
        .output()
        .expect("the docker CLI is missing: install docker.io (`cargo xtask setup` does)");
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs the docker CLI, whatever comes of it (cleanup).
pub fn docker_quiet(args: &[&str]) -> String {
    std::process::Command::new("docker")
        .args(args)
        .env("DOCKER_API_VERSION", "1.41")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Commits the calc fixture (code, a unittest suite, a runner writing
/// JUnit XML, backshift.toml) into `repo`.
pub async fn add_calc_project(repo: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/calc");
    for entry in std::fs::read_dir(&fixture).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), repo.join(entry.file_name())).unwrap();
    }
    sh(repo, "git add -A && git commit -qm 'calc with tests'").await;
}

/// The only credential the tests' fake forge accepts.
pub const FORGE_TOKEN: &str = "forge-token-5f1d0c9a";

/// A world whose repository (with the calc fixture) lives on a fake forge
/// as `acme/calc`, the server configured to deliver there (`extra`: more
/// config, before `[[forges]]`); returns the repository's URL.
pub async fn world_on_forge(
    steps: Value,
    extra: &str,
) -> (World, testkit::forge::FakeForge, String) {
    world_on_forge_of("github", steps, extra).await
}

/// [`world_on_forge`] with a forge of `kind` (`github` or `gitea`).
pub async fn world_on_forge_of(
    kind: &str,
    steps: Value,
    extra: &str,
) -> (World, testkit::forge::FakeForge, String) {
    let forge = match kind {
        "gitea" => testkit::forge::FakeForge::start_gitea(FORGE_TOKEN).await,
        _ => testkit::forge::FakeForge::start(FORGE_TOKEN).await,
    }
    .unwrap();
    let token_dir = tempfile::tempdir().unwrap().keep();
    let token_file = token_dir.join("forge-token");
    std::fs::write(&token_file, format!("{FORGE_TOKEN}\n")).unwrap();
    let config = format!(
        "{extra}\n[[forges]]\nurl = \"{}\"\nkind = \"{kind}\"\napi_url = \"{}\"\ntoken_file = \"{}\"\n",
        forge.git_url(),
        forge.api_url(),
        token_file.display()
    );
    let w = World::start(Some(script(steps)), &config).await;
    add_calc_project(&w.repo).await;
    forge.create_repo("acme", "calc", &w.repo).unwrap();
    let url = format!("{}acme/calc.git", forge.git_url());
    (w, forge, url)
}
