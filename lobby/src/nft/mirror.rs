//! `mirror: { to: IP }` (SPEC "Traffic policy"): a copy of every packet of
//! a target's connections, both directions, goes to a host (nft `dup`).
//!
//! nft's `dup` exists only in the `ip` and `ip6` families, not in `inet`:
//! the copies are made in tables of Lobby's name in those families, present
//! only while a target mirrors that family. A connection of the target is
//! one Lobby translated (`ct status dnat`) whose original destination is
//! the target's port (and `ip`, when it has one). The chains hook
//! prerouting, which sees what clients send and what upstreams answer,
//! and output, which sees what local clients (`local: true`) send; after
//! every nat chain, so the first packet of a connection is already
//! translated. The kernel sends each copy to the host as its next hop: the
//! host must be on a network the Lobby host is attached to.
use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    config::Family,
    model::{Desired, DesiredTarget},
};

/// The families of the mirror tables, IPv4 first.
pub(super) const FAMILIES: [&str; 2] = ["ip", "ip6"];
/// After every nat chain: their priorities end at 299.
const PRIORITY: i32 = 300;
const CHAINS: [(&str, &str); 2] = [("mirror-in", "prerouting"), ("mirror-out", "output")];

fn family_name(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => FAMILIES[0],
        Family::Ipv6 => FAMILIES[1],
    }
}

/// The copy rules of each family that has some, by family name.
/// Whether `target` has a rule in the mirror tables.
pub(super) fn takes_part(target: &DesiredTarget) -> bool {
    target.policy.mirror.is_some()
}

fn rules(desired: &Desired) -> BTreeMap<&'static str, Vec<String>> {
    let mut rules: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    for target in desired.targets.values() {
        let Some(to) = target.policy.mirror else {
            continue;
        };
        let family = family_name(Family::of(to));
        let mut rule = format!(
            "meta l4proto {} ct status dnat ct original proto-dst {}",
            target.protocol.as_str(),
            target.port
        );
        if let Some(ip) = target.ip {
            write!(rule, " ct original {family} daddr {ip}").unwrap();
        }
        write!(rule, " dup to {to}").unwrap();
        rules.entry(family).or_default().push(rule);
    }
    rules
}

fn chain_type(hook: &str) -> String {
    format!("type filter hook {hook} priority {PRIORITY}; policy accept;")
}

/// Writes the mirror tables, after Lobby's `inet` table.
pub(super) fn render(out: &mut String, desired: &Desired) {
    let table = &desired.nftables.table;
    for (family, rules) in rules(desired) {
        writeln!(out, "table {family} {table} {{").unwrap();
        for (chain, hook) in CHAINS {
            writeln!(out, "\tchain {chain} {{").unwrap();
            writeln!(out, "\t\t{}", chain_type(hook)).unwrap();
            for rule in &rules {
                writeln!(out, "\t\t{rule}").unwrap();
            }
            writeln!(out, "\t}}").unwrap();
        }
        writeln!(out, "}}").unwrap();
    }
}

/// Writes the commands that turn the mirror tables of `applied` into those
/// of `desired`: a family's chains are rewritten when its rules change, its
/// table created or deleted when it gains its first or loses its last.
pub(super) fn plan(out: &mut String, applied: &Desired, desired: &Desired) {
    let table = &desired.nftables.table;
    let (old, new) = (rules(applied), rules(desired));
    for family in FAMILIES {
        let (before, after) = (old.get(family), new.get(family));
        match (before, after) {
            (before, after) if before == after => {}
            (Some(_), None) => writeln!(out, "delete table {family} {table}").unwrap(),
            (None, Some(rules)) => {
                writeln!(out, "add table {family} {table}").unwrap();
                for (chain, hook) in CHAINS {
                    writeln!(
                        out,
                        "add chain {family} {table} {chain} {{ {} }}",
                        chain_type(hook)
                    )
                    .unwrap();
                    for rule in rules {
                        writeln!(out, "add rule {family} {table} {chain} {rule}").unwrap();
                    }
                }
            }
            (_, Some(rules)) => {
                for (chain, _) in CHAINS {
                    writeln!(out, "flush chain {family} {table} {chain}").unwrap();
                    for rule in rules {
                        writeln!(out, "add rule {family} {table} {chain} {rule}").unwrap();
                    }
                }
            }
            (None, None) => {}
        }
    }
}
