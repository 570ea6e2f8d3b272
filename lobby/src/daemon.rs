//! The daemon's loop: turns channels into [`Event`]s for the reconcile
//! core and carries its [`Action`]s out on a [`DataPlane`]. Every decision
//! is the core's (lobby/src/reconcile.rs); this file only wires.
//!
//! The task that owns the core never waits for the kernel: transactions,
//! table listings and counter reads run on tasks of their own and come back
//! as events or replies.
use std::{
    collections::BTreeMap,
    future::Future,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
    time::{Instant, MissedTickBehavior, sleep_until},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    accel::DeviceQuery,
    config::{self, Config, Family, Parsed},
    conntrack,
    ctl::{self, AdminState, Control, CtlError, Request, StatsReport, TargetStats, UpstreamStats},
    dns::{self, AddressUpdate, DnsStats, ResolverKey},
    ebpf::{Counters, CountersError},
    events::{EventKind, Events, LobbyEvent},
    health::{self, CheckerRuntime, HealthReport, ProbeStats},
    metrics::{self, MetricsError, Snapshot, UpstreamExtras},
    model::{Backend, BackendDelta, UpstreamId},
    nft::{self, NftError},
    ownership::{self, OwnershipError, TableLock},
    plane::{DataPlane, KernelPlane, Lookup},
    reconcile::{
        Action, AddressKey, CHOICE_PERIOD, Core, Event, HeldAddress, Measures, Notice, Outside,
    },
    reloads::{Read, Reloads},
    systemd,
    table_watch::Heard,
    traffic,
    watch::{self as config_watch, DEBOUNCE},
};

/// How often at most the interfaces toward the upstreams are looked up
/// again, so that counters follow routes and interfaces that change: when
/// the kernel says something changed, or periodically without its news.
const COUNTERS_RECHECK: Duration = Duration::from_secs(5);
/// How often the table is compared with what Lobby applied while the
/// kernel's notifications of its changes are not followed (turned off, or
/// they could not be). Not beside them: a comparison lists the whole
/// table, and nft 1.0.6 fetches every element of every set to list it
/// (about a second of CPU per 100,000-prefix block list, measured).
const TABLE_CHECK: Duration = Duration::from_secs(10);
/// The longest a stats request waits for a transaction on its way.
const STATS_WAIT: Duration = Duration::from_secs(1);
/// How long shutdown waits for the daemon's tasks.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the daemon needs from its caller.
#[derive(Clone, Debug)]
pub struct Options {
    pub config_path: PathBuf,
    /// `None`: the default of the configured table.
    pub pin_dir: Option<PathBuf>,
    /// `None`: the default of the configured table.
    pub socket_path: Option<PathBuf>,
    /// How often each upstream's traffic since the last line is logged;
    /// `None`: never.
    pub traffic_log_interval: Option<Duration>,
    /// Load the eBPF counters; without them stats show zeros.
    pub counters: bool,
    /// Follow the kernel's notifications of ruleset changes; without them
    /// the table is compared every [`TABLE_CHECK`].
    pub table_notifications: bool,
    /// Run the nft binary for each transaction instead of libnftables.
    pub nft_process: bool,
}

impl Options {
    /// The control socket: the one given, else the `table`'s default.
    pub fn socket_path(&self, table: &str) -> PathBuf {
        self.socket_path
            .clone()
            .unwrap_or_else(|| ctl::default_socket(table))
    }

