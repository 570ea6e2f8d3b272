//! What a hostile run against Lobby found (issue 22), each fault
//! reproduced against the real binary and followed by a check of kernel
//! state and of real traffic: outside changes of the table, a second
//! daemon, idle clients by the thousand, odd files at the config path,
//! addresses no connection can reach, starts that fail halfway and a full
//! conntrack table.
use std::{
    ffi::OsStr,
    fs::File,
    net::{IpAddr, SocketAddr, SocketAddrV4},
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lobby_tests::{
    Lobby, NameServer, NetNs, Topology, UdpFlow, UdpNameServer, conntrack,
    fixtures::{
        ConfigBuilder, UPSTREAM_PORT, assert_round_robin, health_check, names, start_server,
        start_servers, target_addr,
    },
    lobby::{Bpffs, Launch, binary, run_once, run_once_with},
    netns::normalize_ruleset,
    privileged,
    server::ask_name,
    wait_for,
};

const PORT: u16 = 8081;
/// The warning of a repair.
const DRIFT: &str = "was changed outside Lobby";
/// How soon an outside change must be repaired.
const REPAIR_DEADLINE: Duration = Duration::from_secs(5);

fn three_upstreams(extra: &str) -> String {
    ConfigBuilder::new()
        .target("web", PORT)
        .topology_upstreams(3, extra)
        .build()
}

/// Six connections went to the three upstreams in turn.
fn assert_balanced(topology: &Topology) {
    assert_round_robin(&names(topology, PORT, 6), 3);
}

/// Another program's table in the load balancer's namespace, with a chain
/// and a rule: Lobby must never touch it.
fn add_other_table(ns: &NetNs) {
    ns.exec("nft", &["add", "table", "ip", "other"]);
    ns.exec(
        "nft",
        &[
            "add", "chain", "ip", "other", "input", "{", "type", "filter", "hook", "input",
            "priority", "0", ";", "}",
        ],
    );
    ns.exec(
        "nft",
        &[
            "add", "rule", "ip", "other", "input", "tcp", "dport", "4242", "counter", "accept",
        ],
    );
}

/// `nft list table FAMILY NAME`, `None` while it does not exist.
fn table(ns: &NetNs, family: &str, name: &str) -> Option<String> {
    let output = ns.try_exec("nft", &["list", "table", family, name]);
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The median and the largest of `times`.
fn median_max(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort_unstable();
    (times[times.len() / 2], times[times.len() - 1])
}

#[test]
fn outside_changes_of_the_table_are_repaired_with_one_warning_each() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let lb = &topology.lb;
    add_other_table(lb);
    let other = table(lb, "ip", "other").expect("the other table");
    let lobby = Lobby::start(lb, &three_upstreams(""));
    assert_balanced(&topology);
    let applied = lb.lobby_ruleset();
    let faults: [&[&str]; 4] = [
        &["flush", "ruleset"],
        &["delete", "table", "inet", "lobby"],
        &["insert", "rule", "inet", "lobby", "prerouting", "drop"],
        &["flush", "chain", "inet", "lobby", "target-web"],
    ];
    let mut times = Vec::new();
    // Twice over, for repair times that mean something.
    for fault in faults.iter().chain(&faults) {
        let warnings = lobby.log_count(DRIFT);
        let started = Instant::now();
        lb.exec("nft", fault);
        wait_for(
            &format!("the table restored after `nft {}`", fault.join(" ")),
            REPAIR_DEADLINE,
            || {
                let listed = table(lb, "inet", "lobby").map(|text| normalize_ruleset(&text));
                (listed.as_ref() == Some(&applied)).then_some(())
            },
        );
        times.push(started.elapsed());
        assert_balanced(&topology);
        lobby.wait_for_log_count(DRIFT, warnings);
        assert_eq!(
            lobby.log_count(DRIFT),
            warnings + 1,
            "one warning for `nft {}`:\n{}",
            fault.join(" "),
            lobby.log()
        );
        // `flush ruleset` took the other table too: Lobby must not bring
        // back what is not its own. Its owner does.
        if fault[0] == "flush" && fault[1] == "ruleset" {
            assert_eq!(
                table(lb, "ip", "other"),
                None,
                "Lobby recreated another table"
            );
            add_other_table(lb);
        }
        assert_eq!(
            table(lb, "ip", "other").as_ref(),
            Some(&other),
            "the other table changed"
        );
    }
    let (median, max) = median_max(&mut times);
    eprintln!(
        "repair times over {} faults: median {median:?}, max {max:?}",
        times.len()
    );
}

#[test]
fn without_the_kernels_notifications_the_periodic_check_still_repairs_the_table() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let lb = &topology.lb;
    // Following the notifications, the daemon takes no periodic listing;
    // without them, the listing every 10 s is the only check.
    let lobby = Lobby::start_with_args(
        lb,
        &three_upstreams(""),
        Launch::Setns,
        &["--no-table-notifications"],
    );
    let applied = lb.lobby_ruleset();
    let warnings = lobby.log_count(DRIFT);
    lb.exec("nft", &["flush", "chain", "inet", "lobby", "target-web"]);
    wait_for(
        "the periodic check to restore the table",
        Duration::from_secs(10) + REPAIR_DEADLINE,
        || {
            let listed = table(lb, "inet", "lobby").map(|text| normalize_ruleset(&text));
            (listed.as_ref() == Some(&applied)).then_some(())
        },
    );
    assert_balanced(&topology);
    lobby.wait_for_log_count(DRIFT, warnings);
}

