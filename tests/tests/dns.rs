//! FQDN upstreams against real resolvers in a namespace: answers that
//! change, servers that fail, die or never knew the name.
use std::time::{Duration, Instant};

use lobby_tests::{
    Launch, Lobby, Topology,
    dns::{Dnsmasq, FailingDns, Failure, RESOLVER_A, RESOLVER_B, RESOLVER_C, resolver_namespace},
    fixtures::{
        ConfigBuilder, UPSTREAM_PORT, assert_round_robin, count, in_rotation, names, start_servers,
        target_addr,
    },
    privileged,
    server::{Conversation, ask_name},
    wait_for,
};

const PORT: u16 = 8081;
const NAME: &str = "web.lobby.test";

fn dns(servers: &[std::net::Ipv4Addr], ttl: Option<u32>) -> String {
    let servers: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
    let ttl = ttl.map_or(String::new(), |t| format!(", ttl: {t}"));
    format!("dns: {{ servers: [{}]{ttl} }}", servers.join(", "))
}

/// Upstreams with servers, a resolver namespace, and dnsmasq on RESOLVER_A
/// answering NAME with upstream `answer`'s address and TTL `ttl`. Hold all
/// of it for the test's length.
struct Lab {
    topology: Topology,
    _servers: Vec<lobby_tests::NameServer>,
    resolvers: lobby_tests::NetNs,
    dnsmasq: Dnsmasq,
}

impl Lab {
    fn new(upstreams: usize, ttl: u32, answer: usize) -> Self {
        let topology = Topology::new(upstreams);
        let _servers = start_servers(&topology);
        let resolvers = resolver_namespace(&topology.lb);
        let dnsmasq = Dnsmasq::start(
            &resolvers,
            RESOLVER_A,
            ttl,
            &[(NAME, Topology::upstream_addr(answer))],
        );
        Self {
            topology,
            _servers,
            resolvers,
            dnsmasq,
        }
    }
}

#[test]
fn a_changed_answer_moves_traffic_within_the_ttl() {
    if !privileged() {
        return;
    }
    let lab = Lab::new(2, 1, 0);
    let topology = &lab.topology;
    let dnsmasq = &lab.dnsmasq;
    // No `ttl`: the answer's TTL (1 s) is the period.
    let config = ConfigBuilder::new().target("web", PORT).upstream_with(
        "web",
        NAME,
        UPSTREAM_PORT,
        &dns(&[RESOLVER_A], None),
    );
    let lobby = Lobby::start(&topology.lb, &config.build());
    wait_for("the first resolution", Duration::from_secs(10), || {
        in_rotation(topology, 0).then_some(())
    });
    assert_eq!(
        ask_name(&topology.client, target_addr(PORT)).unwrap(),
        "web0"
    );

    dnsmasq.set_records(&[(NAME, Topology::upstream_addr(1))]);
    let changed = Instant::now();
    wait_for("traffic to move", Duration::from_secs(10), || {
        (ask_name(&topology.client, target_addr(PORT)).ok()? == "web1").then_some(())
    });
    let moved = changed.elapsed();
    assert!(
        moved <= Duration::from_secs(2),
        "traffic moved {moved:?} after the answer changed (ttl 1 s)"
    );
    assert!(!in_rotation(topology, 0), "{}", topology.lb.lobby_ruleset());
    assert!(
        lobby.log().contains(&format!(
            "upstream web/web moved from {} to {}",
            Topology::upstream_addr(0),
            Topology::upstream_addr(1)
        )),
        "{}",
        lobby.log()
    );
    let stats = lobby.upstream_stats("web", "web");
    assert_eq!(
        stats["address"],
        Topology::upstream_addr(1).to_string(),
        "{stats}"
    );
}

