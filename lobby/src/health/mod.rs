//! Health checks: whether each upstream should receive new connections.
//!
//! - [`HealthState`]: the pure state machine that turns probe outcomes into
//!   availability changes (`success_count`/`failure_count` runs).
mod state;

pub use state::{FailureReason, HealthState, ProbeOutcome, Transition};
