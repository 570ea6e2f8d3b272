//! Reading one YAML value as one kind of configuration value. Each kind says
//! what it expects, so every message reads `expected X, found Y`.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use http::uri::PathAndQuery;

use super::{
    Host, IpNet, Nftables, SourceNat, StatusRange, unusable_upstream, yaml::Node, yaml::Value,
};

/// The port a resolver address without one is asked on.
const DNS_PORT: u16 = 53;
/// Longest name: 63 characters fit every identifier the other modules build
/// from it (nftables chain names, metric labels) with room to spare.
const MAX_NAME_LEN: usize = 63;

pub(crate) trait Want {
    type Value;
    /// What a valid value looks like, e.g. "an integer in 1..=65535".
    fn expected(&self) -> String;
    /// The value, or what was found instead (with why it is wrong when that
    /// is not obvious).
    fn read(&self, node: &Node) -> Result<Self::Value, String>;
}

/// How a value that is not the wanted one is named in a message.
pub(crate) fn describe(node: &Node) -> String {
    const SHOWN: usize = 40;
    match node.value() {
        Value::Null => "nothing".to_owned(),
        Value::Sequence(_) => "a list".to_owned(),
        Value::Mapping(_) => "a mapping".to_owned(),
        Value::Scalar { text, quoted } => {
            let shown: String = if text.chars().count() > SHOWN {
                text.chars().take(SHOWN).chain("...".chars()).collect()
            } else {
                text.clone()
            };
            if *quoted {
                format!("the string {shown:?}")
            } else {
                format!("`{}`", shown.escape_debug())
            }
        }
    }
}

/// The text of a scalar, quoted or not.
fn text(node: &Node) -> Result<&str, String> {
    match node.value() {
        Value::Scalar { text, .. } => Ok(text),
        _ => Err(describe(node)),
    }
}

/// The text of an unquoted scalar: numbers and booleans are never quoted.
fn plain(node: &Node) -> Result<&str, String> {
    match node.value() {
        Value::Scalar {
            text,
            quoted: false,
        } => Ok(text),
        _ => Err(describe(node)),
    }
}

/// A whole number within bounds, written in decimal.
pub(crate) struct Integer {
    pub what: &'static str,
    pub min: u64,
    pub max: u64,
}

pub(crate) const PORT: Integer = Integer {
    what: "a port",
    min: 1,
    max: 65535,
};

impl Want for Integer {
    type Value = u64;
    fn expected(&self) -> String {
        format!("{} in {}..={}", self.what, self.min, self.max)
    }
    fn read(&self, node: &Node) -> Result<u64, String> {
        let text = plain(node)?;
        text.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| text.parse::<u64>().ok())
            .flatten()
            .filter(|n| (self.min..=self.max).contains(n))
            .ok_or_else(|| describe(node))
    }
}

/// One of a fixed set of words.
pub(crate) struct Keyword<T: 'static> {
    pub choices: &'static [(&'static str, T)],
}

impl<T: Copy> Want for Keyword<T> {
    type Value = T;
    fn expected(&self) -> String {
        let words: Vec<String> = self.choices.iter().map(|(w, _)| format!("`{w}`")).collect();
        match words.as_slice() {
            [one] => one.clone(),
            _ => format!("one of {}", words.join(", ")),
        }
    }
    fn read(&self, node: &Node) -> Result<T, String> {
        let text = text(node)?;
        self.choices
            .iter()
            .find(|(word, _)| *word == text)
            .map(|(_, value)| *value)
            .ok_or_else(|| describe(node))
    }
}

pub(crate) struct Boolean;

impl Want for Boolean {
    type Value = bool;
    fn expected(&self) -> String {
        "`true` or `false`".to_owned()
    }
    fn read(&self, node: &Node) -> Result<bool, String> {
        match plain(node)? {
            "true" | "True" | "TRUE" => Ok(true),
            "false" | "False" | "FALSE" => Ok(false),
            _ => Err(describe(node)),
        }
    }
}

/// A name an operator greps for in logs (`web/web1`) and other modules build
/// identifiers from.
pub(crate) struct Name;

impl Want for Name {
    type Value = String;
    fn expected(&self) -> String {
        format!("a name of 1 to {MAX_NAME_LEN} letters, digits, `-`, `_` or `.`")
    }
    fn read(&self, node: &Node) -> Result<String, String> {
        let name = text(node)?;
        let valid = (1..=MAX_NAME_LEN).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if valid {
            Ok(name.to_owned())
        } else {
            Err(describe(node))
        }
    }
}

