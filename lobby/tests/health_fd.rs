//! Health probes close every socket they open. Counted in /proc/self/fd, so
//! this test has its binary to itself: no other test's sockets are counted.
use std::{
    net::Ipv4Addr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use lobby::{
    config::{HealthCheck, HealthProtocol},
    health::{ProbeStats, spawn_checker},
    model::UpstreamId,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    time,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

const PROBES: u64 = 2_000;
/// Checkers probing the same port at once, to get through the probes fast.
const CHECKERS: usize = 4;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("list /proc/self/fd")
        .count()
}

/// Runs checkers against `port` until they made [`PROBES`] probes together,
/// then stops them and returns their counts.
async fn probe(port: u16) -> ProbeStats {
    let check = HealthCheck {
        protocol: HealthProtocol::Tcp,
        port,
        start_available: true,
        interval: Duration::from_millis(1),
        timeout: Duration::from_secs(5),
        success_count: 1,
        failure_count: 1,
    };
    let stats = Arc::new(ProbeStats::default());
    let (_address, address_rx) = watch::channel(Some(Ipv4Addr::LOCALHOST));
    let (reports_tx, _reports) = mpsc::channel(CHECKERS);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    for checker in 0..CHECKERS {
        spawn_checker(
            UpstreamId::new("fd", format!("checker{checker}")),
            check.clone(),
            check.start_available,
            address_rx.clone(),
            std::future::ready(()),
            reports_tx.clone(),
            Arc::clone(&stats),
            cancel.clone(),
            &tracker,
            &tokio::runtime::Handle::current(),
        );
    }
    let probes =
        || stats.successes.load(Ordering::Relaxed) + stats.failures.load(Ordering::Relaxed);
    time::timeout(Duration::from_secs(60), async {
        while probes() < PROBES {
            time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("probes within 60 s");
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    Arc::into_inner(stats).expect("the checkers have ended")
}

#[tokio::test]
async fn probes_leave_no_file_descriptor_open() {
    let before = open_fds();

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let listening_port = listener.local_addr().expect("listener address").port();
    let acceptor = tokio::spawn(async move {
        while let Ok((connection, _)) = listener.accept().await {
            drop(connection);
        }
    });
    let accepted = probe(listening_port).await;
    assert!(accepted.successes.into_inner() >= PROBES);
    assert_eq!(accepted.failures.into_inner(), 0);
    acceptor.abort();
    assert!(acceptor.await.expect_err("aborted").is_cancelled());

    let refusing_port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|closed_right_away| closed_right_away.local_addr())
        .expect("a free port")
        .port();
    let refused = probe(refusing_port).await;
    assert!(refused.failures.into_inner() >= PROBES);
    assert_eq!(refused.successes.into_inner(), 0);

    let after = open_fds();
    println!(
        "open fds: {before} before, {after} after {PROBES} accepted and {PROBES} refused probes"
    );
    assert_eq!(after, before);
}
