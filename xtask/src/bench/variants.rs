//! The ways traffic crosses the load balancer's namespace, each built in
//! fresh namespaces: TIME_WAIT sockets and conntrack entries of one run
//! must not slow the next (PAWS drops reused tuples' SYNs). Besides the
//! five main variants: Lobby's other distributions, weights and
//! persistence, each with the hand-written ruleset of the same mode; the
//! hand-written rulesets counting per upstream in nft; and
//! IPv6 through Lobby and plain forwarding.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use lobby_tests::{
    Launch, Lobby, NetNs, Topology,
    fixtures::{ConfigBuilder, health_check, spaced_prefixes},
    wait_for,
};

use super::{
    control::daemon_cpu_ticks,
    servers::{self, ECHO_PORT, GREET_PORT, SINK_PORT, Servers, UDP_PORT},
};

pub const UPSTREAMS: usize = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    /// Plain routing through the load balancer, no NAT: the baseline.
    Forwarding,
    Lobby,
    LobbyWithoutCounters,
    HaProxy,
    /// A fixed hand-written round-robin DNAT ruleset.
    RawNft,
    /// [`Variant::RawNft`] counting what Lobby's eBPF programs count, in
    /// nft: each upstream's packets and bytes each way, its new
    /// connections and the resets it sends, in named counters.
    RawNftCounted,
    LobbyRandom,
    RawNftRandom,
    LobbySourceHash,
    RawNftSourceHash,
    /// Round-robin with weights 3:1:1.
    LobbyWeighted,
    RawNftWeighted,
    /// Round-robin with persistence: the client's address keeps its
    /// upstream (the bench's one client address: every connection goes to
    /// one upstream, in both).
    LobbyPersistence,
    RawNftPersistence,
    /// The hand-written twins of the other distributions counting as
    /// [`Variant::RawNftCounted`] does: like with like for each mode.
    RawNftRandomCounted,
    RawNftSourceHashCounted,
    RawNftWeightedCounted,
    RawNftPersistenceCounted,
    /// The dynamic distributions. Their kernel path is the round-robin map
    /// the daemon rewrites as its measures change, so their hand-written
    /// twin is [`Variant::RawNft`].
    LobbyLeastConnections,
    /// With TCP health checks on every upstream: the probes' round trips
    /// are the measure.
    LobbyLeastLatency,
    /// Round-robin with the health checks of [`Variant::LobbyLeastLatency`]:
    /// its anchor, since checks bring the chains that keep probes out of
    /// conntrack, which a table without checks does without.
    LobbyChecked,
    /// IPv6 on a dual-stack topology: plain routing, and Lobby.
    Forwarding6,
    Lobby6,
    /// Lobby with a block list of 100,000 prefixes the client is not in.
    LobbyBlockList,
    /// Two client addresses opening connections at once: plain routing,
    /// and Lobby in each `source_nat` mode. Masquerading both onto one
    /// address reuses the upstream-side tuples of either client's closed
    /// connections, whose timestamps PAWS refuses.
    Forwarding2,
    LobbyMasquerade2,
    LobbyNoSnat2,
    LobbySnatPool2,
    /// The same four addresses as a range ("A-B"): the kernel picks a
    /// range's address by a hash of the client's, so each client keeps one.
    LobbySnatRange2,
    /// Twelve client addresses, `source_nat: none` (one masquerade address
    /// for many clients collapses, see above): round-robin, and the two
    /// modes that keep a client on one upstream, which the one client of
    /// the other variants sends to a single upstream.
    LobbyNoSnatMany,
    LobbySourceHashMany,
    LobbyPersistenceMany,
}

/// The client addresses of the many-client variants: the client's own
/// and 198.18.0.10-20.
const MANY_CLIENTS: usize = 12;

/// The persistence timeout of the persistence variants (s): far longer
/// than a measurement, so the client never moves.
const PERSISTENCE_TIMEOUT: u32 = 300;

/// How the DNAT picks an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    RoundRobin,
    Random,
    SourceHash,
    /// Round-robin, the first upstream weighing 3, the others 1.
    Weighted,
    /// Round-robin with [`PERSISTENCE_TIMEOUT`].
    Persistence,
    LeastConnections,
    LeastLatency,
    /// Round-robin with health checks on every upstream.
    Checked,
}

