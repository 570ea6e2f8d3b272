//! `acceleration` on a kernel without flowtables (this host's, built with
//! `CONFIG_NF_FLOW_TABLE` unset): the daemon refuses it at start with a
//! message that says what is missing, touching nothing, while `lobby
//! check` accepts the file. The fast path itself is tested where the
//! kernel has it: `cargo xtask vm-test` (its acceleration step).
use std::process::Command;

use lobby_tests::{
    Lobby, Topology,
    fixtures::{ConfigBuilder, start_servers, target_addr},
    lobby::binary,
    privileged,
    server::ask_name,
};

fn accelerated() -> String {
    let config = ConfigBuilder::new()
        .target("web", 8081)
        .topology_upstreams(1, "")
        .build();
    config.replacen(
        "  - engine: nftables\n",
        "  - engine: nftables\n    acceleration: { flowtable: true, hardware_offload: false }\n",
        1,
    )
}

/// Whether the kernel of `topology`'s load balancer has flowtables, asked
/// as Lobby asks it.
fn kernel_has_flowtables(topology: &Topology) -> bool {
    let script = "table inet probe {\n\tflowtable ft { hook ingress priority filter; }\n}\n";
    let path =
        std::env::temp_dir().join(format!("lobby-flowtable-probe-{}.nft", std::process::id()));
    std::fs::write(&path, script).expect("writing the probe");
    let output = topology.lb.try_exec(
        "nft",
        &["--check", "-f", path.to_str().expect("a UTF-8 path")],
    );
    let _ = std::fs::remove_file(&path);
    output.status.success()
}

/// A topology whose kernel lacks flowtables, where the refusals can be
/// seen; `None` (said) without privileges or on a kernel that has them.
fn topology_without_flowtables() -> Option<Topology> {
    if !privileged() {
        return None;
    }
    let topology = Topology::new(1);
    if kernel_has_flowtables(&topology) {
        eprintln!("this kernel has flowtables: the refusal cannot be tested here");
        return None;
    }
    Some(topology)
}

#[test]
fn acceleration_is_refused_where_the_kernel_has_no_flowtable() {
    let Some(topology) = topology_without_flowtables() else {
        return;
    };
    let dir = tempfile::tempdir().expect("a temporary directory");
    let config = dir.path().join("lobby.yaml");
    std::fs::write(&config, accelerated()).expect("writing the config");
    let config = config.to_str().expect("a UTF-8 path");

    let check = Command::new(binary())
        .args(["check", "-c", config])
        .output()
        .expect("running lobby check");
    assert!(
        check.status.success(),
        "lobby check validates the syntax only: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    let socket = dir.path().join("lobby.sock");
    let pins = dir.path().join("pins");
    let output = topology.lb.try_exec(
        binary().to_str().expect("a UTF-8 path"),
        &[
            "-c",
            config,
            "--socket",
            socket.to_str().unwrap(),
            "--pin-dir",
            pins.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "lobby started:\n{stderr}");
    for needle in [
        "acceleration: this kernel has no flowtable support",
        "nf_flow_table",
        "remove `acceleration` from",
        "No such file or directory",
    ] {
        assert!(stderr.contains(needle), "no `{needle}` in:\n{stderr}");
    }
    let tables = topology.lb.exec("nft", &["list", "tables"]);
    assert!(
        !String::from_utf8_lossy(&tables.stdout).contains("lobby"),
        "a refused start left a table: {}",
        String::from_utf8_lossy(&tables.stdout)
    );
}

/// A reload that turns acceleration on where the kernel has no flowtables
/// is refused like a start, and the running configuration keeps balancing
/// (it used to be adopted and its every apply failed, retried each second).
#[test]
fn acceleration_by_reload_is_refused_and_the_running_config_stays() {
    let Some(topology) = topology_without_flowtables() else {
        return;
    };
    let _servers = start_servers(&topology);
    let plain = ConfigBuilder::new()
        .target("web", 8081)
        .topology_upstreams(1, "")
        .build();
    let lobby = Lobby::start(&topology.lb, &plain);
    let failed = lobby.log_count("reload failed");
    lobby.write_config(&accelerated());
    lobby.reload();
    lobby.wait_for_log_count("reload failed", failed);
    let log = lobby.log();
    assert!(
        log.contains("acceleration: this kernel has no flowtable support"),
        "{log}"
    );
    assert_eq!(lobby.log_count("applying the ruleset failed"), 0, "{log}");
    assert_eq!(
        ask_name(&topology.client, target_addr(8081)).unwrap(),
        "web0"
    );
}
