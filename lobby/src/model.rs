//! The desired state: for each target, the upstreams new connections go to.
//! Derived purely from the configuration and what health checks and DNS
//! currently say about each upstream.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;

use crate::config::{
    Config, Distribution, Family, HealthCheck, IpNet, Nftables, Policy, Protocol, SourceNat,
    Target, Upstream,
};
use crate::health::ProbePorts;

/// Names one upstream of one target, as operators read it in logs:
/// `web/web1`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamId {
    pub target: String,
    pub upstream: String,
}

impl UpstreamId {
    pub fn new(target: impl Into<String>, upstream: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            upstream: upstream.into(),
        }
    }
}

/// The entries of `map`, keyed by upstream, that belong to `target`: one
/// range of the map, since ids sort by target first.
pub fn of_target<'m, 't, V>(
    map: &'m BTreeMap<UpstreamId, V>,
    target: &'t str,
) -> impl Iterator<Item = (&'m UpstreamId, &'m V)> + use<'m, 't, V> {
    map.range(UpstreamId::new(target, "")..)
        .take_while(move |(id, _)| id.target == target)
}

impl fmt::Display for UpstreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.target, self.upstream)
    }
}

/// What the control plane currently knows about one upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamState {
    /// Its addresses, each with its own health: an IP host's one; a host
    /// name's current one of each family, or every one of its answer with
    /// `dns.all_addresses`; none while the name has never resolved.
    pub addresses: Vec<AddressState>,
    /// Drained by the operator: weight 0 whatever the configuration says.
    pub drained: bool,
}

/// One address of an upstream, and whether it takes new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressState {
    pub address: IpAddr,
    pub available: bool,
}

/// Whether an address of an upstream starts available: unless its health
/// check says to start unavailable.
pub fn starts_available(health_check: Option<&HealthCheck>) -> bool {
    health_check.is_none_or(|h| h.start_available)
}

/// The ruleset's content, independent of how nftables spells it. Sorted
/// maps keep rendering deterministic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Shared: the core keeps each target's state between plans, and a
    /// target an event left alone compares equal by pointer.
    pub targets: BTreeMap<String, Arc<DesiredTarget>>,
    /// Upstreams no target sends new connections to any more, still
    /// masqueraded for a moment: a packet DNAT'd under the previous ruleset
    /// may reach the masquerade rule after the new one is committed.
    pub lingering: BTreeSet<Backend>,
    /// The flowtable fast path, when acceleration is on and its interfaces
    /// are known.
    pub flowtable: Option<crate::accel::Flowtable>,
    /// The table's name and its nat chains' priority.
    pub nftables: Nftables,
    /// The chains that keep health probes out of conntrack, while some
    /// upstream is checked: without probes the table does without them,
    /// and forwarded packets cross one hook fewer.
    pub probes: Option<ProbeExemption>,
}

/// How the table tells the daemon's probes from other traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeExemption {
    /// The local ports of TCP probes, when the daemon confined them: the
    /// table looks up the socket of no other TCP packet. Fixed for a
    /// daemon's life.
    pub ports: Option<ProbePorts>,
}

/// An upstream as the masquerade rule matches it.
pub type Backend = (SocketAddr, Protocol);

/// How long a backend stays masqueraded after it leaves every target.
pub const BACKEND_LINGER: Duration = Duration::from_secs(2);

impl Desired {
    /// Every upstream some masquerading target sends new connections to.
    pub fn balanced(&self) -> BTreeSet<Backend> {
        self.targets
            .values()
            .flat_map(|target| target.masqueraded())
            .collect()
    }

    /// The upstreams whose connections are masqueraded.
    pub fn backends(&self) -> BTreeSet<Backend> {
        self.balanced().union(&self.lingering).copied().collect()
    }
}

/// A target of one state or the other or both, where they differ.
pub type TargetChange<'a> = (
    &'a str,
    Option<&'a Arc<DesiredTarget>>,
    Option<&'a Arc<DesiredTarget>>,
);