impl Mode {
    fn distribution(self) -> &'static str {
        match self {
            Self::RoundRobin | Self::Weighted | Self::Persistence | Self::Checked => "round-robin",
            Self::Random => "random",
            Self::SourceHash => "ip-src-hash",
            Self::LeastConnections => "least-connections",
            Self::LeastLatency => "least-latency",
        }
    }

    fn weight(self, upstream: usize) -> u32 {
        if self == Self::Weighted && upstream == 0 {
            3
        } else {
            1
        }
    }

    /// Extra keys of `upstream` in Lobby's config.
    fn upstream_keys(self, upstream: usize) -> String {
        let mut keys = match self.weight(upstream) {
            1 => String::new(),
            weight => format!("weight: {weight}\n"),
        };
        if matches!(self, Self::LeastLatency | Self::Checked) {
            // Every upstream (the datagram ones too) is probed on its
            // greeting server, which accepts any connection at once.
            keys.push_str(&health_check(GREET_PORT, true, 1, 1, 2));
        }
        keys
    }

    /// The slots of the hand-written ruleset's map for `service`: each
    /// upstream a range of as many slots as it weighs, as an nft expert
    /// writes weights (`0-2 : a, 3 : b, 4 : c`), and their count.
    fn slots(self, service: Service) -> (String, u32) {
        let mut next = 0;
        let slots: Vec<String> = (0..UPSTREAMS)
            .map(|i| {
                let (first, last) = (next, next + self.weight(i) - 1);
                next = last + 1;
                let range = if first == last {
                    first.to_string()
                } else {
                    format!("{first}-{last}")
                };
                format!(
                    "{range} : {} . {}",
                    Topology::upstream_addr(i),
                    service.upstream_port()
                )
            })
            .collect();
        (slots.join(", "), next)
    }

    /// The hand-written rule of `service`, and the declarations it needs
    /// before the chain.
    fn raw_rule(self, service: Service) -> (String, String) {
        let (slots, count) = self.slots(service);
        let (declaration, pick) = match self {
            // The dynamic distributions' kernel path is the round-robin
            // map, which the daemon narrows to the backends it chooses.
            Self::RoundRobin
            | Self::Weighted
            | Self::LeastConnections
            | Self::LeastLatency
            | Self::Checked => (String::new(), format!("dnat ip to numgen inc mod {count}")),
            Self::Random => (
                String::new(),
                format!("dnat ip to numgen random mod {count}"),
            ),
            Self::SourceHash => (
                String::new(),
                format!("dnat ip to jhash ip saddr mod {count}"),
            ),
            // One dynamic map from client to slot, updated from the packet
            // path: `update` adds a new client with the next slot or
            // restarts a known one's timeout (keeping its slot), the
            // lookup reads the client's slot back into the packet's mark.
            Self::Persistence => {
                let map = format!("sticky{}", service.frontend_port());
                (
                    format!(
                        " map {map} {{ typeof ip saddr : meta mark; flags dynamic,timeout; timeout {PERSISTENCE_TIMEOUT}s; }}\n"
                    ),
                    format!(
                        "update @{map} {{ ip saddr : numgen inc mod {count} }} meta mark set ip saddr map @{map} dnat ip to meta mark"
                    ),
                )
            }
        };
        (
            declaration,
            format!(
                "{} dport {} {pick} map {{ {slots} }}",
                service.protocol(),
                service.frontend_port()
            ),
        )
    }
}

impl Variant {
    /// The variants every round measures in full (latency, bulk, UDP,
    /// connection rate).
    pub const MAIN: [Variant; 5] = [
        Self::Forwarding,
        Self::Lobby,
        Self::LobbyWithoutCounters,
        Self::HaProxy,
        Self::RawNft,
    ];

