//! A target's block list as rules of its chain (SPEC "Traffic policy":
//! `block`).
//!
//! nft keeps a set of prefixes as an interval tree (rbtree: a set of one
//! field is never a pipapo set), and a lookup walks it from the root: at
//! 100,000 prefixes about 35 nodes, each a cache miss, on every new
//! connection (0.971x of the connection rate without the list,
//! interleaved, n=10). Block lists are mostly addresses and a few common
//! prefix lengths, so the prefixes of a length that many share get a rule
//! of their own: the source address masked to that length, looked up in a
//! hash set. The others stay in one interval set. A source that any rule
//! matches is blocked, so the split changes nothing but the lookups.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::address_keyword;
use crate::config::{Family, IpNet};

/// How many prefixes of one length earn that length a hash set: below, the
/// interval tree is shallow and stays in cache.
const HASHED_FROM: usize = 256;
/// At most this many lengths are hashed, the most common first: each is
/// a lookup of every new connection.
const HASHED_LENGTHS: usize = 4;

/// The rules that drop the sources of `family` that `block` lists into the
/// named counter `counter`, hashed lengths first.
pub(super) fn rules(block: &[IpNet], family: Family, counter: &str) -> Vec<String> {
    let mut by_length: BTreeMap<u8, BTreeSet<IpAddr>> = BTreeMap::new();
    for net in block.iter().filter(|n| n.family() == family) {
        by_length
            .entry(net.prefix_len)
            .or_default()
            .insert(net.addr);
    }
    let mut common: Vec<(u8, usize)> = by_length
        .iter()
        .filter(|(_, addrs)| addrs.len() >= HASHED_FROM)
        .map(|(length, addrs)| (*length, addrs.len()))
        .collect();
    // The most common first; of equal counts, the longest.
    common.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    common.truncate(HASHED_LENGTHS);
    let keyword = address_keyword(family);
    let drop = format!("counter name \"{counter}\" drop");
    let mut rules = Vec::new();
    for (length, _) in common {
        let addrs = by_length.remove(&length).expect("listed above");
        let elements = join(addrs.iter().map(ToString::to_string));
        rules.push(match mask(family, length) {
            None => format!("{keyword} saddr {{ {elements} }} {drop}"),
            Some(mask) => format!("{keyword} saddr & {mask} {{ {elements} }} {drop}"),
        });
    }
    let rest = by_length.into_iter().flat_map(|(prefix_len, addrs)| {
        addrs
            .into_iter()
            .map(move |addr| IpNet { addr, prefix_len }.to_string())
    });
    let rest = join(rest);
    if !rest.is_empty() {
        rules.push(format!("{keyword} saddr {{ {rest} }} {drop}"));
    }
    rules
}

fn join(elements: impl Iterator<Item = String>) -> String {
    elements.collect::<Vec<_>>().join(", ")
}

/// The netmask of `length` in `family`, `None` for a whole address (no
/// mask to apply).
fn mask(family: Family, length: u8) -> Option<String> {
    match family {
        Family::Ipv4 if length < 32 => Some(
            Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(length)).unwrap_or(0)).to_string(),
        ),
        Family::Ipv6 if length < 128 => Some(
            Ipv6Addr::from(u128::MAX.checked_shl(128 - u32::from(length)).unwrap_or(0)).to_string(),
        ),
        Family::Ipv4 | Family::Ipv6 => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        let (addr, length) = text.split_once('/').unwrap();
        IpNet {
            addr: addr.parse().unwrap(),
            prefix_len: length.parse().unwrap(),
        }
    }

    /// `count` consecutive networks of `length` from 10.0.0.0 on.
    fn spaced(count: u32, length: u8) -> Vec<IpNet> {
        (1..=count)
            .map(|i| IpNet {
                addr: Ipv4Addr::from(0x0a00_0000 | (i << (32 - length))).into(),
                prefix_len: length,
            })
            .collect()
    }

    #[test]
    fn a_short_list_is_one_interval_set() {
        let block = [net("198.18.0.128/25"), net("198.18.1.1/32")];
        assert_eq!(
            rules(&block, Family::Ipv4, "c"),
            ["ip saddr { 198.18.0.128/25, 198.18.1.1/32 } counter name \"c\" drop"]
        );
    }

    #[test]
    fn common_lengths_are_hashed_and_the_rest_stay_intervals() {
        let mut block = spaced(300, 32);
        block.extend(spaced(HASHED_FROM as u32, 24));
        block.push(net("172.16.0.0/12"));
        block.push(net("2001:db8::/32"));
        let rules = rules(&block, Family::Ipv4, "c");
        assert_eq!(rules.len(), 3, "{rules:?}");
        assert!(rules[0].starts_with("ip saddr { 10.0.0.1, 10.0.0.2,"));
        assert!(rules[1].starts_with("ip saddr & 255.255.255.0 { 10.0.1.0, "));
        assert_eq!(
            rules[2],
            "ip saddr { 172.16.0.0/12 } counter name \"c\" drop"
        );
        // Every prefix in exactly one rule.
        let listed: usize = rules.iter().map(|r| r.matches(", ").count() + 1).sum();
        assert_eq!(listed, 300 + HASHED_FROM + 1);
    }

    #[test]
    fn at_most_four_lengths_are_hashed_the_most_common_first() {
        let mut block = Vec::new();
        for (length, count) in [(16, 300), (20, 400), (24, 500), (28, 600), (30, 700)] {
            block.extend(spaced(count, length));
        }
        let rules = rules(&block, Family::Ipv4, "c");
        let masks: Vec<&str> = rules
            .iter()
            .map(|r| r.split(" {").next().unwrap())
            .collect();
        assert_eq!(
            masks,
            [
                "ip saddr & 255.255.255.252",
                "ip saddr & 255.255.255.240",
                "ip saddr & 255.255.255.0",
                "ip saddr & 255.255.240.0",
                "ip saddr",
            ]
        );
        assert!(rules[4].contains("/16"), "{}", rules[4]);
    }

    #[test]
    fn ipv6_lengths_are_masked_in_ipv6() {
        let block: Vec<IpNet> = (1..=HASHED_FROM as u128)
            .map(|i| IpNet {
                addr: IpAddr::from(Ipv6Addr::from(0x2001_0db8_u128 << 96 | i << 64)),
                prefix_len: 64,
            })
            .collect();
        let rules = rules(&block, Family::Ipv6, "c");
        assert_eq!(rules.len(), 1);
        assert!(
            rules[0].starts_with("ip6 saddr & ffff:ffff:ffff:ffff:: { 2001:db8:0:1::, "),
            "{}",
            rules[0]
        );
    }
}
