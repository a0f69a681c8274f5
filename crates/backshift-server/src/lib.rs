//! The control plane: configuration, the REST API with its event streams,
//! and the supervisor that drives each attempt through its lifecycle.
//!
//! Data flows one way (DESIGN §4): API → store (intent) → supervisor
//! (drives the state machine) → sandbox driver / agent / git (effects) →
//! events → store → API streams. Handlers never act on sandboxes
//! themselves; they record intent and wake the supervisor.

pub mod agents;
pub mod api;
pub mod approvals;
pub mod attempt;
pub mod audit;
pub mod auth;
pub mod certs;
pub mod checkout_image;
pub mod checkpoint;
pub mod config;
pub mod deliver;
pub mod devcontainer;
pub mod egress;
pub mod environment;
pub mod events;
pub mod gateway;
pub mod notes;
pub mod origin;
pub mod pool;
pub mod report;
pub mod results;
pub mod sandbox_git;
pub mod secrets;
pub mod serve;
pub mod supervisor;
pub mod ui;

pub use config::Config;
pub use serve::{Server, start};