    /// The variants measured by connection rate only.
    pub const RATE_ONLY: [Variant; 27] = [
        Self::RawNftCounted,
        Self::LobbyRandom,
        Self::RawNftRandom,
        Self::LobbySourceHash,
        Self::RawNftSourceHash,
        Self::LobbyWeighted,
        Self::RawNftWeighted,
        Self::LobbyPersistence,
        Self::RawNftPersistence,
        Self::RawNftRandomCounted,
        Self::RawNftSourceHashCounted,
        Self::RawNftWeightedCounted,
        Self::RawNftPersistenceCounted,
        Self::LobbyLeastConnections,
        Self::LobbyLeastLatency,
        Self::LobbyChecked,
        Self::Forwarding6,
        Self::Lobby6,
        Self::LobbyBlockList,
        Self::Forwarding2,
        Self::LobbyMasquerade2,
        Self::LobbyNoSnat2,
        Self::LobbySnatPool2,
        Self::LobbySnatRange2,
        Self::LobbyNoSnatMany,
        Self::LobbySourceHashMany,
        Self::LobbyPersistenceMany,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Forwarding => "forwarding",
            Self::Lobby => "lobby",
            Self::LobbyWithoutCounters => "lobby-no-counters",
            Self::HaProxy => "haproxy",
            Self::RawNft => "raw-nft-dnat",
            Self::RawNftCounted => "raw-nft-dnat-counted",
            Self::LobbyRandom => "lobby-random",
            Self::RawNftRandom => "raw-nft-random",
            Self::LobbySourceHash => "lobby-ip-src-hash",
            Self::RawNftSourceHash => "raw-nft-jhash",
            Self::LobbyWeighted => "lobby-weighted",
            Self::RawNftWeighted => "raw-nft-weighted",
            Self::LobbyPersistence => "lobby-persistence",
            Self::RawNftPersistence => "raw-nft-persistence",
            Self::RawNftRandomCounted => "raw-nft-random-counted",
            Self::RawNftSourceHashCounted => "raw-nft-jhash-counted",
            Self::RawNftWeightedCounted => "raw-nft-weighted-counted",
            Self::RawNftPersistenceCounted => "raw-nft-persistence-counted",
            Self::LobbyLeastConnections => "lobby-least-connections",
            Self::LobbyLeastLatency => "lobby-least-latency",
            Self::LobbyChecked => "lobby-checked",
            Self::Forwarding6 => "forwarding-ipv6",
            Self::Lobby6 => "lobby-ipv6",
            Self::LobbyBlockList => "lobby-block-100k",
            Self::Forwarding2 => "forwarding-2-clients",
            Self::LobbyMasquerade2 => "lobby-masquerade-2-clients",
            Self::LobbyNoSnat2 => "lobby-snat-none-2-clients",
            Self::LobbySnatPool2 => "lobby-snat-pool-4-2-clients",
            Self::LobbySnatRange2 => "lobby-snat-range-4-2-clients",
            Self::LobbyNoSnatMany => "lobby-snat-none-12-clients",
            Self::LobbySourceHashMany => "lobby-ip-src-hash-12-clients",
            Self::LobbyPersistenceMany => "lobby-persistence-12-clients",
        }
    }

    /// The plain-routing variant of the same clients: what "vs fwd" is
    /// measured against.
    pub fn forwarding(self) -> Variant {
        match self {
            Self::Lobby6 | Self::Forwarding6 => Self::Forwarding6,
            _ if self.two_clients() => Self::Forwarding2,
            _ => Self::Forwarding,
        }
    }

    /// Whether two client addresses open the connections.
    pub fn two_clients(self) -> bool {
        matches!(
            self,
            Self::Forwarding2
                | Self::LobbyMasquerade2
                | Self::LobbyNoSnat2
                | Self::LobbySnatPool2
                | Self::LobbySnatRange2
        )
    }

    fn many_clients(self) -> bool {
        matches!(
            self,
            Self::LobbyNoSnatMany | Self::LobbySourceHashMany | Self::LobbyPersistenceMany
        )
    }

    fn ipv6(self) -> bool {
        matches!(self, Self::Forwarding6 | Self::Lobby6)
    }

    /// Whether HAProxy-like UDP is out: HAProxy balances TCP only.
    pub fn carries_udp(self) -> bool {
        self != Self::HaProxy
    }
}

