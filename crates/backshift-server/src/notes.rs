//! What backshift writes for people about a task's outcome: the body of
//! the pull request that delivers its result, and the handoff note of a
//! task that failed. Pure: Markdown from the task's view and its record.

use backshift_protocol::{AttemptView, TaskView, VerificationResult};

/// A decision on the record: an approval answered or a permission
/// decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// What was asked.
    pub what: String,
    /// `approved`, `denied`, `expired`, `allow_once`, ...
    pub decision: String,
    /// Who decided.
    pub by: String,
    /// Why, when said.
    pub reason: Option<String>,
}

/// Network requests the egress proxy refused, grouped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// `GET host:port/path` or `CONNECT host:port`.
    pub what: String,
    /// Why.
    pub reason: String,
    /// How many times.
    pub count: u32,
}

/// Longest output quoted in a note.
const QUOTE_LINES: usize = 40;

fn first_line(s: &str) -> &str {
    s.lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

fn short(commit: &str) -> &str {
    &commit[..12.min(commit.len())]
}

/// A fenced block of the last lines of `text`.
fn quote(text: &str) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let kept = &lines[lines.len().saturating_sub(QUOTE_LINES)..];
    // A fence longer than any run of backticks inside.
    let fence = "`".repeat(
        kept.iter()
            .map(|l| l.chars().filter(|c| *c == '`').count())
            .max()
            .unwrap_or(0)
            .clamp(2, 10)
            + 1,
    );
    format!("{fence}\n{}\n{fence}\n", kept.join("\n"))
}

/// The pull request's title: the summary's first line, else the prompt's.
pub fn pr_title(summary: Option<&str>, prompt: &str) -> String {
    let line = summary
        .map(first_line)
        .filter(|l| !l.is_empty())
        .unwrap_or_else(|| first_line(prompt));
    if line.chars().count() > 72 {
        line.chars().take(71).chain(['…']).collect()
    } else {
        line.to_owned()
    }
}

fn tests_section(v: Option<&VerificationResult>, max_iterations: u32) -> String {
    let Some(v) = v else {
        return "No verify command is configured for this repository: backshift ran no tests. (Add a `[verify]` table to `backshift.toml`.)\n".into();
    };
    let mut s = format!(
        "{} `{}` in a fresh sandbox on `{}` (iteration {} of at most {max_iterations}): ",
        if v.passed {
            "✅ Passed:"
        } else {
            "❌ Failed:"
        },
        v.command.trim(),
        short(&v.commit),
        v.iteration
    );
    s.push_str(&v.exit_text());
    if v.report.format != "exit_code" {
        s.push_str(&format!(
            "; {} passed, {} failed, {} skipped ({} report)",
            v.report.passed, v.report.failed, v.report.skipped, v.report.format
        ));
    }
    s.push_str(".\n");
    if let Some(note) = &v.report.note {
        s.push_str(&format!("\nNote: {note}.\n"));
    }
    for f in &v.report.failures {
        s.push_str(&format!("\n- `{}`: {}", f.name, first_line(&f.message)));
    }
    if !v.report.failures.is_empty() {
        s.push('\n');
    }
    s
}

fn decisions_section(decisions: &[Decision]) -> String {
    if decisions.is_empty() {
        return "None: nothing was put to a person or refused by the permission policy.\n".into();
    }
    decisions
        .iter()
        .map(|d| {
            format!(
                "- {}: **{}** by {}{}\n",
                d.what,
                d.decision,
                d.by,
                d.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )
        })
        .collect()
}

fn blocked_section(blocked: &[Blocked]) -> String {
    if blocked.is_empty() {
        return "None.\n".into();
    }
    blocked
        .iter()
        .map(|b| {
            let times = if b.count > 1 {
                format!(" ({} times)", b.count)
            } else {
                String::new()
            };
            format!("- `{}`{times}: {}\n", b.what, b.reason)
        })
        .collect()
}

fn attempts_table(task: &TaskView) -> String {
    let mut s = String::from(
        "| rank | attempt | agent | state | tests | change |\n|---|---|---|---|---|---|\n",
    );
    for id in &task.ranking {
        let Some(a) = task.attempts.iter().find(|a| &a.id == id) else {
            continue;
        };
        let tests = match &a.verification {
            None => "-".to_owned(),
            Some(v) if v.passed => format!("passed ({})", v.report.passed),
            Some(v) => format!("failed ({})", v.report.failed),
        };
        let change = a
            .diff
            .map(|d| format!("+{} -{}", d.insertions, d.deletions))
            .unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "| {} | `{}` | {} | {} | {tests} | {change} |\n",
            a.rank, a.id, a.agent, a.state
        ));
    }
    s
}

