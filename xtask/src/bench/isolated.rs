//! The counters' programs alone, on crafted packets: `BPF_PROG_TEST_RUN`
//! runs a program N times on one packet and the kernel times the loop
//! with its own clock, once, not per run. Taken with the kernel's
//! run-time statistics off and on, in turn, it tells what each packet
//! path costs, what the statistics add to every run (two clock reads and
//! the sums), and what they report as the run's time: how much of the
//! traffic tests' counters figure is the measurement itself.
use std::path::Path;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, PerCpuHashMap, PerCpuValues},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    util::nr_cpus,
};
use lobby_common::{
    ETHERNET_HEADER, IPPROTO_TCP, IPPROTO_UDP, LINK_HEADERS_MAP, UpstreamCounters, UpstreamKey,
};

use super::{programs::enable_run_time_stats, stats::median};

/// Runs of one timed loop: long enough that the loop's own start and end
/// vanish, short enough (about 0.2 s) to leave the machine to others.
const REPEAT: u32 = 1_000_000;
/// Loops of each path, statistics off and on in turn.
pub const TRIALS: usize = 5;

const UPSTREAM: &str = "198.18.1.11:9000";
const UPSTREAM_V6: &str = "[2001:2:1::11]:9000";
const CLIENT: [u8; 4] = [198, 18, 0, 2];
const CLIENT_V6: [u8; 16] = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const CLIENT_PORT: u16 = 40_000;
/// The probe's own port: the client's would make its packets from the
/// upstream look like possible answers.
const PROBE_PORT: u16 = 40_001;
const TCP_ACK: u8 = 0x10;
const TCP_SYN: u8 = 0x02;
/// `struct __sk_buff` up to and including `ingress_ifindex`, the one field
/// set: forwarded traffic was received on an interface, a packet this
/// host sends (a probe) was not.
const SKB_CTX_LEN: usize = 40;
const SKB_INGRESS_IFINDEX: usize = 36;

/// What one packet path costs, per run: the loop's time with the
/// statistics off and on, and the run time the statistics report, one
/// value per trial.
pub struct PathCost {
    pub path: &'static str,
    pub bare_ns: Vec<f64>,
    pub with_stats_ns: Vec<f64>,
    pub reported_ns: Vec<f64>,
}

/// The least of the loops: other work on the machine (interrupts, a
/// vCPU's stolen time) only ever adds to a loop's time.
pub fn best(ns: &[f64]) -> f64 {
    ns.iter().copied().fold(f64::NAN, f64::min)
}

impl PathCost {
    /// What the statistics add to a run of this path.
    pub fn stats_overhead_ns(&self) -> f64 {
        best(&self.with_stats_ns) - best(&self.bare_ns)
    }
}

/// What the statistics report beyond the run itself, a run (the median
/// over the paths): the part of their clock reads that falls between
/// their two timestamps. NaN without paths, and when a loaded machine
/// made the loops too slow to tell (not above 0).
pub fn reported_overhead_ns(paths: &[PathCost]) -> f64 {
    let overheads: Vec<f64> = paths
        .iter()
        .map(|p| best(&p.reported_ns) - best(&p.bare_ns))
        .collect();
    let overhead = median(&overheads);
    if overhead > 0.0 { overhead } else { f64::NAN }
}

struct Case {
    path: &'static str,
    program: &'static str,
    frame: Vec<u8>,
    /// Sent by this host (carries the test run's socket, received nowhere).
    from_host: bool,
    /// Read through the helper, as on an interface whose link type the
    /// daemon did not find to be Ethernet; else in place.
    through_helper: bool,
}

/// The interface of a test run's packet: loopback, whose frames the bench
/// builds as Ethernet ones and tells the programs so.
const TEST_RUN_IFINDEX: u32 = 1;

