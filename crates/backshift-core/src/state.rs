//! The attempt lifecycle (DESIGN §3) as a pure state machine.
//!
//! The supervisor asks [`AttemptState::apply`] for the next state, persists
//! it, and only then acts on it; an illegal transition is a bug it reports
//! instead of hiding.

use serde::{Deserialize, Serialize};
use std::fmt;
use utoipa::ToSchema;

/// Where an attempt is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptState {
    /// Accepted, waiting for a free slot.
    Queued,
    /// Creating the sandbox (image, container).
    Provisioning,
    /// Putting the repository into the sandbox on the attempt's branch.
    Preparing,
    /// The agent is working.
    Running,
    /// The agent is blocked on a human decision.
    WaitingApproval,
    /// backshift runs the project's tests.
    Verifying,
    /// The branch is being committed and brought back.
    Publishing,
    /// The sandbox was lost; rebuilding from the last checkpoint.
    Recovering,
    /// Idle: sandbox stopped, volume kept.
    Paused,
    /// Finished with a branch.
    Succeeded,
    /// Ended by an error; the attempt's reason says which.
    Failed,
    /// Ended by a person.
    Cancelled,
    /// Ended by its wall-time limit.
    TimedOut,
}

impl AttemptState {
    /// Every state, for exhaustive tests and documentation.
    pub const ALL: [AttemptState; 13] = [
        AttemptState::Queued,
        AttemptState::Provisioning,
        AttemptState::Preparing,
        AttemptState::Running,
        AttemptState::WaitingApproval,
        AttemptState::Verifying,
        AttemptState::Publishing,
        AttemptState::Recovering,
        AttemptState::Paused,
        AttemptState::Succeeded,
        AttemptState::Failed,
        AttemptState::Cancelled,
        AttemptState::TimedOut,
    ];

    /// True once nothing more will happen to the attempt.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            AttemptState::Succeeded
                | AttemptState::Failed
                | AttemptState::Cancelled
                | AttemptState::TimedOut
        )
    }

    /// Time in this state does not count against the attempt's wall-time
    /// budget: it waits for a person (or was paused by one).
    pub fn holds_wall_time(self) -> bool {
        matches!(self, AttemptState::Paused | AttemptState::WaitingApproval)
    }

    /// Between leaving the queue and the end, with a sandbox at work
    /// (not recovering or paused).
    fn has_sandbox_work(self) -> bool {
        matches!(
            self,
            AttemptState::Provisioning
                | AttemptState::Preparing
                | AttemptState::Running
                | AttemptState::WaitingApproval
                | AttemptState::Verifying
                | AttemptState::Publishing
        )
    }

    /// The name used in the API, the database and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptState::Queued => "queued",
            AttemptState::Provisioning => "provisioning",
            AttemptState::Preparing => "preparing",
            AttemptState::Running => "running",
            AttemptState::WaitingApproval => "waiting_approval",
            AttemptState::Verifying => "verifying",
            AttemptState::Publishing => "publishing",
            AttemptState::Recovering => "recovering",
            AttemptState::Paused => "paused",
            AttemptState::Succeeded => "succeeded",
            AttemptState::Failed => "failed",
            AttemptState::Cancelled => "cancelled",
            AttemptState::TimedOut => "timed_out",
        }
    }

    /// Inverse of [`AttemptState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The state after `t`, or why `t` cannot happen now.
    pub fn apply(self, t: Transition) -> Result<AttemptState, TransitionError> {
        use AttemptState as S;
        use Transition as T;
        let next = match (self, t) {
            (s, _) if s.is_terminal() => None,
            (_, T::Cancel) => Some(S::Cancelled),
            (_, T::Fail(_)) => Some(S::Failed),
            (S::Queued, T::Timeout) => None,
            (_, T::Timeout) => Some(S::TimedOut),
            (S::Queued, T::Start) => Some(S::Provisioning),
            (S::Provisioning, T::SandboxReady) => Some(S::Preparing),
            (S::Preparing, T::Prepared) => Some(S::Running),
            (S::Running, T::AgentFinished { verify: true }) => Some(S::Verifying),
            (S::Running, T::AgentFinished { verify: false }) => Some(S::Publishing),
            (S::Running, T::ApprovalNeeded) => Some(S::WaitingApproval),
            (S::WaitingApproval, T::ApprovalAnswered) => Some(S::Running),
            (S::Verifying, T::VerificationPassed) => Some(S::Publishing),
            (S::Verifying, T::VerificationFailed) => Some(S::Running),
            (S::Publishing, T::Published) => Some(S::Succeeded),
            (s, T::SandboxLost) if s.has_sandbox_work() || s == S::Paused => Some(S::Recovering),
            (s, T::Interrupted) if s.has_sandbox_work() || s == S::Recovering => {
                Some(S::Recovering)
            }
            (S::Recovering, T::Recovered) => Some(S::Running),
            (S::Running | S::WaitingApproval, T::Pause) => Some(S::Paused),
            (S::Paused, T::Resume) => Some(S::Running),
            _ => None,
        };
        next.ok_or(TransitionError {
            from: self,
            transition: t,
        })
    }
}

