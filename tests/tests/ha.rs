//! Several Lobby hosts with the shipped dist/ha and dist/ecmp files and the
//! real keepalived, conntrackd and BIRD: the failover and the spread the
//! README's "Several hosts" section promises, with real connections.
use std::time::{Duration, Instant};

use lobby_tests::{
    ha::{
        Host,
        ecmp::{self, Ecmp},
        standby::{self, Standby},
    },
    privileged, wait_for,
};

/// Whether the daemons of these tests are installed (`cargo xtask setup`).
fn daemons_installed(programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| !std::path::Path::new("/usr/sbin").join(p).is_file())
        .collect();
    lobby_tests::requires(missing.iter().map(|p| format!("{p} (cargo xtask setup)")))
}

#[test]
fn established_connections_survive_the_masters_failure_with_conntrackd() {
    if !privileged() || !daemons_installed(&["keepalived", "conntrackd"]) {
        return;
    }
    let mut standby = Standby::start(true);
    let mut conversations = standby.open_long_lived();
    wait_for(
        "host B's conntrackd to hold the connections",
        Duration::from_secs(10),
        || (standby.external_cache(1) >= standby::LONG_LIVED).then_some(()),
    );

    let takeover = standby.fail_master(&mut conversations);
    eprintln!("host B answered a new connection {takeover:?} after host A failed");
    assert!(
        takeover < Duration::from_secs(5),
        "new connections through host B only after {takeover:?}"
    );
    standby.assert_backup_balances();

    // The line sent while host A was failing arrives (retransmitted), and
    // each connection keeps working both ways.
    for (i, c) in conversations.iter_mut().enumerate() {
        c.expect(&format!("after {i}"), Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("connection {i} ({}) after the failover: {e}", c.upstream));
        c.exchange(&format!("again {i}"), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connection {i} ({}) later: {e}", c.upstream));
    }
}

#[test]
fn without_conntrackd_the_backup_breaks_established_connections() {
    if !privileged() || !daemons_installed(&["keepalived"]) {
        return;
    }
    let mut standby = Standby::start(false);
    let mut conversations = standby.open_long_lived();

    let takeover = standby.fail_master(&mut conversations);
    assert!(
        takeover < Duration::from_secs(5),
        "new connections through host B only after {takeover:?}"
    );
    standby.assert_backup_balances();

    // Host B has no state for them: each is dropped or reset, so the test
    // above would fail without conntrackd.
    // As long as the test above waits for the first of them (15 s from
    // the failure), retransmissions included.
    let deadline = Instant::now() + Duration::from_secs(15) - takeover;
    let survivors: Vec<usize> = conversations
        .iter_mut()
        .enumerate()
        .filter_map(|(i, c)| {
            let left = deadline.saturating_duration_since(Instant::now());
            c.expect(&format!("after {i}"), left.max(Duration::from_millis(100)))
                .is_ok()
                .then_some(i)
        })
        .collect();
    assert!(
        survivors.is_empty(),
        "connections {survivors:?} survived without conntrackd"
    );
}

/// Connections Lobby's counters saw on each host.
fn per_host(hosts: &[Host; 2]) -> [u64; 2] {
    [hosts[0].connections(), hosts[1].connections()]
}

#[test]
fn ecmp_spreads_clients_over_both_hosts_and_bfd_withdraws_a_dead_one() {
    if !privileged() || !daemons_installed(&["bird"]) {
        return;
    }
    let mut ecmp = Ecmp::start();
    ecmp.from_every_client()
        .unwrap_or_else(|e| panic!("with both hosts: {e}"));
    let counted = wait_for(
        "both hosts' counters to see connections",
        Duration::from_secs(5),
        || {
            let counted = per_host(&ecmp.hosts);
            (counted.iter().sum::<u64>() >= ecmp::CLIENTS as u64).then_some(counted)
        },
    );
    eprintln!(
        "{} clients over {}: host A {}, host B {}",
        ecmp::CLIENTS,
        ecmp.route(),
        counted[0],
        counted[1]
    );
    assert!(
        counted.iter().all(|&n| n > 0),
        "one host got every client: {counted:?}"
    );

    // Host B hangs: BIRD stops answering (no BGP close, no BFD), Lobby
    // stops (its table goes, so a connection still sent to B is refused).
    let b = &mut ecmp.hosts[1];
    b.daemon("bird").signal(libc::SIGSTOP);
    let stopped = Instant::now();
    b.lobby.take().expect("lobby on B").stop_with(libc::SIGTERM);
    let withdrawn = wait_for(
        "every client to reach host A",
        Duration::from_secs(30),
        || ecmp.from_every_client().is_ok().then(|| stopped.elapsed()),
    );
    eprintln!(
        "all {} clients reach host A {withdrawn:?} after host B stopped; route now: {}",
        ecmp::CLIENTS,
        ecmp.route()
    );
    assert_eq!(ecmp.next_hops(), 1, "{}", ecmp.route());
    // BFD (3 x 100 ms), not the 9 s BGP hold time.
    assert!(
        withdrawn < Duration::from_secs(3),
        "withdrawn after {withdrawn:?}"
    );
}
