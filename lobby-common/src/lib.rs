//! Types shared by the eBPF counters and the daemon: the layout of the BPF
//! map keys and values. Both sides must agree byte for byte, so every type
//! is `#[repr(C)]` with explicit padding and a size assertion.
#![no_std]

/// Name of the per-CPU hash map that holds one [`UpstreamCounters`] per
/// configured upstream. The layout version is part of the pin name: a pinned
/// map of an older layout with the same sizes would otherwise be reused
/// silently after an upgrade.
pub const COUNTERS_MAP: &str = "LOBBY_COUNTERS_V1";

/// Upper bound on upstreams whose traffic is counted at once.
pub const MAX_UPSTREAMS: u32 = 65_536;

/// IP protocol number of TCP, the only protocol Lobby balances today.
pub const IPPROTO_TCP: u8 = 6;

/// Identifies an upstream as the kernel sees it after DNAT: its IPv4 address
/// and port, both in network byte order as they appear in the packet, and
/// the IP protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamKey {
    pub addr: u32,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

impl UpstreamKey {
    /// `addr` and `port` in host byte order, as the daemon holds them.
    pub fn new(addr: u32, port: u16, protocol: u8) -> Self {
        Self {
            addr: addr.to_be(),
            port: port.to_be(),
            protocol,
            _pad: 0,
        }
    }
}

/// What one CPU counted for one upstream. "Out" is traffic toward the
/// upstream, "in" is traffic from it; bytes are IP bytes (header and
/// payload), as conntrack and nft counters count them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamCounters {
    /// SYNs (without ACK) sent to the upstream: new connections.
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

const _: () = assert!(core::mem::size_of::<UpstreamKey>() == 8);
const _: () = assert!(core::mem::size_of::<UpstreamCounters>() == 48);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain old data: repr(C), no padding bytes left implicit, every
    // bit pattern valid.
    unsafe impl aya::Pod for super::UpstreamKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UpstreamCounters {}
}
