//! The reconcile core: every decision the daemon makes, and nothing else.
//!
//! No I/O, no clock, no tasks: [`Core::on`] takes one [`Event`] (a config
//! loaded, a health report, a DNS answer, an apply's outcome, a listing of
//! the table, a timer) with the time it happened, and returns the
//! [`Action`]s that follow (checkers and resolvers to start or stop,
//! notices to log); [`Core::settle`], called once a batch of events is in,
//! plans the one transaction that brings the kernel to the new state, so
//! that probes that finish together land in one transaction. The daemon's
//! loop turns channels into events and carries the actions out; tests drive
//! the core with event sequences and read its actions.
//!
//! The core owns what the kernel holds (`applied`), the backends that stay
//! masqueraded after leaving rotation, whether a table of Lobby's may exist,
//! the rotation of a table taken over from a dead run, and the fingerprint
//! that tells an outside change of the table from Lobby's own.
use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;
use tracing::{debug, info};

use crate::{
    accel::{self, DeviceQuery, Devices},
    config::{self, Config, DnsConfig, Family, HealthCheck, Host, Protocol},
    ctl::AdminState,
    dns::{self, AddressUpdate, ResolverKey},
    health::{HealthReport, ProbePorts},
    metrics::Histogram,
    model::{
        self, AddressState, Backend, BackendDelta, Desired, DesiredTarget, ProbeExemption,
        UpstreamId, UpstreamState,
    },
    nft::{self, Applied, Rotation},
};

mod selection;

pub use selection::{CHOICE_PERIOD, Measures};

/// How soon a failed apply is tried again.
pub const APPLY_RETRY: Duration = Duration::from_secs(1);
/// How long a takeover waits for host names to resolve before its first
/// apply; the old ruleset balances meanwhile.
pub const TAKEOVER_DNS_WAIT: Duration = Duration::from_secs(3);
/// Stale targets computed on several threads from this many on: a thread's
/// start costs tens of microseconds, a target of 10 upstreams ~10.
const SHARED_COMPUTE: usize = 64;
/// How many of a reload's lines about single targets and upstreams are
/// logged at info; the rest go to debug. A reload that changed each of
/// 1,000 targets wrote 2,000 lines, 9 ms of the core's time before its
/// apply; the reload's summary line counts them all.
const RELOAD_LINES: usize = 20;
/// After a listing, the next one Lobby's own change asks for waits this
/// many times as long as it took, when outside changes are heard of: the
/// listings then take at most a twentieth of a core. At 1,000 x 10 a
/// listing costs ~0.25 s of CPU and its apply 5 ms, and a dynamic
/// distribution may apply every second.
const LISTING_PAUSE: u32 = 19;

/// Counts a reload's lines about single targets and upstreams.
#[derive(Default)]
struct ReloadLines(usize);

impl ReloadLines {
    /// Whether the next line goes to info.
    fn loud(&mut self) -> bool {
        self.0 += 1;
        self.0 <= RELOAD_LINES
    }

    /// Says at info how many lines went to debug.
    fn finish(self) {
        if let Some(quiet) = self.0.checked_sub(RELOAD_LINES).filter(|n| *n > 0) {
            info!("reload: {quiet} more targets and upstreams changed (listed at debug level)");
        }
    }
}

/// A reload's line about a single target or upstream, at info while
/// [`ReloadLines`] allows.
macro_rules! reload_line {
    ($lines:expr, $($line:tt)+) => {
        if $lines.loud() {
            info!($($line)+)
        } else {
            debug!($($line)+)
        }
    };
}

/// Something that happened, as the core sees it.
#[derive(Debug)]
pub enum Event {
    /// A valid configuration was read: at start (read 0), or a reload.
    /// `read` numbers the daemon's reads of the file in the order they
    /// started, and comes back in the reload's notice
    /// ([`ReloadSummary::read`], [`Notice::ReloadFailed`]).
    ConfigLoaded {
        config: Config,
        read: u64,
    },
    /// A reload found the file invalid; `errors` says why.
    ConfigRejected {
        errors: String,
        read: u64,
    },
    Health(HealthReport),
    Address(AddressUpdate),
    /// The outcome of the last [`Action::Apply`].
    Applied(Result<Duration, String>),
    /// Something may have changed Lobby's table.
    TableMayHaveChanged(Outside),
    /// The listing asked for by [`Action::ListTable`] with that generation:
    /// the table's text, `None` when it does not exist, and how long it
    /// took.
    TableListed {
        generation: u64,
        listing: Result<Option<String>, String>,
        elapsed: Duration,
    },
    /// A deadline of [`Core::next_deadline`] passed.
    Tick,
    /// The interfaces the flowtable covers, looked up for the query of the
    /// last [`Action::WatchDevices`] (or of [`Core::device_query`]).
    Devices(Devices),
    /// What drives the dynamic distributions, measured by the daemon.
    Measured(Measures),
}

/// How the daemon came to think that Lobby's table may have changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outside {
    /// The kernel's notifications named the table: another process
    /// changed it.
    Changed,
    /// Notifications were lost, another commit came in during Lobby's own,
    /// or the periodic comparison is due (the notifications are not
    /// followed): the table may have changed.
    Possible,
}

/// What the loop must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run this nftables transaction and report [`Event::Applied`]. The
    /// core never asks for a second one before the first is reported.
    Apply(String),
    /// List Lobby's table and report [`Event::TableListed`].
    ListTable {
        generation: u64,
    },
    /// (Re)start the health checker of one address of an upstream: any
    /// previous one of the same upstream and key is stopped first.
    StartChecker {
        id: UpstreamId,
        key: AddressKey,
        check: HealthCheck,
        available: bool,
        address: IpAddr,
    },
    StopChecker {
        id: UpstreamId,
        key: AddressKey,
    },
    /// A checker probes this address from now on.
    SetProbeAddress {
        id: UpstreamId,
        key: AddressKey,
        address: IpAddr,
    },
    StartResolver(ResolverKey),
    StopResolver(ResolverKey),
    /// Count these upstreams too, and stop counting those: the change
    /// since the last `TrackCounters`.
    TrackCounters(BackendDelta),
    /// Look up the flowtable's interfaces for this query with the
    /// counters' interfaces, and report [`Event::Devices`]; `None`:
    /// acceleration is off.
    WatchDevices(Option<DeviceQuery>),
    /// Tell the operator (and later, event receivers).
    Notify(Notice),
    /// The first ruleset is in the kernel: the daemon is balancing.
    Ready,
    /// The first ruleset could not be applied: the daemon cannot start.
    Abort(String),
}

/// What an operator is told, one line each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A health report changed the availability of an upstream's address.
    UpstreamChanged {
        report: HealthReport,
        /// The upstream has several addresses: the line names the one.
        several: bool,
        available: usize,
        total: usize,
    },
    TargetEmpty {
        target: String,
    },
    TargetServing {
        target: String,
    },
    ReloadApplied(ReloadSummary),
    ReloadFailed {
        /// The read that found the file invalid.
        read: u64,
        errors: String,
    },
    ApplyFailed(String),
    /// Lobby's table was changed from outside; it is being restored.
    Drift {
        table: String,
        what: String,
    },
    /// These targets have IPv6 to balance, which the host does not forward.
    Ipv6ForwardingOff(Vec<String>),
}

impl Notice {
    /// Whether the line is a warning rather than information.
    pub fn is_warning(&self) -> bool {
        match self {
            Notice::UpstreamChanged { report, .. } => !report.available,
            Notice::TargetEmpty { .. }
            | Notice::ReloadFailed { .. }
            | Notice::ApplyFailed(_)
            | Notice::Drift { .. }
            | Notice::Ipv6ForwardingOff(_) => true,
            Notice::TargetServing { .. } | Notice::ReloadApplied(_) => false,
        }
    }
}

