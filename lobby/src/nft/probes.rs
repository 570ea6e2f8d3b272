//! The chains that keep the daemon's health probes out of conntrack, so
//! that a full conntrack table cannot fail them. At the `raw` priority
//! they run before conntrack looks at a packet: on the way out a probe's
//! packet carries its socket's mark; on the way in, the `socket`
//! expression looks up the socket a packet is for (an ICMP error by the
//! header it quotes), whose mark is the probe's; a TCP packet to a port
//! outside the [`ProbePorts`](crate::health::ProbePorts) (when confined)
//! cannot be for a probe, and leaves before that lookup.
//!
//! Present only while some upstream is checked: the prerouting chain is a
//! hook every forwarded packet crosses (without both chains, 0.966 of the
//! bare DNAT ruleset's connection rate against 0.939-0.959 with them,
//! interleaved, n=6 each).
use super::{FixedChain, add_fixed, delete_fixed, render_fixed};
use crate::{
    health::PROBE_MARK,
    model::{Desired, ProbeExemption},
};

fn chains(exemption: ProbeExemption) -> [FixedChain; 2] {
    let spec = |hook| format!("type filter hook {hook} priority raw; policy accept;");
    let confined = exemption
        .ports
        .map(|ports| format!("tcp dport != {}-{} accept", ports.first, ports.last));
    [
        FixedChain {
            name: "probes-output",
            spec: spec("output"),
            rules: vec![format!("meta mark {PROBE_MARK:#x} notrack")],
        },
        FixedChain {
            name: "probes-prerouting",
            spec: spec("prerouting"),
            rules: confined
                .into_iter()
                .chain([format!("socket mark {PROBE_MARK:#x} notrack")])
                .collect(),
        },
    ]
}

/// Writes the chains inside `table ... { }`, if wanted.
pub(super) fn render(out: &mut String, desired: &Desired) {
    if let Some(exemption) = desired.probes {
        render_fixed(out, &chains(exemption));
    }
}

/// Adds the chains when the first checked upstream comes, deletes them
/// when the last goes.
pub(super) fn plan(out: &mut String, applied: &Desired, desired: &Desired) {
    let table = &desired.nftables.table;
    if applied.probes == desired.probes {
        return;
    }
    if let Some(old) = applied.probes {
        delete_fixed(out, table, &chains(old));
    }
    if let Some(new) = desired.probes {
        add_fixed(out, table, &chains(new));
    }
}
