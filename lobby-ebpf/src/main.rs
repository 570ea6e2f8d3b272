//! Lobby's traffic counters: two tc classifiers on the interfaces that route
//! to the upstreams. Egress sees client traffic after DNAT (destination =
//! upstream), ingress sees the upstream's answers before reverse NAT (source
//! = upstream). Both only update keys the daemon inserted, and always let the
//! packet go on: counting must never drop traffic.
//!
//! What is counted, per upstream (address, port, protocol, family):
//! - IPv4 and IPv6 packets of TCP, UDP and SCTP, each way, and their IP
//!   bytes (IPv4 total length; IPv6 40 + payload length, which includes the
//!   extension headers). IPv6 hop-by-hop, routing, destination-options,
//!   fragment and AH headers are skipped to find the transport header (at
//!   most [`MAX_EXT_HEADERS`] of them; a packet with more, or with ESP, is
//!   not counted).
//! - Non-first fragments carry no ports, so they cannot be attributed and
//!   are not counted, neither packets nor bytes. Forwarded traffic is
//!   rarely fragmented: conntrack reassembles before NAT and the kernel only
//!   refragments to the original fragment size.
//! - `connections`: TCP segments with SYN and without ACK toward the
//!   upstream; SCTP packets toward it whose first chunk is an INIT; UDP
//!   datagrams toward it whose flow (source address and port after
//!   masquerade, upstream) the program has not seen for
//!   [`UDP_FLOW_IDLE_NS`] (conntrack's UDP stream timeout) or has forgotten
//!   (an LRU table of [`UDP_FLOWS_MAX`] flows). A TCP connection counts once:
//!   a SYN whose digest (flow and sequence number) is in its slot of
//!   [`SYNS`] (a table of [`SYN_SLOTS`] slots, shared by the CPUs) is a
//!   retransmission, and counts as a packet but not as a connection. A
//!   retransmission counts again when another SYN took its slot in
//!   between: each SYN in between takes it with a chance of one in
//!   [`SYN_SLOTS`], so at 1,000 new connections a second a retransmission
//!   1 s after its SYN counts again with a chance of 0.1%, 7 s after
//!   (the third try) 0.7%. Retransmitted SCTP INITs
//!   count again, as they do in conntrack's statistics. Neither table is
//!   pinned: after a restart, a UDP flow in progress counts once more, and
//!   so does a SYN retransmitted across it.
//! - `resets`: TCP segments with RST from the upstream. UDP and SCTP have
//!   none.
//!
//! The daemon's own probes are not the upstream's traffic. Toward the
//! upstream, a packet this host sends carries its socket while forwarded
//! traffic carries none, whatever the protocol: the egress program notes
//! each probe's flow in [`PROBE_FLOWS`]. From the upstream, a packet of a
//! flow noted there within [`PROBE_ANSWER_NS`] is a probe's answer, also
//! when it arrives after the probe's socket is gone (a greeting the
//! upstream wrote before the probe's reset reached it, a UDP answer after
//! the probe's timeout). Most packets from an upstream answer no probe:
//! [`PROBE_PORTS`], an array indexed by the local port, keeps them from
//! the flow table's hash lookup.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_UNSPEC, bpf_hdr_start_off::BPF_HDR_START_NET},
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes_relative},
    macros::{classifier, map},
    maps::{Array, LruHashMap, PerCpuHashMap},
    programs::TcContext,
};
use core::mem::MaybeUninit;

use lobby_common::{
    COUNTERS_MAP, ETHERNET_HEADER, FAMILY_IPV4, FAMILY_IPV6, IPPROTO_SCTP, IPPROTO_TCP,
    IPPROTO_UDP, LINK_HEADER_SLOTS, LINK_HEADERS_MAP, MAX_UPSTREAMS, PROBE_MARK, UpstreamCounters,
    UpstreamKey,
};

#[map(name = "LOBBY_COUNTERS_V2")]
static COUNTERS: PerCpuHashMap<UpstreamKey, UpstreamCounters> =
    PerCpuHashMap::with_max_entries(MAX_UPSTREAMS, 0);

