//! A live tour: three upstreams behind one target, connections going to
//! them in turn, the ruleset that does it, and a clean shutdown.
use std::net::SocketAddr;

use anyhow::bail;
use lobby_tests::{Lobby, NameServer, Topology, server::ask_name};

use crate::cmd::build_lobby;

const PORT: u16 = 8081;
const UPSTREAM_PORT: u16 = 9000;

pub fn run() -> anyhow::Result<()> {
    prepare("builds network namespaces and loads eBPF")?;

    println!(
        "\n== Topology: client 198.18.0.2 -> lobby 198.18.0.1:{PORT} -> 3 upstreams, each in its own network namespace"
    );
    let topology = Topology::new(3);
    let _servers: Vec<NameServer> = (0..3)
        .map(|i| {
            NameServer::start(
                &topology.upstreams[i],
                SocketAddr::from((Topology::upstream_addr(i), UPSTREAM_PORT)),
                &format!("web{}", i + 1),
            )
        })
        .collect();
    let config = demo_config();
    println!("\n== lobby.yaml\n{config}");
    let mut lobby = Lobby::start(&topology.lb, &config);

    println!("== 9 connections from the client to 198.18.0.1:{PORT}");
    let target = SocketAddr::from((Topology::LB_ADDR, PORT));
    for i in 1..=9 {
        match ask_name(&topology.client, target) {
            Ok(name) => println!("connection {i} -> {name}"),
            Err(e) => bail!("connection {i} failed: {e}"),
        }
    }
    // Counting is asynchronous to the client: let the last FIN/ACKs land.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let stats = std::process::Command::new(lobby_tests::lobby::binary())
        .arg("stats")
        .arg("--socket")
        .arg(&lobby.socket_path)
        .output()?;
    println!(
        "\n== lobby stats: what the eBPF counters saw per upstream (rates over 1 s)\n{}",
        String::from_utf8_lossy(&stats.stdout)
    );
    let ruleset = topology.lb.exec("nft", &["list", "table", "inet", "lobby"]);
    println!(
        "\n== The ruleset Lobby applied (nft list table inet lobby)\n{}",
        String::from_utf8_lossy(&ruleset.stdout)
    );

    lobby.stop_with(libc::SIGTERM);
    println!("== Lobby's log\n{}", lobby.log());
    let tables = topology.lb.exec("nft", &["list", "tables"]);
    println!(
        "== After SIGTERM, tables left in the namespace: {:?}",
        String::from_utf8_lossy(&tables.stdout).trim()
    );
    println!("== Namespaces are removed as the demo exits.");
    Ok(())
}

/// What every demo needs first: root (it `does` things only root may),
/// the setup and the lobby binary.
pub fn prepare(does: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo {does}: run it as root");
    }
    crate::setup::run()?;
    build_lobby()?;
    Ok(())
}

fn demo_config() -> String {
    let mut yaml = format!(
        "lb:\n  - engine: nftables\n    targets:\n      - name: web\n        protocol: tcp\n        port: {PORT}\n        upstream_group:\n          name: web-pool\n          distribution: round-robin\n          upstreams:\n"
    );
    for i in 0..3 {
        yaml.push_str(&format!(
            "            - name: web{}\n              host: {}\n              port: {UPSTREAM_PORT}\n",
            i + 1,
            Topology::upstream_addr(i)
        ));
    }
    yaml
}
