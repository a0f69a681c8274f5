//! Verification: backshift, not the agent, runs the project's verify
//! command, in a fresh sandbox made from the attempt's commit. The agent
//! cannot reach that sandbox, and nothing it left running in its own (a
//! background process editing the test runner, say) can change what is
//! tested: only the commit is. The command comes from the task, else from
//! `backshift.toml` at the attempt's *base* commit (so the agent cannot
//! rewrite it), else from the server's `[verify]`.
//!
//! A failure goes back to the agent as a message with the test report,
//! and the agent gets another iteration, up to `limits.max_iterations`.
//! Every step is an event: `verification_started`, the command's output
//! (call `verify:<iteration>`), and `verification` with the report.

use super::*;
use backshift_protocol::{TestReport, VerificationResult};
use backshift_store::StoreError;

/// The file at the repository's root that may name a verify command.
pub const REPO_FILE: &str = "backshift.toml";
/// Where the verify command's standard output is kept in its sandbox
/// (read for TAP when no report file is configured).
const STDOUT_FILE: &str = "/tmp/.backshift-verify-stdout";
/// How much of the command's output the result keeps.
const OUTPUT_TAIL_CHARS: usize = 4_000;

/// How the attempt's work is verified.
pub(super) struct Plan {
    /// The command (bash), run in the checkout.
    pub command: String,
    /// A JUnit XML or TAP file it writes, relative to the checkout.
    pub report: Option<String>,
    /// Longest run.
    pub timeout: Duration,
    /// `task`, `repository` or `server`.
    pub source: &'static str,
    /// Paths (files or directories) verification takes from the base
    /// commit whatever the agent did to them: the test runner, tests that
    /// define done.
    pub protect: Vec<String>,
}

/// `backshift.toml`: only its `[verify]` table is read here.
#[derive(Debug, serde::Deserialize)]
struct RepoFile {
    #[serde(default)]
    verify: Option<RepoVerify>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RepoVerify {
    command: String,
    #[serde(default)]
    report: Option<String>,
    #[serde(default)]
    timeout_secs: Option<u64>,
    #[serde(default)]
    protect: Vec<String>,
}

/// The sandbox a verification runs in, while it runs.
pub(super) struct Verifier {
    driver: Arc<dyn SandboxDriver>,
    id: SandboxId,
    dir: PathBuf,
    _egress: crate::egress::Egress,
    /// Its Docker engine, when the project has them: (app, attempt).
    engine: Option<(Arc<App>, String)>,
}

impl Verifier {
    /// Removes the sandbox, its engine if any, and its shim directory.
    pub(super) async fn discard(self) {
        if let Some((app, attempt)) = &self.engine {
            super::engine::remove_of(app, attempt, super::engine::VERIFY).await;
        }
        if let Err(e) = self.driver.destroy(&self.id).await {
            tracing::warn!("verification sandbox {} not removed: {e}", self.id);
        }
        remove_shim_dir(&self.dir).await;
    }
}

/// The attempt's verify plan, if it has one: the task's command, else the
/// repository's `backshift.toml` at the base commit, else the server's.
pub(super) async fn plan(run: &mut Run) -> Result<Option<Plan>, Failure> {
    let app = run.app.clone();
    let cfg = &app.config.verify;
    let timeout = Duration::from_secs(cfg.timeout_secs.max(1));
    if let Some(command) = &run.task.verify {
        return Ok(Some(Plan {
            command: command.clone(),
            report: None,
            timeout,
            source: "task",
            protect: Vec::new(),
        }));
    }
    let base = fetch_base(run).await?;
    let text = run
        .app
        .git
        .read_file(&run.task.project_id, &base, REPO_FILE)
        .await
        .map_err(|e| {
            Failure(
                FailureReason::Internal,
                format!("cannot read {REPO_FILE} at the base commit: {e}"),
            )
        })?;
    if let Some(text) = text {
        let invalid = |why: String| {
            Failure(
                FailureReason::VerificationFailed,
                format!(
                    "{REPO_FILE} at the base commit {} is invalid: {why}. Its [verify] table takes `command` (required), `report` (a JUnit XML or TAP file the command writes, relative to the repository) and `timeout_secs`; fix it in the repository and submit the task again.",
                    &base[..12.min(base.len())]
                ),
            )
        };
        let file: RepoFile = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if let Some(v) = file.verify {
            if v.command.trim().is_empty() {
                return Err(invalid("[verify] command is empty".into()));
            }
            if let Some(r) = &v.report {
                check_report_path(r).map_err(|e| invalid(format!("[verify] report: {e}")))?;
            }
            for p in &v.protect {
                check_report_path(p).map_err(|e| invalid(format!("[verify] protect: {e}")))?;
            }
            return Ok(Some(Plan {
                command: v.command,
                report: v.report,
                timeout: v
                    .timeout_secs
                    .map_or(timeout, |s| Duration::from_secs(s.max(1))),
                source: "repository",
                protect: v.protect,
            }));
        }
    }
    Ok(cfg.command.as_ref().map(|command| Plan {
        command: command.clone(),
        report: cfg.report.clone(),
        timeout,
        source: "server",
        protect: Vec::new(),
    }))
}

/// A path in the verify configuration must stay inside the checkout.
fn check_report_path(path: &str) -> Result<(), String> {
    let p = std::path::Path::new(path);
    let inside = !path.is_empty()
        && p.components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if inside {
        Ok(())
    } else {
        Err(format!(
            "{path:?} must be a relative path inside the repository"
        ))
    }
}

/// The attempt's verifications so far, in order.
pub async fn verifications(
    app: &App,
    attempt: &str,
) -> Result<Vec<VerificationResult>, StoreError> {
    Ok(app
        .store
        .events_of_kinds(attempt, &["verification"], 0)
        .await?
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Verification { result } => Some(*result),
            _ => None,
        })
        .collect())
}