// The map's name above must be the one the daemon pins and opens.
const _: () = assert!(const_str_eq(COUNTERS_MAP, "LOBBY_COUNTERS_V2"));

const fn const_str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The link-layer header's length on each counted interface, by index
/// (see [`LINK_HEADERS_MAP`]).
#[map(name = "LINK_HEADERS")]
static LINK_HEADERS: Array<u32> = Array::with_max_entries(LINK_HEADER_SLOTS, 0);

const _: () = assert!(const_str_eq(LINK_HEADERS_MAP, "LINK_HEADERS"));

/// UDP flows toward counted upstreams, with when each last sent a datagram
/// (`bpf_ktime_get_ns`).
#[map]
static UDP_FLOWS: LruHashMap<Flow, u64> = LruHashMap::with_max_entries(UDP_FLOWS_MAX, 0);

const UDP_FLOWS_MAX: u32 = 65_536;
/// A UDP flow idle this long is a new one: conntrack's
/// `nf_conntrack_udp_timeout_stream` default (120 s).
const UDP_FLOW_IDLE_NS: u64 = 120_000_000_000;

/// The digests of recent SYNs toward counted upstreams, to tell a
/// retransmission from a new connection, each in the slot its digest
/// picks (0: none yet). Shared by the CPUs: a retransmission may be sent
/// from another one. An LRU hash map did this exactly up to its size,
/// but its insert took a free element under a lock and evicted one: a
/// new SYN cost ~390 ns more than any other segment (`BPF_PROG_TEST_RUN`
/// of distinct SYNs into a full map), a third of the counters' time per
/// connection; an array slot is a load and a store.
#[map]
static SYNS: Array<u64> = Array::with_max_entries(SYN_SLOTS, 0);

/// 8 MiB, as much as the LRU map of 65,536 SYNs it replaced.
const SYN_SLOTS: u32 = 1 << 20;

/// The daemon's probes toward counted upstreams, with when each last sent
/// a packet (`bpf_ktime_get_ns`).
#[map]
static PROBE_FLOWS: LruHashMap<Flow, u64> = LruHashMap::with_max_entries(PROBE_FLOWS_MAX, 0);

/// 1.6 s of probes to 10,000 upstreams every second: far more than the
/// time a late answer takes.
const PROBE_FLOWS_MAX: u32 = 16_384;
/// When a probe last sent a packet from each local port (the index: the
/// port as the packet holds it, network byte order read as a native
/// integer), 0 for never. An arriving packet whose destination port no
/// probe used within [`PROBE_ANSWER_NS`] answers no probe, and
/// [`PROBE_FLOWS`] is asked only for the others: an array's lookup is a
/// few instructions the verifier inlines, a hash lookup of a 40-byte key
/// is a call that hashes it. Shared by the CPUs: an answer may arrive on
/// another one than its probe left from.
#[map]
static PROBE_PORTS: Array<u64> = Array::with_max_entries(1 << 16, 0);

/// How long after a probe's last packet its flow's answers are still the
/// probe's: conntrack keeps a closed TCP flow 10 s (`CLOSE`) and an
/// unanswered UDP flow 30 s, so masquerade gives no client that flow's
/// ports in the meantime.
const PROBE_ANSWER_NS: u64 = 10_000_000_000;

/// One flow as the egress program sees it: the source after masquerade
/// and the upstream.
#[repr(C)]
struct Flow {
    source: [u8; 16],
    source_port: u16,
    _pad: [u8; 2],
    upstream: UpstreamKey,
}

const _: () = assert!(core::mem::size_of::<Flow>() == 40);

const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
const SCTP_CHUNK_INIT: u8 = 1;

/// IPv6 extension headers skipped at most before the transport header.
const MAX_EXT_HEADERS: usize = 4;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
/// The transport bytes counting reads: TCP up to its flags (14, the
/// sequence number among them), SCTP's
/// common header and the first chunk's type (13), UDP's ports (4).
const TRANSPORT_HEAD: usize = 14;