    /// The pin directory: the one given, else the `table`'s default.
    pub fn pin_dir(&self, table: &str) -> PathBuf {
        self.pin_dir
            .clone()
            .unwrap_or_else(|| crate::ebpf::default_pin_dir(table))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    // The errors are the source: printed once, after the colon.
    #[error("invalid configuration")]
    Config(#[from] config::ConfigErrors),
    #[error(transparent)]
    Counters(#[from] CountersError),
    #[error(transparent)]
    Control(#[from] CtlError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(transparent)]
    Ownership(#[from] OwnershipError),
    #[error(
        "acceleration: this kernel has no flowtable support (nf_flow_table: CONFIG_NF_FLOW_TABLE, \
         CONFIG_NF_FLOW_TABLE_INET, CONFIG_NFT_FLOW_OFFLOAD; or load nf_flow_table_inet and \
         nft_flow_offload); remove `acceleration` from {path}; the kernel answered nft's check"
    )]
    NoFlowtable {
        path: String,
        #[source]
        source: NftError,
    },
    #[error("applying the first ruleset: {0}")]
    FirstApply(String),
    #[error("enabling IPv4 forwarding (net.ipv4.ip_forward)")]
    Forwarding(#[source] std::io::Error),
    #[error("installing the SIGHUP handler")]
    Signal(#[source] std::io::Error),
    #[error("starting the health checkers' thread")]
    CheckerRuntime(#[source] std::io::Error),
}

/// Runs the daemon on the kernel until `shutdown` completes, then removes
/// the ruleset and the counters. `ready` is called once the first ruleset
/// is applied.
pub async fn run(
    options: Options,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(),
) -> Result<(), DaemonError> {
    let parsed = read_config(options.config_path.clone()).await?;
    let config = parsed.config();
    // Refused before anything is touched; `lobby check` (no privileges)
    // validates the syntax only.
    flowtables_if_asked(config, &options.config_path).await?;
    // Before anything is touched: a live daemon's table is never taken.
    let table = config.nftables.table.clone();
    let lock = TableLock::claim(&ownership::default_lock_dir(), &table)?;
    enable_forwarding().map_err(DaemonError::Forwarding)?;
    match health::raise_fd_limit() {
        Ok(limit) => info!(limit, "open file limit"),
        Err(e) => warn!(error = %e, "probes of many upstreams may run out of file descriptors"),
    }
    let counters = if options.counters {
        Some(Counters::load(&options.pin_dir(&table))?)
    } else {
        info!("counters are off (--no-counters)");
        None
    };
    let nft = nft::Nft::open(options.nft_process);
    let plane = Arc::new(KernelPlane::new(counters, table, nft));
    let result = serve(options, parsed, plane.clone(), shutdown, ready).await;
    if result.is_err() {
        // A failed start leaves nothing behind: no pinned map, no table.
        plane.remove().await;
    }
    drop(lock);
    result
}

/// Runs the loop on `plane` with the configuration already read, until
/// `shutdown`. Tests call it with a fake data plane.
pub async fn serve<P: DataPlane>(
    options: Options,
    parsed: Parsed,
    plane: Arc<P>,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(),
) -> Result<(), DaemonError> {
    let config = parsed.config().clone();
    // A table left by a crashed run still balances: what it sends traffic
    // to is the best knowledge of which upstreams are up.
    let inherited = match plane.existing_rotation().await {
        Ok(rotation) => rotation,
        Err(e) => {
            warn!(error = %e, "reading the ruleset of a previous run; upstreams start as configured");
            None
        }
    };
    if inherited.is_some() {
        info!(
            table = %config.nftables.table,
            "taking over the ruleset of a previous run"
        );
    }
    let socket_path = options.socket_path(&config.nftables.table);
    let listener = ctl::bind(&socket_path).await?;
    // Bound by this daemon: a start that fails from here on leaves no
    // socket file behind (a running server removes it itself at its end).
    let _socket_file = RemoveOnDrop(socket_path.clone());
    let metrics_listener = match &config.metrics {
        Some(m) => Some((m.listen, metrics::bind(m.listen)?)),
        None => None,
    };
    let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;
    let (changed_tx, mut changed_rx) = mpsc::channel(1);
    let _config_watch = match config_watch::watch(&options.config_path, changed_tx) {
        Ok(watch) => Some(watch),
        Err(e) => {
            warn!(error = %e, "config changes are picked up on SIGHUP only");
            None
        }
    };

    let tracker = TaskTracker::new();
    let cancel = CancellationToken::new();
    let events = Events::start(config.events.clone(), &tracker, cancel.child_token());
    let checker_runtime = CheckerRuntime::start().map_err(DaemonError::CheckerRuntime)?;
    let (mut wiring, mut inbox) = Wiring::new(
        plane,
        parsed,
        events,
        checker_runtime,
        tracker.clone(),
        cancel.clone(),
    );
    log_warnings(&config);
    let probe_ports = health::confine_probe_ports();
    match probe_ports {
        Some(ports) => info!(
            first = ports.first,
            last = ports.last,
            "TCP health probes use local ports {}-{}",
            ports.first,
            ports.last
        ),
        None => info!(
            "TCP health probes use any local port (the kernel has no IP_LOCAL_PORT_RANGE): every received packet's socket is looked up"
        ),
    }
    let mut core = Core::new(inherited, ipv6_forwarding()).with_probe_ports(probe_ports);
    let now = Instant::now();
    let mut actions = core.on(Event::ConfigLoaded { config, read: 0 }, now);
    // The first ruleset has the flowtable already.
    if let Some(query) = core.device_query()
        && let Some(devices) = wiring.plane.flowtable_devices(&query, Lookup::All).await
    {
        actions.extend(core.on(Event::Devices(devices), now));
    }
    actions.extend(core.settle(now));
    let mut ready = Some(ready);
    let mut listeners = Some((listener, metrics_listener));
    let mut table_check = tokio::time::interval_at(Instant::now() + TABLE_CHECK, TABLE_CHECK);
    table_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // What drives the dynamic distributions is measured this often.
    let mut measure_tick = tokio::time::interval(CHOICE_PERIOD);
    measure_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut reload_at: Option<Instant> = None;
    // Stats requests that arrived while a transaction was on its way.
    let mut deferred: Vec<(Instant, Request)> = Vec::new();
    tokio::pin!(shutdown);
    let outcome = 'run: loop {
        for action in actions.drain(..) {
            match action {
                Action::Ready => {
                    let (listener, metrics_listener) =
                        listeners.take().expect("the core is ready once");
                    wiring.start_services(&options, &socket_path, listener, metrics_listener);
                    // A reload before the first apply may have moved it.
                    wiring.follow_metrics(&core);
                    info!(
                        config = %options.config_path.display(),
                        targets = core.config().map_or(0, |c| c.targets.len()),
                        "lobby is balancing"
                    );
                    if let Some(ready) = ready.take() {
                        ready();
                    }
                    systemd::ready();
                }
                Action::Abort(error) => break 'run Err(DaemonError::FirstApply(error)),
                action => wiring.execute(action, &core),
            }
        }
        wiring.end_step();
        wiring.answer_commands(&core);
        core.hear_outside(wiring.table_watched());
        let deadline = core.next_deadline();
        tokio::select! {
            () = &mut shutdown => break 'run Ok(()),
            Some(report) = inbox.reports.recv() => {
                let now = Instant::now();
                actions.extend(core.on(Event::Health(report), now));
                // Probes that finished together land in one transaction.
                while let Ok(report) = inbox.reports.try_recv() {
                    actions.extend(core.on(Event::Health(report), now));
                }
            }
            Some(update) = inbox.addresses.recv() => {
                actions.extend(core.on(Event::Address(update), Instant::now()));
            }
            Some(event) = inbox.events.recv() => actions.extend(core.on(event, Instant::now())),
            Some(request) = inbox.requests.recv() => {
                // Stats say what the kernel does: a change still on its way
                // to the kernel is waited for, a little.
                if core.is_applying() {
                    deferred.push((Instant::now(), request));
                } else {
                    wiring.answer(request, &core);
                }
            }
            Some(control) = inbox.control.recv() => {
                // The control server logged who asked.
                if let Some(reply) = wiring.control(control, &mut core) {
                    systemd::reloading();
                    wiring.reload(&options.config_path, true, Some(reply));
                }
            }
            _ = hangup.recv() => {
                info!("SIGHUP received, reloading {}", options.config_path.display());
                systemd::reloading();
                wiring.reload(&options.config_path, true, None);
            }
            Some(()) = changed_rx.recv() => reload_at = Some(Instant::now() + DEBOUNCE),
            () = sleep_until(reload_at.unwrap_or_else(Instant::now)), if reload_at.is_some() => {
                reload_at = None;
                wiring.reload(&options.config_path, false, None);
            }
            Some(loaded) = inbox.loaded.recv() => {
                let forced = loaded.read.forced;
                if let Some(event) = wiring.reload_event(loaded) {
                    actions.extend(core.on(event, Instant::now()));
                }
                if forced {
                    systemd::ready();
                }
                if let Some(read) = wiring.reloads.ended() {
                    wiring.read_config(&options.config_path, read);
                }
            }
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                actions.extend(core.on(Event::Tick, Instant::now()));
            }
            Ok(()) = inbox.table_heard.changed() => {
                let outside = inbox.outside();
                actions.extend(core.on(Event::TableMayHaveChanged(outside), Instant::now()));
            }
            _ = table_check.tick(), if !wiring.table_watched() => {
                let outside = Outside::Possible;
                actions.extend(core.on(Event::TableMayHaveChanged(outside), Instant::now()));
            }
            _ = measure_tick.tick() => actions.extend(wiring.measure(&mut core)),
        }
        for action in core.track() {
            wiring.execute(action, &core);
        }
        actions.extend(core.settle(Instant::now()));
        let now = Instant::now();
        let (due, waiting): (Vec<_>, Vec<_>) = deferred
            .drain(..)
            .partition(|(at, _)| !core.is_applying() || now >= *at + STATS_WAIT);
        deferred = waiting;
        for (_, request) in due {
            wiring.answer(request, &core);
        }
    };
    systemd::stopping();
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not stop within {SHUTDOWN_GRACE:?}");
    }
    if outcome.is_ok() {
        wiring.plane.remove().await;
        info!("lobby stopped");
    }
    outcome
}

/// What `lobby check` warns of in a configuration the daemon runs.
fn log_warnings(config: &Config) {
    for warning in &config.warnings {
        warn!("{warning}");
    }
}

/// A file removed when this is dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A configuration file read off the loop.
struct Loaded {
    read: Read,
    /// `None` when a change notice found the text the daemon runs.
    parsed: Option<Result<Parsed, config::ConfigErrors>>,
}

/// The configuration at `path` and its text, read on a blocking thread: a
/// slow or odd file never holds up the runtime.
async fn read_config(path: PathBuf) -> Result<Parsed, config::ConfigErrors> {
    tokio::task::spawn_blocking(move || Parsed::parse(config::read(&path)?, &path))
        .await
        .expect("reading the configuration does not panic")
}

/// The file at `path` read against `running`: only what changed is parsed
/// again.
fn read_and_parse(path: &Path, running: &Parsed, read: Read) -> Loaded {
    let parsed = match config::read(path) {
        Ok(text) if !read.forced && text == running.text() => None,
        Ok(text) => Some(running.reparse(text, path)),
        Err(errors) => Some(Err(errors)),
    };
    Loaded { read, parsed }
}

/// The kernel's flowtable support, when `config` asks for acceleration.
async fn flowtables_if_asked(config: &Config, path: &Path) -> Result<(), DaemonError> {
    if config.acceleration.is_none() {
        return Ok(());
    }
    crate::nft::flowtable::supported()
        .await
        .map_err(|source| DaemonError::NoFlowtable {
            path: path.display().to_string(),
            source,
        })
}

/// A reload that asks for `acceleration` on a kernel without flowtables is
/// refused as a start is, instead of failing every apply after it.
async fn refuse_acceleration_without_flowtables(path: &Path, loaded: &mut Loaded) {
    let Some(Ok(parsed)) = &loaded.parsed else {
        return;
    };
    if let Err(refusal) = flowtables_if_asked(parsed.config(), path).await {
        let message = match std::error::Error::source(&refusal) {
            Some(answer) => format!("{refusal}: {answer}"),
            None => refusal.to_string(),
        };
        loaded.parsed = Some(Err(config::ConfigErrors::of_document(path, 0, 0, message)));
    }
}

/// What a checker task needs from the loop while it runs.
struct Checker {
    cancel: CancellationToken,
    address: watch::Sender<Option<IpAddr>>,
    stats: Arc<ProbeStats>,
}

struct Resolver {
    cancel: CancellationToken,
    stats: Arc<DnsStats>,
}

/// Where the loop's events come from.
struct Inbox {
    reports: mpsc::Receiver<HealthReport>,
    addresses: mpsc::Receiver<AddressUpdate>,
    /// Outcomes of the data plane's work: applies and listings.
    events: mpsc::Receiver<Event>,
    requests: mpsc::Receiver<Request>,
    control: mpsc::Receiver<Control>,
    loaded: mpsc::Receiver<Loaded>,
    table_heard: watch::Receiver<Heard>,
    /// What the table's watch had heard when last read.
    heard_until: Heard,
}

impl Inbox {
    /// What the table's watch heard since it was last asked.
    fn outside(&mut self) -> Outside {
        let heard = *self.table_heard.borrow_and_update();
        let before = std::mem::replace(&mut self.heard_until, heard);
        if heard.named == before.named {
            Outside::Possible
        } else {
            Outside::Changed
        }
    }
}

/// The loop's hands: what it runs and the handles of what it started.
struct Wiring<P> {
    plane: Arc<P>,
    /// The running configuration with its text: a change notice with the
    /// same text is not a reload, and a new text is parsed against it.
    parsed: Arc<Parsed>,
    /// One per checked address of an upstream.
    checkers: BTreeMap<(UpstreamId, AddressKey), Checker>,
    resolvers: BTreeMap<ResolverKey, Resolver>,
    /// Queries of resolvers a reload retired, so that totals never go back.
    retired_dns: BTreeMap<String, u64>,
    /// The changes of the backends to count, to the counting task.
    tracking: mpsc::UnboundedSender<Tracking>,
    /// A change went to the counting task since the last apply waited for
    /// it.
    untracked: bool,
    /// What waits for the counting task to have tracked the changes of
    /// the actions being carried out (an apply that sends traffic to new
    /// backends, the first probes of the checkers they start): this
    /// barrier goes to the counting task after the actions, behind those
    /// changes.
    step_barrier: Option<watch::Sender<bool>>,
    /// Whether an apply has succeeded: the table holds the chains that
    /// keep probes out of conntrack, so a probe sent before it would be
    /// tracked, and its entry, whose answer the table then exempts, left
    /// UNREPLIED for SYN_SENT's 120 s.
    table_applied: Arc<watch::Sender<bool>>,
    /// What the flowtable's interfaces are looked up for, with the counters'.
    device_query: watch::Sender<Option<DeviceQuery>>,
    reports: mpsc::Sender<HealthReport>,
    addresses: mpsc::Sender<AddressUpdate>,
    events: mpsc::Sender<Event>,
    requests: mpsc::Sender<Request>,
    control: mpsc::Sender<Control>,
    loaded: mpsc::Sender<Loaded>,
    table_heard: watch::Sender<Heard>,
    /// The task that follows the kernel's notifications of table changes.
    table_watch: Option<tokio::task::JoinHandle<()>>,
    /// A conntrack dump for least-connections is under way.
    dumping: Arc<std::sync::atomic::AtomicBool>,
    /// Dumps failed in a row (warned at the first).
    dump_failures: Arc<std::sync::atomic::AtomicU64>,
    /// The file's reads, and the `lobby ctl reload`s waiting for them.
    reloads: Reloads<ctl::Answer>,
    /// `lobby ctl drain|enable|disable`s waiting for the kernel to have
    /// them: each one's number ([`Core::admin`]) and answer.
    commands: Vec<(u64, String, ctl::Answer)>,
    /// Where operators' event receivers hear of changes.
    receivers: Events,
    /// Whether the services run (the first ruleset is in).
    started: bool,
    /// The metrics endpoint's address and what stops it, once started.
    metrics: Option<(SocketAddr, CancellationToken)>,
    /// Where the health checkers run; it stops with the wiring, after the
    /// daemon has waited for them.
    checker_runtime: CheckerRuntime,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl<P: DataPlane> Wiring<P> {
    fn new(
        plane: Arc<P>,
        parsed: Parsed,
        receivers: Events,
        checker_runtime: CheckerRuntime,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> (Self, Inbox) {
        let (reports_tx, reports) = mpsc::channel(4096);
        let (addresses_tx, addresses) = mpsc::channel(1024);
        let (events_tx, events) = mpsc::channel(16);
        let (requests_tx, requests) = mpsc::channel(64);
        let (control_tx, control) = mpsc::channel(16);
        let (loaded_tx, loaded) = mpsc::channel(4);
        let (table_heard_tx, table_heard) = watch::channel(Heard::default());
        let (tracking_tx, tracking) = mpsc::unbounded_channel();
        let device_query = watch::Sender::new(None);
        // From the start: the first apply waits for the first counted
        // backends.
        let (routes_changed_tx, routes_changed) = mpsc::channel(1);
        tracker.spawn(plane.watch_routes(
            routes_changed_tx,
            COUNTERS_RECHECK,
            cancel.child_token(),
        ));
        tracker.spawn(keep_counting(
            plane.clone(),
            tracking,
            routes_changed,
            device_query.subscribe(),
            events_tx.clone(),
            cancel.child_token(),
        ));
        let wiring = Self {
            plane,
            parsed: Arc::new(parsed),
            checkers: BTreeMap::new(),
            resolvers: BTreeMap::new(),
            retired_dns: BTreeMap::new(),
            tracking: tracking_tx,
            untracked: false,
            step_barrier: None,
            table_applied: Arc::new(watch::Sender::new(false)),
            device_query,
            reports: reports_tx,
            addresses: addresses_tx,
            events: events_tx,
            requests: requests_tx,
            control: control_tx,
            loaded: loaded_tx,
            table_heard: table_heard_tx,
            table_watch: None,
            dumping: Arc::default(),
            dump_failures: Arc::default(),
            reloads: Reloads::default(),
            commands: Vec::new(),
            receivers,
            started: false,
            metrics: None,
            checker_runtime,
            tracker,
            cancel,
        };
        let inbox = Inbox {
            reports,
            addresses,
            events,
            requests,
            control,
            loaded,
            table_heard,
            heard_until: Heard::default(),
        };
        (wiring, inbox)
    }

    /// Starts what serves the outside once the first ruleset is in: the
    /// control socket, metrics, the traffic log, the table's watch and the
    /// periodic recheck of the counters.
    fn start_services(
        &mut self,
        options: &Options,
        socket_path: &Path,
        listener: tokio::net::UnixListener,
        metrics_listener: Option<(SocketAddr, tokio::net::TcpListener)>,
    ) {
        self.started = true;
        self.tracker.spawn(ctl::serve_with_control(
            listener,
            socket_path.to_owned(),
            self.requests.clone(),
            self.control.clone(),
            self.cancel.child_token(),
        ));
        if let Some((addr, listener)) = metrics_listener {
            self.serve_metrics(addr, listener);
        }
        self.tracker
            .spawn(conntrack::watch(self.cancel.child_token()));
        self.tracker.spawn(traffic::watch(
            self.requests.clone(),
            self.plane.clone(),
            options.traffic_log_interval,
            self.cancel.child_token(),
        ));
        if options.table_notifications {
            self.table_watch = Some(
                self.tracker.spawn(
                    self.plane
                        .watch_table(self.table_heard.clone(), self.cancel.child_token()),
                ),
            );
        }
    }

    /// Whether the kernel's notifications of table changes are followed.
    fn table_watched(&self) -> bool {
        self.table_watch
            .as_ref()
            .is_some_and(|watch| !watch.is_finished())
    }

    fn serve_metrics(&mut self, addr: SocketAddr, listener: tokio::net::TcpListener) {
        let cancel = self.cancel.child_token();
        self.tracker.spawn(metrics::serve(
            listener,
            self.requests.clone(),
            cancel.clone(),
        ));
        self.metrics = Some((addr, cancel));
    }

    /// Moves the metrics endpoint to the configuration's `metrics.listen`,
    /// or stops it when the key is gone. The new address is bound before
    /// the old one is let go: when it cannot be bound, the endpoint stays
    /// where it was and a warning says why.
    fn follow_metrics(&mut self, core: &Core) {
        let wanted = core
            .config()
            .and_then(|c| c.metrics.as_ref())
            .map(|m| m.listen);
        let serving = self.metrics.as_ref().map(|(addr, _)| *addr);
        if wanted == serving {
            return;
        }
        let listener = match wanted.map(metrics::bind).transpose() {
            Ok(listener) => listener,
            Err(error) => {
                let kept = serving.map_or("none".to_owned(), |a| a.to_string());
                let cause = std::error::Error::source(&error).map(ToString::to_string);
                warn!(
                    "metrics.listen changed but {error}: {}; the endpoint stays as it was ({kept})",
                    cause.unwrap_or_default()
                );
                return;
            }
        };
        if let Some((addr, cancel)) = self.metrics.take() {
            cancel.cancel();
            info!("metrics endpoint on {addr} stopped (metrics.listen changed)");
        }
        if let (Some(addr), Some(listener)) = (wanted, listener) {
            self.serve_metrics(addr, listener);
            info!("metrics endpoint listening on {addr}");
        }
    }

    fn execute(&mut self, action: Action, core: &Core) {
        match action {
            Action::Apply(script) => {
                let plane = self.plane.clone();
                // Counted before the first connection can reach them: the
                // apply waits for the counting task to have tracked the
                // changes sent before it, if any.
                let tracked = std::mem::take(&mut self.untracked).then(|| self.step_barrier());
                let events = self.events.clone();
                let table_applied = self.table_applied.clone();
                self.tracker.spawn(async move {
                    if let Some(tracked) = tracked {
                        passed(tracked).await;
                    }
                    let started = Instant::now();
                    let outcome = plane.apply(script).await;
                    if outcome.is_ok() {
                        table_applied.send_replace(true);
                    }
                    let outcome = outcome
                        .map(|()| started.elapsed())
                        .map_err(|e: NftError| e.to_string());
                    let _ = events.send(Event::Applied(outcome)).await;
                });
            }
            Action::ListTable { generation } => {
                let plane = self.plane.clone();
                let events = self.events.clone();
                self.tracker.spawn(async move {
                    let started = Instant::now();
                    let listing = plane.list_table().await.map_err(|e| e.to_string());
                    let elapsed = started.elapsed();
                    let _ = events
                        .send(Event::TableListed {
                            generation,
                            listing,
                            elapsed,
                        })
                        .await;
                });
            }
            Action::StartChecker {
                id,
                key,
                check,
                available,
                address,
            } => {
                let stats = match self.checkers.remove(&(id.clone(), key)) {
                    Some(previous) => {
                        previous.cancel.cancel();
                        previous.stats
                    }
                    None => Arc::default(),
                };
                let (address_tx, address_rx) = watch::channel(Some(address));
                let cancel = self.cancel.child_token();
                let counted = self.step_barrier();
                let table_applied = self.table_applied.subscribe();
                health::spawn_checker(
                    id.clone(),
                    check,
                    available,
                    address_rx,
                    async move {
                        passed(counted).await;
                        passed(table_applied).await;
                    },
                    self.reports.clone(),
                    stats.clone(),
                    cancel.clone(),
                    &self.tracker,
                    self.checker_runtime.handle(),
                );
                self.checkers.insert(
                    (id, key),
                    Checker {
                        cancel,
                        address: address_tx,
                        stats,
                    },
                );
            }
            Action::StopChecker { id, key } => {
                if let Some(checker) = self.checkers.remove(&(id, key)) {
                    checker.cancel.cancel();
                }
            }
            Action::SetProbeAddress { id, key, address } => {
                if let Some(checker) = self.checkers.get(&(id, key)) {
                    checker.address.send_replace(Some(address));
                }
            }
            Action::StartResolver(key) => {
                let stats = Arc::new(DnsStats::default());
                let cancel = self.cancel.child_token();
                dns::spawn_resolver(
                    key.clone(),
                    self.addresses.clone(),
                    stats.clone(),
                    cancel.clone(),
                    &self.tracker,
                );
                self.resolvers.insert(key, Resolver { cancel, stats });
            }
            Action::StopResolver(key) => {
                if let Some(resolver) = self.resolvers.remove(&key) {
                    resolver.cancel.cancel();
                    add_counts(&mut self.retired_dns, &resolver.stats);
                }
            }
            Action::TrackCounters(change) => {
                let _ = self.tracking.send(Tracking::Change(change));
                self.untracked = true;
            }
            Action::WatchDevices(query) => {
                self.device_query.send_replace(query);
            }
            Action::Notify(notice) => {
                if notice.is_warning() {
                    warn!("{notice}");
                } else {
                    info!("{notice}");
                }
                let answered = match &notice {
                    Notice::ReloadApplied(summary) => {
                        Some((self.reloads.applied(summary.read()), Ok(notice.to_string())))
                    }
                    Notice::ReloadFailed { read, .. } => {
                        Some((self.reloads.refused(*read), Err(notice.to_string())))
                    }
                    _ => None,
                };
                if matches!(notice, Notice::ReloadApplied(_)) && self.started {
                    self.follow_metrics(core);
                }
                if let Some((replies, outcome)) = answered {
                    for reply in replies {
                        let _ = reply.send(outcome.clone());
                    }
                }
                if let Some(event) = event_of(&notice) {
                    self.receivers.emit(event);
                }
            }
            Action::Ready | Action::Abort(_) => unreachable!("handled by the loop"),
        }
    }

    /// The barrier of the actions being carried out, passed once the
    /// counting task has tracked what they changed.
    fn step_barrier(&mut self) -> watch::Receiver<bool> {
        self.step_barrier
            .get_or_insert_with(|| watch::Sender::new(false))
            .subscribe()
    }

    /// Sends the step's barrier, if anything waits for it, behind the
    /// step's changes.
    fn end_step(&mut self) {
        if let Some(done) = self.step_barrier.take() {
            // Without a counting task the dropped barrier releases them.
            let _ = self.tracking.send(Tracking::Barrier(done));
        }
    }

    /// Answers the commands the kernel now has.
    fn answer_commands(&mut self, core: &Core) {
        let applied = core.commands_applied();
        for (_, said, reply) in self
            .commands
            .extract_if(.., |(number, ..)| *number <= applied)
        {
            let _ = reply.send(Ok(said));
        }
    }

    /// Takes a `lobby ctl` command; a reload is handed back to the loop,
    /// which answers it once the outcome is known.
    fn control(&mut self, control: Control, core: &mut Core) -> Option<ctl::Answer> {
        match control {
            Control::Admin {
                command,
                target,
                upstream,
                peer_uid,
                reply,
            } => {
                let id = UpstreamId::new(&target, &upstream);
                match core.admin(&id, command.state()) {
                    Ok(number) => {
                        let state = command.state().as_str();
                        info!(upstream = %id, uid = peer_uid, "upstream {id} {state} by uid {peer_uid}");
                        let said = format!("upstream {id} {state}");
                        self.commands.push((number, said, reply));
                    }
                    Err(refusal) => {
                        let _ = reply.send(Err(refusal));
                    }
                }
                None
            }
            Control::State(reply) => {
                let _ = reply.send(state_report(core));
                None
            }
            Control::Reload(reply) => Some(reply),
        }
    }

    /// Asks for a read of the configuration (see [`Reloads`]); `reply`
    /// waits for its outcome.
    fn reload(&mut self, path: &Path, forced: bool, reply: Option<ctl::Answer>) {
        if let Some(read) = self.reloads.ask(forced, reply) {
            self.read_config(path, read);
        }
    }

    /// Reads the configuration off the loop; the outcome comes back on
    /// `loaded`, always: the next read waits for it.
    fn read_config(&self, path: &Path, read: Read) {
        let path = path.to_owned();
        let loaded = self.loaded.clone();
        let running = self.parsed.clone();
        self.tracker.spawn(async move {
            let reading = {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_and_parse(&path, &running, read))
            };
            let mut outcome = reading.await.unwrap_or_else(|e| Loaded {
                read,
                parsed: Some(Err(config::ConfigErrors::of_document(
                    &path,
                    0,
                    0,
                    format!("reading the file failed: {e}"),
                ))),
            });
            refuse_acceleration_without_flowtables(&path, &mut outcome).await;
            let _ = loaded.send(outcome).await;
        });
    }

    /// The core's event for a file read: none when a change notice found
    /// the text the daemon runs.
    fn reload_event(&mut self, loaded: Loaded) -> Option<Event> {
        let read = loaded.read.id;
        match loaded.parsed? {
            Ok(parsed) => {
                let config = parsed.config().clone();
                self.parsed = Arc::new(parsed);
                log_warnings(&config);
                Some(Event::ConfigLoaded { config, read })
            }
            Err(errors) => Some(Event::ConfigRejected {
                errors: errors.to_string(),
                read,
            }),
        }
    }

    /// Answers a request with what the core knows now, and the counters
    /// read off the loop.
    fn answer(&self, request: Request, core: &Core) {
        let held = HeldStats::of(core, &self.checkers);
        let policies = core
            .config()
            .is_some_and(|c| c.targets.iter().any(|t| t.counts_refusals()));
        let plane = self.plane.clone();
        match request {
            Request::Stats(reply) => {
                tokio::spawn(async move {
                    let (report, backends, _) = held.report();
                    let _ = reply.send(read_counters(report, backends, policies, plane).await);
                });
            }
            Request::Metrics(reply) => {
                let mut dns_resolutions = self.retired_dns.clone();
                for resolver in self.resolvers.values() {
                    add_counts(&mut dns_resolutions, &resolver.stats);
                }
                let reloads = core.reloads();
                let apply_duration = core.apply_duration().clone();
                tokio::spawn(async move {
                    let (report, backends, extras) = held.report();
                    let _ = reply.send(Snapshot {
                        conntrack: conntrack::read(),
                        stats: read_counters(report, backends, policies, plane).await,
                        extras,
                        dns_resolutions,
                        reloads_succeeded: reloads.succeeded,
                        reloads_failed: reloads.failed,
                        last_reload_successful: reloads.last_successful,
                        apply_duration,
                    });
                });
            }
        }
    }

    /// The smoothed probe round trip of each checked address of an
    /// upstream (each has its checker), once a probe succeeded.
    fn latency(&self) -> BTreeMap<(UpstreamId, AddressKey), Duration> {
        self.checkers
            .iter()
            .filter_map(|(key, checker)| Some((key.clone(), checker.stats.smoothed_rtt()?)))
            .collect()
    }

    /// Measures what drives the dynamic distributions in use: probe round
    /// trips at once, established connections by a conntrack dump off the
    /// loop (its outcome comes back as an event; one dump at a time).
    fn measure(&self, core: &mut Core) -> Vec<Action> {
        let mut actions = Vec::new();
        if core.uses(config::Distribution::LeastLatency) {
            let latency = Measures::Latency(self.latency());
            actions.extend(core.on(Event::Measured(latency), Instant::now()));
        }
        if core.uses(config::Distribution::LeastConnections)
            && !self.dumping.swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            let events = self.events.clone();
            let dumping = self.dumping.clone();
            let failures = self.dump_failures.clone();
            self.tracker.spawn(async move {
                let dump = tokio::task::spawn_blocking(conntrack::established).await;
                dumping.store(false, std::sync::atomic::Ordering::Release);
                match dump {
                    Ok(Ok(counts)) => {
                        failures.store(0, std::sync::atomic::Ordering::Relaxed);
                        let event = Event::Measured(Measures::Established(counts));
                        let _ = events.send(event).await;
                    }
                    Ok(Err(e)) => {
                        // Said once until a dump succeeds again: the choice
                        // keeps the last counts meanwhile.
                        if failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) == 0 {
                            warn!(error = %e, "counting established connections for least-connections; the choice keeps the last counts");
                        }
                    }
                    Err(e) => warn!(error = %e, "the conntrack dump did not finish"),
                }
            });
        }
        actions
    }
}

/// What an event receiver hears of a notice, if anything.
fn event_of(notice: &Notice) -> Option<LobbyEvent> {
    let (kind, target, upstream, address) = match notice {
        Notice::UpstreamChanged { report, .. } => {
            let address = report.address.map(|a| a.to_string());
            let kind = if report.available {
                EventKind::UpstreamUp
            } else {
                EventKind::UpstreamDown
            };
            let id = &report.id;
            (
                kind,
                Some(id.target.clone()),
                Some(id.upstream.clone()),
                address,
            )
        }
        Notice::TargetEmpty { target } => {
            (EventKind::TargetEmpty, Some(target.clone()), None, None)
        }
        Notice::TargetServing { target } => {
            (EventKind::TargetNotEmpty, Some(target.clone()), None, None)
        }
        Notice::ReloadApplied(_) => (EventKind::ReloadApplied, None, None, None),
        Notice::ReloadFailed { .. } => (EventKind::ReloadFailed, None, None, None),
        Notice::ApplyFailed(_) | Notice::Drift { .. } | Notice::Ipv6ForwardingOff(_) => {
            return None;
        }
    };
    Some(LobbyEvent {
        kind,
        target,
        upstream,
        address,
        detail: notice.to_string(),
        time: std::time::SystemTime::now(),
    })
}

/// One line of the stats of an upstream: one of its addresses, or none
/// while its name never resolved.
struct Entry<'a> {
    upstream: &'a config::Upstream,
    /// The upstream's place in the target's group.
    index: usize,
    held: Option<(AddressKey, HeldAddress)>,
    admin_state: AdminState,
    weight: u32,
}

impl Entry<'_> {
    fn address(&self) -> Option<IpAddr> {
        self.held.map(|(_, a)| a.address)
    }