/// What a measurement connects to.
#[derive(Clone, Copy, Debug)]
pub enum Service {
    Greet,
    Sink,
    Echo,
    /// Small datagrams, counted by the upstreams.
    Udp,
}

impl Service {
    const ALL: [Service; 4] = [Self::Greet, Self::Sink, Self::Echo, Self::Udp];

    fn upstream_port(self) -> u16 {
        match self {
            Self::Greet => GREET_PORT,
            Self::Sink => SINK_PORT,
            Self::Echo => ECHO_PORT,
            Self::Udp => UDP_PORT,
        }
    }

    /// The balanced port on the load balancer.
    fn frontend_port(self) -> u16 {
        self.upstream_port() - 9000 + 8081
    }

    fn protocol(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            _ => "tcp",
        }
    }
}

/// One variant, ready for traffic; torn down on drop.
pub struct Setup {
    pub variant: Variant,
    pub topology: Topology,
    pub lobby: Option<Lobby>,
    haproxy: Option<Child>,
    servers: Vec<Servers>,
}

impl Setup {
    pub fn new(variant: Variant) -> Self {
        let topology = if variant.ipv6() {
            Topology::dual_stack(UPSTREAMS)
        } else {
            Topology::new(UPSTREAMS)
        };
        let servers = topology
            .upstreams
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let servers = servers::start(ns, IpAddr::V4(Topology::upstream_addr(i)));
                if variant.ipv6() {
                    servers::start_greet(ns, IpAddr::V6(Topology::upstream_addr6(i)));
                }
                servers
            })
            .collect();
        let mut setup = Self {
            variant,
            topology,
            lobby: None,
            haproxy: None,
            servers,
        };
        if variant.two_clients() {
            setup.topology.add_other_client();
        }
        if variant.many_clients() {
            for address in &setup.sources()[1..] {
                setup
                    .topology
                    .client
                    .ip(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
            }
            setup.route_back_through_lb("198.18.0.0/24");
        }
        match variant {
            Variant::Forwarding | Variant::Forwarding6 | Variant::Forwarding2 => {
                setup.route_without_nat()
            }
            Variant::Lobby | Variant::LobbyMasquerade2 => {
                setup.start_lobby(&lobby_config(Mode::RoundRobin, false))
            }
            Variant::Lobby6 => setup.start_lobby(&lobby_config(Mode::RoundRobin, true)),
            Variant::LobbyRandom => setup.start_lobby(&lobby_config(Mode::Random, false)),
            Variant::LobbySourceHash => setup.start_lobby(&lobby_config(Mode::SourceHash, false)),
            Variant::LobbyWeighted => setup.start_lobby(&lobby_config(Mode::Weighted, false)),
            Variant::LobbyPersistence => setup.start_lobby(&lobby_config(Mode::Persistence, false)),
            Variant::LobbyLeastConnections => {
                setup.start_lobby(&lobby_config(Mode::LeastConnections, false))
            }
            Variant::LobbyLeastLatency => {
                setup.start_lobby(&lobby_config(Mode::LeastLatency, false))
            }
            Variant::LobbyChecked => setup.start_lobby(&lobby_config(Mode::Checked, false)),
            Variant::LobbyBlockList => setup.start_lobby(&with_block_list(
                &lobby_config(Mode::RoundRobin, false),
                100_000,
            )),
            Variant::LobbyNoSnat2 => {
                setup.route_back_through_lb("198.18.0.0/24");
                setup.start_lobby(&with_target_key(
                    &lobby_config(Mode::RoundRobin, false),
                    "source_nat: none",
                ));
            }
            Variant::LobbySnatPool2 | Variant::LobbySnatRange2 => {
                let pool = setup.snat_pool();
                let address = if variant == Variant::LobbySnatPool2 {
                    format!("[{}]", pool.join(", "))
                } else {
                    format!("\"{}-{}\"", pool[0], pool[pool.len() - 1])
                };
                setup.start_lobby(&with_target_key(
                    &lobby_config(Mode::RoundRobin, false),
                    &format!("source_nat: {{ address: {address} }}"),
                ));
            }
            Variant::LobbyNoSnatMany
            | Variant::LobbySourceHashMany
            | Variant::LobbyPersistenceMany => {
                let mode = match variant {
                    Variant::LobbySourceHashMany => Mode::SourceHash,
                    Variant::LobbyPersistenceMany => Mode::Persistence,
                    _ => Mode::RoundRobin,
                };
                setup.start_lobby(&with_target_key(
                    &lobby_config(mode, false),
                    "source_nat: none",
                ));
            }
            Variant::LobbyWithoutCounters => {
                setup.lobby = Some(Lobby::start_with_args(
                    &setup.topology.lb,
                    &lobby_config(Mode::RoundRobin, false),
                    Launch::Setns,
                    &["--no-counters"],
                ))
            }
            Variant::HaProxy => setup.haproxy = Some(start_haproxy(&setup.topology)),
            Variant::RawNft => setup.raw_dnat(Mode::RoundRobin, Counting::None),
            Variant::RawNftCounted => setup.raw_dnat(Mode::RoundRobin, Counting::PerUpstream),
            Variant::RawNftRandom => setup.raw_dnat(Mode::Random, Counting::None),
            Variant::RawNftSourceHash => setup.raw_dnat(Mode::SourceHash, Counting::None),
            Variant::RawNftWeighted => setup.raw_dnat(Mode::Weighted, Counting::None),
            Variant::RawNftPersistence => setup.raw_dnat(Mode::Persistence, Counting::None),
            Variant::RawNftRandomCounted => setup.raw_dnat(Mode::Random, Counting::PerUpstream),
            Variant::RawNftSourceHashCounted => {
                setup.raw_dnat(Mode::SourceHash, Counting::PerUpstream)
            }
            Variant::RawNftWeightedCounted => setup.raw_dnat(Mode::Weighted, Counting::PerUpstream),
            Variant::RawNftPersistenceCounted => {
                setup.raw_dnat(Mode::Persistence, Counting::PerUpstream)
            }
        }
        if let Some(lobby) = &setup.lobby {
            settle(variant, lobby);
        }
        setup
    }

    /// Starts Lobby and waits until its start is over: the check of the
    /// table after the first apply lists every element of every set (a
    /// second of CPU with 100,000 prefixes), which would otherwise share
    /// the machine with the first measurement.
    fn start_lobby(&mut self, config: &str) {
        let lobby = Lobby::start(&self.topology.lb, config);
        wait_until_quiet(lobby.pid());
        self.lobby = Some(lobby);
    }

    /// Datagrams the upstreams' UDP servers received so far.
    pub fn udp_received(&self) -> u64 {
        self.servers.iter().map(Servers::udp_received).sum()
    }

    pub fn client(&self) -> &NetNs {
        &self.topology.client
    }

    /// The client addresses the connection rate opens connections from:
    /// none for the variants of one client (the route picks).
    pub fn sources(&self) -> Vec<IpAddr> {
        if self.variant.two_clients() {
            vec![
                Topology::CLIENT_ADDR.into(),
                Topology::OTHER_CLIENT_ADDR.into(),
            ]
        } else if self.variant.many_clients() {
            std::iter::once(Topology::CLIENT_ADDR)
                .chain(
                    (10..)
                        .take(MANY_CLIENTS - 1)
                        .map(|host| Ipv4Addr::new(198, 18, 0, host)),
                )
                .map(IpAddr::V4)
                .collect()
        } else {
            Vec::new()
        }
    }

    /// Where the client connects for `service`: the upstreams themselves
    /// when routing, else the balanced port.
    pub fn targets(&self, service: Service) -> Vec<SocketAddr> {
        match self.variant {
            Variant::Forwarding | Variant::Forwarding2 => (0..UPSTREAMS)
                .map(|i| SocketAddr::from((Topology::upstream_addr(i), service.upstream_port())))
                .collect(),
            Variant::Forwarding6 => (0..UPSTREAMS)
                .map(|i| SocketAddr::from((Topology::upstream_addr6(i), service.upstream_port())))
                .collect(),
            Variant::Lobby6 => vec![SocketAddr::from((
                Topology::LB_ADDR6,
                service.frontend_port(),
            ))],
            _ => vec![SocketAddr::from((
                Topology::LB_ADDR,
                service.frontend_port(),
            ))],
        }
    }

    /// The load balancer namespace's conntrack fill: (count, max).
    pub fn conntrack(&self) -> Option<(u64, u64)> {
        let read = |what: &str| -> Option<u64> {
            let out = self.topology.lb.try_exec(
                "cat",
                &[&format!("/proc/sys/net/netfilter/nf_conntrack_{what}")],
            );
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        Some((read("count")?, read("max")?))
    }

    fn forward(&self) {
        self.topology
            .lb
            .exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
    }

    /// Routes between the client and the upstreams through the load
    /// balancer, which only forwards.
    fn route_without_nat(&self) {
        self.forward();
        self.route_back_through_lb("198.18.0.0/24");
        for (i, ns) in self.topology.upstreams.iter().enumerate() {
            let upstream_net = format!("198.18.{}.0/24", i + 1);
            self.topology.client.ip(&[
                "route",
                "add",
                &upstream_net,
                "via",
                &Topology::LB_ADDR.to_string(),
            ]);
            if self.variant.ipv6() {
                self.topology.client.ip(&[
                    "-6",
                    "route",
                    "add",
                    &format!("2001:2:0:{}::/64", i + 1),
                    "via",
                    &Topology::LB_ADDR6.to_string(),
                ]);
                ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    "2001:2::/64",
                    "via",
                    &Topology::lb_addr6_toward(i).to_string(),
                ]);
            }
        }
    }

    /// Routes from every upstream to `prefix` through the load balancer:
    /// the clients' addresses without NAT, or an SNAT pool's.
    fn route_back_through_lb(&self, prefix: &str) {
        for (i, ns) in self.topology.upstreams.iter().enumerate() {
            ns.ip(&[
                "route",
                "add",
                prefix,
                "via",
                &Topology::lb_addr_toward(i).to_string(),
            ]);
        }
    }

    /// Four SNAT addresses on the load balancer's interface toward the
    /// first upstream, which every upstream routes back through it.
    fn snat_pool(&self) -> Vec<String> {
        let pool: Vec<String> = (1..=4).map(|i| format!("198.18.250.{i}")).collect();
        for address in &pool {
            self.topology
                .lb
                .ip(&["addr", "add", &format!("{address}/32"), "dev", "up0"]);
        }
        self.route_back_through_lb("198.18.250.0/29");
        pool
    }

    fn raw_dnat(&self, mode: Mode, counting: Counting) {
        self.forward();
        let (declarations, rules): (Vec<String>, Vec<String>) =
            Service::ALL.into_iter().map(|s| mode.raw_rule(s)).unzip();
        let (counters, count_chain) = match counting {
            Counting::None => Default::default(),
            Counting::PerUpstream => per_upstream_counting(),
        };
        let rules = format!(
            "table ip rawlb {{\n{}{counters} chain pre {{ type nat hook prerouting priority dstnat; policy accept;\n{} }}\n chain post {{ type nat hook postrouting priority srcnat; policy accept; ct status dnat masquerade; }}\n{count_chain}}}\n",
            declarations.concat(),
            rules.iter().map(|r| format!("  {r}\n")).collect::<String>()
        );
        let path = std::env::temp_dir().join(format!("{}-raw.nft", self.topology.lb.name));
        std::fs::write(&path, rules).expect("writing the raw ruleset");
        self.topology
            .lb
            .exec("nft", &["-f", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(path);
    }
}

/// Whether a hand-written ruleset counts traffic.
#[derive(Clone, Copy, Debug)]
enum Counting {
    None,
    /// What Lobby's counters count, in nft (see [`per_upstream_counting`]).
    PerUpstream,
}

/// Named counters for each upstream of each service (packets and bytes
/// toward it and from it, new connections, resets from it), and a
/// forward chain that feeds them: the hand-written way to count what
/// Lobby's eBPF programs count. The forward hook sees a packet toward an
/// upstream after its DNAT and an answer before its reverse NAT, as the
/// programs on the upstreams' interfaces do; a counter named by a map
/// lookup is one rule for every upstream, as a map of counters is one
/// hash lookup in the programs.
fn per_upstream_counting() -> (String, String) {
    let mut counters = String::new();
    let mut maps: [Vec<String>; 4] = Default::default();
    for service in Service::ALL {
        for i in 0..UPSTREAMS {
            let upstream = format!(
                "{} . {}",
                Topology::upstream_addr(i),
                service.upstream_port()
            );
            let name = format!("{}-{i}", service.upstream_port());
            for (way, map) in ["out", "in", "new", "rst"].into_iter().zip(&mut maps) {
                counters.push_str(&format!(" counter {way}{name} {{ }}\n"));
                map.push(format!("{upstream} : \"{way}{name}\""));
            }
        }
    }
    let [out, into, new, reset] = maps.map(|m| m.join(", "));
    let chain = format!(
        " chain count {{ type filter hook forward priority filter; policy accept;\n  counter name ip daddr . th dport map {{ {out} }}\n  counter name ip saddr . th sport map {{ {into} }}\n  ct state new counter name ip daddr . th dport map {{ {new} }}\n  tcp flags rst counter name ip saddr . th sport map {{ {reset} }}\n }}\n"
    );
    (counters, chain)
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut haproxy) = self.haproxy.take() {
            let _ = haproxy.kill();
            let _ = haproxy.wait();
        }
    }
}