/// `web` over the three servers, and 999 targets of 10 upstreams each that
/// nothing routes to: a table whose listing takes long enough (~0.25 s of
/// CPU) that Lobby paces its listings of its own changes. `weight` is the
/// first filler upstream's.
fn thousand_targets(weight: u32) -> String {
    ConfigBuilder::new()
        .target("web", PORT)
        .topology_upstreams(3, "")
        .unrouted_targets(
            1..1000,
            10,
            |_| 10,
            |t, u| match (t, u) {
                (1, 0) => format!("weight: {weight}"),
                _ => String::new(),
            },
        )
        .build()
}

#[test]
fn an_outside_change_before_lobby_listed_its_own_is_repaired() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let lb = &topology.lb;
    let mut lobby = Lobby::start(lb, &thousand_targets(1));
    // Two changes of Lobby's own in a row: the listing that follows the
    // first makes the second's wait ~19 times as long (seconds here). Each
    // must be in before the rule below: one inserted while Lobby commits
    // is unheard, as Lobby is out of the notifications' group, and taken
    // for Lobby's.
    for weight in [2, 3] {
        lobby.reload_with(&thousand_targets(weight));
    }
    let applied = lb.lobby_ruleset();
    lb.exec(
        "nft",
        &["insert", "rule", "inet", "lobby", "prerouting", "drop"],
    );
    lobby.wait_for_log("before Lobby had listed its own");
    wait_for("the table restored", REPAIR_DEADLINE, || {
        (lb.lobby_ruleset() == applied).then_some(())
    });
    assert_eq!(
        lobby.log_count(DRIFT),
        1,
        "one warning, for the outside change:\n{}",
        lobby.log()
    );
    assert_balanced(&topology);
}

