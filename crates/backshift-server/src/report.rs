//! Test reports: what a verify command's JUnit XML file or TAP output
//! says, as a [`TestReport`]. Pure.
//!
//! JUnit XML is read by `junit-parser`. TAP is read here, leniently: the
//! producers people run (`prove`, `bats`, `node --test`, pytest-tap) write
//! TAP 12 or 13, with or without a version line, and a strict TAP 14
//! reader refuses all of those.

use backshift_protocol::{TestFailure, TestReport};

/// Longest failure message kept per test.
const MESSAGE_CHARS: usize = 2_000;
/// Most failures listed; the counts still cover all of them.
const MAX_FAILURES: usize = 50;

/// Reads a report file the verify command wrote: JUnit XML when it
/// starts like XML, TAP otherwise.
pub fn from_file(text: &str) -> Result<TestReport, String> {
    if text.trim_start().starts_with('<') {
        junit(text)
    } else {
        tap(text).ok_or_else(|| "it is neither JUnit XML nor TAP (no `ok`/`not ok` lines)".into())
    }
}

/// A JUnit XML document (`<testsuites>` or a lone `<testsuite>`; nested
/// suites included).
pub fn junit(text: &str) -> Result<TestReport, String> {
    let suites = junit_parser::from_reader(std::io::Cursor::new(text.as_bytes()))
        .map_err(|e| format!("it is not valid JUnit XML: {e}"))?;
    let mut report = TestReport {
        format: "junit".into(),
        ..Default::default()
    };
    fn walk(suite: &junit_parser::TestSuite, report: &mut TestReport) {
        for case in &suite.cases {
            let name = match &case.classname {
                Some(class) if !class.is_empty() => format!("{class}.{}", case.original_name),
                _ => case.original_name.clone(),
            };
            let failed = |message: &str, text: &str, kind: &str| {
                let mut parts: Vec<&str> = Vec::new();
                for p in [kind, message, text] {
                    let p = p.trim();
                    if !p.is_empty() && !parts.iter().any(|q| q.contains(p)) {
                        parts.push(p);
                    }
                }
                shorten(&parts.join(": "))
            };
            match &case.status {
                junit_parser::TestStatus::Success => report.passed += 1,
                junit_parser::TestStatus::Skipped(_) => report.skipped += 1,
                junit_parser::TestStatus::Failure(f) => {
                    report.failed += 1;
                    push(report, name, failed(&f.message, &f.text, &f.failure_type));
                }
                junit_parser::TestStatus::Error(e) => {
                    report.failed += 1;
                    push(report, name, failed(&e.message, &e.text, &e.error_type));
                }
            }
        }
        for inner in &suite.suites {
            walk(inner, report);
        }
    }
    for suite in &suites.suites {
        walk(suite, &mut report);
    }
    Ok(report)
}

/// TAP output, when `text` holds any: top-level `ok` / `not ok` lines
/// (indented subtests are summed up by their parent's line), `# SKIP` and
/// `# TODO` directives, a YAML block after a failure as its message. A
/// plan (`1..N`) that more tests were promised than ran, and `Bail out!`,
/// count as failures. `None` when there is no test line at all.
pub fn tap(text: &str) -> Option<TestReport> {
    let mut report = TestReport {
        format: "tap".into(),
        ..Default::default()
    };
    let mut plan: Option<u64> = None;
    let mut seen = 0u64;
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let line = line.trim_end();
        if let Some(reason) = line.strip_prefix("Bail out!") {
            report.failed += 1;
            push(&mut report, "Bail out!".into(), shorten(reason.trim()));
            continue;
        }
        if let Some(n) = line.strip_prefix("1..") {
            let digits: String = n.chars().take_while(char::is_ascii_digit).collect();
            plan = digits.parse().ok();
            continue;
        }
        let (ok, rest) = if let Some(rest) = line.strip_prefix("not ok") {
            (false, rest)
        } else if let Some(rest) = line.strip_prefix("ok") {
            (true, rest)
        } else {
            continue;
        };
        if !(rest.is_empty() || rest.starts_with(' ')) {
            continue; // "okay", "oknot": not a test line
        }
        seen += 1;
        // "ok 3 - name # SKIP why": number, description, directive.
        let rest = rest.trim_start();
        let rest = rest
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start();
        let rest = rest.strip_prefix('-').unwrap_or(rest).trim();
        let (desc, directive) = match rest
            .split_once(" # ")
            .or_else(|| rest.strip_prefix("# ").map(|d| ("", d)))
        {
            Some((d, dir)) => (d.trim(), dir.trim().to_ascii_uppercase()),
            None => (rest, String::new()),
        };
        let name = if desc.is_empty() {
            format!("test {seen}")
        } else {
            desc.to_owned()
        };
        if directive.starts_with("SKIP") || directive.starts_with("TODO") {
            report.skipped += 1;
            continue;
        }
        if ok {
            report.passed += 1;
            continue;
        }
        report.failed += 1;
        // A YAML diagnostic block (or `#` comments) right after it.
        let mut message = Vec::new();
        let mut in_yaml = false;
        while let Some(next) = lines.peek() {
            let t = next.trim();
            if t == "---" && !in_yaml {
                in_yaml = true;
            } else if in_yaml && t == "..." {
                lines.next();
                break;
            } else if in_yaml || t.starts_with('#') {
                message.push(t.trim_start_matches('#').trim().to_owned());
            } else {
                break;
            }
            lines.next();
        }
        push(&mut report, name, shorten(message.join("\n").trim()));
    }
    if seen == 0 && report.failed == 0 {
        return None;
    }
    if let Some(planned) = plan
        && planned > seen
    {
        report.failed += planned - seen;
        report.note = Some(format!(
            "the plan promised {planned} tests and {seen} reported (the missing ones count as failed)"
        ));
    }
    Some(report)
}

