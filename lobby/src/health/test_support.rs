//! Loopback servers and waits shared by the health tests.
use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    time,
};

pub(super) const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Long enough that a probe failing before it did not wait for it.
pub(super) const LONG_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn listen() -> (TcpListener, u16) {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let port = listener.local_addr().expect("listener address").port();
    (listener, port)
}

/// A loopback port nothing listens on: connects are refused.
pub(super) async fn closed_port() -> u16 {
    listen().await.1
}

/// A listener whose accept queue is full, and the connections that fill
/// it. Linux drops SYNs to such a listener, so connects to it hang
/// without any traffic leaving loopback.
pub(super) async fn black_hole() -> (TcpListener, Vec<TcpStream>, u16) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(LOOPBACK, 0)).expect("bind");
    let listener = socket.listen(0).expect("listen");
    let address = listener.local_addr().expect("listener address");
    let mut queued = Vec::new();
    while let Ok(connected) =
        time::timeout(Duration::from_millis(200), TcpStream::connect(address)).await
    {
        queued.push(connected.expect("connect while the queue has room"));
        assert!(queued.len() < 16, "the accept queue never filled up");
    }
    (listener, queued, address.port())
}

/// How many sockets of this host are connecting to `port` (SYN_SENT in
/// /proc/net/tcp): a probe into a black hole, seen from outside.
pub(super) fn connecting_to(port: u16) -> usize {
    const SYN_SENT: &str = "02";
    let table = std::fs::read_to_string("/proc/net/tcp").expect("reading /proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(3) == Some(&SYN_SENT)
                && fields
                    .get(2)
                    .and_then(|remote| remote.rsplit(':').next())
                    .is_some_and(|p| u16::from_str_radix(p, 16) == Ok(port))
        })
        .count()
}

pub(super) async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    time::timeout(Duration::from_secs(5), future)
        .await
        .unwrap_or_else(|_| panic!("no {what} within 5 s"))
}

pub(super) async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    within(what, async {
        while !condition() {
            time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}
