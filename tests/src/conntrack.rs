//! A namespace's connection-tracking table, filled to its maximum with
//! entries the kernel cannot evict: created over ctnetlink
//! (`IPCTNL_MSG_CT_NEW`, what `conntrack -I` sends), many to a datagram.
//! One `conntrack -I` process per entry would take half an hour for the
//! 262,144 entries of a usual maximum.
//!
//! The maximum is global and read-only inside a namespace, the count is the
//! namespace's own: filling one namespace leaves every other alone, and
//! deleting it frees its entries.
use std::{
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use crate::{NetNs, command_exists, requires};

/// nfnetlink's conntrack subsystem and its "new entry" message.
const CTNETLINK_NEW: u16 = 1 << 8;

// ctnetlink's attributes, by the nest they belong to. An entry: its
// tuples (nests), status and timeout.
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_TIMEOUT: u16 = 7;
// A tuple: its addresses and its transport (nests).
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
// Addresses; the transport.
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
/// IPS_SEEN_REPLY | IPS_ASSURED: early_drop evicts only entries that are
/// not assured, so a new connection finds no room. And IPS_CONFIRMED,
/// which the kernel sets on an entry it creates for ctnetlink before it
/// reads the status: a status without it is refused (EBUSY).
const STATUS_ASSURED: u32 = (1 << 1) | (1 << 2) | (1 << 3);
/// Longer than any test: no entry expires while one runs.
const TIMEOUT_SECS: u32 = 600;
/// Entries sent in one datagram; their acknowledgements fit the socket's
/// default receive buffer.
const BATCH: usize = 100;

/// Whether conntrack(8) is installed (`cargo xtask setup` installs it);
/// outside CI a test without it is skipped with a message.
pub fn tool_installed() -> bool {
    requires(
        (!command_exists("conntrack"))
            .then_some("the conntrack command (conntrack package, cargo xtask setup)"),
    )
}

/// One entry of `conntrack -L`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tracked {
    /// `tcp`, `udp`, `icmp`...
    pub protocol: String,
    /// Where the first packet went.
    pub destination: IpAddr,
    pub destination_port: Option<u16>,
    /// Where the answers come from: an upstream's address for a connection
    /// that was translated to it.
    pub reply_source: IpAddr,
}

/// The entries of `ns`'s table, both families.
pub fn list(ns: &NetNs) -> Vec<Tracked> {
    list_where(ns, &[])
}

/// The entries of `ns`'s table whose conntrack mark has every bit of
/// `bits`, both families: what a dump the kernel filters by mark returns.
pub fn list_marked(ns: &NetNs, bits: u32) -> Vec<Tracked> {
    list_where(ns, &["--mark", &format!("{bits:#x}/{bits:#x}")])
}

fn list_where(ns: &NetNs, filter: &[&str]) -> Vec<Tracked> {
    let mut text = String::new();
    for family in ["ipv4", "ipv6"] {
        let output = ns.exec("conntrack", &[&["-L", "-f", family], filter].concat());
        text.push_str(&String::from_utf8_lossy(&output.stdout));
    }
    text.lines().map(parse_entry).collect()
}

/// `udp 17 29 src=A dst=B sport=P dport=Q [UNREPLIED] src=B dst=A ...`:
/// the first `dst=` and `dport=` are the original direction's, the second
/// `src=` the reply's.
fn parse_entry(line: &str) -> Tracked {
    let values = |key: &str| -> Vec<&str> {
        line.split_whitespace()
            .filter_map(|word| word.strip_prefix(key)?.strip_prefix('='))
            .collect()
    };
    let address = |text: &str| -> IpAddr {
        text.parse()
            .unwrap_or_else(|e| panic!("{text:?} in {line:?}: {e}"))
    };
    let sources = values("src");
    Tracked {
        protocol: line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned(),
        destination: address(values("dst").first().expect("a destination")),
        destination_port: values("dport").first().and_then(|p| p.parse().ok()),
        reply_source: address(sources.get(1).expect("a reply direction")),
    }
}

/// Empties `ns`'s table.
pub fn flush(ns: &NetNs) {
    ns.exec("conntrack", &["-F"]);
}

