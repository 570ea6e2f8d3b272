//! What operators run Lobby with: the systemd unit, the example config,
//! the Prometheus endpoint and log output fit for journald, the original's
//! command line, and a non-root user with CAP_NET_ADMIN alone.
use std::{
    ffi::{OsStr, OsString},
    io::{Read as _, Write as _},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use lobby_tests::{
    Lobby, NetNs, Topology,
    fixtures::{ConfigBuilder, names, start_servers, target_addr},
    lobby::{Bpffs, binary, run_once_with, spawn_in},
    privileged,
    server::ask_name,
    wait_for,
};

fn dist(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dist")
        .join(file)
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    // verify wants the ExecStart binaries to exist: point them at this build.
    let unit = std::fs::read_to_string(dist("lobby.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lobby.service");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/lobby", &binary().to_string_lossy()),
    )
    .unwrap();
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("running systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

/// `systemctl reload lobby` with this build and `config`: the unit's
/// `ExecReload=` lines in turn, the first failure failing it. Whether it
/// succeeded, and what it printed.
fn unit_reload(config: &Path) -> (bool, String) {
    let unit = std::fs::read_to_string(dist("lobby.service")).unwrap();
    let mut said = String::new();
    for line in unit.lines().filter_map(|l| l.strip_prefix("ExecReload=")) {
        let words: Vec<OsString> = line
            .split_whitespace()
            .map(|word| match word {
                "/usr/bin/lobby" => binary().into_os_string(),
                "/etc/lobby/lobby.yaml" => config.as_os_str().to_owned(),
                word => word.into(),
            })
            .collect();
        let output = Command::new(&words[0]).args(&words[1..]).output().unwrap();
        said.push_str(&String::from_utf8_lossy(&output.stdout));
        said.push_str(&String::from_utf8_lossy(&output.stderr));
        if !output.status.success() {
            return (false, said);
        }
    }
    (true, said)
}

#[test]
fn the_units_reload_returns_once_the_kernel_has_the_file_and_fails_with_the_reasons() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    // The unit names no socket: the daemon takes its table's, which the
    // reload finds from the file.
    let config = |upstreams: &[usize]| {
        let mut builder = ConfigBuilder::new().target("web", 8081);
        for &i in upstreams {
            builder = builder.topology_upstream(i, "");
        }
        builder.build().replace(
            "  - engine: nftables\n",
            "  - engine: nftables\n    nftables: { table: lbunit }\n",
        )
    };
    let lobby = Lobby::start_on_table_socket(&topology.lb, &config(&[0, 1]), "lbunit");

    lobby.write_config(&config(&[1]));
    let (reloaded, said) = unit_reload(&lobby.config_path);
    assert!(reloaded && said.contains("reload applied"), "{said}");
    // Returned once the kernel had it: no wait before asking.
    assert_eq!(names(&topology, 8081, 4), ["web1"; 4], "{}", lobby.log());

    // A file the daemon would refuse fails the reload, with its location;
    // the running configuration stays.
    lobby.write_config(&config(&[0]).replace("port: 8081", "port: 0"));
    let (reloaded, said) = unit_reload(&lobby.config_path);
    assert!(!reloaded, "{said}");
    assert!(
        said.contains("lobby.yaml:") && said.contains("port"),
        "{said}"
    );
    assert_eq!(names(&topology, 8081, 4), ["web1"; 4], "{}", lobby.log());

    // A renamed table is the daemon's restart, and the reload says why it
    // found no daemon.
    lobby.write_config(&config(&[0]).replace("table: lbunit", "table: lbrenamed"));
    let (reloaded, said) = unit_reload(&lobby.config_path);
    assert!(!reloaded, "{said}");
    assert!(said.contains("keeps the table it started with"), "{said}");
    assert_eq!(names(&topology, 8081, 4), ["web1"; 4], "{}", lobby.log());
}

#[test]
fn the_example_config_is_valid() {
    let output = Command::new(binary())
        .args(["check", "-c"])
        .arg(dist("lobby.yaml"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The body of `GET /metrics` from the client's namespace.
fn scrape(topology: &Topology, addr: std::net::SocketAddr) -> String {
    let mut stream = topology
        .client
        .connect(addr, Duration::from_secs(5))
        .expect("metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        // Read to the end below: ask the server to close after answering.
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: lobby\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// The value of the sample with exactly these labels (none: `""`).
fn sample(scrape: &str, name: &str, labels: &str) -> u64 {
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    let line = scrape
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{scrape}"));
    line[prefix.len()..].parse().unwrap()
}

#[test]
fn metrics_pass_promtool_and_equal_the_stats() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let listen = format!("{}:9091", Topology::LB_ADDR);
    let config = ConfigBuilder::new()
        .target("web", 8081)
        .topology_upstreams(2, "")
        .metrics(&listen)
        .build();
    let lobby = Lobby::start(&topology.lb, &config);
    names(&topology, 8081, 6);
    // Counting finishes with the connections' last packets: wait until two
    // reads agree, then compare a scrape with the stats.
    let stats = lobby_tests::wait_for("the counters to settle", Duration::from_secs(10), || {
        let first = lobby.stats();
        std::thread::sleep(Duration::from_millis(200));
        (lobby.stats() == first).then_some(first)
    });
    let body = scrape(&topology, listen.parse().unwrap());

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; cargo xtask setup installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let verdict = promtool.wait_with_output().unwrap();
    assert!(
        verdict.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&verdict.stdout),
        String::from_utf8_lossy(&verdict.stderr)
    );

    for upstream in stats["targets"][0]["upstreams"].as_array().unwrap() {
        let labels = format!(
            "target=\"web\",upstream=\"{}\",address=\"{}:{}\",protocol=\"tcp\",family=\"{}\"",
            upstream["name"].as_str().unwrap(),
            upstream["address"].as_str().unwrap(),
            upstream["port"],
            upstream["family"].as_str().unwrap()
        );
        assert_eq!(
            sample(&body, "lobby_upstream_connections_total", &labels),
            upstream["connections"].as_u64().unwrap()
        );
        assert_eq!(
            sample(&body, "lobby_upstream_resets_total", &labels),
            upstream["resets"].as_u64().unwrap()
        );
        for (direction, field) in [("in", "in"), ("out", "out")] {
            let with = format!("{labels},direction=\"{direction}\"");
            assert_eq!(
                sample(&body, "lobby_upstream_packets_total", &with),
                upstream[format!("packets_{field}")].as_u64().unwrap()
            );
            assert_eq!(
                sample(&body, "lobby_upstream_bytes_total", &with),
                upstream[format!("bytes_{field}")].as_u64().unwrap()
            );
        }
        assert_eq!(sample(&body, "lobby_upstream_up", &labels), 1);
        assert_eq!(upstream["connections"], 3);
        let state = upstream["admin_state"].as_str().unwrap();
        assert_eq!(
            sample(
                &body,
                "lobby_upstream_admin_state",
                &format!("{labels},state=\"{state}\"")
            ),
            1
        );
        assert_eq!(
            sample(&body, "lobby_upstream_weight", &labels),
            upstream["weight"].as_u64().unwrap()
        );
    }
    // The NAT's connection tracking is on in the daemon's namespace.
    assert!(sample(&body, "lobby_conntrack_max", "") > 0, "{body}");
    assert!(body.contains("\nlobby_conntrack_entries "), "{body}");

    // A drain shows in the stats and the metrics alike.
    assert!(lobby.ctl(&["drain", "web/web1"]).status.success());
    let web1 = lobby.upstream_stats("web", "web1");
    assert_eq!(web1["admin_state"], "drained", "{web1}");
    assert_eq!(web1["weight"], 0, "{web1}");
    assert_eq!(lobby.upstream_stats("web", "web0")["weight"], 1);
    let body = scrape(&topology, listen.parse().unwrap());
    let labels = format!(
        "target=\"web\",upstream=\"web1\",address=\"{}:9000\",protocol=\"tcp\",family=\"ipv4\"",
        Topology::upstream_addr(1)
    );
    for (state, value) in [("enabled", 0), ("drained", 1), ("disabled", 0)] {
        assert_eq!(
            sample(
                &body,
                "lobby_upstream_admin_state",
                &format!("{labels},state=\"{state}\"")
            ),
            value,
            "{state}"
        );
    }
    assert_eq!(sample(&body, "lobby_upstream_weight", &labels), 0);
    // Logs go to journald as plain lines: no colour codes off a terminal.
    assert!(!lobby.log().contains('\u{1b}'), "escape codes in the log");
}

/// Whether something accepts connections on `addr`, from the client.
fn answers(topology: &Topology, addr: std::net::SocketAddr) -> bool {
    topology
        .client
        .connect(addr, Duration::from_secs(2))
        .is_ok()
}

#[test]
fn a_reload_moves_or_removes_the_metrics_endpoint() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let at = |port: u16| std::net::SocketAddr::from((Topology::LB_ADDR, port));
    let config = |port: Option<u16>| {
        let builder = ConfigBuilder::new()
            .target("web", 8081)
            .topology_upstreams(2, "");
        match port {
            Some(port) => builder.metrics(&at(port).to_string()),
            None => builder,
        }
        .build()
    };
    let lobby = Lobby::start(&topology.lb, &config(Some(9093)));
    scrape(&topology, at(9093));

    lobby.reload_with(&config(Some(9094)));
    scrape(&topology, at(9094));
    assert!(!answers(&topology, at(9093)), "the old port still answers");
    assert!(
        lobby
            .log()
            .contains(&format!("metrics endpoint listening on {}", at(9094))),
        "{}",
        lobby.log()
    );

    // A port that cannot be bound: the endpoint stays where it is.
    let _holder = topology.lb.listen(at(9095));
    lobby.reload_with(&config(Some(9095)));
    assert!(
        lobby.log().contains(&format!(
            "metrics.listen changed but listening for metrics on {}",
            at(9095)
        )),
        "{}",
        lobby.log()
    );
    scrape(&topology, at(9094));

    lobby.reload_with(&config(None));
    assert!(!answers(&topology, at(9094)), "removed, yet it answers");
    // Back to the first port, whose connections may linger in TIME_WAIT.
    lobby.reload_with(&config(Some(9093)));
    scrape(&topology, at(9093));
    names(&topology, 8081, 4);
}

/// A daemon started by an operator's own command line (none of the
/// harness's flags) in `ns`; killed on drop if still running.
struct Started {
    child: Option<Child>,
    output: tempfile::NamedTempFile,
}

impl Started {
    fn spawn(ns: &NetNs, command: &[&OsStr]) -> Self {
        let output = tempfile::NamedTempFile::new().expect("a file for the output");
        let child = spawn_in(ns, command, output.path());
        Self {
            child: Some(child),
            output,
        }
    }

    fn said(&self) -> String {
        std::fs::read_to_string(self.output.path()).unwrap_or_default()
    }

    /// Waits until the target on 8081 answers with an upstream's name.
    fn wait_until_balancing(&mut self, topology: &Topology) {
        wait_for("lobby to balance", Duration::from_secs(20), || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("lobby exited ({status}): {}", self.said());
            }
            ask_name(&topology.client, target_addr(8081)).ok()
        });
    }

    /// SIGTERM, then the exit status.
    fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
        wait_for("lobby to exit", Duration::from_secs(20), || {
            child.try_wait().unwrap()
        })
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- lobby output ---\n{}", self.said());
        }
    }
}

