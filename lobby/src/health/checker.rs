//! The prober: one task per checked upstream that probes it on schedule,
//! feeds each outcome to the upstream's [`HealthState`] and reports the
//! transitions.
use std::{
    fmt,
    hash::{BuildHasher, RandomState},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    runtime::Handle,
    sync::{mpsc, oneshot, watch},
    time::{self, Instant},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, trace, warn};

use super::{
    probe,
    state::{FailureReason, HealthState, ProbeOutcome, Transition},
};
use crate::{config::HealthCheck, model::UpstreamId};

/// The first probe of each upstream waits a random share of this, so that
/// upstreams configured together are not probed in lockstep.
const FIRST_PROBE_MAX_DELAY: Duration = Duration::from_millis(500);

/// A change of an upstream's availability, for the daemon to apply and log.
/// Its `Display` is the log line without the daemon's count of available
/// upstreams: `upstream web/web1 is DOWN (connect refused, 2/2 failures)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    pub id: UpstreamId,
    /// The address of the probe that made the change (`None`: it had
    /// none): an upstream may have several, each checked on its own.
    pub address: Option<IpAddr>,
    pub available: bool,
    /// The last probe's outcome: `connect refused`, `timeout after 1 s`,
    /// `connected`.
    pub reason: String,
    /// Consecutive like outcomes that made the change.
    pub run: u32,
    pub threshold: u32,
    /// When the checker decided: how long the change waited for its
    /// transaction is measured from here, not from when the loop saw it.
    pub decided_at: Instant,
}

impl HealthReport {
    fn new(id: UpstreamId, address: Option<IpAddr>, transition: &Transition) -> Self {
        Self {
            id,
            address,
            available: transition.available,
            reason: transition.last_probe.to_string(),
            run: transition.run,
            threshold: transition.threshold,
            decided_at: Instant::now(),
        }
    }

    /// The log line, naming the probed address after the upstream when
    /// `with_address` (an upstream with several addresses):
    /// `upstream web/web1 at 2001:2::11 is DOWN (...)`.
    pub fn describe(&self, with_address: bool) -> String {
        let at = match self.address {
            Some(address) if with_address => format!(" at {address}"),
            _ => String::new(),
        };
        let (state, outcomes) = match (self.available, self.threshold) {
            (true, 1) => ("UP", "success"),
            (true, _) => ("UP", "successes"),
            (false, 1) => ("DOWN", "failure"),
            (false, _) => ("DOWN", "failures"),
        };
        format!(
            "upstream {}{at} is {state} ({}, {}/{} {outcomes})",
            self.id, self.reason, self.run, self.threshold
        )
    }
}

impl fmt::Display for HealthReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe(false))
    }
}

/// Probe outcomes of one upstream, counted as they happen, for metrics, and
/// the round trips of its successful probes, for least-latency balancing.
#[derive(Debug, Default)]
pub struct ProbeStats {
    pub successes: AtomicU64,
    pub failures: AtomicU64,
    /// The last successful probe's round trip in microseconds; 0 before the
    /// first.
    last_rtt_micros: AtomicU64,
    /// A moving average of the round trips in microseconds, each new one
    /// weighing [`RTT_WEIGHT`]; 0 before the first.
    smoothed_rtt_micros: AtomicU64,
}

/// The weight of a new round trip in the moving average: 1/8, as TCP's
/// smoothed RTT (RFC 6298), which evens out one slow probe without hiding a
/// lasting change for long.
const RTT_WEIGHT: u64 = 8;