#[test]
fn lobby_does_not_take_its_own_changes_for_outside_ones() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let mut servers: Vec<_> = start_servers(&topology).into_iter().map(Some).collect();
    let config = three_upstreams(&health_check(UPSTREAM_PORT, true, 1, 1, 1));
    let lobby = Lobby::start(&topology.lb, &config);
    let applies = |lobby: &Lobby| lobby.log_count("ruleset applied");
    // Health flaps: each is an apply of Lobby's own.
    let (down, up) = ("upstream web/web0 is DOWN", "upstream web/web0 is UP");
    for _ in 0..2 {
        let before = applies(&lobby);
        let downs = lobby.log_count(down);
        servers[0] = None;
        lobby.wait_for_log_count(down, downs);
        let ups = lobby.log_count(up);
        servers[0] = Some(start_server(&topology, 0));
        lobby.wait_for_log_count(up, ups);
        wait_for("two applies", Duration::from_secs(10), || {
            (applies(&lobby) >= before + 2).then_some(())
        });
    }
    // A reload that changes the table.
    let before = applies(&lobby);
    lobby.write_config(
        &ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(2, "")
            .build(),
    );
    lobby.reload();
    lobby.wait_for_log_count("reload applied", 0);
    wait_for("the reload's apply", Duration::from_secs(10), || {
        (applies(&lobby) > before).then_some(())
    });
    // Past a whole period of the safety net's comparison (10 s), no
    // warning.
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(12) {
        assert_eq!(lobby.log_count(DRIFT), 0, "{}", lobby.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_second_daemon_on_a_live_table_exits_naming_the_first() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let mut lobby = Lobby::start(&topology.lb, &three_upstreams(""));
    assert_balanced(&topology);
    let applied = topology.lb.lobby_ruleset();

    // Its own socket and pin directory, the same namespace and table.
    let socket = lobby.dir.path().join("second.sock");
    let pins = lobby.pin_dir.with_file_name("second");
    let args = [
        OsStr::new("-c"),
        lobby.config_path.as_os_str(),
        OsStr::new("--socket"),
        socket.as_os_str(),
        OsStr::new("--pin-dir"),
        pins.as_os_str(),
    ];
    let (status, said, _) = run_once(&topology.lb, &args, Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("belongs to a running lobby (pid {},", lobby.pid())),
        "the first is pid {}: {said}",
        lobby.pid()
    );
    assert!(!socket.exists(), "the second daemon left its socket");
    assert!(!pins.exists(), "the second daemon left its pins");
    // The first goes on as if nothing happened.
    assert_eq!(topology.lb.lobby_ruleset(), applied);
    assert_balanced(&topology);
    lobby.stats();

    // Once the first is dead, its table is free to take over.
    lobby.stop_with(libc::SIGKILL);
    let takeovers = lobby.log_count("taking over the ruleset of a previous run");
    lobby.restart();
    lobby.wait_for_log_count("taking over the ruleset of a previous run", takeovers);
    assert_eq!(topology.lb.lobby_ruleset(), applied);
    assert_balanced(&topology);
}

/// Starts a connection to `addr` (of `len` bytes) and leaves it open and
/// idle, without waiting for it to be accepted: past a listener's backlog
/// the connect is still pending.
fn idle_connection(domain: i32, addr: *const libc::sockaddr, len: u32) -> OwnedFd {
    // SAFETY: a new socket we own; `addr` points at `len` valid bytes.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        if libc::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), addr, len) != 0 {
            let error = std::io::Error::last_os_error();
            assert!(
                matches!(error.raw_os_error(), Some(libc::EINPROGRESS | libc::EAGAIN)),
                "connect: {error}"
            );
        }
        fd
    }
}

fn idle_tcp(addr: SocketAddrV4) -> OwnedFd {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of_val(&sin) as u32;
    idle_connection(libc::AF_INET, (&raw const sin).cast(), len)
}

fn idle_unix(path: &Path) -> OwnedFd {
    // SAFETY: all zeroes is a valid sockaddr_un.
    let mut sun: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    assert!(bytes.len() < sun.sun_path.len(), "socket path too long");
    for (to, from) in sun.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    let len = std::mem::size_of_val(&sun) as u32;
    idle_connection(libc::AF_UNIX, (&raw const sun).cast(), len)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's descriptors")
        .count()
}

/// `lobby stats --json` and how long it took; `Err` with what it said when
/// it failed.
fn timed_stats(lobby: &Lobby) -> (Result<serde_json::Value, String>, Duration) {
    let started = Instant::now();
    let output = Command::new(binary())
        .args(["stats", "--json", "--socket"])
        .arg(&lobby.socket_path)
        .output()
        .expect("running lobby stats");
    let elapsed = started.elapsed();
    if !output.status.success() {
        return (
            Err(String::from_utf8_lossy(&output.stderr).into_owned()),
            elapsed,
        );
    }
    let stats = serde_json::from_slice(&output.stdout).expect("lobby stats --json prints JSON");
    (Ok(stats), elapsed)
}