fn two_upstreams() -> String {
    ConfigBuilder::new()
        .target("web", 8081)
        .topology_upstreams(2, "")
        .build()
}

#[test]
fn the_originals_command_line_with_l_warning_starts_and_stops() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, two_upstreams()).unwrap();
    let bpffs = Bpffs::mount(dir.path().join("bpffs"));
    let socket = dir.path().join("lobby.sock");
    let pins = bpffs.0.join("lobby");
    let binary = binary();
    // The original's ExecStart, with this test's socket and pins.
    let mut lobby = Started::spawn(
        &topology.lb,
        &[
            binary.as_os_str(),
            OsStr::new("-l"),
            OsStr::new("warning"),
            OsStr::new("-c"),
            config.as_os_str(),
            OsStr::new("--socket"),
            socket.as_os_str(),
            OsStr::new("--pin-dir"),
            pins.as_os_str(),
        ],
    );
    lobby.wait_until_balancing(&topology);
    let seen = names(&topology, 8081, 4);
    assert_eq!(seen.iter().filter(|n| *n == "web0").count(), 2, "{seen:?}");
    assert!(socket.exists() && pins.exists());
    let status = lobby.stop();
    assert!(status.success(), "{status}: {}", lobby.said());
    // Warnings and errors only: the info lines of a start are not there.
    assert!(!lobby.said().contains("INFO"), "{}", lobby.said());
    assert!(!socket.exists() && !pins.exists());
}

