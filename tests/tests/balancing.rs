//! Round-robin DNAT end to end: real servers, real connections, the real
//! binary and ruleset.
use std::net::SocketAddr;

use lobby_tests::{Lobby, NameServer, Topology, privileged, server::ask_name};

const PORT: u16 = 8081;
const UPSTREAM_PORT: u16 = 9000;

fn config(upstreams: usize, start_available: bool) -> String {
    let mut yaml = format!(
        "lb:\n  - engine: nftables\n    targets:\n      - name: web\n        protocol: tcp\n        port: {PORT}\n        upstream_group:\n          name: web-pool\n          distribution: round-robin\n          upstreams:\n"
    );
    for i in 0..upstreams {
        yaml.push_str(&format!(
            "            - name: web{i}\n              host: {}\n              port: {UPSTREAM_PORT}\n",
            Topology::upstream_addr(i)
        ));
        if !start_available {
            yaml.push_str(&format!(
                "              health_check:\n                protocol: tcp\n                port: {}\n                start_available: false\n                probe: {{ check_interval: 60, timeout: 1, success_count: 1 }}\n",
                UPSTREAM_PORT + 1
            ));
        }
    }
    yaml
}

fn start_servers(topology: &Topology) -> Vec<NameServer> {
    topology
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            NameServer::start(
                ns,
                SocketAddr::from((Topology::upstream_addr(i), UPSTREAM_PORT)),
                &format!("web{i}"),
            )
        })
        .collect()
}

fn target() -> SocketAddr {
    SocketAddr::from((Topology::LB_ADDR, PORT))
}

/// The names in the order connections reached them, `count` connections.
fn names(topology: &Topology, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            ask_name(&topology.client, target()).unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect()
}

fn assert_round_robin(names: &[String], upstreams: usize) {
    for name in names {
        let n = names.iter().filter(|n| *n == name).count();
        assert_eq!(
            n,
            names.len() / upstreams,
            "{name} got {n} of {} connections: {names:?}",
            names.len()
        );
    }
    // Each upstream in turn: the sequence repeats with the period of the
    // upstream count.
    for (i, name) in names.iter().enumerate().skip(upstreams) {
        assert_eq!(
            name,
            &names[i - upstreams],
            "not in turn at connection {i}: {names:?}"
        );
    }
}

#[test]
fn thirty_connections_over_three_upstreams_go_ten_each_in_turn() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let _lobby = Lobby::start(&topology.lb, &config(3, true));
    let names = names(&topology, 30);
    assert_round_robin(&names, 3);
}

#[test]
fn target_without_available_upstream_resets_at_once() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let _lobby = Lobby::start(&topology.lb, &config(2, false));
    let started = std::time::Instant::now();
    let err = ask_name(&topology.client, target()).expect_err("no upstream is available");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // A reset answers within a round trip; a drop would wait for the 5 s
    // connect timeout.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "refused only after {:?}",
        started.elapsed()
    );
}

#[test]
fn sigterm_removes_the_table_and_a_restart_after_kill_takes_over() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let mut lobby = Lobby::start(&topology.lb, &config(3, true));
    assert_round_robin(&names(&topology, 6), 3);

    // kill -9: the ruleset stays and keeps balancing without a daemon.
    let status = lobby.stop_with(libc::SIGKILL);
    assert!(!status.success());
    assert_round_robin(&names(&topology, 6), 3);

    // A new start takes the stale table over and balances.
    lobby.restart();
    assert!(
        lobby
            .log()
            .contains("taking over the ruleset of a previous run"),
        "{}",
        lobby.log()
    );
    assert_round_robin(&names(&topology, 9), 3);
    let tables = topology.lb.exec("nft", &["list", "tables"]);
    assert_eq!(
        String::from_utf8_lossy(&tables.stdout)
            .matches("table ip lobby")
            .count(),
        1
    );

    // SIGTERM: clean shutdown, no table and no pin left behind.
    let status = lobby.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
    let tables = topology.lb.exec("nft", &["list", "tables"]);
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("lobby"),
        "table left behind"
    );
    assert!(
        !lobby.pin_dir.exists(),
        "pins left behind in {}",
        lobby.pin_dir.display()
    );
}
