//! The data plane's ruleset: renders the desired state to nftables (pure)
//! and applies it (the only code in Lobby that runs `nft`).
//!
//! Shape (see shared/NFTABLES.md): one owned `inet` table (both families);
//! a base chain at the `dstnat` priority dispatches `l4proto . dport` of
//! traffic addressed to this host through a verdict map to one chain per
//! target; each target chain holds, per family it serves, the round-robin
//! DNAT over the available upstreams of that family (netfilter cannot
//! translate between families) or, with none, a refusal: a TCP reset, an
//! ICMP(v6) port unreachable for UDP and SCTP. Only connections to Lobby's
//! own upstreams are masqueraded, one set per family. Two chains at the
//! `raw` priority exempt the health probes' packets from conntrack (see
//! [`probes`]); two at `mangle` end least-connections' mark (see
//! [`closing`]). A
//! change touches only the chains and elements it must, in one transaction.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Stdio,
};

use tokio::process::Command;

mod block;
mod closing;
mod counters;
pub mod flowtable;
mod library;
mod limits;
mod local;
mod mirror;
mod persistence;
mod probes;

use crate::{
    config::{Distribution, Family, IpNet, Nftables, Protocol, SourceNat},
    model::{self, Backend, BackendDelta, Desired, DesiredTarget, FamilyRotation},
};

/// The family of Lobby's table (named by `nftables.table`); it never
/// touches any other table.
pub const FAMILY: &str = "inet";
/// The family of the table of Lobby versions before IPv6, which balanced
/// IPv4 only: a takeover replaces it with the `inet` one.
const LEGACY_FAMILY: &str = "ip";
/// Every family in which Lobby owns the table of its name: `inet`, and
/// `ip` and `ip6` for mirroring (nft's `dup` exists only there).
const OWNED_FAMILIES: [&str; 3] = [mirror::FAMILIES[0], mirror::FAMILIES[1], FAMILY];

/// A nat chain's priority as nft takes it: `dstnat` by its name.
fn priority_text(priority: i32) -> String {
    if priority == Nftables::DSTNAT {
        "dstnat".to_owned()
    } else {
        priority.to_string()
    }
}

/// The type line of the prerouting chain.
fn prerouting_type(priority: i32) -> String {
    format!(
        "type nat hook prerouting priority {}; policy accept;",
        priority_text(priority)
    )
}

const PREROUTING_RULE: &str = "fib daddr type local meta l4proto . th dport vmap @targets";

/// The masquerade set of a family's backends, and its element type.
fn backends_set(family: Family) -> (&'static str, &'static str) {
    match family {
        Family::Ipv4 => ("backends4", "ipv4_addr"),
        Family::Ipv6 => ("backends6", "ipv6_addr"),
    }
}

/// nft's word for a family in `daddr` matches and `dnat ... to`.
fn address_keyword(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ip",
        Family::Ipv6 => "ip6",
    }
}

/// The digit that ends the name of a set of one family.
fn family_digit(family: Family) -> char {
    match family {
        Family::Ipv4 => '4',
        Family::Ipv6 => '6',
    }
}

/// Renders the whole table.
pub fn render(desired: &Desired) -> String {
    let table = &desired.nftables.table;
    let mut out = String::new();
    writeln!(out, "table {FAMILY} {table} {{").unwrap();
    writeln!(out, "\tmap targets {{").unwrap();
    writeln!(out, "\t\ttype inet_proto . inet_service : verdict").unwrap();
    let dispatch: Vec<String> = desired
        .targets
        .iter()
        .map(|(name, target)| dispatch_element(name, target))
        .collect();
    write_elements(&mut out, &dispatch);
    writeln!(out, "\t}}").unwrap();
    let backends = desired.backends();
    for family in Family::BOTH {
        let (set, element_type) = backends_set(family);
        writeln!(out, "\tset {set} {{").unwrap();
        writeln!(out, "\t\ttype {element_type} . inet_proto . inet_service").unwrap();
        write_elements(&mut out, &backend_elements(&backends, family));
        writeln!(out, "\t}}").unwrap();
    }
    writeln!(out, "\tchain prerouting {{").unwrap();
    writeln!(out, "\t\t{}", prerouting_type(desired.nftables.priority)).unwrap();
    writeln!(out, "\t\t{PREROUTING_RULE}").unwrap();
    writeln!(out, "\t}}").unwrap();
    local::render(&mut out, desired);
    closing::render(&mut out, desired);
    for counter in denied_counters(desired) {
        writeln!(out, "\tcounter {counter} {{\n\t}}").unwrap();
    }
    limits::render(&mut out, desired);
    writeln!(out, "\tchain postrouting {{").unwrap();
    writeln!(
        out,
        "\t\ttype nat hook postrouting priority srcnat; policy accept;"
    )
    .unwrap();
    for rule in postrouting_rules(desired) {
        writeln!(out, "\t\t{rule}").unwrap();
    }
    writeln!(out, "\t}}").unwrap();
    probes::render(&mut out, desired);
    for object in persistence::objects(desired).values() {
        object.render(&mut out);
    }
    for (name, target) in &desired.targets {
        for map in slot_maps(name, target) {
            map.render(&mut out);
        }
        // The chains a target's chain jumps to come first.
        let mut chains = limits::chains(name, target);
        chains.push((chain_name(name), target_rules(name, target)));
        for (chain, rules) in chains {
            writeln!(out, "\tchain {chain} {{").unwrap();
            for rule in rules {
                writeln!(out, "\t\t{rule}").unwrap();
            }
            writeln!(out, "\t}}").unwrap();
        }
    }
    flowtable::render(&mut out, desired.flowtable.as_ref());
    writeln!(out, "}}").unwrap();
    mirror::render(&mut out, desired);
    out
}

/// Whether `script` builds Lobby's whole table: [`render`]'s block, alone
/// or after a [`teardown`]. A plan's changes never open one.
fn builds_the_table(script: &str) -> bool {
    let block = format!("table {FAMILY} ");
    script.lines().any(|line| line.starts_with(&block))
}

/// A base chain that a table has whole or not at all: its name, its
/// `type ... hook ...` line and its rules.
struct FixedChain {
    name: &'static str,
    spec: String,
    rules: Vec<String>,
}

/// Writes `chains` inside `table ... { }`.
fn render_fixed(out: &mut String, chains: &[FixedChain]) {
    for chain in chains {
        writeln!(out, "\tchain {} {{", chain.name).unwrap();
        writeln!(out, "\t\t{}", chain.spec).unwrap();
        for rule in &chain.rules {
            writeln!(out, "\t\t{rule}").unwrap();
        }
        writeln!(out, "\t}}").unwrap();
    }
}

/// The commands that add `chains` to `table`.
fn add_fixed(out: &mut String, table: &str, chains: &[FixedChain]) {
    for chain in chains {
        let name = chain.name;
        writeln!(
            out,
            "add chain {FAMILY} {table} {name} {{ {} }}",
            chain.spec
        )
        .unwrap();
        for rule in &chain.rules {
            writeln!(out, "add rule {FAMILY} {table} {name} {rule}").unwrap();
        }
    }
}

/// The commands that delete `chains` from `table`.
fn delete_fixed(out: &mut String, table: &str, chains: &[FixedChain]) {
    for chain in chains {
        writeln!(out, "delete chain {FAMILY} {table} {}", chain.name).unwrap();
    }
}

/// What the kernel holds before a transaction.
#[derive(Clone, Copy, Debug)]
pub enum Applied<'a> {
    /// No table of Lobby's: it is created.
    Nothing,
    /// A table whose content is not known: a previous run's, or one a
    /// failed apply may have left. It is replaced whole.
    Unknown,
    /// The table as Lobby last applied it: only differences are sent.
    Known(&'a Desired),
}

/// The transaction that turns `applied` into `desired`, or `None` when they
/// are equal. An unknown table is replaced in one transaction (`add` before
/// `delete` makes the delete succeed whether or not it exists), so that
/// established connections never see a missing rule; creating a table
/// skips the delete, which costs nft the wait for the kernel to free it.
/// Both states name the same table: a reload that renames it is refused
/// before it gets here.
pub fn plan(applied: Applied<'_>, desired: &Desired) -> Option<String> {
    let delta = match applied {
        Applied::Known(applied) => BackendDelta::between(&applied.backends(), &desired.backends()),
        _ => BackendDelta::default(),
    };
    plan_with_backends(applied, desired, &delta)
}