/// An upstream host: an IPv4 or IPv6 address or a host name.
pub(crate) struct HostName;

impl Want for HostName {
    type Value = Host;
    fn expected(&self) -> String {
        "an IPv4 or IPv6 address or a host name".to_owned()
    }
    fn read(&self, node: &Node) -> Result<Host, String> {
        parse_host(text(node)?).map_err(|why| format!("{} ({why})", describe(node)))
    }
}

fn parse_host(host: &str) -> Result<Host, String> {
    if host.is_empty() {
        return Err("empty".to_owned());
    }
    if host.contains(':') {
        let ip = Ipv6Addr::from_str(host).map_err(|_| "not a valid IPv6 address".to_owned())?;
        return usable_host(ip.into());
    }
    // All digits and dots is meant as an address, never a name: a
    // top-level label is never all digits.
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let ip = Ipv4Addr::from_str(host).map_err(|_| "not a valid IPv4 address".to_owned())?;
        return usable_host(ip.into());
    }
    parse_fqdn(host).map(Host::Fqdn)
}

/// `ip` as an upstream, unless no connection can ever reach it there.
fn usable_host(ip: IpAddr) -> Result<Host, String> {
    match unusable_upstream(ip) {
        Some(why) => Err(why.to_owned()),
        None => Ok(Host::Ip(ip)),
    }
}

/// A host name per RFC 1123, lower-cased, without the trailing dot.
fn parse_fqdn(host: &str) -> Result<String, String> {
    const MAX_LEN: usize = 253;
    const MAX_LABEL_LEN: usize = 63;
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if name.len() > MAX_LEN {
        return Err(format!("a host name is at most {MAX_LEN} characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("empty label".to_owned());
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!("a label is at most {MAX_LABEL_LEN} characters"));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!("{bad:?} is not allowed in a host name"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with `-`"));
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("the last label is all digits".to_owned());
    }
    Ok(name)
}

/// Text of a bounded length in bytes, quoted or not: `123` is the text
/// "123".
pub(crate) struct Text {
    pub min_len: usize,
    pub max_len: usize,
}

impl Want for Text {
    type Value = String;
    fn expected(&self) -> String {
        match self.min_len {
            0 => format!("text of at most {} bytes", self.max_len),
            _ => format!("text of {} to {} bytes", self.min_len, self.max_len),
        }
    }
    fn read(&self, node: &Node) -> Result<String, String> {
        let text = text(node)?;
        if (self.min_len..=self.max_len).contains(&text.len()) {
            Ok(text.to_owned())
        } else {
            Err(format!("{} ({} bytes)", describe(node), text.len()))
        }
    }
}

/// The path (and query) of an HTTP request, sent as written.
pub(crate) struct UrlPath;

impl Want for UrlPath {
    type Value = PathAndQuery;
    fn expected(&self) -> String {
        "a path starting with `/` such as /health".to_owned()
    }
    fn read(&self, node: &Node) -> Result<PathAndQuery, String> {
        let text = text(node)?;
        if !text.starts_with('/') {
            return Err(format!("{} (no leading `/`)", describe(node)));
        }
        // Whatever the parser would drop or change (a fragment) is not what
        // the operator wrote, so it is refused too.
        PathAndQuery::from_str(text)
            .ok()
            .filter(|path| path.as_str() == text)
            .ok_or_else(|| format!("{} (not a valid URL path)", describe(node)))
    }
}

/// A host name or an IP address as an HTTP Host and TLS server name; an IP
/// address in its canonical form.
pub(crate) struct HttpHost;

impl Want for HttpHost {
    type Value = String;
    fn expected(&self) -> String {
        "a host name or an IP address".to_owned()
    }
    fn read(&self, node: &Node) -> Result<String, String> {
        let text = text(node)?;
        match IpAddr::from_str(text) {
            Ok(ip) => Ok(ip.to_string()),
            Err(_) => parse_fqdn(text).map_err(|why| format!("{} ({why})", describe(node))),
        }
    }
}

/// An HTTP status code, or a range of them written `FIRST-LAST`.
pub(crate) struct Statuses;

/// Codes an HTTP server can send.
const STATUS_CODES: std::ops::RangeInclusive<u16> = 100..=599;

impl Want for Statuses {
    type Value = StatusRange;
    fn expected(&self) -> String {
        format!(
            "an HTTP status in {}..={} or a range such as 200-399",
            STATUS_CODES.start(),
            STATUS_CODES.end()
        )
    }
    fn read(&self, node: &Node) -> Result<StatusRange, String> {
        let text = text(node)?;
        let code = |text: &str| {
            Some(text)
                .filter(|t| t.len() == 3 && t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| t.parse::<u16>().ok())
                .filter(|code| STATUS_CODES.contains(code))
        };
        let (first, last) = text.split_once('-').unwrap_or((text, text));
        match (code(first), code(last)) {
            (Some(first), Some(last)) if first <= last => Ok(StatusRange { first, last }),
            (Some(_), Some(_)) => Err(format!("{} (the range is reversed)", describe(node))),
            _ => Err(describe(node)),
        }
    }
}

/// A target's `ip`: one address (a /32 or /128) or a CIDR range.
pub(crate) struct IpRange;

impl Want for IpRange {
    type Value = IpNet;
    fn expected(&self) -> String {
        "an IPv4 or IPv6 address or CIDR range such as 198.18.0.0/24 or 2001:db8::/64".to_owned()
    }
    fn read(&self, node: &Node) -> Result<IpNet, String> {
        parse_ip_net(text(node)?).map_err(|why| match why {
            Some(why) => format!("{} ({why})", describe(node)),
            None => describe(node),
        })
    }
}

/// `Err(Some(why))` when the reason is worth saying.
fn parse_ip_net(text: &str) -> Result<IpNet, Option<String>> {
    let (addr, len) = match text.split_once('/') {
        None => (text, None),
        Some((addr, len)) => (addr, Some(len)),
    };
    let addr = IpAddr::from_str(addr).map_err(|_| None)?;
    let max_prefix: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix_len = match len {
        None => max_prefix,
        Some(len) => Some(len)
            .filter(|len| len.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|len| len.parse::<u8>().ok())
            .filter(|len| *len <= max_prefix)
            .ok_or_else(|| Some(format!("prefix length must be 0..={max_prefix}")))?,
    };
    let network = match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX
                .checked_shl(u32::from(max_prefix - prefix_len))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask))
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX
                .checked_shl(u32::from(max_prefix - prefix_len))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask))
        }
    };
    if network != addr {
        return Err(Some(format!(
            "host bits are set; did you mean {network}/{prefix_len}?"
        )));
    }
    Ok(IpNet { addr, prefix_len })
}

