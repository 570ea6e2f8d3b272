//! The active/standby failover, live: two Lobby hosts under keepalived and
//! conntrackd (the files in dist/ha), ten long-lived connections through
//! the master, the master's failure, and the same connections going on
//! through the backup. Cleans up after itself, even when a step fails.
use std::time::Duration;

use lobby_tests::ha::standby::{self, Standby};

pub fn run() -> anyhow::Result<()> {
    crate::demo::prepare("builds network namespaces and runs keepalived")?;

    println!(
        "\n== Topology: client {} -> VIP {} (host A or B) -> SNAT {} -> web1..3 {:?}",
        standby::CLIENT,
        standby::CLIENT_VIP,
        standby::UPSTREAM_VIP,
        standby::UPSTREAMS
    );
    println!(
        "   hosts A and B share a client-side and an upstream-side bridge; conntrackd syncs over eth2"
    );
    println!("   each runs Lobby, conntrackd and keepalived with dist/ha/*");
    let mut pair = Standby::start(true);
    println!(
        "\n== Host A is master: {} on its eth0, {} on its eth1",
        standby::CLIENT_VIP,
        standby::UPSTREAM_VIP
    );

    println!(
        "\n== {} long-lived connections through host A",
        standby::LONG_LIVED
    );
    let mut conversations = pair.open_long_lived();
    for (i, c) in conversations.iter().enumerate() {
        println!("connection {i} -> {} (echoes)", c.upstream);
    }
    lobby_tests::wait_for(
        "host B's conntrackd to hold the connections",
        Duration::from_secs(10),
        || (pair.external_cache(1) >= standby::LONG_LIVED).then_some(()),
    );
    println!(
        "host B's conntrackd holds {} of them in its external cache",
        pair.external_cache(1)
    );

    println!("\n== Host A fails: links down, keepalived, conntrackd and Lobby killed");
    println!("   each connection sends a line at once; it is retransmitted until a host answers");
    let takeover = pair.fail_master(&mut conversations);
    println!(
        "host B is master; a new connection was answered {:.2} s after the failure",
        takeover.as_secs_f64()
    );
    let names = pair.assert_backup_balances();
    println!("6 new connections through host B -> {}", names.join(", "));

    println!("\n== The connections opened through host A, after the failover");
    for (i, c) in conversations.iter_mut().enumerate() {
        c.expect(&format!("after {i}"), Duration::from_secs(15))?;
        c.exchange(&format!("again {i}"), Duration::from_secs(5))?;
        println!(
            "connection {i} -> {}: the line sent during the failover came back, and another",
            c.upstream
        );
    }

    let b = &pair.hosts[1];
    let conntrack =
        b.ns.try_exec("conntrack", &["-L", "-d", &standby::CLIENT_VIP.to_string()]);
    println!(
        "\n== Host B's conntrack table for {} (committed from host A's state, then new)\n{}",
        standby::CLIENT_VIP,
        String::from_utf8_lossy(&conntrack.stdout)
    );
    let stats = std::process::Command::new(lobby_tests::lobby::binary())
        .arg("stats")
        .arg("--socket")
        .arg(&b.lobby().socket_path)
        .output()?;
    println!(
        "== lobby stats on host B\n{}",
        String::from_utf8_lossy(&stats.stdout)
    );
    println!("== Daemons are killed and namespaces removed as the demo exits.");
    Ok(())
}
