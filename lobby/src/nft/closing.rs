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
use super::{FixedChain, add_fixed, delete_fixed, render_fixed};
use crate::{
    config::Distribution,
    conntrack::LEAST_CONNECTIONS_MARK,
    model::{Desired, DesiredTarget},
};

fn chains() -> [FixedChain; 2] {
    let rule = format!(
        "tcp flags & (fin | rst) != 0 ct mark & {LEAST_CONNECTIONS_MARK:#x} == {LEAST_CONNECTIONS_MARK:#x} ct mark set ct mark & {:#x}",
        !LEAST_CONNECTIONS_MARK
    );
    [
        ("closing-prerouting", "prerouting"),
        ("closing-output", "output"),
    ]
    .map(|(name, hook)| FixedChain {
        name,
        spec: format!("type filter hook {hook} priority mangle; policy accept;"),
        rules: vec![rule.clone()],
    })
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
    if wanted(desired) {
        render_fixed(out, &chains());
    }
}

/// Adds or deletes the chains when the first least-connections target
/// comes or the last goes.
pub(super) fn plan(out: &mut String, applied: &Desired, desired: &Desired) {
    let table = &desired.nftables.table;
    match (wanted(applied), wanted(desired)) {
        (false, true) => add_fixed(out, table, &chains()),
        (true, false) => delete_fixed(out, table, &chains()),
        _ => {}
    }
}
