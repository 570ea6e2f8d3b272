//! Rate and connection limits in Lobby's table (SPEC "Traffic policy":
//! `limits` and upstream `max_connections`), all in the kernel's data path.
//!
//! A target's limits are rules of its chain, after allow and block and
//! before the balancing, on the opening packet of a connection (the nat
//! chain sees no other): a token bucket (`limit rate over R/second burst B
//! packets`) and a conntrack count (`ct count over N`), each kept as the
//! element of a dynamic set, keyed by the protocol for the whole target and
//! by the client's address for `per_source`. The state lives in the sets,
//! not in the rules, so rewriting the chain (an upstream going down)
//! neither refills a bucket nor forgets a connection; an element keeps the
//! values of the rule that created it, so the set is flushed when they
//! change. Over a limit, the connection is dropped into the target's
//! `rate_limited` or `connection_limited` counter: a TCP client sends its
//! SYN again a second later.
//!
//! Upstream `max_connections` needs the upstream chosen before the DNAT.
//! The rotation of a family with a capped upstream becomes a verdict map
//! from the distribution's slots to one chain per upstream, which DNATs to
//! it; the chain of a capped upstream first asks whether it has room:
//!
//! - `ct count` adds the connection to the list it counts, so it is only
//!   asked when the connection then goes to that upstream or is dropped
//!   (a dropped connection leaves the list at the next count): a
//!   connection counted there and sent elsewhere would hold a place it
//!   does not use for as long as it lives.
//! - So a full upstream is remembered in a flag set (element timeout 1 s),
//!   set when its count reaches the cap. A flagged upstream returns to the
//!   target chain unasked, which tries again: a second pick by the same
//!   distribution (its own counter or hash seed), then every upstream in
//!   slot order. When none has room, the connection is dropped into
//!   `connection_limited`.
//! - A flag that expired while the upstream is still full lets one
//!   connection be asked: over the cap it is dropped (and the flag set
//!   again), never sent. So an upstream never holds more than its cap; a
//!   full one costs at most one dropped SYN a second, and one whose
//!   connection closed gets new ones again within a second.
//!
//! Counts start with the table: a restart, or a change of a cap, starts
//! them again from the connections opened after it.
use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr};

use super::{
    Denied, FAMILY, address_keyword, chain_name, denied_counter, family_digit, slot_elements,
};
use crate::{
    config::{Family, Limit, Rate},
    model::{Cap, Desired, DesiredTarget, FamilyRotation},
};

/// Elements a dynamic set may hold. For `per_source`, a client address
/// beyond it is not limited (the set cannot remember it).
const SET_SIZE: u32 = 1 << 20;
/// How long an upstream stays flagged full without a new count.
const FULL_FLAG_SECONDS: u32 = 1;
/// `jhash`'s seed for a second pick of `ip-src-hash`: "LOB2".
pub(super) const SPILL_SEED: u32 = 0x4c4f_4232;

/// A dynamic set of Lobby's limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct LimitSet {
    /// Its type and flags: the same for as long as the set has its name.
    declaration: String,
    /// The values its elements were created with, by element (`None`:
    /// every element): a change resets them.
    stamps: BTreeMap<Option<String>, String>,
}