/// The fields of an IP packet that counting needs. Addresses are laid out
/// as in [`UpstreamKey::addr`], ports in network byte order.
struct Packet {
    family: u8,
    protocol: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
    sport: u16,
    dport: u16,
    ip_len: u32,
    /// TCP's sequence number as in the packet, 0 for other protocols.
    seq: u32,
    /// TCP's flags, the type of SCTP's first chunk, 0 for UDP. These and
    /// `seq` are fields defined on every path, not the data of an enum of
    /// the three protocols: LLVM leaves a variant's data undefined on the
    /// other variants' paths and may spill that undefined register, whose
    /// read the verifier rejects (the ingress program's UDP path, after an
    /// unrelated change of the code around it).
    flags_or_chunk: u8,
}

impl Flow {
    #[inline(always)]
    fn toward(packet: &Packet, upstream: UpstreamKey) -> Self {
        Self {
            source: packet.saddr,
            source_port: packet.sport,
            _pad: [0; 2],
            upstream,
        }
    }
}

impl Packet {
    #[inline(always)]
    fn upstream_at_destination(&self) -> UpstreamKey {
        UpstreamKey {
            addr: self.daddr,
            port: self.dport,
            protocol: self.protocol,
            family: self.family,
        }
    }

    #[inline(always)]
    fn upstream_at_source(&self) -> UpstreamKey {
        UpstreamKey {
            addr: self.saddr,
            port: self.sport,
            protocol: self.protocol,
            family: self.family,
        }
    }
}

#[classifier]
pub fn lobby_egress(ctx: TcContext) -> i32 {
    if let Some(packet) = read_packet(&ctx) {
        count_toward_upstream(&ctx, &packet);
    }
    TC_ACT_UNSPEC
}

