//! Human-readable event lines for `logs` and `run --follow`.

use backshift_protocol::{Event, EventKind, OutputStream};

/// One event as lines for a terminal.
pub fn event_lines(e: &Event) -> String {
    let time = e.ts.get(11..19).unwrap_or(&e.ts);
    let line = |s: String| format!("{time} {s}");
    match &e.kind {
        EventKind::StateChanged {
            from,
            to,
            reason,
            detail,
        } => {
            let from = from.map(|f| format!("{f} → ")).unwrap_or_default();
            let mut s = line(format!("■ {from}{to}"));
            if let Some(r) = reason {
                s.push_str(&format!(" ({r})"));
            }
            if let Some(d) = detail {
                s.push_str(&format!("\n         {d}"));
            }
            s
        }
        EventKind::Progress { message } => line(format!("· {message}")),
        EventKind::ModelRequest { turn, messages, .. } => line(format!(
            "… turn {turn}: asking the model ({messages} messages)"
        )),
        EventKind::ModelResponse {
            text,
            usage,
            latency_ms,
            ..
        } => {
            let tokens = usage
                .map(|u| format!(", {} in / {} out tokens", u.input_tokens, u.output_tokens))
                .unwrap_or_default();
            let mut s = line(format!("◆ model answered in {latency_ms} ms{tokens}"));
            if let Some(t) = text {
                for l in t.lines() {
                    s.push_str(&format!("\n         {l}"));
                }
            }
            s
        }
        EventKind::ModelRetry {
            retry,
            error,
            wait_ms,
            ..
        } => line(format!(
            "! model request failed ({error}); retry {retry} in {wait_ms} ms"
        )),
        EventKind::ToolCall {
            title: Some(title),
            kind,
            name,
            ..
        } => line(format!(
            "→ {name}{} {title}",
            kind.as_ref()
                .filter(|k| *k != name)
                .map_or(String::new(), |k| format!(" [{k}]"))
        )),
        EventKind::ToolCall {
            name, arguments, ..
        } => line(format!("→ {name} {}", short_args(name, arguments))),
        EventKind::CommandOutput { stream, text, .. } => {
            let bar = if *stream == OutputStream::Stderr {
                "!"
            } else {
                "|"
            };
            text.trim_end_matches('\n')
                .lines()
                .map(|l| format!("         {bar} {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        }
        EventKind::ToolResult {
            name,
            ok,
            exit_code,
            output,
            duration_ms,
            ..
        } => {
            let mark = if *ok { "✓" } else { "✗" };
            let code = exit_code.map(|c| format!(" exit {c}")).unwrap_or_default();
            let mut s = line(format!("{mark} {name}{code} ({duration_ms} ms)"));
            if name != "run_command" && !ok {
                s.push_str(&format!("\n         {}", first_line(output)));
            }
            s
        }
        EventKind::AgentFinished { summary } => {
            let mut s = line("✔ agent finished:".to_owned());
            for l in summary.lines() {
                s.push_str(&format!("\n         {l}"));
            }
            s
        }
        EventKind::DiffStat {
            branch,
            files_changed,
            insertions,
            deletions,
            ..
        } => line(format!(
            "± {branch}: {files_changed} file(s) changed, +{insertions} -{deletions}"
        )),
        EventKind::Checkpoint {
            n, turn, changed, ..
        } => line(format!(
            "⚑ checkpoint {n} after turn {turn}{}",
            if *changed { "" } else { " (no file changes)" }
        )),
        EventKind::Restored { adopted: true, .. } => line(
            "↺ re-attached to the surviving sandbox; the agent continues where it was".to_owned(),
        ),
        EventKind::Restored {
            checkpoint,
            turn,
            snapshot,
            ..
        } => line(format!(
            "↺ rebuilt the sandbox from {}{}; the agent resumes after turn {turn}",
            if *checkpoint == 0 {
                "the base commit".to_owned()
            } else {
                format!("checkpoint {checkpoint}")
            },
            snapshot
                .as_ref()
                .map_or(String::new(), |s| format!(" on snapshot {s}"))
        )),
        EventKind::ModelCall {
            model,
            stream,
            status,
            usage,
            latency_ms,
            error,
            ..
        } => line(format!(
            "⇄ model call {model}{}: {status}{}, {latency_ms} ms{}",
            if *stream { " (streamed)" } else { "" },
            usage.map_or(String::new(), |u| format!(
                ", {} in / {} out tokens",
                u.input_tokens, u.output_tokens
            )),
            error.as_ref().map_or(String::new(), |e| format!(": {e}"))
        )),
        EventKind::Snapshot {
            checkpoint,
            image,
            duration_ms,
        } => line(format!(
            "⚑ filesystem snapshot {image} after checkpoint {checkpoint} ({duration_ms} ms)"
        )),
        EventKind::AgentSession {
            agent,
            agent_info,
            session_id,
            loaded,
            ..
        } => line(format!(
            "◆ {agent}{} {} session {session_id}",
            agent_info
                .as_ref()
                .map_or(String::new(), |i| format!(" ({i})")),
            if *loaded { "reloaded" } else { "started" }
        )),
        EventKind::AgentMessage { text } => {
            let mut lines = text.trim().lines();
            let mut s = line(format!("» {}", lines.next().unwrap_or("")));
            for l in lines {
                s.push_str(&format!("\n           {l}"));
            }
            s
        }
        EventKind::AgentThought { text } => line(format!("… {}", first_line(text))),
        EventKind::Plan { entries } => {
            let mut s = line("☰ plan".to_owned());
            for e in entries {
                let mark = match e.status.as_str() {
                    "completed" => "x",
                    "in_progress" => ">",
                    _ => " ",
                };
                s.push_str(&format!("\n         [{mark}] {}", e.content));
            }
            s
        }
        EventKind::FileDiff { path, diff, .. } => {
            let (added, removed) = diff.lines().fold((0, 0), |(a, r), l| {
                if l.starts_with('+') && !l.starts_with("+++") {
                    (a + 1, r)
                } else if l.starts_with('-') && !l.starts_with("---") {
                    (a, r + 1)
                } else {
                    (a, r)
                }
            });
            line(format!("± {path} +{added} -{removed}"))
        }
        EventKind::PermissionDecision {
            title,
            decision,
            by,
            reason,
            ..
        } => line(format!(
            "? permission for {title}: {decision} by {by} ({reason})"
        )),
        EventKind::Egress {
            host,
            port,
            method,
            path,
            decision,
            rule,
            reason,
            ..
        } => {
            let what = match (method, path) {
                (Some(m), Some(p)) => format!("{m} http://{host}:{port}{p}"),
                _ => format!("CONNECT {host}:{port}"),
            };
            let by = rule
                .as_deref()
                .map(|r| format!(" by {r}"))
                .unwrap_or_default();
            line(format!("⇄ egress {what}: {decision}{by} ({reason})"))
        }
        EventKind::Warning { message } => line(format!("⚠ {message}")),
        EventKind::Winner { by, rank, of, why } => line(format!(
            "★ chosen as the task's result (rank {rank} of {of}, by {by}): {why}"
        )),
        EventKind::Delivered { delivery } => line(delivery_line(delivery)),
        EventKind::VerificationStarted {
            iteration,
            commit,
            command,
            source,
        } => line(format!(
            "▶ verification {iteration} of {}: {} (from the {source}) in a fresh sandbox",
            &commit[..12.min(commit.len())],
            command.lines().next().unwrap_or_default()
        )),
        EventKind::Verification { result } => {
            let mut s = line(verification_line(result));
            for f in result.report.failures.iter().take(10) {
                s.push_str(&format!(
                    "\n         ✗ {}{}",
                    f.name,
                    f.message
                        .lines()
                        .next()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ));
            }
            s
        }
        EventKind::GitPush {
            refs,
            decision,
            reason,
        } => line(format!(
            "⇡ git push {}: {decision} ({reason})",
            refs.join(", ")
        )),
        EventKind::ApprovalRequested {
            approval,
            summary,
            expires_at,
            ..
        } => line(format!(
            "? waiting for approval {approval}: {summary} (backshift approve {approval} | backshift deny {approval}; denied at {expires_at} unless answered)"
        )),
        EventKind::ApprovalAnswered {
            approval,
            decision,
            scope,
            by,
            reason,
        } => {
            let scope = scope
                .as_deref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            let reason = reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            line(format!(
                "? approval {approval} {decision}{scope} by {by}{reason}"
            ))
        }
    }
}

/// One line on where a task's result went.
pub fn delivery_line(d: &backshift_protocol::Delivery) -> String {
    let commit = d
        .commit
        .as_deref()
        .map(|c| format!(" at {}", &c[..12.min(c.len())]))
        .unwrap_or_default();
    let remote = d.remote.as_deref().unwrap_or("");
    match d.state.as_str() {
        "opened" => format!(
            "⇪ delivered: {}{commit} pushed to {remote}; pull request #{} {}",
            d.branch,
            d.pull_request.unwrap_or(0),
            d.pull_request_url.as_deref().unwrap_or("")
        ),
        "pushed" => format!("⇪ delivered: {}{commit} pushed to {remote}", d.branch),
        "pushing" => format!("⇪ delivering {}{commit} to {remote}…", d.branch),
        "kept" => format!(
            "⇪ kept in backshift: {}",
            d.error
                .as_deref()
                .unwrap_or("no forge is configured for this repository")
        ),
        _ => format!(
            "⚠ delivery failed ({}{commit}): {}",
            d.branch,
            d.error.as_deref().unwrap_or("no reason recorded")
        ),
    }
}

/// A task's attempts side by side, best first.
pub fn comparison(task: &backshift_protocol::TaskView) -> String {
    let mut out = format!(
        "{:<4} {:<12} {:<12} {:<13} {:<16} {:<10} {:>9} {:>9}  BRANCH\n",
        "RANK", "ATTEMPT", "AGENT", "STATE", "TESTS", "CHANGE", "TOKENS", "TIME"
    );
    for id in &task.ranking {
        let Some(a) = task.attempts.iter().find(|a| &a.id == id) else {
            continue;
        };
        let tests = match &a.verification {
            None => "-".to_owned(),
            Some(v) if v.report.format == "exit_code" => {
                if v.passed {
                    "passed".into()
                } else {
                    "failed".into()
                }
            }
            Some(v) => format!(
                "{} {}/{}",
                if v.passed { "passed" } else { "failed" },
                v.report.passed,
                v.report.passed + v.report.failed
            ),
        };
        let change = a
            .diff
            .map(|d| format!("+{} -{}", d.insertions, d.deletions))
            .unwrap_or_else(|| "-".into());
        let tokens = a
            .usage
            .map(|u| (u.input_tokens + u.output_tokens).to_string())
            .unwrap_or_else(|| "-".into());
        let time = a
            .duration_ms
            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "-".into());
        let mark = if task.winner.as_deref() == Some(a.id.as_str()) {
            "★"
        } else {
            " "
        };
        out.push_str(&format!(
            "{mark}{:<3} {:<12} {:<12} {:<13} {:<16} {:<10} {:>9} {:>9}  {}\n",
            a.rank,
            a.id,
            a.agent,
            a.state.as_str(),
            tests,
            change,
            tokens,
            time,
            a.branch
        ));
    }
    match (&task.winner, &task.winner_by) {
        (Some(w), Some(by)) => out.push_str(&format!("★ the task's result: {w} (chosen by {by})\n")),
        _ if task.attempts.iter().any(|a| !a.state.is_terminal())
            || task
                .attempts
                .iter()
                .any(|a| a.state == backshift_core::AttemptState::Succeeded) =>
        {
            out.push_str("the result is chosen when every attempt has ended (or pick one: backshift pick TASK N)\n")
        }
        _ => out.push_str("no attempt succeeded: there is no result to deliver\n"),
    }
    out
}

/// One line on a verification's outcome: passed or failed, the exit
/// code and the report's counts.
pub fn verification_line(r: &backshift_protocol::VerificationResult) -> String {
    let mark = if r.passed {
        "✔ verification passed"
    } else {
        "✗ verification failed"
    };
    let exit = r.exit_text();
    let counts = if r.report.format == "exit_code" {
        String::new()
    } else {
        format!(
            ", {} passed, {} failed, {} skipped ({})",
            r.report.passed, r.report.failed, r.report.skipped, r.report.format
        )
    };
    let note = r
        .report
        .note
        .as_deref()
        .map(|n| format!("; {n}"))
        .unwrap_or_default();
    format!(
        "{mark} ({}, iteration {}): {exit}{counts}{note}, {} ms",
        &r.commit[..12.min(r.commit.len())],
        r.iteration,
        r.duration_ms
    )
}

/// The warm pool, as `backshift pool` prints it.
pub fn pool(p: &backshift_protocol::PoolView) -> String {
    if p.size == 0 {
        return "the warm pool is off: every task's sandbox is made when the task starts. Set [sandbox] warm = N (sandboxes kept ready per environment) in the server's config to have them made ahead\n".into();
    }
    let mut out = format!(
        "{} ready per environment, the default one and up to {} more that tasks asked for\n",
        p.size, p.max_environments
    );
    let rate = p
        .hit_rate
        .map_or("no task yet".to_owned(), |r| format!("{:.0}%", r * 100.0));
    out.push_str(&format!(
        "since {}: {} tasks started on a warm sandbox, {} waited for a new one (hit rate {rate})\n",
        p.since, p.hits, p.misses
    ));
    if let Some(why) = &p.last_miss {
        out.push_str(&format!("last miss: {why}\n"));
    }
    out.push_str(&format!(
        "{:<14} {:>5} {:>8} {:>5} {:>6}  {}\n",
        "ENVIRONMENT", "READY", "MAKING", "HITS", "MISSES", "IMAGE"
    ));
    for e in &p.environments {
        out.push_str(&format!(
            "{:<14} {:>5} {:>8} {:>5} {:>6}  {}{}\n",
            e.key,
            e.ready,
            e.creating,
            e.hits,
            e.misses,
            e.image,
            if e.default { " (default)" } else { "" }
        ));
        if let Some(err) = &e.last_error {
            out.push_str(&format!("  cannot make its sandboxes: {err}\n"));
        }
    }
    out
}

fn short_args(name: &str, args: &serde_json::Value) -> String {
    let get = |k: &str| args.get(k).and_then(|v| v.as_str()).unwrap_or("");
    match name {
        "run_command" => format!("$ {}", get("command")),
        "read_file" | "list_files" => get("path").to_owned(),
        "write_file" => format!("{} ({} bytes)", get("path"), get("content").len()),
        "replace_in_file" => get("path").to_owned(),
        "finish" => String::new(),
        _ => {
            let s = args.to_string();
            if s.len() > 120 {
                format!(
                    "{}…",
                    &s[..s.char_indices().nth(119).map_or(s.len(), |(i, _)| i)]
                )
            } else {
                s
            }
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}