#[test]
fn a_dead_or_failing_first_server_hands_over_to_the_second() {
    if !privileged() {
        return;
    }
    let lab = Lab::new(1, 60, 0);
    let topology = &lab.topology;
    let _silent = FailingDns::start(&lab.resolvers, RESOLVER_B, Failure::Silent);
    let _servfail = FailingDns::start(&lab.resolvers, RESOLVER_C, Failure::ServFail);
    let config = ConfigBuilder::new()
        .target("dead-first", PORT)
        .upstream_with(
            "web",
            NAME,
            UPSTREAM_PORT,
            &dns(&[RESOLVER_B, RESOLVER_A], None),
        )
        .target("servfail-first", PORT + 1)
        .upstream_with(
            "web",
            NAME,
            UPSTREAM_PORT,
            &dns(&[RESOLVER_C, RESOLVER_A], None),
        );
    let lobby = Lobby::start(&topology.lb, &config.build());
    wait_for("both targets to resolve", Duration::from_secs(10), || {
        let stats = lobby.stats();
        let resolved = stats["targets"]
            .as_array()?
            .iter()
            .all(|t| t["upstreams"][0]["address"].is_string());
        resolved.then_some(())
    });
    assert_eq!(
        ask_name(&topology.client, target_addr(PORT)).unwrap(),
        "web0"
    );
    assert_eq!(
        ask_name(&topology.client, target_addr(PORT + 1)).unwrap(),
        "web0"
    );
}

#[test]
fn when_every_server_dies_the_last_address_is_kept() {
    if !privileged() {
        return;
    }
    let mut lab = Lab::new(1, 1, 0);
    let config = ConfigBuilder::new().target("web", PORT).upstream_with(
        "web",
        NAME,
        UPSTREAM_PORT,
        &dns(&[RESOLVER_A], Some(1)),
    );
    let lobby = Lobby::start(&lab.topology.lb, &config.build());
    wait_for("the first resolution", Duration::from_secs(10), || {
        in_rotation(&lab.topology, 0).then_some(())
    });
    lab.dnsmasq.stop();
    wait_for("a failed re-resolution", Duration::from_secs(15), || {
        lobby
            .log()
            .contains(&format!("keeping {}", Topology::upstream_addr(0)))
            .then_some(())
    });
    assert!(
        in_rotation(&lab.topology, 0),
        "{}",
        lab.topology.lb.lobby_ruleset()
    );
    for _ in 0..3 {
        assert_eq!(
            ask_name(&lab.topology.client, target_addr(PORT)).unwrap(),
            "web0"
        );
    }
}

#[test]
fn without_servers_the_namespaces_resolv_conf_is_used() {
    if !privileged() {
        return;
    }
    let lab = Lab::new(1, 60, 0);
    let topology = &lab.topology;
    topology
        .lb
        .set_resolv_conf(&format!("nameserver {RESOLVER_A}\n"));
    let config = ConfigBuilder::new()
        .target("web", PORT)
        .upstream("web", NAME, UPSTREAM_PORT);
    let _lobby = Lobby::start_with(&topology.lb, &config.build(), Launch::IpNetnsExec);
    wait_for(
        "resolution through resolv.conf",
        Duration::from_secs(10),
        || in_rotation(topology, 0).then_some(()),
    );
    assert_eq!(
        ask_name(&topology.client, target_addr(PORT)).unwrap(),
        "web0"
    );
}

#[test]
fn a_name_that_never_resolves_gets_no_traffic_and_harms_nothing() {
    if !privileged() {
        return;
    }
    let lab = Lab::new(2, 1, 1);
    let topology = &lab.topology;
    let dnsmasq = &lab.dnsmasq;
    let config = ConfigBuilder::new()
        .target("web", PORT)
        .upstream("web0", Topology::upstream_addr(0), UPSTREAM_PORT)
        .upstream_with(
            "ghost",
            "nowhere.lobby.test",
            UPSTREAM_PORT,
            &dns(&[RESOLVER_A], None),
        )
        // Two more upstreams on one name and resolver: resolved once per period.
        .target("shared", PORT + 1)
        .upstream_with("a", NAME, UPSTREAM_PORT, &dns(&[RESOLVER_A], Some(1)))
        .upstream_with("b", NAME, UPSTREAM_PORT, &dns(&[RESOLVER_A], Some(1)));
    let lobby = Lobby::start(&topology.lb, &config.build());
    wait_for(
        "the failed resolution to be logged",
        Duration::from_secs(10),
        || {
            lobby
                .log()
                .contains("its upstreams stay unavailable")
                .then_some(())
        },
    );
    for _ in 0..4 {
        assert_eq!(
            ask_name(&topology.client, target_addr(PORT)).unwrap(),
            "web0"
        );
    }
    let ghost = lobby.upstream_stats("web", "ghost");
    assert!(
        ghost["address"].is_null() && ghost["available"] == false,
        "{ghost}"
    );

    let before = dnsmasq.queries(NAME);
    std::thread::sleep(Duration::from_secs(3));
    let queries = dnsmasq.queries(NAME) - before;
    // One query per 1 s period for both upstreams, not one each.
    assert!(
        (2..=4).contains(&queries),
        "{queries} queries for {NAME} in 3 s"
    );
    assert!(
        lobby.stats()["targets"].as_array().unwrap().len() == 2,
        "the daemon still answers"
    );
}

