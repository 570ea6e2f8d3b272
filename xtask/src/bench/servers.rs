//! The upstreams' side of the benchmark: per upstream namespace, a server
//! that greets and closes (connection rate), one that swallows (bulk) and
//! one that echoes (latency), and a UDP server that counts datagrams
//! (packets/s). Threads inside the namespace; they end when the process
//! does or the listener is closed with the namespace.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use lobby_tests::NetNs;

pub const GREET_PORT: u16 = 9000;
pub const SINK_PORT: u16 = 9001;
pub const ECHO_PORT: u16 = 9002;
pub const UDP_PORT: u16 = 9003;

/// The servers of one upstream: what its UDP server counted.
pub struct Servers {
    udp: Arc<AtomicU64>,
}

impl Servers {
    pub fn udp_received(&self) -> u64 {
        self.udp.load(Ordering::Relaxed)
    }
}

/// Starts the four servers of one upstream.
pub fn start(ns: &NetNs, addr: IpAddr) -> Servers {
    start_greet(ns, addr);
    let sink = ns.listen(SocketAddr::from((addr, SINK_PORT)));
    std::thread::spawn(move || per_connection(sink, swallow));
    let echo = ns.listen(SocketAddr::from((addr, ECHO_PORT)));
    std::thread::spawn(move || per_connection(echo, echo_back));
    let at = SocketAddr::from((addr, UDP_PORT));
    let socket =
        ns.within(move || UdpSocket::bind(at).unwrap_or_else(|e| panic!("bind {at}: {e}")));
    let udp = Arc::new(AtomicU64::new(0));
    let counted = udp.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while socket.recv(&mut buf).is_ok() {
            counted.fetch_add(1, Ordering::Relaxed);
        }
    });
    Servers { udp }
}

/// Starts the greeting server (connection rate) alone.
pub fn start_greet(ns: &NetNs, addr: IpAddr) {
    let greet = ns.listen(SocketAddr::from((addr, GREET_PORT)));
    // Two acceptors: one per core, no thread per connection, so the
    // server's cost per connection is the kernel's.
    for _ in 0..2 {
        let greet = greet.try_clone().expect("cloning the listener");
        std::thread::spawn(move || greet_and_close(greet));
    }
}

fn greet_and_close(listener: TcpListener) {
    while let Ok((mut stream, _)) = listener.accept() {
        let _ = stream.write_all(b"x");
    }
}

fn per_connection(listener: TcpListener, serve: fn(TcpStream)) {
    while let Ok((stream, _)) = listener.accept() {
        std::thread::spawn(move || serve(stream));
    }
}

fn swallow(mut stream: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

fn echo_back(mut stream: TcpStream) {
    // Opposite the latency client (CPU 0): see load::pin_to_cpu.
    super::load::pin_to_cpu(1);
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}