/// The body of the pull request delivering `winner`.
pub fn pr_body(
    task: &TaskView,
    winner: &AttemptView,
    decisions: &[Decision],
    blocked: &[Blocked],
) -> String {
    let mut s = String::new();
    s.push_str("## Summary\n\n");
    s.push_str(
        winner
            .summary
            .as_deref()
            .unwrap_or("(the agent gave no summary)")
            .trim(),
    );
    s.push_str("\n\n## Task\n\n");
    for l in task.prompt.trim().lines() {
        s.push_str(&format!("> {l}\n"));
    }
    s.push_str("\n## Tests run by backshift\n\n");
    s.push_str(&tests_section(
        winner.verification.as_ref(),
        task.limits.max_iterations,
    ));
    s.push_str("\n## Approvals and denials\n\n");
    s.push_str(&decisions_section(decisions));
    s.push_str("\n## Blocked network calls\n\n");
    s.push_str(&blocked_section(blocked));
    if task.attempts.len() > 1 {
        s.push_str("\n## Attempts\n\n");
        s.push_str(&attempts_table(task));
    }
    s.push_str(&format!(
        "\n---\nMade by backshift: task `{}`, attempt `{}` ({} agent{}), branch `{}` at `{}`.\n",
        task.id,
        winner.id,
        winner.agent,
        match (&task.winner_by, task.attempts.len()) {
            (Some(by), n) if n > 1 => format!("; rank {} of {n}, chosen by {by}", winner.rank),
            _ => String::new(),
        },
        winner.branch,
        winner.head_commit.as_deref().map(short).unwrap_or("?"),
    ));
    s
}