impl ProbeStats {
    /// Counts a success or a failure; a skipped probe is neither.
    fn record(&self, outcome: &ProbeOutcome) {
        let counter = match outcome {
            ProbeOutcome::Success => &self.successes,
            ProbeOutcome::Failure(_) => &self.failures,
            ProbeOutcome::Skipped(_) => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts in a round trip. Only the upstream's checker writes, so the
    /// load and store of the average need no compare-and-swap.
    fn record_rtt(&self, rtt: Duration) {
        // At least 1 µs, so that 0 keeps meaning "none yet".
        let micros = u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1);
        self.last_rtt_micros.store(micros, Ordering::Relaxed);
        let smoothed = match self.smoothed_rtt_micros.load(Ordering::Relaxed) {
            0 => micros,
            previous => {
                (previous.saturating_mul(RTT_WEIGHT - 1)).saturating_add(micros) / RTT_WEIGHT
            }
        };
        self.smoothed_rtt_micros
            .store(smoothed.max(1), Ordering::Relaxed);
    }

    /// The last successful probe's round trip.
    pub fn last_rtt(&self) -> Option<Duration> {
        micros(&self.last_rtt_micros)
    }

    /// The moving average of the successful probes' round trips.
    pub fn smoothed_rtt(&self) -> Option<Duration> {
        micros(&self.smoothed_rtt_micros)
    }
}

fn micros(value: &AtomicU64) -> Option<Duration> {
    match value.load(Ordering::Relaxed) {
        0 => None,
        micros => Some(Duration::from_micros(micros)),
    }
}

/// Starts health-checking one upstream on `tracker`: probes per `check`
/// against the latest address in `address` (`None`, not resolved yet, is a
/// failed probe), in that address's family, counts every outcome and round
/// trip in `stats`, and sends a [`HealthReport`] on `reports` only when the
/// availability changes, from `initial_available` on. The address is any
/// type that converts to an [`IpAddr`], so that an IPv4-only channel and a
/// dual-stack one both fit.
///
/// The first probe leaves once `counted` is done (the daemon's counters
/// watch the route to the address by then, and tell the probe's late
/// answers from the upstream's traffic), after a random part of a second.
///
/// The task runs on `runtime` (the daemon's [`CheckerRuntime`]), tracked
/// by `tracker`; it ends when `cancel` is cancelled, even mid-probe, or
/// when `reports` has no receiver left.
#[expect(
    clippy::too_many_arguments,
    reason = "each argument is a separate piece of the daemon's wiring"
)]
pub fn spawn_checker<A, C>(
    id: UpstreamId,
    check: HealthCheck,
    initial_available: bool,
    address: watch::Receiver<Option<A>>,
    counted: C,
    reports: mpsc::Sender<HealthReport>,
    stats: Arc<ProbeStats>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
    runtime: &Handle,
) where
    A: Into<IpAddr> + Copy + Send + Sync + 'static,
    C: Future<Output = ()> + Send + 'static,
{
    tracker.spawn_on(
        async move {
            let state =
                HealthState::new(initial_available, check.success_count, check.failure_count);
            let probing = async {
                counted.await;
                probe_until_closed(&id, &check, state, &address, &reports, &stats).await;
            };
            let stopped_by = match cancel.run_until_cancelled(probing).await {
                Some(()) => "report channel closed",
                None => "cancelled",
            };
            debug!(upstream = %id, stopped_by, "health checker stopped");
        },
        runtime,
    );
}

/// The runtime the checkers run on: a current-thread runtime on a thread
/// of its own. With 1,000 checkers, every probe wakes its task from the
/// I/O driver or the timer wheel; on the daemon's multi-thread runtime a
/// wake-up often lands on the other worker, a futex wake and a context
/// switch a probe (perf of the idle daemon). On one thread a probe, its
/// timers and its socket stay together, and no control-plane work (a
/// render of 10,000 upstreams) holds up a probe's timeout. One thread
/// handles 10,000 upstreams probed every second at about a quarter of a
/// core, most of it the kernel's handshakes.
pub struct CheckerRuntime {
    handle: Handle,
    /// Dropped, it ends the thread, and the runtime drops what tasks are
    /// left there, outside any async context.
    _stop: oneshot::Sender<()>,
}

