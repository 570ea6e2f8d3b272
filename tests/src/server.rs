//! A TCP server that greets each connection with its name and a newline,
//! then echoes what it receives until the peer closes: the greeting shows
//! where a connection went, the echo keeps a long-lived one streaming.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::NetNs;

/// Stops listening on drop (new connections are refused); connections
/// already accepted go on until their peer closes.
pub struct NameServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    acceptor: Option<JoinHandle<()>>,
}

impl NameServer {
    pub fn start(ns: &NetNs, addr: SocketAddr, name: &str) -> Self {
        let listener = ns.listen(addr);
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let acceptor = {
            let (stop, accepted, name) = (stop.clone(), accepted.clone(), name.to_owned());
            std::thread::spawn(move || accept_loop(listener, &name, &stop, &accepted))
        };
        Self {
            addr,
            stop,
            accepted,
            acceptor: Some(acceptor),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: TcpListener, name: &str, stop: &AtomicBool, accepted: &AtomicU64) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let greeting = format!("{name}\n");
                std::thread::spawn(move || serve(stream, greeting.as_bytes()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn serve(mut stream: TcpStream, greeting: &[u8]) {
    let _ = stream.set_nonblocking(false);
    if stream.write_all(greeting).is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Connects from `client` to `addr` and returns the greeting (the server's
/// name), or the error: a refused or reset connection is an `Err`.
pub fn ask_name(client: &NetNs, addr: SocketAddr) -> std::io::Result<String> {
    read_name(client.connect(addr, Duration::from_secs(5))?)
}

/// [`ask_name`] from the client's address `source`.
pub fn ask_name_from(
    client: &NetNs,
    source: std::net::IpAddr,
    addr: SocketAddr,
) -> std::io::Result<String> {
    let source = SocketAddr::new(source, 0);
    let stream = client.within(move || connect_from(source, addr, Duration::from_secs(5)))?;
    read_name(stream)
}

/// A connection to `addr` from the local address `source` (of the
/// calling thread's namespace; port 0: one the kernel picks).
pub fn connect_from(
    source: SocketAddr,
    addr: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&source.into())?;
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

pub fn read_name(stream: TcpStream) -> std::io::Result<String> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    read_line(&mut BufReader::new(stream))
}

/// A long-lived connection to a [`NameServer`]: lines sent come back.
pub struct Conversation {
    reader: BufReader<TcpStream>,
    /// The name of the server that answered.
    pub upstream: String,
}

impl Conversation {
    /// Connects from `client` to `addr` and reads the greeting.
    pub fn open(client: &NetNs, addr: SocketAddr) -> std::io::Result<Self> {
        let stream = client.connect(addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream);
        let upstream = read_line(&mut reader)?;
        Ok(Self { reader, upstream })
    }

    /// Sends `line` (the kernel retransmits it until it is acknowledged).
    pub fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.reader
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
    }

    /// Waits up to `timeout` for `line` to come back.
    pub fn expect(&mut self, line: &str, timeout: Duration) -> std::io::Result<()> {
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let got = read_line(&mut self.reader)?;
        if got != line {
            return Err(std::io::Error::other(format!(
                "expected {line:?}, got {got:?}"
            )));
        }
        Ok(())
    }

    /// Sends `line` and waits for it to come back.
    pub fn exchange(&mut self, line: &str, timeout: Duration) -> std::io::Result<()> {
        self.send(line)?;
        self.expect(line, timeout)
    }
}

/// One line without its newline; end of stream is an error.
fn read_line(reader: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed by the peer",
        ));
    }
    Ok(line.trim_end().to_owned())
}

/// A UDP server that answers every datagram with its name, counting them.
pub struct UdpNameServer {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UdpNameServer {
    pub fn start(ns: &NetNs, addr: SocketAddr, name: &str) -> Self {
        let socket = ns.within(move || {
            std::net::UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"))
        });
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("a read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, received, name) = (stop.clone(), received.clone(), name.to_owned());
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = socket.recv_from(&mut buf) {
                        received.fetch_add(1, Ordering::Relaxed);
                        let _ = socket.send_to(name.as_bytes(), from);
                    }
                }
            })
        };
        Self {
            stop,
            received,
            thread: Some(thread),
        }
    }

    /// Datagrams received so far.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for UdpNameServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A UDP flow from `client` (one socket: one source port) to `addr`.
pub struct UdpFlow(std::net::UdpSocket);

impl UdpFlow {
    pub fn open(client: &NetNs, addr: SocketAddr) -> Self {
        let socket = client.within(move || {
            let local: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let socket = std::net::UdpSocket::bind(local).expect("a client udp socket");
            socket.connect(addr).expect("connecting a udp socket");
            socket
        });
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("a read timeout");
        Self(socket)
    }

    /// Sends one datagram and returns the name in the answer, or the error
    /// (an ICMP port unreachable is `ConnectionRefused`).
    pub fn ask_name(&self) -> std::io::Result<String> {
        self.0.send(b"name?")?;
        let mut buf = [0u8; 256];
        let n = self.0.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

/// An HTTP health endpoint that answers every request `200 OK` after
/// `delay`: an upstream whose probes' round trip is that long (no netem on
/// these hosts).
pub struct SlowHealthServer {
    _acceptor: crate::Repeat,
}

impl SlowHealthServer {
    pub fn start(ns: &NetNs, addr: SocketAddr, delay: Duration) -> Self {
        let listener = ns.listen(addr);
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let acceptor = crate::Repeat::spawn(move || match listener.accept() {
            Ok((stream, _)) => {
                std::thread::spawn(move || answer_after(stream, delay));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        });
        Self {
            _acceptor: acceptor,
        }
    }
}

/// Reads a request's head, waits `delay`, answers and closes.
fn answer_after(stream: TcpStream, delay: Duration) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if line == "\r\n" {
            break;
        }
        line.clear();
    }
    std::thread::sleep(delay);
    let _ = reader
        .get_mut()
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
}
