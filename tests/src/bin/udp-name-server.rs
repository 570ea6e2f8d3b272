//! The vm-test guest's UDP upstream: answers every datagram with its name
//! (and a newline, as `echo` would), from one socket and one process.
//!
//! The guest used socat's `UDP-RECVFROM:PORT,fork`, one child per
//! datagram, and that loses answers when two datagrams arrive together: 8
//! of 600 clients in pairs got none on this host, and under TCG a health
//! probe's lost answer took an upstream out of rotation in the middle of
//! the UDP step (CI, 2026-12-01 01:42).
use std::net::UdpSocket;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(address), Some(name), None) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: udp-name-server ADDRESS:PORT NAME");
        std::process::exit(2);
    };
    let socket = UdpSocket::bind(&address)?;
    let answer = format!("{name}\n");
    let mut datagram = [0u8; 2048];
    loop {
        let (_, from) = socket.recv_from(&mut datagram)?;
        // A peer gone since it asked is its own loss, not the server's.
        if let Err(error) = socket.send_to(answer.as_bytes(), from) {
            eprintln!("udp-name-server: answering {from}: {error}");
        }
    }
}