#[test]
fn thousands_of_idle_clients_cost_neither_descriptors_nor_health() {
    if !privileged() {
        return;
    }
    const METRICS_CLIENTS: usize = 2_000;
    const CONTROL_CLIENTS: usize = 200;
    const MAX_FDS: usize = 600;
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let metrics = SocketAddrV4::new(Topology::LB_ADDR, 9091);
    let config = ConfigBuilder::new()
        .target("web", PORT)
        .topology_upstreams(3, &health_check(UPSTREAM_PORT, true, 1, 1, 1))
        .metrics(&metrics.to_string())
        .build();
    let lobby = Lobby::start(&topology.lb, &config);
    let pid = lobby.pid();
    let before = open_fds(pid);

    let mut held: Vec<OwnedFd> = topology
        .client
        .within(move || (0..METRICS_CLIENTS).map(|_| idle_tcp(metrics)).collect());
    let metrics_only = hold_and_watch(&lobby, &format!("{METRICS_CLIENTS} metrics clients"));
    held.extend((0..CONTROL_CLIENTS).map(|_| idle_unix(&lobby.socket_path)));
    let both = hold_and_watch(
        &lobby,
        &format!("{METRICS_CLIENTS} metrics and {CONTROL_CLIENTS} control clients"),
    );
    let most_fds = metrics_only.max(both);
    eprintln!("daemon fds: {before} before, at most {most_fds} with the idle clients");
    assert!(most_fds < MAX_FDS, "{most_fds} descriptors open");
    assert!(!lobby.log().contains(" is DOWN"), "{}", lobby.log());
    assert!(!lobby.log().contains("os error 24"), "{}", lobby.log());
    assert_balanced(&topology);
    drop(held);
}

/// For longer than a few probe intervals while `idle` clients are held:
/// `lobby stats` answers within 2 s each time and every upstream stays
/// available. Returns the most descriptors the daemon had open.
fn hold_and_watch(lobby: &Lobby, idle: &str) -> usize {
    let mut most_fds = 0;
    let mut stats_times = Vec::new();
    let window = Instant::now();
    while window.elapsed() < Duration::from_secs(6) {
        most_fds = most_fds.max(open_fds(lobby.pid()));
        let (stats, took) = timed_stats(lobby);
        stats_times.push(took);
        let stats = stats
            .unwrap_or_else(|e| panic!("lobby stats failed after {took:?} with {idle} idle: {e}"));
        assert!(
            took < Duration::from_secs(2),
            "lobby stats took {took:?} with {idle} idle"
        );
        let upstreams = stats["targets"][0]["upstreams"]
            .as_array()
            .expect("upstreams");
        assert!(
            upstreams.iter().all(|u| u["available"] == true),
            "an upstream went down with {idle} idle: {stats}\n{}",
            lobby.log()
        );
    }
    let (median, max) = median_max(&mut stats_times);
    eprintln!(
        "{idle} idle: at most {most_fds} daemon fds; lobby stats took median {median:?}, max {max:?}"
    );
    most_fds
}

/// A path for each odd file at the config path, made by `make`.
struct Hazard {
    what: &'static str,
    make: fn(&Path),
    /// What the error says.
    error: &'static str,
}

fn make_fifo(path: &Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("a path");
    // SAFETY: mkfifo reads a NUL-terminated path we own.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0, "mkfifo");
}

fn link_dev_zero(path: &Path) {
    std::os::unix::fs::symlink("/dev/zero", path).expect("symlink");
}

fn make_huge(path: &Path) {
    // Sparse: 100 MB that cost no disk.
    File::create(path)
        .and_then(|file| file.set_len(100 << 20))
        .expect("a 100 MB file");
}

const HAZARDS: [Hazard; 3] = [
    Hazard {
        what: "a FIFO",
        make: make_fifo,
        error: "not a regular file but a FIFO (named pipe)",
    },
    Hazard {
        what: "a symlink to /dev/zero",
        make: link_dev_zero,
        error: "not a regular file but a character device",
    },
    Hazard {
        what: "a 100 MB file",
        make: make_huge,
        error: "too large (104857600 bytes)",
    },
];

#[test]
fn odd_files_at_the_config_path_never_block_the_running_daemon() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let mut lobby = Lobby::start(&topology.lb, &three_upstreams(""));
    for hazard in &HAZARDS {
        let failures = lobby.log_count("reload failed");
        std::fs::remove_file(&lobby.config_path).expect("removing the config");
        (hazard.make)(&lobby.config_path);
        lobby.reload();
        lobby.wait_for_log_count("reload failed", failures);
        assert!(
            lobby.log().contains(hazard.error),
            "{}: {}",
            hazard.what,
            lobby.log()
        );
        let (stats, took) = timed_stats(&lobby);
        stats.unwrap_or_else(|e| panic!("{}: lobby stats: {e}", hazard.what));
        assert!(
            took < Duration::from_secs(2),
            "{}: stats took {took:?}",
            hazard.what
        );
        assert_balanced(&topology);
    }
    let started = Instant::now();
    let status = lobby.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "SIGTERM took {:?}",
        started.elapsed()
    );
}

