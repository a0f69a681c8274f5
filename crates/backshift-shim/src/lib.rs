//! The shim: a small process inside every sandbox (the `backshift` binary
//! itself, mounted read-only, run as `backshift shim`) that runs commands
//! on behalf of the control plane and journals their output with sequence
//! numbers, so that the control plane can die, come back, and catch up
//! from the last sequence it stored without losing or doubling anything.
//!
//! [`server`] runs in the sandbox; [`client`] is the control plane's side;
//! [`proto`] is what they say to each other.

pub mod client;
pub mod proto;
pub mod server;

pub use client::{ShimClient, ShimError};
pub use proto::{Entry, Exit, SpawnRequest, Stream};