/// The fill of `ns`'s table: (entries, maximum).
pub fn usage(ns: &NetNs) -> (u64, u64) {
    let read = |name: &str| -> u64 {
        let text = ns.exec("cat", &[&format!("/proc/sys/net/netfilter/{name}")]);
        String::from_utf8_lossy(&text.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    (read("nf_conntrack_count"), read("nf_conntrack_max"))
}

/// What [`fill`] did.
#[derive(Clone, Copy, Debug)]
pub struct Filled {
    /// Entries it created.
    pub created: u64,
    pub took: Duration,
}

/// Fills `ns`'s table to its maximum with assured UDP entries between
/// addresses of 198.19.0.0/16 that no packet carries, each with a
/// [`TIMEOUT_SECS`] timeout, until the kernel refuses more for want of
/// room (ENOMEM, "table full").
pub fn fill(ns: &NetNs) -> Filled {
    ns.within(|| {
        let started = Instant::now();
        let socket = open();
        let mut created = 0u64;
        let mut next = 0u32;
        loop {
            let mut batch = Vec::new();
            for _ in 0..BATCH {
                batch.extend(new_entry(next));
                next += 1;
            }
            send(&socket, &batch);
            let (accepted, full) = acknowledgements(&socket, BATCH);
            created += accepted;
            if full {
                return Filled {
                    created,
                    took: started.elapsed(),
                };
            }
        }
    })
}

fn open() -> OwnedFd {
    // SAFETY: socket() has no preconditions; the descriptor is ours.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_NETFILTER) };
    assert!(fd >= 0, "ctnetlink socket: {}", io::Error::last_os_error());
    // SAFETY: a fresh descriptor nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn send(socket: &OwnedFd, datagram: &[u8]) {
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: the buffer and the address are valid for their lengths.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            datagram.as_ptr().cast(),
            datagram.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    assert_eq!(
        usize::try_from(sent).ok(),
        Some(datagram.len()),
        "sending to ctnetlink: {}",
        io::Error::last_os_error()
    );
}

/// Reads `expected` acknowledgements: how many entries were created, and
/// whether the kernel refused one because the table is full. Any other
/// refusal fails the test.
fn acknowledgements(socket: &OwnedFd, expected: usize) -> (u64, bool) {
    let mut buffer = vec![0u8; 64 * 1024];
    let (mut seen, mut created, mut full) = (0, 0, false);
    while seen < expected {
        // SAFETY: the buffer is valid for its length.
        let received = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
            )
        };
        let received = usize::try_from(received)
            .unwrap_or_else(|_| panic!("reading ctnetlink: {}", io::Error::last_os_error()));
        let mut rest = &buffer[..received];
        while rest.len() >= 20 {
            let length = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            assert_eq!(
                i32::from(kind),
                libc::NLMSG_ERROR,
                "an acknowledgement from ctnetlink"
            );
            let errno = -i32::from_ne_bytes(rest[16..20].try_into().unwrap());
            match errno {
                0 => created += 1,
                libc::ENOMEM => full = true,
                _ => panic!(
                    "ctnetlink refused an entry: {}",
                    io::Error::from_raw_os_error(errno)
                ),
            }
            seen += 1;
            rest = &rest[align(length).min(rest.len())..];
        }
    }
    (created, full)
}

/// The `n`th entry (and message): a UDP flow from 198.19.X.Y:P to
/// 198.19.255.254:53.
fn new_entry(n: u32) -> Vec<u8> {
    let host = n / 60_000;
    let port = 1024 + (n % 60_000) as u16;
    let client = Ipv4Addr::new(198, 19, (host >> 8) as u8, host as u8 + 1);
    let server = Ipv4Addr::new(198, 19, 255, 254);
    let mut message = Message::new(n);
    message.nested(CTA_TUPLE_ORIG, |m| tuple(m, client, port, server, 53));
    message.nested(CTA_TUPLE_REPLY, |m| tuple(m, server, 53, client, port));
    message.attribute(CTA_STATUS, &STATUS_ASSURED.to_be_bytes());
    message.attribute(CTA_TIMEOUT, &TIMEOUT_SECS.to_be_bytes());
    message.finish()
}

fn tuple(message: &mut Message, source: Ipv4Addr, sport: u16, dest: Ipv4Addr, dport: u16) {
    message.nested(CTA_TUPLE_IP, |m| {
        m.attribute(CTA_IP_V4_SRC, &source.octets());
        m.attribute(CTA_IP_V4_DST, &dest.octets());
    });
    message.nested(CTA_TUPLE_PROTO, |m| {
        m.attribute(CTA_PROTO_NUM, &[libc::IPPROTO_UDP as u8]);
        m.attribute(CTA_PROTO_SRC_PORT, &sport.to_be_bytes());
        m.attribute(CTA_PROTO_DST_PORT, &dport.to_be_bytes());
    });
}

fn align(length: usize) -> usize {
    length.div_ceil(4) * 4
}

/// One netlink message to ctnetlink, built attribute by attribute.
struct Message(Vec<u8>);

impl Message {
    fn new(sequence: u32) -> Self {
        let mut bytes = Vec::with_capacity(128);
        // nlmsghdr: length (set by finish), type, flags, sequence, port id.
        bytes.extend(0u32.to_ne_bytes());
        bytes.extend(CTNETLINK_NEW.to_ne_bytes());
        bytes.extend(
            ((libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL)
                as u16)
                .to_ne_bytes(),
        );
        bytes.extend(sequence.to_ne_bytes());
        bytes.extend(0u32.to_ne_bytes());
        // nfgenmsg: family, version 0, resource id.
        bytes.extend([libc::AF_INET as u8, 0, 0, 0]);
        Self(bytes)
    }

    fn attribute(&mut self, kind: u16, value: &[u8]) {
        let length = 4 + value.len();
        self.0.extend((length as u16).to_ne_bytes());
        self.0.extend(kind.to_ne_bytes());
        self.0.extend(value);
        self.0.resize(align(self.0.len()), 0);
    }

    fn nested(&mut self, kind: u16, inner: impl FnOnce(&mut Self)) {
        let start = self.0.len();
        self.0.extend([0; 2]);
        self.0
            .extend((kind | libc::NLA_F_NESTED as u16).to_ne_bytes());
        inner(self);
        let length = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&length.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let length = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&length.to_ne_bytes());
        self.0
    }
}