impl fmt::Display for Notice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Notice::UpstreamChanged {
                report,
                several,
                available,
                total,
            } => write!(
                f,
                "{}; {available} of {total} available",
                report.describe(*several)
            ),
            Notice::TargetEmpty { target } => {
                write!(f, "target {target} has no upstream available")
            }
            Notice::TargetServing { target } => {
                write!(f, "target {target} has an upstream available again")
            }
            Notice::ReloadApplied(summary) => write!(f, "reload applied: {summary}"),
            Notice::ReloadFailed { errors, .. } => {
                write!(
                    f,
                    "reload failed, the running configuration stays:\n{errors}"
                )
            }
            Notice::ApplyFailed(error) => write!(
                f,
                "applying the ruleset failed; the previous one stays, retrying in {APPLY_RETRY:?}: {error}"
            ),
            Notice::Ipv6ForwardingOff(targets) => write!(
                f,
                "IPv6 forwarding is off: the IPv6 traffic of target{} {} is not balanced; \
                 set net.ipv6.conf.all.forwarding=1 (and accept_ra=2 on interfaces that take \
                 their address from router advertisements)",
                if targets.len() == 1 { "" } else { "s" },
                targets.join(", ")
            ),
            Notice::Drift { table, what } => write!(
                f,
                "table {} {table} was changed outside Lobby ({what}); restoring it",
                nft::FAMILY
            ),
        }
    }
}

/// What a reload changed, for its summary line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    /// The newest read of the file the configuration comes from: a valid
    /// read not yet applied when a newer one came is applied with it.
    read: u64,
    targets: Changes,
    upstreams: Changes,
}

impl ReloadSummary {
    pub fn read(&self) -> u64 {
        self.read
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Changes {
    added: usize,
    removed: usize,
    changed: usize,
}

impl fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (what, counts) in [("target", self.targets), ("upstream", self.upstreams)] {
            for (sign, n) in [
                ("+", counts.added),
                ("-", counts.removed),
                ("~", counts.changed),
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

/// What decides whether an upstream survives a reload as it is: any change
/// makes it a new upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
struct UpstreamSpec {
    protocol: Protocol,
    host: Host,
    port: u16,
    health_check: Option<HealthCheck>,
    dns: Option<DnsConfig>,
    /// The one family its target serves (the family of the target's
    /// `ip`): addresses of the other serve no client.
    family: Option<Family>,
}

impl UpstreamSpec {
    fn resolver_key(&self) -> Option<ResolverKey> {
        match &self.host {
            Host::Fqdn(name) => Some(ResolverKey::new(name, self.dns.as_ref())),
            Host::Ip(_) => None,
        }
    }

    fn all_addresses(&self) -> bool {
        self.dns.as_ref().is_some_and(|d| d.all_addresses)
    }

    /// Which of its addresses `address` is.
    fn key(&self, address: IpAddr) -> AddressKey {
        if self.all_addresses() {
            AddressKey::Address(address)
        } else {
            AddressKey::Family(Family::of(address))
        }
    }
}

/// How the core tells an upstream's addresses apart from one answer to the
/// next: by family where it holds one of each (its address of a family
/// follows the answer and keeps its health, as one upstream that moved),
/// by address with `dns.all_addresses` (each a backend of its own, which
/// comes and goes with the answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressKey {
    Family(Family),
    Address(IpAddr),
}

/// One address of an upstream as the core holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldAddress {
    pub address: IpAddr,
    pub available: bool,
    /// How often its availability changed.
    pub state_changes: u64,
}

#[derive(Clone, Debug)]
struct Upstream {
    spec: UpstreamSpec,
    /// Its addresses (none while its name never resolved), IPv4 first.
    addresses: BTreeMap<AddressKey, HeldAddress>,
    /// The operator's say (`lobby ctl`), kept while the spec is unchanged.
    admin: AdminState,
}

impl Upstream {
    /// Each of its addresses as the backend it is counted under.
    fn backends(&self) -> impl Iterator<Item = Backend> + '_ {
        self.addresses.values().map(|a| {
            (
                SocketAddr::new(a.address, self.spec.port),
                self.spec.protocol,
            )
        })
    }

    /// What the desired state takes from it.
    fn state(&self) -> UpstreamState {
        let addresses = self
            .addresses
            .values()
            .map(|a| AddressState {
                address: a.address,
                available: a.available && self.admin != AdminState::Disabled,
            })
            .collect();
        UpstreamState {
            addresses,
            drained: self.admin == AdminState::Drained,
        }
    }
}

/// Reload outcomes, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReloadCounts {
    pub succeeded: u64,
    pub failed: u64,
    pub last_successful: bool,
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

/// Which targets' desired state may no longer be what `Core::computed`
/// holds.
#[derive(Debug, Default)]
struct Stale {
    targets: BTreeSet<String>,
}

impl Stale {
    fn target(&mut self, name: &str) {
        if !self.targets.contains(name) {
            self.targets.insert(name.to_owned());
        }
    }
}

/// When the oldest change of each kind waiting for the kernel was made.
#[derive(Clone, Copy, Debug, Default)]
struct Waiting {
    /// A health report, decided in its checker.
    report: Option<Instant>,
    /// A configuration, read and parsed.
    config: Option<Instant>,
}

impl Waiting {
    fn merge(self, other: Waiting) -> Waiting {
        Waiting {
            report: earliest(self.report, other.report),
            config: earliest(self.config, other.config),
        }
    }
}

/// The union of the backends each source (a target, an upstream) gives,
/// kept with each source's share and a count per backend, so that a
/// change is worked out from the sources it touched alone (at 10,000
/// upstreams, collecting every backend was most of a plan).
#[derive(Debug)]
struct Tally<K> {
    shares: BTreeMap<K, Vec<Backend>>,
    /// How many shares hold each backend of `union`.
    refs: BTreeMap<Backend, u32>,
    union: BTreeSet<Backend>,
}

impl<K> Default for Tally<K> {
    fn default() -> Self {
        Self {
            shares: BTreeMap::new(),
            refs: BTreeMap::new(),
            union: BTreeSet::new(),
        }
    }
}

impl<K: Ord> Tally<K> {
    /// Makes `share` the backends `source` gives (none: `None`), noting
    /// in `changes` what leaves or joins the union. Only what differs
    /// between the source's old and new share is counted again: a reload
    /// that changes every target keeps most of each one's backends, and
    /// 10,000 backends let go and taken again were a quarter of its plan.
    fn set(&mut self, source: K, mut share: Option<Vec<Backend>>, changes: &mut BackendDelta) {
        let old = self.shares.remove(&source).unwrap_or_default();
        // Shares are kept sorted, so the two are walked side by side.
        if let Some(share) = &mut share {
            share.sort_unstable();
        }
        let new = share.as_deref().unwrap_or_default();
        let (mut kept, mut taken) = (old.iter().peekable(), new.iter().peekable());
        loop {
            let order = match (kept.peek(), taken.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(left), Some(joined)) => left.cmp(joined),
            };
            match order {
                Ordering::Less => self.release(*kept.next().expect("peeked"), changes),
                Ordering::Greater => self.hold(*taken.next().expect("peeked"), changes),
                Ordering::Equal => {
                    kept.next();
                    taken.next();
                }
            }
        }
        if let Some(share) = share {
            self.shares.insert(source, share);
        }
    }

    fn release(&mut self, backend: Backend, changes: &mut BackendDelta) {
        let refs = self.refs.get_mut(&backend).expect("counted");
        *refs -= 1;
        if *refs == 0 {
            self.refs.remove(&backend);
            self.union.remove(&backend);
            changes.note_gone(backend);
        }
    }

    fn hold(&mut self, backend: Backend, changes: &mut BackendDelta) {
        *self.refs.entry(backend).or_default() += 1;
        if self.union.insert(backend) {
            changes.note_added(backend);
        }
    }
}

