//! UDP targets, end to end: flows balanced round-robin (every datagram of a
//! flow to one upstream), a UDP and a TCP target on one port, a UDP health
//! check, and an ICMP port unreachable when no upstream is available.
use std::{net::SocketAddr, time::Duration};

use lobby_tests::{
    Lobby, NameServer, Topology, UdpFlow, UdpNameServer,
    fixtures::{ConfigBuilder, UPSTREAM_PORT, count, in_rotation, target_addr},
    privileged,
    server::ask_name,
    wait_for,
};

const PORT: u16 = 5353;

fn udp_servers(topology: &Topology) -> Vec<UdpNameServer> {
    (0..topology.upstreams.len())
        .map(|i| udp_server(topology, i))
        .collect()
}

fn udp_server(topology: &Topology, i: usize) -> UdpNameServer {
    UdpNameServer::start(
        &topology.upstreams[i],
        SocketAddr::from((Topology::upstream_addr(i), UPSTREAM_PORT)),
        &format!("web{i}"),
    )
}

/// The names answering one datagram on each of `flows` new flows.
/// `flows` flows, each asked once, and their answers. The sockets stay
/// open while the caller holds them: a closed flow's source port may be
/// given to a later one, which conntrack then takes for the same flow
/// (the same upstream, no new connection counted).
fn flows_and_names(topology: &Topology, flows: usize) -> (Vec<UdpFlow>, Vec<String>) {
    let flows: Vec<UdpFlow> = (0..flows)
        .map(|_| UdpFlow::open(&topology.client, target_addr(PORT)))
        .collect();
    let names = flows
        .iter()
        .enumerate()
        .map(|(i, flow)| flow.ask_name().unwrap_or_else(|e| panic!("flow {i}: {e}")))
        .collect();
    (flows, names)
}

#[test]
fn flows_go_round_robin_and_a_flow_stays_on_its_upstream() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = udp_servers(&topology);
    let config = ConfigBuilder::new()
        .target("dns", PORT)
        .protocol("udp")
        .topology_upstreams(3, "");
    let lobby = Lobby::start(&topology.lb, &config.build());

    let (_flows, names) = flows_and_names(&topology, 30);
    for i in 0..3 {
        assert_eq!(count(&names, &format!("web{i}")), 10, "{names:?}");
    }
    // One flow (one source port): every datagram to the same upstream.
    let flow = UdpFlow::open(&topology.client, target_addr(PORT));
    let first = flow.ask_name().unwrap();
    for _ in 0..19 {
        assert_eq!(flow.ask_name().unwrap(), first);
    }
    // The counters see a connection per flow, and every datagram.
    let total: u64 = (0..3)
        .map(|i| {
            let stats = lobby.upstream_stats("dns", &format!("web{i}"));
            stats["connections"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(total, 31, "30 flows and the long one");
    let long = lobby.upstream_stats("dns", &first);
    assert!(long["packets_out"].as_u64().unwrap() >= 10 + 20, "{long}");
}

#[test]
fn a_udp_and_a_tcp_target_share_a_port_with_their_own_pools() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _tcp = NameServer::start(
        &topology.upstreams[0],
        SocketAddr::from((Topology::upstream_addr(0), UPSTREAM_PORT)),
        "web0",
    );
    let _udp = [udp_server(&topology, 1), udp_server(&topology, 2)];
    let config = ConfigBuilder::new()
        .target("dns-tcp", PORT)
        .upstream("web0", Topology::upstream_addr(0), UPSTREAM_PORT)
        .target("dns-udp", PORT)
        .protocol("udp")
        .upstream("web1", Topology::upstream_addr(1), UPSTREAM_PORT)
        .upstream("web2", Topology::upstream_addr(2), UPSTREAM_PORT);
    let _lobby = Lobby::start(&topology.lb, &config.build());
    for _ in 0..4 {
        assert_eq!(
            ask_name(&topology.client, target_addr(PORT)).unwrap(),
            "web0"
        );
    }
    let (_flows, names) = flows_and_names(&topology, 4);
    assert_eq!(count(&names, "web1"), 2, "{names:?}");
    assert_eq!(count(&names, "web2"), 2, "{names:?}");
}

#[test]
fn without_an_upstream_a_udp_client_gets_port_unreachable() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(1);
    // No server behind it: its check never lets it into rotation.
    let check = format!(
        "health_check:\n  protocol: udp\n  port: {UPSTREAM_PORT}\n  start_available: false\n  probe: {{ check_interval: 1, timeout: 1, success_count: 1 }}"
    );
    let config = ConfigBuilder::new()
        .target("dns", PORT)
        .protocol("udp")
        .topology_upstreams(1, &check);
    let _lobby = Lobby::start(&topology.lb, &config.build());
    let error = UdpFlow::open(&topology.client, target_addr(PORT))
        .ask_name()
        .expect_err("no upstream to answer");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "an ICMP port unreachable, not silence: {error}"
    );
}

#[test]
fn a_stopped_upstream_leaves_rotation_by_its_udp_health_check() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let mut servers: Vec<Option<UdpNameServer>> =
        udp_servers(&topology).into_iter().map(Some).collect();
    let check = format!(
        "health_check:\n  protocol: udp\n  port: {UPSTREAM_PORT}\n  send: ping\n  start_available: true\n  probe: {{ check_interval: 1, timeout: 1, success_count: 1, failure_count: 2 }}"
    );
    let config = ConfigBuilder::new()
        .target("dns", PORT)
        .protocol("udp")
        .topology_upstreams(3, &check);
    let lobby = Lobby::start(&topology.lb, &config.build());
    servers[1] = None;
    let started = std::time::Instant::now();
    // interval x failure_count + timeout, and a second of slack.
    wait_for("web1 to go DOWN", Duration::from_secs(4), || {
        lobby
            .log()
            .contains("upstream dns/web1 is DOWN (ICMP port unreachable")
            .then_some(())
    });
    println!(
        "web1 was DOWN {:?} after its server stopped",
        started.elapsed()
    );
    wait_for("web1 out of the ruleset", Duration::from_secs(2), || {
        (!in_rotation(&topology, 1)).then_some(())
    });
    let (_flows, names) = flows_and_names(&topology, 10);
    assert_eq!(count(&names, "web1"), 0, "{names:?}");
    assert_eq!(count(&names, "web0") + count(&names, "web2"), 10);
}