#[test]
fn odd_files_at_the_config_path_stop_a_start_at_once() {
    if !privileged() {
        return;
    }
    let ns = NetNs::new("start");
    let dir = tempfile::tempdir().expect("temp dir");
    for (i, hazard) in HAZARDS.iter().enumerate() {
        let config = dir.path().join(format!("lobby-{i}.yaml"));
        (hazard.make)(&config);
        let socket = dir.path().join("lobby.sock");
        let pins = dir.path().join("pins");
        let args = [
            OsStr::new("-c"),
            config.as_os_str(),
            OsStr::new("--socket"),
            socket.as_os_str(),
            OsStr::new("--pin-dir"),
            pins.as_os_str(),
        ];
        let (status, said, took) = run_once(&ns, &args, Duration::from_secs(20));
        assert_eq!(status.code(), Some(1), "{}: {said}", hazard.what);
        assert!(said.contains(hazard.error), "{}: {said}", hazard.what);
        assert!(
            took < Duration::from_secs(3),
            "{}: exited after {took:?}",
            hazard.what
        );
    }
    let tables = ns.exec("nft", &["list", "tables"]);
    assert!(tables.stdout.is_empty(), "a failed start left a table");
}

/// `lobby check` needs no privileges: this test runs everywhere.
#[test]
fn addresses_no_connection_can_reach_fail_lobby_check_with_their_place() {
    let unusable = [
        ("127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("255.255.255.255", "broadcast"),
        ("224.0.0.1", "multicast"),
    ];
    let mut config = ConfigBuilder::new().target("web", PORT);
    for (i, (host, _)) in unusable.iter().enumerate() {
        config = config.upstream(&format!("bad{i}"), host, UPSTREAM_PORT);
    }
    let config = config
        .upstream("good", Topology::upstream_addr(0), UPSTREAM_PORT)
        .metrics(&SocketAddrV4::new(Topology::LB_ADDR, PORT).to_string())
        .build();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("lobby.yaml");
    std::fs::write(&path, &config).expect("the config");
    let output = Command::new(binary())
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("running lobby check");
    assert_eq!(output.status.code(), Some(1));
    let said = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = said.lines().collect();
    assert_eq!(errors.len(), unusable.len() + 1, "{said}");
    // FILE:LINE:COL: PATH: MESSAGE, LINE the line of what is wrong.
    let located = |error: &str| {
        let rest = error
            .strip_prefix(&format!("{}:", path.display()))
            .unwrap_or_else(|| panic!("not located in the file: {error}"));
        let mut parts = rest.splitn(3, ':');
        let line: usize = parts.next().and_then(|l| l.parse().ok()).expect("a line");
        let column: usize = parts.next().and_then(|c| c.parse().ok()).expect("a column");
        (
            line,
            column,
            parts.next().expect("a message").trim().to_owned(),
        )
    };
    let lines: Vec<&str> = config.lines().collect();
    for (i, (host, why)) in unusable.iter().enumerate() {
        let (line, column, message) = located(errors[i]);
        assert!(
            message.starts_with(&format!(
                "lb[0].targets[0].upstream_group.upstreams[{i}].host:"
            )) && message.contains(why),
            "{message}"
        );
        // The builder quotes hosts: the column is the quote's.
        assert_eq!(
            lines[line - 1][column - 1..].trim_matches('"'),
            *host,
            "{}",
            errors[i]
        );
    }
    let (line, _, message) = located(errors[unusable.len()]);
    assert!(message.starts_with("metrics.listen:"), "{message}");
    assert!(message.contains("balanced by target `web`"), "{message}");
    assert!(
        lines[line - 1].contains("listen"),
        "{}",
        errors[unusable.len()]
    );
}

#[test]
fn a_failed_start_leaves_no_socket_pins_or_table() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let taken = format!("{}:9092", Topology::LB_ADDR);
    let _holder = topology.lb.listen(taken.parse().unwrap());
    let dir = tempfile::tempdir().expect("temp dir");
    let bpffs = Bpffs::mount(dir.path().join("bpffs"));
    // A directory of nft that always fails: the first apply fails.
    let failing = dir.path().join("bin");
    std::fs::create_dir(&failing).unwrap();
    let nft = failing.join("nft");
    std::fs::write(
        &nft,
        "#!/bin/sh\necho 'nft: broken on purpose' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&nft, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = |metrics: Option<&str>| {
        let mut builder = ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(2, "");
        if let Some(listen) = metrics {
            builder = builder.metrics(listen);
        }
        builder.build()
    };
    let cases = [
        (
            "metrics port taken",
            config(Some(&taken)),
            None,
            "listening for metrics on",
        ),
        (
            "first apply fails",
            config(None),
            Some(&failing),
            "applying the first ruleset",
        ),
    ];
    for (what, text, path, error) in cases {
        let config_path = dir.path().join("lobby.yaml");
        std::fs::write(&config_path, text).unwrap();
        let socket = dir.path().join("lobby.sock");
        let pins = bpffs.0.join("lobby");
        let mut args = vec![
            OsStr::new("-c"),
            config_path.as_os_str(),
            OsStr::new("--socket"),
            socket.as_os_str(),
            OsStr::new("--pin-dir"),
            pins.as_os_str(),
        ];
        if path.is_some() {
            // The failing nft is a binary: the daemon must run it.
            args.push(OsStr::new("--nft-process"));
        }
        // The failing nft comes first in the daemon's PATH only.
        let path_var = path.map(|bin| {
            let mut paths = vec![bin.to_owned()];
            paths.extend(std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_default(),
            ));
            let mut var = std::ffi::OsString::from("PATH=");
            var.push(std::env::join_paths(paths).unwrap());
            var
        });
        let prefix: Vec<&OsStr> = match &path_var {
            Some(var) => vec![OsStr::new("env"), var.as_os_str()],
            None => Vec::new(),
        };
        let (status, said, _) =
            run_once_with(&topology.lb, &prefix, &args, Duration::from_secs(20));
        assert_eq!(status.code(), Some(1), "{what}: {said}");
        assert!(said.contains(error), "{what}: {said}");
        assert!(!socket.exists(), "{what}: the socket file was left behind");
        assert!(!pins.exists(), "{what}: pins were left behind");
        let tables = topology.lb.exec("nft", &["list", "tables"]);
        assert!(
            !String::from_utf8_lossy(&tables.stdout).contains("lobby"),
            "{what}: a table was left behind"
        );
    }
}

