//! Rate and connection limits end to end, with real clients and servers:
//! a token bucket lets about rate x time + burst connections through on
//! their first SYN, `max_connections` holds the next one back until a
//! place frees, `per_source` limits one client and not another, and an
//! upstream at its cap sends new connections to the other one. Each
//! refusal is a silent drop, counted by reason in `lobby stats --json`.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use lobby_tests::{
    Lobby, NameServer, Topology, UdpFlow, UdpNameServer,
    fixtures::{ConfigBuilder, UPSTREAM_PORT, count, start_servers, target_addr},
    lobby::Launch,
    privileged,
    server::{Conversation, ask_name_from},
    wait_for,
};

const PORT: u16 = 8081;
/// Shorter than TCP's first SYN retransmission (1 s): a connection that
/// completes within it was accepted on its first SYN.
const FIRST_SYN: Duration = Duration::from_millis(500);

/// The config of one target over `upstreams` of the topology, each with
/// `upstream` keys, with `target` keys (YAML lines of the target).
fn config(upstreams: &[&str], distribution: &str, target: &str) -> String {
    let mut builder = ConfigBuilder::new().target("web", PORT);
    for (i, keys) in upstreams.iter().enumerate() {
        builder = builder.topology_upstream(i, keys);
    }
    builder
        .build()
        .replace(
            "        upstream_group:\n",
            &format!("{target}        upstream_group:\n"),
        )
        .replace("round-robin", distribution)
}

fn denied(lobby: &Lobby, reason: &str) -> u64 {
    lobby.stats()["targets"][0]["denied"][reason]
        .as_u64()
        .unwrap()
}

/// Opens `count` connections from `topology`'s client over `over`, evenly
/// spaced and each without waiting for the others, and counts those
/// established within [`FIRST_SYN`] of their start.
fn first_syn_accepted(topology: &Topology, count: usize, over: Duration) -> usize {
    let target = target_addr(PORT);
    topology.client.within(move || {
        let start = Instant::now();
        let mut pending: Vec<(Instant, socket2::Socket)> = Vec::new();
        let mut accepted = 0;
        let mut judge = |pending: &mut Vec<(Instant, socket2::Socket)>, all: bool| {
            pending.retain(|(started, socket)| {
                if !all && started.elapsed() < FIRST_SYN {
                    return true;
                }
                if socket.peer_addr().is_ok() {
                    accepted += 1;
                }
                false
            });
        };
        for i in 0..count {
            let due = start + over.mul_f64(i as f64 / count as f64);
            while Instant::now() < due {
                judge(&mut pending, false);
                std::thread::sleep(Duration::from_millis(1));
            }
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("a socket");
            socket.set_nonblocking(true).expect("nonblocking");
            match socket.connect(&target.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => panic!("connect {i}: {e}"),
            }
            pending.push((Instant::now(), socket));
        }
        // The last ones get their time to complete, not more.
        std::thread::sleep(FIRST_SYN);
        judge(&mut pending, true);
        accepted
    })
}

#[test]
fn a_token_bucket_lets_rate_times_time_plus_burst_through() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(1);
    let _servers = start_servers(&topology);
    let limits = "        limits: { new_connections_per_second: 50, burst: 10 }\n";
    let lobby = Lobby::start(&topology.lb, &config(&[""], "round-robin", limits));
    // 400 attempts over 2 s: 10 at once, then 50 a second.
    let accepted = first_syn_accepted(&topology, 400, Duration::from_secs(2));
    eprintln!("{accepted} of 400 connections accepted on their first SYN");
    assert!(
        (83..=137).contains(&accepted),
        "{accepted} of 400 accepted on their first SYN; expected about 110"
    );
    assert!(denied(&lobby, "rate_limited") >= 200);
    assert_eq!(denied(&lobby, "connection_limited"), 0);
}

