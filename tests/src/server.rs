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
    let stream = client.connect(addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before the greeting",
        ));
    }
    Ok(line.trim_end().to_owned())
}