    fn available(&self) -> bool {
        self.held.is_some_and(|(_, a)| a.available)
    }

    /// The backend it is counted under, with its target's `protocol`.
    fn backend(&self, protocol: config::Protocol) -> Option<Backend> {
        self.address()
            .map(|a| (SocketAddr::new(a, self.upstream.port), protocol))
    }
}

/// The checkers of `target`'s upstreams, sorted by upstream name and
/// address: one range of `checkers`, whose keys sort by target first (no
/// upstream is named "", so the range starts before the target's first).
/// Without health checks, nothing is built or sought per target.
fn checkers_of<'c>(
    checkers: &'c BTreeMap<(UpstreamId, AddressKey), Checker>,
    target: &str,
) -> Vec<(&'c str, AddressKey, &'c Checker)> {
    if checkers.is_empty() {
        return Vec::new();
    }
    let first = (
        UpstreamId::new(target, ""),
        AddressKey::Family(Family::Ipv4),
    );
    checkers
        .range(first..)
        .take_while(|((id, _), _)| id.target == target)
        .map(|((id, key), checker)| (id.upstream.as_str(), *key, checker))
        .collect()
}

/// The entries of `target`'s upstreams, in configuration order, each
/// upstream's addresses IPv4 first.
fn entries<'a>(core: &'a Core, target: &'a config::Target) -> Vec<Entry<'a>> {
    let held = core.held_upstreams(&target.name);
    let mut entries = Vec::new();
    for (index, upstream) in target.group.upstreams.iter().enumerate() {
        let found = held
            .binary_search_by(|(name, ..)| (*name).cmp(upstream.name.as_str()))
            .ok()
            .map(|i| &held[i]);
        let admin_state = found.map_or(AdminState::Enabled, |(_, admin, _)| *admin);
        let weight = match admin_state {
            AdminState::Enabled => upstream.weight,
            AdminState::Drained | AdminState::Disabled => 0,
        };
        let entry = |held| Entry {
            upstream,
            index,
            held,
            admin_state,
            weight,
        };
        match found.map(|(_, _, addresses)| *addresses) {
            Some(addresses) if !addresses.is_empty() => {
                entries.extend(addresses.iter().map(|(key, a)| entry(Some((*key, *a)))));
            }
            _ => entries.push(entry(None)),
        }
    }
    entries
}