/// Lobby's config: a target per service over the three upstreams, in
/// `mode`; with `ipv6` the greeting target only, over the IPv4
/// and the IPv6 addresses of the upstreams (each client family is
/// balanced over its own).
fn lobby_config(mode: Mode, ipv6: bool) -> String {
    let mut config = ConfigBuilder::new();
    for (name, service) in [
        ("greet", Service::Greet),
        ("sink", Service::Sink),
        ("echo", Service::Echo),
        ("datagram", Service::Udp),
    ] {
        if ipv6 && !matches!(service, Service::Greet) {
            continue;
        }
        config = config
            .target(name, service.frontend_port())
            .protocol(service.protocol());
        for i in 0..UPSTREAMS {
            config = config.upstream_with(
                &format!("{name}{i}"),
                Topology::upstream_addr(i),
                service.upstream_port(),
                &mode.upstream_keys(i),
            );
            if ipv6 {
                config = config.upstream(
                    &format!("{name}{i}v6"),
                    Topology::upstream_addr6(i),
                    service.upstream_port(),
                );
            }
        }
    }
    let mut yaml = config.build().replace(
        "distribution: round-robin",
        &format!("distribution: {}", mode.distribution()),
    );
    if mode == Mode::Persistence {
        yaml = yaml.replace(
            "          upstreams:\n",
            &format!(
                "          persistence: {{ timeout: {PERSISTENCE_TIMEOUT} }}\n          upstreams:\n"
            ),
        );
    }
    yaml
}

