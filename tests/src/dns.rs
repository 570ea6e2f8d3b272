//! DNS for the tests: a namespace of resolvers linked to the load balancer,
//! a real dnsmasq whose answers a test rewrites, and servers that fail on
//! purpose (silent, SERVFAIL).
use std::{
    fmt::Display,
    net::{Ipv4Addr, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{NetNs, Repeat};

/// Addresses in the resolvers' namespace, on the link 198.18.200.0/24.
pub const RESOLVER_A: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 53);
pub const RESOLVER_B: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 54);
pub const RESOLVER_C: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 55);

/// A namespace for resolvers, linked to `lb`, answering on RESOLVER_A..C.
pub fn resolver_namespace(lb: &NetNs) -> NetNs {
    let ns = NetNs::new("dns");
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "dns0", "netns", &lb.name,
    ]);
    for addr in [RESOLVER_A, RESOLVER_B, RESOLVER_C] {
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
    }
    lb.ip(&["addr", "add", "198.18.200.1/24", "dev", "dns0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    lb.ip(&["link", "set", "dns0", "up"]);
    ns
}

/// dnsmasq answering A records from a hosts file with a fixed TTL; the
/// test rewrites the records and dnsmasq rereads them on SIGHUP.
pub struct Dnsmasq {
    child: Child,
    dir: tempfile::TempDir,
}

impl Dnsmasq {
    /// Records are `(name, address)`; an IPv6 address answers AAAA queries.
    pub fn start<A: Display>(
        ns: &NetNs,
        listen: Ipv4Addr,
        ttl: u32,
        records: &[(&str, A)],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let dnsmasq = Self::write_records_in(&dir.path().join("hosts"), records);
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
            ])
            .args([
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--user=root",
                "--port=53",
                // Authoritative for the tests' domain: a name without an A
                // record gets an empty answer (NODATA), not REFUSED.
                "--local=/lobby.test/",
            ])
            .arg(format!("--listen-address={listen}"))
            .arg(format!("--addn-hosts={}", dnsmasq.display()))
            .arg(format!("--local-ttl={ttl}"))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .args([
                "--log-queries",
                &format!("--log-facility={}", dir.path().join("log").display()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting dnsmasq");
        let server = Self { child, dir };
        crate::wait_for("dnsmasq to log its start", Duration::from_secs(10), || {
            server.log().contains("started").then_some(())
        });
        server
    }

    fn write_records_in<A: Display>(path: &std::path::Path, records: &[(&str, A)]) -> PathBuf {
        let text: String = records
            .iter()
            .map(|(name, addr)| format!("{addr} {name}\n"))
            .collect();
        std::fs::write(path, text).expect("writing the hosts file");
        path.to_owned()
    }

    /// Replaces the answers.
    pub fn set_records<A: Display>(&self, records: &[(&str, A)]) {
        Self::write_records_in(&self.dir.path().join("hosts"), records);
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// How many A queries for `name` it received.
    pub fn queries(&self, name: &str) -> usize {
        self.log().matches(&format!("query[A] {name} ")).count()
    }
}

impl Dnsmasq {
    /// Stops answering: the server is gone, as a dead resolver is.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A resolver that fails on purpose, until dropped.
pub struct FailingDns {
    _answering: Repeat,
}

#[derive(Clone, Copy, Debug)]
pub enum Failure {
    /// Receives queries and never answers.
    Silent,
    /// Answers every query with SERVFAIL.
    ServFail,
}

impl FailingDns {
    pub fn start(ns: &NetNs, listen: Ipv4Addr, failure: Failure) -> Self {
        let socket =
            ns.within(move || UdpSocket::bind((listen, 53)).expect("binding a failing resolver"));
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut buf = [0u8; 512];
        let answering = Repeat::spawn(move || {
            // The read timeout brings the loop back to see the stop flag.
            let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                return;
            };
            if let (Failure::ServFail, true) = (failure, n >= 12) {
                let mut answer = buf[..n].to_vec();
                answer[2] |= 0x80; // QR: a response
                answer[3] = (answer[3] & 0xf0) | 2; // RCODE 2: SERVFAIL
                let _ = socket.send_to(&answer, peer);
            }
        });
        Self {
            _answering: answering,
        }
    }
}
