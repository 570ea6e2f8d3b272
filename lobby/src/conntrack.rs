//! The connection-tracking table as the daemon's network namespace sees
//! it: how full it is, and a warning before it fills up. A full table
//! drops every new client connection; health probes need no entry (their
//! sockets' mark exempts them, see `nft`), so upstreams keep their state
//! and the warning names the cause. And, for `least-connections`, how many
//! established connections the kernel translated to each upstream: a dump
//! of the table over ctnetlink.
use std::{collections::BTreeMap, fmt, io, net::IpAddr, path::Path, time::Duration};

use crate::{config::Protocol, model::Backend};

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

const COUNT: &str = "/proc/sys/net/netfilter/nf_conntrack_count";
const MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// How often the table's fill is looked at.
const CHECK_PERIOD: Duration = Duration::from_secs(5);
/// How often a table that stays near full says so again, at most.
const WARNING_PERIOD: Duration = Duration::from_secs(60);

/// Entries in the table and how many it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub entries: u64,
    pub max: u64,
}

impl Usage {
    /// Above 90% of the maximum.
    fn near_full(self) -> bool {
        u128::from(self.entries) * 10 > u128::from(self.max) * 9
    }
}

/// The table's usage now; `None` when the kernel tracks no connections
/// here (nf_conntrack not loaded) or the files cannot be read.
pub fn read() -> Option<Usage> {
    let number = |path: &str| -> Option<u64> {
        std::fs::read_to_string(Path::new(path))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(Usage {
        entries: number(COUNT)?,
        max: number(MAX)?,
    })
}

/// What to tell the operator about one reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    NearFull(Usage),
    /// Back to 90% or below after a warning.
    Recovered(Usage),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::NearFull(u) => write!(
                f,
                "conntrack table nearly full ({} of {} entries): new client connections will be dropped when it is full (health probes are exempt); raise net.netfilter.nf_conntrack_max",
                u.entries, u.max
            ),
            Verdict::Recovered(u) => write!(
                f,
                "conntrack table below 90% again ({} of {} entries)",
                u.entries, u.max
            ),
        }
    }
}

/// The rate limit of the warning: said when the table crosses 90%, again
/// at most every [`WARNING_PERIOD`] while it stays there, and once more
/// when it is back below. No I/O, no clock.
#[derive(Debug, Default)]
pub struct Watch {
    warned_at: Option<Instant>,
}

impl Watch {
    pub fn check(&mut self, usage: Usage, now: Instant) -> Option<Verdict> {
        match (usage.near_full(), self.warned_at) {
            (true, Some(at)) if now.duration_since(at) < WARNING_PERIOD => None,
            (true, _) => {
                self.warned_at = Some(now);
                Some(Verdict::NearFull(usage))
            }
            (false, Some(_)) => {
                self.warned_at = None;
                Some(Verdict::Recovered(usage))
            }
            (false, None) => None,
        }
    }
}

