//! What lets `least-connections` ask the kernel for its connections only
//! (see [`crate::conntrack::established`]): a target of that distribution
//! sets [`LEAST_CONNECTIONS_MARK`] in the conntrack mark of each connection
//! it translates, and these chains clear it at the first TCP segment that
//! ends the connection (FIN or RST), so the conntrack dump, filtered by the
//! mark in the kernel, returns the live connections of least-connections
//! targets and not the TIME_WAIT entries a high connection rate leaves
//! behind (every closed connection for two minutes), which the kernel
//! would otherwise format and Lobby parse once a second. Present only
//! while some target is least-connections: otherwise no packet pays for
//! them.
//!
//! One chain per way into the host: prerouting sees every packet that
//! arrives (forwarded or for a local process), output every packet a
//! local process sends, so a FIN from either end clears the mark. Filter
//! chains after conntrack (`mangle` runs after it), other bits of the
//! mark untouched.
use std::fmt::Write as _;

use super::FAMILY;
use crate::{
    config::Distribution,
    conntrack::LEAST_CONNECTIONS_MARK,
    model::{Desired, DesiredTarget},
};

const CHAINS: [(&str, &str); 2] = [
    ("closing-prerouting", "prerouting"),
    ("closing-output", "output"),
];

fn chain_type(hook: &str) -> String {
    format!("type filter hook {hook} priority mangle; policy accept;")
}

fn rule() -> String {
    format!(
        "tcp flags & (fin | rst) != 0 ct mark & {LEAST_CONNECTIONS_MARK:#x} == {LEAST_CONNECTIONS_MARK:#x} ct mark set ct mark & {:#x}",
        !LEAST_CONNECTIONS_MARK
    )
}

/// Whether the chains belong in the table of `desired`.
fn wanted(desired: &Desired) -> bool {
    desired.targets.values().any(|t| takes_part(t))
}

/// Whether `target` marks its connections, which the chains clear.
pub(super) fn takes_part(target: &DesiredTarget) -> bool {
    target.distribution == Distribution::LeastConnections
}

/// The rule of a least-connections target's chain that marks each
/// connection `opened` matches (the target's address or family, protocol
/// and, for TCP, the first segment), before the rules that translate it.
pub(super) fn mark_rule(opened: &str) -> String {
    format!("{opened} ct mark set ct mark | {LEAST_CONNECTIONS_MARK:#x}")
}

/// Writes the chains inside `table ... { }`, if wanted.
pub(super) fn render(out: &mut String, desired: &Desired) {
    if !wanted(desired) {
        return;
    }
    for (chain, hook) in CHAINS {
        writeln!(out, "\tchain {chain} {{").unwrap();
        writeln!(out, "\t\t{}", chain_type(hook)).unwrap();
        writeln!(out, "\t\t{}", rule()).unwrap();
        writeln!(out, "\t}}").unwrap();
    }
}

/// Adds or deletes the chains when the first least-connections target
/// comes or the last goes.
pub(super) fn plan(out: &mut String, applied: &Desired, desired: &Desired) {
    let table = &desired.nftables.table;
    match (wanted(applied), wanted(desired)) {
        (false, true) => {
            for (chain, hook) in CHAINS {
                writeln!(
                    out,
                    "add chain {FAMILY} {table} {chain} {{ {} }}",
                    chain_type(hook)
                )
                .unwrap();
                writeln!(out, "add rule {FAMILY} {table} {chain} {}", rule()).unwrap();
            }
        }
        (true, false) => {
            for (chain, _) in CHAINS {
                writeln!(out, "delete chain {FAMILY} {table} {chain}").unwrap();
            }
        }
        _ => {}
    }
}