/// Every upstream's health, admin state and weight, for `lobby ctl state`.
fn state_report(core: &Core) -> ctl::StateReport {
    let targets = core
        .config()
        .map(|c| c.targets.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|target| ctl::TargetState {
            name: target.name.clone(),
            upstreams: entries(core, target)
                .into_iter()
                .map(|entry| ctl::UpstreamState {
                    name: entry.upstream.name.clone(),
                    address: entry
                        .address()
                        .map(|a| SocketAddr::new(a, entry.upstream.port).to_string()),
                    available: entry.available(),
                    admin_state: entry.admin_state,
                    weight: entry.weight,
                })
                .collect(),
        })
        .collect();
    ctl::StateReport { targets }
}

/// What the counting task is told, in order.
enum Tracking {
    /// Count these backends too, no longer those.
    Change(BackendDelta),
    /// Set it when every change sent before this one is tracked.
    Barrier(watch::Sender<bool>),
}

/// Waits for a [`Tracking::Barrier`] to pass, or for the counting task to
/// be gone (it dropped the barrier).
async fn passed(mut barrier: watch::Receiver<bool>) {
    let _ = barrier.wait_for(|passed| *passed).await;
}

/// Keeps the counters on the interfaces toward the upstreams, and the
/// flowtable's interfaces current (reported to the core, whose desired
/// state they are part of): on every change of what is counted or looked
/// up, and when `routes_changed` says routes may have changed, at most
/// every [`COUNTERS_RECHECK`]. Looking up every route was periodic: at
/// 10,000 upstreams each pass took ~175 ms of CPU every 5 s, and an apply
/// that waited for this task (a reload) waited for the pass too.
async fn keep_counting<P: DataPlane>(
    plane: Arc<P>,
    mut tracking: mpsc::UnboundedReceiver<Tracking>,
    mut routes_changed: mpsc::Receiver<()>,
    mut device_query: watch::Receiver<Option<DeviceQuery>>,
    events: mpsc::Sender<Event>,
    cancel: CancellationToken,
) {
    // A host whose routes churn (a BGP feed) would otherwise have every
    // route looked up without pause.
    let mut recheck_at: Option<Instant> = None;
    let mut earliest_recheck = Instant::now();
    loop {
        // A change looks up only the new addresses; the recheck looks up
        // every route.
        let (change, lookup) = tokio::select! {
            () = cancel.cancelled() => return,
            message = tracking.recv() => match message {
                None => return,
                Some(Tracking::Change(change)) => (change, Lookup::NewAddresses),
                Some(Tracking::Barrier(done)) => {
                    done.send_replace(true);
                    continue;
                }
            },
            changed = device_query.changed() => if changed.is_err() {
                return
            } else {
                (BackendDelta::default(), Lookup::NewAddresses)
            },
            Some(()) = routes_changed.recv() => {
                recheck_at.get_or_insert(earliest_recheck.max(Instant::now()));
                continue;
            }
            () = sleep_until(recheck_at.unwrap_or_else(Instant::now)), if recheck_at.is_some() => {
                recheck_at = None;
                earliest_recheck = Instant::now() + COUNTERS_RECHECK;
                (BackendDelta::default(), Lookup::All)
            }
        };
        plane.track(&change, lookup).await;
        let query = device_query.borrow_and_update().clone();
        if let Some(query) = query
            && let Some(devices) = plane.flowtable_devices(&query, lookup).await
        {
            // The core ignores an unchanged list.
            let _ = events.send(Event::Devices(devices)).await;
        }
    }
}

