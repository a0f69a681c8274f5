//! Identifiers. Task ids are short, lowercase and URL-safe so that they fit
//! in branch names (`backshift/<task-id>-<slug>`) and are easy to type.

use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fmt;

const ALPHABET: &[u8] = b"0123456789abcdefghjkmnpqrstvwxyz";
const TASK_ID_LEN: usize = 8;

/// A task's identifier: 8 characters of Crockford-style base32.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(String);

impl TaskId {
    /// A fresh random id.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let id = (0..TASK_ID_LEN)
            .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
            .collect();
        TaskId(id)
    }

    /// Parses an id typed by a user; `None` when it cannot be a task id.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = s.len() == TASK_ID_LEN && s.bytes().all(|b| ALPHABET.contains(&b));
        ok.then(|| TaskId(s.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An attempt's identifier: its task's id and its number, `k3f9x2m1-1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AttemptId(String);

impl AttemptId {
    /// The id of attempt number `n` (from 1) of `task`.
    pub fn new(task: &TaskId, n: u32) -> Self {
        AttemptId(format!("{task}-{n}"))
    }

    /// Parses `TASKID-N`; `None` when the text is not an attempt id.
    pub fn parse(s: &str) -> Option<Self> {
        let (task, n) = s.rsplit_once('-')?;
        TaskId::parse(task)?;
        let n: u32 = n.parse().ok()?;
        (n >= 1).then(|| AttemptId(s.to_owned()))
    }

    /// The task this attempt belongs to.
    pub fn task_id(&self) -> TaskId {
        let task = self.0.rsplit_once('-').map(|(t, _)| t).unwrap_or(&self.0);
        TaskId(task.to_owned())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AttemptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_task_ids_parse_back() {
        for _ in 0..1000 {
            let id = TaskId::generate();
            assert_eq!(TaskId::parse(id.as_str()), Some(id));
        }
    }

    #[test]
    fn attempt_ids_round_trip_and_name_their_task() {
        let task = TaskId::parse("k3f9x2m1").unwrap();
        let attempt = AttemptId::new(&task, 2);
        assert_eq!(attempt.as_str(), "k3f9x2m1-2");
        assert_eq!(AttemptId::parse("k3f9x2m1-2"), Some(attempt.clone()));
        assert_eq!(attempt.task_id(), task);
    }

    #[test]
    fn malformed_ids_are_rejected() {
        for bad in [
            "",
            "short",
            "K3F9X2M1",
            "k3f9x2m1x",
            "../../etc",
            "k3f9x2mi",
        ] {
            assert_eq!(TaskId::parse(bad), None, "{bad}");
        }
        for bad in ["k3f9x2m1", "k3f9x2m1-0", "k3f9x2m1-x", "-1", "k3f9x2m1--1"] {
            assert_eq!(AttemptId::parse(bad), None, "{bad}");
        }
    }
}