/// The conntrack watch's warning.
const CONNTRACK_WARNING: &str = "conntrack table nearly full";

#[test]
fn a_full_conntrack_table_refuses_clients_but_changes_no_upstream_state() {
    if !privileged() || !conntrack::tool_installed() {
        return;
    }
    let topology = Topology::new(3);
    let servers = start_servers(&topology);
    // A probe a second and one failure takes an upstream down: a probe the
    // full table dropped would show at once.
    let config = three_upstreams(&health_check(UPSTREAM_PORT, true, 1, 1, 1));
    let lobby = Lobby::start(&topology.lb, &config);
    assert_balanced(&topology);
    // Only entries that outlive the test: those of the connections above
    // would expire and make room.
    conntrack::flush(&topology.lb);
    let filled = conntrack::fill(&topology.lb);
    let (entries, max) = conntrack::usage(&topology.lb);
    eprintln!(
        "{} assured entries created in {:?}: {entries} of {max}",
        filled.created, filled.took
    );
    assert_eq!(entries, max, "the table is full");
    // Dropped by the kernel (its SYN, again and again), not refused by a
    // target without upstreams.
    let dropped = ask_name(&topology.client, target_addr(PORT));
    assert!(
        dropped
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut),
        "a client through a full table: {dropped:?}"
    );

    let accepted = || servers.iter().map(NameServer::accepted).collect::<Vec<_>>();
    let before = accepted();
    let probes = Instant::now();
    lobby.wait_for_log_count(CONNTRACK_WARNING, 0);
    // At least three health intervals, and probes reached every upstream
    // in each: their servers accepted them.
    wait_for(
        "three probes of each upstream",
        Duration::from_secs(20),
        || {
            let grown = accepted()
                .iter()
                .zip(&before)
                .all(|(now, then)| now - then >= 3);
            (grown && probes.elapsed() >= Duration::from_secs(3)).then_some(())
        },
    );
    eprintln!(
        "probes accepted in {:?} with the table full: {:?} -> {:?}",
        probes.elapsed(),
        before,
        accepted()
    );
    let log = lobby.log();
    assert!(!log.contains(" is DOWN"), "{log}");
    let stats = lobby.stats();
    let upstreams = stats["targets"][0]["upstreams"]
        .as_array()
        .expect("upstreams");
    assert!(upstreams.iter().all(|u| u["available"] == true), "{stats}");
    assert_eq!(
        conntrack::usage(&topology.lb).0,
        max,
        "the table stayed full"
    );

    // Room again: clients are balanced as before.
    conntrack::flush(&topology.lb);
    assert_balanced(&topology);
}