/// What a stats report takes from the loop's state: the targets (shared)
/// and each entry's state, copied. The report's text (names, hosts,
/// addresses: ~10 allocations an entry) is written off the loop, by
/// [`HeldStats::report`]; at 10,000 upstreams writing it on the loop
/// delayed the health reports that arrived meanwhile.
struct HeldStats {
    targets: Vec<(Arc<config::Target>, Vec<HeldEntry>)>,
}

/// One entry of [`HeldStats`]: its upstream's place in the target's
/// group, and what the core and the checkers say of it.
struct HeldEntry {
    upstream: usize,
    /// Where it is counted; `None` while its name never resolved.
    backend: Option<Backend>,
    available: bool,
    admin_state: AdminState,
    weight: u32,
    latency: Option<Duration>,
    established: Option<u64>,
    extras: UpstreamExtras,
}

impl HeldStats {
    /// `checkers` are the health checkers, by upstream and address: each
    /// entry's is looked up once, and its figures copied.
    fn of(core: &Core, checkers: &BTreeMap<(UpstreamId, AddressKey), Checker>) -> Self {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let targets = core
            .config()
            .map(|c| c.targets.as_slice())
            .unwrap_or_default()
            .iter()
            .map(|target| {
                let least_connections =
                    target.group.distribution == config::Distribution::LeastConnections;
                let checkers = checkers_of(checkers, &target.name);
                let entries = entries(core, target)
                    .into_iter()
                    .map(|entry| {
                        let backend = entry.backend(target.protocol);
                        let checker = entry.held.and_then(|(key, _)| {
                            let name = entry.upstream.name.as_str();
                            checkers
                                .binary_search_by(|(n, k, _)| (*n, *k).cmp(&(name, key)))
                                .ok()
                                .map(|i| checkers[i].2)
                        });
                        HeldEntry {
                            upstream: entry.index,
                            backend,
                            available: entry.available(),
                            admin_state: entry.admin_state,
                            weight: entry.weight,
                            latency: checker.and_then(|c| c.stats.smoothed_rtt()),
                            established: backend
                                .filter(|_| least_connections)
                                .and_then(|b| core.established(&b)),
                            extras: UpstreamExtras {
                                health_successes: checker.map_or(0, |c| load(&c.stats.successes)),
                                health_failures: checker.map_or(0, |c| load(&c.stats.failures)),
                                state_changes: entry.held.map_or(0, |(_, a)| a.state_changes),
                            },
                        }
                    })
                    .collect();
                (target.clone(), entries)
            })
            .collect();
        Self { targets }
    }

