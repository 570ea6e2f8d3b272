//! Health checks: whether each upstream should receive new connections.
//!
//! - [`HealthState`]: the pure state machine that turns probe outcomes into
//!   availability changes (`success_count`/`failure_count` runs).
//! - [`spawn_checker`]: one task per checked upstream that probes it and
//!   sends a [`HealthReport`] on each change, on the [`CheckerRuntime`]'s
//!   thread.
//! - `probe`: one probe per protocol (tcp, udp, http, https, sctp), with its
//!   round trip, on sockets marked with [`PROBE_MARK`]; `tls`: the https
//!   probes' client configurations.
mod checker;
mod probe;
mod state;
#[cfg(test)]
mod test_support;
pub(crate) mod tls;

use std::io;

pub use checker::{CheckerRuntime, HealthReport, ProbeStats, spawn_checker};
pub use probe::{ProbePorts, confine_probe_ports};
pub use state::{
    FailureReason, HealthState, HttpFailure, ProbeOutcome, Shortage, TlsFailure, Transition,
};

pub use lobby_common::PROBE_MARK;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot {op} RLIMIT_NOFILE")]
    FdLimit {
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Raises the soft limit on open files to the hard limit and returns it.
/// Each probe in flight holds a socket: with thousands of upstreams whose
/// probes hang until their timeout, the usual soft limit of 1024 would turn
/// into failed probes (`EMFILE`) and upstreams wrongly marked down.
pub fn raise_fd_limit() -> Result<u64, HealthError> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(HealthError::FdLimit {
            op: "read",
            source: io::Error::last_os_error(),
        });
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(HealthError::FdLimit {
                op: "raise",
                source: io::Error::last_os_error(),
            });
        }
    }
    Ok(limit.rlim_cur)
}
