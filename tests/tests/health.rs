//! Health checks in namespaces with real servers: failures take an upstream
//! out of rotation in bounded time, recoveries bring it back, and live
//! connections of a downed upstream drain undisturbed.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::SocketAddr,
    time::{Duration, Instant},
};

use lobby_tests::{
    Lobby, NameServer, Topology,
    fixtures::{
        ConfigBuilder, UPSTREAM_PORT, count, health_check, in_rotation, names, start_server,
        start_servers, target_addr,
    },
    privileged, wait_for,
};

const PORT: u16 = 8081;
const INTERVAL: u32 = 1;
const TIMEOUT: u64 = 1;

/// The milliseconds between the log line that says `upstream` changed and
/// the next `ruleset applied` line, from their timestamps.
fn apply_delay_ms(log: &str, change: &str) -> Option<i64> {
    let mut lines = log.lines().skip_while(|l| !l.contains(change));
    let changed = timestamp_ms(lines.next()?)?;
    let applied = timestamp_ms(lines.find(|l| l.contains("ruleset applied"))?)?;
    Some(applied - changed)
}

/// Milliseconds since midnight of a tracing line's RFC 3339 timestamp.
fn timestamp_ms(line: &str) -> Option<i64> {
    let time = line.split('T').nth(1)?.get(..12)?; // HH:MM:SS.mmm
    let mut parts = time.split([':', '.']).map(|p| p.parse::<i64>().ok());
    let (h, m, s, ms) = (
        parts.next()??,
        parts.next()??,
        parts.next()??,
        parts.next()??,
    );
    Some(((h * 60 + m) * 60 + s) * 1000 + ms)
}

#[test]
fn a_dead_upstream_leaves_rotation_in_bounded_time_and_returns_after_successes() {
    if !privileged() {
        return;
    }
    const FAILURES: u32 = 2;
    const SUCCESSES: u32 = 2;
    let topology = Topology::new(3);
    let mut servers: Vec<Option<NameServer>> =
        start_servers(&topology).into_iter().map(Some).collect();
    let check = health_check(UPSTREAM_PORT, true, INTERVAL, SUCCESSES, FAILURES);
    let lobby = Lobby::start(
        &topology.lb,
        &ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(3, &check)
            .build(),
    );
    assert!(in_rotation(&topology, 1));

    servers[1] = None; // web1 stops listening: its probes are refused.
    let stopped = Instant::now();
    wait_for(
        "web1 to leave the rotation",
        Duration::from_secs(20),
        || (!in_rotation(&topology, 1)).then_some(()),
    );
    let detection = stopped.elapsed();
    let bound = Duration::from_secs(u64::from(INTERVAL * FAILURES) + TIMEOUT + 1);
    assert!(
        detection <= bound,
        "web1 left the rotation after {detection:?}, more than {bound:?}"
    );
    let log = lobby.log();
    assert!(
        log.contains("upstream web/web1 is DOWN (connect refused, 2/2 failures); 2 of 3 available"),
        "{log}"
    );
    eprintln!(
        "detection {detection:?}; probe result to ruleset applied: {:?} ms",
        apply_delay_ms(&log, "upstream web/web1 is DOWN")
    );
    let after = names(&topology, PORT, 20);
    assert_eq!(
        (
            count(&after, "web0"),
            count(&after, "web1"),
            count(&after, "web2")
        ),
        (10, 0, 10),
        "{after:?}"
    );

    servers[1] = Some(start_server(&topology, 1));
    wait_for("web1 to return", Duration::from_secs(20), || {
        in_rotation(&topology, 1).then_some(())
    });
    assert!(
        lobby
            .log()
            .contains("upstream web/web1 is UP (connected, 2/2 successes); 3 of 3 available"),
        "{}",
        lobby.log()
    );
    let back = names(&topology, PORT, 30);
    assert_eq!(
        (
            count(&back, "web0"),
            count(&back, "web1"),
            count(&back, "web2")
        ),
        (10, 10, 10),
        "{back:?}"
    );
}

