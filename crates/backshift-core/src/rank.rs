//! Ranking the attempts of one task: by evidence first (did it succeed,
//! did verification pass), then by the size of the change, then by what
//! it cost and how long it took.

use std::cmp::Ordering;

/// What verification said of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The last verification passed.
    Passed,
    /// No verification ran (none configured, or it never got there).
    None,
    /// The last verification failed.
    Failed,
}

/// What ranking reads of one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// It ended `succeeded` (its branch is published).
    pub succeeded: bool,
    /// Its last verification.
    pub verdict: Verdict,
    /// Tests its last verification found failing.
    pub tests_failed: u64,
    /// Lines added and removed on its branch (0 when nothing changed or
    /// nothing was published).
    pub diff_lines: u64,
    /// What its model calls cost, when prices are known.
    pub cost_usd: Option<f64>,
    /// Model tokens it used.
    pub tokens: u64,
    /// From its start to its end.
    pub duration_ms: u64,
}

impl Candidate {
    fn key(&self) -> (bool, u8, u64, bool, u64) {
        let verdict = match self.verdict {
            Verdict::Passed => 0,
            Verdict::None => 1,
            Verdict::Failed => 2,
        };
        // A change that does nothing ranks after changes that do something.
        (
            !self.succeeded,
            verdict,
            self.tests_failed,
            self.diff_lines == 0,
            self.diff_lines,
        )
    }

    fn compare(&self, other: &Candidate) -> Ordering {
        self.key().cmp(&other.key()).then_with(|| {
            let cost = match (self.cost_usd, other.cost_usd) {
                (Some(a), Some(b)) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
                _ => self.tokens.cmp(&other.tokens),
            };
            cost.then(self.duration_ms.cmp(&other.duration_ms))
        })
    }
}

/// The candidates' indices, best first; equal ones keep their order
/// (attempt number).
pub fn rank(candidates: &[Candidate]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| candidates[a].compare(&candidates[b]));
    order
}

/// Why `best` ranks above `next`, in words (for the record of an
/// automatic choice).
pub fn why_first(best: &Candidate, next: Option<&Candidate>) -> String {
    let Some(next) = next else {
        return "the only attempt that could be chosen".into();
    };
    if best.succeeded != next.succeeded {
        return "the only one of the best that succeeded".into();
    }
    if best.verdict != next.verdict {
        return "its verification passed and the next one's did not".into();
    }
    if best.tests_failed != next.tests_failed {
        return format!(
            "fewer failing tests ({} against {})",
            best.tests_failed, next.tests_failed
        );
    }
    if best.diff_lines != next.diff_lines {
        return format!(
            "a smaller change ({} lines against {})",
            best.diff_lines, next.diff_lines
        );
    }
    match (best.cost_usd, next.cost_usd) {
        (Some(a), Some(b)) if a != b => format!("cheaper (${a:.4} against ${b:.4})"),
        _ if best.tokens != next.tokens => format!(
            "fewer model tokens ({} against {})",
            best.tokens, next.tokens
        ),
        _ if best.duration_ms != next.duration_ms => format!(
            "faster ({} ms against {} ms)",
            best.duration_ms, next.duration_ms
        ),
        _ => "equal to the next; the earlier attempt".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(succeeded: bool, verdict: Verdict, diff_lines: u64) -> Candidate {
        Candidate {
            succeeded,
            verdict,
            tests_failed: 0,
            diff_lines,
            cost_usd: None,
            tokens: 100,
            duration_ms: 1000,
        }
    }

    #[test]
    fn evidence_first_then_size_then_cost_and_time() {
        let all = vec![
            c(false, Verdict::Failed, 3), // 0: failed verification
            c(true, Verdict::Passed, 40), // 1: passed, big
            c(true, Verdict::Passed, 4),  // 2: passed, small
            c(true, Verdict::None, 1),    // 3: not verified
            c(true, Verdict::Passed, 0),  // 4: passed, changed nothing
        ];
        assert_eq!(rank(&all), [2, 1, 4, 3, 0]);
        assert!(why_first(&all[2], Some(&all[1])).contains("smaller change (4 lines against 40)"));
        assert!(why_first(&all[1], Some(&all[3])).contains("verification passed"));
        assert!(why_first(&all[3], Some(&all[0])).contains("succeeded"));
        assert!(why_first(&all[2], None).contains("only"));
    }

    #[test]
    fn ties_go_to_the_cheaper_then_the_faster_then_the_earlier() {
        let mut a = c(true, Verdict::Passed, 5);
        let mut b = a.clone();
        b.tokens = 50;
        assert_eq!(rank(&[a.clone(), b.clone()]), [1, 0]);
        a.cost_usd = Some(0.5);
        b.cost_usd = Some(0.7);
        assert_eq!(
            rank(&[a.clone(), b.clone()]),
            [0, 1],
            "cost wins over tokens when known"
        );
        let mut d = c(true, Verdict::Passed, 5);
        d.duration_ms = 10;
        assert_eq!(rank(&[c(true, Verdict::Passed, 5), d.clone()]), [1, 0]);
        assert!(why_first(&d, Some(&c(true, Verdict::Passed, 5))).contains("faster"));
        assert_eq!(rank(&[d.clone(), d.clone()]), [0, 1]);
        let mut failing = c(false, Verdict::Failed, 5);
        failing.tests_failed = 1;
        let mut worse = failing.clone();
        worse.tests_failed = 3;
        assert_eq!(rank(&[worse, failing]), [1, 0]);
    }
}
