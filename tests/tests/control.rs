//! Runtime control and events end to end: `lobby ctl` drains, disables and
//! enables an upstream in the running ruleset, shows the state, reloads
//! with the outcome; an event command hears an upstream go down and up; a
//! webhook that never answers holds up nothing but its own events.
use std::{
    io::Write as _,
    time::{Duration, Instant},
};

use lobby_tests::{
    Lobby, Topology,
    fixtures::{
        ConfigBuilder, UPSTREAM_PORT, count, health_check, in_rotation, names, start_server,
        start_servers,
    },
    privileged, wait_for,
};

const PORT: u16 = 8081;

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn drain_disable_enable_state_and_reload() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(3);
    let _servers = start_servers(&topology);
    let config = ConfigBuilder::new()
        .target("web", PORT)
        .topology_upstreams(3, "");
    let lobby = Lobby::start(&topology.lb, &config.build());

    // A long-lived connection to web1 survives its drain.
    let (mut stream, mut reader) = loop {
        let stream = topology
            .client
            .connect(
                lobby_tests::fixtures::target_addr(PORT),
                Duration::from_secs(5),
            )
            .unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut name = String::new();
        std::io::BufRead::read_line(&mut reader, &mut name).unwrap();
        if name.trim() == "web1" {
            break (stream, reader);
        }
    };
    let drained = lobby.ctl(&["drain", "web/web1"]);
    assert!(drained.status.success(), "{}", text(&drained));
    assert_eq!(text(&drained).trim(), "upstream web/web1 drained");
    // Answered once the kernel has it.
    assert!(!in_rotation(&topology, 1));
    let seen = names(&topology, PORT, 60);
    assert_eq!(count(&seen, "web1"), 0, "{seen:?}");
    stream.write_all(b"still here\n").unwrap();
    let mut echo = String::new();
    std::io::BufRead::read_line(&mut reader, &mut echo).unwrap();
    assert_eq!(echo, "still here\n");

    let state = lobby.ctl(&["state", "--json"]);
    let state: serde_json::Value = serde_json::from_slice(&state.stdout).unwrap();
    let web1 = &state["targets"][0]["upstreams"][1];
    assert_eq!(web1["admin_state"], "drained", "{state}");
    assert_eq!(web1["weight"], 0, "{state}");

    // A reload of an unchanged file keeps the drain.
    let reloaded = lobby.ctl(&["reload"]);
    assert!(reloaded.status.success(), "{}", text(&reloaded));
    assert!(
        text(&reloaded).contains("reload applied: no change"),
        "{}",
        text(&reloaded)
    );
    assert!(!in_rotation(&topology, 1));

    let disabled = lobby.ctl(&["disable", "web/web2"]);
    assert!(disabled.status.success(), "{}", text(&disabled));
    assert!(!in_rotation(&topology, 2));
    assert_eq!(count(&names(&topology, PORT, 10), "web0"), 10);

    for upstream in ["web/web1", "web/web2"] {
        assert!(lobby.ctl(&["enable", upstream]).status.success());
    }
    assert!(in_rotation(&topology, 1) && in_rotation(&topology, 2));
    let seen = names(&topology, PORT, 30);
    for i in 0..3 {
        assert_eq!(count(&seen, &format!("web{i}")), 10, "{seen:?}");
    }

    // Unknown names are refused with what exists.
    let unknown = lobby.ctl(&["drain", "web/nosuch"]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        text(&unknown).contains("no upstream web/nosuch; web has web0, web1, web2"),
        "{}",
        text(&unknown)
    );
    // An invalid file: exit 1 with the errors, the running config stays.
    lobby.write_config("lb: [");
    let failed = lobby.ctl(&["reload"]);
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed));
    assert!(text(&failed).contains("reload failed"), "{}", text(&failed));
    assert_eq!(names(&topology, PORT, 3).len(), 3);
}