#[test]
fn start_unavailable_means_no_traffic_until_enough_successes() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let check = health_check(UPSTREAM_PORT, false, INTERVAL, 2, 1);
    let lobby = Lobby::start(
        &topology.lb,
        &ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(2, &check)
            .build(),
    );
    // The first probe runs within 500 ms, the second a second later: until
    // then, nothing is in rotation.
    assert!(
        !in_rotation(&topology, 0) && !in_rotation(&topology, 1),
        "{}",
        topology.lb.lobby_ruleset()
    );
    wait_for(
        "both upstreams after 2 successes",
        Duration::from_secs(20),
        || (in_rotation(&topology, 0) && in_rotation(&topology, 1)).then_some(()),
    );
    let log = lobby.log();
    assert!(
        log.contains("upstream web/web0 is UP (connected, 2/2 successes)"),
        "{log}"
    );
    let after = names(&topology, PORT, 4);
    assert_eq!(
        (count(&after, "web0"), count(&after, "web1")),
        (2, 2),
        "{after:?}"
    );
}

#[test]
fn a_connection_to_an_upstream_marked_down_keeps_streaming() {
    if !privileged() {
        return;
    }
    const HEALTH_PORT: u16 = 9001;
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    // Health is probed on its own port, so the service keeps running while
    // the upstream is marked down.
    let health: Vec<NameServer> = (0..2)
        .map(|i| {
            NameServer::start(
                &topology.upstreams[i],
                SocketAddr::from((Topology::upstream_addr(i), HEALTH_PORT)),
                "health",
            )
        })
        .collect();
    let check = health_check(HEALTH_PORT, true, INTERVAL, 1, 1);
    let _lobby = Lobby::start(
        &topology.lb,
        &ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(2, &check)
            .build(),
    );
    let mut streams: Vec<(String, std::net::TcpStream)> = (0..2)
        .map(|_| {
            let stream = topology
                .client
                .connect(target_addr(PORT), Duration::from_secs(5))
                .unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut name = String::new();
            BufReader::new(&stream).read_line(&mut name).unwrap();
            (name.trim().to_owned(), stream)
        })
        .collect();
    let (_, to_web1) = streams
        .iter_mut()
        .find(|(name, _)| name == "web1")
        .expect("one stream went to web1");

    let mut health = health.into_iter();
    let _web0_health = health.next();
    drop(health); // web1's health port closes: web1 goes down.
    wait_for(
        "web1 to leave the rotation",
        Duration::from_secs(20),
        || (!in_rotation(&topology, 1)).then_some(()),
    );
    for round in 0..50u32 {
        let chunk = vec![round as u8; 4096];
        to_web1
            .write_all(&chunk)
            .unwrap_or_else(|e| panic!("write {round} to the drained upstream: {e}"));
        let mut echo = vec![0u8; chunk.len()];
        to_web1
            .read_exact(&mut echo)
            .unwrap_or_else(|e| panic!("read {round} from the drained upstream: {e}"));
        assert_eq!(echo, chunk);
    }
    assert!(names(&topology, PORT, 4).iter().all(|n| n == "web0"));
}

#[test]
fn a_black_holed_upstream_is_caught_by_the_timeout() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let check = health_check(UPSTREAM_PORT, true, INTERVAL, 1, 1);
    let lobby = Lobby::start(
        &topology.lb,
        &ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(2, &check)
            .build(),
    );
    // web1 silently drops everything to its port, as a hung host would.
    let rules = format!(
        "add table ip blackhole\nadd chain ip blackhole input {{ type filter hook input priority 0; }}\nadd rule ip blackhole input tcp dport {UPSTREAM_PORT} drop\n"
    );
    let path = std::env::temp_dir().join(format!("{}-blackhole.nft", topology.upstreams[1].name));
    std::fs::write(&path, rules).unwrap();
    topology.upstreams[1].exec("nft", &["-f", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    wait_for(
        "web1 to leave the rotation",
        Duration::from_secs(20),
        || (!in_rotation(&topology, 1)).then_some(()),
    );
    assert!(
        lobby
            .log()
            .contains("upstream web/web1 is DOWN (timeout after 1 s, 1/1 failure)"),
        "{}",
        lobby.log()
    );
}
