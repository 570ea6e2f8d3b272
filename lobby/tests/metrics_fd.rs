//! Idle clients of the metrics endpoint hold at most its cap of the
//! daemon's descriptors (issue 22), and a scrape is still served once the
//! ones ahead of it time out. Counted in /proc/self/fd, so this test has
//! its binary to itself.

use lobby::{ctl::Request, metrics};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
    time::Instant,
};
use tokio_util::sync::CancellationToken;

const IDLE_CLIENTS: usize = 1_000;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("list /proc/self/fd")
        .count()
}

#[tokio::test]
async fn idle_clients_hold_at_most_the_cap() {
    let listener = metrics::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (requests, mut incoming) = mpsc::channel(4);
    let cancel = CancellationToken::new();
    tokio::spawn(metrics::serve(listener, requests, cancel.clone()));
    tokio::spawn(async move {
        while let Some(Request::Metrics(reply)) = incoming.recv().await {
            let _ = reply.send(metrics::Snapshot::default());
        }
    });
    let before = open_fds();
    let start = Instant::now();
    let mut idle = Vec::with_capacity(IDLE_CLIENTS);
    // The server's share: every descriptor beyond the clients' own. Past
    // the cap and a full backlog, a client's connect waits on SYN retries
    // until idle ones time out, a cap's worth per request timeout.
    let mut most_held = 0;
    for _ in 0..IDLE_CLIENTS {
        idle.push(TcpStream::connect(addr).await.unwrap());
        let held = open_fds() - before - idle.len();
        assert!(
            held <= metrics::LIMITS.max_connections,
            "{held} held with {} clients",
            idle.len()
        );
        most_held = most_held.max(held);
    }
    assert_eq!(most_held, metrics::LIMITS.max_connections);
    eprintln!(
        "{IDLE_CLIENTS} idle clients connected in {:?}; the endpoint held at most {most_held} descriptors",
        start.elapsed()
    );

    // Behind the idle ones in the backlog: served once enough of them timed
    // out, a cap's worth per request timeout.
    let start = Instant::now();
    let mut scraper = TcpStream::connect(addr).await.unwrap();
    scraper
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: lobby\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    scraper.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(start.elapsed() <= metrics::LIMITS.request_timeout * 2);
    eprintln!(
        "a scrape behind them was served after {:?}",
        start.elapsed()
    );
    cancel.cancel();
}
