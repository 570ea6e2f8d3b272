//! The health state of one upstream as a pure state machine: probe outcomes
//! in, availability changes out. No I/O, no clock.
use std::{fmt, io, sync::Arc, time::Duration};

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    Success,
    Failure(FailureReason),
    /// The probe could not be made for want of a resource of the Lobby
    /// host itself: it says nothing of the upstream, whose state stays.
    Skipped(Shortage),
}

impl ProbeOutcome {
    pub fn is_success(&self) -> bool {
        *self == ProbeOutcome::Success
    }

    /// The outcome of a probe that failed for `reason`: skipped when the
    /// reason is a shortage of Lobby's own, a failure otherwise.
    pub fn of_failure(reason: FailureReason) -> Self {
        match reason {
            FailureReason::Io {
                errno: Some(errno), ..
            } => Shortage::of_errno(errno)
                .map_or(ProbeOutcome::Failure(reason), ProbeOutcome::Skipped),
            reason => ProbeOutcome::Failure(reason),
        }
    }
}

impl fmt::Display for ProbeOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeOutcome::Success => f.write_str("connected"),
            ProbeOutcome::Failure(reason) => reason.fmt(f),
            ProbeOutcome::Skipped(shortage) => write!(f, "skipped: {shortage}"),
        }
    }
}

/// A resource of the Lobby host that ran out while a probe was being made
/// (its socket opened, its datagram queued): Lobby's problem, not the
/// upstream's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortage {
    /// EMFILE (the daemon's limit) or ENFILE (the system's).
    FileDescriptors { errno: i32 },
    /// ENOBUFS or ENOMEM: kernel memory for sockets.
    Memory { errno: i32 },
}

impl Shortage {
    pub fn of_errno(errno: i32) -> Option<Self> {
        match errno {
            libc::EMFILE | libc::ENFILE => Some(Shortage::FileDescriptors { errno }),
            libc::ENOBUFS | libc::ENOMEM => Some(Shortage::Memory { errno }),
            _ => None,
        }
    }
}

/// `lobby is out of file descriptors (Too many open files (os error 24))`.
impl fmt::Display for Shortage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, errno) = match self {
            Shortage::FileDescriptors { errno } => ("file descriptors", errno),
            Shortage::Memory { errno } => ("memory for sockets", errno),
        };
        write!(
            f,
            "lobby is out of {what} ({})",
            io::Error::from_raw_os_error(*errno)
        )
    }
}

/// Why a probe failed. Cheap to clone and allocated by no probe: the texts
/// it quotes are shared with the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureReason {
    /// The upstream answered the SYN with a reset: nothing listens there.
    Refused,
    /// No answer within the configured timeout.
    Timeout {
        after: Duration,
    },
    /// No route to the network or host.
    Unreachable,
    /// Any other error of the connect. Local shortages (out of file
    /// descriptors) are too, until [`ProbeOutcome::of_failure`] tells them
    /// apart.
    Io {
        kind: io::ErrorKind,
        errno: Option<i32>,
    },
    /// The upstream's host name has not resolved yet: nothing to probe.
    NoAddress,
    /// A UDP probe was answered by an ICMP port unreachable: nothing
    /// listens on the port.
    PortUnreachable,
    /// A UDP probe had no datagram back within the timeout.
    NoReply {
        after: Duration,
    },
    /// Datagrams came back, but none contained `expect`.
    ReplyLacks {
        expect: Arc<str>,
    },
    /// An HTTP answer with a status outside `expect_status`.
    Status(u16),
    /// An HTTP answer whose body does not contain `expect`.
    BodyLacks {
        expect: Arc<str>,
    },
    /// Not an HTTP/1.1 answer, or cut short.
    Http(HttpFailure),
    Tls(TlsFailure),
    /// This host cannot make sockets of the probe's protocol (SCTP on a
    /// kernel without it).
    Unsupported {
        protocol: &'static str,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpFailure {
    /// Not parseable as an HTTP/1.x response.
    Malformed,
    /// The connection closed before the whole response arrived.
    Incomplete,
    /// Any other failure of the exchange.
    Other,
}

/// Why a TLS handshake failed, as far as an operator can act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFailure {
    /// Not signed, directly or through a chain, by a trusted root.
    NotTrusted,
    /// Valid, but not for the probe's host.
    WrongName,
    Expired,
    NotYetValid,
    Revoked,
    /// The server sent an alert, or the handshake failed otherwise.
    Handshake,
}

