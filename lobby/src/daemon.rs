//! The control loop: keeps the kernel's ruleset and counters equal to what
//! the configuration, the health checks and DNS say, until shut down.
//!
//! One task owns all state. Health checkers, resolvers, the config watcher
//! and the control socket talk to it over channels; every change ends in
//! [`Daemon::reconcile`], which applies the difference in one nftables
//! transaction.
use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use lobby_common::UpstreamCounters;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
    time::{Instant, MissedTickBehavior, sleep_until},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    config::{self, Config, DnsConfig, HealthCheck, Host, Protocol},
    ctl::{self, CtlError, StatsReport, TargetStats, UpstreamStats},
    dns::{self, AddressUpdate, DnsStats, ResolverKey},
    ebpf::{self, Counters, CountersError},
    health::{self, HealthReport, ProbeStats},
    metrics::{self, Histogram, MetricsError, Snapshot, UpstreamExtras},
    model::{self, Backend, Desired, UpstreamId, UpstreamState},
    nft::{self, Applied, NftError},
    systemd,
    watch::{self as config_watch, DEBOUNCE},
};

/// How often routes to the upstreams are looked up again, so that counters
/// follow an upstream whose route moved to another interface.
const ROUTE_RECHECK: Duration = Duration::from_secs(5);
/// How often counters are compared to catch an available upstream that
/// answers new connections with resets.
const RESET_CHECK: Duration = Duration::from_secs(2);
/// How soon a failed apply is tried again.
const APPLY_RETRY: Duration = Duration::from_secs(1);
/// How long a takeover waits for host names to resolve before applying.
const TAKEOVER_DNS_WAIT: Duration = Duration::from_secs(3);
/// How long shutdown waits for the daemon's tasks.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the daemon needs from its caller.
#[derive(Clone, Debug)]
pub struct Options {
    pub config_path: PathBuf,
    pub pin_dir: PathBuf,
    pub socket_path: PathBuf,
    /// How often each upstream's traffic since the last line is logged;
    /// `None`: never.
    pub traffic_log_interval: Option<Duration>,
    /// Load the eBPF counters; without them stats show zeros.
    pub counters: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] config::ConfigErrors),
    #[error(transparent)]
    Counters(#[from] CountersError),
    #[error(transparent)]
    Control(#[from] CtlError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("applying the first ruleset")]
    FirstApply(#[source] NftError),
    #[error("enabling IPv4 forwarding (net.ipv4.ip_forward)")]
    Forwarding(#[source] std::io::Error),
    #[error("installing the SIGHUP handler")]
    Signal(#[source] std::io::Error),
}

/// Runs the daemon until `shutdown` completes, then removes the ruleset and
/// the counters. `ready` is called once the first ruleset is applied.
pub async fn run(
    options: Options,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(),
) -> Result<(), DaemonError> {
    let config_text = config::read(&options.config_path)?;
    let config = config::parse(&config_text, &options.config_path)?;
    enable_forwarding().map_err(DaemonError::Forwarding)?;
    match health::raise_fd_limit() {
        Ok(limit) => info!(limit, "open file limit"),
        Err(e) => warn!(error = %e, "probes of many upstreams may run out of file descriptors"),
    }
    let counters = if options.counters {
        Some(Counters::load(&options.pin_dir)?)
    } else {
        info!("counters are off (--no-counters)");
        None
    };
    let listener = ctl::bind(&options.socket_path).await?;
    let metrics_listener = match &config.metrics {
        Some(m) => Some(metrics::bind(m.listen).await?),
        None => None,
    };
    let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::Signal)?;

    let (channels, mut inbox) = channels();
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
    let mut daemon = Daemon {
        config: Config {
            targets: Vec::new(),
            metrics: None,
        },
        config_text,
        upstreams: BTreeMap::new(),
        resolvers: BTreeMap::new(),
        applied: None,
        lingering: BTreeMap::new(),
        inherited: nft::Rotation::new(),
        table_may_exist: true,
        retired_dns: BTreeMap::new(),
        counters,
        traffic_seen: BTreeMap::new(),
        resets_seen: BTreeMap::new(),
        reloads: ReloadCounts::default(),
        apply_duration: Histogram::default(),
        channels,
        tracker: tracker.clone(),
        cancel: cancel.clone(),
    };
    // A table left by a crashed run still balances: what it sends traffic
    // to is the best knowledge of which upstreams are up.
    let takeover = match nft::existing_rotation().await {
        Ok(rotation) => {
            daemon.table_may_exist = rotation.is_some();
            rotation
        }
        Err(e) => {
            warn!(error = %e, "reading the ruleset of a previous run; upstreams start as configured");
            None
        }
    };
    if let Some(rotation) = takeover {
        info!(
            table = nft::TABLE,
            "taking over the ruleset of a previous run"
        );
        daemon.inherited = rotation;
    }
    daemon.adopt(config);
    if !daemon.inherited.is_empty() {
        daemon.await_first_resolutions(&mut inbox.addresses).await;
    }
    daemon.reconcile().await.map_err(DaemonError::FirstApply)?;
    daemon.inherited.clear();
    tracker.spawn(ctl::serve(
        listener,
        options.socket_path.clone(),
        inbox.ctl_tx.clone(),
        cancel.child_token(),
    ));
    if let Some(listener) = metrics_listener {
        // The address is taken at start: changing it needs a restart.
        tracker.spawn(metrics::serve(
            listener,
            inbox.ctl_tx.clone(),
            cancel.child_token(),
        ));
    }
    info!(
        config = %options.config_path.display(),
        targets = daemon.config.targets.len(),
        upstreams = daemon.upstreams.len(),
        "lobby is balancing"
    );
    ready();
    systemd::ready();

    let mut route_recheck = tokio::time::interval_at(Instant::now() + ROUTE_RECHECK, ROUTE_RECHECK);
    route_recheck.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut reset_check = tokio::time::interval_at(Instant::now() + RESET_CHECK, RESET_CHECK);
    reset_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let traffic_period = options
        .traffic_log_interval
        .unwrap_or(Duration::from_secs(3600));
    let mut traffic_log = tokio::time::interval_at(Instant::now() + traffic_period, traffic_period);
    traffic_log.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut reload_at: Option<Instant> = None;
    // A reload read and adopted, to be reported once applied.
    let mut reloaded: Option<ReloadSummary> = None;
    let mut signalled_reload = false;
    let mut retry_at: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let mut changed = false;
        tokio::select! {
            () = &mut shutdown => break,
            Some(report) = inbox.reports.recv() => {
                changed |= daemon.on_health(report);
                // Probes that finished together land in one transaction.
                while let Ok(report) = inbox.reports.try_recv() {
                    changed |= daemon.on_health(report);
                }
            }
            Some(update) = inbox.addresses.recv() => changed |= daemon.on_address(update),
            Some(request) = inbox.ctl.recv() => daemon.answer(request),
            _ = hangup.recv() => {
                info!("SIGHUP received, reloading {}", options.config_path.display());
                systemd::reloading();
                signalled_reload = true;
                if let Some(summary) = daemon.reload(&options.config_path, true) {
                    reloaded = Some(summary);
                    changed = true;
                }
            }
            Some(()) = changed_rx.recv() => reload_at = Some(Instant::now() + DEBOUNCE),
            () = sleep_until(reload_at.unwrap_or_else(Instant::now)), if reload_at.is_some() => {
                reload_at = None;
                if let Some(summary) = daemon.reload(&options.config_path, false) {
                    reloaded = Some(summary);
                    changed = true;
                }
            }
            () = sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                retry_at = None;
                changed = true;
            }
            () = sleep_until(daemon.linger_deadline().unwrap_or_else(Instant::now)), if daemon.linger_deadline().is_some() => {
                changed = true;
            }
            _ = route_recheck.tick() => daemon.sync_counters().await,
            _ = reset_check.tick() => daemon.warn_about_resets(),
            _ = traffic_log.tick(), if options.traffic_log_interval.is_some() => daemon.log_traffic(),
        }
        if changed {
            match daemon.reconcile().await {
                // Said once the kernel has it, not when the file was read.
                Ok(()) => {
                    if let Some(summary) = reloaded.take() {
                        info!("reload applied: {summary}");
                    }
                }
                Err(e) => {
                    error!(error = %e, "applying the ruleset failed; the previous one stays, retrying in {APPLY_RETRY:?}");
                    retry_at = Some(Instant::now() + APPLY_RETRY);
                }
            }
        }
        if std::mem::take(&mut signalled_reload) {
            systemd::ready();
        }
    }
    systemd::stopping();
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not stop within {SHUTDOWN_GRACE:?}");
    }
    daemon.shut_down().await;
    Ok(())
}