/// The targets of `new` that are not in `old` as they are, each with its
/// running version if it has one (touched), in `new`'s order, and the
/// names of `old`'s targets that `new` has not (removed). A target read
/// again only when its lines changed is the same `Arc`: at the same place
/// in both lists, it is left alone without looking names up (most of them,
/// at 1,000 targets); only the others are compared by name.
fn target_changes<'a>(
    old: &'a [Arc<config::Target>],
    new: &'a [Arc<config::Target>],
) -> (
    Vec<(&'a config::Target, Option<&'a config::Target>)>,
    Vec<&'a str>,
) {
    let moved = |list: &'a [Arc<config::Target>], other: &'a [Arc<config::Target>]| {
        list.iter()
            .enumerate()
            .filter(move |(i, t)| other.get(*i).is_none_or(|o| !Arc::ptr_eq(t, o)))
            .map(|(_, t)| (t.name.as_str(), &**t))
    };
    let old_by_name: BTreeMap<&str, &config::Target> = moved(old, new).collect();
    let new_names: BTreeSet<&str> = moved(new, old).map(|(name, _)| name).collect();
    // Any difference: a weight or a policy is a change too.
    let touched = moved(new, old)
        .filter_map(|(name, target)| match old_by_name.get(name) {
            Some(old) if *old == target => None,
            old => Some((target, old.copied())),
        })
        .collect();
    let removed = old_by_name
        .keys()
        .copied()
        .filter(|name| !new_names.contains(name))
        .collect();
    (touched, removed)
}

/// The backends a desired state's targets masquerade, worked out again
/// only for the targets that differ from the last state's.
#[derive(Debug, Default)]
struct Balanced {
    /// Each target as its share was worked out from.
    seen: BTreeMap<String, Arc<DesiredTarget>>,
    tally: Tally<String>,
}

impl Balanced {
    /// What `desired` masquerades.
    fn update(&mut self, desired: &Desired) -> &BTreeSet<Backend> {
        let changed: Vec<(String, Option<Arc<DesiredTarget>>)> =
            model::changed_targets(&self.seen, &desired.targets)
                .into_iter()
                .map(|(name, _, new)| (name.to_owned(), new.cloned()))
                .collect();
        for (name, target) in changed {
            self.tally.set(
                name.clone(),
                target.as_ref().map(|t| t.masqueraded()),
                &mut BackendDelta::default(),
            );
            match target {
                Some(target) => self.seen.insert(name, target),
                None => self.seen.remove(&name),
            };
        }
        #[cfg(debug_assertions)]
        assert_eq!(
            self.tally.union,
            desired.balanced(),
            "the balanced backends went stale"
        );
        &self.tally.union
    }
}

/// The transaction in the kernel's hands, if any.
#[derive(Debug)]
enum Flight {
    Idle,
    /// An apply was asked for; this becomes `applied` on success. With
    /// what it changes of the applied state's masqueraded backends, when
    /// it was planned as a change of one.
    Applying(Desired, Option<BackendDelta>),
}

/// What the core knows of the table's text, to tell outside changes.
#[derive(Debug, Default)]
struct Fingerprint {
    /// Bumped by every apply: a listing of an older generation may show a
    /// half-known table and is ignored.
    generation: u64,
    /// The table as listed after Lobby's last apply; `None` while that
    /// listing is owed.
    text: Option<String>,
    /// A listing is under way; `again`: another was asked for meanwhile.
    listing: bool,
    again: bool,
    /// Another process changed the table while the listing was owed: the
    /// listing cannot tell its change from Lobby's.
    doubted: bool,
    /// Outside changes are heard of as they happen, so that an owed
    /// listing may wait: without, one that waits would take an outside
    /// change made meanwhile for Lobby's.
    heard: bool,
    /// Until when an owed listing waits ([`LISTING_PAUSE`]).
    rested_at: Option<Instant>,
}

/// The daemon's whole decision state.
#[derive(Debug)]
pub struct Core {
    config: Option<Config>,
    upstreams: BTreeMap<UpstreamId, Upstream>,
    /// Each resolver in use, with the usable addresses of its last answer.
    resolvers: BTreeMap<ResolverKey, Option<Vec<IpAddr>>>,
    /// What the kernel holds; `None` before the first apply and after a
    /// failed one or an outside change (the next apply replaces the table
    /// whole).
    applied: Option<Desired>,
    /// What `applied` masquerades: kept rather than computed again from
    /// every target at each plan.
    applied_backends: BTreeSet<Backend>,
    /// What the last planned state's targets masquerade.
    balanced: Balanced,
    /// Whether a table of Lobby's may be in the kernel while `applied` is
    /// `None`: creating one is cheaper than replacing one.
    table_may_exist: bool,
    /// Backends out of rotation still masqueraded, until when.
    lingering: BTreeMap<Backend, Instant>,
    /// At a takeover, until the first apply: what the dead run's table
    /// balanced to. Those upstreams start available.
    inherited: Rotation,
    /// Until when the first apply of a takeover waits for names.
    resolving_until: Option<Instant>,
    flight: Flight,
    /// Something changed since the last plan.
    dirty: bool,
    /// Each target's desired state as last computed, before the dynamic
    /// distributions narrow it; only the targets in `stale` are computed
    /// again (at 1,000 targets a health report touches one).
    computed: BTreeMap<String, Arc<DesiredTarget>>,
    stale: Stale,
    /// The changes not yet planned, and those of the transaction in
    /// flight: how long each waited for the kernel, logged with each apply.
    unplanned: Waiting,
    applying: Waiting,
    retry_at: Option<Instant>,
    ready: bool,
    /// A reload adopted, to be reported once the kernel has it: first not
    /// yet planned, then in the transaction in flight (a reload that
    /// arrives during another apply waits for its own).
    reloaded: Option<ReloadSummary>,
    applying_reload: Option<ReloadSummary>,
    /// The operator's commands so far, by number, and the newest of them
    /// in the transaction in flight and in the kernel: a command is
    /// answered once the kernel has it.
    commands: u64,
    commands_applying: u64,
    commands_applied: u64,
    /// Every address of every upstream, as a backend: a change recounts
    /// only the upstreams it touched.
    counted: Tally<UpstreamId>,
    /// Upstreams whose addresses changed (or that went) since they were
    /// last counted.
    counted_stale: BTreeSet<UpstreamId>,
    /// The flowtable's device query is to be worked out again.
    devices_stale: bool,
    fingerprint: Fingerprint,
    reloads: ReloadCounts,
    apply_duration: Histogram,
    /// Whether the host forwards IPv6 (`net.ipv6.conf.all.forwarding`):
    /// Lobby never turns it on itself, and balances no IPv6 without it.
    ipv6_forwarding: bool,
    /// Where TCP probes take their local ports, if confined.
    probe_ports: Option<ProbePorts>,
    /// The query of the last [`Action::WatchDevices`].
    device_query: Option<DeviceQuery>,
    /// The flowtable's interfaces, once looked up.
    devices: Option<Devices>,
    /// The dynamic distributions' measures and choices.
    selection: selection::Selection,
}

impl Core {
    /// A core for a fresh start (`inherited` is `None`: no table of Lobby's
    /// exists) or a takeover of the table a dead run left, which balanced
    /// to `inherited`, on a host that forwards IPv6 or not.
    pub fn new(inherited: Option<Rotation>, ipv6_forwarding: bool) -> Self {
        Self {
            config: None,
            upstreams: BTreeMap::new(),
            resolvers: BTreeMap::new(),
            applied: None,
            applied_backends: BTreeSet::new(),
            balanced: Balanced::default(),
            table_may_exist: inherited.is_some(),
            lingering: BTreeMap::new(),
            inherited: inherited.unwrap_or_default(),
            resolving_until: None,
            flight: Flight::Idle,
            dirty: false,
            computed: BTreeMap::new(),
            stale: Stale::default(),
            unplanned: Waiting::default(),
            applying: Waiting::default(),
            retry_at: None,
            ready: false,
            reloaded: None,
            commands: 0,
            commands_applying: 0,
            commands_applied: 0,
            applying_reload: None,
            counted: Tally::default(),
            counted_stale: BTreeSet::new(),
            devices_stale: false,
            fingerprint: Fingerprint::default(),
            reloads: ReloadCounts::default(),
            apply_duration: Histogram::default(),
            ipv6_forwarding,
            probe_ports: None,
            device_query: None,
            devices: None,
            selection: selection::Selection::default(),
        }
    }