/// Holds `count` connections from the client; panics if one fails.
fn hold(topology: &Topology, count: usize) -> Vec<Conversation> {
    (0..count)
        .map(|i| {
            Conversation::open(&topology.client, target_addr(PORT))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect()
}

#[test]
fn max_connections_holds_the_next_connection_back_until_one_closes() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(1);
    let _servers = start_servers(&topology);
    let limits = "        limits: { max_connections: 10 }\n";
    let lobby = Lobby::start(&topology.lb, &config(&[""], "round-robin", limits));
    let mut held = hold(&topology, 10);

    std::thread::scope(|scope| {
        // The 11th: its SYNs are dropped while 10 are open...
        let eleventh = scope.spawn(|| {
            topology
                .client
                .connect(target_addr(PORT), Duration::from_secs(10))
        });
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            !eleventh.is_finished(),
            "the 11th connection ended while 10 were open: {:?}",
            eleventh.join()
        );
        assert!(denied(&lobby, "connection_limited") > 0);
        // ...and once one closes, a retransmitted SYN gets through.
        drop(held.pop());
        eleventh
            .join()
            .unwrap()
            .expect("the 11th connection, once one closed");
    });
}

#[test]
fn per_source_limits_one_client_and_not_another() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(1);
    let _servers = start_servers(&topology);
    let other = topology.add_other_client();
    let limits = "        limits: { max_connections: 100, per_source: { max_connections: 2 } }\n";
    let lobby = Lobby::start(&topology.lb, &config(&[""], "round-robin", limits));
    let _held = hold(&topology, 2);
    let error = topology
        .client
        .connect(target_addr(PORT), Duration::from_millis(2500))
        .expect_err("a third connection of the same client");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
    // Another client address has its own count.
    for _ in 0..2 {
        assert_eq!(
            ask_name_from(&topology.client, other, target_addr(PORT)).unwrap(),
            "web0"
        );
    }
    assert!(denied(&lobby, "connection_limited") > 0);
}

#[test]
fn an_upstream_at_its_cap_leaves_new_connections_to_the_other() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let capped = "max_connections: 5";
    let lobby = Lobby::start(&topology.lb, &config(&[capped, ""], "round-robin", ""));
    let held = hold(&topology, 20);
    let names: Vec<String> = held.iter().map(|c| c.upstream.clone()).collect();
    assert_eq!(count(&names, "web0"), 5, "{names:?}");
    assert_eq!(count(&names, "web1"), 15, "{names:?}");

    // Closing two of web0's gives it room for two more, and no more.
    let mut held = held;
    let mut closed = 0;
    held.retain(|c| {
        let close = c.upstream == "web0" && closed < 2;
        closed += usize::from(close);
        !close
    });
    // Its flag (1 s) expires, then its count frees the places.
    wait_for(
        "web0 to take connections again",
        Duration::from_secs(10),
        || {
            let more = hold(&topology, 1).pop().unwrap();
            let upstream = more.upstream.clone();
            held.push(more);
            (upstream == "web0").then_some(())
        },
    );
    held.extend(hold(&topology, 6));
    let web0 = held.iter().filter(|c| c.upstream == "web0").count();
    assert_eq!(web0, 5, "web0 holds more than its cap");
    assert_eq!(denied(&lobby, "rate_limited"), 0);
}

#[test]
fn with_every_upstream_full_new_connections_are_refused_and_counted() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    // ip-src-hash: one client address hashes to one upstream, the other
    // takes what it cannot.
    let capped = "max_connections: 3";
    let lobby = Lobby::start(&topology.lb, &config(&[capped, capped], "ip-src-hash", ""));
    let held = hold(&topology, 6);
    let names: Vec<String> = held.iter().map(|c| c.upstream.clone()).collect();
    assert_eq!(count(&names, "web0"), 3, "{names:?}");
    assert_eq!(count(&names, "web1"), 3, "{names:?}");
    let error = topology
        .client
        .connect(target_addr(PORT), Duration::from_millis(2500))
        .expect_err("no upstream has room");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
    assert!(denied(&lobby, "connection_limited") > 0);
    assert_eq!(denied(&lobby, "rate_limited"), 0);
}

