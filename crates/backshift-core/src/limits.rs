//! Per-task limits. Every limit that can stop an attempt has a matching
//! [`crate::FailureReason`] so the stop is never silent.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Limits on one attempt. Missing fields take the server's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Model turns (one request and its tool calls) before `max_turns`.
    pub max_turns: u32,
    /// Wall-clock seconds for the whole attempt before `timed_out`.
    pub wall_time_secs: u64,
    /// Seconds one tool command may run before it is killed.
    pub command_timeout_secs: u64,
    /// Model tokens (input and output, all turns, across recoveries) before
    /// `budget_exhausted`; no limit when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Times the agent works on the task when verification is on: each
    /// failed verification gives it the report and another iteration,
    /// until this many; then the attempt ends `verification_failed`.
    #[serde(default = "default_iterations")]
    pub max_iterations: u32,
}

fn default_iterations() -> u32 {
    3
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_turns: 50,
            wall_time_secs: 3600,
            command_timeout_secs: 300,
            max_tokens: None,
            max_iterations: default_iterations(),
        }
    }
}

/// Limits as a client sends them: every field optional.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// See [`Limits::max_turns`].
    pub max_turns: Option<u32>,
    /// See [`Limits::wall_time_secs`].
    pub wall_time_secs: Option<u64>,
    /// See [`Limits::command_timeout_secs`].
    pub command_timeout_secs: Option<u64>,
    /// See [`Limits::max_tokens`].
    pub max_tokens: Option<u64>,
    /// See [`Limits::max_iterations`].
    pub max_iterations: Option<u32>,
}

impl LimitsRequest {
    /// Fills missing fields from `defaults` and checks the ranges; the
    /// error names the field and the allowed range.
    pub fn resolve(&self, defaults: &Limits) -> Result<Limits, String> {
        let limits = Limits {
            max_turns: self.max_turns.unwrap_or(defaults.max_turns),
            wall_time_secs: self.wall_time_secs.unwrap_or(defaults.wall_time_secs),
            command_timeout_secs: self
                .command_timeout_secs
                .unwrap_or(defaults.command_timeout_secs),
            max_tokens: self.max_tokens.or(defaults.max_tokens),
            max_iterations: self.max_iterations.unwrap_or(defaults.max_iterations),
        };
        if !(1..=100).contains(&limits.max_iterations) {
            return Err(format!(
                "limits.max_iterations must be between 1 and 100, got {}",
                limits.max_iterations
            ));
        }
        if limits.max_tokens == Some(0) {
            return Err("limits.max_tokens must be at least 1 (leave it out for no limit)".into());
        }
        if !(1..=10_000).contains(&limits.max_turns) {
            return Err(format!(
                "limits.max_turns must be between 1 and 10000, got {}",
                limits.max_turns
            ));
        }
        if !(1..=7 * 24 * 3600).contains(&limits.wall_time_secs) {
            return Err(format!(
                "limits.wall_time_secs must be between 1 and 604800 (a week), got {}",
                limits.wall_time_secs
            ));
        }
        if !(1..=24 * 3600).contains(&limits.command_timeout_secs) {
            return Err(format!(
                "limits.command_timeout_secs must be between 1 and 86400, got {}",
                limits.command_timeout_secs
            ));
        }
        Ok(limits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_take_defaults() {
        let got = LimitsRequest {
            max_turns: Some(3),
            ..Default::default()
        }
        .resolve(&Limits::default())
        .unwrap();
        assert_eq!(got.max_turns, 3);
        assert_eq!(got.wall_time_secs, Limits::default().wall_time_secs);
    }

    #[test]
    fn out_of_range_limits_name_the_field() {
        let err = LimitsRequest {
            max_turns: Some(0),
            ..Default::default()
        }
        .resolve(&Limits::default())
        .unwrap_err();
        assert!(err.contains("max_turns"), "{err}");
        let err = LimitsRequest {
            max_iterations: Some(0),
            ..Default::default()
        }
        .resolve(&Limits::default())
        .unwrap_err();
        assert!(err.contains("max_iterations"), "{err}");
    }

    #[test]
    fn limits_stored_before_iterations_existed_still_read() {
        let old = r#"{"max_turns":5,"wall_time_secs":60,"command_timeout_secs":30}"#;
        let l: Limits = serde_json::from_str(old).unwrap();
        assert_eq!(l.max_iterations, 3);
    }
}