/// The targets that differ between `before` and `after`, in name order: a
/// walk of both maps side by side, where a target an event left alone
/// compares by pointer (most of them, at 1,000 targets).
pub fn changed_targets<'a>(
    before: &'a BTreeMap<String, Arc<DesiredTarget>>,
    after: &'a BTreeMap<String, Arc<DesiredTarget>>,
) -> Vec<TargetChange<'a>> {
    let mut changes = Vec::new();
    let (mut old, mut new) = (before.iter().peekable(), after.iter().peekable());
    loop {
        let change = match (old.peek(), new.peek()) {
            (None, None) => return changes,
            (Some((name, _)), Some((next, _))) if name == next => {
                let ((name, old), (_, new)) = (old.next().unwrap(), new.next().unwrap());
                // Arc's equality of an `Eq` type tries the pointer first.
                if old == new {
                    continue;
                }
                (name.as_str(), Some(old), Some(new))
            }
            (Some((name, _)), next) if next.is_none_or(|(next, _)| name < next) => {
                let (name, old) = old.next().unwrap();
                (name.as_str(), Some(old), None)
            }
            _ => {
                let (name, new) = new.next().unwrap();
                (name.as_str(), None, Some(new))
            }
        };
        changes.push(change);
    }
}

/// The lingering backends after a change to `after` at `now`: those of
/// `left` (what was masqueraded before, or any part of it that holds every
/// backend `after` no longer balances) stay until their deadline in
/// `lingering` (set at first sight), unless they are balanced again.
pub fn linger<'a>(
    left: impl IntoIterator<Item = &'a Backend>,
    after: &BTreeSet<Backend>,
    lingering: &mut BTreeMap<Backend, Instant>,
    now: Instant,
) {
    for backend in left.into_iter().filter(|b| !after.contains(b)) {
        lingering.entry(*backend).or_insert(now + BACKEND_LINGER);
    }
    lingering.retain(|backend, until| !after.contains(backend) && *until > now);
}

/// The backends a change stops and starts masquerading.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendDelta {
    pub gone: BTreeSet<Backend>,
    pub added: BTreeSet<Backend>,
}

impl BackendDelta {
    /// The difference between two whole sets.
    pub fn between(before: &BTreeSet<Backend>, after: &BTreeSet<Backend>) -> Self {
        Self {
            gone: before.difference(after).copied().collect(),
            added: after.difference(before).copied().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.gone.is_empty() && self.added.is_empty()
    }

    /// Notes that `backend` leaves: a backend that joined within the same
    /// change never joined.
    pub fn note_gone(&mut self, backend: Backend) {
        if !self.added.remove(&backend) {
            self.gone.insert(backend);
        }
    }

    /// Notes that `backend` joins: one that left within the same change
    /// never left.
    pub fn note_added(&mut self, backend: Backend) {
        if !self.gone.remove(&backend) {
            self.added.insert(backend);
        }
    }

    /// `backends` after the change.
    pub fn apply_to(&self, backends: &mut BTreeSet<Backend>) {
        for backend in &self.gone {
            backends.remove(backend);
        }
        backends.extend(&self.added);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTarget {
    pub protocol: Protocol,
    pub port: u16,
    pub ip: Option<IpNet>,
    pub distribution: Distribution,
    pub policy: Policy,
    /// The families the target serves, IPv4 first: netfilter cannot
    /// translate between families, so each has its own rotation.
    pub families: Vec<FamilyRotation>,
    /// When an upstream caps its connections (`max_connections`), every
    /// address of every upstream, in rotation or not (a drained one keeps
    /// its count); empty otherwise.
    pub caps: BTreeMap<SocketAddr, Cap>,
    pub persistence: Option<Persistence>,
}

/// A target's client affinity: each backend in rotation keeps the clients
/// it was sent, in a set of the kernel's that new connections refresh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Persistence {
    pub timeout: Duration,
    /// Every backend in rotation (of every family), whether or not the
    /// distribution picks it for new clients now: a client keeps an
    /// upstream that is no longer the least loaded.
    pub backends: BTreeSet<SocketAddr>,
}

impl Persistence {
    /// Persistence over the backends of `families`' rotations.
    fn over(timeout: Duration, families: &[FamilyRotation]) -> Self {
        Self {
            timeout,
            backends: families.iter().flat_map(|f| &f.slots).copied().collect(),
        }
    }
}

impl DesiredTarget {
    /// Whether no client of any family can be balanced.
    pub fn is_empty(&self) -> bool {
        self.families.iter().all(|f| f.slots.is_empty())
    }

    /// The upstreams it sends new connections to, if it masquerades them.
    pub fn masqueraded(&self) -> Vec<Backend> {
        if self.policy.source_nat != SourceNat::Masquerade {
            return Vec::new();
        }
        self.families
            .iter()
            .flat_map(|f| self.reachable(f))
            .map(|u| (u, self.protocol))
            .collect()
    }

    /// Every backend of `rotation`'s family a new connection may reach:
    /// those its slots hold and, with persistence, every backend in
    /// rotation that remembers clients (a dynamic distribution may no
    /// longer pick it for new ones).
    pub fn reachable(&self, rotation: &FamilyRotation) -> BTreeSet<SocketAddr> {
        let remembering = self
            .persistence
            .iter()
            .flat_map(|p| &p.backends)
            .filter(|b| Family::of(b.ip()) == rotation.family);
        rotation.slots.iter().chain(remembering).copied().collect()
    }
}

/// The rotation of one family of a target: the slots the distribution's
/// key (a counter, a random number, a hash of the client's address) picks
/// from, each holding an upstream. An upstream holds as many slots as its
/// weight asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyRotation {
    pub family: Family,
    /// Empty when no upstream of the family can take new connections.
    pub slots: Vec<SocketAddr>,
}

/// An address of an upstream of a target in which some upstream caps its
/// connections. The cap holds for each address: each is a backend of its
/// own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Its upstream's place in the group's list and its own among the
    /// upstream's addresses (in address order): they name what the ruleset
    /// keeps for it, whichever upstreams are up.
    pub place: usize,
    pub ordinal: usize,
    pub max_connections: Option<u32>,
}