/// The report of a command that gave none: its exit code alone.
pub fn exit_code_only(note: Option<String>) -> TestReport {
    TestReport {
        format: "exit_code".into(),
        note,
        ..Default::default()
    }
}

fn push(report: &mut TestReport, name: String, message: String) {
    if report.failures.len() < MAX_FAILURES {
        report.failures.push(TestFailure { name, message });
    }
}

fn shorten(s: &str) -> String {
    if s.chars().count() <= MESSAGE_CHARS {
        return s.to_owned();
    }
    let kept: String = s.chars().take(MESSAGE_CHARS).collect();
    format!("{kept}… (shortened)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_counts_cases_and_keeps_failure_messages() {
        let xml = r#"<?xml version="1.0" encoding="utf-8"?>
<testsuites>
  <testsuite name="pytest" tests="5" failures="1" errors="1" skipped="1">
    <testcase classname="tests.test_calc" name="test_add" time="0.001"/>
    <testcase classname="tests.test_calc" name="test_sub" time="0.001">
      <failure message="AssertionError: assert 1 == 2">def test_sub():
&gt;       assert sub(3, 1) == 1
E       AssertionError: assert 2 == 1</failure>
    </testcase>
    <testcase classname="tests.test_calc" name="test_div"><error message="ZeroDivisionError" type="ZeroDivisionError"/></testcase>
    <testcase classname="tests.test_calc" name="test_pow"><skipped message="later"/></testcase>
    <testsuite name="inner"><testcase name="test_inner"/></testsuite>
  </testsuite>
</testsuites>"#;
        let r = junit(xml).unwrap();
        assert_eq!(
            (r.format.as_str(), r.passed, r.failed, r.skipped),
            ("junit", 2, 2, 1)
        );
        assert_eq!(r.failures[0].name, "tests.test_calc.test_sub");
        assert!(
            r.failures[0]
                .message
                .starts_with("AssertionError: assert 1 == 2")
        );
        assert!(r.failures[0].message.contains("assert sub(3, 1) == 1"));
        assert_eq!(r.failures[1].message, "ZeroDivisionError");
        // A lone <testsuite> is a report too.
        let lone = r#"<testsuite tests="1"><testcase name="t"/></testsuite>"#;
        assert_eq!(from_file(lone).unwrap().passed, 1);
        assert!(junit("<testsuites><testcase").is_err());
    }

    #[test]
    fn tap_reads_the_common_producers() {
        // TAP 13 as node --test writes it, with a YAML block and a subtest.
        let node = "TAP version 13\n# Subtest: adds\nok 1 - adds\n  ---\n  duration_ms: 1\n  ...\nnot ok 2 - subtracts\n  ---\n  error: 'Expected 2, got 4'\n  ...\nok 3 - later # SKIP not yet\nok 4 - flaky # todo known\n1..4\n# pass 1\n";
        let r = tap(node).unwrap();
        assert_eq!((r.passed, r.failed, r.skipped), (1, 1, 2));
        assert_eq!(r.failures[0].name, "subtracts");
        assert!(r.failures[0].message.contains("Expected 2, got 4"));
        // prove/bats style: plan first, no version, comments as messages.
        let bats = "1..3\nok 1 first\nnot ok 2 second\n# (in test file t.bats, line 7)\n#   `[ 1 -eq 2 ]' failed\nok 3\n";
        let r = tap(bats).unwrap();
        assert_eq!((r.passed, r.failed), (2, 1));
        assert!(r.failures[0].message.contains("line 7"), "{:?}", r.failures);
        // Fewer tests than planned: the rest failed.
        let short = "1..5\nok 1\nok 2\n";
        let r = tap(short).unwrap();
        assert_eq!((r.passed, r.failed), (2, 3));
        assert!(r.note.unwrap().contains("promised 5"));
        assert_eq!(tap("Bail out! no database").unwrap().failed, 1);
        // Not TAP.
        assert!(tap("all good\nokay then\n").is_none());
        assert!(from_file("hello").is_err());
    }

    #[test]
    fn long_messages_are_shortened_and_failures_capped() {
        let mut tap_text = String::new();
        for i in 1..=80 {
            tap_text.push_str(&format!("not ok {i} - t{i}\n# {}\n", "x".repeat(3000)));
        }
        let r = tap(&tap_text).unwrap();
        assert_eq!(r.failed, 80);
        assert_eq!(r.failures.len(), MAX_FAILURES);
        assert!(r.failures[0].message.ends_with("(shortened)"));
    }
}
