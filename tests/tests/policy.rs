//! Traffic policy end to end: allow and block lists drop refused sources
//! silently and count them, source_nat decides the address upstreams see
//! (an address pool spreads one client and keeps two apart), and
//! `interface` balances only traffic arriving on that interface.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write as _,
    net::{IpAddr, SocketAddr, TcpStream},
    time::Duration,
};

use lobby_tests::{
    Lobby, Topology,
    fixtures::{ConfigBuilder, UPSTREAM_PORT, spaced_prefixes, start_servers, target_addr},
    privileged,
    server::{ask_name, ask_name_from, connect_from, read_name},
    wait_for,
};

const PORT: u16 = 8081;

/// The config of one target over the topology's upstreams with `policy`
/// (YAML lines of the target).
fn config(upstreams: usize, policy: &str) -> String {
    let yaml = ConfigBuilder::new()
        .target("web", PORT)
        .topology_upstreams(upstreams, "")
        .build();
    yaml.replace(
        "        upstream_group:\n",
        &format!("{policy}        upstream_group:\n"),
    )
}

fn denied(lobby: &Lobby, reason: &str) -> u64 {
    lobby.stats()["targets"][0]["denied"][reason]
        .as_u64()
        .unwrap()
}

/// A second client address, whose connections are refused by a policy:
/// nothing answers them, not even a reset.
fn refused_silently(topology: &Topology) {
    let other = IpAddr::V4(Topology::OTHER_CLIENT_ADDR);
    let error = ask_name_from(&topology.client, other, target_addr(PORT))
        .expect_err("a refused source gets nothing");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
}

#[test]
fn allow_and_block_drop_refused_sources_silently_and_count_them() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(1);
    let _servers = start_servers(&topology);
    topology.add_other_client();

    let lobby = Lobby::start(&topology.lb, &config(1, "        allow: [198.18.0.0/25]\n"));
    assert_eq!(
        ask_name(&topology.client, target_addr(PORT)).unwrap(),
        "web0"
    );
    refused_silently(&topology);
    assert!(denied(&lobby, "not_allowed") > 0);
    assert_eq!(denied(&lobby, "blocked"), 0);

    lobby.reload_with(&config(1, "        block: [198.18.0.128/25]\n"));
    assert_eq!(
        ask_name(&topology.client, target_addr(PORT)).unwrap(),
        "web0"
    );
    refused_silently(&topology);
    assert!(denied(&lobby, "blocked") > 0);
}

/// Block lists of many prefixes of one length are looked up by hash (the
/// address itself, or masked to the length): the blocked source is refused
/// by either kind of rule, the other balanced.
#[test]
fn a_block_list_looked_up_by_hash_blocks_by_address_and_by_masked_prefix() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(1);
    let _servers = start_servers(&topology);
    topology.add_other_client();
    let block = |blocked: &str, others: Vec<String>| {
        format!("        block: [{blocked}, {}]\n", others.join(", "))
    };
    let addresses = block(
        &format!("{}/32", Topology::OTHER_CLIENT_ADDR),
        spaced_prefixes(999).collect(),
    );
    // (A listing shows a hash set of addresses and a tree of /32s alike.)
    let lobby = Lobby::start(&topology.lb, &config(1, &addresses));
    refused_silently(&topology);
    assert_eq!(
        ask_name(&topology.client, target_addr(PORT)).unwrap(),
        "web0"
    );
    let blocked = denied(&lobby, "blocked");
    assert!(blocked > 0);

    let halves = (1..1000).map(|i| format!("10.{}.{}.0/25", i / 256, i % 256));
    lobby.reload_with(&config(1, &block("198.18.0.128/25", halves.collect())));
    let ruleset = topology.lb.lobby_ruleset();
    assert!(
        ruleset.contains("ip saddr & 255.255.255.128 == { "),
        "the /25s in a hash set of masked addresses:\n{ruleset}"
    );
    refused_silently(&topology);
    assert_eq!(
        ask_name(&topology.client, target_addr(PORT)).unwrap(),
        "web0"
    );
    assert!(denied(&lobby, "blocked") > blocked);
}

/// A topology of one upstream whose server answers each connection with
/// the address it sees the connection come from.
fn peer_reporting_topology() -> Topology {
    let topology = Topology::new(1);
    let upstream = SocketAddr::from((Topology::upstream_addr(0), UPSTREAM_PORT));
    let listener = topology.upstreams[0].listen(upstream);
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let peer = stream
                .peer_addr()
                .map(|p| p.ip().to_string())
                .unwrap_or_default();
            let _ = writeln!(stream, "{peer}");
        }
    });
    topology
}

fn seen_source(topology: &Topology) -> String {
    read_name(
        topology
            .client
            .connect(target_addr(PORT), Duration::from_secs(5))
            .unwrap(),
    )
    .unwrap()
}

#[test]
fn source_nat_decides_the_address_upstreams_see() {
    if !privileged() {
        return;
    }
    let topology = peer_reporting_topology();

    // The default: the load balancer's address on the upstream's link.
    let lobby = Lobby::start(&topology.lb, &config(1, ""));
    assert_eq!(
        seen_source(&topology),
        Topology::lb_addr_toward(0).to_string()
    );

    // none: the client's own; its replies must route back through Lobby.
    topology.upstreams[0].ip(&[
        "route",
        "add",
        "198.18.0.0/24",
        "via",
        &Topology::lb_addr_toward(0).to_string(),
    ]);
    lobby.reload_with(&config(1, "        source_nat: none\n"));
    // Masqueraded a moment longer: a connection translated just before the
    // reload may still reach postrouting (the backend lingers 2 s).
    let client = Topology::CLIENT_ADDR.to_string();
    wait_for("the client's own address", Duration::from_secs(5), || {
        (seen_source(&topology) == client).then_some(())
    });

    // An address of the load balancer's, as keepalived would add a VIP.
    topology
        .lb
        .ip(&["addr", "add", "198.18.1.250/24", "dev", "up0"]);
    lobby.reload_with(&config(
        1,
        "        source_nat: { address: 198.18.1.250 }\n",
    ));
    assert_eq!(seen_source(&topology), "198.18.1.250");
}

