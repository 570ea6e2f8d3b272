//! The prober: one task per checked upstream that probes it on schedule,
//! feeds each outcome to the upstream's [`HealthState`] and reports the
//! transitions.
use std::{
    fmt,
    hash::{BuildHasher, RandomState},
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpSocket, TcpStream},
    sync::{mpsc, watch},
    time::{self, Instant},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, trace};

use super::state::{FailureReason, HealthState, ProbeOutcome, Transition};
use crate::{
    config::{HealthCheck, Protocol},
    model::UpstreamId,
};

/// The first probe of each upstream waits a random share of this, so that
/// upstreams configured together are not probed in lockstep.
const FIRST_PROBE_MAX_DELAY: Duration = Duration::from_millis(500);

/// A change of an upstream's availability, for the daemon to apply and log.
/// Its `Display` is the log line without the daemon's count of available
/// upstreams: `upstream web/web1 is DOWN (connect refused, 2/2 failures)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    pub id: UpstreamId,
    pub available: bool,
    /// The last probe's outcome: `connect refused`, `timeout after 1 s`,
    /// `connected`.
    pub reason: String,
    /// Consecutive like outcomes that made the change.
    pub run: u32,
    pub threshold: u32,
}

impl HealthReport {
    fn new(id: UpstreamId, transition: &Transition) -> Self {
        Self {
            id,
            available: transition.available,
            reason: transition.last_probe.to_string(),
            run: transition.run,
            threshold: transition.threshold,
        }
    }
}

impl fmt::Display for HealthReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (state, outcomes) = match (self.available, self.threshold) {
            (true, 1) => ("UP", "success"),
            (true, _) => ("UP", "successes"),
            (false, 1) => ("DOWN", "failure"),
            (false, _) => ("DOWN", "failures"),
        };
        write!(
            f,
            "upstream {} is {state} ({}, {}/{} {outcomes})",
            self.id, self.reason, self.run, self.threshold
        )
    }
}

/// Probe outcomes of one upstream, counted as they happen, for metrics.
#[derive(Debug, Default)]
pub struct ProbeStats {
    pub successes: AtomicU64,
    pub failures: AtomicU64,
}

impl ProbeStats {
    fn record(&self, outcome: ProbeOutcome) {
        let counter = if outcome.is_success() {
            &self.successes
        } else {
            &self.failures
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Starts health-checking one upstream on `tracker`: probes per `check`
/// against the latest address in `address` (`None`, not resolved yet, is a
/// failed probe), counts every outcome in `stats`, and sends a
/// [`HealthReport`] on `reports` only when the availability changes, from
/// `initial_available` on.
///
/// The task ends when `cancel` is cancelled, even mid-probe, or when
/// `reports` has no receiver left.
#[expect(
    clippy::too_many_arguments,
    reason = "each argument is a separate piece of the daemon's wiring"
)]
pub fn spawn_checker(
    id: UpstreamId,
    check: HealthCheck,
    initial_available: bool,
    address: watch::Receiver<Option<Ipv4Addr>>,
    reports: mpsc::Sender<HealthReport>,
    stats: Arc<ProbeStats>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        let state = HealthState::new(initial_available, check.success_count, check.failure_count);
        let probing = probe_until_closed(&id, &check, state, &address, &reports, &stats);
        let stopped_by = match cancel.run_until_cancelled(probing).await {
            Some(()) => "report channel closed",
            None => "cancelled",
        };
        debug!(upstream = %id, stopped_by, "health checker stopped");
    });
}

