//! How long an attempt may stay in each active state. A state that
//! overstays ends the attempt `timed_out`, with the state named in the
//! detail: nothing hangs silently.

use crate::{AttemptState, Limits};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Per-state deadlines, in seconds (server config `[deadlines]`). `running`
/// is bounded by the task's own wall-time limit instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Deadlines {
    /// Creating the sandbox, image pull included.
    pub provisioning_secs: u64,
    /// Fetching the repository and copying the checkout in.
    pub preparing_secs: u64,
    /// Waiting for a person to answer an approval.
    pub waiting_approval_secs: u64,
    /// Running the project's tests.
    pub verifying_secs: u64,
    /// Committing and bringing the branch back.
    pub publishing_secs: u64,
    /// Adopting or rebuilding the sandbox from a checkpoint.
    pub recovering_secs: u64,
    /// Stopped, waiting to be resumed.
    pub paused_secs: u64,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            provisioning_secs: 900,
            preparing_secs: 900,
            waiting_approval_secs: 24 * 3600,
            verifying_secs: 3600,
            publishing_secs: 600,
            recovering_secs: 900,
            paused_secs: 7 * 24 * 3600,
        }
    }
}

impl AttemptState {
    /// How long the attempt may stay in this state. `None` for `queued`
    /// (it waits for capacity, not for work) and for terminal states.
    pub fn deadline(self, deadlines: &Deadlines, limits: &Limits) -> Option<Duration> {
        let secs = match self {
            AttemptState::Queued => return None,
            AttemptState::Provisioning => deadlines.provisioning_secs,
            AttemptState::Preparing => deadlines.preparing_secs,
            AttemptState::Running => limits.wall_time_secs,
            AttemptState::WaitingApproval => deadlines.waiting_approval_secs,
            AttemptState::Verifying => deadlines.verifying_secs,
            AttemptState::Publishing => deadlines.publishing_secs,
            AttemptState::Recovering => deadlines.recovering_secs,
            AttemptState::Paused => deadlines.paused_secs,
            AttemptState::Succeeded
            | AttemptState::Failed
            | AttemptState::Cancelled
            | AttemptState::TimedOut => return None,
        };
        Some(Duration::from_secs(secs))
    }
}

/// Wall time an attempt has used at `now` (milliseconds): since its first
/// start, minus the time it was held (paused or waiting for a person:
/// `held_ms` before its current state, plus the current stay when the
/// current state holds the clock, which began at `state_since`).
pub fn wall_time_used(
    started_at: i64,
    held_ms: i64,
    state: AttemptState,
    state_since: i64,
    now: i64,
) -> i64 {
    let current = if state.holds_wall_time() {
        now.saturating_sub(state_since).max(0)
    } else {
        0
    };
    now.saturating_sub(started_at)
        .saturating_sub(held_ms)
        .saturating_sub(current)
        .max(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Transition;

    #[test]
    fn held_time_does_not_count_against_the_wall_time_budget() {
        use AttemptState as S;
        // Started at 0; 300 ms held before; running since 1000.
        assert_eq!(wall_time_used(0, 300, S::Running, 1000, 2000), 1700);
        // Waiting for a person since 1000: the clock stopped there.
        assert_eq!(wall_time_used(0, 300, S::WaitingApproval, 1000, 5000), 700);
        assert_eq!(wall_time_used(0, 0, S::Paused, 100, 9000), 100);
        // Never negative, whatever the clocks say.
        assert_eq!(wall_time_used(500, 0, S::Running, 500, 400), 0);
    }

    #[test]
    fn every_active_state_has_a_deadline_that_ends_the_attempt() {
        let (d, l) = (Deadlines::default(), Limits::default());
        for s in AttemptState::ALL {
            match s.deadline(&d, &l) {
                None => assert!(s.is_terminal() || s == AttemptState::Queued, "{s}"),
                Some(_) => assert_eq!(
                    s.apply(Transition::Timeout),
                    Ok(AttemptState::TimedOut),
                    "{s}'s deadline must end it"
                ),
            }
        }
    }
}
