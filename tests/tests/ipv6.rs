//! IPv6 end to end: an IPv6 client balanced over IPv6 upstreams, a
//! dual-stack target that balances each client over its own family's
//! upstreams, and an upstream whose name has only an AAAA record.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use lobby_tests::{
    Lobby, NameServer, NetNs, Topology,
    dns::{Dnsmasq, RESOLVER_A, resolver_namespace},
    fixtures::{ConfigBuilder, UPSTREAM_PORT, count, target_addr},
    privileged,
    server::ask_name,
    wait_for,
};

const PORT: u16 = 8086;

fn server6(topology: &Topology, i: usize) -> NameServer {
    NameServer::start(
        &topology.upstreams[i],
        SocketAddr::from((Topology::upstream_addr6(i), UPSTREAM_PORT)),
        &format!("web{i}"),
    )
}

fn server4(topology: &Topology, i: usize) -> NameServer {
    NameServer::start(
        &topology.upstreams[i],
        SocketAddr::from((Topology::upstream_addr(i), UPSTREAM_PORT)),
        &format!("web{i}"),
    )
}

fn target6() -> SocketAddr {
    SocketAddr::from((Topology::LB_ADDR6, PORT))
}

/// A resolver namespace whose dnsmasq answers a name with `addresses`,
/// and the configuration of target `web` with upstream `web0` on that
/// name: hold all of it for the test's length.
fn web0_on_a_name(topology: &Topology, addresses: &[IpAddr]) -> (NetNs, Dnsmasq, String) {
    const NAME: &str = "web0.lobby.test";
    let resolvers = resolver_namespace(&topology.lb);
    let records: Vec<(&str, IpAddr)> = addresses.iter().map(|a| (NAME, *a)).collect();
    let dnsmasq = Dnsmasq::start(&resolvers, RESOLVER_A, 30, &records);
    let config = ConfigBuilder::new().target("web", PORT).upstream_with(
        "web0",
        NAME,
        UPSTREAM_PORT,
        &format!("dns: {{ servers: [{RESOLVER_A}] }}"),
    );
    (resolvers, dnsmasq, config.build())
}