#[test]
fn an_event_command_hears_an_upstream_go_down_and_up_in_order() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(2);
    let mut servers: Vec<_> = start_servers(&topology).into_iter().map(Some).collect();
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("events");
    let check = health_check(9000, true, 1, 1, 1);
    let config = format!(
        "{}events:\n  command: [\"sh\", \"-c\", \"echo $LOBBY_EVENT $LOBBY_TARGET/$LOBBY_UPSTREAM $LOBBY_ADDRESS >> {}\"]\n  timeout: 2\n",
        ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(2, &check)
            .build(),
        record.display()
    );
    let _lobby = Lobby::start(&topology.lb, &config);
    servers[1] = None;
    let recorded = || std::fs::read_to_string(&record).unwrap_or_default();
    wait_for("the down event", Duration::from_secs(10), || {
        recorded().contains("upstream_down").then_some(())
    });
    servers[1] = Some(start_server(&topology, 1));
    wait_for("the up event", Duration::from_secs(10), || {
        recorded().contains("upstream_up").then_some(())
    });
    let lines: Vec<String> = recorded().lines().map(str::to_owned).collect();
    let address = Topology::upstream_addr(1);
    assert_eq!(
        lines,
        [
            format!("upstream_down web/web1 {address}"),
            format!("upstream_up web/web1 {address}"),
        ],
        "{lines:?}"
    );
}

/// How long web1 takes to leave the rotation once its server stops; web2
/// went down just before, so that with `silent_webhook` its event is the
/// one stuck in delivery to a receiver that accepts (the kernel does, from
/// the backlog) and never answers. That delivery is then seen to give up.
fn removal_time(silent_webhook: bool) -> Duration {
    let topology = Topology::new(3);
    let mut servers: Vec<_> = start_servers(&topology).into_iter().map(Some).collect();
    let webhook = "127.0.0.1:8099";
    let _receiver = silent_webhook.then(|| topology.lb.listen(webhook.parse().unwrap()));
    let events = if silent_webhook {
        format!("events:\n  webhook: \"http://{webhook}/lobby\"\n  timeout: 3\n")
    } else {
        String::new()
    };
    let check = health_check(UPSTREAM_PORT, true, 1, 1, 2);
    let config = format!(
        "{}{events}",
        ConfigBuilder::new()
            .target("web", PORT)
            .topology_upstreams(3, &check)
            .build()
    );
    let lobby = Lobby::start(&topology.lb, &config);
    servers[2] = None;
    wait_for("web2 out of rotation", Duration::from_secs(10), || {
        (!in_rotation(&topology, 2)).then_some(())
    });
    servers[1] = None;
    let stopped = Instant::now();
    wait_for("web1 out of rotation", Duration::from_secs(10), || {
        (!in_rotation(&topology, 1)).then_some(())
    });
    let removal = stopped.elapsed();
    if silent_webhook {
        lobby.wait_for_log_count(
            &format!("webhook http://{webhook}/lobby did not answer within 3s; event upstream_down web/web2 dropped"),
            0,
        );
    }
    removal
}

#[test]
fn a_webhook_that_never_answers_does_not_delay_removals() {
    if !privileged() {
        return;
    }
    // The same bound as without events (tests/tests/health.rs): two
    // failed probes a second apart, a 1 s timeout, a second of slack.
    let bound = Duration::from_secs(2 + 1 + 1);
    let without = removal_time(false);
    let with = removal_time(true);
    eprintln!(
        "removal of a dead upstream: {without:?} without events, {with:?} with a silent webhook"
    );
    assert!(without <= bound, "{without:?} without events");
    assert!(with <= bound, "{with:?} with a webhook that never answers");
}

#[test]
fn a_user_without_access_to_the_socket_is_told_so() {
    if !privileged() {
        return;
    }
    let topology = Topology::new(1);
    let _servers = start_servers(&topology);
    let config = ConfigBuilder::new()
        .target("web", PORT)
        .topology_upstreams(1, "");
    let lobby = Lobby::start(&topology.lb, &config.build());
    // The socket is root's (mode 0600, in a directory of root's).
    let (_bin_dir, binary) = lobby_tests::lobby::binary_for_anyone();
    let output = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(binary)
        .args(["ctl", "state", "--socket"])
        .arg(&lobby.socket_path)
        .output()
        .expect("running setpriv");
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        text(&output).contains("permission denied on")
            && text(&output).contains("lobby ctl needs root or the socket's owner"),
        "{}",
        text(&output)
    );
}
