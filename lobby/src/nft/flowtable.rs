//! The flowtable fast path in Lobby's table (SPEC "Packet acceleration"):
//! a flowtable over the interfaces that carry Lobby's traffic and a
//! forward-hook chain that hands it the connections Lobby balanced, and
//! nothing else: `ct status dnat` and an upstream of the backends sets
//! (the masquerade rule's own match), in the original direction (toward the
//! upstream) and the reply one (from it), so that a UDP flow takes the fast
//! path from its first reply. The kernel offloads TCP once established
//! and UDP once confirmed; SCTP and others stay on the slow path
//! (nft_flow_offload ignores them), balanced and counted as before.
//!
//! The counters stay exact: the tc programs run at ingress before the
//! netdev hooks (the flowtable's is one) and at egress after the
//! flowtable's transmit, so they see every packet either path carries.
use std::fmt::Write as _;

use super::{
    FAMILY, FixedChain, NftError, add_fixed, address_keyword, backends_set, delete_fixed,
    render_fixed,
};
use crate::{accel::Flowtable, config::Family};

/// The flowtable's name in Lobby's table.
pub const FLOWTABLE: &str = "fastpath";
/// The forward-hook chain that adds flows to it.
const CHAIN: &str = "forward";

/// The flowtable's body, one statement a line.
fn body(flowtable: &Flowtable) -> Vec<String> {
    // Quoted: interface names may hold `.` or `-`, which nft would parse.
    let devices: Vec<String> = flowtable
        .devices
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect();
    let mut lines = vec![
        "hook ingress priority filter".to_owned(),
        format!("devices = {{ {} }}", devices.join(", ")),
    ];
    if flowtable.offload {
        lines.push("flags offload".to_owned());
    }
    lines
}

/// The forward chain that adds Lobby's connections to the flowtable.
fn chain() -> [FixedChain; 1] {
    let mut rules = Vec::new();
    for family in Family::BOTH {
        let (set, _) = backends_set(family);
        let ip = address_keyword(family);
        rules.push(format!(
            "ct status dnat ct direction original {ip} daddr . meta l4proto . th dport @{set} flow add @{FLOWTABLE}"
        ));
        rules.push(format!(
            "ct status dnat ct direction reply {ip} saddr . meta l4proto . th sport @{set} flow add @{FLOWTABLE}"
        ));
    }
    [FixedChain {
        name: CHAIN,
        spec: "type filter hook forward priority filter; policy accept;".to_owned(),
        rules,
    }]
}

/// Writes the flowtable and its chain inside `table ... { }`, if any.
pub(super) fn render(out: &mut String, flowtable: Option<&Flowtable>) {
    let Some(flowtable) = flowtable else {
        return;
    };
    writeln!(out, "\tflowtable {FLOWTABLE} {{").unwrap();
    for line in body(flowtable) {
        writeln!(out, "\t\t{line}").unwrap();
    }
    writeln!(out, "\t}}").unwrap();
    render_fixed(out, &chain());
}

/// Writes the commands that turn `old` into `new`. Any change (an
/// interface added or gone, offload on or off) replaces both in the same
/// transaction: the kernel drops the devices of a deleted flowtable and
/// hooks the new one's, flows in flight go back to the slow path for a
/// packet and are offloaded again. Naming only current interfaces, it never
/// fails on one that vanished (the kernel removes those by itself).
pub(super) fn plan(
    out: &mut String,
    table: &str,
    old: Option<&Flowtable>,
    new: Option<&Flowtable>,
) {
    if old == new {
        return;
    }
    if old.is_some() {
        delete_fixed(out, table, &chain());
        writeln!(out, "delete flowtable {FAMILY} {table} {FLOWTABLE}").unwrap();
    }
    if let Some(new) = new {
        writeln!(
            out,
            "add flowtable {FAMILY} {table} {FLOWTABLE} {{ {}; }}",
            body(new).join("; ")
        )
        .unwrap();
        add_fixed(out, table, &chain());
    }
}

/// A scratch table that needs what acceleration needs: the flowtable type
/// (nf_flow_table_inet) and the `flow add` expression (nft_flow_offload).
fn probe(devices: &str, flags: &str) -> String {
    format!(
        "table inet lobby-probe {{\n\
         \tflowtable probe {{ hook ingress priority filter; {devices}{flags}}}\n\
         \tchain forward {{ type filter hook forward priority filter; meta l4proto tcp flow add @probe; }}\n\
         }}\n"
    )
}

/// Whether the kernel has flowtables, as the kernel itself answers: `nft
/// --check` sends the transaction without its batch end, so the kernel
/// evaluates every command (loading modules on demand, as a real apply
/// would) and then rolls back; nothing is left behind. Checking
/// /proc/modules instead would miss built-in support and modules that load
/// on demand. Needs CAP_NET_ADMIN.
pub async fn supported() -> Result<(), NftError> {
    check(&probe("", "")).await
}

/// Whether `device` can offload flows to hardware: the same check with
/// `flags offload`, which the kernel refuses (EOPNOTSUPP) for a driver
/// without flow-block support.
pub async fn offload_supported(device: &str) -> Result<(), NftError> {
    check(&probe(
        &format!("devices = {{ \"{device}\" }}; "),
        "flags offload; ",
    ))
    .await
}

async fn check(script: &str) -> Result<(), NftError> {
    super::run_script(&["--check"], script).await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn table(devices: &[&str], offload: bool) -> Flowtable {
        Flowtable {
            devices: devices
                .iter()
                .map(|d| d.to_string())
                .collect::<BTreeSet<_>>(),
            offload,
        }
    }

    #[test]
    fn a_changed_device_list_replaces_flowtable_and_chain() {
        let old = table(&["eth0", "up1"], false);
        let new = table(&["eth0", "up1", "up2"], false);
        let mut out = String::new();
        plan(&mut out, "lobby", Some(&old), Some(&old));
        assert_eq!(out, "");
        plan(&mut out, "lobby", Some(&old), Some(&new));
        assert_eq!(
            out,
            "delete chain inet lobby forward\n\
             delete flowtable inet lobby fastpath\n\
             add flowtable inet lobby fastpath { hook ingress priority filter; devices = { \"eth0\", \"up1\", \"up2\" }; }\n\
             add chain inet lobby forward { type filter hook forward priority filter; policy accept; }\n\
             add rule inet lobby forward ct status dnat ct direction original ip daddr . meta l4proto . th dport @backends4 flow add @fastpath\n\
             add rule inet lobby forward ct status dnat ct direction reply ip saddr . meta l4proto . th sport @backends4 flow add @fastpath\n\
             add rule inet lobby forward ct status dnat ct direction original ip6 daddr . meta l4proto . th dport @backends6 flow add @fastpath\n\
             add rule inet lobby forward ct status dnat ct direction reply ip6 saddr . meta l4proto . th sport @backends6 flow add @fastpath\n"
        );
        let mut off = String::new();
        plan(&mut off, "lobby", Some(&new), None);
        assert_eq!(
            off,
            "delete chain inet lobby forward\ndelete flowtable inet lobby fastpath\n"
        );
    }

    #[test]
    fn offload_is_a_flag_of_the_flowtable() {
        let mut out = String::new();
        render(&mut out, Some(&table(&["eth0"], true)));
        assert!(out.starts_with(
            "\tflowtable fastpath {\n\t\thook ingress priority filter\n\t\tdevices = { \"eth0\" }\n\t\tflags offload\n\t}\n"
        ), "{out}");
        let mut none = String::new();
        render(&mut none, None);
        assert_eq!(none, "");
    }
}
