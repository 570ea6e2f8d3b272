//! Reloads under load: short connections without pause and long-lived
//! streams must not notice 50 reloads, and a broken file changes nothing.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    time::Duration,
};

use lobby_tests::{
    Lobby, NetNs, Topology,
    fixtures::{ConfigBuilder, UPSTREAM_PORT, start_servers, target_addr},
    load::ShortClients,
    privileged,
    server::ask_name,
    wait_for,
};

const STABLE: u16 = 8081;
const CHURN: u16 = 8082;

/// A connection that streams data through the balancer and checks every
/// byte of the echo.
struct LongStream {
    stream: TcpStream,
    sent: u64,
}

impl LongStream {
    fn open(client: &NetNs, port: u16) -> Self {
        let stream = client
            .connect(target_addr(port), Duration::from_secs(5))
            .expect("long-lived connection");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut greeting = String::new();
        BufReader::new(&stream).read_line(&mut greeting).unwrap();
        Self { stream, sent: 0 }
    }

    /// One round trip of 1 KiB; the echo must match.
    fn exchange(&mut self) -> std::io::Result<()> {
        let chunk: Vec<u8> = (0..1024).map(|i| (self.sent as usize + i) as u8).collect();
        self.stream.write_all(&chunk)?;
        let mut echo = vec![0u8; chunk.len()];
        self.stream.read_exact(&mut echo)?;
        assert_eq!(echo, chunk, "the echo differs");
        self.sent += chunk.len() as u64;
        Ok(())
    }
}

/// Config A: the stable target with web0 and web1; config B adds web2 to it
/// and a second target; they alternate.
fn config(variant: bool) -> String {
    let mut config = ConfigBuilder::new()
        .target("stable", STABLE)
        .upstream("web0", Topology::upstream_addr(0), UPSTREAM_PORT)
        .upstream("web1", Topology::upstream_addr(1), UPSTREAM_PORT);
    if variant {
        config = config
            .upstream("web2", Topology::upstream_addr(2), UPSTREAM_PORT)
            .target("churn", CHURN)
            .upstream("web2", Topology::upstream_addr(2), UPSTREAM_PORT);
    }
    config.build()
}

#[test]
fn fifty_reloads_under_load_break_nothing_and_end_like_a_fresh_start() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let mut lobby = Lobby::start(&topology.lb, &config(false));
    let mut streams: Vec<LongStream> = (0..4)
        .map(|_| LongStream::open(&topology.client, STABLE))
        .collect();
    let clients = ShortClients::start(&topology.client, STABLE);

    for round in 1..=50 {
        let before = lobby.log_count("reload applied");
        lobby.write_config(&config(round % 2 == 1));
        lobby.reload();
        lobby.wait_for_log_count("reload applied", before);
        for (i, stream) in streams.iter_mut().enumerate() {
            stream.exchange().unwrap_or_else(|e| {
                panic!("long-lived connection {i} broke at reload {round}: {e}")
            });
        }
    }
    let (ok, failed, errors) = clients.finish();
    assert_eq!(
        failed,
        0,
        "{failed} of {} short connections failed: {errors:?}",
        ok + failed
    );
    assert!(ok > 50, "the client made only {ok} connections");

    // The incremental result equals a fresh start with the final config,
    // once web2, out of rotation, no longer lingers in the masquerade set.
    let web2 = Topology::upstream_addr(2).to_string();
    let reloaded = wait_for("web2 to stop lingering", Duration::from_secs(10), || {
        let ruleset = topology.lb.lobby_ruleset();
        (!ruleset.contains(&web2)).then_some(ruleset)
    });
    lobby.stop_with(libc::SIGKILL);
    lobby.restart();
    assert_eq!(reloaded, topology.lb.lobby_ruleset());
}

#[test]
fn an_invalid_file_changes_nothing_and_a_later_valid_one_applies() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let lobby = Lobby::start(&topology.lb, &config(false));
    let ruleset = topology.lb.lobby_ruleset();

    // Written over the running file: the watcher notices, no SIGHUP needed.
    let broken = config(true).replace("port: 8082", "port: 80820");
    lobby.write_config(&broken);
    wait_for("the reload error", Duration::from_secs(10), || {
        lobby
            .log()
            .contains("reload failed, the running configuration stays")
            .then_some(())
    });
    assert!(
        lobby.log().contains("lb[0].targets[1].port"),
        "the error names the field: {}",
        lobby.log()
    );
    assert_eq!(topology.lb.lobby_ruleset(), ruleset);
    for _ in 0..4 {
        ask_name(&topology.client, target_addr(STABLE)).expect("traffic continues");
    }

    let before = lobby.log_count("reload applied");
    lobby.write_config(&config(true));
    lobby.wait_for_log_count("reload applied", before);
    assert_eq!(
        ask_name(&topology.client, target_addr(CHURN)).unwrap(),
        "web2"
    );
    assert!(
        lobby.log().contains("reload: target churn added"),
        "{}",
        lobby.log()
    );
    assert!(
        lobby.log().contains("reload: upstream stable/web2 added"),
        "{}",
        lobby.log()
    );
}