#[test]
fn health_probes_leave_no_conntrack_entry_while_clients_are_tracked() {
    if !privileged() || !conntrack::tool_installed() {
        return;
    }
    const UDP_PORT: u16 = 8053;
    let topology = Topology::dual_stack(2);
    // Upstream 0 takes IPv4, upstream 1 IPv6; each answers TCP and UDP.
    let upstream = |i: usize| -> IpAddr {
        match i {
            0 => Topology::upstream_addr(0).into(),
            _ => Topology::upstream_addr6(1).into(),
        }
    };
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for i in 0..2 {
        let at = SocketAddr::new(upstream(i), UPSTREAM_PORT);
        let name = format!("web{i}");
        tcp.push(NameServer::start(&topology.upstreams[i], at, &name));
        udp.push(UdpNameServer::start(&topology.upstreams[i], at, &name));
    }
    let tcp_check = health_check(UPSTREAM_PORT, true, 1, 1, 1);
    let udp_check = tcp_check.replace("protocol: tcp", "protocol: udp");
    let mut config = ConfigBuilder::new().target("web", PORT);
    for i in 0..2 {
        config = config.upstream_with(&format!("web{i}"), upstream(i), UPSTREAM_PORT, &tcp_check);
    }
    config = config.target("dns", UDP_PORT).protocol("udp");
    for i in 0..2 {
        config = config.upstream_with(&format!("web{i}"), upstream(i), UPSTREAM_PORT, &udp_check);
    }
    let lobby = Lobby::start(&topology.lb, &config.build());
    wait_for(
        "three probes of each upstream, TCP and UDP",
        Duration::from_secs(20),
        || {
            let tcp = tcp.iter().all(|s| s.accepted() >= 3);
            let udp = udp.iter().all(|s| s.received() >= 3);
            (tcp && udp).then_some(())
        },
    );

    // A client connection and a client flow of each family.
    let targets = [
        SocketAddr::from((Topology::LB_ADDR, PORT)),
        SocketAddr::from((Topology::LB_ADDR6, PORT)),
    ];
    for target in targets {
        ask_name(&topology.client, target).unwrap_or_else(|e| panic!("{target}: {e}"));
        let udp_target = SocketAddr::new(target.ip(), UDP_PORT);
        UdpFlow::open(&topology.client, udp_target)
            .ask_name()
            .unwrap_or_else(|e| panic!("{udp_target}: {e}"));
    }

    let tracked = conntrack::list(&topology.lb);
    let probes: Vec<_> = tracked
        .iter()
        .filter(|t| t.destination == upstream(0) || t.destination == upstream(1))
        .collect();
    assert!(probes.is_empty(), "probes were tracked: {probes:#?}");
    for (protocol, port) in [("tcp", PORT), ("udp", UDP_PORT)] {
        for target in targets {
            let balanced = tracked.iter().any(|t| {
                t.protocol == protocol
                    && t.destination == target.ip()
                    && t.destination_port == Some(port)
                    && (t.reply_source == upstream(0) || t.reply_source == upstream(1))
            });
            assert!(
                balanced,
                "no {protocol} client entry to {} translated to an upstream: {tracked:#?}",
                target.ip()
            );
        }
    }
    assert!(!lobby.log().contains(" is DOWN"), "{}", lobby.log());
}