#[test]
fn a_healthy_first_server_is_the_only_one_asked() {
    if !privileged() {
        return;
    }
    let lab = Lab::new(1, 1, 0);
    let topology = &lab.topology;
    let first = &lab.dnsmasq;
    let second = Dnsmasq::start(
        &lab.resolvers,
        RESOLVER_B,
        1,
        &[(NAME, Topology::upstream_addr(0))],
    );
    let config = ConfigBuilder::new().target("web", PORT).upstream_with(
        "web",
        NAME,
        UPSTREAM_PORT,
        &dns(&[RESOLVER_A, RESOLVER_B], Some(1)),
    );
    let _lobby = Lobby::start(&topology.lb, &config.build());
    wait_for("three resolutions", Duration::from_secs(10), || {
        (first.queries(NAME) >= 3).then_some(())
    });
    assert_eq!(
        second.queries(NAME),
        0,
        "the second server was asked while the first answered"
    );
}

#[test]
fn all_addresses_spreads_over_the_answer_and_a_dropped_address_drains() {
    if !privileged() {
        return;
    }
    let lab = Lab::new(3, 1, 0);
    let topology = &lab.topology;
    let every = |count: usize| -> Vec<(&str, std::net::Ipv4Addr)> {
        (0..count)
            .map(|i| (NAME, Topology::upstream_addr(i)))
            .collect()
    };
    lab.dnsmasq.set_records(&every(3));
    let config = ConfigBuilder::new().target("web", PORT).upstream_with(
        "web",
        NAME,
        UPSTREAM_PORT,
        &format!("dns: {{ servers: [{RESOLVER_A}], all_addresses: true }}"),
    );
    let lobby = Lobby::start(&topology.lb, &config.build());
    wait_for("all three addresses", Duration::from_secs(10), || {
        (0..3).all(|i| in_rotation(topology, i)).then_some(())
    });
    assert_round_robin(&names(topology, PORT, 30), 3);
    let entries = lobby.upstream_entries("web", "web");
    let addresses: Vec<&str> = entries
        .iter()
        .map(|e| e["address"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..3)
        .map(|i| Topology::upstream_addr(i).to_string())
        .collect();
    assert_eq!(addresses, expected, "{entries:?}");
    assert!(
        entries
            .iter()
            .all(|e| e["family"] == "ipv4" && e["connections"] == 10),
        "{entries:?}"
    );

    // A live connection to the address about to leave the answer.
    let mut held = (0..3)
        .map(|_| Conversation::open(&topology.client, target_addr(PORT)).expect("connecting"))
        .find(|c| c.upstream == "web2")
        .expect("one of three connections in turn reaches web2");
    lab.dnsmasq.set_records(&every(2));
    wait_for(
        "web2 to leave the rotation",
        Duration::from_secs(10),
        || (!in_rotation(topology, 2)).then_some(()),
    );
    let after = names(topology, PORT, 20);
    assert_eq!(count(&after, "web2"), 0, "{after:?}");
    assert_eq!(count(&after, "web0"), 10, "{after:?}");
    held.exchange("still there", Duration::from_secs(5))
        .expect("the connection to the dropped address survives");
    assert!(
        lobby.log().contains(&format!(
            "upstream web/web no longer resolves to {}; its connections drain",
            Topology::upstream_addr(2)
        )),
        "{}",
        lobby.log()
    );
    assert_eq!(lobby.upstream_entries("web", "web").len(), 2);
}