/// The wrapper that runs lobby as nobody with CAP_NET_ADMIN alone, with
/// /run/lobby (its table lock) on a tmpfs nobody owns in a mount namespace
/// of its own, as systemd's RuntimeDirectory would give it.
const AS_NOBODY: [&str; 16] = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    "mount -t tmpfs -o uid=65534,gid=65534,mode=0755 lobby-run /run/lobby && exec \"$@\"",
    "sh",
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all,+net_admin",
    "--ambient-caps=-all,+net_admin",
    "--bounding-set=-all,+net_admin",
    "--",
];

#[test]
fn cap_net_admin_alone_balances_without_counters_and_counters_name_cap_bpf() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let _servers = start_servers(&topology);
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
    let config = dir.path().join("lobby.yaml");
    std::fs::write(&config, two_upstreams()).unwrap();
    let socket = dir.path().join("lobby.sock");
    let (_bin_dir, binary) = lobby_tests::lobby::binary_for_anyone();
    let wrapper: Vec<&OsStr> = AS_NOBODY.iter().map(OsStr::new).collect();
    let args = [
        OsStr::new("-c"),
        config.as_os_str(),
        OsStr::new("--socket"),
        socket.as_os_str(),
    ];

    // With counters: exit 1 at once, naming what is missing and the way
    // around it.
    let (status, said, _) = run_once_with(&topology.lb, &wrapper, &args, Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(
        said.contains("CAP_BPF or CAP_SYS_ADMIN") && said.contains("--no-counters"),
        "{said}"
    );
    assert!(
        !said.contains("CAP_NET_ADMIN"),
        "it has CAP_NET_ADMIN: {said}"
    );

    let command: Vec<&OsStr> = wrapper
        .iter()
        .copied()
        .chain([binary.as_os_str()])
        .chain(args)
        .chain([OsStr::new("--no-counters")])
        .collect();
    let mut lobby = Started::spawn(&topology.lb, &command);
    lobby.wait_until_balancing(&topology);
    let seen = names(&topology, 8081, 6);
    for name in ["web0", "web1"] {
        assert_eq!(seen.iter().filter(|n| *n == name).count(), 3, "{seen:?}");
    }
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&socket).unwrap());
    assert_eq!(owner, 65534, "the socket is nobody's");
    let status = lobby.stop();
    assert!(status.success(), "{status}: {}", lobby.said());
    assert!(!socket.exists(), "socket left behind");
    let tables = topology.lb.exec("nft", &["list", "tables"]);
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("lobby"),
        "table left behind: {}",
        lobby.said()
    );
}