/// The dynamic sets of every target's limits, by name.
pub(super) fn sets(desired: &Desired) -> BTreeMap<String, LimitSet> {
    let mut sets = BTreeMap::new();
    for (name, target) in &desired.targets {
        let chain = chain_name(name);
        let limits = target.policy.limits;
        let mut whole = |set: String, stamp: String, element_type: &str, flags: &str| {
            sets.insert(
                set,
                LimitSet {
                    declaration: declaration(element_type, flags),
                    stamps: BTreeMap::from([(None, stamp)]),
                },
            );
        };
        if let Some(rate) = limits.target.rate {
            whole(
                format!("{chain}_rate"),
                stamp(rate),
                "inet_proto",
                "dynamic",
            );
        }
        if let Some(max) = limits.target.max_connections {
            whole(
                format!("{chain}_conns"),
                max.to_string(),
                "inet_proto",
                "dynamic",
            );
        }
        for family in target.families.iter().map(|f| f.family) {
            let element_type = address_type(family);
            if let Some(rate) = limits.per_source.rate {
                let set = source_set(&chain, "rate", family);
                whole(set, stamp(rate), element_type, "dynamic,timeout");
            }
            if let Some(max) = limits.per_source.max_connections {
                let set = source_set(&chain, "conns", family);
                whole(set, max.to_string(), element_type, "dynamic");
            }
        }
        for (address, cap) in &target.caps {
            let Some(max) = cap.max_connections else {
                continue;
            };
            let family = Family::of(address.ip());
            for (list, stamp) in [("guard", max), ("fill", max - 1)] {
                sets.entry(upstream_set(&chain, list, family))
                    .or_insert_with(|| LimitSet {
                        declaration: declaration(
                            &format!("{} . inet_service", address_type(family)),
                            "dynamic",
                        ),
                        stamps: BTreeMap::new(),
                    })
                    .stamps
                    .insert(Some(element(*address)), stamp.to_string());
            }
            sets.insert(
                full_set(&chain, cap),
                LimitSet {
                    declaration: format!(
                        "{} timeout {FULL_FLAG_SECONDS}s;",
                        declaration("inet_proto", "dynamic,timeout")
                    ),
                    stamps: BTreeMap::from([(None, max.to_string())]),
                },
            );
        }
    }
    sets
}

fn declaration(element_type: &str, flags: &str) -> String {
    format!("type {element_type}; size {SET_SIZE}; flags {flags};")
}

fn stamp(rate: Rate) -> String {
    format!("{}/{}", rate.per_second, rate.burst)
}

fn address_type(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ipv4_addr",
        Family::Ipv6 => "ipv6_addr",
    }
}

/// Names end in `_` and a word: `chain_name` writes `_` only before two
/// hex digits, so no target's chain or set has these names.
fn source_set(chain: &str, what: &str, family: Family) -> String {
    format!("{chain}_src_{what}{}", family_digit(family))
}

fn upstream_set(chain: &str, list: &str, family: Family) -> String {
    format!("{chain}_up_{list}{}", family_digit(family))
}

fn full_set(chain: &str, cap: &Cap) -> String {
    format!("{}_full", upstream_chain(chain, cap))
}

/// The chain that DNATs to one upstream address of a capped rotation:
/// `_u2` for the first address of the group's third upstream, `_u2_1` for
/// its second.
fn upstream_chain(chain: &str, cap: &Cap) -> String {
    match cap.ordinal {
        0 => format!("{chain}_u{}", cap.place),
        ordinal => format!("{chain}_u{}_{ordinal}", cap.place),
    }
}

/// An upstream as a constant key of the guard and fill sets.
fn element(address: SocketAddr) -> String {
    format!("{} . {}", address.ip(), address.port())
}

/// The chain of a target that owns `chain`: itself, or the target chain of
/// an upstream's.
pub(super) fn owner(chain: &str) -> &str {
    chain.rsplit_once("_u").map_or(chain, |(owner, _)| owner)
}

/// The set declarations of the table.
pub(super) fn render(out: &mut String, desired: &Desired) {
    for (name, set) in sets(desired) {
        writeln!(out, "\tset {name} {{ {} }}", set.declaration).unwrap();
    }
}

/// Adds the sets `desired` has and `applied` has not, and resets the
/// elements whose values changed: before the rules that use them.
pub(super) fn plan_sets(out: &mut String, applied: &Desired, desired: &Desired) {
    let table = &desired.nftables.table;
    let old = sets(applied);
    for (name, set) in sets(desired) {
        let Some(before) = old.get(&name) else {
            writeln!(
                out,
                "add set {FAMILY} {table} {name} {{ {} }}",
                set.declaration
            )
            .unwrap();
            continue;
        };
        for (key, stamp) in &before.stamps {
            if set.stamps.get(key) == Some(stamp) {
                continue;
            }
            match key {
                None => writeln!(out, "flush set {FAMILY} {table} {name}").unwrap(),
                // `add` first: `delete` then succeeds whether or not a
                // connection created the element.
                Some(key) => {
                    for verb in ["add", "delete"] {
                        writeln!(out, "{verb} element {FAMILY} {table} {name} {{ {key} }}")
                            .unwrap();
                    }
                }
            }
        }
    }
}

