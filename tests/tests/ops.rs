//! What operators run Lobby with: the systemd unit, the example config,
//! the Prometheus endpoint and log output fit for journald.
use std::{
    io::{Read as _, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use lobby_tests::{
    Lobby, Topology,
    fixtures::{ConfigBuilder, names, start_servers},
    lobby::binary,
    privileged,
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

/// The value of the sample with exactly these labels.
fn sample(scrape: &str, name: &str, labels: &str) -> u64 {
    let prefix = format!("{name}{{{labels}}} ");
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
            "target=\"web\",upstream=\"{}\",address=\"{}:{}\"",
            upstream["name"].as_str().unwrap(),
            upstream["address"].as_str().unwrap(),
            upstream["port"]
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
    }
    // Logs go to journald as plain lines: no colour codes off a terminal.
    assert!(!lobby.log().contains('\u{1b}'), "escape codes in the log");
}
