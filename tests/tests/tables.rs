//! Issue 17's `nftables: {table, priority}`, `local: true` and
//! `mirror: {to}` end to end: two daemons of different tables side by side,
//! the host's own connections balanced, and a capture on the mirror host.
use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Command,
    time::{Duration, Instant},
};

use lobby_tests::{
    Lobby, NetNs, Topology,
    fixtures::{ConfigBuilder, UPSTREAM_PORT, assert_round_robin, start_servers, target_addr},
    lobby::binary,
    privileged,
    server::ask_name,
};

/// One target on `port` over upstream `upstream` of the topology, in an
/// entry with `entry` (YAML lines of the entry) and `target` (of the
/// target).
fn config(port: u16, upstreams: &[usize], entry: &str, target: &str) -> String {
    let mut builder = ConfigBuilder::new().target("web", port);
    for &i in upstreams {
        builder = builder.upstream(
            &format!("web{i}"),
            Topology::upstream_addr(i),
            UPSTREAM_PORT,
        );
    }
    builder
        .build()
        .replace(
            "  - engine: nftables\n",
            &format!("  - engine: nftables\n{entry}"),
        )
        .replace(
            "        upstream_group:\n",
            &format!("{target}        upstream_group:\n"),
        )
}

/// The priority of a base chain as the kernel holds it.
fn chain_priority(ns: &NetNs, table: &str, chain: &str) -> i64 {
    let output = ns.exec("nft", &["-j", "list", "chain", "inet", table, chain]);
    let listing: serde_json::Value = serde_json::from_slice(&output.stdout).expect("nft's JSON");
    listing["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["chain"]["prio"].as_i64()))
        .unwrap_or_else(|| panic!("no priority in {listing}"))
}

fn has_table(ns: &NetNs, family: &str, table: &str) -> bool {
    ns.try_exec("nft", &["list", "table", family, table])
        .status
        .success()
}

#[test]
fn two_daemons_of_two_tables_run_side_by_side() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let lb2 = config(
        8081,
        &[0],
        "    nftables: { table: lb2, priority: \"dstnat - 10\" }\n",
        "",
    );
    // Without --socket: the table's own, which `lobby stats --table` finds.
    let first = Lobby::start_on_table_socket(&topology.lb, &lb2, "lb2");
    let mut second = Lobby::start(
        &topology.lb,
        &config(8082, &[1], "    nftables: { table: lb3 }\n", ""),
    );
    assert_eq!(chain_priority(&topology.lb, "lb2", "prerouting"), -110);
    assert_eq!(chain_priority(&topology.lb, "lb3", "prerouting"), -100);
    assert!(!has_table(&topology.lb, "inet", "lobby"));
    assert_eq!(
        ask_name(&topology.client, target_addr(8081)).unwrap(),
        "web0"
    );
    assert_eq!(
        ask_name(&topology.client, target_addr(8082)).unwrap(),
        "web1"
    );

    let stats = Command::new(binary())
        .args(["stats", "--json", "--table", "lb2"])
        .output()
        .expect("running lobby stats");
    assert!(stats.status.success(), "{stats:?}");
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(stats["targets"][0]["port"], 8081, "{stats}");
    assert_eq!(stats["targets"].as_array().unwrap().len(), 1, "{stats}");

    // A new priority replaces the chain; a new name needs a restart.
    first.reload_with(&lb2.replace("\"dstnat - 10\"", "-120"));
    assert_eq!(chain_priority(&topology.lb, "lb2", "prerouting"), -120);
    assert_eq!(
        ask_name(&topology.client, target_addr(8081)).unwrap(),
        "web0"
    );
    let refused = first.log_count("reload failed");
    first.write_config(&lb2.replace("table: lb2", "table: lb4"));
    first.reload();
    first.wait_for_log_count("reload failed", refused);
    assert!(first.log().contains("restart lobby to use table `lb4`"));
    assert!(has_table(&topology.lb, "inet", "lb2"));
    assert!(!has_table(&topology.lb, "inet", "lb4"));

    // Stopping one leaves the other's table and traffic alone.
    assert!(second.stop_with(libc::SIGTERM).success());
    assert!(!has_table(&topology.lb, "inet", "lb3"));
    assert!(has_table(&topology.lb, "inet", "lb2"));
    assert_eq!(chain_priority(&topology.lb, "lb2", "prerouting"), -120);
    assert_eq!(
        ask_name(&topology.client, target_addr(8081)).unwrap(),
        "web0"
    );
}