    /// The core of a daemon whose TCP probes take their local ports among
    /// `ports` (see [`crate::health::confine_probe_ports`]).
    pub fn with_probe_ports(self, ports: Option<ProbePorts>) -> Self {
        Self {
            probe_ports: ports,
            ..self
        }
    }

    /// Handles one event that happened at `now`; [`Core::settle`] plans
    /// what it changed.
    pub fn on(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::ConfigLoaded { config, read } => {
                match self.config.as_ref().and_then(|c| renamed(c, &config)) {
                    Some(errors) => return self.on(Event::ConfigRejected { errors, read }, now),
                    None => {
                        self.adopt(config, read, now, &mut actions);
                        self.unplanned.config = earliest(self.unplanned.config, Some(now));
                        self.dirty = true;
                    }
                }
            }
            Event::ConfigRejected { errors, read } => {
                self.reloads.failed += 1;
                self.reloads.last_successful = false;
                actions.push(Action::Notify(Notice::ReloadFailed { read, errors }));
            }
            Event::Health(report) => {
                let decided_at = report.decided_at;
                let target = report.id.target.clone();
                if self.on_health(report, &mut actions) {
                    self.stale.target(&target);
                    self.dirty = true;
                    self.unplanned.report = earliest(self.unplanned.report, Some(decided_at));
                }
            }
            Event::Address(update) => {
                self.dirty |= self.on_address(update, &mut actions);
            }
            Event::Applied(outcome) => self.on_applied(outcome, now, &mut actions),
            Event::TableMayHaveChanged(outside) => self.on_outside(outside, &mut actions),
            Event::TableListed {
                generation,
                listing,
                elapsed,
            } => {
                self.fingerprint.rested_at = Some(now + elapsed * LISTING_PAUSE);
                self.on_listing(generation, listing, now, &mut actions);
            }
            Event::Devices(devices) => {
                if self.devices.as_ref() != Some(&devices) {
                    let names: Vec<&str> = devices.names.iter().map(String::as_str).collect();
                    let names = names.join(", ");
                    if names.is_empty() {
                        info!("flowtable interfaces: none; no fast path until one appears");
                    } else {
                        info!(devices = %names, "flowtable interfaces: {names}");
                    }
                    self.devices = Some(devices);
                    self.dirty = true;
                }
            }
            Event::Measured(measures) => {
                match measures {
                    Measures::Established(counts) => self.selection.record_established(counts),
                    Measures::Latency(latency) => {
                        let by_backend = self.by_backend(latency);
                        self.selection.record_latency(by_backend);
                    }
                }
                self.dirty |= self.selection.reconsider();
            }
            Event::Tick => {
                if self.retry_at.is_some_and(|at| at <= now) {
                    self.retry_at = None;
                }
                if self.resolving_until.is_some_and(|at| at <= now) {
                    self.resolving_until = None;
                }
                self.list_owed(now, &mut actions);
                // A lingering backend may be due.
                self.dirty = true;
            }
        }
        actions
    }

    /// When the core wants an [`Event::Tick`]: a retry, a lingering backend
    /// leaving the masquerade set, or the end of a takeover's wait for DNS.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.retry_at,
            self.resolving_until,
            self.lingering.values().min().copied(),
            self.selection.next_deadline(),
            self.owed_listing_at(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether a transaction is on its way to the kernel, or a change
    /// waits to be planned (a retry or a takeover's wait for names
    /// excepted: they wait for time, not for the kernel).
    pub fn is_applying(&self) -> bool {
        matches!(self.flight, Flight::Applying(..))
            || (self.dirty && self.retry_at.is_none() && self.resolving_until.is_none())
    }

    /// The running configuration (`None` before the first).
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// Whether some target balances by `distribution`: the daemon measures
    /// what drives it only then.
    pub fn uses(&self, distribution: config::Distribution) -> bool {
        self.config
            .iter()
            .flat_map(|c| &c.targets)
            .any(|t| t.group.distribution == distribution)
    }

    /// The established connections last counted toward `backend`, `None`
    /// before the first count (made only while a target balances by
    /// `least-connections`).
    pub fn established(&self, backend: &Backend) -> Option<u64> {
        self.selection.established(backend)
    }

    /// Round trips of upstreams' addresses keyed by their target and the
    /// backend each address is now: every address has its own checker.
    fn by_backend(
        &self,
        latency: BTreeMap<(UpstreamId, AddressKey), Duration>,
    ) -> BTreeMap<(String, SocketAddr), Duration> {
        latency
            .into_iter()
            .filter_map(|((id, key), latency)| {
                let upstream = self.upstreams.get(&id)?;
                let held = upstream.addresses.get(&key)?;
                let backend = SocketAddr::new(held.address, upstream.spec.port);
                Some(((id.target, backend), latency))
            })
            .collect()
    }

    /// The addresses of an upstream with their health, IPv4 first; empty
    /// while its name never resolved.
    pub fn upstream(&self, id: &UpstreamId) -> Option<&BTreeMap<AddressKey, HeldAddress>> {
        self.upstreams.get(id).map(|u| &u.addresses)
    }

    /// Sets the operator's say over an upstream (`lobby ctl`); the next
    /// [`Core::settle`] applies it. The command's number: the kernel has
    /// it once [`Core::commands_applied`] reaches it. An unknown name is
    /// refused with what exists.
    pub fn admin(&mut self, id: &UpstreamId, state: AdminState) -> Result<u64, String> {
        let Some(upstream) = self.upstreams.get_mut(id) else {
            let siblings: Vec<&str> = self
                .upstreams
                .keys()
                .filter(|known| known.target == id.target)
                .map(|known| known.upstream.as_str())
                .collect();
            return Err(if siblings.is_empty() {
                let targets: BTreeSet<&str> =
                    self.upstreams.keys().map(|k| k.target.as_str()).collect();
                let targets: Vec<&str> = targets.into_iter().collect();
                format!("no target {}; targets: {}", id.target, targets.join(", "))
            } else {
                format!(
                    "no upstream {id}; {} has {}",
                    id.target,
                    siblings.join(", ")
                )
            });
        };
        if upstream.admin != state {
            upstream.admin = state;
            self.stale.target(&id.target);
            self.dirty = true;
            self.commands += 1;
        }
        // Unchanged, it waits for the commands before it: what it says is
        // true once the kernel has them.
        Ok(self.commands)
    }

    /// The newest of the operator's commands the kernel has.
    pub fn commands_applied(&self) -> u64 {
        self.commands_applied
    }

    /// The upstreams of `target` the core holds, in name order: each one's
    /// name, the operator's say over it and its addresses (IPv4 first).
    /// One walk of the target's range: a report of 10,000 upstreams that
    /// looked each one up by an id built for it spent most of its time
    /// building ids and comparing them.
    pub fn held_upstreams<'s>(
        &'s self,
        target: &str,
    ) -> Vec<(&'s str, AdminState, &'s BTreeMap<AddressKey, HeldAddress>)> {
        self.upstreams_of(target)
            .map(|(id, u)| (id.upstream.as_str(), u.admin, &u.addresses))
            .collect()
    }

    pub fn reloads(&self) -> ReloadCounts {
        self.reloads
    }

    pub fn apply_duration(&self) -> &Histogram {
        &self.apply_duration
    }

    /// Every address of every upstream as the backend it is counted under.
    pub fn counted_upstreams(&self) -> impl Iterator<Item = (&UpstreamId, Backend)> {
        self.upstreams
            .iter()
            .flat_map(|(id, u)| u.backends().map(move |b| (id, b)))
    }

    /// What to look up for the flowtable's interfaces, `None` when
    /// acceleration is off.
    pub fn device_query(&self) -> Option<DeviceQuery> {
        let config = self.config.as_ref()?;
        config.acceleration?;
        let upstreams = self.counted_upstreams().map(|(_, (s, _))| s.ip()).collect();
        DeviceQuery::of(config, upstreams)
    }

    /// The upstreams of the target named `target`.
    fn upstreams_of<'s, 't>(
        &'s self,
        target: &'t str,
    ) -> impl Iterator<Item = (&'s UpstreamId, &'s Upstream)> + use<'s, 't> {
        model::of_target(&self.upstreams, target)
    }

    /// The upstreams of `targets`, in the order of `targets`.
    fn upstreams_of_all<'s>(&'s self, targets: &[&str]) -> Vec<(&'s UpstreamId, &'s Upstream)> {
        targets.iter().flat_map(|t| self.upstreams_of(t)).collect()
    }

    /// Makes `config` the running configuration: upstreams whose spec is
    /// unchanged keep their state, the others start afresh; resolvers
    /// follow the names still in use.
    fn adopt(&mut self, config: Config, read: u64, now: Instant, actions: &mut Vec<Action>) {
        let starting = self.config.is_none();
        let mut summary = ReloadSummary {
            read,
            ..ReloadSummary::default()
        };
        let mut lines = ReloadLines::default();
        let no_targets = Vec::new();
        let old_targets = self.config.as_ref().map_or(&no_targets, |c| &c.targets);
        // A target equal to the running one keeps its upstreams as they
        // are: only the others (touched) are compared upstream by upstream.
        let (touched, removed) = target_changes(old_targets, &config.targets);
        let touched: Vec<&config::Target> = touched
            .into_iter()
            .map(|(target, old)| {
                match old {
                    None if starting => {}
                    None => {
                        summary.targets.added += 1;
                        reload_line!(lines, target = %target.name, "reload: target {} added", target.name);
                    }
                    Some(_) => {
                        summary.targets.changed += 1;
                        reload_line!(lines, target = %target.name, "reload: target {} changed", target.name);
                    }
                }
                target
            })
            .collect();
        for name in &removed {
            summary.targets.removed += 1;
            reload_line!(lines, target = %name, "reload: target {name} removed");
            self.computed.remove(*name);
        }
        // In name order, and each target's upstreams in theirs: the order of
        // `self.upstreams`, so that the running and the new upstreams of the
        // touched targets are compared side by side (at 1,000 x 10, three
        // map lookups an upstream were half of an every-target reload's
        // decisions).
        let mut touched = touched;
        touched.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        for target in &touched {
            self.stale.target(&target.name);
        }
        let next: Vec<(UpstreamId, UpstreamSpec)> = touched
            .iter()
            .flat_map(|target| {
                let mut upstreams: Vec<&config::Upstream> = target.group.upstreams.iter().collect();
                upstreams.sort_unstable_by(|a, b| a.name.cmp(&b.name));
                upstreams.into_iter().map(|upstream| {
                    let spec = UpstreamSpec {
                        protocol: target.protocol,
                        host: upstream.host.clone(),
                        port: upstream.port,
                        health_check: upstream.health_check.clone(),
                        dns: upstream.dns.clone(),
                        family: target.ip.map(|ip| ip.family()),
                    };
                    (UpstreamId::new(&target.name, &upstream.name), spec)
                })
            })
            .collect();
        let touched_names: Vec<&str> = touched.iter().map(|t| t.name.as_str()).collect();
        // Only the upstreams of touched and removed targets can go or change.
        let (names_may_change, gone, starts) = {
            let running_touched = self.upstreams_of_all(&touched_names);
            let running_removed = self.upstreams_of_all(&removed);
            // Names are resolved for the upstreams that use them: the set of
            // names changes only when an upstream of a touched or removed
            // target has one, before or after.
            let names_may_change = running_touched
                .iter()
                .chain(&running_removed)
                .map(|(_, u)| &u.spec)
                .chain(next.iter().map(|(_, spec)| spec))
                .any(|spec| spec.host.is_name());
            let mut gone: Vec<UpstreamId> = running_removed
                .iter()
                .map(|(id, _)| (*id).clone())
                .collect();
            let mut starts: Vec<(UpstreamId, UpstreamSpec, Arrival)> = Vec::new();
            let mut old = running_touched.into_iter().peekable();
            for (id, spec) in next {
                let running = loop {
                    match old.peek().map(|(o, _)| (*o).cmp(&id)) {
                        Some(Ordering::Less) => {
                            gone.push(old.next().expect("peeked").0.clone());
                        }
                        Some(Ordering::Equal) => break old.next().map(|(_, u)| u),
                        Some(Ordering::Greater) | None => break None,
                    }
                };
                match running {
                    Some(upstream) if upstream.spec == spec => {}
                    Some(_) => starts.push((id, spec, Arrival::Changed)),
                    None if starting => starts.push((id, spec, Arrival::AtStart)),
                    None => starts.push((id, spec, Arrival::Added)),
                }
            }
            gone.extend(old.map(|(id, _)| id.clone()));
            (names_may_change, gone, starts)
        };
        for id in gone {
            self.retire(&id, actions);
            summary.upstreams.removed += 1;
            reload_line!(lines, upstream = %id, "reload: upstream {id} removed; its connections drain");
        }
        // Resolvers first, so that new upstreams of a known name start with
        // its address.
        if names_may_change {
            let changed: BTreeSet<&UpstreamId> = starts
                .iter()
                .filter(|(.., arrival)| *arrival == Arrival::Changed)
                .map(|(id, ..)| id)
                .collect();
            let keys: BTreeSet<ResolverKey> = self
                .upstreams
                .iter()
                .filter(|(id, _)| !changed.contains(id))
                .map(|(_, u)| &u.spec)
                .chain(starts.iter().map(|(_, spec, _)| spec))
                .filter_map(UpstreamSpec::resolver_key)
                .collect();
            self.resolvers.retain(|key, _| {
                let keep = keys.contains(key);
                if !keep {
                    actions.push(Action::StopResolver(key.clone()));
                }
                keep
            });
            for key in keys {
                if let std::collections::btree_map::Entry::Vacant(entry) = self.resolvers.entry(key)
                {
                    actions.push(Action::StartResolver(entry.key().clone()));
                    entry.insert(None);
                }
            }
        }
        for (id, spec, arrival) in starts {
            match arrival {
                Arrival::Changed => {
                    self.retire(&id, actions);
                    summary.upstreams.changed += 1;
                    reload_line!(lines, upstream = %id, "reload: upstream {id} changed");
                }
                Arrival::Added => {
                    summary.upstreams.added += 1;
                    reload_line!(lines, upstream = %id, "reload: upstream {id} added");
                }
                Arrival::AtStart => {}
            }
            self.start_upstream(id, spec, actions);
        }
        lines.finish();
        #[cfg(debug_assertions)]
        {
            let used: BTreeSet<ResolverKey> = self
                .upstreams
                .values()
                .filter_map(|u| u.spec.resolver_key())
                .collect();
            assert!(
                self.resolvers.keys().eq(used.iter()),
                "the resolvers are not the names in use"
            );
        }
        if !self.ipv6_forwarding {
            let ipv6: Vec<String> = config
                .targets
                .iter()
                .filter(|t| serves_ipv6(t))
                .map(|t| t.name.clone())
                .collect();
            if !ipv6.is_empty() {
                actions.push(Action::Notify(Notice::Ipv6ForwardingOff(ipv6)));
            }
        }
        // The flowtable's interfaces follow the targets' addresses too.
        let accelerated = |c: Option<&Config>| c.is_some_and(|c| c.acceleration.is_some());
        if starting || accelerated(self.config.as_ref()) || accelerated(Some(&config)) {
            self.devices_stale = true;
        }
        self.config = Some(config);
        if starting {
            // A takeover lets names resolve before the first apply, so that
            // their upstreams do not leave rotation for the time DNS takes.
            if !self.inherited.is_empty() && !self.resolvers.is_empty() {
                self.resolving_until = Some(now + TAKEOVER_DNS_WAIT);
            }
        } else {
            self.reloads.succeeded += 1;
            self.reloads.last_successful = true;
            self.reloaded = Some(summary);
        }
    }

    /// An upstream from scratch: at its IP address, or at what its name's
    /// resolver last answered (another upstream may share it).
    fn start_upstream(&mut self, id: UpstreamId, spec: UpstreamSpec, actions: &mut Vec<Action>) {
        let answer = match &spec.host {
            Host::Ip(ip) => vec![*ip],
            Host::Fqdn(_) => spec
                .resolver_key()
                .and_then(|key| self.resolvers.get(&key).cloned().flatten())
                .unwrap_or_default(),
        };
        let upstream = Upstream {
            spec,
            addresses: BTreeMap::new(),
            admin: AdminState::Enabled,
        };
        self.upstreams.insert(id.clone(), upstream);
        self.place(&id, &answer, actions);
    }

    fn retire(&mut self, id: &UpstreamId, actions: &mut Vec<Action>) {
        self.counted_stale.insert(id.clone());
        if let Some(upstream) = self.upstreams.remove(id)
            && upstream.spec.health_check.is_some()
        {
            for key in upstream.addresses.keys() {
                actions.push(Action::StopChecker {
                    id: id.clone(),
                    key: *key,
                });
            }
        }
    }

    /// Whether the table taken over sent connections of `id`'s target to
    /// `upstream`.
    fn was_balanced(&self, id: &UpstreamId, upstream: SocketAddr) -> bool {
        self.inherited
            .get(&nft::chain_name(&id.target))
            .is_some_and(|s| s.contains(&upstream))
    }

    fn on_health(&mut self, report: HealthReport, actions: &mut Vec<Action>) -> bool {
        let Some(upstream) = self.upstreams.get_mut(&report.id) else {
            return false; // a checker of an upstream a reload removed
        };
        let Some(address) = report.address else {
            return false;
        };
        let several = upstream.addresses.len() > 1;
        let Some(held) = upstream.addresses.get_mut(&upstream.spec.key(address)) else {
            return false; // a checker of an address the answer dropped
        };
        if held.available == report.available {
            return false;
        }
        held.available = report.available;
        held.state_changes += 1;
        let (available, total) = self.availability(&report.id.target);
        actions.push(Action::Notify(Notice::UpstreamChanged {
            report,
            several,
            available,
            total,
        }));
        true
    }

    /// How many of a target's upstream addresses are available, of how
    /// many (an upstream without an address counts as one unavailable), as
    /// `lobby stats` lists them.
    fn availability(&self, target: &str) -> (usize, usize) {
        self.upstreams
            .iter()
            .filter(|(id, _)| id.target == target)
            .fold((0, 0), |(up, all), (_, u)| {
                let serving = u.addresses.values().filter(|a| a.available).count();
                (up + serving, all + u.addresses.len().max(1))
            })
    }

    fn on_address(&mut self, update: AddressUpdate, actions: &mut Vec<Action>) -> bool {
        let Some(known) = self.resolvers.get_mut(&update.key) else {
            return false; // a resolver a reload retired
        };
        *known = Some(update.addresses.clone());
        let users: Vec<UpstreamId> = self
            .upstreams
            .iter()
            .filter(|(_, u)| u.spec.resolver_key().as_ref() == Some(&update.key))
            .map(|(id, _)| id.clone())
            .collect();
        let mut changed = false;
        for id in users {
            if self.place(&id, &update.addresses, actions) {
                self.stale.target(&id.target);
                changed = true;
            }
        }
        changed
    }

    /// Gives upstream `id` the addresses it takes out of `answer`
    /// ([`dns::choose`]): an address that leaves stops its checker (its
    /// connections drain, as a removed upstream's); one that comes starts
    /// as its health check says; the address of a family that moves keeps
    /// its health and its checker follows it. Returns whether anything
    /// changed.
    fn place(&mut self, id: &UpstreamId, answer: &[IpAddr], actions: &mut Vec<Action>) -> bool {
        let Some(upstream) = self.upstreams.get(id) else {
            return false;
        };
        let spec = &upstream.spec;
        let served: Vec<IpAddr> = answer
            .iter()
            .filter(|a| spec.family.is_none_or(|f| Family::of(**a) == f))
            .copied()
            .collect();
        let current: Vec<IpAddr> = upstream.addresses.values().map(|a| a.address).collect();
        let wanted: BTreeMap<AddressKey, IpAddr> =
            dns::choose(&current, &served, spec.all_addresses())
                .into_iter()
                .map(|a| (spec.key(a), a))
                .collect();
        let named = spec.host.is_name();
        let check = spec.health_check.clone();
        let port = spec.port;
        // At a takeover, an address the old table balanced to is
        // available, and its checker starts from there.
        let inherit = |core: &Self, address: IpAddr| {
            !core.inherited.is_empty() && core.was_balanced(id, SocketAddr::new(address, port))
        };
        let mut changed = false;
        let gone: Vec<(AddressKey, IpAddr)> = upstream
            .addresses
            .iter()
            .filter(|(key, _)| !wanted.contains_key(key))
            .map(|(key, a)| (*key, a.address))
            .collect();
        for (key, address) in gone {
            info!(upstream = %id, %address, "upstream {id} no longer resolves to {address}; its connections drain");
            if check.is_some() {
                actions.push(Action::StopChecker {
                    id: id.clone(),
                    key,
                });
            }
            self.upstreams
                .get_mut(id)
                .expect("listed above")
                .addresses
                .remove(&key);
            changed = true;
        }
        for (key, address) in wanted {
            let held = self
                .upstreams
                .get(id)
                .expect("listed above")
                .addresses
                .get(&key)
                .copied();
            let inherited = inherit(self, address);
            let next = match held {
                Some(held) if held.address == address => continue,
                Some(held) => {
                    info!(upstream = %id, "upstream {id} moved from {} to {address}", held.address);
                    let available = held.available || inherited;
                    if let Some(check) = &check {
                        actions.push(if inherited && !held.available {
                            Action::StartChecker {
                                id: id.clone(),
                                key,
                                check: check.clone(),
                                available,
                                address,
                            }
                        } else {
                            Action::SetProbeAddress {
                                id: id.clone(),
                                key,
                                address,
                            }
                        });
                    }
                    HeldAddress {
                        address,
                        available,
                        ..held
                    }
                }
                None => {
                    if named {
                        info!(upstream = %id, %address, "upstream {id} resolved to {address}");
                    }
                    let available = model::starts_available(check.as_ref()) || inherited;
                    if let Some(check) = &check {
                        actions.push(Action::StartChecker {
                            id: id.clone(),
                            key,
                            check: check.clone(),
                            available,
                            address,
                        });
                    }
                    HeldAddress {
                        address,
                        available,
                        state_changes: 0,
                    }
                }
            };
            self.upstreams
                .get_mut(id)
                .expect("listed above")
                .addresses
                .insert(key, next);
            changed = true;
        }
        if changed {
            self.counted_stale.insert(id.clone());
        }
        changed
    }

    /// Plans the transaction that brings the kernel to the desired state
    /// after the events so far, unless one is in flight (then after its
    /// outcome), a retry is not due yet, or a takeover still waits for
    /// names.
    pub fn settle(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = self.track();
        self.reconcile(now, &mut actions);
        actions
    }

    /// The counters' part of [`Core::settle`], which a loop may carry out
    /// before settling: the counting task then tracks them while the core
    /// works out the transaction (at 1,000 x 10, an every-target reload's
    /// 1,000 map entries and route lookups took 4-14 ms).
    pub fn track(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        // Tracked before the apply that may send traffic there, and before
        // a checker started by these events probes there (the loop holds
        // its first probe until then): also while an apply is in flight.
        self.track_counters(&mut actions);
        actions
    }

    fn reconcile(&mut self, now: Instant, actions: &mut Vec<Action>) {
        if self.config.is_none()
            || !self.dirty
            || matches!(self.flight, Flight::Applying(..))
            || self.retry_at.is_some()
            || (self.resolving_until.is_some() && self.resolvers.values().any(Option::is_none))
        {
            return;
        }
        self.dirty = false;
        self.resolving_until = None;
        self.compute_stale();
        let config = self.config.as_ref().expect("checked above");
        let mut desired = Desired {
            targets: self.computed.clone(),
            nftables: config.nftables.clone(),
            probes: self
                .upstreams
                .values()
                .any(|u| u.spec.health_check.is_some())
                .then_some(ProbeExemption {
                    ports: self.probe_ports,
                }),
            ..Desired::default()
        };
        self.selection.narrow(&mut desired, now);
        desired.flowtable = accel::flowtable(config.acceleration, self.devices.as_ref());
        #[cfg(debug_assertions)]
        assert_eq!(
            self.applied_backends,
            self.applied
                .as_ref()
                .map(Desired::backends)
                .unwrap_or_default(),
            "the applied backends went stale"
        );
        let balanced = self.balanced.update(&desired);
        // Only the backends of the targets that changed since the apply,
        // and the lingering ones, can come or go: 10,000 upstreams are not
        // walked for the few a reload touches.
        let candidates: BTreeSet<Backend> = match &self.applied {
            Some(applied) => model::changed_targets(&applied.targets, &desired.targets)
                .into_iter()
                .flat_map(|(_, old, new)| old.into_iter().chain(new))
                .flat_map(|target| target.masqueraded())
                .chain(applied.lingering.iter().copied())
                .collect(),
            None => BTreeSet::new(),
        };
        // Set operations, not lookups one by one: they walk both sets side
        // by side when every target changed.
        let was: BTreeSet<Backend> = candidates
            .intersection(&self.applied_backends)
            .copied()
            .collect();
        model::linger(was.difference(balanced), balanced, &mut self.lingering, now);
        desired.lingering = self.lingering.keys().copied().collect();
        // Lingering backends are candidates already: they lingered at the
        // apply, or left with a changed target since.
        #[cfg(debug_assertions)]
        if self.applied.is_some() {
            assert!(
                desired.lingering.is_subset(&candidates),
                "a lingering backend unseen"
            );
        }
        let masqueraded: BTreeSet<Backend> = candidates
            .intersection(balanced)
            .chain(&desired.lingering)
            .copied()
            .collect();
        let delta = BackendDelta::between(&was, &masqueraded);
        let applied = match &self.applied {
            Some(applied) => Applied::Known(applied),
            None if self.table_may_exist => Applied::Unknown,
            None => Applied::Nothing,
        };
        match nft::plan_with_backends(applied, &desired, &delta) {
            Some(script) => {
                // Even a rejected transaction leaves the table's content
                // unknown: the next apply replaces it whole.
                self.table_may_exist = true;
                self.fingerprint.generation += 1;
                self.fingerprint.text = None;
                let delta = self.applied.is_some().then_some(delta);
                self.flight = Flight::Applying(desired, delta);
                self.applying = std::mem::take(&mut self.unplanned);
                self.applying_reload = self.reloaded.take();
                self.commands_applying = self.commands;
                actions.push(Action::Apply(script));
            }
            None => {
                self.unplanned = Waiting::default();
                self.commands_applied = self.commands;
                if let Some(summary) = self.reloaded.take() {
                    actions.push(Action::Notify(Notice::ReloadApplied(summary)));
                }
            }
        }
    }

    fn on_applied(
        &mut self,
        outcome: Result<Duration, String>,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        let Flight::Applying(desired, delta) = std::mem::replace(&mut self.flight, Flight::Idle)
        else {
            debug!("an apply outcome nobody waited for");
            return;
        };
        match outcome {
            Ok(elapsed) => {
                self.apply_duration.observe(elapsed);
                let elapsed_ms = elapsed.as_millis() as u64;
                let waited = |since: Option<Instant>| {
                    since.map(|at| now.saturating_duration_since(at).as_millis() as u64)
                };
                let applying = std::mem::take(&mut self.applying);
                info!(
                    elapsed_ms,
                    report_to_apply_ms = waited(applying.report),
                    config_to_apply_ms = waited(applying.config),
                    "ruleset applied"
                );
                let no_targets = BTreeMap::new();
                let before = self.applied.as_ref().map_or(&no_targets, |a| &a.targets);
                for (name, before, target) in model::changed_targets(before, &desired.targets) {
                    let Some(target) = target else {
                        continue;
                    };
                    let before = before.map(|t| t.is_empty());
                    let now_empty = target.is_empty();
                    // Said at start too: an empty target refuses clients.
                    if now_empty && before != Some(true) {
                        actions.push(Action::Notify(Notice::TargetEmpty {
                            target: name.to_owned(),
                        }));
                    } else if !now_empty && before == Some(true) {
                        actions.push(Action::Notify(Notice::TargetServing {
                            target: name.to_owned(),
                        }));
                    }
                }
                match delta {
                    // Only an apply sets `applied`, and none ran meanwhile.
                    Some(delta) if self.applied.is_some() => {
                        delta.apply_to(&mut self.applied_backends);
                    }
                    _ => self.applied_backends = desired.backends(),
                }
                self.applied = Some(desired);
                self.commands_applied = self.commands_applying;
                if let Some(summary) = self.applying_reload.take() {
                    actions.push(Action::Notify(Notice::ReloadApplied(summary)));
                }
                if !self.ready {
                    self.ready = true;
                    self.inherited.clear();
                    actions.push(Action::Ready);
                }
                // The table as Lobby left it: what later listings must show.
                if std::mem::take(&mut self.fingerprint.doubted) {
                    let what = "a change heard of during Lobby's own".to_owned();
                    self.repair(what, true, actions);
                } else {
                    self.list_owed(now, actions);
                }
            }
            Err(error) => {
                self.applied = None;
                self.applied_backends.clear();
                if !self.ready {
                    actions.push(Action::Abort(error));
                    return;
                }
                actions.push(Action::Notify(Notice::ApplyFailed(error)));
                let applying = std::mem::take(&mut self.applying);
                self.unplanned = self.unplanned.merge(applying);
                // Reported once a later transaction holding it succeeds
                // (a newer reload replaces it).
                if self.reloaded.is_none() {
                    self.reloaded = self.applying_reload.take();
                }
                self.applying_reload = None;
                self.retry_at = Some(now + APPLY_RETRY);
                self.dirty = true;
            }
        }
    }

    /// Whether the daemon hears of outside changes of the table as they
    /// happen (it follows the kernel's notifications); the watch may stop
    /// at any time.
    pub fn hear_outside(&mut self, heard: bool) {
        self.fingerprint.heard = heard;
    }

    /// Whether Lobby's last apply is still to be listed, and nothing is
    /// under way that would list it.
    fn listing_owed(&self) -> bool {
        self.ready
            && self.applied.is_some()
            && self.fingerprint.text.is_none()
            && !self.fingerprint.listing
            && matches!(self.flight, Flight::Idle)
    }

    /// When the owed listing's pause ends, while it waits for one.
    fn owed_listing_at(&self) -> Option<Instant> {
        let waits = self.fingerprint.heard && self.listing_owed();
        waits.then_some(self.fingerprint.rested_at).flatten()
    }

    /// Asks for the owed listing once its pause is over; at once when
    /// outside changes are not heard of.
    fn list_owed(&mut self, now: Instant, actions: &mut Vec<Action>) {
        let rested =
            !self.fingerprint.heard || self.fingerprint.rested_at.is_none_or(|at| at <= now);
        if rested && self.listing_owed() {
            self.list_table(actions);
        }
    }

    fn on_outside(&mut self, outside: Outside, actions: &mut Vec<Action>) {
        // What the owed listing shows would be taken for Lobby's.
        if outside == Outside::Changed && self.fingerprint.text.is_none() {
            self.fingerprint.doubted = true;
        }
        self.list_table(actions);
    }

    /// Asks for a listing of the table, unless one is under way (then once
    /// more after it) or an apply is: its outcome asks for one anyway.
    fn list_table(&mut self, actions: &mut Vec<Action>) {
        if !self.ready || matches!(self.flight, Flight::Applying(..)) {
            return;
        }
        if self.fingerprint.listing {
            self.fingerprint.again = true;
            return;
        }
        self.fingerprint.listing = true;
        actions.push(Action::ListTable {
            generation: self.fingerprint.generation,
        });
    }

    fn on_listing(
        &mut self,
        generation: u64,
        listing: Result<Option<String>, String>,
        now: Instant,
        actions: &mut Vec<Action>,
    ) {
        self.fingerprint.listing = false;
        let again = std::mem::take(&mut self.fingerprint.again);
        let current = generation == self.fingerprint.generation
            && matches!(self.flight, Flight::Idle)
            && self.applied.is_some();
        match listing {
            Err(error) if current => {
                // Not knowing is not a change: the safety net asks again.
                info!(error = %error, "listing Lobby's table to check it");
            }
            Ok(listing) if current => match (&self.fingerprint.text, listing) {
                (None, Some(_)) if self.fingerprint.doubted => {
                    let what = "a change heard of before Lobby had listed its own";
                    self.repair(what.to_owned(), true, actions);
                }
                (None, Some(text)) => self.fingerprint.text = Some(text),
                (_, None) => self.repair("the table was deleted".to_owned(), false, actions),
                (Some(known), Some(text)) if *known != text => {
                    let what = describe_change(known, &text);
                    self.repair(what, true, actions);
                }
                (Some(_), Some(_)) => debug!("Lobby's table is as applied"),
            },
            _ => {}
        }
        if again {
            self.list_table(actions);
        } else {
            self.list_owed(now, actions);
        }
    }

    /// Forgets what the kernel holds, so that the next plan applies the
    /// whole table again.
    fn repair(&mut self, what: String, exists: bool, actions: &mut Vec<Action>) {
        let table = self
            .config
            .as_ref()
            .map(|c| c.nftables.table.clone())
            .unwrap_or_default();
        actions.push(Action::Notify(Notice::Drift { table, what }));
        self.applied = None;
        self.applied_backends.clear();
        self.table_may_exist = exists;
        self.fingerprint.text = None;
        self.fingerprint.doubted = false;
        self.dirty = true;
    }

    /// Computes the desired state of the stale targets again; the others
    /// keep theirs.
    fn compute_stale(&mut self) {
        let Some(config) = &self.config else {
            return;
        };
        let stale = std::mem::take(&mut self.stale.targets);
        let targets: Vec<&config::Target> = config
            .targets
            .iter()
            .filter(|t| stale.contains(&t.name))
            .map(|t| &**t)
            .collect();
        let computed = crate::parallel::map_items(&targets, SHARED_COMPUTE, |target| {
            // By name within the target: no id is cloned or built to look
            // one up (five allocations an upstream at 1,000 x 10).
            let states: BTreeMap<&str, UpstreamState> = self
                .upstreams_of(&target.name)
                .map(|(id, u)| (id.upstream.as_str(), u.state()))
                .collect();
            Arc::new(DesiredTarget::of(target, &states, self.ipv6_forwarding))
        });
        for (target, computed) in targets.iter().zip(computed) {
            self.computed.insert(target.name.clone(), computed);
        }
        // Every test build checks that what an event leaves alone is what
        // computing everything again would give.
        #[cfg(debug_assertions)]
        {
            let states = self
                .upstreams
                .iter()
                .map(|(id, u)| (id.clone(), u.state()))
                .collect();
            let full = Desired::from_config(config, &states, self.ipv6_forwarding);
            assert_eq!(full.targets, self.computed, "an event left a target stale");
        }
    }

    /// Counts every configured upstream with a known address, available or
    /// not: draining connections still flow.
    fn track_counters(&mut self, actions: &mut Vec<Action>) {
        let stale = std::mem::take(&mut self.counted_stale);
        let devices_stale = std::mem::take(&mut self.devices_stale) || !stale.is_empty();
        let mut changes = BackendDelta::default();
        for id in stale {
            let share = self.upstreams.get(&id).map(|u| u.backends().collect());
            self.counted.set(id, share, &mut changes);
        }
        #[cfg(debug_assertions)]
        {
            let counted: BTreeSet<Backend> = self.counted_upstreams().map(|(_, b)| b).collect();
            assert_eq!(counted, self.counted.union, "an address changed unnoticed");
            if !devices_stale {
                assert_eq!(
                    self.device_query(),
                    self.device_query,
                    "an address changed unnoticed"
                );
            }
        }
        if !changes.is_empty() {
            actions.push(Action::TrackCounters(changes));
        }
        if !devices_stale {
            return;
        }
        let query = self.device_query();
        if query != self.device_query {
            if query.is_none() {
                self.devices = None;
            }
            self.device_query = query.clone();
            actions.push(Action::WatchDevices(query));
        }
    }
}