/// Whether the agent keeps its conversation in the store (the built-in
/// agent): the report then goes into it as a message.
fn keeps_conversation(run: &Run) -> bool {
    run.task.command.is_none() && crate::agents::recipe(&run.task.agent).is_none()
}

/// After a restart: when the agent works on an iteration after a failed
/// verification, what it must be told (`run.feedback`).
pub(super) async fn resume_iteration(run: &mut Run) -> Result<(), StoreError> {
    if run.attempt.summary.is_some() {
        return Ok(());
    }
    let past = verifications(&run.app, &run.attempt.id).await?;
    run.iteration = past.len() as u32 + 1;
    if let Some(last) = past.last().filter(|r| !r.passed) {
        run.feedback = Some(feedback(last, run.task.limits.max_iterations));
    }
    Ok(())
}

/// After a failed verification: the report goes to the agent (into its
/// stored conversation for the built-in agent; at its next start for the
/// others) and its previous finish is forgotten, in one transaction.
pub(super) async fn begin_iteration(
    run: &mut Run,
    result: &VerificationResult,
) -> Result<(), StoreError> {
    let text = feedback(result, run.task.limits.max_iterations);
    let (first, message) = if keeps_conversation(run) {
        let live = run.app.store.live_messages(&run.attempt.id).await?;
        let message = serde_json::json!({"role": "user", "content": text}).to_string();
        (live.len() as u32, Some(message))
    } else {
        (0, None)
    };
    run.app
        .store
        .begin_iteration(&run.attempt.id, first, message.as_deref())
        .await?;
    run.attempt.summary = None;
    run.feedback = Some(text);
    run.iteration = result.iteration + 1;
    Ok(())
}