/// A DNS resolver: an IPv4 or IPv6 address, optionally with a port.
pub(crate) struct Resolver;

impl Want for Resolver {
    type Value = SocketAddr;
    fn expected(&self) -> String {
        "a resolver address such as 198.18.0.53, 198.18.0.53:5353, 2001:db8::53 or [2001:db8::53]:5353"
            .to_owned()
    }
    fn read(&self, node: &Node) -> Result<SocketAddr, String> {
        let text = text(node)?;
        let addr = SocketAddr::from_str(text)
            .or_else(|_| IpAddr::from_str(text).map(|ip| SocketAddr::new(ip, DNS_PORT)))
            .map_err(|_| describe(node))?;
        nonzero_port(addr, node)
    }
}

/// One item of an event command's argv, quoted or not; the program (the
/// first) may not be empty. Without a NUL byte, which exec cannot pass.
pub(crate) struct Argument {
    pub program: bool,
}

impl Want for Argument {
    type Value = String;
    fn expected(&self) -> String {
        if self.program {
            "a program's path or name".to_owned()
        } else {
            "text".to_owned()
        }
    }
    fn read(&self, node: &Node) -> Result<String, String> {
        let text = text(node)?;
        if text.contains('\0') {
            Err(format!("{} (a NUL byte)", describe(node)))
        } else if self.program && text.is_empty() {
            Err(describe(node))
        } else {
            Ok(text.to_owned())
        }
    }
}

/// Where events are POSTed: an absolute `http` or `https` URL with a host.
pub(crate) struct WebhookUrl;

