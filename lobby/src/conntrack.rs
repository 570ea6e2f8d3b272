//! The connection-tracking table as the daemon's network namespace sees
//! it: how full it is, and a warning before it fills up. A full table
//! drops every new client connection; health probes need no entry (their
//! sockets' mark exempts them, see `nft`), so upstreams keep their state
//! and the warning names the cause. And, for `least-connections`, how many
//! established connections the kernel translated to each upstream: a dump
//! over ctnetlink of the entries that carry [`LEAST_CONNECTIONS_MARK`].
use std::{collections::BTreeMap, fmt, net::IpAddr, path::Path, time::Duration};

use crate::{
    config::Protocol,
    model::Backend,
    nfnetlink::{self, DumpError, Request, attribute, push_attribute},
};

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

// ctnetlink's numbers (linux/netfilter/nfnetlink*.h, nf_conntrack_common.h).
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_MARK: u16 = 8;
const CTA_MARK_MASK: u16 = 21;
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

/// The bit of the conntrack mark that least-connections targets set on
/// each connection they translate and the ruleset clears at its first FIN
/// or RST (`nft::closing`): the entries [`established`] asks for. One bit,
/// set and cleared alone, so other software's marks keep their meaning.
pub const LEAST_CONNECTIONS_MARK: u32 = 0x0010_0000;

/// Connections of least-connections targets the kernel translated (DNAT)
/// and that are established, per backend: the source of their reply
/// direction. Established is a TCP or SCTP connection in that state, a UDP
/// flow that has seen replies both ways (assured). Dumps the entries of
/// the daemon's namespace (both families) that carry
/// [`LEAST_CONNECTIONS_MARK`]: the kernel filters, so closed connections
/// waiting out TIME_WAIT (at a high connection rate, nearly the whole
/// table) are neither sent nor parsed. Blocks, so the daemon calls it off
/// its loop.
pub fn established() -> Result<BTreeMap<Backend, u64>, DumpError> {
    let mut counts = BTreeMap::new();
    let attributes = marked();
    let request = Request {
        subsystem: NFNL_SUBSYS_CTNETLINK,
        message: IPCTNL_MSG_CT_GET,
        // AF_UNSPEC: both families.
        family: 0,
        attributes: &attributes,
    };
    nfnetlink::dump(&request, |attributes| count(attributes, &mut counts))?;
    Ok(counts)
}

/// The dump's filter: entries whose mark has [`LEAST_CONNECTIONS_MARK`].
fn marked() -> Vec<u8> {
    let mut attributes = Vec::new();
    let mark = LEAST_CONNECTIONS_MARK.to_be_bytes();
    push_attribute(&mut attributes, CTA_MARK, &mark);
    push_attribute(&mut attributes, CTA_MARK_MASK, &mark);
    attributes
}

/// Counts one conntrack entry into `counts` when it is an established,
/// translated connection.
fn count(attributes: &[u8], counts: &mut BTreeMap<Backend, u64>) {
    if let Some(backend) = established_backend(attributes) {
        *counts.entry(backend).or_default() += 1;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink attribute of `kind` around `payload`, padded.
    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        crate::nfnetlink::push_attribute(&mut out, kind, payload);
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
        crate::nfnetlink::message(
            NFNL_SUBSYS_CTNETLINK << 8,
            &[vec![2, 0, 0, 0], body].concat(),
        )
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
        let mut each = |attributes: &[u8]| count(attributes, &mut counts);
        assert!(!crate::nfnetlink::walk(&dump, &mut each).unwrap());
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
    }

    #[test]
    fn the_dump_asks_the_kernel_for_marked_entries_only() {
        let filter = marked();
        let mark = LEAST_CONNECTIONS_MARK.to_be_bytes();
        assert_eq!(attribute(&filter, CTA_MARK), Some(&mark[..]));
        assert_eq!(attribute(&filter, CTA_MARK_MASK), Some(&mark[..]));
        assert_eq!(LEAST_CONNECTIONS_MARK.count_ones(), 1);
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