/// [`plan`] with the backends the change stops and starts masquerading
/// known: at 10,000 upstreams computing them is most of a plan's time.
pub fn plan_with_backends(
    applied: Applied<'_>,
    desired: &Desired,
    backends: &BackendDelta,
) -> Option<String> {
    let table = &desired.nftables.table;
    let applied = match applied {
        Applied::Nothing => return Some(render(desired)),
        Applied::Unknown => return Some(format!("{}{}", teardown(table), render(desired))),
        Applied::Known(applied) => applied,
    };
    if applied == desired {
        return None;
    }
    #[cfg(debug_assertions)]
    let whole = (applied, desired);
    let (old_view, new_view);
    let (applied, desired) = match changed_views(applied, desired) {
        Some(views) => {
            (old_view, new_view) = views;
            (&old_view, &new_view)
        }
        None => (applied, desired),
    };
    let script = plan_known(applied, desired, backends);
    // Every test build checks the plan of the changed targets against the
    // plan of everything.
    #[cfg(debug_assertions)]
    {
        assert_eq!(
            script,
            plan_known(whole.0, whole.1, backends),
            "the plan of the changed targets differs from the whole plan"
        );
    }
    Some(script)
}

/// `applied` and `desired` with only the targets that differ, the rest of
/// each state as it is; `None` when a changed target has a part in what
/// the table's targets share (the local dispatch map, least-connections'
/// closing chains, the mirror tables, the SNAT rules of `postrouting`),
/// whose plan needs every target), or when the table's priority changes
/// (which those shared chains follow). Everything else Lobby renders of a
/// target (its chains, sets, counters, persistence objects, dispatch
/// element) is named after it and rendered from it alone, so an equal
/// target has nothing to plan: most of them, at 1,000 targets.
fn changed_views(applied: &Desired, desired: &Desired) -> Option<(Desired, Desired)> {
    if applied.nftables != desired.nftables {
        return None;
    }
    let changes = model::changed_targets(&applied.targets, &desired.targets);
    let shares = |target: &DesiredTarget| {
        local::takes_part(target)
            || closing::takes_part(target)
            || mirror::takes_part(target)
            || Family::BOTH
                .into_iter()
                .any(|family| !snat_to(&target.policy.source_nat, family).is_empty())
    };
    if changes
        .iter()
        .flat_map(|(_, old, new)| old.iter().chain(new))
        .any(|target| shares(target))
    {
        return None;
    }
    let view = |state: &Desired| Desired {
        targets: BTreeMap::new(),
        lingering: state.lingering.clone(),
        flowtable: state.flowtable.clone(),
        nftables: state.nftables.clone(),
        probes: state.probes,
    };
    let (mut old_view, mut new_view) = (view(applied), view(desired));
    for (name, old, new) in changes {
        for (view, target) in [(&mut old_view, old), (&mut new_view, new)] {
            if let Some(target) = target {
                view.targets.insert(name.to_owned(), target.clone());
            }
        }
    }
    Some((old_view, new_view))
}

/// The commands that turn the known `applied` into `desired`.
fn plan_known(applied: &Desired, desired: &Desired, backends: &BackendDelta) -> String {
    let table = &desired.nftables.table;
    let mut out = String::new();
    // The jumps of the local dispatch go before the chains they name.
    local::plan_removals(&mut out, applied, desired);
    // Removals first: a dispatch element must go before the chain it jumps
    // to, and a reused port must be free before it is added again.
    for (name, old) in &applied.targets {
        match desired.targets.get(name) {
            None => {
                delete_dispatch(&mut out, table, old);
                writeln!(out, "delete chain {FAMILY} {table} {}", chain_name(name)).unwrap();
                for map in slot_maps(name, old) {
                    map.delete(&mut out, table);
                }
            }
            Some(new) if dispatch_key(old) != dispatch_key(new) => {
                delete_dispatch(&mut out, table, old)
            }
            Some(_) => {}
        }
    }
    for (verb, backends) in [("delete", &backends.gone), ("add", &backends.added)] {
        for family in Family::BOTH {
            let elements = backend_elements(backends, family);
            if !elements.is_empty() {
                writeln!(
                    out,
                    "{verb} element {FAMILY} {table} {} {{ {} }}",
                    backends_set(family).0,
                    elements.join(", ")
                )
                .unwrap();
            }
        }
    }
    let old_counters = denied_counters(applied);
    let new_counters = denied_counters(desired);
    for counter in new_counters.difference(&old_counters) {
        writeln!(out, "add counter {FAMILY} {table} {counter}").unwrap();
    }
    limits::plan_sets(&mut out, applied, desired);
    let postrouting = postrouting_rules(desired);
    if postrouting_rules(applied) != postrouting {
        writeln!(out, "flush chain {FAMILY} {table} postrouting").unwrap();
        for rule in &postrouting {
            writeln!(out, "add rule {FAMILY} {table} postrouting {rule}").unwrap();
        }
    }
    // Before the target chains that jump to them, removed after.
    let old_persistence = persistence::objects(applied);
    let new_persistence = persistence::objects(desired);
    for (name, object) in &new_persistence {
        if !old_persistence.contains_key(name) {
            object.add(&mut out, table);
        }
    }
    // A target's chains are rendered from the target alone: an equal one
    // has nothing to change (most of them, at 1,000 targets), and the
    // others can be rendered apart, on several threads when many changed.
    let changed: Vec<(&str, &DesiredTarget)> = desired
        .targets
        .iter()
        .filter(|(name, new)| applied.targets.get(*name) != Some(*new))
        .map(|(name, new)| (name.as_str(), &**new))
        .collect();
    let rendered = crate::parallel::map_items(&changed, SHARED_RENDER, |(name, new)| {
        let mut out = String::new();
        let old = applied.targets.get(*name).map(|old| &**old);
        plan_target(&mut out, table, name, old, new);
        out
    });
    out.extend(rendered);
    if applied.nftables.priority != desired.nftables.priority {
        // A hook's priority is fixed at creation: the chain is replaced
        // in this transaction, so no packet sees it missing.
        writeln!(out, "delete chain {FAMILY} {table} prerouting").unwrap();
        writeln!(
            out,
            "add chain {FAMILY} {table} prerouting {{ {} }}",
            prerouting_type(desired.nftables.priority)
        )
        .unwrap();
        writeln!(
            out,
            "add rule {FAMILY} {table} prerouting {PREROUTING_RULE}"
        )
        .unwrap();
    }
    local::plan_additions(&mut out, applied, desired);
    closing::plan(&mut out, applied, desired);
    probes::plan(&mut out, applied, desired);
    flowtable::plan(
        &mut out,
        table,
        applied.flowtable.as_ref(),
        desired.flowtable.as_ref(),
    );
    mirror::plan(&mut out, applied, desired);
    // Last: no rule refers to them any more.
    limits::plan_removals(&mut out, applied, desired);
    for (name, object) in &old_persistence {
        if !new_persistence.contains_key(name) {
            object.delete(&mut out, table);
        }
    }
    for counter in old_counters.difference(&new_counters) {
        writeln!(out, "delete counter {FAMILY} {table} {counter}").unwrap();
    }
    out
}

/// Changed targets rendered on several threads from this many on: a
/// thread's start costs tens of microseconds, a target's chains ~15.
const SHARED_RENDER: usize = 64;

/// The chains of target `name`, `new`, its slot maps and its dispatch
/// element, as a change from `old` (`None`: a new target).
fn plan_target(
    out: &mut String,
    table: &str,
    name: &str,
    old: Option<&DesiredTarget>,
    new: &DesiredTarget,
) {
    // The chains a target's chain jumps to first.
    let old_chains: BTreeMap<String, Vec<String>> = old
        .map(|old| limits::chains(name, old).into_iter().collect())
        .unwrap_or_default();
    for (chain, rules) in limits::chains(name, new) {
        if open_chain(out, table, &chain, old_chains.get(&chain), &rules, false) {
            add_rules(out, table, &chain, &rules);
        }
    }
    let chain = chain_name(name);
    let rules = target_rules(name, new);
    let old_rules = old.map(|old| target_rules(name, old));
    let old_maps = old.map(|old| slot_maps(name, old)).unwrap_or_default();
    let new_maps = slot_maps(name, new);
    // A map that goes, or whose declaration changes, is deleted (and made
    // again): the rule that binds it must go first.
    let stale: Vec<&SlotMap> = old_maps
        .iter()
        .filter(|old| !new_maps.iter().any(|new| new.declares_as(old)))
        .collect();
    let rewrite = open_chain(
        out,
        table,
        &chain,
        old_rules.as_ref(),
        &rules,
        !stale.is_empty(),
    );
    for map in &stale {
        map.delete(out, table);
    }
    for map in &new_maps {
        match old_maps.iter().find(|old| map.declares_as(old)) {
            Some(old) if old.elements == map.elements => {}
            Some(_) => map.refill(out, table),
            None => map.add(out, table),
        }
    }
    if rewrite {
        add_rules(out, table, &chain, &rules);
    }
    if old.is_none_or(|old| dispatch_key(old) != dispatch_key(new)) {
        writeln!(
            out,
            "add element {FAMILY} {table} targets {{ {} }}",
            dispatch_element(name, new)
        )
        .unwrap();
    }
}