/// The daemon applies through libnftables unless told otherwise; the `nft`
/// binary (`--nft-process`, and the fallback without the library) must
/// leave the very same table, from a start and through a reload, and
/// balance the same way.
#[test]
fn libnftables_and_the_nft_binary_build_the_same_table() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let mut listings = Vec::new();
    for args in [&[][..], &["--nft-process"][..]] {
        let mut lobby = Lobby::start_with_args(
            &topology.lb,
            &config(false),
            lobby_tests::Launch::Setns,
            args,
        );
        let started = topology.lb.exec("nft", &["list", "table", "inet", "lobby"]);
        lobby.reload_with(&config(true));
        let names: Vec<String> = (0..6)
            .map(|_| {
                ask_name(&topology.client, target_addr(STABLE)).expect("a balanced connection")
            })
            .collect();
        let reloaded = topology.lb.exec("nft", &["list", "table", "inet", "lobby"]);
        assert!(
            !lobby.log().contains("a process per transaction"),
            "{args:?}: the daemon fell back to the nft binary:\n{}",
            lobby.log()
        );
        lobby.stop_with(libc::SIGTERM);
        listings.push((started.stdout, reloaded.stdout, names));
    }
    let (library, binary) = (&listings[0], &listings[1]);
    assert!(
        String::from_utf8_lossy(&library.1).contains("chain target-churn {"),
        "the reload's target is in the table"
    );
    assert_eq!(
        String::from_utf8_lossy(&library.0),
        String::from_utf8_lossy(&binary.0),
        "after the start"
    );
    assert_eq!(
        String::from_utf8_lossy(&library.1),
        String::from_utf8_lossy(&binary.1),
        "after the reload"
    );
    // Round-robin over web0, web1 and web2 after the reload: each twice.
    for names in [&library.2, &binary.2] {
        for web in ["web0", "web1", "web2"] {
            assert_eq!(
                names.iter().filter(|n| n.as_str() == web).count(),
                2,
                "{names:?}"
            );
        }
    }
}

/// 299 targets of ten upstreams that nothing routes to, each target's
/// first upstream at `weight`: a change of the weight rewrites every
/// target, a transaction that takes ~0.1 s to commit.
fn heavy(weight: u32) -> String {
    ConfigBuilder::new()
        .unrouted_targets(
            1..300,
            10,
            |_| 10,
            |_, u| match u {
                0 => format!("weight: {weight}"),
                _ => String::new(),
            },
        )
        .build()
}

/// How many of target t1's slots send to its first upstream (198.19.0.11,
/// see `unrouted_targets`): its weight, as the kernel has it.
fn first_weight_in_kernel(lb: &NetNs) -> usize {
    let map = lb.exec("nft", &["list", "map", "inet", "lobby", "target-t1_slots4"]);
    String::from_utf8_lossy(&map.stdout)
        .matches("198.19.0.11 . 8080")
        .count()
}

/// `lobby ctl reload` says how the reload it asked for ended: it returns
/// once the file as it was when asked is in the kernel, also when another
/// reload is committing as it asks (that one's end used to answer it).
#[test]
fn a_control_reload_returns_once_its_own_file_is_in_the_kernel() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(1);
    let lb = &topology.lb;
    let lobby = Lobby::start(lb, &heavy(1));
    for weight in [2, 4, 6] {
        let adopted = lobby.log_count("reload: target t1 changed");
        lobby.write_config(&heavy(weight));
        lobby.reload();
        // Read and planned: its transaction is on its way to the kernel.
        lobby.wait_for_log_count("reload: target t1 changed", adopted);
        lobby.reload_with(&heavy(weight + 1));
        assert_eq!(
            first_weight_in_kernel(lb),
            weight as usize + 1,
            "`lobby ctl reload` returned before its file was applied\n{}",
            lobby.log()
        );
    }
}

/// A reload asked for while the file is being read waits for that read:
/// two reads at once could end in either order. A large file read before
/// a small one was applied after it, and the older file ran until the
/// next change of the file, unless the config watcher's read of the
/// rename came later still (1 run of 3 failed then).
#[test]
fn the_file_as_last_written_runs_when_reloads_overlap() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let lobby = Lobby::start(&topology.lb, &config(false));
    let (hangups, applied) = (
        lobby.log_count("SIGHUP received"),
        lobby.log_count("reload applied"),
    );
    lobby.write_config(&heavy(2));
    lobby.reload();
    // Being read (~0.3 s in a debug build) when the small file replaces it.
    lobby.wait_for_log_count("SIGHUP received", hangups);
    // Renamed over it: written in place, the read in flight could find
    // the file cut short.
    let next = lobby.config_path.with_extension("next");
    std::fs::write(&next, config(true)).unwrap();
    std::fs::rename(&next, &lobby.config_path).unwrap();
    lobby.reload();
    // Both files applied, in some order; the config watcher's reads find
    // the text already read.
    lobby.wait_for_log_count("reload applied", applied + 1);
    let ruleset = topology.lb.lobby_ruleset();
    assert!(
        ruleset.contains("chain target-churn {") && !ruleset.contains("chain target-t1 {"),
        "the file read first runs:\n{}",
        lobby.log()
    );
    assert_eq!(
        ask_name(&topology.client, target_addr(CHURN)).unwrap(),
        "web2"
    );
}