impl CheckerRuntime {
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("lobby-checkers".to_owned())
            .spawn(move || runtime.block_on(async move { _ = stopped.await }))?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

/// Probes until nobody receives reports any more. Probes of one upstream
/// never overlap: the next one starts `check.interval` after the previous
/// one started or, when that one took longer (a timeout above the
/// interval), as soon as it ended; missed probes are not caught up.
async fn probe_until_closed<A: Into<IpAddr> + Copy>(
    id: &UpstreamId,
    check: &HealthCheck,
    mut state: HealthState,
    address: &watch::Receiver<Option<A>>,
    reports: &mpsc::Sender<HealthReport>,
    stats: &ProbeStats,
) {
    let mut next_probe = Instant::now() + first_probe_delay();
    let mut skips = SkipWarnings::default();
    loop {
        time::sleep_until(next_probe).await;
        // Copied out so that the watch lock is not held during the probe.
        let latest_address = address.borrow().map(Into::into);
        let outcome = probe_once(check, latest_address, stats).await;
        next_probe = (next_probe + check.interval).max(Instant::now());
        stats.record(&outcome);
        trace!(upstream = %id, %outcome, "health probe");
        if let ProbeOutcome::Skipped(shortage) = &outcome
            && let Some(skipped) = skips.skipped(Instant::now())
        {
            let state = if state.available() { "UP" } else { "DOWN" };
            warn!(
                upstream = %id,
                "{shortage}; probes of {id} skipped ({skipped} since the last warning), it stays {state}"
            );
        }
        let Some(transition) = state.observe(outcome) else {
            continue;
        };
        if reports
            .send(HealthReport::new(id.clone(), latest_address, &transition))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// How often a checker warns at most that it skips probes: a shortage may
/// last, and every probe would repeat the line.
const SKIP_WARNING_PERIOD: Duration = Duration::from_secs(60);

/// When a checker last warned of skipped probes, and how many it skipped
/// since.
#[derive(Debug, Default)]
struct SkipWarnings {
    last: Option<Instant>,
    unreported: u64,
}

impl SkipWarnings {
    /// Counts a probe skipped at `now`; the count to report when a warning
    /// is due: the first skip at once, then at most one a period.
    fn skipped(&mut self, now: Instant) -> Option<u64> {
        self.unreported += 1;
        if self
            .last
            .is_some_and(|last| now < last + SKIP_WARNING_PERIOD)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.unreported))
    }
}

/// A uniform draw in `0..=FIRST_PROBE_MAX_DELAY`. Each `RandomState` has
/// fresh random keys, which is randomness enough to spread probes without a
/// random-number crate.
fn first_probe_delay() -> Duration {
    let draw = RandomState::new().hash_one(());
    FIRST_PROBE_MAX_DELAY.mul_f64(draw as f64 / u64::MAX as f64)
}

/// One probe of `address`, its round trip recorded when it succeeded.
async fn probe_once(
    check: &HealthCheck,
    address: Option<IpAddr>,
    stats: &ProbeStats,
) -> ProbeOutcome {
    let Some(address) = address else {
        return ProbeOutcome::Failure(FailureReason::NoAddress);
    };
    let target = SocketAddr::new(address, check.port);
    match probe::probe(&check.protocol, target, check.timeout).await {
        Ok(rtt) => {
            stats.record_rtt(rtt);
            ProbeOutcome::Success
        }
        Err(reason) => ProbeOutcome::of_failure(reason),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use http::uri::PathAndQuery;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        sync::mpsc::error::TryRecvError,
    };

    use super::*;
    use crate::{
        config::{HealthProtocol, HttpProbe, StatusRange},
        health::test_support::{
            LONG_TIMEOUT, LOOPBACK, black_hole, closed_port, connecting_to, listen, wait_until,
            within,
        },
    };

    fn tcp_check(port: u16) -> HealthCheck {
        HealthCheck {
            protocol: HealthProtocol::Tcp,
            port,
            start_available: true,
            interval: Duration::from_millis(10),
            timeout: LONG_TIMEOUT,
            success_count: 1,
            failure_count: 1,
        }
    }

    struct Running {
        reports: mpsc::Receiver<HealthReport>,
        stats: Arc<ProbeStats>,
        address: watch::Sender<Option<IpAddr>>,
        cancel: CancellationToken,
        tracker: TaskTracker,
    }

    impl Running {
        fn start(check: HealthCheck, address: Option<IpAddr>) -> Self {
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
                std::future::ready(()),
                reports_tx,
                Arc::clone(&stats),
                cancel.clone(),
                &tracker,
                &Handle::current(),
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

    /// An upstream that moves to IPv6 is probed over IPv6, and its
    /// successful probes leave their round trip.
    #[tokio::test]
    async fn checker_follows_the_address_family_and_records_round_trips() {
        let listener = TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
            .await
            .expect("IPv6 loopback (::1) is needed");
        let port = listener.local_addr().expect("address").port();
        let mut running = Running::start(tcp_check(port), Some(LOOPBACK));
        running
            .expect_report("upstream web/web1 is DOWN (connect refused, 1/1 failure)")
            .await;
        assert_eq!(
            running.stats.last_rtt(),
            None,
            "a failure has no round trip"
        );
        running
            .address
            .send_replace(Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        running
            .expect_report("upstream web/web1 is UP (connected, 1/1 success)")
            .await;
        let last = running.stats.last_rtt().expect("a round trip");
        let smoothed = running.stats.smoothed_rtt().expect("an average");
        assert!(last < Duration::from_secs(1), "{last:?}");
        assert!(smoothed < Duration::from_secs(1), "{smoothed:?}");
        running.stop().await;
    }

    /// The report of an http check says what the server answered.
    #[tokio::test]
    async fn an_http_check_reports_the_status() {
        let (listener, port) = listen().await;
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.expect("accept");
                let mut request = [0; 1024];
                let _ = stream.read(&mut request).await.expect("a request");
                let answer = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
                stream.write_all(answer).await.expect("answer");
            }
        });
        let check = HealthCheck {
            protocol: HealthProtocol::Http(HttpProbe {
                path: PathAndQuery::from_static("/"),
                host: "localhost".to_owned(),
                expect_status: StatusRange {
                    first: 200,
                    last: 399,
                },
                expect: None,
            }),
            ..tcp_check(port)
        };
        let mut running = Running::start(check, Some(LOOPBACK));
        running
            .expect_report("upstream web/web1 is DOWN (HTTP 503, 1/1 failure)")
            .await;
        running.stop().await;
    }

    #[test]
    fn the_smoothed_round_trip_moves_an_eighth_toward_each_new_one() {
        let stats = ProbeStats::default();
        assert_eq!((stats.last_rtt(), stats.smoothed_rtt()), (None, None));
        stats.record_rtt(Duration::from_micros(800));
        assert_eq!(stats.smoothed_rtt(), Some(Duration::from_micros(800)));
        stats.record_rtt(Duration::from_micros(1600));
        assert_eq!(stats.last_rtt(), Some(Duration::from_micros(1600)));
        assert_eq!(stats.smoothed_rtt(), Some(Duration::from_micros(900)));
        // Below a microsecond still counts as a round trip.
        stats.record_rtt(Duration::from_nanos(10));
        assert_eq!(stats.last_rtt(), Some(Duration::from_micros(1)));
    }

    #[tokio::test]
    async fn cancel_stops_a_checker_in_the_middle_of_a_probe() {
        let (_listener, _queued, port) = black_hole().await;
        let running = Running::start(tcp_check(port), Some(LOOPBACK));
        // The probe is under way: its connect hangs in the black hole.
        wait_until("the probe's connect", || connecting_to(port) > 0).await;
        let stats = Arc::clone(&running.stats);
        running.stop().await;
        assert_eq!(stats.successes.load(Ordering::Relaxed), 0);
        assert_eq!(stats.failures.load(Ordering::Relaxed), 0);
        // Cancelled, not left behind: its socket is gone.
        wait_until("the probe's socket closed", || connecting_to(port) == 0).await;
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
    fn skipped_probes_are_reported_at_once_then_once_a_period() {
        let mut skips = SkipWarnings::default();
        let start = Instant::now();
        assert_eq!(skips.skipped(start), Some(1));
        assert!((1..=9).all(|s| skips.skipped(start + Duration::from_secs(s)).is_none()));
        assert_eq!(skips.skipped(start + SKIP_WARNING_PERIOD), Some(10));
        assert_eq!(
            skips.skipped(start + SKIP_WARNING_PERIOD + Duration::from_secs(1)),
            None
        );
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