/// The names the servers answer to `count` connections opened in the load
/// balancer's own namespace.
fn local_names(topology: &Topology, count: usize) -> Vec<Result<String, std::io::ErrorKind>> {
    (0..count)
        .map(|_| ask_name(&topology.lb, target_addr(8081)).map_err(|e| e.kind()))
        .collect()
}

#[test]
fn local_balances_the_hosts_own_connections() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let plain = config(8081, &[0, 1], "", "");
    let lobby = Lobby::start(&topology.lb, &plain);
    // Nothing listens on the host itself: without `local` it refuses.
    assert_eq!(
        local_names(&topology, 2),
        [
            Err(std::io::ErrorKind::ConnectionRefused),
            Err(std::io::ErrorKind::ConnectionRefused)
        ]
    );

    lobby.reload_with(&config(8081, &[0, 1], "", "        local: true\n"));
    let names: Vec<String> = local_names(&topology, 10)
        .into_iter()
        .map(|n| n.expect("balanced"))
        .collect();
    assert_round_robin(&names, 2);
    // Clients from outside are balanced as before.
    assert!(ask_name(&topology.client, target_addr(8081)).is_ok());
}

/// A TCP segment as the mirror host captured it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    from: SocketAddr,
    to: SocketAddr,
}

/// A socket in `ns` that receives every IPv4 packet of its interfaces
/// (AF_PACKET, without link-layer headers), as tcpdump would.
fn capture_socket(ns: &NetNs) -> OwnedFd {
    ns.within(|| {
        let protocol = (libc::ETH_P_IP as u16).to_be() as i32;
        // SAFETY: plain socket call; the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, protocol) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a descriptor this thread just created.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: a valid timeval for SO_RCVTIMEO.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        fd
    })
}

/// The TCP segments `socket` receives until `until` says it has enough,
/// or 10 s pass.
fn captured(socket: &OwnedFd, mut until: impl FnMut(&[Segment]) -> bool) -> Vec<Segment> {
    let mut segments = Vec::new();
    let started = Instant::now();
    let mut buffer = [0u8; 2048];
    while !until(&segments) && started.elapsed() < Duration::from_secs(10) {
        // SAFETY: reads into a buffer of the given length.
        let len = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        let Ok(len) = usize::try_from(len) else {
            continue; // the receive timeout
        };
        let packet = &buffer[..len];
        if len < 20 || packet[0] >> 4 != 4 || packet[9] != libc::IPPROTO_TCP as u8 {
            continue;
        }
        let header = usize::from(packet[0] & 0x0f) * 4;
        if len < header + 4 {
            continue;
        }
        let address =
            |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
        let port = |at: usize| u16::from_be_bytes([packet[at], packet[at + 1]]);
        segments.push(Segment {
            from: SocketAddr::from((address(12), port(header))),
            to: SocketAddr::from((address(16), port(header + 2))),
        });
    }
    segments
}

#[test]
fn mirror_copies_both_directions_to_the_mirror_host() {
    if !privileged() {
        return;
    }
    // Upstream 1's namespace is the mirror host, at 198.18.2.99 on the
    // load balancer's link to it.
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let mirror = &topology.upstreams[1];
    mirror.ip(&["addr", "add", "198.18.2.99/24", "dev", "eth0"]);
    let _lobby = Lobby::start(
        &topology.lb,
        &config(8081, &[0], "", "        mirror: { to: 198.18.2.99 }\n"),
    );
    let socket = capture_socket(mirror);
    assert_eq!(
        ask_name(&topology.client, target_addr(8081)).unwrap(),
        "web0"
    );
    let upstream = SocketAddr::from((Topology::upstream_addr(0), UPSTREAM_PORT));
    let client = Topology::CLIENT_ADDR;
    let toward = |s: &Segment| s.from.ip() == client && s.to == upstream;
    let back = |s: &Segment| s.from == upstream && s.to.ip() == client;
    let segments = captured(&socket, |seen| {
        seen.iter().any(toward) && seen.iter().any(back)
    });
    assert!(
        segments.iter().any(toward) && segments.iter().any(back),
        "the mirror host saw {segments:?}"
    );
    // The copies are made in Lobby's `ip` table of its name.
    let listing = topology.lb.exec("nft", &["list", "table", "ip", "lobby"]);
    let ruleset = String::from_utf8_lossy(&listing.stdout);
    assert!(ruleset.contains("dup to 198.18.2.99"), "{ruleset}");
}