impl From<&io::Error> for FailureReason {
    fn from(error: &io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::ConnectionRefused => FailureReason::Refused,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                FailureReason::Unreachable
            }
            kind => FailureReason::Io {
                kind,
                errno: error.raw_os_error(),
            },
        }
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureReason::Refused => f.write_str("connect refused"),
            FailureReason::Timeout { after } => write!(f, "timeout after {}", Seconds(*after)),
            FailureReason::Unreachable => f.write_str("unreachable"),
            // The OS text ("Connection reset by peer (os error 104)") says
            // more to an operator than the portable kind.
            FailureReason::Io {
                errno: Some(errno), ..
            } => io::Error::from_raw_os_error(*errno).fmt(f),
            FailureReason::Io { kind, errno: None } => kind.fmt(f),
            FailureReason::NoAddress => f.write_str("no address"),
            FailureReason::PortUnreachable => f.write_str("ICMP port unreachable"),
            FailureReason::NoReply { after } => write!(f, "no reply in {}", Seconds(*after)),
            FailureReason::ReplyLacks { expect } => write!(f, "reply lacks {expect:?}"),
            FailureReason::Status(status) => write!(f, "HTTP {status}"),
            FailureReason::BodyLacks { expect } => write!(f, "body lacks {expect:?}"),
            FailureReason::Http(failure) => write!(f, "HTTP: {failure}"),
            FailureReason::Tls(failure) => write!(f, "TLS: {failure}"),
            FailureReason::Unsupported { protocol } => {
                write!(
                    f,
                    "no {protocol} sockets on this host (kernel module not loaded?)"
                )
            }
        }
    }
}

impl fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HttpFailure::Malformed => "malformed response",
            HttpFailure::Incomplete => "connection closed mid-response",
            HttpFailure::Other => "exchange failed",
        })
    }
}

impl fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsFailure::NotTrusted => "certificate not trusted",
            TlsFailure::WrongName => "certificate not valid for the host",
            TlsFailure::Expired => "certificate expired",
            TlsFailure::NotYetValid => "certificate not valid yet",
            TlsFailure::Revoked => "certificate revoked",
            TlsFailure::Handshake => "handshake failed",
        })
    }
}

/// `1 s` for whole seconds, `250 ms` otherwise.
struct Seconds(Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.subsec_nanos() == 0 {
            write!(f, "{} s", self.0.as_secs())
        } else {
            write!(f, "{} ms", self.0.as_millis())
        }
    }
}

/// A change of availability, with what led to it: the last probe's outcome
/// and the run of like outcomes that reached the threshold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub available: bool,
    pub last_probe: ProbeOutcome,
    /// Consecutive outcomes like the last one, `threshold` or more.
    pub run: u32,
    pub threshold: u32,
}

/// Availability of one upstream and the run of like probe outcomes that may
/// change it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthState {
    available: bool,
    success_threshold: u32,
    failure_threshold: u32,
    /// Consecutive outcomes like the last one (`run_of_successes`); 0 before
    /// the first probe.
    run: u32,
    run_of_successes: bool,
}

impl HealthState {
    /// A threshold of 0 acts as 1: a single outcome is the least that can
    /// change anything, and logs then read `1/1`.
    pub fn new(start_available: bool, success_count: u32, failure_count: u32) -> Self {
        Self {
            available: start_available,
            success_threshold: success_count.max(1),
            failure_threshold: failure_count.max(1),
            run: 0,
            run_of_successes: start_available,
        }
    }

    pub fn available(&self) -> bool {
        self.available
    }

