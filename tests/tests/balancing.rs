//! Round-robin DNAT end to end: real servers, real connections, the real
//! binary and ruleset.
use lobby_tests::{
    Lobby, Topology,
    fixtures::{
        ConfigBuilder, assert_round_robin, health_check, names, start_servers, target_addr,
    },
    privileged,
    server::ask_name,
};

const PORT: u16 = 8081;

#[test]
fn thirty_connections_over_three_upstreams_go_ten_each_in_turn() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let _lobby = Lobby::start(
        &topology.lb,
        &ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(3, "")
            .build(),
    );
    let names = names(&topology, PORT, 30);
    assert_round_robin(&names, 3);
}

#[test]
fn target_without_available_upstream_resets_at_once() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    // Probes of a closed port every minute: unavailable from the start.
    let config = ConfigBuilder::new()
        .target("web", PORT)
        .topology_upstreams(2, &health_check(9999, false, 60, 1, 1));
    let lobby = Lobby::start(&topology.lb, &config.build());
    let started = std::time::Instant::now();
    let err = ask_name(&topology.client, target_addr(PORT)).expect_err("no upstream is available");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    // A reset answers within a round trip; a drop would wait for the 5 s
    // connect timeout.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "refused only after {:?}",
        started.elapsed()
    );
    assert!(
        lobby.log().contains("target web has no upstream available"),
        "{}",
        lobby.log()
    );
}

#[test]
fn sigterm_removes_the_table_and_a_restart_after_kill_takes_over() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let mut lobby = Lobby::start(
        &topology.lb,
        &ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(3, "")
            .build(),
    );
    assert_round_robin(&names(&topology, PORT, 6), 3);

    // kill -9: the ruleset stays and keeps balancing without a daemon.
    let status = lobby.stop_with(libc::SIGKILL);
    assert!(!status.success());
    assert_round_robin(&names(&topology, PORT, 6), 3);
    // Nothing of the daemon runs on: no nft of its outlives it.
    lobby_tests::wait_for(
        "the daemon's nft runs to end",
        std::time::Duration::from_secs(10),
        || {
            // Asked from outside: a command run inside would list itself.
            let pids = std::process::Command::new("ip")
                .args(["netns", "pids", &topology.lb.name])
                .output()
                .expect("ip netns pids");
            let nft = String::from_utf8_lossy(&pids.stdout)
                .split_whitespace()
                .any(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|comm| comm.trim() == "nft")
                });
            (!nft).then_some(())
        },
    );

    // A new start takes the stale table over and balances.
    lobby.restart();
    assert!(
        lobby
            .log()
            .contains("taking over the ruleset of a previous run"),
        "{}",
        lobby.log()
    );
    assert_round_robin(&names(&topology, PORT, 9), 3);
    let tables = topology.lb.exec("nft", &["list", "tables"]);
    assert_eq!(
        String::from_utf8_lossy(&tables.stdout)
            .matches("table inet lobby")
            .count(),
        1
    );

    // SIGTERM: clean shutdown, no table, program or pin left behind.
    let status = lobby.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
    lobby.assert_nothing_left(&topology.lb);
}

#[test]
fn a_restart_after_kill_takes_over_without_refusing_a_connection() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    // Upstreams start unavailable and need 3 successes: a restart that
    // ignored the running ruleset would refuse connections for seconds.
    let check = health_check(lobby_tests::fixtures::UPSTREAM_PORT, false, 1, 3, 1);
    let config = ConfigBuilder::new()
        .target("web", PORT)
        .topology_upstreams(3, &check)
        .build();
    let mut lobby = Lobby::start(&topology.lb, &config);
    lobby_tests::wait_for(
        "all upstreams up",
        std::time::Duration::from_secs(20),
        || {
            (0..3)
                .all(|i| lobby_tests::fixtures::in_rotation(&topology, i))
                .then_some(())
        },
    );
    let connections = |lobby: &Lobby| -> u64 {
        let stats = lobby.stats();
        stats["targets"][0]["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["connections"].as_u64().unwrap())
            .sum()
    };
    let clients = lobby_tests::load::ShortClients::start(&topology.client, PORT);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let before_kill = connections(&lobby);
    lobby.stop_with(libc::SIGKILL);
    lobby.restart();
    assert!(
        lobby
            .log()
            .contains("taking over the ruleset of a previous run"),
        "{}",
        lobby.log()
    );
    // Load goes on across the restart and for a while after it.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let (ok, failed, errors) = clients.finish();
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed across the restart: {errors:?}",
        ok + failed
    );
    assert!(
        (0..3).all(|i| lobby_tests::fixtures::in_rotation(&topology, i)),
        "{}",
        topology.lb.lobby_ruleset()
    );
    // The pinned map carried the counts over, and counting goes on.
    let after = connections(&lobby);
    assert!(
        after > before_kill,
        "{after} connections counted after the restart, {before_kill} before the kill"
    );
    names(&topology, PORT, 3);
    lobby_tests::wait_for(
        "counting to go on",
        std::time::Duration::from_secs(10),
        || (connections(&lobby) >= after + 3).then_some(()),
    );
}