/// Deletes the upstream chains and the sets `applied` has and `desired`
/// has not: after the rules that used them.
pub(super) fn plan_removals(out: &mut String, applied: &Desired, desired: &Desired) {
    let table = &desired.nftables.table;
    for (name, old) in &applied.targets {
        let kept: Vec<String> = desired
            .targets
            .get(name)
            .map(|new| chains(name, new).into_iter().map(|(c, _)| c).collect())
            .unwrap_or_default();
        for (chain, _) in chains(name, old) {
            if !kept.contains(&chain) {
                writeln!(out, "delete chain {FAMILY} {table} {chain}").unwrap();
            }
        }
    }
    let new = sets(desired);
    for name in sets(applied).keys().filter(|n| !new.contains_key(*n)) {
        writeln!(out, "delete set {FAMILY} {table} {name}").unwrap();
    }
}

/// The rules of a target's `limits`, for the opening packets that
/// `opening` matches: rates first, so that a connection dropped by a rate
/// is never counted.
pub(super) fn target_rules(name: &str, target: &DesiredTarget, opening: &str) -> Vec<String> {
    let chain = chain_name(name);
    let limits = target.policy.limits;
    let rate_limited = denied_counter(name, Denied::RateLimited);
    let connection_limited = denied_counter(name, Denied::ConnectionLimited);
    let families = || target.families.iter().map(|f| f.family);
    let limit = |rate: Rate| {
        format!(
            "limit rate over {}/second burst {} packets",
            rate.per_second, rate.burst
        )
    };
    let mut rules = Vec::new();
    let Limit {
        rate: whole_rate,
        max_connections: whole_max,
    } = limits.target;
    if let Some(rate) = whole_rate {
        rules.push(format!(
            "{opening}update @{chain}_rate {{ meta l4proto {} }} counter name \"{rate_limited}\" drop",
            limit(rate)
        ));
    }
    if let Some(rate) = limits.per_source.rate {
        for family in families() {
            rules.push(format!(
                "{opening}update @{} {{ {} saddr timeout {}s {} }} counter name \"{rate_limited}\" drop",
                source_set(&chain, "rate", family),
                address_keyword(family),
                refill_seconds(rate),
                limit(rate)
            ));
        }
    }
    if let Some(max) = whole_max {
        rules.push(format!(
            "{opening}add @{chain}_conns {{ meta l4proto ct count over {max} }} counter name \"{connection_limited}\" drop"
        ));
    }
    if let Some(max) = limits.per_source.max_connections {
        for family in families() {
            rules.push(format!(
                "{opening}add @{} {{ {} saddr ct count over {max} }} counter name \"{connection_limited}\" drop",
                source_set(&chain, "conns", family),
                address_keyword(family)
            ));
        }
    }
    rules
}

/// How long a client's bucket must outlive its last connection: the time
/// it takes to refill, after which a new bucket is the same.
fn refill_seconds(rate: Rate) -> u32 {
    rate.burst.div_ceil(rate.per_second).max(1)
}

/// Whether `rotation` of `target` picks an upstream through the chains of
/// its upstreams: when one of its slots has a cap.
pub(super) fn capped(target: &DesiredTarget, rotation: &FamilyRotation) -> bool {
    rotation.slots.iter().any(|s| {
        target
            .caps
            .get(s)
            .is_some_and(|c| c.max_connections.is_some())
    })
}

