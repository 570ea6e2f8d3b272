//! The vm-test guest's UDP and SCTP upstream: answers every datagram (udp)
//! or association (sctp) with its name and a newline, as `echo` would,
//! from one socket and one process.
//!
//! The guest used socat with `fork`, one child per flow, and both lost
//! answers: `UDP-RECVFROM:PORT,fork` when two datagrams arrive together (8
//! of 600 clients in pairs got none on this host, and under TCG a health
//! probe's lost answer took an upstream out of rotation in the middle of
//! the UDP step, CI 2026-12-01 01:42); `SCTP-LISTEN:PORT,fork` with
//! `SYSTEM:echo` once closed an association it had accepted without the
//! name (CI 2026-12-02 05:15, 6.1 under TCG: the counters saw the
//! association reach web2, the client read nothing at once).
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{ErrorKind, Write};
use std::net::{SocketAddr, UdpSocket};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(protocol), Some(address), Some(name), None) =
        (args.next(), args.next(), args.next(), args.next())
    else {
        usage();
    };
    let Ok(address) = address.parse::<SocketAddr>() else {
        usage();
    };
    let answer = format!("{name}\n");
    match protocol.as_str() {
        "udp" => serve_udp(address, answer.as_bytes()),
        "sctp" => serve_sctp(address, answer.as_bytes()),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: name-server udp|sctp ADDRESS:PORT NAME");
    std::process::exit(2);
}

fn serve_udp(address: SocketAddr, answer: &[u8]) -> std::io::Result<()> {
    let socket = UdpSocket::bind(address)?;
    let mut datagram = [0u8; 2048];
    loop {
        let (_, from) = socket.recv_from(&mut datagram)?;
        // A peer gone since it asked is its own loss, not the server's.
        if let Err(error) = socket.send_to(answer, from) {
            eprintln!("name-server: answering {from}: {error}");
        }
    }
}

fn serve_sctp(address: SocketAddr, answer: &[u8]) -> std::io::Result<()> {
    let listener = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::from(libc::IPPROTO_SCTP)),
    )?;
    listener.set_reuse_address(true)?;
    listener.bind(&address.into())?;
    listener.listen(128)?;
    loop {
        // Health probes abort their associations as soon as they are up:
        // such an association may fail to be accepted or answered, and the
        // next one is served all the same.
        let association = match listener.accept() {
            Ok((association, _)) => association,
            Err(error) if error.kind() == ErrorKind::ConnectionAborted => continue,
            Err(error) => return Err(error),
        };
        if let Err(error) = (&association).write_all(answer) {
            eprintln!("name-server: answering an association: {error}");
        }
        // Dropped: a graceful SHUTDOWN after the answer.
    }
}