/// Senders the daemon hands to its tasks.
struct Channels {
    reports: mpsc::Sender<HealthReport>,
    addresses: mpsc::Sender<AddressUpdate>,
}

struct Inbox {
    reports: mpsc::Receiver<HealthReport>,
    addresses: mpsc::Receiver<AddressUpdate>,
    ctl: mpsc::Receiver<ctl::Request>,
    ctl_tx: mpsc::Sender<ctl::Request>,
}

fn channels() -> (Channels, Inbox) {
    let (reports_tx, reports) = mpsc::channel(4096);
    let (addresses_tx, addresses) = mpsc::channel(1024);
    let (ctl_tx, ctl) = mpsc::channel(64);
    (
        Channels {
            reports: reports_tx,
            addresses: addresses_tx,
        },
        Inbox {
            reports,
            addresses,
            ctl,
            ctl_tx,
        },
    )
}

/// What decides whether an upstream survives a reload as it is: any change
/// makes it a new upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
struct UpstreamSpec {
    protocol: Protocol,
    host: Host,
    port: u16,
    health_check: Option<HealthCheck>,
    dns: Option<DnsConfig>,
}

impl UpstreamSpec {
    fn resolver_key(&self) -> Option<ResolverKey> {
        match &self.host {
            Host::Fqdn(name) => Some(ResolverKey::new(name, self.dns.as_ref())),
            Host::Ip(_) => None,
        }
    }
}