impl Want for WebhookUrl {
    type Value = http::Uri;
    fn expected(&self) -> String {
        "an http:// or https:// URL such as https://alerts.example.test/lobby".to_owned()
    }
    fn read(&self, node: &Node) -> Result<http::Uri, String> {
        let why = |why: &str| format!("{} ({why})", describe(node));
        let uri = http::Uri::from_str(text(node)?).map_err(|_| why("not a URL"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            Some(other) => return Err(why(&format!("scheme `{other}`"))),
            None => return Err(why("not an absolute URL")),
        }
        let authority = uri.authority().ok_or_else(|| why("no host"))?;
        if authority.as_str().contains('@') {
            return Err(why("credentials in a URL are not sent"));
        }
        if authority.host().is_empty() {
            return Err(why("no host"));
        }
        if authority.port_u16() == Some(0) {
            return Err(why("port 0"));
        }
        Ok(uri)
    }
}

/// `source_nat.address`: one address, a list (a pool), or a range `A-B`.
pub(crate) struct SnatAddress;

impl Want for SnatAddress {
    type Value = SourceNat;
    fn expected(&self) -> String {
        "an address, a list of addresses or a range such as 198.18.1.250-198.18.1.253".to_owned()
    }
    fn read(&self, node: &Node) -> Result<SourceNat, String> {
        let address = |node: &Node| -> Result<IpAddr, String> {
            let text = text(node)?;
            IpAddr::from_str(text)
                .ok()
                .filter(|ip| unusable_upstream(*ip).is_none())
                .ok_or_else(|| describe(node))
        };
        match node.value() {
            Value::Sequence(items) if !items.is_empty() => {
                let pool = items.iter().map(address).collect::<Result<Vec<_>, _>>()?;
                // A pool's rotation gives each address to one client bucket
                // per port bucket: an address twice would be two buckets'.
                match pool
                    .iter()
                    .enumerate()
                    .find(|(i, a)| pool[..*i].contains(a))
                {
                    Some((_, twice)) => Err(format!("{twice} twice in the list")),
                    None => Ok(SourceNat::Addresses(pool)),
                }
            }
            Value::Sequence(_) => Err("an empty list".to_owned()),
            _ => {
                let text = text(node)?;
                match text.split_once('-') {
                    Some((first, last)) => {
                        let parse = |t: &str| IpAddr::from_str(t.trim()).ok();
                        match (parse(first), parse(last)) {
                            (Some(first), Some(last))
                                if first.is_ipv4() == last.is_ipv4() && first <= last =>
                            {
                                Ok(SourceNat::Range(first, last))
                            }
                            _ => Err(format!(
                                "{} (not a range of one family, low to high)",
                                describe(node)
                            )),
                        }
                    }
                    None => address(node).map(|a| SourceNat::Addresses(vec![a])),
                }
            }
        }
    }
}

/// An interface name as the kernel takes it.
pub(crate) struct InterfaceName;

impl Want for InterfaceName {
    type Value = String;
    fn expected(&self) -> String {
        "an interface name of 1 to 15 characters (letters, digits, `-`, `_`, `.`)".to_owned()
    }
    fn read(&self, node: &Node) -> Result<String, String> {
        let name = text(node)?;
        let valid = (1..=15).contains(&name.len())
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        valid.then(|| name.to_owned()).ok_or_else(|| describe(node))
    }
}

/// `nftables.table`: a name nft takes as a table name in every command
/// Lobby sends, and that is safe in file names (the control socket
/// /run/lobby/NAME.sock and the pin directory follow it).
pub(crate) struct TableName;

/// Longest table name: the socket path must fit `sun_path` (108 bytes) with
/// room to spare; nft itself takes 255.
const MAX_TABLE_LEN: usize = 32;

/// The words of nft's grammar that nft 1.0.6 refuses as a table name in
/// the commands Lobby sends (`add table`, `add counter`, `list table`...):
/// each word of nft's scanner was tried against the real nft, and these
/// failed. A keyword of a later nft fails the first apply with nft's own
/// message instead.
const NFT_KEYWORDS: &[&str] = &[
    "accept",
    "add",
    "ah",
    "all",
    "and",
    "arp",
    "auto-merge",
    "bridge",
    "bytes",
    "cgroup",
    "chain",
    "chains",
    "comment",
    "comp",
    "constant",
    "continue",
    "counter",
    "counters",
    "cpu",
    "create",
    "ct",
    "day",
    "dccp",
    "define",
    "delete",
    "describe",
    "device",
    "devices",
    "dnat",
    "drop",
    "dst",
    "dup",
    "dynamic",
    "ecn",
    "element",
    "elements",
    "eq",
    "esp",
    "ether",
    "exists",
    "expires",
    "export",
    "exthdr",
    "fib",
    "flags",
    "flow",
    "flowtable",
    "flowtables",
    "flush",
    "frag",
    "fwd",
    "gc-interval",
    "ge",
    "get",
    "goto",
    "gt",
    "handle",
    "hbh",
    "hook",
    "hooks",
    "hour",
    "ibriport",
    "ibrname",
    "icmp",
    "icmpv6",
    "igmp",
    "iif",
    "iifgroup",
    "iifname",
    "iiftype",
    "import",
    "include",
    "index",
    "inet",
    "insert",
    "interval",
    "ip",
    "ip6",
    "ipsec",
    "jhash",
    "jump",
    "le",
    "limit",
    "limits",
    "list",
    "log",
    "lshift",
    "lt",
    "map",
    "maps",
    "mark",
    "masquerade",
    "meta",
    "meter",
    "meters",
    "mh",
    "missing",
    "monitor",
    "name",
    "ne",
    "netdev",
    "nftrace",
    "not",
    "notrack",
    "numgen",
    "obriport",
    "obrname",
    "offload",
    "oif",
    "oifgroup",
    "oifname",
    "oiftype",
    "or",
    "osf",
    "packets",
    "pkttype",
    "policy",
    "position",
    "priority",
    "queue",
    "quota",
    "quotas",
    "random",
    "redefine",
    "redirect",
    "reject",
    "rename",
    "replace",
    "reset",
    "return",
    "rshift",
    "rt",
    "rt0",
    "rt2",
    "rtclassid",
    "rule",
    "ruleset",
    "sctp",
    "secmark",
    "secmarks",
    "set",
    "sets",
    "size",
    "skgid",
    "skuid",
    "snat",
    "socket",
    "srh",
    "symhash",
    "synproxy",
    "synproxys",
    "table",
    "tables",
    "tcp",
    "th",
    "time",
    "timeout",
    "tproxy",
    "type",
    "typeof",
    "udp",
    "udplite",
    "undefine",
    "update",
    "vlan",
    "vmap",
    "xor",
    "xt",
];

impl Want for TableName {
    type Value = String;
    fn expected(&self) -> String {
        format!(
            "a table name of 1 to {MAX_TABLE_LEN} letters, digits, `-` or `_`, starting with a letter, \
             that is not a word of nft's grammar"
        )
    }
    fn read(&self, node: &Node) -> Result<String, String> {
        let name = text(node)?;
        let valid = (1..=MAX_TABLE_LEN).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'));
        if !valid {
            return Err(describe(node));
        }
        if NFT_KEYWORDS.binary_search(&name).is_ok() {
            return Err(format!("{} (a word of nft's grammar)", describe(node)));
        }
        Ok(name.to_owned())
    }
}

/// `nftables.priority`: a number, `dstnat`, or `dstnat` plus or minus a
/// number, within [`Nftables::PRIORITIES`].
pub(crate) struct Priority;

impl Want for Priority {
    type Value = i32;
    fn expected(&self) -> String {
        let range = Nftables::PRIORITIES;
        format!(
            "a priority in {}..={}: a number, `dstnat` ({}) or an offset from it such as \"dstnat - 10\"",
            range.start(),
            range.end(),
            Nftables::DSTNAT
        )
    }
    fn read(&self, node: &Node) -> Result<i32, String> {
        let text = text(node)?;
        let number = |t: &str| -> Option<i64> {
            let digits = t.strip_prefix('-').unwrap_or(t);
            (!digits.is_empty() && digits.len() <= 10 && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse().ok())
                .flatten()
        };
        let value = match text.trim().strip_prefix("dstnat") {
            None => number(text),
            Some("") => Some(i64::from(Nftables::DSTNAT)),
            Some(rest) => {
                let rest = rest.trim_start();
                let (sign, offset) = match (rest.strip_prefix('+'), rest.strip_prefix('-')) {
                    (Some(offset), _) => (1, offset),
                    (_, Some(offset)) => (-1, offset),
                    _ => return Err(describe(node)),
                };
                let offset = offset.trim();
                (!offset.starts_with('-'))
                    .then(|| number(offset))
                    .flatten()
                    .map(|n| i64::from(Nftables::DSTNAT) + sign * n)
            }
        }
        .ok_or_else(|| describe(node))?;
        i32::try_from(value)
            .ok()
            .filter(|p| Nftables::PRIORITIES.contains(p))
            .ok_or_else(|| format!("{} ({value}, out of range)", describe(node)))
    }
}

/// An address a host can be reached at: not loopback, unspecified,
/// broadcast or multicast.
pub(crate) struct UsableAddress;

impl Want for UsableAddress {
    type Value = IpAddr;
    fn expected(&self) -> String {
        "the IPv4 or IPv6 address of a host".to_owned()
    }
    fn read(&self, node: &Node) -> Result<IpAddr, String> {
        let ip = IpAddr::from_str(text(node)?).map_err(|_| describe(node))?;
        match unusable_upstream(ip) {
            Some(why) => Err(format!("{} ({why})", describe(node))),
            None => Ok(ip),
        }
    }
}

/// An address and port to listen on.
pub(crate) struct Listen;

impl Want for Listen {
    type Value = SocketAddr;
    fn expected(&self) -> String {
        "an address with a port such as 127.0.0.1:9091 or [::1]:9091".to_owned()
    }
    fn read(&self, node: &Node) -> Result<SocketAddr, String> {
        let addr = SocketAddr::from_str(text(node)?).map_err(|_| describe(node))?;
        nonzero_port(addr, node)
    }
}

fn nonzero_port(addr: SocketAddr, node: &Node) -> Result<SocketAddr, String> {
    if addr.port() == 0 {
        Err(format!("{} (port 0)", describe(node)))
    } else {
        Ok(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        assert_eq!(
            parse_host("198.18.1.11"),
            Ok(Host::Ip(IpAddr::V4(Ipv4Addr::new(198, 18, 1, 11))))
        );
        assert_eq!(
            parse_host("2001:db8::11"),
            Ok(Host::Ip(IpAddr::from_str("2001:db8::11").unwrap()))
        );
        assert_eq!(
            parse_host("Web2.Example.TEST."),
            Ok(Host::Fqdn("web2.example.test".into()))
        );
        assert_eq!(parse_host("backend"), Ok(Host::Fqdn("backend".into())));
        assert!(parse_host("198.18.1.300").is_err());
        assert!(parse_host("2001:db8::g").is_err());
        assert!(parse_host("[2001:db8::1]").is_err());
        for unusable in [
            "127.0.0.1",
            "127.1.2.3",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "::1",
            "::",
            "ff02::1",
        ] {
            assert!(parse_host(unusable).is_err(), "{unusable}");
        }
        // Directed broadcasts of a subnet are ordinary addresses to Lobby.
        assert!(parse_host("198.18.1.255").is_ok());
        assert!(parse_host("a..b").is_err());
        assert!(parse_host("-a.b").is_err());
        assert!(parse_host("a_b.c").is_err());
        assert!(parse_host("a.123").is_err());
        assert!(parse_host(&format!("{}.test", "a".repeat(64))).is_err());
    }

    #[test]
    fn ip_nets() {
        let net = |a, p| {
            Ok(IpNet {
                addr: IpAddr::from_str(a).unwrap(),
                prefix_len: p,
            })
        };
        assert_eq!(parse_ip_net("10.0.0.1"), net("10.0.0.1", 32));
        assert_eq!(parse_ip_net("10.0.0.0/8"), net("10.0.0.0", 8));
        assert_eq!(parse_ip_net("0.0.0.0/0"), net("0.0.0.0", 0));
        assert_eq!(parse_ip_net("2001:db8::1"), net("2001:db8::1", 128));
        assert_eq!(parse_ip_net("2001:db8::/32"), net("2001:db8::", 32));
        assert!(parse_ip_net("10.0.0.1/8").is_err());
        assert!(parse_ip_net("10.0.0.0/33").is_err());
        assert!(parse_ip_net("2001:db8::1/64").is_err());
        assert!(parse_ip_net("2001:db8::/129").is_err());
        assert!(parse_ip_net("10.0.0.0/").is_err());
        assert!(parse_ip_net("10.0.0/8").is_err());
        let net = parse_ip_net("198.18.0.0/24").unwrap();
        assert!(net.contains([198, 18, 0, 255].into()));
        assert!(!net.contains([198, 18, 1, 0].into()));
        assert!(
            parse_ip_net("0.0.0.0/0")
                .unwrap()
                .contains(Ipv4Addr::BROADCAST.into())
        );
        let net6 = parse_ip_net("2001:db8::/32").unwrap();
        assert!(net6.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!net6.contains("2001:db9::1".parse().unwrap()));
        assert!(!net6.contains([198, 18, 0, 1].into()));
    }
}