    /// Counts `outcome` into the current run; returns the transition when
    /// the run reaches the threshold that flips the availability. A skipped
    /// probe counts for nothing: the run goes on as if it had not been due.
    pub fn observe(&mut self, outcome: ProbeOutcome) -> Option<Transition> {
        if let ProbeOutcome::Skipped(_) = outcome {
            return None;
        }
        let success = outcome.is_success();
        self.run = if success == self.run_of_successes {
            self.run.saturating_add(1)
        } else {
            1
        };
        self.run_of_successes = success;
        let threshold = if success {
            self.success_threshold
        } else {
            self.failure_threshold
        };
        if success == self.available || self.run < threshold {
            return None;
        }
        self.available = success;
        Some(Transition {
            available: success,
            last_probe: outcome,
            run: self.run,
            threshold,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUSED: ProbeOutcome = ProbeOutcome::Failure(FailureReason::Refused);
    const SUCCESS: ProbeOutcome = ProbeOutcome::Success;

    /// Feeds `outcomes` in order; returns, per outcome, the transition it
    /// caused as `(available, run, threshold)`.
    fn replay(state: &mut HealthState, outcomes: &[ProbeOutcome]) -> Vec<Option<(bool, u32, u32)>> {
        outcomes
            .iter()
            .map(|outcome| {
                state
                    .observe(outcome.clone())
                    .map(|t| (t.available, t.run, t.threshold))
            })
            .collect()
    }

    #[test]
    fn available_upstream_goes_down_after_failure_count_failures() {
        let mut state = HealthState::new(true, 3, 2);
        assert_eq!(
            replay(&mut state, &[REFUSED, REFUSED]),
            [None, Some((false, 2, 2))]
        );
        assert!(!state.available());
    }

    #[test]
    fn unavailable_upstream_comes_up_after_success_count_successes() {
        let mut state = HealthState::new(false, 3, 2);
        assert_eq!(
            replay(&mut state, &[SUCCESS, SUCCESS, SUCCESS]),
            [None, None, Some((true, 3, 3))]
        );
        assert!(state.available());
    }

    #[test]
    fn a_success_resets_the_run_of_failures() {
        let mut state = HealthState::new(true, 1, 3);
        let outcomes = [REFUSED, REFUSED, SUCCESS, REFUSED, REFUSED, REFUSED];
        assert_eq!(
            replay(&mut state, &outcomes),
            [None, None, None, None, None, Some((false, 3, 3))]
        );
    }

    #[test]
    fn a_failure_resets_the_run_of_successes() {
        let mut state = HealthState::new(false, 2, 1);
        let outcomes = [SUCCESS, REFUSED, SUCCESS, SUCCESS];
        assert_eq!(
            replay(&mut state, &outcomes),
            [None, None, None, Some((true, 2, 2))]
        );
    }

    #[test]
    fn outcomes_that_confirm_the_state_cause_no_transition() {
        let mut up = HealthState::new(true, 1, 1);
        assert_eq!(replay(&mut up, &[SUCCESS; 5]), [None; 5]);
        let mut down = HealthState::new(false, 1, 1);
        assert_eq!(replay(&mut down, &[REFUSED; 5]), [None; 5]);
    }

    #[test]
    fn each_change_is_reported_once() {
        let mut state = HealthState::new(true, 2, 2);
        let outcomes = [
            REFUSED, REFUSED, REFUSED, REFUSED, SUCCESS, SUCCESS, SUCCESS,
        ];
        assert_eq!(
            replay(&mut state, &outcomes),
            [
                None,
                Some((false, 2, 2)),
                None,
                None,
                None,
                Some((true, 2, 2)),
                None
            ]
        );
    }

    #[test]
    fn thresholds_of_one_flip_on_every_change_of_outcome() {
        let mut state = HealthState::new(false, 1, 1);
        assert_eq!(
            replay(&mut state, &[SUCCESS, REFUSED, SUCCESS]),
            [Some((true, 1, 1)), Some((false, 1, 1)), Some((true, 1, 1))]
        );
    }

    #[test]
    fn a_threshold_of_zero_acts_as_one() {
        let mut state = HealthState::new(true, 0, 0);
        assert_eq!(
            replay(&mut state, &[REFUSED, SUCCESS]),
            [Some((false, 1, 1)), Some((true, 1, 1))]
        );
    }

    #[test]
    fn the_first_outcome_starts_a_run_whatever_the_start_state() {
        // Starting available does not count as a success already seen.
        let mut state = HealthState::new(true, 2, 2);
        assert_eq!(
            replay(&mut state, &[SUCCESS, REFUSED, REFUSED]),
            [None, None, Some((false, 2, 2))]
        );
    }

    #[test]
    fn the_transition_carries_the_last_probe() {
        let timeout = ProbeOutcome::Failure(FailureReason::Timeout {
            after: Duration::from_secs(1),
        });
        let mut state = HealthState::new(true, 1, 2);
        assert_eq!(state.observe(REFUSED), None);
        let transition = state
            .observe(timeout.clone())
            .expect("second failure flips");
        assert_eq!(transition.last_probe, timeout);
    }

    #[test]
    fn skipped_probes_change_neither_the_state_nor_the_run() {
        let skipped = ProbeOutcome::Skipped(Shortage::FileDescriptors {
            errno: libc::EMFILE,
        });
        let mut state = HealthState::new(true, 2, 2);
        // However many, skipped probes never take an upstream down...
        assert_eq!(replay(&mut state, &vec![skipped.clone(); 100]), [None; 100]);
        assert!(state.available());
        // ...nor break or extend a run of failures.
        let outcomes = [REFUSED, skipped.clone(), skipped.clone(), REFUSED];
        assert_eq!(
            replay(&mut state, &outcomes),
            [None, None, None, Some((false, 2, 2))]
        );
        // Nor bring it up, nor count as the success that resets failures.
        let outcomes = [SUCCESS, skipped.clone(), SUCCESS];
        assert_eq!(
            replay(&mut state, &outcomes),
            [None, None, Some((true, 2, 2))]
        );
    }

    #[test]
    fn local_shortages_are_skipped_probes_and_other_errors_failures() {
        let outcome = |errno| {
            ProbeOutcome::of_failure(FailureReason::from(&io::Error::from_raw_os_error(errno)))
        };
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(
                matches!(outcome(errno), ProbeOutcome::Skipped(_)),
                "errno {errno}"
            );
        }
        for errno in [libc::ECONNREFUSED, libc::ECONNRESET, libc::EHOSTUNREACH] {
            assert!(
                matches!(outcome(errno), ProbeOutcome::Failure(_)),
                "errno {errno}"
            );
        }
        assert_eq!(
            ProbeOutcome::of_failure(FailureReason::NoAddress),
            ProbeOutcome::Failure(FailureReason::NoAddress)
        );
        assert_eq!(
            outcome(libc::EMFILE).to_string(),
            "skipped: lobby is out of file descriptors (Too many open files (os error 24))"
        );
        assert_eq!(
            outcome(libc::ENOBUFS).to_string(),
            "skipped: lobby is out of memory for sockets (No buffer space available (os error 105))"
        );
    }

    #[test]
    fn reasons_read_as_operators_expect() {
        let cases = [
            (FailureReason::Refused, "connect refused"),
            (
                FailureReason::Timeout {
                    after: Duration::from_secs(1),
                },
                "timeout after 1 s",
            ),
            (
                FailureReason::Timeout {
                    after: Duration::from_millis(250),
                },
                "timeout after 250 ms",
            ),
            (FailureReason::Unreachable, "unreachable"),
            (FailureReason::NoAddress, "no address"),
            (FailureReason::PortUnreachable, "ICMP port unreachable"),
            (
                FailureReason::NoReply {
                    after: Duration::from_secs(1),
                },
                "no reply in 1 s",
            ),
            (
                FailureReason::ReplyLacks {
                    expect: Arc::from("pong"),
                },
                r#"reply lacks "pong""#,
            ),
            (FailureReason::Status(503), "HTTP 503"),
            (
                FailureReason::BodyLacks {
                    expect: Arc::from("ok"),
                },
                r#"body lacks "ok""#,
            ),
            (
                FailureReason::Http(HttpFailure::Malformed),
                "HTTP: malformed response",
            ),
            (
                FailureReason::Tls(TlsFailure::NotTrusted),
                "TLS: certificate not trusted",
            ),
            (
                FailureReason::Unsupported { protocol: "SCTP" },
                "no SCTP sockets on this host (kernel module not loaded?)",
            ),
            (
                FailureReason::Io {
                    kind: io::ErrorKind::ConnectionReset,
                    errno: Some(libc::ECONNRESET),
                },
                "Connection reset by peer (os error 104)",
            ),
            (
                FailureReason::Io {
                    kind: io::ErrorKind::ConnectionReset,
                    errno: None,
                },
                "connection reset",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text, "{reason:?}");
        }
        assert_eq!(ProbeOutcome::Success.to_string(), "connected");
    }

    #[test]
    fn io_errors_are_classified_by_kind() {
        let classify = |errno| FailureReason::from(&io::Error::from_raw_os_error(errno));
        assert_eq!(classify(libc::ECONNREFUSED), FailureReason::Refused);
        assert_eq!(classify(libc::EHOSTUNREACH), FailureReason::Unreachable);
        assert_eq!(classify(libc::ENETUNREACH), FailureReason::Unreachable);
        assert_eq!(
            classify(libc::ECONNRESET),
            FailureReason::Io {
                kind: io::ErrorKind::ConnectionReset,
                errno: Some(libc::ECONNRESET)
            }
        );
    }
}
