//! The web UI in a real browser: headless Chromium driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`), against the real server,
//! a real sandbox and the scripted model. A failing step saves a
//! screenshot under `target/ui-failures/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{World, script};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use std::future::Future;
use std::process::Stdio;
use std::time::Duration;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium behind its own chromedriver; both go when dropped.
pub struct Browser {
    pub client: Client,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start(width: u32, height: u32) -> Browser {
        for (bin, what) in [(CHROMEDRIVER, "chromium-driver"), (CHROMIUM, "chromium")] {
            assert!(
                std::path::Path::new(bin).exists(),
                "{bin} is missing: install Debian's {what} (`apt-get install chromium chromium-driver`; `cargo xtask setup` does)"
            );
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver does not start");
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.path().display()),
                    format!("--window-size={width},{height}"),
                ]
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let mut last = String::new();
        for _ in 0..100 {
            match ClientBuilder::rustls()
                .expect("rustls")
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => {
                    return Browser {
                        client,
                        driver,
                        _profile: profile,
                    };
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot start a browser session through chromedriver: {last}");
    }

    /// Runs `steps`; if one fails, saves a screenshot named `name` and
    /// fails the test with what went wrong.
    pub async fn run<F, Fut>(self, name: &str, steps: F)
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let client = self.client.clone();
        let outcome = steps(self.client.clone()).await;
        if let Err(why) = outcome {
            let dir =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/ui-failures");
            let _ = std::fs::create_dir_all(&dir);
            let shot = dir.join(format!("{name}.png"));
            let saved = match client.screenshot().await {
                Ok(png) => std::fs::write(&shot, png)
                    .map(|()| format!("screenshot: {}", shot.display()))
                    .unwrap_or_else(|e| format!("no screenshot: {e}")),
                Err(e) => format!("no screenshot: {e}"),
            };
            let url = client
                .current_url()
                .await
                .map(|u| u.to_string())
                .unwrap_or_default();
            let _ = client.close().await;
            drop(self.driver);
            panic!("{why}\n(at {url}; {saved})");
        }
        let _ = client.close().await;
    }
}

/// Waits up to `secs` for the element `css`.
pub async fn wait_for(
    c: &Client,
    css: &str,
    secs: u64,
) -> Result<fantoccini::elements::Element, String> {
    c.wait()
        .at_most(Duration::from_secs(secs))
        .for_element(Locator::Css(css))
        .await
        .map_err(|e| format!("{css} did not appear in {secs} s: {e}"))
}

/// Waits up to `secs` until the element `css` holds `text` where a
/// person sees it.
pub async fn wait_for_text(c: &Client, css: &str, text: &str, secs: u64) -> Result<(), String> {
    wait_until_holds(c, css, text, secs, false).await
}

/// The text of the element `css`, hidden parts (a folded tool call's
/// output) included.
pub async fn text_content(c: &Client, css: &str) -> Result<String, String> {
    let v = c
        .execute(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            vec![json!(css)],
        )
        .await
        .map_err(fail("read the page"))?;
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no {css} on the page"))
}

/// Waits up to `secs` until `css`'s text, hidden parts included, holds
/// `text`.
pub async fn wait_for_content(c: &Client, css: &str, text: &str, secs: u64) -> Result<(), String> {
    wait_until_holds(c, css, text, secs, true).await
}