/// Slots of an `ip-src-hash` rotation: enough that weights and the loss of
/// an upstream spread clients finely.
pub const HASH_SLOTS: usize = 1024;

/// An upstream that may receive new connections, as distributions see it.
#[derive(Clone, Copy)]
struct Candidate<'a> {
    config: &'a Upstream,
    address: SocketAddr,
    /// The configured weight, or 0 while drained.
    weight: u32,
}

/// The slots of a family's rotation. Upstreams that can take new
/// connections are the available ones with a weight; backups only while
/// no other can.
fn slots(distribution: Distribution, candidates: &[Candidate<'_>]) -> Vec<SocketAddr> {
    let active: Vec<&Candidate<'_>> = candidates.iter().filter(|c| c.weight > 0).collect();
    let primaries: Vec<&Candidate<'_>> = active
        .iter()
        .copied()
        .filter(|c| !c.config.backup)
        .collect();
    let chosen = if primaries.is_empty() {
        active
    } else {
        primaries
    };
    if chosen.is_empty() {
        return Vec::new();
    }
    let divisor = chosen.iter().map(|c| c.weight).fold(0, gcd);
    let weights: Vec<u32> = chosen.iter().map(|c| c.weight / divisor).collect();
    match distribution {
        // The dynamic distributions start from round robin over every
        // upstream; the core narrows it to those its measures pick.
        Distribution::RoundRobin | Distribution::LeastConnections | Distribution::LeastLatency => {
            smooth_order(&weights)
                .into_iter()
                .map(|i| chosen[i].address)
                .collect()
        }
        Distribution::Random => chosen
            .iter()
            .zip(&weights)
            .flat_map(|(c, w)| std::iter::repeat_n(c.address, *w as usize))
            .collect(),
        Distribution::IpSrcHash => (0..HASH_SLOTS)
            .map(|slot| {
                let owner = chosen
                    .iter()
                    .max_by(|a, b| {
                        let score = |c: &Candidate<'_>| rendezvous_score(slot, c);
                        score(a).total_cmp(&score(b))
                    })
                    .expect("chosen is not empty");
                owner.address
            })
            .collect(),
    }
}

/// The caps of `target`'s upstreams with an address, when one has a cap;
/// of upstreams sharing an address, the first.
fn caps(target: &Target, states: &BTreeMap<&str, UpstreamState>) -> BTreeMap<SocketAddr, Cap> {
    let upstreams = &target.group.upstreams;
    let mut caps = BTreeMap::new();
    if upstreams.iter().all(|u| u.max_connections.is_none()) {
        return caps;
    }
    for (place, upstream) in upstreams.iter().enumerate() {
        let mut addresses: Vec<IpAddr> = states
            .get(upstream.name.as_str())
            .map(|s| s.addresses.iter().map(|a| a.address).collect())
            .unwrap_or_default();
        addresses.sort();
        for (ordinal, address) in addresses.into_iter().enumerate() {
            caps.entry(SocketAddr::new(address, upstream.port))
                .or_insert(Cap {
                    place,
                    ordinal,
                    max_connections: upstream.max_connections,
                });
        }
    }
    caps
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// One full cycle of smooth weighted round robin (nginx's): each upstream
/// appears `weight` times, spread out rather than in runs, in
/// configuration order among equals.
fn smooth_order(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            for (c, w) in current.iter_mut().zip(weights) {
                *c += i64::from(*w);
            }
            let (best, _) = current
                .iter()
                .enumerate()
                .rev()
                .max_by_key(|(_, c)| **c)
                .expect("weights are not empty");
            current[best] -= total;
            best
        })
        .collect()
}