/// Where the agent starts its next iteration in this same run: its
/// stored conversation (with the report at its end) and the newest
/// checkpoint.
pub(super) async fn next_conversation(
    run: &Run,
) -> Result<(Option<CheckpointRow>, u32, Conversation), StoreError> {
    let app = &run.app;
    let checkpoint = app.store.latest_checkpoint(&run.attempt.id).await?;
    let tokens_used = app.store.model_tokens_used(&run.attempt.id).await?;
    let live: Vec<serde_json::Value> = app
        .store
        .live_messages(&run.attempt.id)
        .await?
        .iter()
        .map(|m| serde_json::from_str(m))
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::Corrupt(format!("stored message: {e}")))?;
    let saved = live.len() as u32;
    let conversation = if live.is_empty() {
        Conversation {
            tokens_used,
            ..Conversation::new(&run.task.prompt, WORKDIR)
        }
    } else {
        let turns = completed_turns(&live);
        Conversation::continued(live, turns, tokens_used, Replay::default())
    };
    Ok((checkpoint, saved, conversation))
}

/// A conversation that must carry the report (a recovery rebuilt it from
/// a checkpoint taken before the report was added) gets it at its end.
pub(super) fn with_feedback(run: &Run, mut conversation: Conversation) -> Conversation {
    if let Some(text) = &run.feedback
        && keeps_conversation(run)
    {
        let has = conversation
            .messages
            .iter()
            .any(|m| m.get("content").and_then(serde_json::Value::as_str) == Some(text.as_str()));
        if !has {
            conversation
                .messages
                .push(serde_json::json!({"role": "user", "content": text}));
        }
    }
    conversation
}

/// Verifies `head`: the verify command in a fresh sandbox made from it.
/// A verification already recorded for the agent's latest finish (the
/// server restarted after it) is not run again.
pub(super) async fn verify(
    run: &mut Run,
    plan: &Plan,
    head: &str,
) -> Result<VerificationResult, Halt> {
    let app = run.app.clone();
    let internal = |e: &dyn std::fmt::Display| Failure(FailureReason::Internal, e.to_string());
    let past = app
        .store
        .events_of_kinds(&run.attempt.id, &["agent_finished", "verification"], 0)
        .await
        .map_err(|e| internal(&e))?;
    if let Some(EventKind::Verification { result }) = past.last().map(|e| &e.kind)
        && result.commit == head
    {
        run.progress(format!(
            "verification {} of {} already ran before the interruption; its result stands",
            result.iteration,
            &head[..12.min(head.len())]
        ))
        .await;
        return Ok((**result).clone());
    }
    let iteration = past
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Verification { .. }))
        .count() as u32
        + 1;
    let _ = app
        .hub
        .emit(
            &run.attempt.id,
            EventKind::VerificationStarted {
                iteration,
                commit: head.to_owned(),
                command: plan.command.clone(),
                source: plan.source.to_owned(),
            },
        )
        .await;
    run.progress(format!(
        "verifying {} in a fresh sandbox: {}",
        &head[..12.min(head.len())],
        plan.command.lines().next().unwrap_or_default()
    ))
    .await;
    let started = std::time::Instant::now();
    let outcome = run_in_fresh_sandbox(run, plan, head, iteration).await;
    if let Some(v) = run.verifier.take() {
        v.discard().await;
    }
    let (exit, output, report) = outcome?;
    let (exit_code, error) = match exit {
        Some(exit) => match exit.error {
            Some(e) => (None, Some(e)),
            None => (Some(exit.code), None),
        },
        None => (None, Some("it did not start".into())),
    };
    let result = VerificationResult {
        iteration,
        commit: head.to_owned(),
        command: plan.command.clone(),
        passed: exit_code == Some(0) && report.failed == 0,
        exit_code,
        duration_ms: started.elapsed().as_millis() as u64,
        report,
        output_tail: tail(&output, OUTPUT_TAIL_CHARS),
        error,
    };
    let _ = app
        .hub
        .emit(
            &run.attempt.id,
            EventKind::Verification {
                result: Box::new(result.clone()),
            },
        )
        .await;
    Ok(result)
}