/// `config` with a block list of `count` spaced prefixes on every target.
fn with_block_list(config: &str, count: u32) -> String {
    let prefixes: Vec<String> = spaced_prefixes(count).collect();
    with_target_key(config, &format!("block: [{}]", prefixes.join(", ")))
}

/// `config` with the line `key` in every target.
fn with_target_key(config: &str, key: &str) -> String {
    config.replace(
        "        upstream_group:\n",
        &format!("        {key}\n        upstream_group:\n"),
    )
}

/// Waits until the daemon has finished starting: after its first apply it
/// lists the table once (what its repairs compare with), and nft fetches
/// every element of every set to list it, seconds of CPU with 100,000-
/// prefix block lists (a minute of wall time on a loaded machine). The
/// connection rate is of a running balancer: the daemon's CPU quiet, nft's
/// work included (libnftables runs in the daemon, a `--nft-process` run is
/// its child).
fn settle(variant: Variant, lobby: &Lobby) {
    const QUIET: Duration = Duration::from_millis(500);
    let started = Instant::now();
    let pid = lobby.pid();
    let mut last = daemon_cpu_ticks(pid);
    loop {
        std::thread::sleep(QUIET);
        let now = daemon_cpu_ticks(pid);
        // One tick: the periodic work of a running daemon.
        if now.saturating_sub(last) <= 1 {
            return;
        }
        if started.elapsed() > Duration::from_secs(120) {
            eprintln!(
                "bench: {}: the daemon is still busy 120 s after its start; measuring anyway",
                variant.name()
            );
            return;
        }
        last = now;
    }
}

