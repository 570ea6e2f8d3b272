//! Types shared by the eBPF counters and the daemon: the layout of the BPF
//! map keys and values. Both sides must agree byte for byte, so every type
//! is `#[repr(C)]` with explicit padding and a size assertion.
#![no_std]

use core::net::SocketAddr;

/// Name of the per-CPU hash map that holds one [`UpstreamCounters`] per
/// configured upstream. The layout version is part of the pin name: a pinned
/// map of an older layout with the same sizes would otherwise be reused
/// silently after an upgrade. V2: the key holds IPv6 addresses and the
/// family.
pub const COUNTERS_MAP: &str = "LOBBY_COUNTERS_V2";

/// Upper bound on upstreams whose traffic is counted at once.
pub const MAX_UPSTREAMS: u32 = 65_536;

/// Name of the array that holds, by interface index, the length of the
/// link-layer header in front of the IP header where the programs see a
/// packet: [`ETHERNET_HEADER`] on the Ethernet interfaces the daemon
/// counts on, 0 elsewhere. With a length the programs read the headers in
/// place; with 0 (another link type, an index of [`LINK_HEADER_SLOTS`] or
/// more, or before the daemon wrote it) through a helper that finds the
/// IP header itself. Not pinned: each program instance reads its own.
pub const LINK_HEADERS_MAP: &str = "LINK_HEADERS";
/// Interface indexes the array covers.
pub const LINK_HEADER_SLOTS: u32 = 65_536;
/// An untagged Ethernet header: two addresses and the EtherType.
pub const ETHERNET_HEADER: u32 = 14;

/// IP protocol numbers of what Lobby balances.
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// The mark (SO_MARK) every probe socket of the daemon carries: Lobby's
/// table exempts the packets of sockets so marked from conntrack, in both
/// directions, so that probes need no conntrack entry and a full table
/// cannot fail them, and the counters know a probe by it before the daemon
/// has inserted its upstream's key. "10bb" reads as "lobb"; it leaves alone
/// the bits other software is known to match with masks (kube-proxy's
/// 0x4000 and 0x8000, the upper 16 bits that Calico and Tailscale use).
/// Being a mark, it is also what a policy routing rule (`ip rule add fwmark
/// 0x10bb ...`) would match.
pub const PROBE_MARK: u32 = 0x10bb;

/// [`UpstreamKey::family`] values: the IP version number, as in the first
/// nibble of the packet.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// Identifies an upstream as the kernel sees it after DNAT: its address,
/// port and IP protocol, and the address family.
///
/// `addr` holds the address bytes as they appear in the packet: all 16 of
/// an IPv6 address; an IPv4 address in the first 4 bytes, the other 12 zero
/// (zero-padded, not v4-mapped: `family` already tells them apart, and the
/// program copies 4 bytes). `port` is in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub protocol: u8,
    pub family: u8,
}

impl UpstreamKey {
    /// The key of the upstream at `address` (port in host byte order, as
    /// the daemon holds it) for IP protocol `protocol`.
    pub fn new(address: SocketAddr, protocol: u8) -> Self {
        let mut addr = [0; 16];
        let family = match address {
            SocketAddr::V4(a) => {
                addr[..4].copy_from_slice(&a.ip().octets());
                FAMILY_IPV4
            }
            SocketAddr::V6(a) => {
                addr = a.ip().octets();
                FAMILY_IPV6
            }
        };
        Self {
            addr,
            port: address.port().to_be(),
            protocol,
            family,
        }
    }
}

/// What one CPU counted for one upstream. "Out" is traffic toward the
/// upstream, "in" is traffic from it; bytes are IP bytes (header, extension
/// headers and payload), as conntrack and nft counters count them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamCounters {
    /// New flows toward the upstream: TCP SYNs without ACK, SCTP packets
    /// whose first chunk is an INIT, and UDP packets of a flow the program
    /// has not seen recently (lobby-ebpf says exactly which).
    pub connections: u64,
    /// TCP segments with RST from the upstream.
    pub resets: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
}

impl UpstreamCounters {
    /// Adds another CPU's share.
    pub fn add(&mut self, other: &Self) {
        self.connections += other.connections;
        self.resets += other.resets;
        self.packets_out += other.packets_out;
        self.bytes_out += other.bytes_out;
        self.packets_in += other.packets_in;
        self.bytes_in += other.bytes_in;
    }
}

const _: () = assert!(core::mem::size_of::<UpstreamKey>() == 20);
const _: () = assert!(core::mem::align_of::<UpstreamKey>() == 2);
const _: () = assert!(core::mem::size_of::<UpstreamCounters>() == 48);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain old data: repr(C), no padding bytes left implicit, every
    // bit pattern valid.
    unsafe impl aya::Pod for super::UpstreamKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UpstreamCounters {}
}