impl fmt::Display for AttemptState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// A slot is free; start provisioning.
    Start,
    /// The sandbox exists and answers.
    SandboxReady,
    /// The checkout is in place.
    Prepared,
    /// The agent says it is done; `verify` when a verify command is set.
    AgentFinished {
        /// Whether verification follows.
        verify: bool,
    },
    /// The agent is blocked on an approval.
    ApprovalNeeded,
    /// The approval was answered.
    ApprovalAnswered,
    /// The tests passed.
    VerificationPassed,
    /// The tests failed and another iteration is allowed.
    VerificationFailed,
    /// The branch is stored.
    Published,
    /// The sandbox disappeared.
    SandboxLost,
    /// The control plane stopped while driving the attempt (its agent
    /// loop and any effect in flight are gone; the sandbox may live on).
    Interrupted,
    /// A replacement sandbox holds the last checkpoint.
    Recovered,
    /// Idle: stop the sandbox.
    Pause,
    /// Work resumes.
    Resume,
    /// An error ended the attempt.
    Fail(FailureReason),
    /// A person cancelled it.
    Cancel,
    /// The wall-time limit ran out.
    Timeout,
}

/// A transition that the current state does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransitionError {
    /// The state the attempt was in.
    pub from: AttemptState,
    /// What was asked of it.
    pub transition: Transition,
}

impl fmt::Display for TransitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "illegal transition {:?} from state {}",
            self.transition, self.from
        )
    }
}

impl std::error::Error for TransitionError {}

/// Why an attempt failed: machine-readable, stable, documented in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The sandbox image does not exist on the Docker host.
    ImageMissing,
    /// The repository's environment (devcontainer.json) is invalid, or
    /// its image could not be built or pulled.
    ImageBuildFailed,
    /// The environment's setup (`postCreateCommand`, `postStartCommand`)
    /// failed.
    SetupFailed,
    /// The sandbox could not be created or stopped answering.
    SandboxFailed,
    /// The repository could not be fetched or put into the sandbox.
    CloneFailed,
    /// The model endpoint could not be reached after retries.
    ModelUnreachable,
    /// The model endpoint answered with an error we cannot retry.
    ModelError,
    /// The agent used all its turns without finishing.
    MaxTurns,
    /// The agent used its model-token budget without finishing.
    BudgetExhausted,
    /// The agent misbehaved in a way it could not recover from.
    AgentError,
    /// The agent's process crashed or exited before finishing (a command
    /// agent: its command exited non-zero).
    AgentCrashed,
    /// The verify command still failed after the last iteration
    /// `limits.max_iterations` allows (or the verify configuration is
    /// invalid).
    VerificationFailed,
    /// The branch could not be committed or brought back.
    PublishFailed,
    /// The control plane stopped while the attempt was active.
    ControlPlaneRestarted,
    /// A bug in backshift; the detail says where.
    Internal,
}

impl FailureReason {
    /// Every reason, for exhaustive tests and documentation.
    pub const ALL: [FailureReason; 15] = [
        FailureReason::ImageMissing,
        FailureReason::ImageBuildFailed,
        FailureReason::SetupFailed,
        FailureReason::SandboxFailed,
        FailureReason::CloneFailed,
        FailureReason::ModelUnreachable,
        FailureReason::ModelError,
        FailureReason::MaxTurns,
        FailureReason::BudgetExhausted,
        FailureReason::AgentError,
        FailureReason::AgentCrashed,
        FailureReason::VerificationFailed,
        FailureReason::PublishFailed,
        FailureReason::ControlPlaneRestarted,
        FailureReason::Internal,
    ];

