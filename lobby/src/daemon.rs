//! The control loop: keeps the kernel's ruleset and counters equal to what
//! the configuration, the health checks and DNS say, until shut down.
use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::Ipv4Addr,
    path::PathBuf,
    time::Duration,
};

use tokio::time::{Instant, MissedTickBehavior};
use tracing::{error, info, warn};

use crate::{
    config::{self, Config, Host},
    ebpf::{self, Counters, CountersError},
    model::{Desired, UpstreamId, UpstreamState},
    nft::{self, NftError},
};

/// How often routes to the upstreams are looked up again, so that counters
/// follow an upstream whose route moved to another interface.
const ROUTE_RECHECK: Duration = Duration::from_secs(5);
/// How soon a failed apply is tried again.
const APPLY_RETRY: Duration = Duration::from_secs(1);

/// What the daemon needs from its caller.
#[derive(Clone, Debug)]
pub struct Options {
    pub config_path: PathBuf,
    pub pin_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] config::ConfigErrors),
    #[error(transparent)]
    Counters(#[from] CountersError),
    #[error("applying the first ruleset")]
    FirstApply(#[source] NftError),
    #[error("enabling IPv4 forwarding (net.ipv4.ip_forward)")]
    Forwarding(#[source] std::io::Error),
}

/// Runs the daemon until `shutdown` completes, then removes the ruleset and
/// the counters.
pub async fn run(options: Options, shutdown: impl Future<Output = ()>) -> Result<(), DaemonError> {
    let config = config::load(&options.config_path)?;
    enable_forwarding().map_err(DaemonError::Forwarding)?;
    let counters = Counters::load(&options.pin_dir)?;
    let mut daemon = Daemon::new(config, counters);
    if nft::table_exists().await.unwrap_or(false) {
        info!(
            table = nft::TABLE,
            "taking over the ruleset of a previous run"
        );
    }
    daemon.reconcile().await.map_err(DaemonError::FirstApply)?;
    info!(
        config = %options.config_path.display(),
        targets = daemon.config.targets.len(),
        "lobby is balancing"
    );

    let mut route_recheck = tokio::time::interval_at(Instant::now() + ROUTE_RECHECK, ROUTE_RECHECK);
    route_recheck.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = route_recheck.tick() => daemon.sync_counters().await,
        }
        if daemon.applied.is_none()
            && let Err(e) = daemon.reconcile().await
        {
            error!(error = %e, "applying the ruleset; retrying");
            tokio::time::sleep(APPLY_RETRY).await;
        }
    }
    daemon.shut_down().await;
    Ok(())
}

struct Daemon {
    config: Config,
    states: BTreeMap<UpstreamId, UpstreamState>,
    /// What the kernel holds; `None` until the first successful apply, or
    /// after a failed one (the next apply then replaces the table whole).
    applied: Option<Desired>,
    counters: Counters,
}

impl Daemon {
    fn new(config: Config, counters: Counters) -> Self {
        let states = initial_states(&config);
        Self {
            config,
            states,
            applied: None,
            counters,
        }
    }

    /// Applies the desired ruleset if it differs from the applied one, then
    /// brings the counters in line.
    async fn reconcile(&mut self) -> Result<(), NftError> {
        let desired = Desired::from_config(&self.config, &self.states);
        if let Some(script) = nft::plan(self.applied.as_ref(), &desired) {
            let started = Instant::now();
            if let Err(e) = nft::apply(&script).await {
                self.applied = None;
                return Err(e);
            }
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "ruleset applied"
            );
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

    /// Counts every configured upstream with a known address, available or
    /// not (draining connections still flow), on the interfaces that route
    /// to them. Failures are logged: counting never stops balancing.
    async fn sync_counters(&mut self) {
        let mut keys = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        for target in &self.config.targets {
            for upstream in &target.group.upstreams {
                let id = UpstreamId::new(&target.name, &upstream.name);
                if let Some(address) = self.states.get(&id).and_then(|s| s.address) {
                    addresses.insert(address);
                    let socket = std::net::SocketAddrV4::new(address, upstream.port);
                    keys.insert(ebpf::key_of(socket, target.protocol.number()));
                }
            }
        }
        if let Err(e) = self.counters.track(&keys) {
            error!(error = %e, "updating the counter map");
        }
        match ebpf::interfaces_toward(&addresses).await {
            Ok(interfaces) => {
                if let Err(e) = self.counters.attach_to(&interfaces) {
                    error!(error = %e, "attaching the counters");
                }
            }
            Err(e) => error!(error = %e, "finding the interfaces toward the upstreams"),
        }
    }

    async fn shut_down(self) {
        match nft::apply(&nft::teardown()).await {
            Ok(()) => info!(table = nft::TABLE, "ruleset removed"),
            Err(e) => error!(error = %e, "removing the ruleset"),
        }
        self.counters.remove();
        info!("lobby stopped");
    }
}

/// Static addresses are known at once; FQDNs wait for DNS. Health-checked
/// upstreams start as `start_available` says, the others are available.
fn initial_states(config: &Config) -> BTreeMap<UpstreamId, UpstreamState> {
    config
        .targets
        .iter()
        .flat_map(|target| {
            target.group.upstreams.iter().map(|upstream| {
                let address = match &upstream.host {
                    Host::Ip(ip) => Some(*ip),
                    Host::Fqdn(_) => None::<Ipv4Addr>,
                };
                let available = upstream
                    .health_check
                    .as_ref()
                    .is_none_or(|h| h.start_available);
                (
                    UpstreamId::new(&target.name, &upstream.name),
                    UpstreamState { address, available },
                )
            })
        })
        .collect()
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