/// The handoff note of a task whose attempts all ended and none
/// succeeded: what was tried, the last failing output, and where the
/// work stands (`work`: per attempt, the commit its branch holds).
pub fn handoff(task: &TaskView, work: &[(String, Option<String>)]) -> String {
    let mut s = format!(
        "# Handoff: {}\n\nNo attempt succeeded, so nothing was delivered.\n\n## What was tried\n\n",
        first_line(&task.prompt)
    );
    for a in &task.attempts {
        let why = match (&a.reason, &a.detail) {
            (Some(r), Some(d)) => format!("{r}: {}", first_line(d)),
            (Some(r), None) => r.to_string(),
            (None, Some(d)) => first_line(d).to_owned(),
            (None, None) => String::new(),
        };
        let iterations = if a.verifications > 0 {
            format!(", {} verification(s)", a.verifications)
        } else {
            String::new()
        };
        s.push_str(&format!(
            "- `{}` ({} agent{iterations}): **{}**{}\n",
            a.id,
            a.agent,
            a.state,
            if why.is_empty() {
                String::new()
            } else {
                format!(" — {why}")
            }
        ));
    }
    // The last failing output: the last attempt's failed verification,
    // else the end of its log.
    if let Some(last) = task.attempts.last() {
        s.push_str("\n## The last failing output\n\n");
        match &last.verification {
            Some(v) if !v.passed => {
                s.push_str(&tests_section(Some(v), task.limits.max_iterations));
                if !v.output_tail.trim().is_empty() {
                    s.push('\n');
                    s.push_str(&quote(&v.output_tail));
                }
            }
            _ if !last.log_tail.is_empty() => s.push_str(&quote(&last.log_tail.join("\n"))),
            _ => s.push_str("(nothing was recorded)\n"),
        }
    }
    s.push_str("\n## Where the work stands\n\n");
    for a in &task.attempts {
        match work.iter().find(|(id, _)| id == &a.id).and_then(|(_, c)| c.as_deref()) {
            Some(commit) => s.push_str(&format!(
                "- `{}`: branch `{}` holds its last work at `{}` — `backshift checkout {}` to continue from it.\n",
                a.id,
                a.branch,
                short(commit),
                a.id
            )),
            None => s.push_str(&format!("- `{}`: no work was saved.\n", a.id)),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use backshift_core::{AttemptState, FailureReason, Limits};
    use backshift_protocol::{DiffSummary, TestFailure, TestReport};

    fn attempt(n: u32, state: AttemptState) -> AttemptView {
        serde_json::from_value(serde_json::json!({
            "id": format!("t1-{n}"), "task_id": "t1", "n": n, "agent": "builtin",
            "state": state, "reason": null, "detail": null,
            "branch": format!("backshift/t1-fix-{n}"), "base_commit": null,
            "head_commit": null, "summary": null, "git_path": "/git/p.git", "last_seq": 1,
            "created_at": "x", "updated_at": "x"
        }))
        .unwrap()
    }

    fn verification(passed: bool) -> VerificationResult {
        VerificationResult {
            iteration: 2,
            commit: "abcdef0123456789".into(),
            command: "make test".into(),
            passed,
            exit_code: Some(if passed { 0 } else { 2 }),
            duration_ms: 5,
            report: TestReport {
                format: "junit".into(),
                passed: 3,
                failed: u64::from(!passed),
                skipped: 0,
                failures: if passed {
                    vec![]
                } else {
                    vec![TestFailure {
                        name: "t.test_x".into(),
                        message: "AssertionError: 1 != 2\ntrace".into(),
                    }]
                },
                note: None,
            },
            output_tail: "line with ``` fence\nFAILED".into(),
            error: None,
        }
    }

    fn task(attempts: Vec<AttemptView>) -> TaskView {
        TaskView {
            id: "t1".into(),
            project_id: "p".into(),
            prompt: "Fix the flaky login test\nIt fails on Mondays.".into(),
            repo: "https://forge/acme/app".into(),
            base_ref: None,
            agent: "builtin".into(),
            command: None,
            limits: Limits::default(),
            verify: None,
            created_at: "x".into(),
            state: AttemptState::Succeeded,
            ranking: attempts.iter().map(|a| a.id.clone()).collect(),
            attempts,
            winner: Some("t1-1".into()),
            winner_by: Some("auto".into()),
            delivery: None,
            handoff: None,
        }
    }

    #[test]
    fn the_pull_request_says_what_was_done_tested_decided_and_blocked() {
        let mut w = attempt(1, AttemptState::Succeeded);
        w.summary = Some("Fix login\n\nThe clock was mocked wrong.".into());
        w.head_commit = Some("0123456789abcdef".into());
        w.verification = Some(verification(true));
        w.diff = Some(DiffSummary {
            files_changed: 1,
            insertions: 3,
            deletions: 1,
        });
        w.rank = 1;
        let mut other = attempt(2, AttemptState::Failed);
        other.rank = 2;
        let t = task(vec![w.clone(), other]);
        let body = pr_body(
            &t,
            &w,
            &[Decision {
                what: "egress pypi.org:443".into(),
                decision: "approved".into(),
                by: "token:alice".into(),
                reason: None,
            }],
            &[Blocked {
                what: "CONNECT evil.invalid:443".into(),
                reason: "no rule allows it".into(),
                count: 2,
            }],
        );
        for want in [
            "## Summary\n\nFix login\n\nThe clock was mocked wrong.",
            "> Fix the flaky login test\n> It fails on Mondays.",
            "✅ Passed: `make test` in a fresh sandbox on `abcdef012345` (iteration 2 of at most 3): exit code 0; 3 passed, 0 failed, 0 skipped (junit report).",
            "- egress pypi.org:443: **approved** by token:alice",
            "- `CONNECT evil.invalid:443` (2 times): no rule allows it",
            "| 1 | `t1-1` | builtin | succeeded | passed (3) | +3 -1 |",
            "rank 1 of 2, chosen by auto",
            "branch `backshift/t1-fix-1` at `0123456789ab`",
        ] {
            assert!(body.contains(want), "{want:?} missing from:\n{body}");
        }
        assert_eq!(pr_title(w.summary.as_deref(), &t.prompt), "Fix login");
        assert_eq!(pr_title(None, &t.prompt), "Fix the flaky login test");
        let mut alone = t.clone();
        alone.attempts.truncate(1);
        let body = pr_body(&alone, &w, &[], &[]);
        assert!(body.contains("None: nothing was put to a person"));
        assert!(!body.contains("## Attempts"));
    }

    #[test]
    fn a_handoff_says_what_was_tried_what_failed_and_where_the_work_is() {
        let mut a = attempt(1, AttemptState::Failed);
        a.reason = Some(FailureReason::VerificationFailed);
        a.detail = Some("verification failed 3 time(s)\nmore".into());
        a.verification = Some(verification(false));
        a.verifications = 3;
        let mut b = attempt(2, AttemptState::Failed);
        b.reason = Some(FailureReason::AgentCrashed);
        b.log_tail = vec!["boom".into()];
        let t = task(vec![b.clone(), a.clone()]);
        let note = handoff(
            &t,
            &[
                ("t1-1".into(), Some("fedcba9876543210".into())),
                ("t1-2".into(), None),
            ],
        );
        for want in [
            "# Handoff: Fix the flaky login test",
            "- `t1-1` (builtin agent, 3 verification(s)): **failed** — verification_failed: verification failed 3 time(s)",
            "- `t1-2` (builtin agent): **failed** — agent_crashed",
            "❌ Failed: `make test`",
            "- `t.test_x`: AssertionError: 1 != 2",
            "````\nline with ``` fence\nFAILED\n````",
            "branch `backshift/t1-fix-1` holds its last work at `fedcba987654` — `backshift checkout t1-1`",
            "- `t1-2`: no work was saved.",
        ] {
            assert!(note.contains(want), "{want:?} missing from:\n{note}");
        }
    }
}