/// The balancing rules of a capped rotation, for the packets `matched`
/// and `opening` select: the distribution's pick, a second pick, every
/// upstream in turn, and a drop when none has room. `keys` are the
/// distribution's first and second keys.
pub(super) fn rotation_rules(
    name: &str,
    target: &DesiredTarget,
    rotation: &FamilyRotation,
    matched: &str,
    keys: [String; 2],
) -> Vec<String> {
    let chain = chain_name(name);
    let jump = |out: &mut String, slot: &SocketAddr| {
        write!(out, "jump {}", upstream_chain(&chain, &target.caps[slot]))
    };
    let elements = slot_elements(&rotation.slots, jump);
    let [first, second] = keys;
    let mut rules = vec![format!("{matched} {first} vmap {{ {elements} }}")];
    let mut upstreams: Vec<&SocketAddr> = Vec::new();
    for slot in &rotation.slots {
        if !upstreams.contains(&slot) {
            upstreams.push(slot);
        }
    }
    if upstreams.len() > 1 {
        rules.push(format!("{matched} {second} vmap {{ {elements} }}"));
        for upstream in upstreams {
            let mut rule = format!("{matched} ");
            jump(&mut rule, upstream).expect("writing to a String");
            rules.push(rule);
            if target.caps[upstream].max_connections.is_none() {
                // An upstream without a cap always takes the connection.
                return rules;
            }
        }
    }
    rules.push(format!(
        "{matched} counter name \"{}\" drop",
        denied_counter(name, Denied::ConnectionLimited)
    ));
    rules
}

/// The chains of the upstreams of `target`'s capped rotations, with
/// their rules. A capped upstream's chain returns when it is flagged full,
/// drops a connection over its cap, and flags it when this connection
/// fills it.
pub(super) fn chains(name: &str, target: &DesiredTarget) -> Vec<(String, Vec<String>)> {
    let chain = chain_name(name);
    let mut chains = BTreeMap::new();
    for rotation in target.families.iter().filter(|r| capped(target, r)) {
        let family = rotation.family;
        for slot in &rotation.slots {
            let cap = &target.caps[slot];
            let mut rules = Vec::new();
            if let Some(max) = cap.max_connections {
                let full = full_set(&chain, cap);
                let flag = format!("update @{full} {{ meta l4proto }}");
                let key = element(*slot);
                rules.push(format!("meta l4proto @{full} return"));
                rules.push(format!(
                    "add @{} {{ {key} ct count over {max} }} {flag} counter name \"{}\" drop",
                    upstream_set(&chain, "guard", family),
                    denied_counter(name, Denied::ConnectionLimited)
                ));
                rules.push(format!(
                    "add @{} {{ {key} ct count over {} }} {flag}",
                    upstream_set(&chain, "fill", family),
                    max - 1
                ));
            }
            rules.push(format!(
                "meta l4proto {} dnat {} to {slot}",
                target.protocol.as_str(),
                address_keyword(family)
            ));
            chains.insert(upstream_chain(&chain, cap), rules);
        }
    }
    chains.into_iter().collect()
}

/// The named counters `target`'s limits count into.
pub(super) fn counters(name: &str, target: &DesiredTarget) -> Vec<String> {
    let limits = target.policy.limits;
    let mut counters = Vec::new();
    if limits.target.rate.is_some() || limits.per_source.rate.is_some() {
        counters.push(denied_counter(name, Denied::RateLimited));
    }
    let capped = target.caps.values().any(|c| c.max_connections.is_some());
    if limits.target.max_connections.is_some()
        || limits.per_source.max_connections.is_some()
        || capped
    {
        counters.push(denied_counter(name, Denied::ConnectionLimited));
    }
    counters
}