/// Creates `chain` of `table`, or empties it when its `old` rules differ
/// from `rules` or `unbind` asks it to release the maps its rules name;
/// whether `rules` are to be added.
fn open_chain(
    out: &mut String,
    table: &str,
    chain: &str,
    old: Option<&Vec<String>>,
    rules: &[String],
    unbind: bool,
) -> bool {
    match old {
        None => writeln!(out, "add chain {FAMILY} {table} {chain}").unwrap(),
        Some(old) if unbind || old != rules => {
            writeln!(out, "flush chain {FAMILY} {table} {chain}").unwrap()
        }
        Some(_) => return false,
    }
    true
}

fn add_rules(out: &mut String, table: &str, chain: &str, rules: &[String]) {
    for rule in rules {
        writeln!(out, "add rule {FAMILY} {table} {chain} {rule}").unwrap();
    }
}

/// The transaction that removes Lobby's `table` in every family it owns
/// it in, whether or not they exist: `add` makes the `delete` succeed
/// either way. For the default name this removes the `ip` table of
/// versions before IPv6 too.
pub fn teardown(table: &str) -> String {
    OWNED_FAMILIES
        .iter()
        .map(|family| format!("add table {family} {table}\ndelete table {family} {table}\n"))
        .collect()
}

fn write_elements(out: &mut String, elements: &[String]) {
    if !elements.is_empty() {
        writeln!(out, "\t\telements = {{ {} }}", elements.join(", ")).unwrap();
    }
}

fn delete_dispatch(out: &mut String, table: &str, target: &DesiredTarget) {
    writeln!(
        out,
        "delete element {FAMILY} {table} targets {{ {} }}",
        dispatch_key(target)
    )
    .unwrap();
}

fn dispatch_key(target: &DesiredTarget) -> String {
    format!("{} . {}", target.protocol.as_str(), target.port)
}

fn dispatch_element(name: &str, target: &DesiredTarget) -> String {
    format!("{} : jump {}", dispatch_key(target), chain_name(name))
}

/// The masquerade set's elements of the backends of `family`.
fn backend_elements(backends: &BTreeSet<Backend>, family: Family) -> Vec<String> {
    backends
        .iter()
        .filter(|(addr, _)| Family::of(addr.ip()) == family)
        .map(|(addr, protocol)| format!("{} . {} . {}", addr.ip(), protocol.as_str(), addr.port()))
        .collect()
}

/// The rules of a target's chain, per family it serves. With upstreams:
/// the round-robin DNAT, then a drop of what it did not translate. A
/// connection evaluated while a transaction that rewrites this chain
/// commits can, rarely, miss the DNAT (measured: 2 in 197,441 connections
/// over 1,740 rewrites, kernel 6.18); dropped, its SYN is sent again a
/// second later and balanced, where falling through would reach the host's
/// own stack and be refused. Without upstreams: refused at once.
fn target_rules(name: &str, target: &DesiredTarget) -> Vec<String> {
    let mut rules = policy_rules(name, target);
    let opening = opening(target.protocol);
    rules.extend(limits::target_rules(
        name,
        target,
        &opening.map(|o| format!("{o} ")).unwrap_or_default(),
    ));
    for rotation in &target.families {
        let family = address_keyword(rotation.family);
        let mut matched = String::new();
        match target.ip {
            Some(ip) => write!(matched, "{family} daddr {ip} ").unwrap(),
            // nft's names of the families are the ones stats use.
            None => write!(matched, "meta nfproto {} ", rotation.family.as_str()).unwrap(),
        }
        write!(matched, "meta l4proto {}", target.protocol.as_str()).unwrap();
        if rotation.slots.is_empty() {
            rules.push(format!("{matched} {}", refusal(target.protocol)));
            continue;
        }
        let opened = match opening {
            Some(opening) => format!("{matched} {opening}"),
            None => matched.clone(),
        };
        if target.distribution == Distribution::LeastConnections {
            rules.push(closing::mark_rule(&opened));
        }
        match &target.persistence {
            // A client the kernel remembers goes to its backend's chain,
            // which refreshes the memory and translates; a new one is sent
            // to the chain of the backend the distribution picks. (The
            // validator refuses persistence with upstream caps.)
            Some(persistence) => {
                for known in persistence::names_of_family(name, target, persistence, rotation) {
                    rules.push(format!("{opened} {family} saddr @{known} goto {known}"));
                }
                let elements = slot_elements(&rotation.slots, |out, backend| {
                    write!(
                        out,
                        "goto {}",
                        persistence::name(name, target, persistence, backend)
                    )
                });
                rules.push(format!(
                    "{opened} {} vmap {{ {elements} }}",
                    slot_key(target.distribution, rotation, HASH_SEED),
                ));
            }
            None if limits::capped(target, rotation) => {
                let keys = [HASH_SEED, limits::SPILL_SEED]
                    .map(|seed| slot_key(target.distribution, rotation, seed));
                rules.extend(limits::rotation_rules(
                    name, target, rotation, &opened, keys,
                ));
            }
            None => rules.push(format!(
                "{opened} dnat {family} to {} map @{}",
                slot_key(target.distribution, rotation, HASH_SEED),
                slot_map_name(name, rotation.family)
            )),
        }
        rules.push(format!("{matched} drop"));
    }
    rules
}

/// What matches a connection's opening packet, if not every packet: only
/// it is translated. A TCP segment without SYN that conntrack does not know
/// (a flow moved here by a failover or ECMP) is dropped, to be
/// retransmitted once the state has arrived, instead of being balanced to
/// an upstream that would reset it.
fn opening(protocol: Protocol) -> Option<&'static str> {
    match protocol {
        Protocol::Tcp => Some("tcp flags & (syn | ack) == syn"),
        Protocol::Udp | Protocol::Sctp => None,
    }
}

/// The rules before the balancing: traffic that is not balanced leaves the
/// chain (another interface: back to the host's own handling) or is dropped
/// silently and counted (a blocked or not allowed source).
fn policy_rules(name: &str, target: &DesiredTarget) -> Vec<String> {
    let policy = &target.policy;
    let mut rules = Vec::new();
    if let Some(interface) = &policy.interface {
        rules.push(format!("iifname != \"{interface}\" return"));
    }
    let served = || target.families.iter().map(|f| f.family);
    if !policy.block.is_empty() {
        let counter = denied_counter(name, Denied::Blocked);
        for family in served() {
            rules.extend(block::rules(&policy.block, family, &counter));
        }
    }
    if let Some(allow) = &policy.allow {
        let counter = denied_counter(name, Denied::NotAllowed);
        for family in served() {
            let nets = nets_of(allow, family);
            rules.push(if nets.is_empty() {
                format!(
                    "meta nfproto {} counter name \"{counter}\" drop",
                    family.as_str()
                )
            } else {
                format!(
                    "{} saddr != {{ {nets} }} counter name \"{counter}\" drop",
                    address_keyword(family)
                )
            });
        }
    }
    rules
}

/// The ranges of `family` among `nets`, as set elements.
fn nets_of(nets: &[IpNet], family: Family) -> String {
    let of_family: Vec<String> = nets
        .iter()
        .filter(|n| n.family() == family)
        .map(ToString::to_string)
        .collect();
    of_family.join(", ")
}

/// Why traffic was refused, as `lobby stats` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    Blocked,
    NotAllowed,
    RateLimited,
    ConnectionLimited,
}

impl Denied {
    pub const ALL: [Denied; 4] = [
        Denied::Blocked,
        Denied::NotAllowed,
        Denied::RateLimited,
        Denied::ConnectionLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Denied::Blocked => "blocked",
            Denied::NotAllowed => "not_allowed",
            Denied::RateLimited => "rate_limited",
            Denied::ConnectionLimited => "connection_limited",
        }
    }
}

/// The named counter of a target's refusals for `reason`.
pub fn denied_counter(target: &str, reason: Denied) -> String {
    format!("{}-{}", chain_name(target), reason.as_str())
}

/// The named counters the policies of `desired` count into.
fn denied_counters(desired: &Desired) -> BTreeSet<String> {
    let mut counters = BTreeSet::new();
    for (name, target) in &desired.targets {
        if !target.policy.block.is_empty() {
            counters.insert(denied_counter(name, Denied::Blocked));
        }
        if target.policy.allow.is_some() {
            counters.insert(denied_counter(name, Denied::NotAllowed));
        }
        counters.extend(limits::counters(name, target));
    }
    counters
}