/// Probes until nobody receives reports any more. Probes of one upstream
/// never overlap: the next one starts `check.interval` after the previous
/// one started or, when that one took longer (a timeout above the
/// interval), as soon as it ended; missed probes are not caught up.
async fn probe_until_closed(
    id: &UpstreamId,
    check: &HealthCheck,
    mut state: HealthState,
    address: &watch::Receiver<Option<Ipv4Addr>>,
    reports: &mpsc::Sender<HealthReport>,
    stats: &ProbeStats,
) {
    let mut next_probe = Instant::now() + first_probe_delay();
    loop {
        time::sleep_until(next_probe).await;
        // Copied out so that the watch lock is not held during the probe.
        let latest_address = *address.borrow();
        let outcome = probe(check, latest_address).await;
        next_probe = (next_probe + check.interval).max(Instant::now());
        stats.record(outcome);
        trace!(upstream = %id, %outcome, "health probe");
        let Some(transition) = state.observe(outcome) else {
            continue;
        };
        if reports
            .send(HealthReport::new(id.clone(), &transition))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// A uniform draw in `0..=FIRST_PROBE_MAX_DELAY`. Each `RandomState` has
/// fresh random keys, which is randomness enough to spread probes without a
/// random-number crate.
fn first_probe_delay() -> Duration {
    let draw = RandomState::new().hash_one(());
    FIRST_PROBE_MAX_DELAY.mul_f64(draw as f64 / u64::MAX as f64)
}

async fn probe(check: &HealthCheck, address: Option<Ipv4Addr>) -> ProbeOutcome {
    let Some(address) = address else {
        return ProbeOutcome::Failure(FailureReason::NoAddress);
    };
    let target = SocketAddrV4::new(address, check.port);
    match check.protocol {
        Protocol::Tcp => probe_tcp(target, check.timeout).await,
    }
}

/// Succeeds when the handshake completes within `timeout`. A refusal fails
/// as soon as the reset arrives; a connect still pending at the timeout is
/// dropped, which closes its socket.
async fn probe_tcp(target: SocketAddrV4, timeout: Duration) -> ProbeOutcome {
    match time::timeout(timeout, connect_resetting_on_close(target)).await {
        Ok(Ok(connection)) => {
            drop(connection);
            ProbeOutcome::Success
        }
        Ok(Err(error)) => ProbeOutcome::Failure(FailureReason::from(&error)),
        Err(_elapsed) => ProbeOutcome::Failure(FailureReason::Timeout { after: timeout }),
    }
}

/// Connects with `SO_LINGER` 0, so that dropping the connection resets it.
/// The prober closes first, and an orderly close would leave it a TIME_WAIT
/// socket for a minute per probe: 600,000 at 10,000 probes a second, beyond
/// the kernel's usual `tcp_max_tw_buckets`.
async fn connect_resetting_on_close(target: SocketAddrV4) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.set_zero_linger()?;
    socket.connect(SocketAddr::V4(target)).await
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use tokio::{net::TcpListener, sync::mpsc::error::TryRecvError};

    use super::*;

    const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
    /// Long enough that a probe failing before it did not wait for it.
    const LONG_TIMEOUT: Duration = Duration::from_secs(10);

    fn tcp_check(port: u16) -> HealthCheck {
        HealthCheck {
            protocol: Protocol::Tcp,
            port,
            start_available: true,
            interval: Duration::from_millis(10),
            timeout: LONG_TIMEOUT,
            success_count: 1,
            failure_count: 1,
        }
    }

    async fn listen() -> (TcpListener, u16) {
        let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
        let port = listener.local_addr().expect("listener address").port();
        (listener, port)
    }

    /// A loopback port nothing listens on: connects are refused.
    async fn closed_port() -> u16 {
        listen().await.1
    }

    /// A listener whose accept queue is full, and the connections that fill
    /// it. Linux drops SYNs to such a listener, so connects to it hang
    /// without any traffic leaving loopback.
    async fn black_hole() -> (TcpListener, Vec<TcpStream>, u16) {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::from((LOOPBACK, 0))).expect("bind");
        let listener = socket.listen(0).expect("listen");
        let address = listener.local_addr().expect("listener address");
        let mut queued = Vec::new();
        while let Ok(connected) =
            time::timeout(Duration::from_millis(200), TcpStream::connect(address)).await
        {
            queued.push(connected.expect("connect while the queue has room"));
            assert!(queued.len() < 16, "the accept queue never filled up");
        }
        (listener, queued, address.port())
    }

    /// This host's sockets waiting for the answer to their SYN (state 02 in
    /// /proc/net/tcp) from `port` on loopback.
    fn connecting_to(port: u16) -> usize {
        let sockets = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
        // The kernel prints the address as the native-endian u32 of its
        // network-order bytes.
        let remote = format!("{:08X}:{port:04X}", u32::from_ne_bytes(LOOPBACK.octets()));
        sockets
            .lines()
            .filter(|line| {
                let mut fields = line.split_whitespace().skip(2);
                fields.next() == Some(remote.as_str()) && fields.next() == Some("02")
            })
            .count()
    }

    async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
        time::timeout(Duration::from_secs(5), future)
            .await
            .unwrap_or_else(|_| panic!("no {what} within 5 s"))
    }

    async fn wait_until(what: &str, condition: impl Fn() -> bool) {
        within(what, async {
            while !condition() {
                time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }

    struct Running {
        reports: mpsc::Receiver<HealthReport>,
        stats: Arc<ProbeStats>,
        address: watch::Sender<Option<Ipv4Addr>>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    }

    impl Running {
        fn start(check: HealthCheck, address: Option<Ipv4Addr>) -> Self {
            let (address_tx, address_rx) = watch::channel(address);
            let (reports_tx, reports) = mpsc::channel(4);
            let stats = Arc::new(ProbeStats::default());
            let cancel = CancellationToken::new();
            let tracker = TaskTracker::new();
            let start_available = check.start_available;
            spawn_checker(
                UpstreamId::new("web", "web1"),
                check,
                start_available,
                address_rx,
                reports_tx,
                Arc::clone(&stats),
                cancel.clone(),
                &tracker,
            );
            Self {
                reports,
                stats,
                address: address_tx,
                cancel,
                tracker,
            }
        }

        async fn next_report(&mut self) -> HealthReport {
            within("report", self.reports.recv())
                .await
                .expect("the checker runs")
        }

        /// The report's log line says all its fields.
        async fn expect_report(&mut self, line: &str) {
            assert_eq!(self.next_report().await.to_string(), line);
        }

        async fn wait_for_probes(&self, successes: u64, failures: u64) {
            wait_until("probes", || {
                self.stats.successes.load(Ordering::Relaxed) >= successes
                    && self.stats.failures.load(Ordering::Relaxed) >= failures
            })
            .await;
        }

        fn assert_no_report(&mut self) {
            assert_eq!(self.reports.try_recv(), Err(TryRecvError::Empty));
        }

        async fn stop(self) {
            self.cancel.cancel();
            self.tracker.close();
            within("checker stop", self.tracker.wait()).await;
        }
    }

    #[tokio::test]
    async fn probe_succeeds_against_a_listener() {
        let (_listener, port) = listen().await;
        let outcome = probe_tcp(SocketAddrV4::new(LOOPBACK, port), LONG_TIMEOUT).await;
        assert_eq!(outcome, ProbeOutcome::Success);
    }

    #[tokio::test]
    async fn refused_connect_fails_without_waiting_for_the_timeout() {
        let target = SocketAddrV4::new(LOOPBACK, closed_port().await);
        let started = Instant::now();
        let outcome = probe_tcp(target, LONG_TIMEOUT).await;
        let latency = started.elapsed();
        assert_eq!(outcome, ProbeOutcome::Failure(FailureReason::Refused));
        assert!(
            latency < Duration::from_secs(1),
            "refused after {latency:?}"
        );
    }

    #[tokio::test]
    async fn hanging_connect_fails_at_the_timeout_and_closes_its_socket() {
        let (_listener, _queued, port) = black_hole().await;
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let probing = tokio::spawn(probe_tcp(SocketAddrV4::new(LOOPBACK, port), timeout));
        time::sleep(timeout / 3).await;
        assert_eq!(connecting_to(port), 1, "the probe's SYN goes unanswered");
        let outcome = probing.await.expect("probe task");
        let waited = started.elapsed();
        assert_eq!(connecting_to(port), 0, "the abandoned connect is closed");
        assert_eq!(
            outcome,
            ProbeOutcome::Failure(FailureReason::Timeout { after: timeout })
        );
        assert!(waited >= timeout && waited < LONG_TIMEOUT, "{waited:?}");
        assert_eq!(outcome.to_string(), "timeout after 300 ms");
    }

    #[tokio::test]
    async fn each_transition_is_reported_once_with_its_run() {
        let (listener, port) = listen().await;
        let check = HealthCheck {
            success_count: 3,
            failure_count: 2,
            ..tcp_check(port)
        };
        let mut running = Running::start(check, Some(LOOPBACK));

        running.wait_for_probes(3, 0).await;
        running.assert_no_report();

        drop(listener);
        running
            .expect_report("upstream web/web1 is DOWN (connect refused, 2/2 failures)")
            .await;
        let failures = running.stats.failures.load(Ordering::Relaxed);
        running.wait_for_probes(0, failures + 3).await;
        running.assert_no_report();

        let _listener = TcpListener::bind((LOOPBACK, port)).await.expect("rebind");
        running
            .expect_report("upstream web/web1 is UP (connected, 3/3 successes)")
            .await;
        running.stop().await;
    }

    #[tokio::test]
    async fn checker_probes_the_latest_address() {
        let (_listener, port) = listen().await;
        let mut running = Running::start(tcp_check(port), None);
        running
            .expect_report("upstream web/web1 is DOWN (no address, 1/1 failure)")
            .await;
        running.address.send_replace(Some(LOOPBACK));
        running
            .expect_report("upstream web/web1 is UP (connected, 1/1 success)")
            .await;
        running.stop().await;
    }

    #[tokio::test]
    async fn cancel_stops_a_checker_in_the_middle_of_a_probe() {
        let (_listener, _queued, port) = black_hole().await;
        let running = Running::start(tcp_check(port), Some(LOOPBACK));
        // Past the first probe's start, far before its timeout.
        time::sleep(FIRST_PROBE_MAX_DELAY + Duration::from_millis(200)).await;
        let stats = Arc::clone(&running.stats);
        running.stop().await;
        assert_eq!(stats.successes.load(Ordering::Relaxed), 0);
        assert_eq!(stats.failures.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn checker_stops_when_nobody_receives_reports() {
        let mut running = Running::start(tcp_check(closed_port().await), None);
        running.reports.close();
        running.tracker.close();
        within("checker stop", running.tracker.wait()).await;
    }

    /// No I/O here (no address), so the paused clock can run ahead.
    #[tokio::test(start_paused = true)]
    async fn probes_start_within_the_first_delay_then_follow_the_interval() {
        let check = HealthCheck {
            interval: Duration::from_secs(1),
            ..tcp_check(closed_port().await)
        };
        let mut running = Running::start(check, None);
        let failures = || running.stats.failures.load(Ordering::Relaxed);

        time::sleep(FIRST_PROBE_MAX_DELAY + Duration::from_millis(1)).await;
        assert_eq!(failures(), 1);
        // Probes at d, d + 1 s, ... d + 10 s for a first delay d <= 500 ms.
        time::sleep(Duration::from_millis(10_100)).await;
        assert_eq!(failures(), 11);

        assert!(!running.next_report().await.available);
        running.stop().await;
    }

    #[test]
    fn first_probe_delays_spread_over_the_whole_window() {
        let delays: Vec<Duration> = (0..1000).map(|_| first_probe_delay()).collect();
        assert!(delays.iter().all(|delay| *delay <= FIRST_PROBE_MAX_DELAY));
        let early = delays
            .iter()
            .filter(|delay| **delay < FIRST_PROBE_MAX_DELAY / 2)
            .count();
        assert!(
            (400..600).contains(&early),
            "{early} of 1000 in the first half"
        );
    }
}