/// Looks at the table every [`CHECK_PERIOD`] until `cancel`, logging what
/// [`Watch`] says.
pub async fn watch(cancel: CancellationToken) {
    let mut watch = Watch::default();
    let mut tick = tokio::time::interval(CHECK_PERIOD);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(usage) = tokio::task::spawn_blocking(read).await.ok().flatten() else {
            continue;
        };
        match watch.check(usage, Instant::now()) {
            Some(verdict @ Verdict::NearFull(_)) => {
                warn!(entries = usage.entries, max = usage.max, "{verdict}")
            }
            Some(verdict @ Verdict::Recovered(_)) => {
                info!(entries = usage.entries, max = usage.max, "{verdict}")
            }
            None => {}
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("{op} a netfilter netlink socket")]
    Socket {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused the conntrack dump")]
    Refused(#[source] io::Error),
    #[error("a malformed conntrack netlink message")]
    Malformed,
}

// ctnetlink's numbers (linux/netfilter/nfnetlink*.h, nf_conntrack_common.h).
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLMSG_HEADER: usize = 16;
const NFGENMSG: usize = 4;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_SCTP: u16 = 3;
/// The state attribute inside either protocol's info.
const CTA_PROTOINFO_STATE: u16 = 1;
const TCP_CONNTRACK_ESTABLISHED: u8 = 3;
const SCTP_CONNTRACK_ESTABLISHED: u8 = 4;
const IPS_ASSURED: u32 = 1 << 2;
const IPS_DST_NAT: u32 = 1 << 5;

/// Connections the kernel translated (DNAT) and that are established, per
/// backend: the source of their reply direction. Established is a TCP or
/// SCTP connection in that state, a UDP flow that has seen replies both
/// ways (assured). Dumps the whole table of the daemon's namespace, both
/// families; blocks, so the daemon calls it off its loop.
pub fn established() -> Result<BTreeMap<Backend, u64>, ConntrackError> {
    let socket = NetlinkSocket::open()?;
    socket.send_dump_request()?;
    let mut counts = BTreeMap::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = socket.recv(&mut buf)?;
        if count_messages(&buf[..n], &mut counts)? {
            return Ok(counts);
        }
    }
}

/// A raw NETLINK_NETFILTER socket, closed on drop.
struct NetlinkSocket(libc::c_int);

impl NetlinkSocket {
    fn open() -> Result<Self, ConntrackError> {
        // SAFETY: plain socket(2); the descriptor is owned by the result.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(ConntrackError::Socket {
                op: "opening",
                source: io::Error::last_os_error(),
            });
        }
        let socket = Self(fd);
        // A dump that never ends must not hold a blocking thread forever.
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: the option value is a timeval we own, with its size.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(ConntrackError::Socket {
                op: "configuring",
                source: io::Error::last_os_error(),
            });
        }
        Ok(socket)
    }

    fn send_dump_request(&self) -> Result<(), ConntrackError> {
        let mut request = Vec::with_capacity(NLMSG_HEADER + NFGENMSG);
        let length = (NLMSG_HEADER + NFGENMSG) as u32;
        request.extend_from_slice(&length.to_ne_bytes());
        request.extend_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET).to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        request.extend_from_slice(&flags.to_ne_bytes());
        request.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        // nfgenmsg: AF_UNSPEC (both families), version 0, resource 0.
        request.extend_from_slice(&[0, 0, 0, 0]);
        // SAFETY: a zeroed sockaddr_nl with its family is the kernel's address.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: the buffer and the address live across the call.
        let sent = unsafe {
            libc::sendto(
                self.0,
                request.as_ptr().cast(),
                request.len(),
                0,
                (&raw const kernel).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(ConntrackError::Socket {
                op: "writing to",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize, ConntrackError> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(self.0, buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).map_err(|_| ConntrackError::Socket {
            op: "reading from",
            source: io::Error::last_os_error(),
        })
    }
}

impl Drop for NetlinkSocket {
    fn drop(&mut self) {
        // SAFETY: the descriptor is ours and closed once.
        unsafe { libc::close(self.0) };
    }
}

/// Counts the established, translated connections of the netlink messages
/// in `buf` into `counts`; `true` at the end of the dump.
fn count_messages(
    mut buf: &[u8],
    counts: &mut BTreeMap<Backend, u64>,
) -> Result<bool, ConntrackError> {
    while buf.len() >= NLMSG_HEADER {
        let length = u32::from_ne_bytes(buf[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().expect("2 bytes"));
        if length < NLMSG_HEADER || length > buf.len() {
            return Err(ConntrackError::Malformed);
        }
        match i32::from(kind) {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                let code = buf
                    .get(NLMSG_HEADER..NLMSG_HEADER + 4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .ok_or(ConntrackError::Malformed)?;
                if code != 0 {
                    return Err(ConntrackError::Refused(io::Error::from_raw_os_error(-code)));
                }
            }
            _ => {
                let attributes = buf
                    .get(NLMSG_HEADER + NFGENMSG..length)
                    .ok_or(ConntrackError::Malformed)?;
                if let Some(backend) = established_backend(attributes) {
                    *counts.entry(backend).or_default() += 1;
                }
            }
        }
        buf = &buf[align(length).min(buf.len())..];
    }
    Ok(false)
}

/// The backend of one conntrack entry, when it was translated and is
/// established.
fn established_backend(attributes: &[u8]) -> Option<Backend> {
    let status = u32::from_be_bytes(attribute(attributes, CTA_STATUS)?.try_into().ok()?);
    if status & IPS_DST_NAT == 0 {
        return None;
    }
    let reply = attribute(attributes, CTA_TUPLE_REPLY)?;
    let ip = attribute(reply, CTA_TUPLE_IP)?;
    let address: IpAddr = match attribute(ip, CTA_IP_V4_SRC) {
        Some(v4) => <[u8; 4]>::try_from(v4).ok()?.into(),
        None => <[u8; 16]>::try_from(attribute(ip, CTA_IP_V6_SRC)?)
            .ok()?
            .into(),
    };
    let proto = attribute(reply, CTA_TUPLE_PROTO)?;
    let port = u16::from_be_bytes(attribute(proto, CTA_PROTO_SRC_PORT)?.try_into().ok()?);
    let state = |info: u16| {
        attribute(attribute(attributes, CTA_PROTOINFO)?, info)
            .and_then(|info| attribute(info, CTA_PROTOINFO_STATE))
            .and_then(|state| state.first().copied())
    };
    let protocol = match *attribute(proto, CTA_PROTO_NUM)?.first()? {
        6 if state(CTA_PROTOINFO_TCP)? == TCP_CONNTRACK_ESTABLISHED => Protocol::Tcp,
        132 if state(CTA_PROTOINFO_SCTP)? == SCTP_CONNTRACK_ESTABLISHED => Protocol::Sctp,
        17 if status & IPS_ASSURED != 0 => Protocol::Udp,
        _ => return None,
    };
    Some((std::net::SocketAddr::new(address, port), protocol))
}

/// The payload of the first attribute of `kind` among `attributes`.
fn attribute(mut attributes: &[u8], kind: u16) -> Option<&[u8]> {
    while attributes.len() >= 4 {
        let length = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        // Without the nested and byte-order flags.
        let found = u16::from_ne_bytes([attributes[2], attributes[3]]) & 0x3fff;
        if length < 4 || length > attributes.len() {
            return None;
        }
        if found == kind {
            return Some(&attributes[4..length]);
        }
        attributes = &attributes[align(length).min(attributes.len())..];
    }
    None
}

/// Netlink aligns messages and attributes to 4 bytes.
fn align(length: usize) -> usize {
    (length + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink attribute of `kind` around `payload`, padded.
    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(align(out.len()), 0);
        out
    }

    fn nested(kind: u16, children: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | 0x8000, &children.concat())
    }

    /// One conntrack message: reply from `source`, `protocol`, `state`.
    fn entry(source: [u8; 4], port: u16, protocol: u8, state: u8, status: u32) -> Vec<u8> {
        let reply = nested(
            CTA_TUPLE_REPLY,
            &[
                nested(CTA_TUPLE_IP, &[attr(CTA_IP_V4_SRC, &source)]),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[protocol]),
                        attr(CTA_PROTO_SRC_PORT, &port.to_be_bytes()),
                    ],
                ),
            ],
        );
        let info = nested(
            CTA_PROTOINFO,
            &[nested(
                CTA_PROTOINFO_TCP,
                &[attr(CTA_PROTOINFO_STATE, &[state])],
            )],
        );
        let body = [reply, attr(CTA_STATUS, &status.to_be_bytes()), info].concat();
        message(
            NFNL_SUBSYS_CTNETLINK << 8,
            &[vec![2, 0, 0, 0], body].concat(),
        )
    }

    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((NLMSG_HEADER + payload.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn counts_translated_established_connections_per_backend() {
        let nat = IPS_DST_NAT | IPS_ASSURED;
        let dump = [
            entry([198, 18, 1, 11], 9000, 6, TCP_CONNTRACK_ESTABLISHED, nat),
            entry([198, 18, 1, 11], 9000, 6, TCP_CONNTRACK_ESTABLISHED, nat),
            // Closing, not translated, UDP not assured: not counted.
            entry([198, 18, 1, 11], 9000, 6, 7, nat),
            entry(
                [198, 18, 1, 12],
                9000,
                6,
                TCP_CONNTRACK_ESTABLISHED,
                IPS_ASSURED,
            ),
            entry([198, 18, 1, 12], 53, 17, 0, IPS_DST_NAT),
            entry([198, 18, 1, 13], 53, 17, 0, nat),
        ]
        .concat();
        let mut counts = BTreeMap::new();
        assert!(!count_messages(&dump, &mut counts).unwrap());
        let backend = |host, port, protocol| {
            (
                std::net::SocketAddr::from(([198, 18, 1, host], port)),
                protocol,
            )
        };
        assert_eq!(
            counts,
            BTreeMap::from([
                (backend(11, 9000, Protocol::Tcp), 2),
                (backend(13, 53, Protocol::Udp), 1),
            ])
        );
        let done = message(libc::NLMSG_DONE as u16, &[0; 4]);
        assert!(count_messages(&done, &mut counts).unwrap());
        let refused = message(libc::NLMSG_ERROR as u16, &(-libc::EPERM).to_ne_bytes());
        assert!(matches!(
            count_messages(&refused, &mut counts),
            Err(ConntrackError::Refused(_))
        ));
        assert!(matches!(
            count_messages(&dump[..20], &mut counts),
            Err(ConntrackError::Malformed)
        ));
    }

    fn usage(entries: u64) -> Usage {
        Usage { entries, max: 1000 }
    }

    #[test]
    fn near_full_is_above_ninety_percent() {
        assert!(!usage(900).near_full());
        assert!(usage(901).near_full());
        assert!(usage(1000).near_full());
        assert!(!Usage { entries: 0, max: 0 }.near_full());
        assert!(
            Usage {
                entries: u64::MAX,
                max: u64::MAX
            }
            .near_full()
        );
    }

    #[test]
    fn a_full_table_warns_once_a_period_then_says_it_recovered() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut watch = Watch::default();
        assert_eq!(watch.check(usage(500), at(0)), None);
        assert_eq!(
            watch.check(usage(950), at(5)),
            Some(Verdict::NearFull(usage(950)))
        );
        assert_eq!(watch.check(usage(990), at(10)), None);
        assert_eq!(watch.check(usage(990), at(64)), None);
        assert_eq!(
            watch.check(usage(999), at(65)),
            Some(Verdict::NearFull(usage(999)))
        );
        assert_eq!(
            watch.check(usage(800), at(70)),
            Some(Verdict::Recovered(usage(800)))
        );
        assert_eq!(watch.check(usage(800), at(75)), None);
        // Crossing again warns at once.
        assert_eq!(
            watch.check(usage(910), at(80)),
            Some(Verdict::NearFull(usage(910)))
        );
    }

    #[test]
    fn the_warning_names_the_table_its_fill_and_the_knob() {
        let text = Verdict::NearFull(usage(950)).to_string();
        assert!(
            text.starts_with("conntrack table nearly full (950 of 1000 entries)")
                && text.contains("nf_conntrack_max"),
            "{text}"
        );
    }
}
