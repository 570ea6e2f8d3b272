//! Upstream selection end to end: weights under round robin and random,
//! random over equals, source-address affinity that survives the loss of
//! another upstream, backups, a drain by weight 0 that keeps a live
//! connection, persistence in the kernel's packet path, least-connections
//! from conntrack's counts and least-latency from the probes' round trips.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use lobby_tests::{
    Lobby, SlowHealthServer, Topology, conntrack,
    fixtures::{
        ConfigBuilder, UPSTREAM_PORT, count, health_check, in_rotation, names, start_servers,
        target_addr,
    },
    privileged,
    server::{Conversation, ask_name, ask_name_from},
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

/// `yaml` with `persistence` in its group.
fn with_persistence(yaml: &str, timeout: u32) -> String {
    yaml.replace(
        "          upstreams:\n",
        &format!("          persistence: {{ timeout: {timeout} }}\n          upstreams:\n"),
    )
}

/// Whether the kernel remembers the client in a persistence set of target
/// web (the listing shows a set's elements).
fn client_remembered(topology: &Topology) -> bool {
    let listing = topology.lb.exec("nft", &["list", "table", "inet", "lobby"]);
    let listing = String::from_utf8_lossy(&listing.stdout);
    listing
        .split("\tset ")
        .filter(|set| set.starts_with("target-web."))
        .any(|set| set.contains(&Topology::CLIENT_ADDR.to_string()))
}

/// Whether upstream `i` has its persistence chain: it is in rotation.
fn persisted_in_rotation(topology: &Topology, i: usize) -> bool {
    topology.lb.lobby_ruleset().contains(&format!(
        "target-web.{}.{UPSTREAM_PORT}.",
        Topology::upstream_addr(i)
    ))
}

/// The one upstream `count` connections reached; fails if they reached
/// several.
fn one_upstream(topology: &Topology, count: usize) -> String {
    let seen = names(topology, PORT, count);
    assert!(seen.iter().all(|n| *n == seen[0]), "{seen:?}");
    seen[0].clone()
}

#[test]
fn persistence_keeps_a_client_until_it_is_silent_or_its_upstream_leaves() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let mut servers: Vec<_> = start_servers(&topology).into_iter().map(Some).collect();
    let check = health_check(UPSTREAM_PORT, true, 1, 1, 1);
    let yaml = with_persistence(&config("round-robin", &[&check, &check, &check]), 3);
    let _lobby = Lobby::start(&topology.lb, &yaml);
    // Round robin alone would spread these over all three.
    let first = one_upstream(&topology, 20);
    assert!(client_remembered(&topology));

    // Silent for longer than the timeout, the client is forgotten by the
    // kernel itself; then it is balanced afresh and kept again.
    wait_for("the client forgotten", Duration::from_secs(10), || {
        (!client_remembered(&topology)).then_some(())
    });
    let second = one_upstream(&topology, 20);
    println!("before the silence {first}, after it {second}");

    // Its upstream goes DOWN: the very next connections go elsewhere, and
    // stay there.
    let lost: usize = second[3..].parse().unwrap();
    servers[lost] = None;
    wait_for(
        "the lost upstream out of rotation",
        Duration::from_secs(6),
        || (!persisted_in_rotation(&topology, lost)).then_some(()),
    );
    let moved = one_upstream(&topology, 20);
    assert_ne!(moved, second, "still sent to the upstream that left");
}

/// The conntrack mark bit least-connections targets set on their live
/// connections (README, `least-connections`).
const LEAST_CONNECTIONS_MARK: u32 = 0x10_0000;

#[test]
fn least_connections_sends_new_connections_away_from_a_loaded_upstream() {
    if !privileged() || !conntrack::tool_installed() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let lobby = Lobby::start(&topology.lb, &config("least-connections", &["", "", ""]));
    for drained in ["web/web1", "web/web2"] {
        let output = lobby.ctl(&["drain", drained]);
        assert!(output.status.success(), "{output:?}");
    }
    wait_for("web1 and web2 drained", Duration::from_secs(5), || {
        (!in_rotation(&topology, 1) && !in_rotation(&topology, 2)).then_some(())
    });
    // 20 long-lived connections, all to web0.
    let held: Vec<Conversation> = (0..20)
        .map(|i| {
            let conversation = Conversation::open(&topology.client, target_addr(PORT))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            assert_eq!(conversation.upstream, "web0");
            conversation
        })
        .collect();
    wait_for("conntrack's count of web0", Duration::from_secs(10), || {
        let web0 = lobby.upstream_stats("web", "web0");
        (web0["established_connections"] == 20).then_some(())
    });
    for enabled in ["web/web1", "web/web2"] {
        let output = lobby.ctl(&["enable", enabled]);
        assert!(output.status.success(), "{output:?}");
    }
    wait_for("web1 and web2 back", Duration::from_secs(5), || {
        (in_rotation(&topology, 1) && in_rotation(&topology, 2)).then_some(())
    });
    let seen = names(&topology, PORT, 30);
    let elsewhere = count(&seen, "web1") + count(&seen, "web2");
    println!("least-connections: {elsewhere} of 30 away from web0: {seen:?}");
    assert!(elsewhere >= 27, "{seen:?}");
    // The 30 closed connections wait out TIME_WAIT without the mark: the
    // dump the daemon asks the kernel for holds the 20 live ones alone.
    wait_for(
        "only the live connections marked",
        Duration::from_secs(5),
        || {
            let marked = conntrack::list_marked(&topology.lb, LEAST_CONNECTIONS_MARK);
            let web0 = IpAddr::V4(Topology::upstream_addr(0));
            (marked.len() == 20 && marked.iter().all(|e| e.reply_source == web0)).then_some(())
        },
    );
    // The table shows what drives it.
    let stats = lobby.stats().to_string();
    assert!(stats.contains("\"established_connections\":20"), "{stats}");
    drop(held);
}

#[test]
fn least_latency_avoids_the_upstream_whose_probes_answer_late() {
    if !privileged() {
        return;
    }
    const HEALTH_PORT: u16 = 9080;
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let _health: Vec<SlowHealthServer> = [50, 0, 0]
        .iter()
        .enumerate()
        .map(|(i, ms)| {
            let addr = std::net::SocketAddr::from((Topology::upstream_addr(i), HEALTH_PORT));
            SlowHealthServer::start(&topology.upstreams[i], addr, Duration::from_millis(*ms))
        })
        .collect();
    let check = format!(
        "health_check:\n  protocol: http\n  port: {HEALTH_PORT}\n  path: /health\n  start_available: true\n  probe: {{ check_interval: 1, timeout: 2, success_count: 1 }}"
    );
    let lobby = Lobby::start(
        &topology.lb,
        &config("least-latency", &[&check, &check, &check]),
    );
    wait_for(
        "the slow upstream out of the choice",
        Duration::from_secs(15),
        || {
            (!in_rotation(&topology, 0) && in_rotation(&topology, 1) && in_rotation(&topology, 2))
                .then_some(())
        },
    );
    let seen = names(&topology, PORT, 100);
    let slow = count(&seen, "web0");
    println!("least-latency: web0 (50 ms probes) took {slow} of 100");
    assert!(slow <= 10, "{seen:?}");
    let web0 = lobby.upstream_stats("web", "web0");
    let latency = web0["probe_latency_seconds"].as_f64().expect("a latency");
    assert!(latency >= 0.05, "{web0}");
}