#[classifier]
pub fn lobby_ingress(ctx: TcContext) -> i32 {
    if let Some(packet) = read_packet(&ctx) {
        count_from_upstream(&packet);
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn count_toward_upstream(ctx: &TcContext, packet: &Packet) {
    let upstream = packet.upstream_at_destination();
    let counters = COUNTERS.get_ptr_mut(upstream);
    // A packet this host sends itself (the daemon's probes, including the
    // reset that closes one after its socket is gone) carries its socket
    // and was received on no interface. Forwarded client traffic was
    // received on one, and carries a socket only when the flowtable's fast
    // path forwarded it from a client on this host (a veth peer's skb keeps
    // the sender's socket until ip_rcv, which the fast path skips; found by
    // vm-test's acceleration step).
    // SAFETY: the context points at the packet's __sk_buff.
    let skb = unsafe { &*ctx.skb.skb };
    // SAFETY: `sk` is the only member of its union.
    let (socket, received_on) = (unsafe { skb.__bindgen_anon_2.sk }, skb.ingress_ifindex);
    if !socket.is_null() && received_on == 0 {
        // A probe marked as one is noted also before its upstream is
        // counted: the daemon inserts the key when it applies the
        // ruleset, which under load came after the first probe had left,
        // and that probe's late answer was then counted (a flaky test).
        if counters.is_none() && skb.mark != PROBE_MARK {
            return;
        }
        // SAFETY: the helper has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        let flow = Flow::toward(packet, upstream);
        // A probe's later packets (its handshake's ACK, its reset) find
        // its flow: a lookup and a store cost a fraction of an LRU insert,
        // which takes a free element under a lock even when the key is
        // there.
        if let Some(sent) = PROBE_FLOWS.get_ptr_mut(&flow) {
            // SAFETY: a value of the LRU map; a concurrent store by another
            // CPU writes a timestamp as recent.
            unsafe { *sent = now };
        } else {
            // A full table evicts its least recently used probe; a failed
            // insert leaves this probe's answers counted.
            let _ = PROBE_FLOWS.insert(&flow, now, 0);
        }
        if let Some(last) = PROBE_PORTS.get_ptr_mut(u32::from(packet.sport)) {
            // SAFETY: an element of the array; CPUs sending probes from the
            // same port at once store close timestamps, either will do.
            unsafe { *last = now };
        }
        return;
    }
    let Some(counters) = counters else {
        return;
    };
    // SAFETY: a per-CPU value of a key the daemon inserted; only this CPU
    // writes it while the program runs.
    let counters = unsafe { &mut *counters };
    counters.packets_out += 1;
    counters.bytes_out += u64::from(packet.ip_len);
    let new_flow = match packet.protocol {
        IPPROTO_TCP => {
            packet.flags_or_chunk & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
                && is_first_syn(packet)
        }
        IPPROTO_SCTP => packet.flags_or_chunk == SCTP_CHUNK_INIT,
        _ => is_new_udp_flow(packet, upstream),
    };
    if new_flow {
        counters.connections += 1;
    }
}

/// Whether this SYN is the first of its connection rather than a
/// retransmission, noting it.
#[inline(always)]
fn is_first_syn(packet: &Packet) -> bool {
    let digest = syn_digest(packet);
    let Some(slot) = SYNS.get_ptr_mut(digest as u32 & (SYN_SLOTS - 1)) else {
        return true;
    };
    // SAFETY: an element of the array. Two CPUs storing at once store
    // digests of two different SYNs (a retransmission comes a second
    // after its SYN), and both count; an aligned 8-byte store is whole.
    unsafe {
        if core::ptr::read_volatile(slot) == digest {
            return false;
        }
        core::ptr::write_volatile(slot, digest);
    }
    true
}

/// A digest of a SYN's addresses, ports (after DNAT and masquerade) and
/// sequence number, which a retransmission repeats and a new connection
/// on the same ports does not (RFC 6528). Each word is folded in by a
/// multiplication and a shift, so every bit of it reaches the low bits
/// that pick the slot. Never 0, the empty slot.
#[inline(always)]
fn syn_digest(packet: &Packet) -> u64 {
    let half = |address: &[u8; 16], at: usize| {
        u64::from_ne_bytes([
            address[at],
            address[at + 1],
            address[at + 2],
            address[at + 3],
            address[at + 4],
            address[at + 5],
            address[at + 6],
            address[at + 7],
        ])
    };
    let words = [
        half(&packet.saddr, 0),
        half(&packet.saddr, 8),
        half(&packet.daddr, 0),
        half(&packet.daddr, 8),
        (u64::from(packet.sport) << 48) | (u64::from(packet.dport) << 32) | u64::from(packet.seq),
    ];
    let mut digest: u64 = 0;
    for word in words {
        digest = (digest ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        digest ^= digest >> 29;
    }
    digest | 1
}

/// Whether this datagram starts a flow (see the module's documentation),
/// noting that the flow was seen now.
#[inline(always)]
fn is_new_udp_flow(packet: &Packet, upstream: UpstreamKey) -> bool {
    let flow = Flow::toward(packet, upstream);
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(seen) = UDP_FLOWS.get_ptr_mut(&flow) {
        // SAFETY: a value of the LRU map; another CPU may write the same
        // timestamp concurrently, which only blurs it by a packet.
        let seen = unsafe { &mut *seen };
        let idle = now.saturating_sub(*seen);
        *seen = now;
        return idle > UDP_FLOW_IDLE_NS;
    }
    // A full table evicts its least recently used flow; a failed insert
    // only means this flow counts again on its next datagram.
    let _ = UDP_FLOWS.insert(&flow, now, 0);
    true
}

#[inline(always)]
fn count_from_upstream(packet: &Packet) {
    let Some(counters) = COUNTERS.get_ptr_mut(packet.upstream_at_source()) else {
        return;
    };
    if is_probe_answer(packet) {
        return;
    }
    // SAFETY: as in count_toward_upstream.
    let counters = unsafe { &mut *counters };
    counters.packets_in += 1;
    counters.bytes_in += u64::from(packet.ip_len);
    if packet.protocol == IPPROTO_TCP && packet.flags_or_chunk & TCP_FLAG_RST != 0 {
        counters.resets += 1;
    }
}

/// Whether an arriving packet answers one of the daemon's probes, noted by
/// the egress program (see the module's documentation).
#[inline(always)]
fn is_probe_answer(packet: &Packet) -> bool {
    let Some(&port_used) = PROBE_PORTS.get(u32::from(packet.dport)) else {
        return false;
    };
    if port_used == 0 {
        return false;
    }
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(port_used) >= PROBE_ANSWER_NS {
        return false;
    }
    let flow = Flow {
        source: packet.daddr,
        source_port: packet.dport,
        _pad: [0; 2],
        upstream: packet.upstream_at_source(),
    };
    // SAFETY: the value is copied out at once; a concurrent update of it
    // only moves the probe's last packet.
    let Some(&sent) = (unsafe { PROBE_FLOWS.get(&flow) }) else {
        return false;
    };
    now.saturating_sub(sent) < PROBE_ANSWER_NS
}

/// An IPv4 address laid out as in [`UpstreamKey::addr`], built in
/// registers: zeroing the 12 bytes after it in memory is a call to the
/// BPF target's memset (see [`load_array`]).
#[inline(always)]
fn ipv4_addr(bytes: [u8; 4]) -> [u8; 16] {
    u128::from(u32::from_le_bytes(bytes)).to_le_bytes()
}

#[inline(always)]
fn read_packet(ctx: &TcContext) -> Option<Packet> {
    if let Some(head) = head_in_place(ctx) {
        return match head[0] >> 4 {
            4 => read_ipv4(ctx, head, false),
            6 => read_ipv6(ctx, head, true),
            _ => None,
        };
    }
    // One load covers an IPv6 header, or an IPv4 header without options and
    // the transport bytes counting reads: the usual IPv4 packet costs one
    // helper call. An IPv4 datagram shorter than that is read in two.
    let mut head = MaybeUninit::uninit();
    let (head, whole) = load_array::<IPV6_HEADER>(ctx, 0, &mut head);
    let short = !whole;
    if short {
        load_network_bytes(ctx, 0, &mut head[..IPV4_HEADER])?;
    }
    match head[0] >> 4 {
        4 => read_ipv4(ctx, head, short),
        6 if !short => read_ipv6(ctx, head, false),
        _ => None,
    }
}

/// The first [`IPV6_HEADER`] bytes of the IP header where they lie in the
/// packet's linear data: on an interface the daemon found to be Ethernet,
/// behind an untagged Ethernet header whose EtherType is IPv4 or IPv6.
/// `None` sends the caller to the helper, which finds the IP header
/// whatever is in front of it (another link type, a VLAN tag in the
/// frame, headers beyond the linear data). Reading in place spares the
/// helper call: 63 ns a TCP segment instead of 77 (`BPF_PROG_TEST_RUN`).
#[inline(always)]
fn head_in_place(ctx: &TcContext) -> Option<&[u8; IPV6_HEADER]> {
    // SAFETY: the context points at the packet's __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if LINK_HEADERS.get(ifindex).copied() != Some(ETHERNET_HEADER) {
        return None;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let ip = data + ETHERNET_HEADER as usize;
    if ip + IPV6_HEADER > end {
        return None;
    }
    // SAFETY: both bytes lie within the packet's data (checked above).
    let ether_type = unsafe { [*((ip - 2) as *const u8), *((ip - 1) as *const u8)] };
    if !matches!(ether_type, [0x08, 0x00] | [0x86, 0xdd]) {
        return None;
    }
    // SAFETY: the IPV6_HEADER bytes from `ip` lie within the packet's
    // data (checked above), which no one writes while the program runs.
    Some(unsafe { &*(ip as *const [u8; IPV6_HEADER]) })
}

#[inline(always)]
fn read_ipv4(ctx: &TcContext, head: &[u8; IPV6_HEADER], short: bool) -> Option<Packet> {
    // Only the first fragment carries the transport header.
    if u16::from_be_bytes([head[6], head[7]]) & 0x1fff != 0 {
        return None;
    }
    let protocol = head[9];
    let header_len = usize::from(head[0] & 0x0f) * 4;
    let mut loaded = MaybeUninit::uninit();
    let transport = if header_len == IPV4_HEADER && !short {
        head[IPV4_HEADER..IPV4_HEADER + TRANSPORT_HEAD]
            .try_into()
            .ok()?
    } else {
        load_transport(ctx, protocol, header_len as u32, &mut loaded)?
    };
    let (sport, dport, seq, flags_or_chunk) = parse_transport(protocol, transport)?;
    Some(Packet {
        family: FAMILY_IPV4,
        protocol,
        saddr: ipv4_addr([head[12], head[13], head[14], head[15]]),
        daddr: ipv4_addr([head[16], head[17], head[18], head[19]]),
        sport,
        dport,
        ip_len: ip_len(ctx, u32::from(u16::from_be_bytes([head[2], head[3]]))),
        seq,
        flags_or_chunk,
    })
}

/// `in_place`: `head` was read in place ([`head_in_place`]), and so may
/// the transport header be.
#[inline(always)]
fn read_ipv6(ctx: &TcContext, head: &[u8; IPV6_HEADER], in_place: bool) -> Option<Packet> {
    let mut protocol = head[6];
    let mut offset = IPV6_HEADER as u32;
    for _ in 0..MAX_EXT_HEADERS {
        let len = match protocol {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AH | IPV6_FRAGMENT => {
                // Next header, length, and for a fragment header the offset.
                let mut ext = MaybeUninit::uninit();
                let (ext, whole) = load_array::<4>(ctx, offset, &mut ext);
                if !whole {
                    return None;
                }
                let len = match protocol {
                    IPV6_FRAGMENT if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 => {
                        return None;
                    }
                    IPV6_FRAGMENT => 8,
                    IPV6_AH => (u32::from(ext[1]) + 2) * 4,
                    _ => (u32::from(ext[1]) + 1) * 8,
                };
                protocol = ext[0];
                len
            }
            _ => break,
        };
        offset += len;
    }
    let mut loaded = MaybeUninit::uninit();
    let transport = match in_place.then(|| transport_in_place(ctx, offset)).flatten() {
        Some(transport) => transport,
        None => load_transport(ctx, protocol, offset, &mut loaded)?,
    };
    let (sport, dport, seq, flags_or_chunk) = parse_transport(protocol, transport)?;
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    saddr.copy_from_slice(&head[8..24]);
    daddr.copy_from_slice(&head[24..40]);
    let payload_len = u32::from(u16::from_be_bytes([head[4], head[5]]));
    Some(Packet {
        family: FAMILY_IPV6,
        protocol,
        saddr,
        daddr,
        sport,
        dport,
        // A jumbogram (BIG TCP) says 0: no total to add the header to.
        ip_len: ip_len(
            ctx,
            if payload_len == 0 {
                0
            } else {
                IPV6_HEADER as u32 + payload_len
            },
        ),
        seq,
        flags_or_chunk,
    })
}

/// The transport bytes counting reads, in place right after an IPv6
/// header read in place, when no extension header comes between them
/// (their lengths vary, and those packets are rare) and the packet's
/// linear data holds them; `None` sends the caller to the helper.
#[inline(always)]
fn transport_in_place(ctx: &TcContext, offset: u32) -> Option<&[u8; TRANSPORT_HEAD]> {
    if offset != IPV6_HEADER as u32 {
        return None;
    }
    let start = ctx.data() + ETHERNET_HEADER as usize + IPV6_HEADER;
    if start + TRANSPORT_HEAD > ctx.data_end() {
        return None;
    }
    // SAFETY: the TRANSPORT_HEAD bytes from `start` lie within the
    // packet's data (checked above).
    Some(unsafe { &*(start as *const [u8; TRANSPORT_HEAD]) })
}

/// `declared`, the length the IP header gives; BIG TCP super-packets carry
/// 0, and then the skb's length less the Ethernet header stands in.
#[inline(always)]
fn ip_len(ctx: &TcContext, declared: u32) -> u32 {
    if declared != 0 {
        declared
    } else {
        ctx.len().saturating_sub(14)
    }
}

/// The transport bytes at `offset` that counting reads for `protocol`;
/// a datagram may be shorter than [`TRANSPORT_HEAD`], and then the bytes
/// after its header are zero.
#[inline(always)]
fn load_transport<'a>(
    ctx: &TcContext,
    protocol: u8,
    offset: u32,
    buf: &'a mut MaybeUninit<[u8; TRANSPORT_HEAD]>,
) -> Option<&'a [u8; TRANSPORT_HEAD]> {
    let (buf, whole) = load_array(ctx, offset, buf);
    if !whole {
        match protocol {
            IPPROTO_TCP => load_network_bytes(ctx, offset, &mut buf[..14])?,
            IPPROTO_SCTP => load_network_bytes(ctx, offset, &mut buf[..13])?,
            IPPROTO_UDP => load_network_bytes(ctx, offset, &mut buf[..4])?,
            _ => return None,
        }
    }
    Some(buf)
}

/// The ports (network byte order), TCP's sequence number and TCP's flags
/// or SCTP's first chunk type (see [`Packet`]) of a transport header;
/// `None` for a protocol not counted.
#[inline(always)]
fn parse_transport(protocol: u8, head: &[u8; TRANSPORT_HEAD]) -> Option<(u16, u16, u32, u8)> {
    let (seq, flags_or_chunk) = match protocol {
        IPPROTO_TCP => (
            u32::from_ne_bytes([head[4], head[5], head[6], head[7]]),
            head[13],
        ),
        IPPROTO_UDP => (0, 0),
        // The first chunk's type follows the 12-byte common header.
        IPPROTO_SCTP => (0, head[12]),
        _ => return None,
    };
    Some((
        u16::from_ne_bytes([head[0], head[1]]),
        u16::from_ne_bytes([head[2], head[3]]),
        seq,
        flags_or_chunk,
    ))
}

#[inline(always)]
fn load_network_bytes(ctx: &TcContext, offset: u32, buf: &mut [u8]) -> Option<()> {
    // SAFETY: `buf` is valid for writes of its length.
    unsafe { load_raw(ctx, offset, buf.as_mut_ptr(), buf.len() as u32) }.then_some(())
}

/// `N` bytes at `offset` from the network header, read into `buf`, and
/// whether the packet had them; when it had not, they are zero. Neither
/// zeroed beforehand nor returned by value: the BPF target's memset
/// stores a byte at a time (5 instructions a byte) and its copy of an
/// array moves a byte at a time, and zeroing the 40-byte header buffer
/// was most of a program's run time. The helper writes every byte
/// instead, the packet's or zeros.
#[inline(always)]
fn load_array<'a, const N: usize>(
    ctx: &TcContext,
    offset: u32,
    buf: &'a mut MaybeUninit<[u8; N]>,
) -> (&'a mut [u8; N], bool) {
    // SAFETY: `buf` is valid for writes of N bytes.
    let whole = unsafe { load_raw(ctx, offset, buf.as_mut_ptr().cast(), N as u32) };
    // SAFETY: the helper wrote all N bytes, or zeroed them when it failed.
    (unsafe { buf.assume_init_mut() }, whole)
}

/// Copies `len` bytes at `offset` from the network header to `to`, or
/// zeroes them when the packet is shorter: whether it copied.
///
/// # Safety
/// `to` must be valid for writes of `len` bytes.
#[inline(always)]
unsafe fn load_raw(ctx: &TcContext, offset: u32, to: *mut u8, len: u32) -> bool {
    // SAFETY: the caller's promise.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(ctx.as_ptr(), offset, to.cast(), len, BPF_HDR_START_NET)
    };
    ret == 0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
