//! backshift's domain: identifiers, the attempt state machine, failure
//! reasons, limits and branch naming.
//!
//! Architecture invariant: this crate does no I/O and knows nothing about
//! HTTP, databases, Docker or models. Everything here is a pure function of
//! its inputs, so it can be tested exhaustively.

pub mod deadlines;
pub mod ids;
pub mod limits;
pub mod policy;
pub mod rank;
pub mod slug;
pub mod state;

pub use deadlines::Deadlines;
pub use ids::{AttemptId, TaskId};
pub use limits::Limits;
pub use state::{AttemptState, FailureReason, Transition, TransitionError};