    /// The stats report with every counter at zero, and, in the report's
    /// order, the backend each entry is counted under and its figures for
    /// the metrics endpoint.
    fn report(self) -> (StatsReport, Vec<Option<Backend>>, Vec<UpstreamExtras>) {
        let mut backends = Vec::new();
        let mut extras = Vec::new();
        let targets = self
            .targets
            .into_iter()
            .map(|(target, entries)| TargetStats {
                name: target.name.clone(),
                protocol: target.protocol.as_str().to_owned(),
                port: target.port,
                upstream_group: target.group.name.clone(),
                distribution: target.group.distribution.as_str().to_owned(),
                denied: ctl::DeniedStats::default(),
                upstreams: entries
                    .into_iter()
                    .map(|entry| {
                        let upstream = &target.group.upstreams[entry.upstream];
                        let address = entry.backend.map(|(at, _)| at.ip());
                        backends.push(entry.backend);
                        extras.push(entry.extras);
                        UpstreamStats {
                            established_connections: entry.established,
                            probe_latency_seconds: entry.latency.map(ctl::Latency),
                            name: upstream.name.clone(),
                            host: upstream.host.to_string(),
                            address: address.map(|a| a.to_string()),
                            family: address.map(|a| Family::of(a).as_str().to_owned()),
                            port: upstream.port,
                            available: entry.available,
                            connections: 0,
                            resets: 0,
                            packets_out: 0,
                            bytes_out: 0,
                            packets_in: 0,
                            bytes_in: 0,
                            admin_state: entry.admin_state,
                            weight: entry.weight,
                        }
                    })
                    .collect(),
            })
            .collect();
        (StatsReport { targets }, backends, extras)
    }
}

