//! `local: true` (SPEC "Traffic policy"): connections that processes on
//! the Lobby host itself open to a target are balanced too. Their packets
//! never pass prerouting, so a nat chain on the output hook dispatches
//! them, through a verdict map of the local targets only, to the same
//! target chains. Present only while some target is local.
//!
//! Not dispatched: Lobby's own health probes (their sockets carry
//! [`PROBE_MARK`]), whose connections must reach the upstream they
//! check, and loopback destinations, which the kernel never routes out of
//! the host with their loopback source.
use std::fmt::Write as _;

use super::{FAMILY, FixedChain, add_fixed, delete_fixed, dispatch_element, render_fixed};
use crate::{
    health::PROBE_MARK,
    model::{Desired, DesiredTarget},
};

const MAP: &str = "local-targets";

/// The chain at the table's `priority` (the output hook knows no `dstnat`
/// by name: the priority as a number).
fn chain(priority: i32) -> [FixedChain; 1] {
    [FixedChain {
        name: "output",
        spec: format!("type nat hook output priority {priority}; policy accept;"),
        rules: vec![
            format!("meta mark {PROBE_MARK:#x} return"),
            "ip daddr 127.0.0.0/8 return".to_owned(),
            "ip6 daddr ::1 return".to_owned(),
            format!("fib daddr type local meta l4proto . th dport vmap @{MAP}"),
        ],
    }]
}

/// Whether `target` has an element in the local dispatch map.
pub(super) fn takes_part(target: &DesiredTarget) -> bool {
    target.policy.local
}

/// The local targets' dispatch elements; empty when none is local.
fn elements(desired: &Desired) -> Vec<String> {
    desired
        .targets
        .iter()
        .filter(|(_, target)| takes_part(target))
        .map(|(name, target)| dispatch_element(name, target))
        .collect()
}

/// Writes the map and the chain inside `table ... { }`, if any target is
/// local.
pub(super) fn render(out: &mut String, desired: &Desired) {
    let elements = elements(desired);
    if elements.is_empty() {
        return;
    }
    writeln!(out, "\tmap {MAP} {{").unwrap();
    writeln!(out, "\t\ttype inet_proto . inet_service : verdict").unwrap();
    super::write_elements(out, &elements);
    writeln!(out, "\t}}").unwrap();
    render_fixed(out, &chain(desired.nftables.priority));
}

/// The first part of a change: the jumps that may name a chain the
/// transaction deletes go first.
pub(super) fn plan_removals(out: &mut String, applied: &Desired, desired: &Desired) {
    let table = &desired.nftables.table;
    let (old, new) = (elements(applied), elements(desired));
    if old.is_empty() || old == new {
        return;
    }
    if new.is_empty() {
        delete_fixed(out, table, &chain(applied.nftables.priority));
        writeln!(out, "delete map {FAMILY} {table} {MAP}").unwrap();
    } else {
        writeln!(out, "flush map {FAMILY} {table} {MAP}").unwrap();
    }
}

/// The second part, once the target chains exist: the map's new elements,
/// the chain when it is new or its priority changed.
pub(super) fn plan_additions(out: &mut String, applied: &Desired, desired: &Desired) {
    let table = &desired.nftables.table;
    let (old, new) = (elements(applied), elements(desired));
    if new.is_empty() {
        return;
    }
    let priority = desired.nftables.priority;
    let create = old.is_empty();
    if create {
        writeln!(
            out,
            "add map {FAMILY} {table} {MAP} {{ type inet_proto . inet_service : verdict; }}"
        )
        .unwrap();
    } else if applied.nftables.priority != priority {
        delete_fixed(out, table, &chain(applied.nftables.priority));
    }
    if create || applied.nftables.priority != priority {
        add_fixed(out, table, &chain(priority));
    }
    if old != new {
        writeln!(
            out,
            "add element {FAMILY} {table} {MAP} {{ {} }}",
            new.join(", ")
        )
        .unwrap();
    }
}