/// Waits up to `secs` until `css`'s text (`hidden`: its hidden parts
/// too) holds `text`; the error says what it held last.
async fn wait_until_holds(
    c: &Client,
    css: &str,
    text: &str,
    secs: u64,
    hidden: bool,
) -> Result<(), String> {
    let mut seen = String::new();
    for _ in 0..secs * 10 {
        let read = if hidden {
            text_content(c, css).await
        } else {
            match c.find(Locator::Css(css)).await {
                Ok(e) => e.text().await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        if let Ok(t) = read {
            if t.contains(text) {
                return Ok(());
            }
            seen = t;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "{css} never held {text:?} in {secs} s; it held: {seen:?}"
    ))
}

/// Clicks the element `css`.
pub async fn click(c: &Client, css: &str) -> Result<(), String> {
    c.find(Locator::Css(css))
        .await
        .map_err(fail(css))?
        .click()
        .await
        .map_err(fail(css))
}

/// Clicks the element `css` once it is there (up to `secs`), finding it
/// again when the page redrew it between finding and clicking (a live
/// page re-renders as events arrive).
pub async fn click_when_ready(c: &Client, css: &str, secs: u64) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..secs * 10 {
        match c.find(Locator::Css(css)).await {
            Ok(e) => match e.click().await {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{css} could not be clicked in {secs} s: {last}"))
}

/// Follows the link reading `text`.
pub async fn click_link(c: &Client, text: &str) -> Result<(), String> {
    c.find(Locator::LinkText(text))
        .await
        .map_err(fail(text))?
        .click()
        .await
        .map_err(fail(text))
}

/// Types `text` into the element `css`.
pub async fn type_into(c: &Client, css: &str, text: &str) -> Result<(), String> {
    c.find(Locator::Css(css))
        .await
        .map_err(fail(css))?
        .send_keys(text)
        .await
        .map_err(fail(css))
}

fn fail<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_create_watch_approve_review() {
    // The agent reaches for a host a person must approve, writes a file
    // and finishes.
    let s = script(json!({"steps": [
        {"reply": {"content": "Checking the docs first.", "tool_calls": [{"name": "run_command", "arguments": {"command": "curl -s -o /dev/null -w 'docs %{http_code}\\n' http://docs.invalid/api"}}]}},
        {"reply": {"tool_calls": [{"name": "write_file", "arguments": {"path": "hello.py", "content": "print('hello')\n"}}]}},
        {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Add hello.py"}}]}}
    ]}));
    let w = World::start(
        Some(s),
        "[[egress.rules]]\nhost = \"docs.invalid\"\naction = \"ask\"\n",
    )
    .await;
    let token = w.token();
    let repo = w.repo.to_string_lossy().into_owned();
    let url = w.url.clone();
    let browser = Browser::start(1280, 900).await;
    browser
        .run("sign_in_create_watch_approve_review", |c| async move {
            c.goto(&url).await.map_err(fail("open the UI"))?;
            // Signed out: the sign-in page. A wrong token is refused.
            let input = wait_for(&c, "#token", 10).await?;
            input.send_keys("not-a-token").await.map_err(fail("type"))?;
            click(&c, "#sign-in").await?;
            wait_for_text(&c, "[role=alert]", "not valid for this server", 10).await?;
            let input = c
                .find(Locator::Css("#token"))
                .await
                .map_err(fail("token"))?;
            input.clear().await.map_err(fail("clear"))?;
            input.send_keys(&token).await.map_err(fail("type"))?;
            click(&c, "#sign-in").await?;
            // The board, empty, says so.
            wait_for_text(&c, "#tasks", "No tasks yet.", 10).await?;
            // The session cookie is not readable by scripts.
            let cookies = c
                .execute("return document.cookie", vec![])
                .await
                .map_err(fail("cookie"))?;
            if cookies.as_str().unwrap_or("").contains("backshift_session") {
                return Err(format!(
                    "the session cookie is readable by scripts: {cookies}"
                ));
            }
            // A new task.
            click_link(&c, "New task").await?;
            wait_for(&c, "#repo", 10)
                .await?
                .send_keys(&repo)
                .await
                .map_err(fail("repo"))?;
            type_into(&c, "#prompt", "Add a hello script").await?;
            click(&c, "#create").await?;
            // Its events appear live: the agent's words and its command.
            wait_for_text(&c, "#events", "Checking the docs first.", 60).await?;
            wait_for_text(&c, "#events", "curl", 30).await?;
            // A person is asked; the task page offers the answer.
            let approve = wait_for(&c, "#pending .approval button[data-answer=once]", 60).await?;
            wait_for_text(&c, "#approval-count", "1", 10).await?;
            approve.click().await.map_err(fail("approve"))?;
            wait_for_text(&c, "#events", "approved (once) by", 30).await?;
            // The command's output (the denied connection) under its call.
            wait_for_content(&c, "#events", "docs ", 30).await?;
            wait_for_text(&c, "#events", "hello.py", 60).await?;
            wait_for(&c, "#task-head .state[data-state=succeeded]", 90).await?;
            wait_for_text(&c, "#timeline", "succeeded", 10).await?;
            wait_for(&c, "#attempt-facts .state[data-state=succeeded]", 10).await?;
            let head = c
                .find(Locator::Css("#task-head"))
                .await
                .map_err(fail("head"))?;
            let head = head.text().await.map_err(fail("text"))?;
            if head.contains("null") || head.contains("undefined") {
                return Err(format!("the task's header shows an empty value: {head:?}"));
            }
            // The diff.
            click_when_ready(&c, "#diff-link", 20).await?;
            wait_for_text(&c, "pre.diff", "+print('hello')", 20).await?;
            let add = c
                .find(Locator::Css("pre.diff .add"))
                .await
                .map_err(fail("added line"))?;
            let text = add.text().await.map_err(fail("text"))?;
            if !text.starts_with('+') {
                return Err(format!("the first added line reads {text:?}"));
            }
            // Nothing else waits; the board shows the task succeeded.
            click_link(&c, "Approvals").await?;
            wait_for_text(&c, "#approvals", "Nothing is waiting for a decision.", 10).await?;
            click_link(&c, "Tasks").await?;
            wait_for(&c, "#tasks .task .state[data-state=succeeded]", 10).await?;
            // Signing out ends the session.
            click(&c, "#sign-out").await?;
            wait_for(&c, "#token", 10).await?;
            c.goto(&format!("{url}/#/")).await.map_err(fail("reload"))?;
            wait_for(&c, "#token", 10).await?;
            Ok(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_fit_a_phone_and_changes_need_the_uis_header() {
    let w = World::start(None, "").await;
    let token = w.token();
    let url = w.url.clone();
    // A change carried by the session cookie alone (what a cross-site form
    // could send) is refused; reads are not.
    let http = reqwest::Client::new();
    let cookie = format!("backshift_session={token}");
    let resp = http
        .post(format!("{url}/api/v1/tasks"))
        .header("Cookie", &cookie)
        .json(&json!({"prompt": "x", "repo": "/nonexistent"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let resp = http
        .get(format!("{url}/api/v1/tasks"))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let page = http.get(&url).send().await.unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    let repo = w.repo.to_string_lossy().into_owned();
    let (_, _) = w
        .api(
            reqwest::Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "A task with a long first line that has to wrap on a phone screen somehow", "repo": repo, "command": "echo hi > hi.txt"})),
        )
        .await;

    let browser = Browser::start(390, 844).await;
    browser
        .run("the_pages_fit_a_phone", |c| async move {
            c.goto(&url).await.map_err(fail("open"))?;
            wait_for(&c, "#token", 10).await?.send_keys(&token).await.map_err(fail("type"))?;
            click(&c, "#sign-in").await?;
            wait_for(&c, "#tasks .task", 10).await?;
            for page in ["#/", "#/new", "#/approvals"] {
                c.goto(&format!("{url}/{page}")).await.map_err(fail("open"))?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let fits = c
                    .execute(
                        "return document.documentElement.scrollWidth <= window.innerWidth",
                        vec![],
                    )
                    .await
                    .map_err(fail("measure"))?;
                if fits != json!(true) {
                    return Err(format!("{page} is wider than a phone's screen"));
                }
            }
            // Keyboard: the sign-out control and the nav links are
            // reachable with Tab.
            let focusable = c
                .execute(
                    "return [...document.querySelectorAll('nav a, nav button')].every(e => e.tabIndex >= 0)",
                    vec![],
                )
                .await
                .map_err(fail("focus"))?;
            if focusable != json!(true) {
                return Err("a navigation control cannot be reached with the keyboard".into());
            }
            Ok(())
        })
        .await;
}

/// Signs the browser in at `url` with `token`.
async fn sign_in(c: &Client, url: &str, token: &str) -> Result<(), String> {
    c.goto(url).await.map_err(fail("open"))?;
    wait_for(c, "#token", 10)
        .await?
        .send_keys(token)
        .await
        .map_err(fail("type"))?;
    click(c, "#sign-in").await?;
    wait_for(c, "#tasks", 10).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_pick_watch_sandboxes_and_change_settings() {
    let w = World::start(None, "").await;
    let token = w.token();
    let url = w.url.clone();
    let repo = w.repo.to_string_lossy().into_owned();
    // Two attempts: the second writes more.
    let (status, created) = w
        .api(
            reqwest::Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "Write notes", "repo": repo, "attempts": 2,
                "command": "case \"$BACKSHIFT_BRANCH\" in *-2) seq 1 30 > notes.txt ;; *) echo one > notes.txt ;; esac"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let pair = created["id"].as_str().unwrap().to_owned();
    w.wait(&pair).await;
    // One that keeps its sandbox busy.
    let (status, created) = w
        .api(
            reqwest::Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "Take a while", "repo": repo, "command": "sleep 120"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let busy = created["id"].as_str().unwrap().to_owned();
    // A secret, granted to the project.
    let (code, out, err) = w
        .cli_with_stdin(&["secrets", "set", "DEPLOY_KEY"], "s3cret-value-42\n")
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let (_, view) = w
        .api(reqwest::Method::GET, &format!("/api/v1/tasks/{pair}"), None)
        .await;
    let project = view["project_id"].as_str().unwrap().to_owned();
    let (code, out, err) = w
        .cli(&["secrets", "grant", "DEPLOY_KEY", &project, "--as", "KEY"])
        .await;
    assert_eq!(code, 0, "{out}{err}");

    let (p2, b2) = (pair.clone(), busy.clone());
    let browser = Browser::start(1280, 900).await;
    browser
        .run(
            "compare_and_pick_watch_sandboxes_and_change_settings",
            |c| async move {
                sign_in(&c, &url, &token).await?;
                // Side by side, best first; the other one can be delivered.
                c.goto(&format!("{url}/#/task/{p2}"))
                    .await
                    .map_err(fail("open"))?;
                let first = wait_for(&c, "#compare tbody tr", 10).await?;
                let first = first.attr("data-attempt").await.map_err(fail("attr"))?;
                if first.as_deref() != Some(format!("{p2}-1").as_str()) {
                    return Err(format!(
                        "the smaller change should rank first, got {first:?}"
                    ));
                }
                wait_for_text(&c, "#compare", "chosen by auto", 10).await?;
                click_when_ready(&c, &format!("button[data-pick='{p2}-2']"), 10).await?;
                wait_for_text(
                    &c,
                    "#compare",
                    &format!("The result: {p2}-2 (chosen by token:admin)"),
                    10,
                )
                .await?;
                // The busy task paused and resumed from its page.
                c.goto(&format!("{url}/#/task/{b2}"))
                    .await
                    .map_err(fail("open"))?;
                click_when_ready(&c, &format!("button[data-pause='{b2}-1']"), 30).await?;
                click_when_ready(&c, &format!("button[data-resume='{b2}-1']"), 30).await?;
                wait_for(&c, &format!("button[data-pause='{b2}-1']"), 30).await?;
                // The busy sandbox: measured, paused and resumed, and gone
                // when its task is cancelled.
                click_link(&c, "Sandboxes").await?;
                wait_for_text(&c, &format!("[data-sandbox] a[href*='{b2}']"), &b2, 30).await?;
                wait_for_text(&c, "#sandboxes .memory", "MiB of", 10).await?;
                // Stopped with its files kept, then started again.
                click_when_ready(&c, &format!("button[data-pause='{b2}-1']"), 10).await?;
                wait_for_text(&c, "#sandboxes", "stopped (paused)", 30).await?;
                click_when_ready(&c, &format!("button[data-resume='{b2}-1']"), 10).await?;
                wait_for(&c, &format!("button[data-pause='{b2}-1']"), 30).await?;
                click_when_ready(&c, &format!("button[data-cancel='{b2}']"), 10).await?;
                wait_for_text(&c, "#sandboxes", "No sandbox is running", 30).await?;
                // This server keeps no warm pool, and says how to have one.
                wait_for_text(&c, "#pool", "Warm pool: off", 10).await?;
                // Settings: the secret's name and grant, never its value; a
                // project rule added.
                click_link(&c, "Settings").await?;
                wait_for_text(&c, "#secrets", "DEPLOY_KEY", 10).await?;
                wait_for_text(&c, "#secrets", "as KEY", 10).await?;
                let source = c.source().await.map_err(fail("source"))?;
                if source.contains("s3cret-value-42") {
                    return Err("the secret's value is on the page".into());
                }
                wait_for(&c, ".project .rule-host", 10)
                    .await?
                    .send_keys("*.pythonhosted.org")
                    .await
                    .map_err(fail("type"))?;
                type_into(&c, ".project .rule-port", "443").await?;
                click(&c, ".project form button").await?;
                wait_for_text(&c, ".project .rules", "allow *.pythonhosted.org:443", 10).await?;
                // The project's own Docker engine turned on.
                click(&c, ".project .docker-engine").await?;
                wait_for_text(&c, ".project", "get a Docker engine of their own", 10).await?;
                // A token made (shown once) and revoked.
                type_into(&c, "#token-name", "ci").await?;
                click(&c, "#make-token").await?;
                wait_for_text(&c, "#new-token", "bs_", 10).await?;
                wait_for_text(&c, "#tokens", "ci", 10).await?;
                click(&c, "button[data-revoke='ci']").await?;
                wait_for_content(&c, "main", "Revoked ci.", 10).await?;
                Ok(())
            },
        )
        .await;
    let (_, project) = w
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/projects/{project}"),
            None,
        )
        .await;
    assert_eq!(
        project["egress_rules"],
        json!([{"host": "*.pythonhosted.org", "ports": [443], "action": "allow"}])
    );
    let (_, busy_view) = w
        .api(reqwest::Method::GET, &format!("/api/v1/tasks/{busy}"), None)
        .await;
    assert_eq!(busy_view["state"], "cancelled");
}

/// `cargo xtask screenshots` runs this: the main pages at desktop and
/// phone width, as PNGs in `$UI_SCREENSHOTS_DIR` (for the README).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by `cargo xtask screenshots`"]
async fn screenshots() {
    let dir = std::path::PathBuf::from(
        std::env::var("UI_SCREENSHOTS_DIR").expect("set UI_SCREENSHOTS_DIR to a directory"),
    );
    std::fs::create_dir_all(&dir).unwrap();
    // A finished task, one with two attempts, and one waiting for a person.
    let s = script(json!({"mode": "turn", "steps": [
        {"reply": {"content": "I will add the greeting and check it.", "tool_calls": [{"name": "write_file", "arguments": {"path": "hello.py", "content": "print('hello')\n"}}]}},
        {"reply": {"tool_calls": [{"name": "run_command", "arguments": {"command": "python3 hello.py && curl -s -o /dev/null -w '%{http_code}\\n' http://docs.invalid/api"}}]}},
        {"reply": {"tool_calls": [{"name": "finish", "arguments": {"summary": "Add hello.py\n\nIt prints hello."}}]}}
    ]}));
    let w = World::start(
        Some(s),
        "[approvals]\ntimeout_secs = 900\n[[egress.rules]]\nhost = \"docs.invalid\"\naction = \"ask\"\n",
    )
    .await;
    let repo = w.repo.to_string_lossy().into_owned();
    let create = |body: serde_json::Value| {
        let w = &w;
        async move {
            let (status, v) = w
                .api(reqwest::Method::POST, "/api/v1/tasks", Some(body))
                .await;
            assert_eq!(status, 201, "{v}");
            v["id"].as_str().unwrap().to_owned()
        }
    };
    let pair = create(json!({"prompt": "Write release notes for 1.4", "repo": repo, "attempts": 2,
        "command": "case \"$BACKSHIFT_BRANCH\" in *-2) seq 1 30 > NOTES.md ;; *) echo 'Faster checkouts.' > NOTES.md ;; esac"})).await;
    w.wait(&pair).await;
    let waiting =
        create(json!({"prompt": "Add a hello script and check the docs", "repo": repo})).await;
    for _ in 0..300 {
        let (_, list) = w.api(reqwest::Method::GET, "/api/v1/approvals", None).await;
        if !list.as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (token, url) = (w.token(), w.url.clone());
    for (label, width, height) in [("desktop", 1280, 900), ("phone", 390, 844)] {
        let browser = Browser::start(width, height).await;
        let (dir, token, url, pair, waiting) = (
            dir.clone(),
            token.clone(),
            url.clone(),
            pair.clone(),
            waiting.clone(),
        );
        browser
            .run(&format!("screenshots-{label}"), |c| async move {
                c.goto(&url).await.map_err(fail("open"))?;
                wait_for(&c, "#token", 10).await?;
                let shots = [
                    ("sign-in", format!("{url}/#/login"), "#token"),
                    ("board", format!("{url}/#/"), "#tasks .task"),
                    ("new-task", format!("{url}/#/new"), "#repo"),
                    (
                        "task-live",
                        format!("{url}/#/task/{waiting}"),
                        "#pending .approval",
                    ),
                    (
                        "compare",
                        format!("{url}/#/task/{pair}"),
                        "#compare tbody tr",
                    ),
                    (
                        "approvals",
                        format!("{url}/#/approvals"),
                        "#approvals .approval",
                    ),
                    ("diff", format!("{url}/#/diff/{pair}-1"), "pre.diff"),
                    (
                        "sandboxes",
                        format!("{url}/#/sandboxes"),
                        "#sandboxes .sandbox",
                    ),
                    ("settings", format!("{url}/#/settings"), ".project"),
                ];
                for (i, (name, page, ready)) in shots.iter().enumerate() {
                    if i == 1 {
                        sign_in(&c, &url, &token).await?;
                    }
                    c.goto(page).await.map_err(fail("open"))?;
                    wait_for(&c, ready, 30).await?;
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    let png = c.screenshot().await.map_err(fail("screenshot"))?;
                    std::fs::write(dir.join(format!("{name}-{label}.png")), png)
                        .map_err(fail("write"))?;
                }
                Ok(())
            })
            .await;
    }
    eprintln!("screenshots in {}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_view_survives_a_server_restart_without_gaps_or_repeats() {
    let mut w = World::start(None, "").await;
    let token = w.token();
    let url = w.url.clone();
    let repo = w.repo.to_string_lossy().into_owned();
    let (status, created) = w
        .api(
            reqwest::Method::POST,
            "/api/v1/tasks",
            Some(json!({"prompt": "Count slowly", "repo": repo,
                "command": "for i in $(seq 1 60); do echo \"line $i\"; sleep 0.25; done"})),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let task = created["id"].as_str().unwrap().to_owned();
    let browser = Browser::start(1280, 900).await;
    browser
        .run("the_live_view_survives_a_server_restart", |c| async move {
            sign_in(&c, &url, &token).await?;
            c.goto(&format!("{url}/#/task/{task}"))
                .await
                .map_err(fail("open"))?;
            wait_for_content(&c, "#events pre.output", "line 5\n", 30).await?;
            // The server dies mid-stream (the command goes on in its
            // sandbox) and comes back.
            w.kill_server().await;
            wait_for_text(&c, "#stream-status", "reconnecting", 15).await?;
            w.restart_server().await;
            wait_for_text(&c, "#stream-status", "The attempt has ended.", 90).await?;
            let out = text_content(&c, "#events pre.output").await?;
            let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("line ")).collect();
            let want: Vec<String> = (1..=60).map(|i| format!("line {i}")).collect();
            if lines != want {
                return Err(format!(
                    "the output shown is not lines 1 to 60, once each, in order:\n{out}"
                ));
            }
            wait_for(&c, "#task-head .state[data-state=succeeded]", 20).await?;
            Ok(())
        })
        .await;
}