struct UpstreamRuntime {
    spec: UpstreamSpec,
    state: UpstreamState,
    /// Tells the health checker where to probe.
    address_tx: watch::Sender<Option<Ipv4Addr>>,
    checker: Option<CancellationToken>,
    probe_stats: Arc<ProbeStats>,
    state_changes: u64,
}

struct ResolverRuntime {
    address: Option<Ipv4Addr>,
    cancel: CancellationToken,
    stats: Arc<DnsStats>,
}

struct Daemon {
    config: Config,
    /// The text `config` was parsed from: a change notice with the same
    /// text is not a reload.
    config_text: String,
    upstreams: BTreeMap<UpstreamId, UpstreamRuntime>,
    resolvers: BTreeMap<ResolverKey, ResolverRuntime>,
    /// What the kernel holds; `None` until the first successful apply, or
    /// after a failed one (the next apply then replaces the table whole).
    applied: Option<Desired>,
    /// Backends out of rotation still masqueraded, until when.
    lingering: BTreeMap<Backend, Instant>,
    /// At a takeover, until the first apply: what the previous run's table
    /// balanced to; those upstreams start available.
    inherited: nft::Rotation,
    /// Whether a table of Lobby's may be in the kernel when `applied` is
    /// `None`; creating one is cheaper than replacing one.
    table_may_exist: bool,
    /// Queries of resolvers a reload retired, so that the totals never
    /// go back.
    retired_dns: BTreeMap<String, u64>,
    counters: Option<Counters>,
    /// Counters as of the last traffic line, per upstream and key.
    traffic_seen: BTreeMap<UpstreamId, (SocketAddrV4, UpstreamCounters)>,
    /// Counters as of the last reset check.
    resets_seen: BTreeMap<UpstreamId, (SocketAddrV4, UpstreamCounters)>,
    reloads: ReloadCounts,
    apply_duration: Histogram,
    channels: Channels,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

#[derive(Debug)]
struct ReloadCounts {
    succeeded: u64,
    failed: u64,
    last_successful: bool,
}

impl Default for ReloadCounts {
    fn default() -> Self {
        Self {
            succeeded: 0,
            failed: 0,
            // The running configuration was valid.
            last_successful: true,
        }
    }
}

/// What a reload changed, for its summary line.
#[derive(Debug, Default)]
struct ReloadSummary {
    targets: [usize; 3],
    upstreams: [usize; 3],
}

const ADDED: usize = 0;
const REMOVED: usize = 1;
const CHANGED: usize = 2;

impl std::fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (what, counts) in [("target", self.targets), ("upstream", self.upstreams)] {
            for (sign, n) in [
                ("+", counts[ADDED]),
                ("-", counts[REMOVED]),
                ("~", counts[CHANGED]),
            ] {
                if n > 0 {
                    parts.push(format!("{sign}{n} {what}{}", if n == 1 { "" } else { "s" }));
                }
            }
        }
        if parts.is_empty() {
            f.write_str("no change")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

impl Daemon {
    /// Makes `config` the running configuration: upstreams whose spec is
    /// unchanged keep their runtime (health state, address, checker), the
    /// others start afresh; resolvers follow the names still in use.
    fn adopt(&mut self, config: Config) -> ReloadSummary {
        let mut summary = ReloadSummary::default();
        // At start everything is new: only a reload's changes are news.
        let starting = self.upstreams.is_empty() && self.config.targets.is_empty();
        let old_targets: BTreeMap<&str, &config::Target> = self
            .config
            .targets
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let new_names: BTreeSet<&str> = config.targets.iter().map(|t| t.name.as_str()).collect();
        for target in &config.targets {
            match old_targets.get(target.name.as_str()) {
                None => {
                    summary.targets[ADDED] += 1;
                    if !starting {
                        info!(target = %target.name, "reload: target {} added", target.name);
                    }
                }
                Some(old)
                    if old.port != target.port
                        || old.ip != target.ip
                        || old.protocol != target.protocol =>
                {
                    summary.targets[CHANGED] += 1;
                    info!(target = %target.name, "reload: target {} changed", target.name);
                }
                Some(_) => {}
            }
        }
        for name in old_targets.keys().filter(|n| !new_names.contains(*n)) {
            summary.targets[REMOVED] += 1;
            info!(target = %name, "reload: target {name} removed");
        }

        let mut next: BTreeMap<UpstreamId, UpstreamSpec> = BTreeMap::new();
        for target in &config.targets {
            for upstream in &target.group.upstreams {
                let spec = UpstreamSpec {
                    protocol: target.protocol,
                    host: upstream.host.clone(),
                    port: upstream.port,
                    health_check: upstream.health_check.clone(),
                    dns: upstream.dns.clone(),
                };
                next.insert(UpstreamId::new(&target.name, &upstream.name), spec);
            }
        }
        let gone: Vec<UpstreamId> = self
            .upstreams
            .keys()
            .filter(|id| !next.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.retire(&id);
            summary.upstreams[REMOVED] += 1;
            info!(upstream = %id, "reload: upstream {id} removed; its connections drain");
        }
        // Resolvers first, so that new upstreams of a known name start with
        // its address.
        let keys: BTreeSet<ResolverKey> = next
            .values()
            .filter_map(UpstreamSpec::resolver_key)
            .collect();
        let retired = &mut self.retired_dns;
        self.resolvers.retain(|key, resolver| {
            let keep = keys.contains(key);
            if !keep {
                resolver.cancel.cancel();
                add_counts(retired, &resolver.stats);
            }
            keep
        });
        for key in keys {
            if !self.resolvers.contains_key(&key) {
                let stats = Arc::new(DnsStats::default());
                let cancel = self.cancel.child_token();
                dns::spawn_resolver(
                    key.clone(),
                    self.channels.addresses.clone(),
                    stats.clone(),
                    cancel.clone(),
                    &self.tracker,
                );
                self.resolvers.insert(
                    key,
                    ResolverRuntime {
                        address: None,
                        cancel,
                        stats,
                    },
                );
            }
        }
        for (id, spec) in next {
            match self.upstreams.get(&id) {
                Some(runtime) if runtime.spec == spec => continue,
                Some(_) => {
                    self.retire(&id);
                    summary.upstreams[CHANGED] += 1;
                    info!(upstream = %id, "reload: upstream {id} changed");
                }
                None => {
                    summary.upstreams[ADDED] += 1;
                    if !starting {
                        info!(upstream = %id, "reload: upstream {id} added");
                    }
                }
            }
            let runtime = self.start_upstream(&id, spec);
            self.upstreams.insert(id, runtime);
        }
        self.config = config;
        summary
    }

    fn start_upstream(&self, id: &UpstreamId, spec: UpstreamSpec) -> UpstreamRuntime {
        let start = UpstreamState::at_start(&spec.host, spec.health_check.as_ref());
        let address = start.address.or_else(|| {
            let key = spec.resolver_key()?;
            self.resolvers.get(&key)?.address
        });
        let available = start.available
            || address.is_some_and(|a| self.was_balanced(id, SocketAddrV4::new(a, spec.port)));
        let (address_tx, address_rx) = watch::channel(address);
        let mut runtime = UpstreamRuntime {
            spec,
            state: UpstreamState { address, available },
            address_tx,
            checker: None,
            probe_stats: Arc::new(ProbeStats::default()),
            state_changes: 0,
        };
        self.start_checker(id, &mut runtime, address_rx);
        runtime
    }

    /// (Re)starts the health checker of an upstream from its current state.
    fn start_checker(
        &self,
        id: &UpstreamId,
        runtime: &mut UpstreamRuntime,
        address: watch::Receiver<Option<Ipv4Addr>>,
    ) {
        if let Some(previous) = runtime.checker.take() {
            previous.cancel();
        }
        runtime.checker = runtime.spec.health_check.clone().map(|check| {
            let cancel = self.cancel.child_token();
            health::spawn_checker(
                id.clone(),
                check,
                runtime.state.available,
                address,
                self.channels.reports.clone(),
                runtime.probe_stats.clone(),
                cancel.clone(),
                &self.tracker,
            );
            cancel
        });
    }

    /// Whether the table taken over sent connections of `id`'s target to
    /// `upstream`.
    fn was_balanced(&self, id: &UpstreamId, upstream: SocketAddrV4) -> bool {
        self.inherited
            .get(&nft::chain_name(&id.target))
            .is_some_and(|s| s.contains(&upstream))
    }

    /// At a takeover, lets host names resolve before the first apply (the
    /// old ruleset balances meanwhile), so that their upstreams are not
    /// dropped from rotation for the moment DNS takes.
    async fn await_first_resolutions(&mut self, addresses: &mut mpsc::Receiver<AddressUpdate>) {
        let deadline = Instant::now() + TAKEOVER_DNS_WAIT;
        while self.resolvers.values().any(|r| r.address.is_none()) {
            match tokio::time::timeout_at(deadline, addresses.recv()).await {
                Ok(Some(update)) => {
                    self.on_address(update);
                }
                _ => break,
            }
        }
    }

    fn retire(&mut self, id: &UpstreamId) {
        if let Some(runtime) = self.upstreams.remove(id)
            && let Some(checker) = runtime.checker
        {
            checker.cancel();
        }
        self.traffic_seen.remove(id);
        self.resets_seen.remove(id);
    }

    /// Reads the file again and adopts it if valid and (unless `forced`)
    /// different; an invalid file changes nothing. Returns whether the
    /// desired state may have changed.
    fn reload(&mut self, path: &std::path::Path, forced: bool) -> Option<ReloadSummary> {
        let text = match config::read(path) {
            Ok(text) => text,
            Err(errors) => {
                error!("reload failed, the running configuration stays:\n{errors}");
                self.reloads.failed += 1;
                self.reloads.last_successful = false;
                return None;
            }
        };
        if !forced && text == self.config_text {
            return None;
        }
        match config::parse(&text, path) {
            Ok(config) => {
                self.config_text = text;
                let summary = self.adopt(config);
                self.reloads.succeeded += 1;
                self.reloads.last_successful = true;
                Some(summary)
            }
            Err(errors) => {
                error!("reload failed, the running configuration stays:\n{errors}");
                self.reloads.failed += 1;
                self.reloads.last_successful = false;
                None
            }
        }
    }

    fn on_health(&mut self, report: HealthReport) -> bool {
        let Some(runtime) = self.upstreams.get_mut(&report.id) else {
            return false; // a checker of an upstream removed by a reload
        };
        if runtime.state.available == report.available {
            return false;
        }
        runtime.state.available = report.available;
        runtime.state_changes += 1;
        let (available, total) = self.availability(&report.id.target);
        info!(upstream = %report.id, available = report.available, "{report}; {available} of {total} available");
        true
    }

    fn availability(&self, target: &str) -> (usize, usize) {
        let states = self
            .upstreams
            .iter()
            .filter(|(id, _)| id.target == target)
            .map(|(_, r)| r.state);
        states.fold((0, 0), |(up, all), s| {
            (
                up + usize::from(s.available && s.address.is_some()),
                all + 1,
            )
        })
    }

    fn on_address(&mut self, update: AddressUpdate) -> bool {
        let Some(resolver) = self.resolvers.get_mut(&update.key) else {
            return false; // a resolver retired by a reload
        };
        resolver.address = Some(update.address);
        let mut changed = false;
        for (id, runtime) in &mut self.upstreams {
            if runtime.spec.resolver_key().as_ref() != Some(&update.key)
                || runtime.state.address == Some(update.address)
            {
                continue;
            }
            match runtime.state.address {
                Some(old) => {
                    info!(upstream = %id, "upstream {id} moved from {old} to {}", update.address)
                }
                None => info!(upstream = %id, "upstream {id} resolved to {}", update.address),
            }
            runtime.state.address = Some(update.address);
            runtime.address_tx.send_replace(Some(update.address));
            changed = true;
        }
        self.inherit_resolved();
        changed
    }

    /// At a takeover, an upstream whose name resolved to an address the old
    /// table balanced to is available, and its checker starts from there.
    fn inherit_resolved(&mut self) {
        if self.inherited.is_empty() {
            return;
        }
        let mut runtimes = std::mem::take(&mut self.upstreams);
        for (id, runtime) in &mut runtimes {
            let Some(address) = runtime.state.address else {
                continue;
            };
            if !runtime.state.available
                && self.was_balanced(id, SocketAddrV4::new(address, runtime.spec.port))
            {
                runtime.state.available = true;
                let address_rx = runtime.address_tx.subscribe();
                self.start_checker(id, runtime, address_rx);
            }
        }
        self.upstreams = runtimes;
    }

    /// Applies the desired ruleset if it differs from the applied one, then
    /// brings the counters in line.
    async fn reconcile(&mut self) -> Result<(), NftError> {
        let states: BTreeMap<UpstreamId, UpstreamState> = self
            .upstreams
            .iter()
            .map(|(id, r)| (id.clone(), r.state))
            .collect();
        let mut desired = Desired::from_config(&self.config, &states);
        let masqueraded = self
            .applied
            .as_ref()
            .map(Desired::backends)
            .unwrap_or_default();
        model::linger(
            &masqueraded,
            &desired.balanced(),
            &mut self.lingering,
            Instant::now(),
        );
        desired.lingering = self.lingering.keys().copied().collect();
        let applied = match &self.applied {
            Some(applied) => Applied::Known(applied),
            None if self.table_may_exist => Applied::Unknown,
            None => Applied::Nothing,
        };
        if let Some(script) = nft::plan(applied, &desired) {
            let started = Instant::now();
            // Even a rejected transaction leaves the table's content
            // unknown from here: the next apply replaces it whole.
            self.table_may_exist = true;
            if let Err(e) = nft::apply(&script).await {
                self.applied = None;
                return Err(e);
            }
            let elapsed = started.elapsed();
            self.apply_duration.observe(elapsed);
            info!(elapsed_ms = elapsed.as_millis() as u64, "ruleset applied");
            for (name, target) in &desired.targets {
                let was_empty = self
                    .applied
                    .as_ref()
                    .and_then(|a| a.targets.get(name))
                    .is_some_and(|t| t.upstreams.is_empty());
                if target.upstreams.is_empty() && !was_empty {
                    warn!(target = %name, "target {name} has no upstream available");
                }
            }
            self.applied = Some(desired);
        }
        self.sync_counters().await;
        Ok(())
    }

    /// When the next lingering backend is due to leave the masquerade set.
    fn linger_deadline(&self) -> Option<Instant> {
        self.lingering.values().min().copied()
    }

    /// Every configured upstream with a known address, with the key its
    /// traffic is counted under.
    fn counted(
        &self,
    ) -> impl Iterator<Item = (&UpstreamId, SocketAddrV4, lobby_common::UpstreamKey)> {
        self.upstreams.iter().filter_map(|(id, runtime)| {
            let socket = SocketAddrV4::new(runtime.state.address?, runtime.spec.port);
            Some((
                id,
                socket,
                ebpf::key_of(socket.into(), runtime.spec.protocol.number()),
            ))
        })
    }

    /// Counts every configured upstream with a known address, available or
    /// not (draining connections still flow), on the interfaces that route
    /// to them. Failures are logged: counting never stops balancing.
    async fn sync_counters(&mut self) {
        if self.counters.is_none() {
            return;
        }
        let keys: BTreeSet<_> = self.counted().map(|(_, _, key)| key).collect();
        let addresses: BTreeSet<IpAddr> = self
            .counted()
            .map(|(_, socket, _)| IpAddr::V4(*socket.ip()))
            .collect();
        let interfaces = ebpf::interfaces_toward(&addresses).await;
        let Some(counters) = self.counters.as_mut() else {
            return;
        };
        if let Err(e) = counters.track(&keys) {
            error!(error = %e, "updating the counter map");
        }
        match interfaces {
            Ok(interfaces) => {
                if let Err(e) = counters.attach_to(&interfaces) {
                    error!(error = %e, "attaching the counters");
                }
            }
            Err(e) => error!(error = %e, "finding the interfaces toward the upstreams"),
        }
    }

    /// The counters of every counted upstream, by upstream.
    fn read_counters(&self) -> BTreeMap<UpstreamId, (SocketAddrV4, UpstreamCounters)> {
        let Some(counters) = &self.counters else {
            return BTreeMap::new();
        };
        let all = match counters.read() {
            Ok(all) => all,
            Err(e) => {
                error!(error = %e, "reading the counters");
                return BTreeMap::new();
            }
        };
        self.counted()
            .map(|(id, socket, key)| {
                (
                    id.clone(),
                    (socket, all.get(&key).copied().unwrap_or_default()),
                )
            })
            .collect()
    }

    fn answer(&self, request: ctl::Request) {
        match request {
            ctl::Request::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            ctl::Request::Metrics(reply) => {
                let _ = reply.send(self.metrics());
            }
        }
    }

    fn metrics(&self) -> Snapshot {
        let extras = self
            .upstreams
            .iter()
            .map(|(id, runtime)| {
                let extras = UpstreamExtras {
                    health_successes: runtime
                        .probe_stats
                        .successes
                        .load(std::sync::atomic::Ordering::Relaxed),
                    health_failures: runtime
                        .probe_stats
                        .failures
                        .load(std::sync::atomic::Ordering::Relaxed),
                    state_changes: runtime.state_changes,
                };
                ((id.target.clone(), id.upstream.clone()), extras)
            })
            .collect();
        let mut dns_resolutions = self.retired_dns.clone();
        for resolver in self.resolvers.values() {
            add_counts(&mut dns_resolutions, &resolver.stats);
        }
        Snapshot {
            stats: self.stats(),
            extras,
            dns_resolutions,
            reloads_succeeded: self.reloads.succeeded,
            reloads_failed: self.reloads.failed,
            last_reload_successful: self.reloads.last_successful,
            apply_duration: self.apply_duration.clone(),
        }
    }

    fn stats(&self) -> StatsReport {
        let counters = self.read_counters();
        let targets = self
            .config
            .targets
            .iter()
            .map(|target| TargetStats {
                name: target.name.clone(),
                protocol: target.protocol.as_str().to_owned(),
                port: target.port,
                upstream_group: target.group.name.clone(),
                distribution: target.group.distribution.as_str().to_owned(),
                upstreams: target
                    .group
                    .upstreams
                    .iter()
                    .map(|upstream| {
                        let id = UpstreamId::new(&target.name, &upstream.name);
                        let state = self.upstreams.get(&id).map(|r| r.state);
                        let c = counters.get(&id).map(|(_, c)| *c).unwrap_or_default();
                        UpstreamStats {
                            name: upstream.name.clone(),
                            host: upstream.host.to_string(),
                            address: state.and_then(|s| s.address).map(|a| a.to_string()),
                            port: upstream.port,
                            available: state.is_some_and(|s| s.available && s.address.is_some()),
                            connections: c.connections,
                            resets: c.resets,
                            packets_out: c.packets_out,
                            bytes_out: c.bytes_out,
                            packets_in: c.packets_in,
                            bytes_in: c.bytes_in,
                        }
                    })
                    .collect(),
            })
            .collect();
        StatsReport { targets }
    }

    /// One line per upstream with what flowed since the previous line.
    fn log_traffic(&mut self) {
        let now = self.read_counters();
        for (id, (socket, counters)) in &now {
            let delta = since(&self.traffic_seen, id, *socket, counters);
            info!(
                upstream = %id,
                address = %socket,
                "upstream {id} traffic: {} connections, {} resets, {} packets / {} out, {} packets / {} in",
                delta.connections,
                delta.resets,
                delta.packets_out,
                ctl::human_bytes(delta.bytes_out as f64),
                delta.packets_in,
                ctl::human_bytes(delta.bytes_in as f64),
            );
        }
        self.traffic_seen = now;
    }

    /// Warns when an upstream that health checks call available refuses
    /// new connections: its service is down behind a live port, or the
    /// health check probes the wrong port.
    fn warn_about_resets(&mut self) {
        let now = self.read_counters();
        for (id, (socket, counters)) in &now {
            let delta = since(&self.resets_seen, id, *socket, counters);
            let available = self.upstreams.get(id).is_some_and(|r| r.state.available);
            if available && delta.resets > 0 && delta.connections > 0 {
                warn!(
                    upstream = %id,
                    address = %socket,
                    "upstream {id} is marked available but answers new connections with resets ({} resets to {} new connections in {RESET_CHECK:?})",
                    delta.resets,
                    delta.connections,
                );
            }
        }
        self.resets_seen = now;
    }

    async fn shut_down(self) {
        match nft::apply(&nft::teardown()).await {
            Ok(()) => info!(table = nft::TABLE, "ruleset removed"),
            Err(e) => error!(error = %e, "removing the ruleset"),
        }
        if let Some(counters) = self.counters {
            counters.remove();
        }
        info!("lobby stopped");
    }
}

fn add_counts(totals: &mut BTreeMap<String, u64>, stats: &DnsStats) {
    for (result, count) in stats.counts() {
        *totals.entry(result.to_owned()).or_insert(0) += count;
    }
}

/// What `counters` gained since `seen` recorded the same upstream at the
/// same address; all of it when it was not seen there.
fn since(
    seen: &BTreeMap<UpstreamId, (SocketAddrV4, UpstreamCounters)>,
    id: &UpstreamId,
    socket: SocketAddrV4,
    counters: &UpstreamCounters,
) -> UpstreamCounters {
    let before = seen
        .get(id)
        .filter(|(s, _)| *s == socket)
        .map(|(_, c)| *c)
        .unwrap_or_default();
    UpstreamCounters {
        connections: counters.connections.saturating_sub(before.connections),
        resets: counters.resets.saturating_sub(before.resets),
        packets_out: counters.packets_out.saturating_sub(before.packets_out),
        bytes_out: counters.bytes_out.saturating_sub(before.bytes_out),
        packets_in: counters.packets_in.saturating_sub(before.packets_in),
        bytes_in: counters.bytes_in.saturating_sub(before.bytes_in),
    }
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

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

    #[test]
    fn reload_summary_reads_like_the_spec() {
        let mut summary = ReloadSummary::default();
        assert_eq!(summary.to_string(), "no change");
        summary.upstreams[ADDED] = 1;
        summary.targets[REMOVED] = 1;
        assert_eq!(summary.to_string(), "-1 target, +1 upstream");
        summary.upstreams[CHANGED] = 2;
        assert_eq!(summary.to_string(), "-1 target, +1 upstream, ~2 upstreams");
    }

    #[test]
    fn deltas_restart_when_the_address_changes() {
        let id = UpstreamId::new("web", "web1");
        let a = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 11), 9000);
        let b = SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 12), 9000);
        let c = |connections| UpstreamCounters {
            connections,
            ..Default::default()
        };
        let seen = BTreeMap::from([(id.clone(), (a, c(5)))]);
        assert_eq!(since(&seen, &id, a, &c(8)).connections, 3);
        assert_eq!(since(&seen, &id, b, &c(2)).connections, 2);
    }
}