fn names_at(topology: &Topology, addr: SocketAddr, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| ask_name(&topology.client, addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect()
}

#[test]
fn an_ipv6_client_is_balanced_round_robin_over_ipv6_upstreams() {
    if !privileged() {
        return;
    }
    let topology = Topology::dual_stack(3);
    let _servers: Vec<_> = (0..3).map(|i| server6(&topology, i)).collect();
    let mut config = ConfigBuilder::new().target("web", PORT);
    for i in 0..3 {
        config = config.upstream(
            &format!("web{i}"),
            Topology::upstream_addr6(i),
            UPSTREAM_PORT,
        );
    }
    let lobby = Lobby::start(&topology.lb, &config.build());
    let names = names_at(&topology, target6(), 30);
    for i in 0..3 {
        assert_eq!(count(&names, &format!("web{i}")), 10, "{names:?}");
    }
    // Strict rotation, as for IPv4.
    assert_ne!(names[0], names[1]);
    let stats = lobby.upstream_stats("web", "web0");
    assert_eq!(stats["connections"], 10, "{stats}");
    assert_eq!(
        stats["address"]
            .as_str()
            .unwrap()
            .parse::<IpAddr>()
            .unwrap(),
        IpAddr::V6(Topology::upstream_addr6(0))
    );
}

#[test]
fn a_dual_stack_target_balances_each_client_over_its_own_family() {
    if !privileged() {
        return;
    }
    let topology = Topology::dual_stack(3);
    let _servers = [
        server4(&topology, 0),
        server6(&topology, 1),
        server4(&topology, 2),
    ];
    let config = ConfigBuilder::new()
        .target("web", PORT)
        .upstream("web0", Topology::upstream_addr(0), UPSTREAM_PORT)
        .upstream("web1", Topology::upstream_addr6(1), UPSTREAM_PORT)
        .upstream("web2", Topology::upstream_addr(2), UPSTREAM_PORT);
    let _lobby = Lobby::start(&topology.lb, &config.build());
    let v4 = names_at(&topology, target_addr(PORT), 10);
    assert_eq!(count(&v4, "web0"), 5, "{v4:?}");
    assert_eq!(count(&v4, "web2"), 5, "{v4:?}");
    let v6 = names_at(&topology, target6(), 6);
    assert_eq!(count(&v6, "web1"), 6, "{v6:?}");
}

#[test]
fn an_ipv6_target_without_ipv6_forwarding_is_not_applied_and_says_why() {
    if !privileged() {
        return;
    }
    let topology = Topology::dual_stack(1);
    topology
        .lb
        .exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=0"]);
    let _server = server6(&topology, 0);
    let config = ConfigBuilder::new().target("web", PORT).upstream(
        "web0",
        Topology::upstream_addr6(0),
        UPSTREAM_PORT,
    );
    let mut lobby = Lobby::start(&topology.lb, &config.build());
    lobby.wait_for_log("IPv6 forwarding is off: the IPv6 traffic of target web is not balanced; set net.ipv6.conf.all.forwarding=1");
    let ruleset = topology.lb.lobby_ruleset();
    assert!(!ruleset.contains("dnat ip6 to"), "{ruleset}");
    let forwarding = topology
        .lb
        .exec("sysctl", &["-n", "net.ipv6.conf.all.forwarding"]);
    assert_eq!(String::from_utf8_lossy(&forwarding.stdout).trim(), "0");
}

#[test]
fn an_upstream_whose_name_has_only_an_aaaa_record_carries_traffic() {
    if !privileged() {
        return;
    }
    let topology = Topology::dual_stack(1);
    let (_resolvers, _dnsmasq, config) =
        web0_on_a_name(&topology, &[IpAddr::V6(Topology::upstream_addr6(0))]);
    let _server = server6(&topology, 0);
    let lobby = Lobby::start(&topology.lb, &config);
    wait_for("the AAAA answer", Duration::from_secs(10), || {
        let stats = lobby.upstream_stats("web", "web0");
        (stats["address"] == Topology::upstream_addr6(0).to_string()).then_some(())
    });
    assert_eq!(ask_name(&topology.client, target6()).unwrap(), "web0");
}

#[test]
fn a_name_with_an_a_and_an_aaaa_serves_each_family_at_its_own_address() {
    if !privileged() {
        return;
    }
    let topology = Topology::dual_stack(1);
    let (_resolvers, _dnsmasq, config) = web0_on_a_name(
        &topology,
        &[
            IpAddr::V4(Topology::upstream_addr(0)),
            IpAddr::V6(Topology::upstream_addr6(0)),
        ],
    );
    let upstream = &topology.upstreams[0];
    let _v4 = NameServer::start(
        upstream,
        SocketAddr::from((Topology::upstream_addr(0), UPSTREAM_PORT)),
        "web0 over ipv4",
    );
    let _v6 = NameServer::start(
        upstream,
        SocketAddr::from((Topology::upstream_addr6(0), UPSTREAM_PORT)),
        "web0 over ipv6",
    );
    let lobby = Lobby::start(&topology.lb, &config);
    let entries = wait_for("both addresses", Duration::from_secs(10), || {
        let entries = lobby.upstream_entries("web", "web0");
        (entries.len() == 2).then_some(entries)
    });
    let shown: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["family"].as_str().unwrap(),
                e["address"].as_str().unwrap(),
            )
        })
        .collect();
    let (v4, v6) = (
        Topology::upstream_addr(0).to_string(),
        Topology::upstream_addr6(0).to_string(),
    );
    assert_eq!(shown, [("ipv4", v4.as_str()), ("ipv6", v6.as_str())]);
    for _ in 0..3 {
        assert_eq!(
            ask_name(&topology.client, target_addr(PORT)).unwrap(),
            "web0 over ipv4"
        );
        assert_eq!(
            ask_name(&topology.client, target6()).unwrap(),
            "web0 over ipv6"
        );
    }
    let entries = lobby.upstream_entries("web", "web0");
    assert!(
        entries.iter().all(|e| e["connections"] == 3),
        "each address counted on its own: {entries:?}"
    );
}