fn start_haproxy(topology: &Topology) -> Child {
    // maxconn within the hard limit of open files (2 per connection).
    let mut config = String::from(
        "global\n  maxconn 9000\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
    );
    for service in Service::ALL {
        if matches!(service, Service::Udp) {
            continue;
        }
        let port = service.frontend_port();
        config.push_str(&format!("frontend f{port}\n  bind {}:{port}\n  default_backend b{port}\nbackend b{port}\n  balance roundrobin\n", Topology::LB_ADDR));
        for i in 0..UPSTREAMS {
            config.push_str(&format!(
                "  server s{i} {}:{}\n",
                Topology::upstream_addr(i),
                service.upstream_port()
            ));
        }
    }
    let path = std::env::temp_dir().join(format!("{}-haproxy.cfg", topology.lb.name));
    std::fs::write(&path, config).expect("writing haproxy.cfg");
    let child = Command::new("ip")
        .args(["netns", "exec", &topology.lb.name, "haproxy", "-db", "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting haproxy");
    let probe = SocketAddr::from((Topology::LB_ADDR, Service::Greet.frontend_port()));
    wait_for("haproxy to listen", Duration::from_secs(10), || {
        topology
            .client
            .connect(probe, Duration::from_secs(1))
            .ok()
            .map(|_| ())
    });
    child
}

/// Waits until the daemon `pid` (with the nft it runs) uses at most a
/// tenth of a core over 300 ms, up to 30 s.
fn wait_until_quiet(pid: u32) {
    assert!(
        super::went_quiet(|| daemon_cpu_ticks(pid)),
        "timed out after 30s waiting for the daemon to go quiet"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counted_ruleset_feeds_four_counters_of_each_upstream() {
        let (counters, chain) = per_upstream_counting();
        let upstreams = Service::ALL.len() * UPSTREAMS;
        assert_eq!(counters.matches(" counter ").count(), 4 * upstreams);
        assert_eq!(chain.matches(": \"").count(), 4 * upstreams);
        assert!(chain.contains("198.18.1.11 . 9000 : \"out9000-0\""));
    }

    #[test]
    fn a_weight_is_a_range_of_as_many_slots() {
        assert_eq!(
            Mode::Weighted.raw_rule(Service::Greet).1,
            "tcp dport 8081 dnat ip to numgen inc mod 5 map { 0-2 : 198.18.1.11 . 9000, 3 : 198.18.2.11 . 9000, 4 : 198.18.3.11 . 9000 }"
        );
        assert_eq!(
            Mode::RoundRobin.raw_rule(Service::Udp).1,
            "udp dport 8084 dnat ip to numgen inc mod 3 map { 0 : 198.18.1.11 . 9003, 1 : 198.18.2.11 . 9003, 2 : 198.18.3.11 . 9003 }"
        );
    }

    #[test]
    fn persistence_declares_its_map_per_service() {
        let (declaration, rule) = Mode::Persistence.raw_rule(Service::Greet);
        assert_eq!(
            declaration,
            " map sticky8081 { typeof ip saddr : meta mark; flags dynamic,timeout; timeout 300s; }\n"
        );
        assert!(rule.starts_with(
            "tcp dport 8081 update @sticky8081 { ip saddr : numgen inc mod 3 } meta mark set ip saddr map @sticky8081 dnat ip to meta mark map { 0 : "
        ));
    }

    #[test]
    fn least_latency_probes_every_upstream_and_weights_are_written_when_not_one() {
        let config = lobby_config(Mode::LeastLatency, false);
        assert_eq!(config.matches("health_check:").count(), 4 * UPSTREAMS);
        assert_eq!(config.matches("distribution: least-latency").count(), 4);
        let config = lobby_config(Mode::Weighted, false);
        assert_eq!(config.matches("weight: 3").count(), 4);
        assert_eq!(config.matches("weight:").count(), 4);
        let config = lobby_config(Mode::Persistence, false);
        assert_eq!(config.matches("persistence: { timeout: 300 }").count(), 4);
    }
}