/// `report` with the counters of upstreams (from the eBPF maps, on a
/// blocking thread) and of the policies' refusals.
async fn read_counters<P: DataPlane>(
    report: StatsReport,
    backends: Vec<Option<Backend>>,
    policies: bool,
    plane: Arc<P>,
) -> StatsReport {
    // Listing the table costs an nft run: only when a policy counts.
    let denied = if policies {
        plane.read_denied().await
    } else {
        BTreeMap::new()
    };
    let mut report = tokio::task::spawn_blocking(move || with_counters(report, &backends, &*plane))
        .await
        .expect("reading counters does not panic");
    for target in &mut report.targets {
        let count = |reason| {
            denied
                .get(&crate::nft::denied_counter(&target.name, reason))
                .copied()
                .unwrap_or(0)
        };
        target.denied.blocked = count(crate::nft::Denied::Blocked);
        target.denied.not_allowed = count(crate::nft::Denied::NotAllowed);
        target.denied.rate_limited = count(crate::nft::Denied::RateLimited);
        target.denied.connection_limited = count(crate::nft::Denied::ConnectionLimited);
    }
    report
}

/// `report` with the counters the data plane reads now.
fn with_counters<P: DataPlane>(
    mut report: StatsReport,
    backends: &[Option<Backend>],
    plane: &P,
) -> StatsReport {
    let counters = plane.read_counters();
    let upstreams = report.targets.iter_mut().flat_map(|t| &mut t.upstreams);
    for (upstream, backend) in upstreams.zip(backends) {
        if let Some(c) = backend.and_then(|b| counters.get(&b)) {
            upstream.connections = c.connections;
            upstream.resets = c.resets;
            upstream.packets_out = c.packets_out;
            upstream.bytes_out = c.bytes_out;
            upstream.packets_in = c.packets_in;
            upstream.bytes_in = c.bytes_in;
        }
    }
    report
}