/// Every packet path of the programs that the traffic tests take, timed
/// alone. The statistics must be off when called: no other holder of
/// `BPF_ENABLE_STATS` and `kernel.bpf_stats_enabled` 0.
pub fn measure(object: &Path) -> anyhow::Result<Vec<PathCost>> {
    let sysctl = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .context("reading kernel.bpf_stats_enabled")?;
    if sysctl.trim() != "0" {
        bail!(
            "kernel.bpf_stats_enabled is {}: the programs cannot be timed without the statistics",
            sysctl.trim()
        );
    }
    let mut ebpf = EbpfLoader::new()
        .load_file(object)
        .with_context(|| format!("loading {}", object.display()))?;
    insert_upstreams(&mut ebpf)?;
    for name in ["lobby_egress", "lobby_ingress"] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name} in {}", object.display()))?
            .try_into()?;
        program.load().with_context(|| format!("loading {name}"))?;
    }
    cases()
        .into_iter()
        .map(|case| {
            let link_header = if case.through_helper {
                0
            } else {
                ETHERNET_HEADER
            };
            let mut link_headers: Array<_, u32> = ebpf
                .map_mut(LINK_HEADERS_MAP)
                .context("the link header map")?
                .try_into()?;
            link_headers.set(TEST_RUN_IFINDEX, link_header, 0)?;
            let program: &SchedClassifier = ebpf
                .program(case.program)
                .expect("loaded above")
                .try_into()?;
            time_path(program, &case)
        })
        .collect()
}

fn insert_upstreams(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let cpus = nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    let mut counters: PerCpuHashMap<_, UpstreamKey, UpstreamCounters> = ebpf
        .map_mut(lobby_common::COUNTERS_MAP)
        .context("the counters map")?
        .try_into()?;
    for (address, protocol) in [
        (UPSTREAM, IPPROTO_TCP),
        (UPSTREAM, IPPROTO_UDP),
        (UPSTREAM_V6, IPPROTO_TCP),
    ] {
        let key = UpstreamKey::new(address.parse().expect("an address"), protocol);
        let zeros = PerCpuValues::try_from(vec![UpstreamCounters::default(); cpus])?;
        counters.insert(key, zeros, 0)?;
    }
    Ok(())
}

fn time_path(program: &SchedClassifier, case: &Case) -> anyhow::Result<PathCost> {
    let mut ctx = [0u8; SKB_CTX_LEN];
    if !case.from_host {
        ctx[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4].copy_from_slice(&1u32.to_ne_bytes());
    }
    let run = || -> anyhow::Result<f64> {
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(&case.frame),
                ctx_in: Some(&ctx),
                repeat: REPEAT,
                ..TestRunOptions::new()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {}", case.path))?;
        Ok(result.duration.as_nanos() as f64)
    };
    let mut cost = PathCost {
        path: case.path,
        bare_ns: Vec::new(),
        with_stats_ns: Vec::new(),
        reported_ns: Vec::new(),
    };
    for _ in 0..TRIALS {
        cost.bare_ns.push(run()?);
        let _stats = enable_run_time_stats()?;
        let before = program.info()?;
        cost.with_stats_ns.push(run()?);
        let after = program.info()?;
        let runs = after.run_count() - before.run_count();
        let ns = (after.run_time() - before.run_time()).as_nanos() as f64;
        cost.reported_ns.push(ns / runs as f64);
    }
    Ok(cost)
}