/// Weighted rendezvous (highest random weight) score of `candidate` for a
/// hash slot: a slot's owner changes only when its owner leaves or a new
/// upstream outbids it, so losing an upstream moves only its clients. The
/// hash is the upstream's name and address, not its place in the list.
fn rendezvous_score(slot: usize, candidate: &Candidate<'_>) -> f64 {
    // FNV-1a: stable across runs and versions, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let key = format!("{}/{}/{slot}", candidate.config.name, candidate.address);
    for byte in key.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's high bits barely change between neighbouring keys: mix them
    // (splitmix64's finalizer) before taking a uniform draw in (0, 1),
    // then -w / ln(u), the weighted form.
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    let unit = ((hash >> 11) as f64 + 1.0) / ((1u64 << 53) as f64 + 1.0);
    -f64::from(candidate.weight) / unit.ln()
}

impl Desired {
    /// Every available address of the upstreams of `config`, each a
    /// backend with its upstream's weight; upstreams missing from `states`
    /// are left out. IPv6 only when `ipv6` (forwarding) allows it.
    pub fn from_config(
        config: &Config,
        states: &BTreeMap<UpstreamId, UpstreamState>,
        ipv6: bool,
    ) -> Self {
        let targets = config
            .targets
            .iter()
            .map(|target| {
                let own: BTreeMap<&str, UpstreamState> = of_target(states, &target.name)
                    .map(|(id, state)| (id.upstream.as_str(), state.clone()))
                    .collect();
                let desired = DesiredTarget::of(target, &own, ipv6);
                (target.name.clone(), Arc::new(desired))
            })
            .collect();
        Self {
            targets,
            nftables: config.nftables.clone(),
            ..Self::default()
        }
    }
}