/// Why an upstream starts with a configuration.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// The daemon's first configuration has it.
    AtStart,
    /// A reload added it.
    Added,
    /// A reload changed how it is reached or checked.
    Changed,
}

/// Why a reload from `running` to `new` cannot be applied, when it moves
/// to another table: the table is what a daemon is (its lock, control
/// socket and pin directory follow the name), so that takes a restart. A
/// new priority is applied like any other change.
fn renamed(running: &Config, new: &Config) -> Option<String> {
    let (from, to) = (&running.nftables.table, &new.nftables.table);
    (from != to).then(|| {
        format!(
            "nftables.table: this daemon runs table `{from}` and cannot move to `{to}` \
             (its lock, control socket and pin directory follow the table's name); \
             restart lobby to use table `{to}`"
        )
    })
}

/// Whether a target has IPv6 to balance: an IPv6 `ip`, or IPv6 upstreams
/// without an IPv4 `ip`.
fn serves_ipv6(target: &config::Target) -> bool {
    let ipv6_upstream = target
        .group
        .upstreams
        .iter()
        .any(|u| matches!(u.host, Host::Ip(std::net::IpAddr::V6(_))));
    match target.ip {
        Some(ip) => ip.family() == config::Family::Ipv6,
        None => ipv6_upstream,
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A short account of how `now` differs from `before`, by lines: what an
/// operator needs to find who changed it.
fn describe_change(before: &str, now: &str) -> String {
    let lines = |text: &str| -> BTreeSet<String> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let (before, now) = (lines(before), lines(now));
    let quote = |set: Vec<&String>| {
        let shown: Vec<String> = set.iter().take(3).map(|l| format!("`{l}`")).collect();
        let more = set.len().saturating_sub(3);
        if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        }
    };
    let added: Vec<&String> = now.difference(&before).collect();
    let removed: Vec<&String> = before.difference(&now).collect();
    match (added.is_empty(), removed.is_empty()) {
        (false, false) => format!("added {}; removed {}", quote(added), quote(removed)),
        (false, true) => format!("added {}", quote(added)),
        (true, false) => format!("removed {}", quote(removed)),
        (true, true) => "lines reordered".to_owned(),
    }
}

#[cfg(test)]
mod tests;