/// `listing` (nft's text of the table) without the elements of dynamic
/// sets, which traffic adds: they are state, not a change of the table.
pub(super) fn without_dynamic_elements(listing: &str) -> String {
    let mut out = String::with_capacity(listing.len());
    let mut dynamic = false;
    let mut in_elements = false;
    for line in listing.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("set ") {
            dynamic = false;
        } else if trimmed.starts_with("flags ") && trimmed.contains("dynamic") {
            dynamic = true;
        }
        if dynamic && trimmed.starts_with("elements = {") {
            in_elements = true;
        }
        if in_elements {
            in_elements = !trimmed.ends_with('}');
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::{Distribution, Limits, Policy, Protocol},
        nft::{Applied, plan},
    };
    use std::sync::Arc;

    fn addr(host: u8) -> SocketAddr {
        SocketAddr::from(([198, 18, 1, host], 9000))
    }

    /// A round-robin IPv4 target over web1 (capped at `cap`) and web2.
    fn target(cap: u32, limits: Limits) -> DesiredTarget {
        DesiredTarget {
            protocol: Protocol::Tcp,
            port: 8081,
            ip: None,
            distribution: Distribution::RoundRobin,
            policy: Policy {
                limits,
                ..Policy::default()
            },
            families: vec![FamilyRotation {
                family: Family::Ipv4,
                slots: vec![addr(11), addr(12)],
            }],
            persistence: None,
            caps: BTreeMap::from([
                (
                    addr(11),
                    Cap {
                        place: 0,
                        ordinal: 0,
                        max_connections: Some(cap),
                    },
                ),
                (
                    addr(12),
                    Cap {
                        place: 1,
                        ordinal: 0,
                        max_connections: None,
                    },
                ),
            ]),
        }
    }

    fn desired(target: DesiredTarget) -> Desired {
        Desired {
            targets: BTreeMap::from([("web".to_owned(), Arc::new(target))]),
            ..Desired::default()
        }
    }

    fn rate(per_second: u32, burst: u32) -> Option<Rate> {
        Some(Rate { per_second, burst })
    }

    #[test]
    fn a_capped_upstream_is_asked_before_the_dnat_and_others_take_its_share() {
        let web = target(5, Limits::default());
        let rotation = &web.families[0];
        assert!(capped(&web, rotation));
        let keys = ["numgen inc mod 2".to_owned(), "numgen inc mod 2".to_owned()];
        assert_eq!(
            rotation_rules("web", &web, rotation, "M", keys),
            [
                "M numgen inc mod 2 vmap { 0 : jump target-web_u0, 1 : jump target-web_u1 }",
                "M numgen inc mod 2 vmap { 0 : jump target-web_u0, 1 : jump target-web_u1 }",
                "M jump target-web_u0",
                // web2 has no cap: it takes whatever reaches it.
                "M jump target-web_u1",
            ]
        );
        assert_eq!(
            chains("web", &web),
            [
                (
                    "target-web_u0".to_owned(),
                    vec![
                        "meta l4proto @target-web_u0_full return".to_owned(),
                        "add @target-web_up_guard4 { 198.18.1.11 . 9000 ct count over 5 } update @target-web_u0_full { meta l4proto } counter name \"target-web-connection_limited\" drop".to_owned(),
                        "add @target-web_up_fill4 { 198.18.1.11 . 9000 ct count over 4 } update @target-web_u0_full { meta l4proto }".to_owned(),
                        "meta l4proto tcp dnat ip to 198.18.1.11:9000".to_owned(),
                    ]
                ),
                (
                    "target-web_u1".to_owned(),
                    vec!["meta l4proto tcp dnat ip to 198.18.1.12:9000".to_owned()]
                ),
            ]
        );
        // Without web2, web1 alone: when it is full, nothing has room.
        let mut alone = web.clone();
        alone.families[0].slots = vec![addr(11)];
        let keys = ["K1".to_owned(), "K2".to_owned()];
        assert_eq!(
            rotation_rules("web", &alone, &alone.families[0], "M", keys),
            [
                "M K1 vmap { 0 : jump target-web_u0 }",
                "M counter name \"target-web-connection_limited\" drop",
            ]
        );
        // Only web2 up: no cap in the rotation, the plain DNAT map.
        alone.families[0].slots = vec![addr(12)];
        assert!(!capped(&alone, &alone.families[0]));
        assert!(chains("web", &alone).is_empty());
    }

    #[test]
    fn target_limits_count_opening_packets_rates_first() {
        let limits = Limits {
            target: Limit {
                rate: rate(50, 10),
                max_connections: Some(1000),
            },
            per_source: Limit {
                rate: rate(5, 12),
                max_connections: Some(10),
            },
        };
        let mut web = target(5, limits);
        web.families.push(FamilyRotation {
            family: Family::Ipv6,
            slots: vec![],
        });
        assert_eq!(
            target_rules("web", &web, "O "),
            [
                "O update @target-web_rate { meta l4proto limit rate over 50/second burst 10 packets } counter name \"target-web-rate_limited\" drop",
                // A client's bucket outlives its last connection by the
                // time it takes to refill: 12 at 5/s.
                "O update @target-web_src_rate4 { ip saddr timeout 3s limit rate over 5/second burst 12 packets } counter name \"target-web-rate_limited\" drop",
                "O update @target-web_src_rate6 { ip6 saddr timeout 3s limit rate over 5/second burst 12 packets } counter name \"target-web-rate_limited\" drop",
                "O add @target-web_conns { meta l4proto ct count over 1000 } counter name \"target-web-connection_limited\" drop",
                "O add @target-web_src_conns4 { ip saddr ct count over 10 } counter name \"target-web-connection_limited\" drop",
                "O add @target-web_src_conns6 { ip6 saddr ct count over 10 } counter name \"target-web-connection_limited\" drop",
            ]
        );
        assert_eq!(
            counters("web", &web),
            ["target-web-rate_limited", "target-web-connection_limited"]
        );
        assert_eq!(
            refill_seconds(Rate {
                per_second: 50,
                burst: 10
            }),
            1
        );
    }

    #[test]
    fn state_survives_every_change_but_of_its_own_values() {
        let limits = Limits {
            target: Limit {
                rate: rate(50, 10),
                max_connections: None,
            },
            ..Limits::default()
        };
        let before = desired(target(5, limits));
        // web2 goes down: the chains change, the sets are left alone.
        let mut down = before.clone();
        Arc::make_mut(down.targets.get_mut("web").unwrap()).families[0].slots = vec![addr(11)];
        let script = plan(Applied::Known(&before), &down).unwrap();
        assert!(
            !script.contains("set inet lobby target-web")
                && !script.contains("element inet lobby target-web"),
            "{script}"
        );
        assert!(
            script.contains("delete chain inet lobby target-web_u1\n"),
            "{script}"
        );
        // web1's cap changes: its counts start again, the rate's do not.
        let raised = desired(target(8, limits));
        let script = plan(Applied::Known(&before), &raised).unwrap();
        assert!(
            script.starts_with(
                "flush set inet lobby target-web_u0_full\n\
                 add element inet lobby target-web_up_fill4 { 198.18.1.11 . 9000 }\n\
                 delete element inet lobby target-web_up_fill4 { 198.18.1.11 . 9000 }\n\
                 add element inet lobby target-web_up_guard4 { 198.18.1.11 . 9000 }\n\
                 delete element inet lobby target-web_up_guard4 { 198.18.1.11 . 9000 }\n\
                 flush chain inet lobby target-web_u0\n"
            ),
            "{script}"
        );
        // The rate changes: its bucket starts again full.
        let mut faster = limits;
        faster.target.rate = rate(60, 10);
        let script = plan(Applied::Known(&before), &desired(target(5, faster))).unwrap();
        assert!(
            script.starts_with(
                "flush set inet lobby target-web_rate\nflush chain inet lobby target-web\n"
            ),
            "{script}"
        );
    }

    #[test]
    fn elements_that_traffic_adds_are_not_a_change_of_the_table() {
        let listing = "table inet lobby {
\tset backends4 {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\telements = { 198.18.1.11 . tcp . 9000 }
\t}
\tset target-web_src_conns4 {
\t\ttype ipv4_addr
\t\tsize 1048576
\t\tflags dynamic
\t\telements = { 198.18.0.2 ct count over 10,
\t\t\t     198.18.0.3 ct count over 10 }
\t}
\tset target-web_rate {
\t\ttype inet_proto
\t\tflags dynamic
\t\telements = { tcp limit rate over 50/second burst 10 packets }
\t}
}
";
        let kept = without_dynamic_elements(listing);
        assert!(kept.contains("198.18.1.11 . tcp . 9000"), "{kept}");
        assert!(
            !kept.contains("ct count") && !kept.contains("limit rate"),
            "{kept}"
        );
        assert!(
            kept.contains("\t\tflags dynamic\n\t}\n\tset target-web_rate {"),
            "{kept}"
        );
    }

    #[test]
    fn an_upstream_chain_belongs_to_its_target_chain() {
        assert_eq!(owner("target-web_u3"), "target-web");
        assert_eq!(owner("target-web_u3_1"), "target-web");
        assert_eq!(owner("target-web_5fu"), "target-web_5fu");
        assert_eq!(owner("postrouting"), "postrouting");
    }
}