/// The SNAT pool of [`a_snat_pool_spreads_one_client_and_keeps_two_clients_apart`]:
/// addresses of the load balancer's on the upstream's link.
const POOL: [&str; 4] = [
    "198.18.1.250",
    "198.18.1.251",
    "198.18.1.252",
    "198.18.1.253",
];

#[test]
fn a_snat_pool_spreads_one_client_and_keeps_two_clients_apart() {
    if !privileged() {
        return;
    }
    let topology = peer_reporting_topology();
    let other = topology.add_other_client();
    for address in POOL {
        topology
            .lb
            .ip(&["addr", "add", &format!("{address}/24"), "dev", "up0"]);
    }
    let _lobby = Lobby::start(
        &topology.lb,
        &config(
            1,
            &format!("        source_nat: {{ address: [{}] }}\n", POOL.join(", ")),
        ),
    );

    // One client, from the ports its kernel picks: the whole pool.
    let seen = topology.client.within(|| {
        (0..400)
            .map(|_| {
                let stream = TcpStream::connect_timeout(&target_addr(PORT), Duration::from_secs(5));
                read_name(stream.unwrap()).unwrap()
            })
            .collect::<Vec<String>>()
    });
    let mut per_address: BTreeMap<String, usize> = BTreeMap::new();
    for address in seen {
        *per_address.entry(address).or_default() += 1;
    }
    assert_eq!(
        per_address.keys().collect::<Vec<_>>(),
        POOL.iter().collect::<Vec<_>>(),
        "{per_address:?}"
    );
    // About 100 each: far below that is not a spread.
    assert!(per_address.values().all(|&n| n >= 40), "{per_address:?}");

    // Two clients on one source port: the other's address is the first's
    // rotated by the distance of their buckets (the last bytes 2 and 200
    // modulo 4), the same on every port, so never the same. The ports lie
    // below the ephemeral range (32768-60999), where none of the 400
    // connections above can still hold one in TIME_WAIT.
    let client = IpAddr::V4(Topology::CLIENT_ADDR);
    let pool_index = |source: IpAddr, port: u16| {
        let source = SocketAddr::new(source, port);
        let stream = topology
            .client
            .within(move || connect_from(source, target_addr(PORT), Duration::from_secs(5)));
        let seen = read_name(stream.unwrap()).unwrap();
        POOL.iter()
            .position(|a| *a == seen)
            .unwrap_or_else(|| panic!("{source} seen as {seen}, outside the pool"))
    };
    let distances: BTreeSet<usize> = (21000..21016)
        .map(|port| (pool_index(other, port) + POOL.len() - pool_index(client, port)) % POOL.len())
        .collect();
    assert_eq!(distances, BTreeSet::from([2]));
}

#[test]
fn only_traffic_on_the_named_interface_is_balanced() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let _lobby = Lobby::start(&topology.lb, &config(1, "        interface: client0\n"));
    assert_eq!(
        ask_name(&topology.client, target_addr(PORT)).unwrap(),
        "web0"
    );
    // From upstream 1's link the same port is the host's own: refused.
    let other_side = SocketAddr::from((Topology::lb_addr_toward(1), PORT));
    let error = ask_name(&topology.upstreams[1], other_side).expect_err("not balanced");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{error}"
    );
}

/// A block list of `count` prefixes: `blocked` and `count - 1` spaced
/// ones.
fn block_list(count: u32, blocked: &str) -> String {
    let prefixes: Vec<String> = std::iter::once(blocked.to_owned())
        .chain(spaced_prefixes(count - 1))
        .collect();
    format!("        block: [{}]\n", prefixes.join(", "))
}

#[test]
fn a_block_list_of_100000_prefixes_loads_and_one_changed_prefix_is_one_transaction() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(1);
    let _servers = start_servers(&topology);
    topology.add_other_client();
    let other = format!("{}/32", Topology::OTHER_CLIENT_ADDR);
    let lobby = Lobby::start(&topology.lb, &config(1, &block_list(100_000, &other)));
    refused_silently(&topology);
    assert!(denied(&lobby, "blocked") > 0);
    assert_eq!(
        ask_name(&topology.client, target_addr(PORT)).unwrap(),
        "web0"
    );

    // The blocked client's prefix replaced by another one.
    let applied = lobby.log_count("ruleset applied");
    lobby.reload_with(&config(1, &block_list(100_000, "10.255.255.255/32")));
    let allowed = IpAddr::V4(Topology::OTHER_CLIENT_ADDR);
    assert_eq!(
        ask_name_from(&topology.client, allowed, target_addr(PORT)).unwrap(),
        "web0"
    );
    assert_eq!(
        lobby.log_count("ruleset applied"),
        applied + 1,
        "one transaction for the changed prefix:\n{}",
        lobby.log()
    );
    assert_eq!(lobby.log_count("applying the ruleset failed"), 0);
}
