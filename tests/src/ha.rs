//! Several Lobby hosts under the engines operators already run, built from
//! the shipped files: keepalived and conntrackd from dist/ha (active/standby)
//! and BIRD from dist/ecmp (active/active). Only per-host values and paths
//! are changed, each by a replacement that fails when the shipped file no
//! longer has the text it replaces, so the files in dist/ are what runs.
//!
//! Daemons run in the hosts' namespaces with their files (config, pid,
//! socket, lock, log) in a directory of their own under /run, and are
//! killed on drop, before their namespaces are deleted.
use std::{
    collections::BTreeSet,
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    Lobby, NameServer, NetNs,
    server::{Conversation, ask_name},
    wait_for,
};

/// The text of `path` under the workspace's dist/.
pub fn dist(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {}: {e}", full.display()))
}

/// `text` with every occurrence of each `from` replaced by its `to`; a
/// `from` that does not occur fails: the shipped file changed under the test.
pub fn replaced(text: &str, replacements: &[(&str, &str)]) -> String {
    replacements
        .iter()
        .fold(text.to_owned(), |text, (from, to)| {
            assert!(text.contains(from), "{from:?} is not in the file:\n{text}");
            text.replace(from, to)
        })
}

/// A daemon started in a namespace, its output in a log file. The pids in
/// `pid_files` (children it forks) are killed with it.
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    pub log_path: PathBuf,
    pid_files: Vec<PathBuf>,
}

impl Daemon {
    pub fn start(ns: &NetNs, name: &str, command: &mut Command, log_path: PathBuf) -> Self {
        let log = File::create(&log_path).expect("a daemon's log file");
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        let child = ns
            .spawn(command)
            .unwrap_or_else(|e| panic!("starting {name} ({command:?}): {e}"));
        Self {
            name: name.to_owned(),
            child: Some(child),
            log_path,
            pid_files: Vec::new(),
        }
    }

