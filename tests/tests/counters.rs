//! The eBPF counters against independent kernel counts, through reloads,
//! crashes and a clean shutdown.
use std::io::{Read as _, Write as _};

use lobby_tests::{
    Lobby, NetNs, Topology,
    fixtures::{ConfigBuilder, UPSTREAM_PORT, health_check, start_servers, target_addr},
    privileged,
    server::ask_name,
};

const PORT: u16 = 8081;

/// The test's own table in the load balancer's namespace: nft counters of
/// forwarded traffic to and from each upstream, the independent count.
fn add_reference_counters(lb: &NetNs, upstreams: usize) {
    let mut rules = String::from(
        "table ip lobbytest {\n chain forward {\n  type filter hook forward priority 0; policy accept;\n",
    );
    for i in 0..upstreams {
        let addr = Topology::upstream_addr(i);
        rules.push_str(&format!(
            "  ip daddr {addr} tcp dport {UPSTREAM_PORT} counter comment \"out{i}\"\n"
        ));
        rules.push_str(&format!(
            "  ip saddr {addr} tcp sport {UPSTREAM_PORT} counter comment \"in{i}\"\n"
        ));
    }
    rules.push_str(" }\n}\n");
    load_ruleset(lb, &rules);
}

/// Loads the nft `rules` into `ns`.
fn load_ruleset(ns: &NetNs, rules: &str) {
    let path = std::env::temp_dir().join(format!("{}-test.nft", ns.name));
    std::fs::write(&path, rules).unwrap();
    ns.exec("nft", &["-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(path);
}

/// (packets, bytes) of the reference counter with `comment`.
fn reference(lb: &NetNs, comment: &str) -> (u64, u64) {
    let listing =
        String::from_utf8_lossy(&lb.exec("nft", &["list", "table", "ip", "lobbytest"]).stdout)
            .into_owned();
    let line = listing
        .lines()
        .find(|l| l.contains(&format!("comment \"{comment}\"")))
        .unwrap_or_else(|| panic!("no counter {comment} in {listing}"));
    let number_after = |word: &str| -> u64 {
        let rest = &line[line.find(word).unwrap() + word.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    (number_after("packets "), number_after("bytes "))
}

#[test]
fn counts_equal_the_kernels_own_and_split_by_round_robin() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    add_reference_counters(&topology.lb, 3);
    // Probes on the service port every second: the daemon's own
    // traffic, which must not be counted as the upstreams'.
    let check = health_check(UPSTREAM_PORT, true, 1, 1, 1);
    let lobby = Lobby::start(
        &topology.lb,
        &ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(3, &check)
            .build(),
    );
    // Let some probes run before and during the traffic.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    const N: usize = 30;
    for _ in 0..N {
        // Some payload each way, so that bytes differ from headers alone.
        let mut stream = topology
            .client
            .connect(target_addr(PORT), std::time::Duration::from_secs(5))
            .unwrap();
        let mut greeting = [0u8; 5];
        stream.read_exact(&mut greeting).unwrap();
        stream.write_all(&[7u8; 3000]).unwrap();
        let mut echo = vec![0u8; 3000];
        stream.read_exact(&mut echo).unwrap();
    }
    // Counting is asynchronous to the client: wait until FIN/ACKs settle.
    let settled = |i: usize| {
        let name = format!("web{i}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let stats = lobby.upstream_stats("web", &name);
            let out = reference(&topology.lb, &format!("out{i}"));
            let inn = reference(&topology.lb, &format!("in{i}"));
            let count = |key: &str| stats[key].as_u64().unwrap_or_default();
            let ours = (
                (count("packets_out"), count("bytes_out")),
                (count("packets_in"), count("bytes_in")),
            );
            if ours == (out, inn) {
                break stats;
            }
            // Says which way differs: a probe's late packet shows as one
            // packet in more than the reference.
            assert!(
                std::time::Instant::now() < deadline,
                "{name}: ours (packets, bytes) out/in {ours:?}, the kernel's {:?}",
                (out, inn)
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    // The programs read these Ethernet frames' headers in place (the
    // daemon told them the veth's link header); the helper path is the
    // other tests' too.
    assert!(
        lobby
            .log()
            .lines()
            .any(|l| l.contains("counters attached") && l.contains("link_header=14")),
        "the counters were not told the veth is Ethernet:\n{}",
        lobby.log()
    );
    let mut total = 0;
    for i in 0..3 {
        let stats = settled(i);
        assert_eq!(stats["connections"], 10, "{stats}");
        assert_eq!(stats["resets"], 0, "{stats}");
        assert!(stats["bytes_out"].as_u64().unwrap() > 10 * 3000, "{stats}");
        total += stats["connections"].as_u64().unwrap();
    }
    assert_eq!(total, N as u64);
}

#[test]
fn a_retransmitted_syn_is_one_connection_and_two_packets() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(1);
    let _server = lobby_tests::fixtures::start_server(&topology, 0);
    add_reference_counters(&topology.lb, 1);
    topology.lb.exec(
        "nft",
        &[
            "add",
            "rule",
            "ip",
            "lobbytest",
            "forward",
            "tcp",
            "flags",
            "&",
            "(syn",
            "|",
            "ack)",
            "==",
            "syn",
            "counter",
            "comment",
            "\"syns\"",
        ],
    );
    // The upstream drops the first SYN of each flow (source address and
    // port, after masquerade) and accepts the next: the client's
    // retransmission, 1 s later.
    load_ruleset(
        &topology.upstreams[0],
        &format!(
            "table ip lobbytest {{\n set seen {{\n  type ipv4_addr . inet_service\n  \
             flags dynamic, timeout\n  timeout 1m\n }}\n chain input {{\n  \
             type filter hook input priority 0; policy accept;\n  \
             tcp dport {UPSTREAM_PORT} tcp flags & (syn | ack) == syn ip saddr . tcp sport @seen accept\n  \
             tcp dport {UPSTREAM_PORT} tcp flags & (syn | ack) == syn add @seen {{ ip saddr . tcp sport }} counter drop\n \
             }}\n}}\n"
        ),
    );
    // No health check: the daemon's probes would be SYNs dropped too.
    let lobby = Lobby::start(
        &topology.lb,
        &ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(1, "")
            .build(),
    );
    let started = std::time::Instant::now();
    assert_eq!(
        ask_name(&topology.client, target_addr(PORT)).unwrap(),
        "web0"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= std::time::Duration::from_millis(900),
        "answered in {elapsed:?}: the first SYN was not dropped"
    );
    let dropped = String::from_utf8_lossy(
        &topology.upstreams[0]
            .exec("nft", &["list", "chain", "ip", "lobbytest", "input"])
            .stdout,
    )
    .into_owned();
    assert!(dropped.contains("counter packets 1 "), "{dropped}");

    let stats = lobby_tests::wait_for(
        "the counters to match the reference",
        std::time::Duration::from_secs(10),
        || {
            let stats = lobby.upstream_stats("web", "web0");
            let ours = (stats["packets_out"].as_u64()?, stats["bytes_out"].as_u64()?);
            (ours == reference(&topology.lb, "out0")).then_some(stats)
        },
    );
    // Two SYNs went out, both counted as packets (packets_out equals the
    // reference), one connection.
    assert_eq!(reference(&topology.lb, "syns").0, 2);
    assert_eq!(stats["connections"], 1, "{stats}");
    eprintln!("after a retransmitted SYN: {stats}");
}

#[test]
fn an_available_upstream_that_refuses_shows_resets_and_a_warning() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    // Only web0 serves; web1's port is closed but it has no health check.
    let _server = lobby_tests::fixtures::start_server(&topology, 0);
    let lobby = Lobby::start(
        &topology.lb,
        &ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(2, "")
            .build(),
    );
    let refused = (0..6)
        .filter(|_| ask_name(&topology.client, target_addr(PORT)).is_err())
        .count();
    assert_eq!(refused, 3);
    let stats = lobby_tests::wait_for(
        "resets to be counted",
        std::time::Duration::from_secs(10),
        || {
            let stats = lobby.upstream_stats("web", "web1");
            (stats["resets"] == 3).then_some(stats)
        },
    );
    assert_eq!(stats["connections"], 3, "{stats}");
    lobby_tests::wait_for(
        "the reset warning",
        std::time::Duration::from_secs(10),
        || {
            lobby
                .log()
                .contains(
                    "upstream web/web1 is marked available but answers new connections with resets",
                )
                .then_some(())
        },
    );
}

#[test]
fn counts_survive_a_reload_and_a_crash_and_a_clean_stop_leaves_nothing() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let two = ConfigBuilder::new()
        .target("web", PORT)
        .topology_upstreams(2, "");
    let mut lobby = Lobby::start(&topology.lb, &two.build());
    for _ in 0..4 {
        ask_name(&topology.client, target_addr(PORT)).unwrap();
    }
    let connections = |lobby: &Lobby, name: &str| {
        lobby.upstream_stats("web", name)["connections"]
            .as_u64()
            .unwrap()
    };
    lobby_tests::wait_for(
        "4 connections counted",
        std::time::Duration::from_secs(10),
        || (connections(&lobby, "web0") == 2 && connections(&lobby, "web1") == 2).then_some(()),
    );

    // Reload with a third upstream: the first two keep their counts.
    let before = lobby.log_count("reload applied");
    lobby.write_config(
        &ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(3, "")
            .build(),
    );
    lobby.reload();
    lobby.wait_for_log_count("reload applied", before);
    assert_eq!(
        (connections(&lobby, "web0"), connections(&lobby, "web1")),
        (2, 2)
    );
    assert_eq!(connections(&lobby, "web2"), 0);

    // kill -9 and a new start: the pinned map keeps the counts.
    lobby.stop_with(libc::SIGKILL);
    lobby.restart();
    assert_eq!(
        (connections(&lobby, "web0"), connections(&lobby, "web1")),
        (2, 2)
    );
    for _ in 0..3 {
        ask_name(&topology.client, target_addr(PORT)).unwrap();
    }
    lobby_tests::wait_for(
        "counting to continue",
        std::time::Duration::from_secs(10),
        || {
            let sum: u64 = (0..3)
                .map(|i| connections(&lobby, &format!("web{i}")))
                .sum();
            (sum == 7).then_some(())
        },
    );

    let status = lobby.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
    lobby.assert_nothing_left(&topology.lb);
}

#[test]
fn counting_goes_on_while_the_daemon_is_dead() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(1);
    let _server = lobby_tests::fixtures::start_server(&topology, 0);
    let mut lobby = Lobby::start(
        &topology.lb,
        &ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(1, "")
            .build(),
    );
    let connections = |lobby: &Lobby| {
        lobby.upstream_stats("web", "web0")["connections"]
            .as_u64()
            .unwrap()
    };
    let connect_10 = || {
        for _ in 0..10 {
            assert_eq!(
                ask_name(&topology.client, target_addr(PORT)).unwrap(),
                "web0"
            );
        }
    };
    connect_10();
    lobby_tests::wait_for(
        "10 connections counted",
        std::time::Duration::from_secs(10),
        || (connections(&lobby) == 10).then_some(()),
    );
    assert_eq!(topology.lb.tc_programs("up0"), [1, 1]);

    lobby.stop_with(libc::SIGKILL);
    // The programs stay attached and keep counting into the pinned map.
    assert_eq!(topology.lb.tc_programs("up0"), [1, 1]);
    connect_10();
    lobby.restart();
    lobby_tests::wait_for(
        "the 10 connections made while lobby was dead",
        std::time::Duration::from_secs(10),
        || (connections(&lobby) == 20).then_some(()),
    );
    // The restarted daemon took the links over: one program each way.
    assert_eq!(topology.lb.tc_programs("up0"), [1, 1]);
    connect_10();
    lobby_tests::wait_for(
        "30 connections counted",
        std::time::Duration::from_secs(10),
        || (connections(&lobby) == 30).then_some(()),
    );

    let status = lobby.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
    lobby.assert_nothing_left(&topology.lb);
}

/// The index of `interface` in `ns`.
fn ifindex(ns: &NetNs, interface: &str) -> u32 {
    let line =
        String::from_utf8_lossy(&ns.ip(&["-o", "link", "show", interface]).stdout).into_owned();
    line.split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no index in {line:?}"))
}

#[test]
fn counting_follows_an_interface_deleted_and_created_again_under_its_name() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(1);
    let _server = lobby_tests::fixtures::start_server(&topology, 0);
    let lobby = Lobby::start(
        &topology.lb,
        &ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(1, "")
            .build(),
    );
    let connections = || {
        lobby.upstream_stats("web", "web0")["connections"]
            .as_u64()
            .unwrap()
    };
    for _ in 0..2 {
        ask_name(&topology.client, target_addr(PORT)).unwrap();
    }
    lobby_tests::wait_for(
        "2 connections counted",
        std::time::Duration::from_secs(10),
        || (connections() == 2).then_some(()),
    );

    // What a bridge deleted and re-added by a network manager looks like:
    // the same name and addresses, a new index. The kernel removed the
    // programs with the old interface.
    let old_index = ifindex(&topology.lb, "up0");
    topology.lb.ip(&["link", "del", "up0"]);
    let upstream = &topology.upstreams[0];
    topology.lb.ip(&[
        "link",
        "add",
        "up0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &upstream.name,
    ]);
    topology.lb.ip(&[
        "addr",
        "add",
        &format!("{}/24", Topology::lb_addr_toward(0)),
        "dev",
        "up0",
    ]);
    upstream.ip(&[
        "addr",
        "add",
        &format!("{}/24", Topology::upstream_addr(0)),
        "dev",
        "eth0",
    ]);
    topology.lb.ip(&["link", "set", "up0", "up"]);
    upstream.ip(&["link", "set", "eth0", "up"]);
    assert_ne!(ifindex(&topology.lb, "up0"), old_index);

    // Connections keep flowing; within the daemon's 5 s re-check they are
    // counted again.
    let started = std::time::Instant::now();
    lobby_tests::wait_for(
        "counting to resume on the new interface",
        std::time::Duration::from_secs(10),
        || {
            ask_name(&topology.client, target_addr(PORT)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(100));
            (connections() > 2).then_some(())
        },
    );
    eprintln!("counting resumed after {:?}", started.elapsed());
    assert!(
        lobby.log().contains("interface up0 was recreated"),
        "{}",
        lobby.log()
    );
    // And counts exactly again.
    let before = connections();
    for _ in 0..3 {
        ask_name(&topology.client, target_addr(PORT)).unwrap();
    }
    lobby_tests::wait_for(
        "3 more connections counted",
        std::time::Duration::from_secs(10),
        || (connections() == before + 3).then_some(()),
    );
}

/// Answers to the daemon's probes that arrive after the probe's socket is
/// gone are the probe's, not the upstream's: an upstream that answers a
/// UDP probe 1.5 s late (after the 1 s timeout) shows no traffic at all.
/// (A TCP upstream that greets before the probe's reset reaches it sends
/// the same kind of late packet, timing-dependent.)
#[test]
fn late_answers_to_probes_are_not_counted() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(1);
    let socket = topology.upstreams[0].within(|| {
        std::net::UdpSocket::bind((Topology::upstream_addr(0), UPSTREAM_PORT)).expect("bind")
    });
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    {
        let answered = answered.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((_, from)) = socket.recv_from(&mut buf) {
                let (socket, answered) = (socket.try_clone().unwrap(), answered.clone());
                std::thread::spawn(move || {
                    std::thread::sleep(std::time::Duration::from_millis(1500));
                    if socket.send_to(b"late", from).is_ok() {
                        answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
    }
    let check = format!(
        "health_check:\n  protocol: udp\n  port: {UPSTREAM_PORT}\n  send: ping\n  start_available: true\n  probe: {{ check_interval: 1, timeout: 1, success_count: 1, failure_count: 1 }}"
    );
    let lobby = Lobby::start(
        &topology.lb,
        &ConfigBuilder::new()
            .target("dns", PORT)
            .protocol("udp")
            .topology_upstreams(1, &check)
            .build(),
    );
    // The answers as the load balancer's namespace receives them.
    load_ruleset(
        &topology.lb,
        &format!(
            "table ip lobbytest {{\n chain late {{\n  type filter hook prerouting priority -400; policy accept;\n  ip saddr {} udp sport {UPSTREAM_PORT} counter comment \"late\"\n }}\n}}\n",
            Topology::upstream_addr(0)
        ),
    );
    lobby_tests::wait_for(
        "three late answers",
        std::time::Duration::from_secs(20),
        || (reference(&topology.lb, "late").0 >= 3).then_some(()),
    );
    assert!(answered.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    let stats = lobby.upstream_stats("dns", "web0");
    for key in ["packets_in", "bytes_in", "packets_out", "connections"] {
        assert_eq!(stats[key], 0, "{key} in {stats}");
    }
}