fn add_counts(totals: &mut BTreeMap<String, u64>, stats: &DnsStats) {
    for (result, count) in stats.counts() {
        *totals.entry(result.to_owned()).or_insert(0) += count;
    }
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const IPV6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// Whether the host forwards IPv6; a host without IPv6 does not.
fn ipv6_forwarding() -> bool {
    std::fs::read_to_string(IPV6_FORWARD).is_ok_and(|v| v.trim() == "1")
}

/// DNAT to other hosts forwards packets: without forwarding they are
/// dropped silently.
fn enable_forwarding() -> std::io::Result<()> {
    if std::fs::read_to_string(IP_FORWARD)?.trim() == "1" {
        return Ok(());
    }
    std::fs::write(IP_FORWARD, "1")?;
    info!("IPv4 forwarding was off; turned it on (net.ipv4.ip_forward=1)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Targets and upstreams whose configuration order is not their
    /// names' order, and a target whose name starts another's: each
    /// entry's checker figures land on that entry of the report.
    #[test]
    fn held_stats_carry_each_entrys_checker_figures_in_report_order() {
        let upstreams = |first: u8| {
            format!(
                "[{{ name: b, host: 198.18.1.{first}, port: 9000 }}, {{ name: a, host: 198.18.1.{}, port: 9000 }}]",
                first + 1
            )
        };
        let target = |name: &str, port: u16, first: u8| {
            format!(
                "      - {{ name: {name}, protocol: tcp, port: {port}, upstream_group: {{ name: {name}-pool, distribution: round-robin, upstreams: {} }} }}\n",
                upstreams(first)
            )
        };
        let text = format!(
            "lb:\n  - engine: nftables\n    targets:\n{}{}",
            target("web2", 8082, 21),
            target("web", 8081, 11)
        );
        let parsed = Parsed::parse(text, Path::new("lobby.yaml")).unwrap();
        let mut core = Core::new(None, false);
        core.on(
            Event::ConfigLoaded {
                config: parsed.config().clone(),
                read: 0,
            },
            Instant::now(),
        );
        // A checker per entry, its successes telling which it is.
        let mut checkers = BTreeMap::new();
        let mut expected = Vec::new();
        for target in &parsed.config().targets {
            for entry in entries(&core, target) {
                let (key, held) = entry.held.expect("an IP host is held at once");
                let IpAddr::V4(v4) = held.address else {
                    panic!("an IPv4 upstream")
                };
                let successes = u64::from(v4.octets()[3]);
                let stats = Arc::new(ProbeStats::default());
                stats
                    .successes
                    .store(successes, std::sync::atomic::Ordering::Relaxed);
                let id = UpstreamId::new(target.name.as_str(), entry.upstream.name.as_str());
                let checker = Checker {
                    cancel: CancellationToken::new(),
                    address: watch::channel(Some(held.address)).0,
                    stats,
                };
                checkers.insert((id, key), checker);
                expected.push((held.address.to_string(), successes));
            }
        }
        let (report, _, extras) = HeldStats::of(&core, &checkers).report();
        let reported: Vec<(String, u64)> = report
            .targets
            .iter()
            .flat_map(|t| &t.upstreams)
            .zip(&extras)
            .map(|(u, e)| (u.address.clone().unwrap(), e.health_successes))
            .collect();
        assert_eq!(reported, expected);
        assert_eq!(reported[0], ("198.18.1.21".to_owned(), 21));
        assert_eq!(extras.len(), 4);
    }
}