/// The source translation of Lobby's connections: masquerade for the
/// targets that keep the default (through the backends sets), SNAT to the
/// configured addresses for the others; nothing for `source_nat: none`.
fn postrouting_rules(desired: &Desired) -> Vec<String> {
    let mut rules: Vec<String> = Family::BOTH
        .into_iter()
        .map(|family| {
            format!(
                "ct status dnat {} daddr . meta l4proto . th dport @{} masquerade",
                address_keyword(family),
                backends_set(family).0
            )
        })
        .collect();
    for target in desired.targets.values() {
        for rotation in &target.families {
            let translations = snat_to(&target.policy.source_nat, rotation.family);
            if translations.is_empty() {
                continue;
            }
            let backends: BTreeSet<Backend> = target
                .reachable(rotation)
                .into_iter()
                .map(|s| (s, target.protocol))
                .collect();
            if backends.is_empty() {
                continue;
            }
            let matched = format!(
                "ct status dnat {} daddr . meta l4proto . th dport {{ {} }}",
                address_keyword(rotation.family),
                backend_elements(&backends, rotation.family).join(", ")
            );
            rules.extend(
                translations
                    .into_iter()
                    .map(|translation| format!("{matched} {translation}")),
            );
        }
    }
    rules
}

/// `jhash`'s seed for the SNAT pool's pick by source port: "SNAT".
const SNAT_SEED: u32 = 0x534e_4154;

/// The SNAT statements (each after its own match, if any) by which
/// `source_nat` rewrites the source of connections of `family`; none if it
/// leaves them to the masquerade or to the client's own address.
///
/// A pool of N addresses is a rule per client bucket `k`: the clients
/// whose address ends in a byte equal to `k` modulo N. In bucket `k` a
/// hash of the client's source port `j` picks address `(k + j) mod N`. One
/// client's connections so spread over the whole pool, and two clients in
/// different buckets never SNAT one source port to the same address: the
/// upstream never sees one client's SYN on a tuple whose TIME_WAIT holds
/// the other's timestamps, which PAWS refuses (a `numgen` pick reuses
/// every tuple for both). The last byte rather than a hash of the address:
/// N neighbouring clients are N buckets for sure, where a hash puts two of
/// them in one bucket with a chance of 1 in N each.
fn snat_to(source_nat: &SourceNat, family: Family) -> Vec<String> {
    let keyword = address_keyword(family);
    match source_nat {
        SourceNat::Masquerade | SourceNat::None => Vec::new(),
        SourceNat::Range(first, last) => {
            if Family::of(*first) == family {
                vec![format!("snat {keyword} to {first}-{last}")]
            } else {
                Vec::new()
            }
        }
        SourceNat::Addresses(addresses) => {
            let pool: Vec<&IpAddr> = addresses
                .iter()
                .filter(|a| Family::of(**a) == family)
                .collect();
            if let [one] = pool.as_slice() {
                return vec![format!("snat {keyword} to {one}")];
            }
            let n = pool.len();
            let (mask, last_byte): (&str, fn(u8) -> IpAddr) = match family {
                Family::Ipv4 => ("0.0.0.255", |b| Ipv4Addr::from(u32::from(b)).into()),
                Family::Ipv6 => ("::ff", |b| Ipv6Addr::from(u128::from(b)).into()),
            };
            // A pool of more than 256 has buckets no last byte falls in.
            (0..n.min(256))
                .map(|bucket| {
                    let clients: Vec<String> = (0..=u8::MAX)
                        .filter(|b| usize::from(*b) % n == bucket)
                        .map(|b| last_byte(b).to_string())
                        .collect();
                    let slots: Vec<String> = (0..n)
                        .map(|port| format!("{port} : {}", pool[(bucket + port) % n]))
                        .collect();
                    format!(
                        "{keyword} saddr & {mask} {{ {} }} \
                         snat {keyword} to jhash th sport mod {n} seed {SNAT_SEED:#x} map {{ {} }}",
                        clients.join(", "),
                        slots.join(", ")
                    )
                })
                .collect()
        }
    }
}

/// The expression that picks a slot for a new connection; `seed` seeds
/// the hash of `ip-src-hash`.
fn slot_key(distribution: Distribution, rotation: &FamilyRotation, seed: u32) -> String {
    let slots = rotation.slots.len();
    match distribution {
        // The dynamic ones in turn over the upstreams the core picked.
        Distribution::RoundRobin | Distribution::LeastConnections | Distribution::LeastLatency => {
            format!("numgen inc mod {slots}")
        }
        Distribution::Random => format!("numgen random mod {slots}"),
        // A fixed seed: the same client keeps its slot across restarts.
        Distribution::IpSrcHash => format!(
            "jhash {} saddr mod {slots} seed {seed:#x}",
            address_keyword(rotation.family)
        ),
    }
}

/// `jhash`'s seed: "LOBB".
const HASH_SEED: u32 = 0x4c4f_4242;

/// A target's map from slots to the upstreams of one family, which its
/// DNAT rule names. Named, not written into the rule: the kernel binds an
/// anonymous map by walking the whole transaction, once per map (a first
/// apply of 5,000 targets took 3-16 s, a third to half of it with named
/// maps), and a change of upstreams that keeps the slot count refills the
/// map and leaves the chain alone.
struct SlotMap {
    name: String,
    /// `typeof KEY : VALUE`.
    types: String,
    /// Whether runs of one upstream are written as ranges.
    interval: bool,
    elements: String,
}

/// The key's declared type: a slot number, whatever the rule computes it
/// with. Not the rule's own key: a map is made again when its
/// declaration changes, which took 1.6 times a refill for a change of
/// every target at 1,000 x 10; and nft 1.0.6 crashes listing a map
/// declared `typeof jhash ...`.
const SLOT_TYPE: &str = "typeof numgen inc mod 1";

/// The slot maps of `target`: one per family with upstreams, unless its
/// slots pick persistence chains or capped upstreams' chains (a verdict
/// map, written into the rule).
fn slot_maps(name: &str, target: &DesiredTarget) -> Vec<SlotMap> {
    if target.persistence.is_some() {
        return Vec::new();
    }
    target
        .families
        .iter()
        .filter(|rotation| !rotation.slots.is_empty() && !limits::capped(target, rotation))
        .map(|rotation| SlotMap {
            name: slot_map_name(name, rotation.family),
            types: format!(
                "{SLOT_TYPE} : {} daddr . {} dport",
                address_keyword(rotation.family),
                target.protocol.as_str(),
            ),
            interval: rotation.slots.windows(2).any(|pair| pair[0] == pair[1]),
            elements: slot_elements(&rotation.slots, dnat_value),
        })
        .collect()
}

/// `target-NAME_slots4` (or `6`): `_` and `s` never follow each other in
/// a chain name (an escaped byte is `_` and two hex digits), so no other
/// set of the table has it.
fn slot_map_name(target: &str, family: Family) -> String {
    format!("{}_slots{}", chain_name(target), family_digit(family))
}

impl SlotMap {
    /// Whether `other` is this map with the same declaration.
    fn declares_as(&self, other: &SlotMap) -> bool {
        self.name == other.name && self.types == other.types && self.interval == other.interval
    }

    fn render(&self, out: &mut String) {
        writeln!(out, "\tmap {} {{", self.name).unwrap();
        writeln!(out, "\t\t{}", self.types).unwrap();
        if self.interval {
            writeln!(out, "\t\tflags interval").unwrap();
        }
        writeln!(out, "\t\telements = {{ {} }}", self.elements).unwrap();
        writeln!(out, "\t}}").unwrap();
    }

    fn add(&self, out: &mut String, table: &str) {
        let flags = if self.interval {
            " flags interval;"
        } else {
            ""
        };
        writeln!(
            out,
            "add map {FAMILY} {table} {} {{ {};{flags} elements = {{ {} }} }}",
            self.name, self.types, self.elements
        )
        .unwrap();
    }

    fn refill(&self, out: &mut String, table: &str) {
        writeln!(out, "flush map {FAMILY} {table} {}", self.name).unwrap();
        writeln!(
            out,
            "add element {FAMILY} {table} {} {{ {} }}",
            self.name, self.elements
        )
        .unwrap();
    }

    fn delete(&self, out: &mut String, table: &str) {
        writeln!(out, "delete map {FAMILY} {table} {}", self.name).unwrap();
    }
}

/// The elements of the map from slots to what `value` writes of their
/// upstreams, runs of one upstream as ranges. Written into one string: at
/// 1,000 x 10 a string per element was a tenth of a reload's decisions.
fn slot_elements(
    slots: &[SocketAddr],
    value: impl Fn(&mut String, &SocketAddr) -> fmt::Result,
) -> String {
    let mut elements = String::new();
    let mut start = 0;
    for (i, upstream) in slots.iter().enumerate() {
        if slots.get(i + 1) == Some(upstream) {
            continue;
        }
        if start > 0 {
            elements.push_str(", ");
        }
        if start == i {
            write!(elements, "{i} : ")
        } else {
            write!(elements, "{start}-{i} : ")
        }
        .and_then(|()| value(&mut elements, upstream))
        .expect("writing to a String");
        start = i + 1;
    }
    elements
}

