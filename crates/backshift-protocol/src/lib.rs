//! The messages that cross boundaries: the event log's records and the REST
//! API's bodies. The server, the CLI and (later) the UI consume these and
//! never each other's internals.
//!
//! Architecture invariant: plain serde data, no behaviour beyond rendering
//! helpers, no I/O.

pub mod api;
pub mod event;

pub use api::*;
pub use event::*;

/// Formats unix milliseconds as RFC 3339 UTC with millisecond precision.
pub fn format_ts(unix_ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(unix_ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Now, as unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