    /// The name used in the API, the database and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::ImageMissing => "image_missing",
            FailureReason::ImageBuildFailed => "image_build_failed",
            FailureReason::SetupFailed => "setup_failed",
            FailureReason::SandboxFailed => "sandbox_failed",
            FailureReason::CloneFailed => "clone_failed",
            FailureReason::ModelUnreachable => "model_unreachable",
            FailureReason::ModelError => "model_error",
            FailureReason::MaxTurns => "max_turns",
            FailureReason::BudgetExhausted => "budget_exhausted",
            FailureReason::AgentError => "agent_error",
            FailureReason::AgentCrashed => "agent_crashed",
            FailureReason::VerificationFailed => "verification_failed",
            FailureReason::PublishFailed => "publish_failed",
            FailureReason::ControlPlaneRestarted => "control_plane_restarted",
            FailureReason::Internal => "internal",
        }
    }

    /// Inverse of [`FailureReason::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AttemptState as S;

    fn all_transitions() -> Vec<Transition> {
        let mut ts = vec![
            Transition::Start,
            Transition::SandboxReady,
            Transition::Prepared,
            Transition::AgentFinished { verify: true },
            Transition::AgentFinished { verify: false },
            Transition::ApprovalNeeded,
            Transition::ApprovalAnswered,
            Transition::VerificationPassed,
            Transition::VerificationFailed,
            Transition::Published,
            Transition::SandboxLost,
            Transition::Interrupted,
            Transition::Recovered,
            Transition::Pause,
            Transition::Resume,
            Transition::Cancel,
            Transition::Timeout,
        ];
        ts.extend(FailureReason::ALL.map(Transition::Fail));
        ts
    }

    #[test]
    fn nothing_leaves_a_terminal_state() {
        for s in S::ALL.into_iter().filter(|s| s.is_terminal()) {
            for t in all_transitions() {
                assert!(s.apply(t).is_err(), "{s} accepted {t:?}");
            }
        }
    }

    #[test]
    fn every_active_state_can_be_cancelled_and_failed() {
        for s in S::ALL.into_iter().filter(|s| !s.is_terminal()) {
            assert_eq!(s.apply(Transition::Cancel), Ok(S::Cancelled));
            for r in FailureReason::ALL {
                assert_eq!(s.apply(Transition::Fail(r)), Ok(S::Failed));
            }
        }
    }

    #[test]
    fn every_non_terminal_state_reaches_a_terminal_one() {
        // Breadth-first over the transition graph: no state is a trap.
        for start in S::ALL {
            let mut seen = vec![start];
            let mut frontier = vec![start];
            while let Some(s) = frontier.pop() {
                for t in all_transitions() {
                    if let Ok(n) = s.apply(t)
                        && !seen.contains(&n)
                    {
                        seen.push(n);
                        frontier.push(n);
                    }
                }
            }
            assert!(seen.iter().any(|s| s.is_terminal()), "{start} is a trap");
        }
    }

    #[test]
    fn an_interrupted_attempt_recovers_from_any_active_state_but_queued_and_paused() {
        for s in S::ALL.into_iter().filter(|s| !s.is_terminal()) {
            let r = s.apply(Transition::Interrupted);
            match s {
                S::Queued | S::Paused => assert!(r.is_err(), "{s}"),
                _ => assert_eq!(r, Ok(S::Recovering), "{s}"),
            }
        }
        assert_eq!(S::Recovering.apply(Transition::Recovered), Ok(S::Running));
    }

    #[test]
    fn the_happy_path_of_the_spine() {
        let mut s = S::Queued;
        for t in [
            Transition::Start,
            Transition::SandboxReady,
            Transition::Prepared,
            Transition::AgentFinished { verify: false },
            Transition::Published,
        ] {
            s = s.apply(t).unwrap();
        }
        assert_eq!(s, S::Succeeded);
    }

    #[test]
    fn out_of_order_steps_are_refused() {
        assert!(S::Queued.apply(Transition::Prepared).is_err());
        assert!(S::Running.apply(Transition::Published).is_err());
        assert!(S::Queued.apply(Transition::Timeout).is_err());
    }

    #[test]
    fn names_round_trip() {
        for s in S::ALL {
            assert_eq!(S::parse(s.as_str()), Some(s));
        }
        for r in FailureReason::ALL {
            assert_eq!(FailureReason::parse(r.as_str()), Some(r));
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use crate::{Deadlines, Limits};
    use proptest::prelude::*;

    fn transition() -> impl Strategy<Value = Transition> {
        let reasons = proptest::sample::select(FailureReason::ALL.to_vec());
        prop_oneof![
            Just(Transition::Start),
            Just(Transition::SandboxReady),
            Just(Transition::Prepared),
            any::<bool>().prop_map(|verify| Transition::AgentFinished { verify }),
            Just(Transition::ApprovalNeeded),
            Just(Transition::ApprovalAnswered),
            Just(Transition::VerificationPassed),
            Just(Transition::VerificationFailed),
            Just(Transition::Published),
            Just(Transition::SandboxLost),
            Just(Transition::Interrupted),
            Just(Transition::Recovered),
            Just(Transition::Pause),
            Just(Transition::Resume),
            reasons.prop_map(Transition::Fail),
            Just(Transition::Cancel),
            Just(Transition::Timeout),
        ]
    }

    proptest! {
        /// Any sequence of events, legal or not: once terminal, always the
        /// same terminal state; refused transitions change nothing.
        #[test]
        fn random_walks_never_leave_a_terminal_state(ts in proptest::collection::vec(transition(), 0..64)) {
            let mut state = AttemptState::Queued;
            let mut ended: Option<AttemptState> = None;
            for t in ts {
                match state.apply(t) {
                    Ok(next) => {
                        prop_assert!(ended.is_none(), "{state} left by {t:?}");
                        state = next;
                        if state.is_terminal() {
                            ended = Some(state);
                        }
                    }
                    Err(e) => prop_assert_eq!(e.from, state),
                }
            }
        }

        /// Wherever a walk stops, an overstay of that state's deadline
        /// ends the attempt: every deadline ends somewhere.
        #[test]
        fn every_deadline_ends_the_walk_where_it_stands(ts in proptest::collection::vec(transition(), 0..64)) {
            let mut state = AttemptState::Queued;
            for t in ts {
                if let Ok(next) = state.apply(t) {
                    state = next;
                }
            }
            if state.deadline(&Deadlines::default(), &Limits::default()).is_some() {
                prop_assert_eq!(state.apply(Transition::Timeout), Ok(AttemptState::TimedOut));
            } else {
                prop_assert!(state.is_terminal() || state == AttemptState::Queued);
            }
        }
    }
}