#[test]
fn a_cap_counts_udp_flows_and_ipv6_connections() {
    if !privileged() {
        return;
    }
    let topology = Topology::dual_stack(2);
    let servers: Vec<(UdpNameServer, NameServer)> = (0..2)
        .map(|i| {
            let ns = &topology.upstreams[i];
            let name = format!("web{i}");
            let udp = SocketAddr::from((Topology::upstream_addr(i), UPSTREAM_PORT));
            let tcp6 = SocketAddr::from((Topology::upstream_addr6(i), UPSTREAM_PORT));
            (
                UdpNameServer::start(ns, udp, &name),
                NameServer::start(ns, tcp6, &name),
            )
        })
        .collect();
    let cap = "max_connections: 2";
    let mut builder = ConfigBuilder::new().target("dns", PORT).protocol("udp");
    for i in 0..2 {
        builder = builder.topology_upstream(i, if i == 0 { cap } else { "" });
    }
    builder = builder.target("web6", PORT);
    for i in 0..2 {
        let name = format!("web{i}");
        let host = Topology::upstream_addr6(i);
        builder = builder.upstream_with(&name, host, UPSTREAM_PORT, if i == 0 { cap } else { "" });
    }
    let _lobby = Lobby::start(&topology.lb, &builder.build());

    // A UDP flow counts while conntrack holds it (30 s and more).
    let flows: Vec<String> = (0..8)
        .map(|i| {
            UdpFlow::open(&topology.client, target_addr(PORT))
                .ask_name()
                .unwrap_or_else(|e| panic!("flow {i}: {e}"))
        })
        .collect();
    assert_eq!(count(&flows, "web0"), 2, "{flows:?}");
    assert_eq!(count(&flows, "web1"), 6, "{flows:?}");

    let target6 = SocketAddr::from((Topology::LB_ADDR6, PORT));
    let held: Vec<Conversation> = (0..8)
        .map(|i| {
            Conversation::open(&topology.client, target6)
                .unwrap_or_else(|e| panic!("IPv6 connection {i}: {e}"))
        })
        .collect();
    let names: Vec<String> = held.iter().map(|c| c.upstream.clone()).collect();
    assert_eq!(count(&names, "web0"), 2, "{names:?}");
    drop(servers);
}

#[test]
fn a_change_of_the_chain_keeps_the_connections_counted() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let limits = "        limits: { max_connections: 4 }\n";
    let lobby = Lobby::start(&topology.lb, &config(&["", ""], "round-robin", limits));
    let _held = hold(&topology, 4);
    // A new weight rewrites the target's chain; its count stays.
    lobby.reload_with(&config(&["weight: 2", ""], "round-robin", limits));
    let error = topology
        .client
        .connect(target_addr(PORT), Duration::from_millis(2500))
        .expect_err("a fifth connection after the reload");
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
}

#[test]
fn what_traffic_adds_to_the_limits_sets_is_not_an_outside_change() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let limits = "        limits: { new_connections_per_second: 100, max_connections: 50, \
                  per_source: { new_connections_per_second: 50, max_connections: 20 } }\n";
    let config = config(&["max_connections: 2", ""], "round-robin", limits);
    // The periodic check lists the table: it runs only without the
    // kernel's notifications.
    let lobby = Lobby::start_with_args(
        &topology.lb,
        &config,
        Launch::Setns,
        &["--no-table-notifications"],
    );
    // Elements in every set: the buckets, the counts, web0's full flag.
    let _held = hold(&topology, 6);
    let checks = lobby.log_count(AS_APPLIED);
    lobby.wait_for_log_count(AS_APPLIED, checks);
    assert_eq!(
        lobby.log_count("changed outside Lobby"),
        0,
        "{}",
        lobby.log()
    );
}

/// The daemon's debug line for a check of the table that found it as
/// applied.
const AS_APPLIED: &str = "Lobby's table is as applied";
