//! Upstream selection end to end: weights under round robin and random,
//! random over equals, source-address affinity that survives the loss of
//! another upstream, backups, and a drain by weight 0 that keeps a live
//! connection.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use lobby_tests::{
    Lobby, Topology,
    fixtures::{
        ConfigBuilder, UPSTREAM_PORT, count, health_check, names, start_servers, target_addr,
    },
    privileged,
    server::{ask_name, ask_name_from},
    wait_for,
};

const PORT: u16 = 8081;

/// A group over the topology's upstreams with `distribution` and, per
/// upstream, extra YAML (`weight: 3`).
fn config(distribution: &str, extras: &[&str]) -> String {
    let mut builder = ConfigBuilder::new().target("web", PORT);
    for (i, extra) in extras.iter().enumerate() {
        builder = builder.upstream_with(
            &format!("web{i}"),
            Topology::upstream_addr(i),
            UPSTREAM_PORT,
            extra,
        );
    }
    builder.build().replace(
        "distribution: round-robin",
        &format!("distribution: {distribution}"),
    )
}

#[test]
fn weights_split_round_robin_exactly_and_random_in_proportion() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let lobby = Lobby::start(&topology.lb, &config("round-robin", &["weight: 3", ""]));
    let seen = names(&topology, PORT, 400);
    assert_eq!(count(&seen, "web0"), 300);
    assert_eq!(count(&seen, "web1"), 100);

    lobby.reload_with(&config("random", &["weight: 3", ""]));
    let seen = names(&topology, PORT, 2000);
    let share = count(&seen, "web0") as f64 / 2000.0;
    println!("random 3:1: web0 took {:.3} of 2,000", share);
    assert!((0.70..=0.80).contains(&share), "{share}");
}

#[test]
fn random_over_equals_is_even_and_not_a_rotation() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let _lobby = Lobby::start(&topology.lb, &config("random", &["", "", ""]));
    let seen = names(&topology, PORT, 1500);
    for i in 0..3 {
        let n = count(&seen, &format!("web{i}"));
        // A third, within about 3.8 standard deviations.
        assert!((430..=570).contains(&n), "web{i}: {n}");
    }
    let in_turn = seen.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(in_turn < 1499, "strict rotation is not random");
}

#[test]
fn a_client_address_keeps_its_upstream_and_others_keep_theirs_when_one_goes() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let mut servers: Vec<_> = start_servers(&topology).into_iter().map(Some).collect();
    let clients: Vec<IpAddr> = (3..9)
        .map(|last| IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)))
        .collect();
    for client in &clients {
        topology
            .client
            .ip(&["addr", "add", &format!("{client}/24"), "dev", "eth0"]);
    }
    let check = health_check(UPSTREAM_PORT, true, 1, 1, 1);
    let _lobby = Lobby::start(
        &topology.lb,
        &config("ip-src-hash", &[&check, &check, &check]),
    );
    let upstream_of = |client: IpAddr| {
        let seen: Vec<String> = (0..20)
            .map(|_| ask_name_from(&topology.client, client, target_addr(PORT)).unwrap())
            .collect();
        assert!(seen.iter().all(|n| *n == seen[0]), "{client}: {seen:?}");
        seen[0].clone()
    };
    let before: Vec<String> = clients.iter().map(|c| upstream_of(*c)).collect();
    let distinct: std::collections::BTreeSet<&String> = before.iter().collect();
    assert!(
        distinct.len() > 1,
        "every client on one upstream: {before:?}"
    );

    // The upstream of the first client goes DOWN; the others' clients stay.
    let lost: usize = before[0][3..].parse().unwrap();
    servers[lost] = None;
    wait_for(
        "the lost upstream out of rotation",
        Duration::from_secs(5),
        || (!lobby_tests::fixtures::in_rotation(&topology, lost)).then_some(()),
    );
    for (client, old) in clients.iter().zip(&before) {
        let now = upstream_of(*client);
        if *old != format!("web{lost}") {
            assert_eq!(&now, old, "{client} moved although its upstream stayed");
        } else {
            assert_ne!(now, *old);
        }
    }
}

#[test]
fn backups_take_over_only_while_every_primary_is_down() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let mut servers: Vec<_> = start_servers(&topology).into_iter().map(Some).collect();
    let check = health_check(UPSTREAM_PORT, true, 1, 1, 1);
    let backup = format!("{check}\nbackup: true");
    let _lobby = Lobby::start(
        &topology.lb,
        &config("round-robin", &[&check, &check, &backup]),
    );
    let seen = names(&topology, PORT, 20);
    assert_eq!(count(&seen, "web2"), 0, "{seen:?}");
    servers[0] = None;
    servers[1] = None;
    // Until the checks notice, connections may still reach a dead primary.
    let reaches =
        |name: &str| ask_name(&topology.client, target_addr(PORT)).is_ok_and(|n| n == name);
    wait_for("the backup in rotation", Duration::from_secs(6), || {
        (reaches("web2") && reaches("web2")).then_some(())
    });
    assert_eq!(count(&names(&topology, PORT, 10), "web2"), 10);
    servers[0] = Some(lobby_tests::fixtures::start_server(&topology, 0));
    wait_for("a primary back", Duration::from_secs(6), || {
        reaches("web0").then_some(())
    });
    assert_eq!(count(&names(&topology, PORT, 10), "web0"), 10);
}

#[test]
fn weight_zero_drains_new_connections_and_keeps_a_live_one() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let lobby = Lobby::start(&topology.lb, &config("round-robin", &["", ""]));
    // A long-lived connection to web1.
    let mut stream = loop {
        let stream = topology
            .client
            .connect(target_addr(PORT), Duration::from_secs(5))
            .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut name = String::new();
        reader.read_line(&mut name).unwrap();
        if name.trim() == "web1" {
            break (stream, reader);
        }
    };
    lobby.reload_with(&config("round-robin", &["", "weight: 0"]));
    let seen = names(&topology, PORT, 20);
    assert_eq!(count(&seen, "web1"), 0, "{seen:?}");
    for round in 0..20 {
        stream.0.write_all(b"still here\n").unwrap();
        let mut echo = String::new();
        stream.1.read_line(&mut echo).unwrap();
        assert_eq!(echo, "still here\n", "round {round}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