/// Makes the verification sandbox (`run.verifier`), puts `head`'s
/// checkout in it, runs `postStartCommand` and the verify command, and
/// reads the report.
async fn run_in_fresh_sandbox(
    run: &mut Run,
    plan: &Plan,
    head: &str,
    iteration: u32,
) -> Result<(Option<backshift_shim::Exit>, String, TestReport), Halt> {
    let app = run.app.clone();
    let sandbox_failed = |what: &str, e: &dyn std::fmt::Display| {
        Failure(FailureReason::SandboxFailed, format!("{what}: {e}"))
    };
    let with_engine = super::engine::wanted(run).await;
    // The environment after setup when this attempt saved it.
    let image = match &run.env {
        Some(env) => {
            let setup = match &env.setup_image {
                Some(tag) if env.post_create.is_some() && app.uses_docker() => {
                    match app.docker().await {
                        Ok(d) if d.image_exists(tag).await.unwrap_or(false) => Some(tag.clone()),
                        _ => None,
                    }
                }
                _ => None,
            };
            setup.unwrap_or_else(|| env.image.clone())
        }
        // The tests get a Docker engine too when the project has them.
        None if with_engine && app.config.sandbox.image.is_none() => {
            super::engine::ensure_image(run, docker(&app).await?.as_ref()).await?
        }
        None => app.config.image(),
    };
    let dir = new_shim_dir(&app, &run.attempt.id).map_err(|e| {
        sandbox_failed(
            "cannot create the verification sandbox's shim directory",
            &e,
        )
    })?;
    let mut spec = sandbox_spec(run, &image, &dir, "verify");
    if with_engine {
        super::engine::prepare_spec(run, &mut spec, super::engine::VERIFY).await?;
    }
    let (driver, id) = create_sandbox(run, &spec, &dir, false).await?;
    let egress = match crate::egress::start(app.clone(), &run.attempt.id, &dir) {
        Ok(e) => e,
        Err(e) => {
            let _ = driver.destroy(&id).await;
            remove_shim_dir(&dir).await;
            return Err(sandbox_failed("cannot serve the egress proxy", &e).into());
        }
    };
    run.verifier = Some(Verifier {
        driver: driver.clone(),
        id: id.clone(),
        dir: dir.clone(),
        _egress: egress,
        engine: with_engine.then(|| (app.clone(), run.attempt.id.clone())),
    });
    shim_ready(&dir).await?;
    if with_engine {
        super::engine::start(run, &id, super::engine::VERIFY).await?;
    }
    // The commit's checkout, from the git store.
    let (_scratch, tree) = export_tree(run, &work_ref(run), head).await?;
    let base = run.attempt.base_commit.clone().unwrap_or_default();
    let set_aside = backshift_git::restore_paths(&tree, &base, &plan.protect)
        .await
        .map_err(|e| {
            Failure(
                FailureReason::CloneFailed,
                format!("cannot restore the protected paths ([verify] protect) from the base commit: {e}"),
            )
        })?;
    if !set_aside.is_empty() {
        run.warn(format!(
                        "the agent changed protected paths ([verify] protect in {REPO_FILE}); verification uses the base commit's: {}",
                        set_aside.join(", ")
                    )).await;
    }
    let tar = workspace_tar(tree).await?;
    driver.copy_in(&id, "/", tar.into()).await.map_err(|e| {
        sandbox_failed("cannot copy the checkout into the verification sandbox", &e)
    })?;
    if let Some(post_start) = run.env.as_ref().and_then(|e| e.post_start.clone()) {
        run_lifecycle(
            run,
            &dir,
            &format!("verify:{iteration}:postStartCommand"),
            "postStartCommand",
            &post_start,
            Vec::new(),
        )
        .await
        .map_err(|h| match h {
            Halt::Lost(why) => Halt::Fail(Failure(FailureReason::SandboxFailed, why)),
            other => other,
        })?;
    }
    let sink = AttemptSink {
        app: app.clone(),
        attempt: run.attempt.id.clone(),
    };
    let tools = SandboxTools::new(ShimClient::new(&dir), WORKDIR, plan.timeout);
    let key = backshift_agent::CallKey {
        turn: iteration,
        call_id: format!("verify:{iteration}"),
        output_recorded: 0,
    };
    // Standard output is also kept in a file, for TAP.
    let script = format!(
        "set -o pipefail\n{{\n{}\n}} | tee {STDOUT_FILE}\n",
        plan.command
    );
    let env = vec![
        ("CI".to_owned(), "true".to_owned()),
        ("BACKSHIFT_VERIFY".to_owned(), iteration.to_string()),
    ];
    let out = tools
        .run_script(&key, &script, env, Vec::new(), &sink)
        .await;
    let exit = out.exit.map_err(|e| {
        Failure(
            FailureReason::SandboxFailed,
            format!("the verification sandbox stopped answering while the verify command ran: {e}"),
        )
    })?;
    let read = |path: String| {
        let driver = driver.clone();
        let id = id.clone();
        async move {
            let tar = driver
                .copy_out(&id, &path)
                .await
                .map_err(|e| e.to_string())?;
            let bytes = first_file(&tar).map_err(|e| e.to_string())?;
            Ok::<String, String>(String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    let report = match &plan.report {
        Some(path) => match read(format!("{WORKDIR}/{path}")).await {
            Ok(text) => crate::report::from_file(&text).unwrap_or_else(|why| {
                crate::report::exit_code_only(Some(format!(
                    "the report {path} was not read: {why}"
                )))
            }),
            Err(why) => crate::report::exit_code_only(Some(format!(
                "the verify command did not leave its report {path} ({why})"
            ))),
        },
        None => match read(STDOUT_FILE.to_owned()).await {
            Ok(text) => {
                crate::report::tap(&text).unwrap_or_else(|| crate::report::exit_code_only(None))
            }
            Err(_) => crate::report::exit_code_only(None),
        },
    };
    let mut report = report;
    if !set_aside.is_empty() {
        let note = format!(
            "the agent's changes to protected paths were set aside: {}",
            set_aside.join(", ")
        );
        report.note = Some(match report.note.take() {
            Some(n) => format!("{n}; {note}"),
            None => note,
        });
    }
    Ok((Some(exit), out.for_model, report))
}

/// The last `chars` characters of `s`.
fn tail(s: &str, chars: usize) -> String {
    let n = s.chars().count();
    if n <= chars {
        return s.to_owned();
    }
    let kept: String = s.chars().skip(n - chars).collect();
    format!("…{kept}")
}

/// One line on a report's counts.
fn counts(r: &VerificationResult) -> String {
    let exit = r.exit_text();
    if r.report.format == "exit_code" {
        exit
    } else {
        format!(
            "{exit}; {} passed, {} failed, {} skipped",
            r.report.passed, r.report.failed, r.report.skipped
        )
    }
}

/// What the agent is told after a failed verification.
pub(super) fn feedback(r: &VerificationResult, max: u32) -> String {
    let mut s = format!(
        "[backshift] Verification {} of {max} failed. backshift ran `{}` in a fresh sandbox on your commit {}: {}.",
        r.iteration,
        r.command.trim(),
        &r.commit[..12.min(r.commit.len())],
        counts(r)
    );
    if let Some(note) = &r.report.note {
        s.push_str(&format!(" ({note})"));
    }
    if !r.report.failures.is_empty() {
        s.push_str("\n\nFailed tests:");
        for f in &r.report.failures {
            s.push_str(&format!("\n- {}", f.name));
            if !f.message.is_empty() {
                s.push_str(&format!(": {}", f.message.replace('\n', "\n    ")));
            }
        }
    }
    if !r.output_tail.trim().is_empty() {
        s.push_str(&format!(
            "\n\nThe end of its output:\n{}",
            r.output_tail.trim_end()
        ));
    }
    s.push_str(
        "\n\nFix the code so that the tests pass, check it with the same command, then finish again. Editing the tests, the test runner or the verify configuration to make them pass does not count: the command is read from the task's starting commit.",
    );
    s
}

/// How the attempt ends when the last allowed verification failed.
pub(super) fn final_failure(r: &VerificationResult, max: u32, command: &str) -> String {
    let first = r
        .report
        .failures
        .first()
        .map(|f| {
            format!(
                " First failure: {}{}.",
                f.name,
                f.message
                    .lines()
                    .next()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            )
        })
        .unwrap_or_default();
    format!(
        "verification failed {} time(s), the last on {} ({}); limits.max_iterations = {max} ended the attempt and nothing is published.{first} The report is in the attempt's verification (`backshift show`); retry with a larger limits.max_iterations, or fix `{}` or the task.",
        r.iteration,
        &r.commit[..12.min(r.commit.len())],
        counts(r),
        command.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use backshift_protocol::TestFailure;

    fn failed() -> VerificationResult {
        VerificationResult {
            iteration: 1,
            commit: "0123456789abcdef".into(),
            command: "python3 -m pytest -q".into(),
            passed: false,
            exit_code: Some(1),
            duration_ms: 10,
            report: TestReport {
                format: "junit".into(),
                passed: 2,
                failed: 1,
                skipped: 0,
                failures: vec![TestFailure {
                    name: "tests.test_calc.test_add".into(),
                    message: "AssertionError: 5 != 4\nmore".into(),
                }],
                note: None,
            },
            output_tail: "F..\n1 failed".into(),
            error: None,
        }
    }

    #[test]
    fn feedback_names_the_command_counts_failures_and_output() {
        let text = feedback(&failed(), 3);
        for want in [
            "Verification 1 of 3 failed",
            "`python3 -m pytest -q`",
            "0123456789ab",
            "exit code 1; 2 passed, 1 failed, 0 skipped",
            "- tests.test_calc.test_add: AssertionError: 5 != 4\n    more",
            "1 failed",
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        let end = final_failure(&failed(), 1, "python3 -m pytest -q");
        assert!(end.contains("limits.max_iterations = 1"), "{end}");
        assert!(
            end.contains("First failure: tests.test_calc.test_add: AssertionError: 5 != 4."),
            "{end}"
        );
    }

    #[test]
    fn a_timed_out_command_says_so() {
        let mut r = failed();
        r.exit_code = None;
        r.error = Some("timed out after 5s".into());
        r.report = crate::report::exit_code_only(None);
        assert!(feedback(&r, 2).contains(": timed out after 5s."));
    }

    #[test]
    fn report_paths_stay_inside_the_checkout() {
        assert!(check_report_path("build/junit.xml").is_ok());
        for bad in ["", "/etc/passwd", "../x.xml", "a/../../x"] {
            assert!(check_report_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_repository_file_reads_only_its_verify_table() {
        let f: RepoFile = toml::from_str(
            "[verify]\ncommand = \"make test\"\nreport = \"out/junit.xml\"\n[other]\nx = 1\n",
        )
        .unwrap();
        let v = f.verify.unwrap();
        assert_eq!(v.command, "make test");
        assert_eq!(v.report.as_deref(), Some("out/junit.xml"));
        assert!(toml::from_str::<RepoFile>("[verify]\ncmd = \"x\"\n").is_err());
        let f: RepoFile =
            toml::from_str("[verify]\ncommand = \"t\"\nprotect = [\"run_tests.py\", \"tests\"]\n")
                .unwrap();
        assert_eq!(f.verify.unwrap().protect, ["run_tests.py", "tests"]);
    }

    #[test]
    fn tails_keep_the_end() {
        assert_eq!(tail("abcdef", 3), "…def");
        assert_eq!(tail("ab", 3), "ab");
    }
}