/// An upstream as a DNAT map's value. IPv4 digits by hand: through
/// `Display`, 10,000 addresses were 7% of an every-target reload's
/// decisions.
fn dnat_value(out: &mut String, upstream: &SocketAddr) -> fmt::Result {
    match upstream.ip() {
        IpAddr::V4(ip) => {
            for (i, octet) in ip.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_decimal(out, octet.into());
            }
        }
        IpAddr::V6(ip) => write!(out, "{ip}")?,
    }
    out.push_str(" . ");
    push_decimal(out, upstream.port().into());
    Ok(())
}

fn push_decimal(out: &mut String, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.push_str(std::str::from_utf8(&digits[start..]).expect("ASCII digits"));
}

/// How a target with no upstream of a client's family answers it: TCP
/// with a reset; UDP and SCTP with an ICMP (ICMPv6) port unreachable,
/// which `reject` sends in an `inet` table.
fn refusal(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "reject with tcp reset",
        Protocol::Udp | Protocol::Sctp => "reject",
    }
}

/// A chain name for a target that nft accepts whatever the target is
/// called: letters, digits and `-` stay, every other byte becomes `_XX`, so
/// distinct names stay distinct.
pub fn chain_name(target: &str) -> String {
    let mut name = String::from("target-");
    for byte in target.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            name.push(char::from(byte));
        } else {
            write!(name, "_{byte:02x}").unwrap();
        }
    }
    name
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft (is the nftables package installed?)")]
    Spawn(#[source] std::io::Error),
    #[error("nft rejected the transaction: {said}")]
    Rejected { said: String },
    #[error("reading the table's named counters over netlink")]
    Counters(#[source] crate::nfnetlink::DumpError),
    #[error("reading nft's listing of the table")]
    Listing(#[source] serde_json::Error),
    #[error("nft may not read the ruleset (needs CAP_NET_ADMIN): {0}")]
    Permission(String),
    #[error("nft failed to list table {family} {table}: {said}")]
    List {
        family: &'static str,
        table: String,
        said: String,
    },
}

/// How Lobby hands nft its transactions and asks for its listings: through
/// libnftables in the daemon (see [`library`]), or the `nft` binary, a
/// process each. Both read the same text and answer in the same words.
pub enum Nft {
    /// The context of transactions, kept open. A transaction that builds the
    /// whole table, and each listing, get a context of their own, dropped after
    /// it (see [`Nft::apply`] for the first): the daemon lists its table after
    /// every apply (~190 ms at 1,000 x 10), which must not hold up the next
    /// transaction; a context that also lists fetches every rule and element
    /// again on its next transaction (at 1,000 x 10: 15.6 ms a one-target
    /// change after a listing, 3.2 ms after another transaction); and a
    /// listing's cache kept between listings was 28 MiB of the daemon's RSS at
    /// 1,000 x 10 (141 MiB after its start, 113 with a context a listing;
    /// opening one takes ~0.1 ms).
    Library(library::Libnftables),
    Process,
}

/// What a listing prints besides the table.
#[derive(Clone, Copy)]
enum Listing {
    /// Without counter values and dynamic elements (`nft -s`).
    Stateless,
    /// As JSON (`nft -j`).
    Json,
}

impl Listing {
    fn flag(self) -> &'static str {
        match self {
            Self::Stateless => "-s",
            Self::Json => "-j",
        }
    }

    fn output_flags(self) -> std::ffi::c_uint {
        match self {
            Self::Stateless => library::OUTPUT_STATELESS,
            Self::Json => library::OUTPUT_JSON,
        }
    }
}

impl Nft {
    /// libnftables, unless `process` asks for the binary or the library
    /// cannot be loaded (then said in the log, and the binary serves).
    pub fn open(process: bool) -> Self {
        if process {
            return Self::Process;
        }
        match library::Libnftables::open() {
            Ok(transactions) => Self::Library(transactions),
            Err(e) => {
                tracing::warn!(error = %e, "applying the ruleset through the nft binary, a process per transaction");
                Self::Process
            }
        }
    }

    /// Runs one transaction: the kernel applies all of it or none of it.
    pub async fn apply(&self, script: &str) -> Result<(), NftError> {
        match self {
            Self::Library(transactions) => {
                // A context keeps what a transaction built as its cache, and
                // frees it at its next transaction: after the whole table at
                // 1,000 x 10 that took the next one-target change 19-29 ms
                // against 6-8. The whole table is built on a context of its
                // own, freed on its thread after the answer; a failure to
                // open one leaves it to the kept context.
                let own = builds_the_table(script)
                    .then(|| library::Libnftables::open_for_script(script.len()))
                    .and_then(Result::ok);
                let outcome = own.as_ref().unwrap_or(transactions).run(script, 0).await;
                if outcome.accepted {
                    Ok(())
                } else {
                    Err(NftError::Rejected { said: outcome.said })
                }
            }
            Self::Process => run_script(&[], script).await,
        }
    }

    /// The rotation of the table a previous run left (it crashed or was
    /// killed), or `None` when there is no such table.
    pub async fn existing_rotation(&self, table: &str) -> Result<Option<Rotation>, NftError> {
        let legacy = table == Nftables::DEFAULT_TABLE;
        let listing = match self.list(FAMILY, table, Listing::Json).await? {
            Some(listing) => listing,
            None if legacy => match self.list(LEGACY_FAMILY, table, Listing::Json).await? {
                Some(listing) => listing,
                None => return Ok(None),
            },
            None => return Ok(None),
        };
        parse_rotation(&listing)
            .map(Some)
            .map_err(NftError::Listing)
    }

    /// Lobby's table as nft prints it, followed by its mirror tables when
    /// they exist; `None` when there is no `inet` table.
    pub async fn list_table(&self, table: &str) -> Result<Option<String>, NftError> {
        // Stateless: counter values are traffic, not a change of the table;
        // nor are the clients the packet path remembers for persistence.
        let Some(main) = self.list(FAMILY, table, Listing::Stateless).await? else {
            return Ok(None);
        };
        // What traffic adds to the limits' sets is not a change of the table.
        let mut text = limits::without_dynamic_elements(&String::from_utf8_lossy(&main));
        for family in mirror::FAMILIES {
            if let Some(listing) = self.list(family, table, Listing::Stateless).await? {
                text.push_str(&String::from_utf8_lossy(&listing));
            }
        }
        Ok(Some(text))
    }

    /// `list table FAMILY TABLE`; a missing table is `None`, every other
    /// failure an error that says which.
    async fn list(
        &self,
        family: &'static str,
        table: &str,
        listing: Listing,
    ) -> Result<Option<Vec<u8>>, NftError> {
        let (accepted, output, said) = match self {
            Self::Library(_) => {
                let listings = library::Libnftables::open().map_err(|e| NftError::List {
                    family,
                    table: table.to_owned(),
                    said: e.to_string(),
                })?;
                let outcome = listings
                    .run(
                        &format!("list table {family} {table}"),
                        listing.output_flags(),
                    )
                    .await;
                (outcome.accepted, outcome.output, outcome.said)
            }
            Self::Process => {
                let output = Command::new("nft")
                    .args([listing.flag(), "list", "table", family, table])
                    .stdin(Stdio::null())
                    .output()
                    .await
                    .map_err(NftError::Spawn)?;
                let said = String::from_utf8_lossy(&output.stderr).trim().to_owned();
                (output.status.success(), output.stdout, said)
            }
        };
        if accepted {
            return Ok(Some(output));
        }
        // nft's words for it: the kernel's ENOENT and EPERM as strerror.
        if said.contains("No such file or directory") {
            Ok(None)
        } else if said.contains("Operation not permitted") {
            Err(NftError::Permission(said))
        } else {
            Err(NftError::List {
                family,
                table: table.to_owned(),
                said,
            })
        }
    }
}

/// Runs `nft FLAGS -f -` with `script` on stdin; nft's refusal is an error
/// with what it said.
pub(crate) async fn run_script(flags: &[&str], script: &str) -> Result<(), NftError> {
    let output = crate::process::run_with_input(
        Command::new("nft").args(flags).args(["-f", "-"]),
        script.to_owned(),
    )
    .await
    .map_err(NftError::Spawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NftError::Rejected {
            said: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// The upstreams each target chain sends connections to, by chain name.
pub type Rotation = BTreeMap<String, BTreeSet<SocketAddr>>;

/// The packets of every named counter of Lobby's table, by name; none
/// without a table.
pub async fn named_counters(table: &str) -> Result<BTreeMap<String, u64>, NftError> {
    let table = table.to_owned();
    tokio::task::spawn_blocking(move || counters::read(&table))
        .await
        .expect("reading the counters does not panic")
        .map_err(NftError::Counters)
}

/// Whether nfgenmsg's `family` (an `NFPROTO_` number) is one Lobby owns
/// its table in.
pub fn owns_family(family: u8) -> bool {
    let name = match i32::from(family) {
        libc::NFPROTO_INET => "inet",
        libc::NFPROTO_IPV4 => "ip",
        libc::NFPROTO_IPV6 => "ip6",
        _ => return false,
    };
    OWNED_FAMILIES.contains(&name)
}

/// Reads, from `nft -j list table` output, the `addr . port` data of the
/// DNAT map in each chain's rules: a named map's elements, or the map
/// written into the rule (as Lobby wrote it before its maps were named).
pub fn parse_rotation(listing: &[u8]) -> Result<Rotation, serde_json::Error> {
    let listing: serde_json::Value = serde_json::from_slice(listing)?;
    let mut rotation = Rotation::new();
    let items = listing["nftables"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let maps: BTreeMap<&str, &Vec<serde_json::Value>> = items
        .iter()
        .filter_map(|item| {
            let map = item.get("map")?;
            Some((map["name"].as_str()?, map["elem"].as_array()?))
        })
        .collect();
    for rule in items.iter().filter_map(|item| item.get("rule")) {
        let (Some(chain), Some(exprs)) = (rule["chain"].as_str(), rule["expr"].as_array()) else {
            continue;
        };
        // An upstream's chain of a capped rotation, or a persistence
        // chain (its target's name, a dot, its backend), counts as its
        // target's.
        let owner = limits::owner(chain.split_once('.').map_or(chain, |(target, _)| target));
        let upstreams = rotation.entry(owner.to_owned()).or_default();
        let dnat = exprs.iter().map(|e| &e["dnat"]).filter(|d| d.is_object());
        for dnat in dnat {
            // A rotation's map of `addr . port`, or one upstream's.
            let one = [(&dnat["addr"], &dnat["port"])];
            let data = &dnat["addr"]["map"]["data"];
            let slots = match data.as_str() {
                Some(named) => named.strip_prefix('@').and_then(|n| maps.get(n).copied()),
                None => data["set"].as_array(),
            };
            let targets = slots
                .into_iter()
                .flatten()
                .map(|slot| (&slot[1]["concat"][0], &slot[1]["concat"][1]))
                .chain(one);
            for (addr, port) in targets {
                if let (Some(addr), Some(port)) =
                    (addr.as_str().and_then(|a| a.parse().ok()), port.as_u64())
                    && let Ok(port) = u16::try_from(port)
                {
                    upstreams.insert(SocketAddr::new(addr, port));
                }
            }
        }
    }
    Ok(rotation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Policy, health::ProbePorts, model::ProbeExemption};
    use std::sync::Arc;

    /// An IPv4 target, as on a host that does not forward IPv6.
    fn target(port: u16, upstreams: &[(u8, u16)]) -> DesiredTarget {
        DesiredTarget {
            protocol: Protocol::Tcp,
            port,
            ip: None,
            distribution: Distribution::RoundRobin,
            policy: Policy::default(),
            caps: BTreeMap::new(),
            families: vec![FamilyRotation {
                family: Family::Ipv4,
                slots: upstreams
                    .iter()
                    .map(|&(host, port)| SocketAddr::from(([198, 18, 1, host], port)))
                    .collect(),
            }],
            persistence: None,
        }
    }

    fn desired(targets: &[(&str, DesiredTarget)]) -> Desired {
        Desired {
            targets: targets
                .iter()
                .map(|(n, t)| (n.to_string(), Arc::new(t.clone())))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        }
    }

    /// The address a pool's statements SNAT to, by the last byte of the
    /// client's address and the port bucket, read back from their text.
    fn pool_picks(statements: &[String]) -> BTreeMap<(u8, usize), IpAddr> {
        let mut picks = BTreeMap::new();
        for statement in statements {
            let (clients, slots) = statement
                .split_once(" { ")
                .and_then(|(_, rest)| rest.split_once(" } snat "))
                .and_then(|(clients, rest)| Some((clients, rest.split_once(" map { ")?.1)))
                .unwrap_or_else(|| panic!("not a pool statement: {statement}"));
            for client in clients.split(", ") {
                let client: IpAddr = client.parse().unwrap();
                let last_byte = match client {
                    IpAddr::V4(a) => a.octets()[3],
                    IpAddr::V6(a) => a.octets()[15],
                };
                for slot in slots.trim_end_matches(" }").split(", ") {
                    let (port, address) = slot.split_once(" : ").unwrap();
                    let previous =
                        picks.insert((last_byte, port.parse().unwrap()), address.parse().unwrap());
                    assert!(previous.is_none(), "{client} in two buckets");
                }
            }
        }
        picks
    }

    #[test]
    fn a_pool_spreads_each_client_and_never_gives_two_client_buckets_one_tuple() {
        let addresses: Vec<IpAddr> = [
            "198.18.1.250",
            "2001:2:0:1::250",
            "198.18.1.251",
            "198.18.1.252",
            "2001:2:0:1::251",
            "198.18.1.253",
            "2001:2:0:1::252",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let pool = SourceNat::Addresses(addresses.clone());
        for family in Family::BOTH {
            let of_family: BTreeSet<IpAddr> = addresses
                .iter()
                .copied()
                .filter(|a| Family::of(*a) == family)
                .collect();
            let n = of_family.len();
            let statements = snat_to(&pool, family);
            assert_eq!(statements.len(), n, "one statement per client bucket");
            let picks = pool_picks(&statements);
            assert_eq!(picks.len(), 256 * n, "every last byte, every port bucket");
            for client in 0..=u8::MAX {
                let spread: BTreeSet<IpAddr> = (0..n).map(|port| picks[&(client, port)]).collect();
                assert_eq!(
                    spread, of_family,
                    "the client ending in {client} uses the pool"
                );
            }
            for port in 0..n {
                for (a, b) in (0..=u8::MAX).flat_map(|a| (0..a).map(move |b| (a, b))) {
                    let apart = usize::from(a) % n != usize::from(b) % n;
                    assert_eq!(
                        picks[&(a, port)] != picks[&(b, port)],
                        apart,
                        "clients ending in {a} and {b}, port bucket {port}"
                    );
                }
            }
        }
    }

    #[test]
    fn one_snat_address_or_a_range_is_one_statement_of_its_family() {
        let one = SourceNat::Addresses(vec!["198.18.1.250".parse().unwrap()]);
        assert_eq!(snat_to(&one, Family::Ipv4), ["snat ip to 198.18.1.250"]);
        assert!(snat_to(&one, Family::Ipv6).is_empty());
        let range = SourceNat::Range("2001:2::a".parse().unwrap(), "2001:2::d".parse().unwrap());
        assert_eq!(
            snat_to(&range, Family::Ipv6),
            ["snat ip6 to 2001:2::a-2001:2::d"]
        );
        assert!(snat_to(&range, Family::Ipv4).is_empty());
        assert!(snat_to(&SourceNat::None, Family::Ipv4).is_empty());
    }

    #[test]
    fn lingering_backends_stay_masqueraded_until_dropped() {
        let one = desired(&[("web", target(8081, &[(11, 9000)]))]);
        let mut lingering = one.clone();
        Arc::make_mut(lingering.targets.get_mut("web").unwrap()).families[0]
            .slots
            .clear();
        lingering
            .lingering
            .insert((SocketAddr::from(([198, 18, 1, 11], 9000)), Protocol::Tcp));
        let script = plan(Applied::Known(&one), &lingering).expect("a change");
        assert!(!script.contains("backends4"), "{script}");
        let mut gone = lingering.clone();
        gone.lingering.clear();
        let script = plan(Applied::Known(&lingering), &gone).expect("a change");
        assert_eq!(
            script,
            "delete element inet lobby backends4 { 198.18.1.11 . tcp . 9000 }\n"
        );
    }

    #[test]
    fn least_connections_marks_its_connections_and_brings_the_closing_chains() {
        let round_robin = desired(&[("web", target(8081, &[(11, 9000), (12, 9000)]))]);
        let mut least = round_robin.clone();
        Arc::make_mut(least.targets.get_mut("web").unwrap()).distribution =
            Distribution::LeastConnections;
        let script = plan(Applied::Known(&round_robin), &least).expect("a change");
        let expected = "\
flush chain inet lobby target-web
add rule inet lobby target-web meta nfproto ipv4 meta l4proto tcp tcp flags & (syn | ack) == syn ct mark set ct mark | 0x100000
add rule inet lobby target-web meta nfproto ipv4 meta l4proto tcp tcp flags & (syn | ack) == syn dnat ip to numgen inc mod 2 map @target-web_slots4
add rule inet lobby target-web meta nfproto ipv4 meta l4proto tcp drop
add chain inet lobby closing-prerouting { type filter hook prerouting priority mangle; policy accept; }
add rule inet lobby closing-prerouting tcp flags & (fin | rst) != 0 ct mark & 0x100000 == 0x100000 ct mark set ct mark & 0xffefffff
add chain inet lobby closing-output { type filter hook output priority mangle; policy accept; }
add rule inet lobby closing-output tcp flags & (fin | rst) != 0 ct mark & 0x100000 == 0x100000 ct mark set ct mark & 0xffefffff
";
        assert_eq!(script, expected);
        assert!(render(&least).contains("\tchain closing-output {\n"));
        assert!(!render(&round_robin).contains("closing"));
        let script = plan(Applied::Known(&least), &round_robin).expect("a change");
        assert!(
            script.ends_with(
                "delete chain inet lobby closing-prerouting\ndelete chain inet lobby closing-output\n"
            ),
            "{script}"
        );
        assert!(!script.contains("ct mark"), "{script}");
    }

    #[test]
    fn renders_dispatch_dnat_reset_and_masquerade() {
        let mut api = target(8082, &[]);
        api.ip = Some(IpNet {
            addr: [198, 18, 0, 0].into(),
            prefix_len: 24,
        });
        let state = desired(&[
            ("web", target(8081, &[(11, 9000), (12, 9000)])),
            ("api", api),
        ]);
        let state = Desired {
            probes: Some(ProbeExemption { ports: None }),
            ..state
        };
        let expected = "\
table inet lobby {
\tmap targets {
\t\ttype inet_proto . inet_service : verdict
\t\telements = { tcp . 8082 : jump target-api, tcp . 8081 : jump target-web }
\t}
\tset backends4 {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\telements = { 198.18.1.11 . tcp . 9000, 198.18.1.12 . tcp . 9000 }
\t}
\tset backends6 {
\t\ttype ipv6_addr . inet_proto . inet_service
\t}
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tfib daddr type local meta l4proto . th dport vmap @targets
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tct status dnat ip daddr . meta l4proto . th dport @backends4 masquerade
\t\tct status dnat ip6 daddr . meta l4proto . th dport @backends6 masquerade
\t}
\tchain probes-output {
\t\ttype filter hook output priority raw; policy accept;
\t\tmeta mark 0x10bb notrack
\t}
\tchain probes-prerouting {
\t\ttype filter hook prerouting priority raw; policy accept;
\t\tsocket mark 0x10bb notrack
\t}
\tchain target-api {
\t\tip daddr 198.18.0.0/24 meta l4proto tcp reject with tcp reset
\t}
\tmap target-web_slots4 {
\t\ttypeof numgen inc mod 1 : ip daddr . tcp dport
\t\telements = { 0 : 198.18.1.11 . 9000, 1 : 198.18.1.12 . 9000 }
\t}
\tchain target-web {
\t\tmeta nfproto ipv4 meta l4proto tcp tcp flags & (syn | ack) == syn dnat ip to numgen inc mod 2 map @target-web_slots4
\t\tmeta nfproto ipv4 meta l4proto tcp drop
\t}
}
";
        assert_eq!(render(&state), expected);
    }

    #[test]
    fn probe_chains_come_with_the_first_checked_upstream_and_go_with_the_last() {
        let unchecked = desired(&[("web", target(8081, &[(11, 9000)]))]);
        assert!(!render(&unchecked).contains("probes-"));
        let checked = Desired {
            probes: Some(ProbeExemption {
                ports: Some(ProbePorts {
                    first: 56904,
                    last: 60999,
                }),
            }),
            ..unchecked.clone()
        };
        assert_eq!(
            plan(Applied::Known(&unchecked), &checked).unwrap(),
            "\
add chain inet lobby probes-output { type filter hook output priority raw; policy accept; }
add rule inet lobby probes-output meta mark 0x10bb notrack
add chain inet lobby probes-prerouting { type filter hook prerouting priority raw; policy accept; }
add rule inet lobby probes-prerouting tcp dport != 56904-60999 accept
add rule inet lobby probes-prerouting socket mark 0x10bb notrack
"
        );
        assert_eq!(
            plan(Applied::Known(&checked), &unchecked).unwrap(),
            "delete chain inet lobby probes-output\ndelete chain inet lobby probes-prerouting\n"
        );
    }

    #[test]
    fn each_family_has_its_rotation_and_udp_is_refused_with_icmp() {
        let dns = DesiredTarget {
            protocol: Protocol::Udp,
            port: 53,
            ip: None,
            distribution: Distribution::RoundRobin,
            policy: Policy::default(),
            caps: BTreeMap::new(),
            families: vec![
                FamilyRotation {
                    family: Family::Ipv4,
                    slots: vec![],
                },
                FamilyRotation {
                    family: Family::Ipv6,
                    slots: vec![
                        "[2001:db8::11]:53".parse().unwrap(),
                        "[2001:db8::12]:53".parse().unwrap(),
                    ],
                },
            ],
            persistence: None,
        };
        let rules = target_rules("dns", &dns);
        assert_eq!(
            rules,
            [
                "meta nfproto ipv4 meta l4proto udp reject",
                "meta nfproto ipv6 meta l4proto udp dnat ip6 to numgen inc mod 2 map @target-dns_slots6",
                "meta nfproto ipv6 meta l4proto udp drop",
            ]
        );
        let text = render(&desired(&[("dns", dns)]));
        assert!(
            text.contains("elements = { 2001:db8::11 . udp . 53, 2001:db8::12 . udp . 53 }"),
            "{text}"
        );
    }

    #[test]
    fn map_values_are_written_as_display_writes_them() {
        for upstream in [
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.0.100.9:8080",
            "[2001:db8::1]:443",
        ] {
            let upstream: SocketAddr = upstream.parse().unwrap();
            let mut written = String::new();
            dnat_value(&mut written, &upstream).unwrap();
            assert_eq!(written, format!("{} . {}", upstream.ip(), upstream.port()));
        }
    }

    #[test]
    fn weights_become_slots_and_runs_become_ranges() {
        let a: SocketAddr = "198.18.1.11:80".parse().unwrap();
        let b: SocketAddr = "198.18.1.12:80".parse().unwrap();
        assert_eq!(
            slot_elements(&[a, a, a, b], dnat_value),
            "0-2 : 198.18.1.11 . 80, 3 : 198.18.1.12 . 80"
        );
        let rotation = FamilyRotation {
            family: Family::Ipv6,
            slots: vec![a, b],
        };
        assert_eq!(
            slot_key(Distribution::IpSrcHash, &rotation, HASH_SEED),
            "jhash ip6 saddr mod 2 seed 0x4c4f4242"
        );
        assert_eq!(
            slot_key(Distribution::Random, &rotation, HASH_SEED),
            "numgen random mod 2"
        );
    }

    #[test]
    fn empty_state_renders_a_table_without_elements() {
        let text = render(&Desired::default());
        assert!(!text.contains("elements"), "{text}");
        assert!(!text.contains("chain target-"), "{text}");
    }

    #[test]
    fn an_unknown_table_is_replaced_and_a_missing_one_created() {
        let state = desired(&[("web", target(8081, &[(11, 9000)]))]);
        let script = plan(Applied::Unknown, &state).expect("a first plan");
        assert!(
            script.starts_with("add table ip lobby\ndelete table ip lobby\nadd table ip6 lobby\ndelete table ip6 lobby\nadd table inet lobby\ndelete table inet lobby\ntable inet lobby {"),
            "{script}"
        );
        assert_eq!(plan(Applied::Nothing, &state), Some(render(&state)));
    }

    #[test]
    fn equal_states_need_no_transaction() {
        let state = desired(&[("web", target(8081, &[(11, 9000)]))]);
        assert_eq!(plan(Applied::Known(&state), &state.clone()), None);
    }

    #[test]
    fn an_upstream_going_down_rewrites_only_its_target_chain() {
        let before = desired(&[
            ("web", target(8081, &[(11, 9000), (12, 9000)])),
            ("api", target(8082, &[(21, 80)])),
        ]);
        let after = desired(&[
            ("web", target(8081, &[(12, 9000)])),
            ("api", target(8082, &[(21, 80)])),
        ]);
        let script = plan(Applied::Known(&before), &after).expect("a change");
        assert_eq!(
            script,
            "delete element inet lobby backends4 { 198.18.1.11 . tcp . 9000 }\n\
             flush chain inet lobby target-web\n\
             flush map inet lobby target-web_slots4\n\
             add element inet lobby target-web_slots4 { 0 : 198.18.1.12 . 9000 }\n\
             add rule inet lobby target-web meta nfproto ipv4 meta l4proto tcp tcp flags & (syn | ack) == syn dnat ip to numgen inc mod 1 map @target-web_slots4\n\
             add rule inet lobby target-web meta nfproto ipv4 meta l4proto tcp drop\n"
        );
    }

    #[test]
    fn targets_added_removed_and_moved() {
        let before = desired(&[
            ("web", target(8081, &[(11, 9000)])),
            ("old", target(8083, &[(31, 80)])),
        ]);
        let after = desired(&[
            ("web", target(8090, &[(11, 9000)])),
            ("new", target(8083, &[])),
        ]);
        let script = plan(Applied::Known(&before), &after).expect("a change");
        assert_eq!(
            script,
            "delete element inet lobby targets { tcp . 8083 }\n\
             delete chain inet lobby target-old\n\
             delete map inet lobby target-old_slots4\n\
             delete element inet lobby targets { tcp . 8081 }\n\
             delete element inet lobby backends4 { 198.18.1.31 . tcp . 80 }\n\
             add chain inet lobby target-new\n\
             add rule inet lobby target-new meta nfproto ipv4 meta l4proto tcp reject with tcp reset\n\
             add element inet lobby targets { tcp . 8083 : jump target-new }\n\
             add element inet lobby targets { tcp . 8090 : jump target-web }\n"
        );
    }

    #[test]
    fn the_rotation_of_a_listed_table_is_read_per_chain() {
        let listing = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"chain": {"family": "ip", "table": "lobby", "name": "target-web"}},
          {"rule": {"family": "ip", "table": "lobby", "chain": "target-web", "handle": 4, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
            {"dnat": {"family": "ip", "addr": {"map": {"key": {"numgen": {"mode": "inc", "mod": 2, "offset": 0}},
              "data": {"set": [[0, {"concat": ["198.18.1.11", 9000]}], [1, {"concat": ["198.18.1.12", 9000]}]]}}}}}]}},
          {"rule": {"family": "ip", "table": "lobby", "chain": "target-api", "handle": 5, "expr": [{"reject": {"type": "tcp reset"}}]}},
          {"rule": {"family": "inet", "table": "lobby", "chain": "target-sticky.198.18.2.11.80.tcp.3s", "handle": 6, "expr": [
            {"set": {"op": "update", "elem": {"payload": {"protocol": "ip", "field": "saddr"}}, "set": "@target-sticky.198.18.2.11.80.tcp.3s"}},
            {"dnat": {"family": "ip", "addr": "198.18.2.11", "port": 80}}]}}]}"#;
        let rotation = parse_rotation(listing).unwrap();
        assert_eq!(
            upstreams_of(&rotation, "target-web"),
            ["198.18.1.11:9000", "198.18.1.12:9000"]
        );
        assert!(rotation["target-api"].is_empty());
        // A persistence chain's backend is its target's.
        assert_eq!(upstreams_of(&rotation, "target-sticky"), ["198.18.2.11:80"]);
        assert!(parse_rotation(b"not json").is_err());
    }

    fn upstreams_of(rotation: &Rotation, chain: &str) -> Vec<String> {
        rotation[chain].iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_named_maps_elements_are_the_rotation_of_the_chain_that_names_it() {
        // As `nft -j list table` printed it: a range for a weighted run.
        let listing = br#"{"nftables": [
          {"map": {"family": "inet", "name": "target-web_slots4", "table": "lobby", "type": "integer",
            "handle": 2, "map": "ipv4_addr . inet_service", "flags": ["interval"], "elem": [
            [{"range": [0, 1]}, {"concat": ["198.18.1.11", 9000]}], [2, {"concat": ["198.18.1.12", 9000]}]]}},
          {"rule": {"family": "inet", "table": "lobby", "chain": "target-web", "handle": 4, "expr": [
            {"dnat": {"family": "ip", "addr": {"map": {"key": {"numgen": {"mode": "inc", "mod": 3, "offset": 0}},
              "data": "@target-web_slots4"}}}}]}},
          {"rule": {"family": "inet", "table": "lobby", "chain": "target-gone", "handle": 5, "expr": [
            {"dnat": {"family": "ip", "addr": {"map": {"key": {"numgen": {"mode": "inc", "mod": 1, "offset": 0}},
              "data": "@target-gone_slots4"}}}}]}}]}"#;
        let rotation = parse_rotation(listing).unwrap();
        assert_eq!(
            upstreams_of(&rotation, "target-web"),
            ["198.18.1.11:9000", "198.18.1.12:9000"]
        );
        // A map the listing lacks balances nothing known.
        assert!(rotation["target-gone"].is_empty());
    }

    #[test]
    fn only_a_whole_table_is_built_on_a_context_of_its_own() {
        let before = desired(&[("web", target(8081, &[(11, 9000), (12, 9000)]))]);
        let after = desired(&[("web", target(8081, &[(11, 9000)]))]);
        assert!(builds_the_table(&plan(Applied::Nothing, &after).unwrap()));
        assert!(builds_the_table(&plan(Applied::Unknown, &after).unwrap()));
        assert!(!builds_the_table(
            &plan(Applied::Known(&before), &after).unwrap()
        ));
        assert!(!builds_the_table(&teardown("lobby")));
    }

    #[test]
    fn a_swap_of_upstreams_refills_the_map_and_leaves_the_chain() {
        let before = desired(&[("web", target(8081, &[(11, 9000), (12, 9000)]))]);
        let after = desired(&[("web", target(8081, &[(11, 9000), (13, 9000)]))]);
        let script = plan(Applied::Known(&before), &after).expect("a change");
        assert_eq!(
            script,
            "delete element inet lobby backends4 { 198.18.1.12 . tcp . 9000 }\n\
             add element inet lobby backends4 { 198.18.1.13 . tcp . 9000 }\n\
             flush map inet lobby target-web_slots4\n\
             add element inet lobby target-web_slots4 { 0 : 198.18.1.11 . 9000, 1 : 198.18.1.13 . 9000 }\n"
        );
    }

    #[test]
    fn a_weighted_run_makes_the_map_again_as_an_interval_one_with_its_chain() {
        let before = desired(&[("web", target(8081, &[(11, 9000), (12, 9000)]))]);
        let after = desired(&[("web", target(8081, &[(11, 9000), (11, 9000), (12, 9000)]))]);
        let script = plan(Applied::Known(&before), &after).expect("a change");
        assert_eq!(
            script,
            "flush chain inet lobby target-web\n\
             delete map inet lobby target-web_slots4\n\
             add map inet lobby target-web_slots4 { typeof numgen inc mod 1 : ip daddr . tcp dport; flags interval; elements = { 0-1 : 198.18.1.11 . 9000, 2 : 198.18.1.12 . 9000 } }\n\
             add rule inet lobby target-web meta nfproto ipv4 meta l4proto tcp tcp flags & (syn | ack) == syn dnat ip to numgen inc mod 3 map @target-web_slots4\n\
             add rule inet lobby target-web meta nfproto ipv4 meta l4proto tcp drop\n"
        );
        // The same slot count without the run: the declaration changes too.
        let back = desired(&[("web", target(8081, &[(11, 9000), (12, 9000), (11, 9000)]))]);
        let script = plan(Applied::Known(&after), &back).expect("a change");
        assert!(
            script.starts_with(
                "flush chain inet lobby target-web\n\
                 delete map inet lobby target-web_slots4\n\
                 add map inet lobby target-web_slots4 { typeof numgen inc mod 1 : ip daddr . tcp dport; elements = "
            ),
            "{script}"
        );
    }

    #[test]
    fn the_upstream_chains_of_a_capped_rotation_count_as_their_target() {
        let listing = br#"{"nftables": [
          {"rule": {"family": "inet", "table": "lobby", "chain": "target-web_u0", "handle": 3, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
            {"dnat": {"family": "ip", "addr": "198.18.1.11", "port": 9000}}]}},
          {"rule": {"family": "inet", "table": "lobby", "chain": "target-web_u2", "handle": 4, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}},
            {"dnat": {"family": "ip6", "addr": "2001:2:0:1::13", "port": 9000}}]}}]}"#;
        let rotation = parse_rotation(listing).unwrap();
        let web: Vec<String> = rotation["target-web"]
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(web, ["198.18.1.11:9000", "[2001:2:0:1::13]:9000"]);
        assert_eq!(rotation.len(), 1);
    }

    #[test]
    fn chain_names_keep_distinct_targets_distinct() {
        assert_eq!(chain_name("web-1"), "target-web-1");
        assert_eq!(chain_name("web_1"), "target-web_5f1");
        assert_eq!(chain_name("web 1"), "target-web_201");
        assert_ne!(chain_name("a_2e"), chain_name("a."));
    }
}
