//! The five ways traffic crosses the load balancer's namespace, each built
//! in fresh namespaces: TIME_WAIT sockets and conntrack entries of one run
//! must not slow the next (PAWS drops reused tuples' SYNs).
use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
};

use lobby_tests::{Launch, Lobby, NetNs, Topology, fixtures::ConfigBuilder, wait_for};

use super::servers::{self, ECHO_PORT, GREET_PORT, SINK_PORT};

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
}

impl Variant {
    pub const ALL: [Variant; 5] = [
        Self::Forwarding,
        Self::Lobby,
        Self::LobbyWithoutCounters,
        Self::HaProxy,
        Self::RawNft,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Forwarding => "forwarding",
            Self::Lobby => "lobby",
            Self::LobbyWithoutCounters => "lobby-no-counters",
            Self::HaProxy => "haproxy",
            Self::RawNft => "raw-nft-dnat",
        }
    }
}

/// What a measurement connects to.
#[derive(Clone, Copy, Debug)]
pub enum Service {
    Greet,
    Sink,
    Echo,
}

impl Service {
    const ALL: [Service; 3] = [Self::Greet, Self::Sink, Self::Echo];

    fn upstream_port(self) -> u16 {
        match self {
            Self::Greet => GREET_PORT,
            Self::Sink => SINK_PORT,
            Self::Echo => ECHO_PORT,
        }
    }

    /// The balanced port on the load balancer.
    fn frontend_port(self) -> u16 {
        self.upstream_port() - 9000 + 8081
    }
}

/// One variant, ready for traffic; torn down on drop.
pub struct Setup {
    pub variant: Variant,
    pub topology: Topology,
    pub lobby: Option<Lobby>,
    haproxy: Option<Child>,
}

impl Setup {
    pub fn new(variant: Variant) -> Self {
        let topology = Topology::new(UPSTREAMS);
        for (i, ns) in topology.upstreams.iter().enumerate() {
            servers::start(ns, Topology::upstream_addr(i));
        }
        let mut setup = Self {
            variant,
            topology,
            lobby: None,
            haproxy: None,
        };
        match variant {
            Variant::Forwarding => setup.route_without_nat(),
            Variant::Lobby => setup.lobby = Some(Lobby::start(&setup.topology.lb, &lobby_config())),
            Variant::LobbyWithoutCounters => {
                setup.lobby = Some(Lobby::start_with_args(
                    &setup.topology.lb,
                    &lobby_config(),
                    Launch::Setns,
                    &["--no-counters"],
                ))
            }
            Variant::HaProxy => setup.haproxy = Some(start_haproxy(&setup.topology)),
            Variant::RawNft => setup.raw_dnat(),
        }
        setup
    }

    pub fn client(&self) -> &NetNs {
        &self.topology.client
    }

    /// Where the client connects for `service`: the upstreams themselves
    /// when routing, else the balanced port.
    pub fn targets(&self, service: Service) -> Vec<SocketAddr> {
        match self.variant {
            Variant::Forwarding => (0..UPSTREAMS)
                .map(|i| SocketAddr::from((Topology::upstream_addr(i), service.upstream_port())))
                .collect(),
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
        for (i, ns) in self.topology.upstreams.iter().enumerate() {
            let upstream_net = format!("198.18.{}.0/24", i + 1);
            self.topology.client.ip(&[
                "route",
                "add",
                &upstream_net,
                "via",
                &Topology::LB_ADDR.to_string(),
            ]);
            ns.ip(&[
                "route",
                "add",
                "198.18.0.0/24",
                "via",
                &Topology::lb_addr_toward(i).to_string(),
            ]);
        }
    }

    fn raw_dnat(&self) {
        self.forward();
        let mut rules = String::from(
            "table ip rawlb {\n chain pre { type nat hook prerouting priority dstnat; policy accept;\n",
        );
        for service in Service::ALL {
            let slots: Vec<String> = (0..UPSTREAMS)
                .map(|i| {
                    format!(
                        "{i} : {} . {}",
                        Topology::upstream_addr(i),
                        service.upstream_port()
                    )
                })
                .collect();
            rules.push_str(&format!(
                "  tcp dport {} dnat ip to numgen inc mod {UPSTREAMS} map {{ {} }}\n",
                service.frontend_port(),
                slots.join(", ")
            ));
        }
        rules.push_str(" }\n chain post { type nat hook postrouting priority srcnat; policy accept; ct status dnat masquerade; }\n}\n");
        let path = std::env::temp_dir().join(format!("{}-raw.nft", self.topology.lb.name));
        std::fs::write(&path, rules).expect("writing the raw ruleset");
        self.topology
            .lb
            .exec("nft", &["-f", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(path);
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(mut haproxy) = self.haproxy.take() {
            let _ = haproxy.kill();
            let _ = haproxy.wait();
        }
    }
}

fn lobby_config() -> String {
    let mut config = ConfigBuilder::new();
    for (name, service) in [
        ("greet", Service::Greet),
        ("sink", Service::Sink),
        ("echo", Service::Echo),
    ] {
        config = config.target(name, service.frontend_port());
        for i in 0..UPSTREAMS {
            config = config.upstream(
                &format!("{name}{i}"),
                Topology::upstream_addr(i),
                service.upstream_port(),
            );
        }
    }
    config.build()
}

fn start_haproxy(topology: &Topology) -> Child {
    // maxconn within the hard limit of open files (2 per connection).
    let mut config = String::from(
        "global\n  maxconn 9000\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n",
    );
    for service in Service::ALL {
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