    /// The pid in `path` (written by the daemon) is killed with it.
    pub fn with_pid_file(mut self, path: PathBuf) -> Self {
        self.pid_files.push(path);
        self
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The daemon's process and the ones named by its pid files.
    fn pids(&self) -> Vec<i32> {
        let forked = self.pid_files.iter().filter_map(|path| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|pid| pid.trim().parse().ok())
        });
        self.child
            .iter()
            .map(|child| child.id() as i32)
            .chain(forked)
            .collect()
    }

    /// Sends `signal` to every process of the daemon.
    pub fn signal(&self, signal: i32) {
        for pid in self.pids() {
            // SAFETY: kill has no memory preconditions; the pids are the
            // daemon's own.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// Stops every process first, so that none can react to another's
    /// death (keepalived respawns its VRRP child, and its VRRP child shuts
    /// down cleanly when the parent goes), then kills them all: a crash.
    pub fn kill(&mut self) {
        self.signal(libc::SIGSTOP);
        self.signal(libc::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- {} log ({}) ---\n{}",
                self.name,
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// A Lobby host: its daemons, its Lobby and a directory for their files.
/// Fields drop in order: daemons before the namespace.
pub struct Host {
    pub daemons: Vec<Daemon>,
    pub lobby: Option<Lobby>,
    pub dir: tempfile::TempDir,
    pub ns: NetNs,
}

impl Host {
    fn new(role: &str) -> Self {
        Self {
            daemons: Vec::new(),
            lobby: None,
            // Under /run, not /tmp: keepalived refuses hook scripts below a
            // directory other users can write to.
            dir: tempfile::Builder::new()
                .prefix("lobby-ha-")
                .tempdir_in("/run")
                .expect("a directory under /run"),
            ns: NetNs::new(role),
        }
    }

    /// A path in the host's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `text` to `name` in the host's directory; returns its path.
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path.display().to_string()
    }

    pub fn daemon(&mut self, name: &str) -> &mut Daemon {
        self.daemons
            .iter_mut()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no daemon {name}"))
    }

    pub fn lobby(&self) -> &Lobby {
        self.lobby.as_ref().expect("lobby runs on this host")
    }

    /// Connections Lobby's counters saw on this host, over all upstreams.
    pub fn connections(&self) -> u64 {
        let stats = self.lobby().stats();
        stats["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| t["upstreams"].as_array().into_iter().flatten())
            .filter_map(|u| u["connections"].as_u64())
            .sum()
    }

    /// Whether `address` is on `interface`.
    pub fn has_address(&self, interface: &str, address: Ipv4Addr) -> bool {
        let listing = self.ns.ip(&["-4", "-o", "addr", "show", "dev", interface]);
        String::from_utf8_lossy(&listing.stdout).contains(&format!("inet {address}/"))
    }

    /// Takes `interfaces` down: the host is gone for its neighbours.
    pub fn unplug(&self, interfaces: &[&str]) {
        for interface in interfaces {
            self.ns.ip(&["link", "set", interface, "down"]);
        }
    }
}

/// A veth pair from `a` to `b`, with addresses (CIDR) on each end, up.
fn veth(a: &NetNs, a_if: &str, a_addr: &str, b: &NetNs, b_if: &str, b_addr: &str) {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", a_addr, "dev", a_if]);
    b.ip(&["addr", "add", b_addr, "dev", b_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// A switch: bridges inside the `hub` namespace, never the root one.
struct Switch {
    hub: NetNs,
    ports: usize,
}

impl Switch {
    fn new(bridges: &[&str]) -> Self {
        let hub = NetNs::new("hub");
        for bridge in bridges {
            hub.ip(&["link", "add", bridge, "type", "bridge"]);
            hub.ip(&["link", "set", bridge, "up"]);
        }
        Self { hub, ports: 0 }
    }

    /// Plugs `interface` of `ns`, with `address` (CIDR), into `bridge`.
    fn plug(&mut self, bridge: &str, ns: &NetNs, interface: &str, address: &str) {
        let port = format!("p{}", self.ports);
        self.ports += 1;
        ns.ip(&[
            "link",
            "add",
            interface,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.hub.name,
        ]);
        ns.ip(&["addr", "add", address, "dev", interface]);
        ns.ip(&["link", "set", interface, "up"]);
        self.hub.ip(&["link", "set", &port, "master", bridge, "up"]);
    }
}

/// Name servers `web1..` on `addresses`, port [`UPSTREAM_PORT`], each in a
/// namespace of its own plugged into `bridge`.
fn upstreams(
    switch: &mut Switch,
    bridge: &str,
    addresses: &[Ipv4Addr],
) -> (Vec<NameServer>, Vec<NetNs>) {
    addresses
        .iter()
        .enumerate()
        .map(|(i, address)| {
            let ns = NetNs::new(&format!("up{}", i + 1));
            switch.plug(bridge, &ns, "eth0", &format!("{address}/24"));
            let server = NameServer::start(
                &ns,
                SocketAddr::from((*address, UPSTREAM_PORT)),
                &format!("web{}", i + 1),
            );
            (server, ns)
        })
        .unzip()
}

/// The port of the upstreams in dist/ha/lobby.yaml and dist/ecmp/lobby.yaml.
pub const UPSTREAM_PORT: u16 = 8080;
/// The targets' port in the same files.
pub const PORT: u16 = 80;

/// Tries a new connection to `target` every `every` until one is answered;
/// returns the time from `since` and the upstream's name.
pub fn first_answer(
    client: &NetNs,
    target: SocketAddr,
    since: Instant,
    deadline: Duration,
) -> (Duration, String) {
    wait_for("a new connection to be answered", deadline, || {
        let stream = client.connect(target, Duration::from_millis(300)).ok()?;
        let name = crate::server::read_name(stream).ok()?;
        Some((since.elapsed(), name))
    })
}

/// `count` new connections to `target`, all answered: the upstreams'
/// names in order.
pub fn names(client: &NetNs, target: SocketAddr, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| ask_name(client, target).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect()
}

pub mod standby {
    //! Active/standby: two Lobby hosts with the same lobby.yaml under
    //! keepalived (dist/ha/keepalived.conf), conntrackd syncing their
    //! connections over a link of their own (dist/ha/conntrackd.conf).
    //!
    //! ```text
    //!                 client 198.18.0.2
    //!                        | (client side: a bridge in the hub namespace)
    //!  198.18.0.11 eth0 host A    host B eth0 198.18.0.12    VIP 198.18.0.1
    //!  198.18.2.1  eth2 ---sync link--- eth2 198.18.2.2
    //!  198.18.1.11 eth1           eth1 198.18.1.12            VIP 198.18.1.1
    //!                        | (upstream side: a bridge)
    //!          web1 198.18.1.21, web2 .22, web3 .23 (no route to the client)
    //! ```
    use super::*;

    /// The long-lived connections that must survive a failover.
    pub const LONG_LIVED: usize = 10;
    pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    pub const CLIENT_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    pub const UPSTREAM_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
    pub const UPSTREAMS: [Ipv4Addr; 3] = [
        Ipv4Addr::new(198, 18, 1, 21),
        Ipv4Addr::new(198, 18, 1, 22),
        Ipv4Addr::new(198, 18, 1, 23),
    ];
    /// The interfaces of a host, as in the dist files.
    pub const INTERFACES: [&str; 3] = ["eth0", "eth1", "eth2"];

    /// Per host: its name, VRRP priority, addresses on eth0, eth1, eth2
    /// and the peer's sync address.
    const HOSTS: [(&str, &str, [&str; 3], &str); 2] = [
        (
            "a",
            "150",
            ["198.18.0.11/24", "198.18.1.11/24", "198.18.2.1/24"],
            "198.18.2.2",
        ),
        (
            "b",
            "100",
            ["198.18.0.12/24", "198.18.1.12/24", "198.18.2.2/24"],
            "198.18.2.1",
        ),
    ];

    pub struct Standby {
        pub hosts: [Host; 2],
        pub client: NetNs,
        pub servers: Vec<NameServer>,
        pub upstreams: Vec<NetNs>,
        _switch: Switch,
        /// Whether conntrackd syncs the hosts.
        pub sync: bool,
    }

    impl Standby {
        /// The topology with conntrackd (if `sync`), Lobby and keepalived
        /// running on both hosts, once host A is master.
        pub fn start(sync: bool) -> Self {
            let mut switch = Switch::new(&["csw", "usw"]);
            let client = NetNs::new("client");
            switch.plug("csw", &client, "eth0", &format!("{CLIENT}/24"));
            let hosts = HOSTS.map(|(name, _, addresses, _)| {
                let host = Host::new(&format!("lobby-{name}"));
                switch.plug("csw", &host.ns, "eth0", addresses[0]);
                switch.plug("usw", &host.ns, "eth1", addresses[1]);
                host
            });
            veth(
                &hosts[0].ns,
                "eth2",
                HOSTS[0].2[2],
                &hosts[1].ns,
                "eth2",
                HOSTS[1].2[2],
            );
            let (servers, upstreams) = upstreams(&mut switch, "usw", &UPSTREAMS);
            let mut standby = Self {
                hosts,
                client,
                servers,
                upstreams,
                _switch: switch,
                sync,
            };
            for i in 0..2 {
                standby.start_host(i);
            }
            wait_for("host A to become master", Duration::from_secs(20), || {
                (standby.holds_addresses(0) && !standby.holds_addresses(1)).then_some(())
            });
            standby
        }

        fn start_host(&mut self, i: usize) {
            let (_, priority, _, peer) = HOSTS[i];
            let own = HOSTS[i].2[2].trim_end_matches("/24");
            let host = &mut self.hosts[i];
            let conntrackd_conf = host.write(
                "conntrackd.conf",
                &replaced(
                    &dist("ha/conntrackd.conf"),
                    &[
                        (
                            "IPv4_address 198.18.2.1\n",
                            &format!("IPv4_address {own}\n"),
                        ),
                        (
                            "IPv4_Destination_Address 198.18.2.2",
                            &format!("IPv4_Destination_Address {peer}"),
                        ),
                        (
                            "/var/log/conntrackd.log",
                            &host.path("conntrackd.log").display().to_string(),
                        ),
                        (
                            "/var/lock/conntrackd.lock",
                            &host.path("conntrackd.lock").display().to_string(),
                        ),
                        (
                            "/var/run/conntrackd.ctl",
                            &host.path("conntrackd.ctl").display().to_string(),
                        ),
                    ],
                ),
            );
            if self.sync {
                let daemon = Daemon::start(
                    &host.ns,
                    "conntrackd",
                    Command::new("conntrackd").args(["-C", &conntrackd_conf]),
                    host.path("conntrackd.out"),
                );
                host.daemons.push(daemon);
                let socket = host.path("conntrackd.ctl");
                wait_for("conntrackd's socket", Duration::from_secs(10), || {
                    socket.exists().then_some(())
                });
            }
            host.lobby = Some(Lobby::start(&host.ns, &dist("ha/lobby.yaml")));
            let hook = host.write(
                "conntrackd-notify.sh",
                &replaced(
                    &dist("ha/conntrackd-notify.sh"),
                    &[("/etc/conntrackd/conntrackd.conf", &conntrackd_conf)],
                ),
            );
            set_mode(&hook, 0o755);
            let keepalived_conf = host.write(
                "keepalived.conf",
                &replaced(
                    &dist("ha/keepalived.conf"),
                    &[
                        ("priority 150", &format!("priority {priority}")),
                        ("/etc/keepalived/conntrackd-notify.sh", &hook),
                    ],
                ),
            );
            let vrrp_pid = host.path("vrrp.pid");
            let daemon = Daemon::start(
                &host.ns,
                "keepalived",
                Command::new("keepalived")
                    .args(["--dont-fork", "--log-console", "--log-detail", "--vrrp"])
                    .args(["--use-file", &keepalived_conf])
                    .arg("--pid")
                    .arg(host.path("keepalived.pid"))
                    .arg("--vrrp_pid")
                    .arg(&vrrp_pid),
                host.path("keepalived.log"),
            )
            .with_pid_file(vrrp_pid);
            host.daemons.push(daemon);
        }

        /// Whether host `i` holds both virtual addresses. A failed host
        /// keeps them on its dead links: ask about one host at a time.
        pub fn holds_addresses(&self, i: usize) -> bool {
            self.hosts[i].has_address("eth0", CLIENT_VIP)
                && self.hosts[i].has_address("eth1", UPSTREAM_VIP)
        }

        /// The target as the client sees it.
        pub fn target(&self) -> SocketAddr {
            SocketAddr::from((CLIENT_VIP, PORT))
        }

        /// The connections in host `i`'s conntrackd external cache: what
        /// it would commit on becoming master.
        pub fn external_cache(&mut self, i: usize) -> usize {
            let conf = self.hosts[i].path("conntrackd.conf");
            let listing = self.hosts[i]
                .ns
                .try_exec("conntrackd", &["-C", &conf.display().to_string(), "-e"]);
            String::from_utf8_lossy(&listing.stdout)
                .lines()
                .filter(|l| l.contains("tcp") && l.contains(&format!("dst={CLIENT_VIP} ")))
                .count()
        }

        /// Opens [`LONG_LIVED`] connections through the master and checks
        /// that each echoes and that they went to every upstream.
        pub fn open_long_lived(&self) -> Vec<Conversation> {
            let conversations: Vec<Conversation> = (0..LONG_LIVED)
                .map(|i| {
                    let mut c = Conversation::open(&self.client, self.target())
                        .unwrap_or_else(|e| panic!("connection {i}: {e}"));
                    c.exchange(&format!("before {i}"), Duration::from_secs(5))
                        .unwrap_or_else(|e| panic!("connection {i} before the failover: {e}"));
                    c
                })
                .collect();
            let upstreams: BTreeSet<&str> =
                conversations.iter().map(|c| c.upstream.as_str()).collect();
            assert_eq!(upstreams.len(), 3, "balanced over all three: {upstreams:?}");
            conversations
        }

        /// Fails host A while every connection in `conversations` has a
        /// line in flight (`after N`), then waits for a new connection
        /// through host B; returns the time from the failure to that
        /// connection's answer.
        pub fn fail_master(&mut self, conversations: &mut [Conversation]) -> Duration {
            let failed = self.fail(0);
            for (i, c) in conversations.iter_mut().enumerate() {
                c.send(&format!("after {i}"))
                    .unwrap_or_else(|e| panic!("connection {i}: sending after the failover: {e}"));
            }
            let (elapsed, _) =
                first_answer(&self.client, self.target(), failed, Duration::from_secs(20));
            // keepalived adds the addresses one instance after the other.
            wait_for(
                "host B to hold both addresses",
                Duration::from_secs(2),
                || self.holds_addresses(1).then_some(()),
            );
            elapsed
        }

        /// Six new connections, balanced by host B over all upstreams and
        /// seen by its counters; returns the upstreams' names.
        pub fn assert_backup_balances(&self) -> Vec<String> {
            let before = self.hosts[1].connections();
            let names = names(&self.client, self.target(), 6);
            let distinct: BTreeSet<&String> = names.iter().collect();
            assert_eq!(distinct.len(), 3, "host B balances over all: {names:?}");
            wait_for(
                "host B's counters to see the new connections",
                Duration::from_secs(5),
                || (self.hosts[1].connections() >= before + 6).then_some(()),
            );
            names
        }

        /// Host `i` fails like a host that loses power: its daemons are
        /// frozen first (keepalived would otherwise see its links go down
        /// and send priority-0 adverts, a clean handover), then its links
        /// go down, then everything is killed. Returns when the links went
        /// down.
        pub fn fail(&mut self, i: usize) -> Instant {
            let host = &mut self.hosts[i];
            for daemon in &host.daemons {
                daemon.signal(libc::SIGSTOP);
            }
            host.lobby().signal(libc::SIGSTOP);
            host.unplug(&INTERFACES);
            let failed = Instant::now();
            for daemon in &mut host.daemons {
                daemon.kill();
            }
            if let Some(mut lobby) = host.lobby.take() {
                lobby.stop_with(libc::SIGKILL);
            }
            failed
        }
    }
}

pub mod ecmp {
    //! Active/active: two Lobby hosts announce the same /32 with BIRD
    //! (dist/ecmp/bird-lobby.conf) to a router running BIRD with ECMP and
    //! BFD (dist/ecmp/bird-router.conf); each masquerades toward the
    //! upstreams.
    //!
    //! ```text
    //!  client 198.18.10.2-21 -- 198.18.10.1 router 198.18.11.1 -- 198.18.11.2 host A
    //!                                             198.18.12.1 -- 198.18.12.2 host B
    //!  hosts: VIP 198.18.20.1/32 on lo; eth1 198.18.21.11 (A), .12 (B)
    //!  upstream side (a bridge): web1 198.18.21.21, web2 .22, web3 .23
    //! ```
    use super::*;

    pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 20, 1);
    pub const CLIENTS: usize = 20;
    pub const UPSTREAMS: [Ipv4Addr; 3] = [
        Ipv4Addr::new(198, 18, 21, 21),
        Ipv4Addr::new(198, 18, 21, 22),
        Ipv4Addr::new(198, 18, 21, 23),
    ];

    /// Client address `i` of [`CLIENTS`].
    pub fn client_addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 10, 2 + i as u8)
    }

    /// Per host: name, the router's and the host's address on their link,
    /// the host's upstream-side address.
    const HOSTS: [(&str, &str, &str, &str); 2] = [
        ("a", "198.18.11.1", "198.18.11.2", "198.18.21.11/24"),
        ("b", "198.18.12.1", "198.18.12.2", "198.18.21.12/24"),
    ];

    pub struct Ecmp {
        pub hosts: [Host; 2],
        /// The router, with its BIRD in `daemons`.
        pub router: Host,
        pub client: NetNs,
        pub servers: Vec<NameServer>,
        pub upstreams: Vec<NetNs>,
        _switch: Switch,
    }

    impl Ecmp {
        /// The topology with BIRD on the router and BIRD and Lobby on both
        /// hosts, once the router has a next hop for each host.
        pub fn start() -> Self {
            let mut switch = Switch::new(&["usw"]);
            let client = NetNs::new("client");
            let mut router = Host::new("router");
            veth(
                &client,
                "eth0",
                &format!("{}/24", client_addr(0)),
                &router.ns,
                "eth0",
                "198.18.10.1/24",
            );
            for i in 1..CLIENTS {
                client.ip(&[
                    "addr",
                    "add",
                    &format!("{}/24", client_addr(i)),
                    "dev",
                    "eth0",
                ]);
            }
            client.ip(&["route", "add", &format!("{VIP}/32"), "via", "198.18.10.1"]);
            router.ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
            let hosts = HOSTS.map(|(name, router_addr, host_addr, upstream_side)| {
                let host = Host::new(&format!("lobby-{name}"));
                let router_if = format!("eth{}", if name == "a" { 1 } else { 2 });
                veth(
                    &router.ns,
                    &router_if,
                    &format!("{router_addr}/24"),
                    &host.ns,
                    "eth0",
                    &format!("{host_addr}/24"),
                );
                switch.plug("usw", &host.ns, "eth1", upstream_side);
                host.ns
                    .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
                host.ns
                    .ip(&["route", "add", "198.18.10.0/24", "via", router_addr]);
                host
            });
            let (servers, upstreams) = upstreams(&mut switch, "usw", &UPSTREAMS);
            start_bird(&mut router, &dist("ecmp/bird-router.conf"));
            let mut ecmp = Self {
                hosts,
                router,
                client,
                servers,
                upstreams,
                _switch: switch,
            };
            for (host, (_, router_addr, host_addr, _)) in ecmp.hosts.iter_mut().zip(HOSTS) {
                host.lobby = Some(Lobby::start(&host.ns, &dist("ecmp/lobby.yaml")));
                let conf = replaced(
                    &dist("ecmp/bird-lobby.conf"),
                    &[("198.18.11.2", host_addr), ("198.18.11.1", router_addr)],
                );
                start_bird(host, &conf);
            }
            wait_for(
                "the router to have a next hop for each host",
                Duration::from_secs(30),
                || (ecmp.next_hops() == 2).then_some(()),
            );
            ecmp
        }

        /// The next hops of the router's route to the virtual address.
        pub fn next_hops(&self) -> usize {
            let listing = self.router.ns.ip(&["route", "show", &format!("{VIP}/32")]);
            let text = String::from_utf8_lossy(&listing.stdout);
            match text.matches("nexthop via").count() {
                0 => usize::from(text.contains(" via ")),
                n => n,
            }
        }

        pub fn route(&self) -> String {
            let listing = self.router.ns.ip(&["route", "show", &format!("{VIP}/32")]);
            String::from_utf8_lossy(&listing.stdout).trim().to_owned()
        }

        pub fn target(&self) -> SocketAddr {
            SocketAddr::from((VIP, PORT))
        }

        /// One connection from each client address, all answered.
        pub fn from_every_client(&self) -> Result<(), String> {
            (0..CLIENTS).try_for_each(|i| {
                crate::server::ask_name_from(&self.client, client_addr(i).into(), self.target())
                    .map(drop)
                    .map_err(|e| format!("from {}: {e}", client_addr(i)))
            })
        }
    }

    /// BIRD in `host`'s namespace with `conf`, its socket and pid file in
    /// the host's directory.
    fn start_bird(host: &mut Host, conf: &str) {
        let conf = host.write("bird.conf", conf);
        let daemon = Daemon::start(
            &host.ns,
            "bird",
            Command::new("bird")
                .args(["-f", "-c", &conf, "-s"])
                .arg(host.path("bird.ctl"))
                .arg("-P")
                .arg(host.path("bird.pid")),
            host.path("bird.log"),
        );
        host.daemons.push(daemon);
    }
}

fn set_mode(path: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {path}: {e}"));
}