impl DesiredTarget {
    /// Every available address of the upstreams of `target` in `states`
    /// (by upstream name; the others are left out), each a backend with its
    /// upstream's weight. A target serves the family of its `ip`, or both
    /// without one; IPv6 only when `ipv6` (forwarding) allows it.
    pub fn of(target: &Target, states: &BTreeMap<&str, UpstreamState>, ipv6: bool) -> Self {
        let candidates: Vec<Candidate<'_>> = target
            .group
            .upstreams
            .iter()
            .filter_map(|upstream| {
                let state = states.get(upstream.name.as_str())?;
                Some((upstream, state))
            })
            .flat_map(|(upstream, state)| {
                state
                    .addresses
                    .iter()
                    .filter(|a| a.available)
                    .map(move |a| Candidate {
                        config: upstream,
                        address: SocketAddr::new(a.address, upstream.port),
                        weight: if state.drained { 0 } else { upstream.weight },
                    })
            })
            .collect();
        let distribution = target.group.distribution;
        let families: Vec<FamilyRotation> = Family::BOTH
            .into_iter()
            .filter(|f| target.ip.is_none_or(|ip| ip.family() == *f))
            .filter(|f| ipv6 || *f == Family::Ipv4)
            .map(|family| {
                let of_family: Vec<Candidate<'_>> = candidates
                    .iter()
                    .filter(|c| Family::of(c.address.ip()) == family)
                    .copied()
                    .collect();
                FamilyRotation {
                    family,
                    slots: slots(distribution, &of_family),
                }
            })
            .collect();
        let persistence = target
            .group
            .persistence
            .map(|timeout| Persistence::over(timeout, &families));
        Self {
            protocol: target.protocol,
            port: target.port,
            ip: target.ip,
            distribution,
            policy: target.policy.clone(),
            families,
            persistence,
            caps: caps(target, states),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Host;

    fn backend(host: u8) -> Backend {
        (SocketAddr::from(([198, 18, 1, host], 9000)), Protocol::Tcp)
    }

    fn upstream(name: &str, weight: u32, backup: bool) -> Upstream {
        Upstream {
            name: name.to_owned(),
            host: Host::Fqdn(format!("{name}.test")),
            port: 80,
            health_check: None,
            dns: None,
            weight,
            backup,
            max_connections: None,
        }
    }

    fn candidates(upstreams: &[Upstream]) -> Vec<Candidate<'_>> {
        upstreams
            .iter()
            .enumerate()
            .map(|(i, config)| Candidate {
                config,
                address: SocketAddr::from(([198, 18, 1, i as u8 + 1], 80)),
                weight: config.weight,
            })
            .collect()
    }

    fn shares(slots: &[SocketAddr]) -> BTreeMap<u8, usize> {
        let mut shares = BTreeMap::new();
        for slot in slots {
            let IpAddr::V4(ip) = slot.ip() else {
                unreachable!()
            };
            *shares.entry(ip.octets()[3]).or_default() += 1;
        }
        shares
    }

    #[test]
    fn every_address_of_a_capped_upstream_has_its_own_cap_and_name() {
        let yaml = "lb:\n  - targets:\n      - name: web\n        protocol: tcp\n        port: 80\n        \
            upstream_group:\n          name: pool\n          distribution: round-robin\n          \
            upstreams:\n            - { name: a, host: a.test, port: 80, max_connections: 5 }\n            \
            - { name: b, host: 198.18.1.2, port: 80 }\n";
        let config = crate::config::parse(yaml, std::path::Path::new("t.yaml")).unwrap();
        let state = |addresses: &[&str]| UpstreamState {
            addresses: addresses
                .iter()
                .map(|a| AddressState {
                    address: a.parse().unwrap(),
                    available: true,
                })
                .collect(),
            drained: false,
        };
        let states = BTreeMap::from([
            (
                UpstreamId::new("web", "a"),
                state(&["2001:db8::1", "198.18.1.1"]),
            ),
            (UpstreamId::new("web", "b"), state(&["198.18.1.2"])),
        ]);
        let caps = &Desired::from_config(&config, &states, true).targets["web"].caps;
        let cap = |place, ordinal, max_connections| Cap {
            place,
            ordinal,
            max_connections,
        };
        assert_eq!(
            caps.iter()
                .map(|(a, c)| (a.to_string(), *c))
                .collect::<Vec<_>>(),
            [
                ("198.18.1.1:80".to_owned(), cap(0, 0, Some(5))),
                ("198.18.1.2:80".to_owned(), cap(1, 0, None)),
                ("[2001:db8::1]:80".to_owned(), cap(0, 1, Some(5))),
            ]
        );
    }

    #[test]
    fn round_robin_spreads_weights_over_one_exact_cycle() {
        let group = [upstream("a", 3, false), upstream("b", 1, false)];
        let cycle = slots(Distribution::RoundRobin, &candidates(&group));
        let order: Vec<u8> = cycle
            .iter()
            .map(|s| match s.ip() {
                IpAddr::V4(ip) => ip.octets()[3],
                IpAddr::V6(_) => unreachable!(),
            })
            .collect();
        assert_eq!(order, [1, 1, 2, 1], "b's turn comes within the cycle");
        // Weights reduce by their common divisor: 300:100 is 3:1.
        let group = [upstream("a", 300, false), upstream("b", 100, false)];
        assert_eq!(
            slots(Distribution::RoundRobin, &candidates(&group)).len(),
            4
        );
        let equal = [
            upstream("a", 1, false),
            upstream("b", 1, false),
            upstream("c", 1, false),
        ];
        assert_eq!(
            shares(&slots(Distribution::RoundRobin, &candidates(&equal))),
            BTreeMap::from([(1, 1), (2, 1), (3, 1)])
        );
    }

    #[test]
    fn weight_zero_drains_and_backups_wait_for_the_primaries() {
        let group = [
            upstream("a", 0, false),
            upstream("b", 2, false),
            upstream("c", 1, true),
        ];
        assert_eq!(
            shares(&slots(Distribution::Random, &candidates(&group))),
            BTreeMap::from([(2, 1)])
        );
        // Without b (down), the backup takes over; a is drained.
        let without_b: Vec<Candidate<'_>> = candidates(&group)
            .into_iter()
            .filter(|c| c.config.name != "b")
            .collect();
        assert_eq!(
            shares(&slots(Distribution::RoundRobin, &without_b)),
            BTreeMap::from([(3, 1)])
        );
        let drained = [upstream("a", 0, false)];
        assert!(slots(Distribution::RoundRobin, &candidates(&drained)).is_empty());
    }

    #[test]
    fn losing_an_upstream_moves_only_its_hash_slots() {
        let group: Vec<Upstream> = (0..4)
            .map(|i| upstream(&format!("u{i}"), 1, false))
            .collect();
        let all = candidates(&group);
        let before = slots(Distribution::IpSrcHash, &all);
        assert_eq!(before.len(), HASH_SLOTS);
        for share in shares(&before).values() {
            // About a quarter each (256 expected).
            assert!((200..=312).contains(share), "{:?}", shares(&before));
        }
        let lost = all[2].address;
        let without: Vec<Candidate<'_>> =
            all.iter().copied().filter(|c| c.address != lost).collect();
        let after = slots(Distribution::IpSrcHash, &without);
        for (old, new) in before.iter().zip(&after) {
            if *old != lost {
                assert_eq!(old, new, "a slot of a remaining upstream moved");
            }
        }
        // Weights spread slots in proportion.
        let weighted = [upstream("a", 3, false), upstream("b", 1, false)];
        let share = shares(&slots(Distribution::IpSrcHash, &candidates(&weighted)));
        assert!((700..=840).contains(&share[&1]), "{share:?}");
    }

    #[test]
    fn removed_backends_linger_until_their_deadline() {
        let now = Instant::now();
        let mut lingering = BTreeMap::new();
        let both = BTreeSet::from([backend(1), backend(2)]);
        let one = BTreeSet::from([backend(1)]);
        linger(&both, &one, &mut lingering, now);
        assert_eq!(
            lingering,
            BTreeMap::from([(backend(2), now + BACKEND_LINGER)])
        );
        // A later change keeps the first deadline.
        linger(&one, &one, &mut lingering, now + Duration::from_secs(1));
        assert_eq!(lingering.get(&backend(2)), Some(&(now + BACKEND_LINGER)));
        linger(&one, &one, &mut lingering, now + BACKEND_LINGER);
        assert!(lingering.is_empty());
    }

    #[test]
    fn a_backend_balanced_again_stops_lingering() {
        let now = Instant::now();
        let mut lingering = BTreeMap::new();
        let both = BTreeSet::from([backend(1), backend(2)]);
        linger(&both, &BTreeSet::from([backend(1)]), &mut lingering, now);
        linger(&both, &both, &mut lingering, now);
        assert!(lingering.is_empty());
    }
}
