//! Lobby's traffic counters: two tc classifiers on the interfaces that route
//! to the upstreams. Egress sees client traffic after DNAT (destination =
//! upstream), ingress sees the upstream's answers before reverse NAT (source
//! = upstream). Both only update keys the daemon inserted, and always let the
//! packet go on: counting must never drop traffic.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_CURRENT_NETNS, TC_ACT_UNSPEC, bpf_hdr_start_off::BPF_HDR_START_NET, bpf_sock_tuple,
    },
    helpers::{bpf_sk_lookup_tcp, bpf_sk_release, bpf_skb_load_bytes_relative},
    macros::{classifier, map},
    maps::PerCpuHashMap,
    programs::TcContext,
};
use lobby_common::{COUNTERS_MAP, IPPROTO_TCP, MAX_UPSTREAMS, UpstreamCounters, UpstreamKey};

#[map(name = "LOBBY_COUNTERS_V1")]
static COUNTERS: PerCpuHashMap<UpstreamKey, UpstreamCounters> =
    PerCpuHashMap::with_max_entries(MAX_UPSTREAMS, 0);

// The map's name above must be the one the daemon pins and opens.
const _: () = assert!(const_str_eq(COUNTERS_MAP, "LOBBY_COUNTERS_V1"));

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

const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
const TCP_LISTEN: u32 = 10;

/// The fields of an IPv4 + TCP packet that counting needs.
struct Segment {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    ip_len: u32,
    flags: u8,
}

#[classifier]
pub fn lobby_egress(ctx: TcContext) -> i32 {
    if let Some(seg) = read_segment(&ctx) {
        count_toward_upstream(&ctx, &seg);
    }
    TC_ACT_UNSPEC
}

#[classifier]
pub fn lobby_ingress(ctx: TcContext) -> i32 {
    if let Some(seg) = read_segment(&ctx) {
        count_from_upstream(&ctx, &seg);
    }
    TC_ACT_UNSPEC
}

/// The counters of the TCP upstream at `addr`:`port` (network order), if
/// the daemon counts it.
fn counters_of(addr: u32, port: u16) -> Option<*mut UpstreamCounters> {
    COUNTERS.get_ptr_mut(UpstreamKey {
        addr,
        port,
        protocol: IPPROTO_TCP,
        _pad: 0,
    })
}

fn count_toward_upstream(ctx: &TcContext, seg: &Segment) {
    let Some(counters) = counters_of(seg.daddr, seg.dport) else {
        return;
    };
    // A packet this host sends itself (the daemon's probes, including the
    // reset that closes one after its socket is gone) carries its socket;
    // forwarded client traffic carries none.
    // SAFETY: the context points at the packet's __sk_buff.
    if !unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }.is_null() {
        return;
    }
    // SAFETY: a per-CPU value of a key the daemon inserted; only this CPU
    // writes it while the program runs.
    let counters = unsafe { &mut *counters };
    counters.packets_out += 1;
    counters.bytes_out += u64::from(seg.ip_len);
    if seg.flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN {
        counters.connections += 1;
    }
}

fn count_from_upstream(ctx: &TcContext, seg: &Segment) {
    let Some(counters) = counters_of(seg.saddr, seg.sport) else {
        return;
    };
    // A probe hears back a SYN-ACK, or a reset when refused; it then closes
    // at once, so no later packet of its flow finds a socket. Only those
    // segments pay for the lookup: data and ACKs of client flows do not.
    if seg.flags & (TCP_FLAG_SYN | TCP_FLAG_RST) != 0
        && is_local_socket(ctx, seg.saddr, seg.daddr, seg.sport, seg.dport)
    {
        return;
    }
    // SAFETY: as in count_toward_upstream.
    let counters = unsafe { &mut *counters };
    counters.packets_in += 1;
    counters.bytes_in += u64::from(seg.ip_len);
    if seg.flags & TCP_FLAG_RST != 0 {
        counters.resets += 1;
    }
}

/// Whether a connected socket of this host owns an arriving packet's flow:
/// answers to the daemon's own health probes, which are not client traffic.
/// Forwarded client flows have no local socket. Only asked for packets of a
/// counted upstream.
fn is_local_socket(
    ctx: &TcContext,
    remote: u32,
    local: u32,
    remote_port: u16,
    local_port: u16,
) -> bool {
    // SAFETY: a zeroed tuple is a valid value of this plain C union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = remote;
    tuple.__bindgen_anon_1.ipv4.daddr = local;
    tuple.__bindgen_anon_1.ipv4.sport = remote_port;
    tuple.__bindgen_anon_1.ipv4.dport = local_port;
    // SAFETY: the helper reads `size_of(ipv4)` bytes of the tuple, and every
    // socket it returns is released below.
    let sock = unsafe {
        bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &mut tuple,
            core::mem::size_of_val(&tuple.__bindgen_anon_1.ipv4) as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    if sock.is_null() {
        return false;
    }
    // SAFETY: non-null socket from the lookup; released right after.
    let listening = unsafe { (*sock).state } == TCP_LISTEN;
    unsafe { bpf_sk_release(sock.cast()) };
    // A listener matched only by port is not the owner of this flow.
    !listening
}

/// An IPv4 header without options and the TCP fields counting reads.
const IP_AND_TCP_HEAD: usize = 20 + 14;

fn read_segment(ctx: &TcContext) -> Option<Segment> {
    // One load covers both headers in the usual case (no IP options): one
    // helper call per packet instead of two.
    let mut head = [0u8; IP_AND_TCP_HEAD];
    load_network_bytes(ctx, 0, &mut head)?;
    let ip = &head[..20];
    if ip[0] >> 4 != 4 || ip[9] != IPPROTO_TCP {
        return None;
    }
    // Only the first fragment carries the TCP header.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return None;
    }
    let ihl = u32::from(ip[0] & 0x0f) * 4;
    let mut tcp = [0u8; 14];
    if ihl == 20 {
        tcp.copy_from_slice(&head[20..]);
    } else {
        load_network_bytes(ctx, ihl, &mut tcp)?;
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]);
    Some(Segment {
        saddr: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        daddr: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        sport: u16::from_ne_bytes([tcp[0], tcp[1]]),
        dport: u16::from_ne_bytes([tcp[2], tcp[3]]),
        // BIG TCP super-packets carry 0; fall back to the skb's length less
        // the Ethernet header.
        ip_len: if tot_len != 0 {
            u32::from(tot_len)
        } else {
            ctx.len().saturating_sub(14)
        },
        flags: tcp[13],
    })
}

fn load_network_bytes(ctx: &TcContext, offset: u32, buf: &mut [u8]) -> Option<()> {
    // SAFETY: the helper writes at most `buf.len()` bytes into `buf`.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.as_ptr(),
            offset,
            buf.as_mut_ptr().cast(),
            buf.len() as u32,
            BPF_HDR_START_NET,
        )
    };
    (ret == 0).then_some(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