fn cases() -> Vec<Case> {
    let upstream: std::net::SocketAddrV4 = UPSTREAM.parse().expect("an address");
    let upstream_v6: std::net::SocketAddrV6 = UPSTREAM_V6.parse().expect("an address");
    let (up, up_port) = (upstream.ip().octets(), upstream.port());
    let toward = |protocol, flags| ipv4(CLIENT, CLIENT_PORT, up, up_port, protocol, flags);
    let case = |path, program, frame, from_host| Case {
        path,
        program,
        frame,
        from_host,
        through_helper: false,
    };
    vec![
        case(
            "egress, TCP segment of a connection",
            "lobby_egress",
            toward(IPPROTO_TCP, TCP_ACK),
            false,
        ),
        Case {
            through_helper: true,
            ..case(
                "egress, TCP segment, headers through the helper (not Ethernet)",
                "lobby_egress",
                toward(IPPROTO_TCP, TCP_ACK),
                false,
            )
        },
        case(
            "egress, TCP SYN (the same one again: a retransmission)",
            "lobby_egress",
            toward(IPPROTO_TCP, TCP_SYN),
            false,
        ),
        case(
            "egress, UDP datagram of a known flow",
            "lobby_egress",
            toward(IPPROTO_UDP, 0),
            false,
        ),
        case(
            "egress, TCP over IPv6",
            "lobby_egress",
            ipv6_tcp(
                CLIENT_V6,
                CLIENT_PORT,
                upstream_v6.ip().octets(),
                upstream_v6.port(),
            ),
            false,
        ),
        case(
            "egress, a health probe's packet after its first (this host's socket)",
            "lobby_egress",
            ipv4(CLIENT, PROBE_PORT, up, up_port, IPPROTO_TCP, TCP_ACK),
            true,
        ),
        case(
            "ingress, a probe's answer",
            "lobby_ingress",
            ipv4(up, up_port, CLIENT, PROBE_PORT, IPPROTO_TCP, TCP_ACK),
            false,
        ),
        case(
            "egress, not toward an upstream",
            "lobby_egress",
            ipv4(CLIENT, CLIENT_PORT, up, up_port + 1, IPPROTO_TCP, TCP_ACK),
            false,
        ),
        case(
            "ingress, TCP segment from an upstream",
            "lobby_ingress",
            ipv4(up, up_port, CLIENT, CLIENT_PORT, IPPROTO_TCP, TCP_ACK),
            false,
        ),
    ]
}

/// An Ethernet frame with an IPv4 packet of `protocol` (TCP with `flags`,
/// or UDP) and no payload; checksums are not read by the programs.
fn ipv4(
    source: [u8; 4],
    source_port: u16,
    destination: [u8; 4],
    destination_port: u16,
    protocol: u8,
    flags: u8,
) -> Vec<u8> {
    let transport = transport(protocol, source_port, destination_port, flags);
    let mut frame = ethernet(0x0800);
    let total = 20 + transport.len() as u16;
    frame.extend([0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0]);
    frame.extend([64, protocol, 0, 0]);
    frame.extend(source);
    frame.extend(destination);
    frame.extend(transport);
    frame
}

fn ipv6_tcp(
    source: [u8; 16],
    source_port: u16,
    destination: [u8; 16],
    destination_port: u16,
) -> Vec<u8> {
    let transport = transport(IPPROTO_TCP, source_port, destination_port, TCP_ACK);
    let mut frame = ethernet(0x86dd);
    let payload = transport.len() as u16;
    frame.extend([
        0x60,
        0,
        0,
        0,
        (payload >> 8) as u8,
        payload as u8,
        IPPROTO_TCP,
        64,
    ]);
    frame.extend(source);
    frame.extend(destination);
    frame.extend(transport);
    frame
}

fn ethernet(ether_type: u16) -> Vec<u8> {
    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    frame.extend(ether_type.to_be_bytes());
    frame
}

fn transport(protocol: u8, source_port: u16, destination_port: u16, flags: u8) -> Vec<u8> {
    let mut header = Vec::new();
    header.extend(source_port.to_be_bytes());
    header.extend(destination_port.to_be_bytes());
    if protocol == IPPROTO_UDP {
        header.extend([0, 8, 0, 0]);
    } else {
        // Sequence number, acknowledgement, data offset 5, flags, window,
        // checksum, urgent pointer.
        header.extend([
            0, 0, 0x10, 0, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0,
        ]);
    }
    header
}
