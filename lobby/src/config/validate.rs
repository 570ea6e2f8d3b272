//! The tree of a YAML document to a [`Config`], collecting every problem
//! instead of stopping at the first.
//!
//! Decisions where SPEC.md is silent:
//! - Names: target names and upstream group names are unique in the whole
//!   file; upstream names are unique within their group, since an operator
//!   knows an upstream as `target/upstream`. Names are 1 to 63 letters,
//!   digits, `-`, `_`, `.`: safe in log lines, metric labels and nftables
//!   identifiers.
//! - Protocol and port are unique across targets even when their `ip`
//!   differs.
//! - An empty `lb` list is valid (a Lobby with nothing to balance yet); an
//!   upstream group needs at least one upstream.
//! - Required as in the original: `lb`, `targets`, the names, `protocol`,
//!   `port`, `host`, `distribution`, `upstreams`; in a non-empty
//!   `health_check` its `protocol`, `port` and the probe's `check_interval`,
//!   `timeout`, `success_count`. Defaults: `engine` nftables,
//!   `start_available` false, `failure_count` 1.
//! - A `timeout` longer than `check_interval` is accepted, as in the
//!   original: probes of one upstream never overlap, the next starts when
//!   the previous has ended.
//! - Numbers and booleans are unquoted YAML 1.2 (`"80"` and `yes` are
//!   rejected with a message saying what was found).
//! - Health checks: `port` is required whatever the probe protocol (no
//!   implied 80 or 443 for http(s)), as it always was. A key of another
//!   probe protocol is an error (`tls_verify` on a `tcp` check), not
//!   ignored. The Host of an http(s) probe defaults to the upstream's host
//!   without a port. `expect_status` is a code or a range `FIRST-LAST`,
//!   quoted or not, since a range is text. `send` is at most one IPv4 UDP
//!   payload (65507 bytes); `expect` is 1 to 4096 bytes, both UTF-8 text
//!   (double-quoted YAML escapes such as `"\n"` give control characters).
//! - Addresses: an upstream IP that can never be balanced to (loopback,
//!   0.0.0.0/8, the broadcast address, multicast) is an error, since its
//!   share of the connections would vanish. `metrics.listen` on the tcp
//!   port of a target whose `ip` covers its address is an error, since the
//!   target's DNAT would take every scrape from another host; a loopback
//!   address is never taken (the DNAT sees only other hosts' packets).
//! - `events`: `command` and `webhook` may both be given, one is needed.
//!   Arguments are text, quoted or not (`--retries: 3` passes "3"); lists
//!   and mappings are not. `timeout` defaults to 5 s (SPEC), at most 300 s:
//!   one slow receiver holds up the events behind it.
//! - `acceleration`: `flowtable` and `hardware_offload` default to false;
//!   `flowtable: false` (or an empty mapping) is acceleration off, and
//!   `hardware_offload: true` without `flowtable: true` is an error, since
//!   the NIC is handed flows by the flowtable. Whether the kernel has
//!   flowtables is the daemon's check at start, not the validator's.
//! - Selection: `persistence` with `ip-src-hash` is an error (the hash
//!   already keeps each client on one upstream), and so is `persistence`
//!   in a group with an upstream's `max_connections` (both pick the
//!   upstream through chains of their own); `least-latency` needs a
//!   health check on every upstream of its group, since it measures their
//!   probes. A group whose every weight is 0 is valid (everything drained)
//!   but a warning: its target refuses every connection.
//! - `nftables`: the daemon's, not an entry's (one daemon owns one table):
//!   entries that give `table` or `priority` must agree, one that leaves
//!   a key out follows the others. A table name must be one nft takes in
//!   every command Lobby sends and one safe in file names; a priority lies
//!   between conntrack and the conntrack helpers.
//! - `local` and `mirror` are policy keys (target or `defaults`); a
//!   mirror's family must be one the target can serve, since netfilter
//!   duplicates a packet in its own family.
use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http::uri::PathAndQuery;

use super::{
    Acceleration, Config, ConfigError, Distribution, DnsConfig, EventsConfig, Family, HealthCheck,
    HealthProtocol, Host, HttpProbe, IpNet, Limit, Limits, MetricsConfig, Nftables, Policy,
    Protocol, Rate, SourceNat, StatusRange, Target, UdpProbe, Upstream, UpstreamGroup,
    values::{
        Argument, Boolean, HostName, HttpHost, Integer, InterfaceName, IpRange, Keyword, Listen,
        Name, PORT, Priority, Resolver, SnatAddress, Statuses, TableName, Text, UrlPath,
        UsableAddress, Want, WebhookUrl, describe,
    },
    yaml::{Mark, Node, Value},
};

const PROTOCOL: Keyword<Protocol> = Keyword {
    choices: &[
        ("tcp", Protocol::Tcp),
        ("udp", Protocol::Udp),
        ("sctp", Protocol::Sctp),
    ],
};
const HEALTH_PROTOCOL: Keyword<ProbeKind> = Keyword {
    choices: &[
        ("tcp", ProbeKind::Tcp),
        ("udp", ProbeKind::Udp),
        ("http", ProbeKind::Http),
        ("https", ProbeKind::Https),
        ("sctp", ProbeKind::Sctp),
    ],
};
/// The keys of a health check that only some protocols take.
const PROTOCOL_KEYS: [(&str, &[ProbeKind]); 6] = [
    ("send", &[ProbeKind::Udp]),
    (
        "expect",
        &[ProbeKind::Udp, ProbeKind::Http, ProbeKind::Https],
    ),
    ("path", &[ProbeKind::Http, ProbeKind::Https]),
    ("host", &[ProbeKind::Http, ProbeKind::Https]),
    ("expect_status", &[ProbeKind::Http, ProbeKind::Https]),
    ("tls_verify", &[ProbeKind::Https]),
];
/// The largest UDP payload over IPv4 (65535 less the IP and UDP headers).
const SEND: Text = Text {
    min_len: 0,
    max_len: 65507,
};
/// Found in a datagram or a body; empty would match anything.
const EXPECT: Text = Text {
    min_len: 1,
    max_len: 4096,
};
/// Success and redirects: what a health endpoint that is up answers.
const DEFAULT_STATUSES: StatusRange = StatusRange {
    first: 200,
    last: 399,
};
const DISTRIBUTION: Keyword<Distribution> = Keyword {
    choices: &[
        ("round-robin", Distribution::RoundRobin),
        ("random", Distribution::Random),
        ("ip-src-hash", Distribution::IpSrcHash),
        ("least-connections", Distribution::LeastConnections),
        ("least-latency", Distribution::LeastLatency),
    ],
};
/// `persistence.timeout`: up to a day.
const PERSISTENCE_TIMEOUT: Integer = Integer {
    what: "seconds",
    min: 1,
    max: 86400,
};
/// The keys of a traffic policy, in a target or an entry's `defaults`.
const POLICY_KEYS: [&str; 7] = [
    "allow",
    "block",
    "source_nat",
    "interface",
    "local",
    "mirror",
    "limits",
];
/// The keys of a limit, in `limits` and its `per_source`.
const LIMIT_KEYS: [&str; 3] = ["new_connections_per_second", "burst", "max_connections"];
/// Far above what one host's conntrack takes in a second, far below what
/// would overflow nft's token bucket.
const RATE: Integer = Integer {
    what: "connections per second",
    min: 1,
    max: 1_000_000,
};
const BURST: Integer = Integer {
    what: "connections",
    min: 1,
    max: 1_000_000,
};
/// Far above any conntrack table's size (a few million entries at most).
const MAX_CONNECTIONS: Integer = Integer {
    what: "connections",
    min: 1,
    max: 10_000_000,
};
/// `source_nat` as a word; an address takes a mapping.
const SOURCE_NAT: Keyword<bool> = Keyword {
    // Whether the source is rewritten to the egress address.
    choices: &[("masquerade", true), ("none", false)],
};
const WEIGHT: Integer = Integer {
    what: "a weight",
    min: 0,
    max: 1000,
};
/// The original's only engine; nothing to choose, so it may be left out.
const ENGINE: Keyword<()> = Keyword {
    choices: &[("nftables", ())],
};
const CHECK_INTERVAL: Integer = Integer {
    what: "seconds",
    min: 1,
    max: 65536,
};
const TIMEOUT: Integer = Integer {
    what: "seconds",
    min: 1,
    max: 256,
};
const COUNT: Integer = Integer {
    what: "a count",
    min: 1,
    max: u32::MAX as u64,
};
/// DNS TTLs are at most 2^31 - 1 seconds (RFC 2181).
const TTL: Integer = Integer {
    what: "seconds",
    min: 1,
    max: i32::MAX as u64,
};
const EVENT_TIMEOUT: Integer = Integer {
    what: "seconds",
    min: 1,
    max: 300,
};
/// `events.timeout` when not given (SPEC).
const DEFAULT_EVENT_TIMEOUT: Duration = Duration::from_secs(5);
/// `failure_count` when not given: the original marks an upstream down at
/// the first failure.
const DEFAULT_FAILURE_COUNT: u32 = 1;

/// A valid configuration and the `defaults` of each of its `lb` entries,
/// in order.
pub(crate) fn config_and_defaults(
    root: &Node,
    file: &Path,
) -> Result<(Config, Vec<Policy>), Vec<ConfigError>> {
    let mut checker = Checker::new(file);
    match checker.root(root) {
        Some(config) if checker.errors.is_empty() => Ok((config, checker.entry_defaults)),
        _ => Err(checker.errors),
    }
}

/// The targets `items` of an entry whose `defaults` are `defaults`, checked
/// as the whole file's check would check them; `None` when one is invalid
/// or draws a warning. What they must not share with the file's other
/// targets (names, ports) is for the caller to check.
pub(crate) fn targets_alone(items: &[Node], defaults: &Policy) -> Option<Vec<Target>> {
    let mut checker = Checker::new(Path::new(""));
    let targets: Option<Vec<Target>> = items
        .iter()
        .map(|item| checker.target(item, At::Root, Some(defaults)))
        .collect();
    (checker.errors.is_empty() && checker.warnings.is_empty())
        .then_some(targets)
        .flatten()
}

/// The keys of one mapping, checked against what it may hold.
struct Fields<'n, 'p> {
    path: At<'p>,
    mark: Mark,
    entries: Vec<(&'n str, &'n Node)>,
}

impl<'n> Fields<'n, '_> {
    fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }

    fn path(&self, key: &str) -> String {
        self.at(key).to_string()
    }

    fn at<'s>(&'s self, key: &'s str) -> At<'s> {
        At::Key(&self.path, key)
    }
}

/// Where a value is written (`lb[0].targets[3].port`), spelled out only
/// when a problem there is reported: most values have none, and a large
/// file has tens of thousands of them.
#[derive(Clone, Copy)]
enum At<'p> {
    Root,
    Key(&'p At<'p>, &'p str),
    /// Item `.2` of the list at key `.1`.
    Item(&'p At<'p>, &'p str, usize),
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Root => Ok(()),
            At::Key(parent, key) => f.write_str(&child(&parent.to_string(), key)),
            At::Item(parent, key, i) => write!(f, "{}[{i}]", child(&parent.to_string(), key)),
        }
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Where each name was first seen, to report the second one.
#[derive(Default)]
struct Seen {
    lines: HashMap<String, usize>,
}

impl Seen {
    /// The line of the earlier occurrence of `name`, if any.
    fn earlier(&mut self, name: &str, line: usize) -> Option<usize> {
        match self.lines.get(name) {
            Some(first) => Some(*first),
            None => {
                self.lines.insert(name.to_owned(), line);
                None
            }
        }
    }
}

struct Checker {
    file: PathBuf,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    target_names: Seen,
    group_names: Seen,
    /// Protocol and port to the target that listens there.
    listeners: HashMap<(Protocol, u16), Listener>,
    /// Each `lb` entry's `defaults` (the default policy when invalid).
    entry_defaults: Vec<Policy>,
}

impl Checker {
    fn new(file: &Path) -> Self {
        Checker {
            file: file.to_path_buf(),
            errors: Vec::new(),
            warnings: Vec::new(),
            target_names: Seen::default(),
            group_names: Seen::default(),
            listeners: HashMap::new(),
            entry_defaults: Vec::new(),
        }
    }

    fn report(&mut self, mark: Mark, path: String, message: String) {
        let error = self.located(mark, path, message);
        self.errors.push(error);
    }

    /// Something valid that is probably not what the operator meant.
    fn warn(&mut self, mark: Mark, path: String, message: String) {
        let warning = self.located(mark, path, message);
        self.warnings.push(warning);
    }

    fn located(&self, mark: Mark, path: String, message: String) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: mark.line,
            column: mark.column,
            path,
            message,
        }
    }

    /// The entries of a mapping, after reporting keys that are not in
    /// `schema` or appear twice.
    fn mapping<'n, 'p>(
        &mut self,
        node: &'n Node,
        path: At<'p>,
        schema: &[&str],
    ) -> Option<Fields<'n, 'p>> {
        let Value::Mapping(pairs) = node.value() else {
            let message = format!("expected a mapping, found {}", describe(node));
            self.report(node.mark, path.to_string(), message);
            return None;
        };
        let mut fields = Fields {
            path,
            mark: node.mark,
            entries: Vec::with_capacity(pairs.len()),
        };
        for (key, value) in pairs {
            let Value::Scalar { text, .. } = key.value() else {
                let message = format!("expected a key, found {}", describe(key));
                self.report(key.mark, fields.path.to_string(), message);
                continue;
            };
            if let Some(first) = fields.entries.iter().find(|(k, _)| k == text) {
                let message = format!(
                    "duplicate key `{text}` (first at line {})",
                    first.1.mark.line
                );
                self.report(key.mark, fields.path(text), message);
            } else if !schema.contains(&text.as_str()) {
                self.report(key.mark, fields.path(text), unknown_key(text, schema));
            } else {
                fields.entries.push((text, value));
            }
        }
        Some(fields)
    }

    /// A sub-mapping; `None` also when it is absent or empty.
    fn optional_mapping<'n, 'p>(
        &mut self,
        fields: &'p Fields<'n, '_>,
        key: &'p str,
        schema: &[&str],
    ) -> Option<Fields<'n, 'p>> {
        let node = fields.get(key).filter(|n| !n.is_null())?;
        self.mapping(node, fields.at(key), schema)
    }

    fn required_mapping<'n, 'p>(
        &mut self,
        fields: &'p Fields<'n, '_>,
        key: &'p str,
        schema: &[&str],
    ) -> Option<Fields<'n, 'p>> {
        let Some(node) = fields.get(key) else {
            self.missing(fields, key, "a mapping");
            return None;
        };
        self.mapping(node, fields.at(key), schema)
    }

    fn missing(&mut self, fields: &Fields, key: &str, expected: &str) {
        let message = format!("missing; expected {expected}");
        self.report(fields.mark, fields.path(key), message);
    }

    fn read<W: Want>(&mut self, node: &Node, path: At, want: &W) -> Option<W::Value> {
        match want.read(node) {
            Ok(value) => Some(value),
            Err(found) => {
                let message = format!("expected {}, found {found}", want.expected());
                self.report(node.mark, path.to_string(), message);
                None
            }
        }
    }

    /// `None` when absent, null or invalid (reported).
    fn optional<W: Want>(&mut self, fields: &Fields, key: &str, want: &W) -> Option<W::Value> {
        let node = fields.get(key).filter(|n| !n.is_null())?;
        self.read(node, fields.at(key), want)
    }

    fn required<W: Want>(&mut self, fields: &Fields, key: &str, want: &W) -> Option<W::Value> {
        let Some(node) = fields.get(key) else {
            self.missing(fields, key, &want.expected());
            return None;
        };
        self.read(node, fields.at(key), want)
    }

    /// `Some(None)` when absent (the caller has a default), `None` when
    /// invalid (reported); null is invalid.
    fn defaulted<W: Want>(
        &mut self,
        fields: &Fields,
        key: &str,
        want: &W,
    ) -> Option<Option<W::Value>> {
        match fields.get(key) {
            None => Some(None),
            Some(node) => self.read(node, fields.at(key), want).map(Some),
        }
    }

    /// The items of a list with their paths; empty when absent and
    /// optional, or when not a list (reported).
    fn list<'n, 'p>(
        &mut self,
        fields: &'p Fields<'n, '_>,
        key: &'p str,
        expected: &str,
        required: bool,
    ) -> Vec<(At<'p>, &'n Node)> {
        let node = match fields.get(key) {
            Some(node) if required || !node.is_null() => node,
            Some(_) => return Vec::new(),
            None => {
                if required {
                    self.missing(fields, key, expected);
                }
                return Vec::new();
            }
        };
        match node.value() {
            Value::Sequence(items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| (At::Item(&fields.path, key, i), item))
                .collect(),
            _ => {
                let message = format!("expected {expected}, found {}", describe(node));
                self.report(node.mark, fields.path(key), message);
                Vec::new()
            }
        }
    }

    /// Reports `name` when `seen` already holds it.
    fn unique_name(&mut self, seen: Which, fields: &Fields, name: &str, what: &str) {
        let Some(node) = fields.get("name") else {
            return;
        };
        let seen = match seen {
            Which::Targets => &mut self.target_names,
            Which::Groups => &mut self.group_names,
            Which::Local(seen) => seen,
        };
        if let Some(first) = seen.earlier(name, node.mark.line) {
            let message = format!("duplicate {what} name `{name}` (first at line {first})");
            self.report(node.mark, fields.path("name"), message);
        }
    }

    fn root(&mut self, root: &Node) -> Option<Config> {
        let fields = self.mapping(root, At::Root, &["lb", "metrics", "events"])?;
        let metrics_fields = self.optional_mapping(&fields, "metrics", &["listen"]);
        let metrics = metrics_fields.as_ref().map(|metrics| {
            self.required(metrics, "listen", &Listen)
                .map(|listen| MetricsConfig { listen })
        });
        let events = self.events(&fields);
        let mut targets = Vec::new();
        // Entry-level, as SPEC puts it; the table is one, so the fast path
        // is on when an entry asks for it.
        let mut acceleration: Option<Option<Acceleration>> = Some(None);
        let mut nftables = Vec::new();
        for (path, node) in self.list(&fields, "lb", "a list of load balancers", true) {
            let (entry_targets, entry_acceleration, entry_nftables) =
                self.load_balancer(node, path);
            targets.extend(entry_targets);
            nftables.push(entry_nftables);
            acceleration = match (acceleration, entry_acceleration) {
                (Some(a), Some(b)) => Some(match (a, b) {
                    (Some(a), Some(b)) => Some(Acceleration {
                        hardware_offload: a.hardware_offload || b.hardware_offload,
                    }),
                    (a, b) => a.or(b),
                }),
                _ => None,
            };
        }
        if let (Some(fields), Some(Some(metrics))) = (&metrics_fields, &metrics) {
            self.metrics_reachable(fields, metrics.listen);
        }
        let nftables = self.one_table(nftables);
        Some(Config {
            targets: targets
                .into_iter()
                .map(|t| t.map(Arc::new))
                .collect::<Option<_>>()?,
            metrics: metrics.map_or(Some(None), |m| m.map(Some))?,
            events: events?,
            acceleration: acceleration?,
            warnings: std::mem::take(&mut self.warnings),
            nftables: nftables?,
        })
    }

    /// `Some(None)` when absent, null, empty or `flowtable: false`.
    fn acceleration(&mut self, root: &Fields) -> Option<Option<Acceleration>> {
        let schema = ["flowtable", "hardware_offload"];
        let Some(fields) = self.optional_mapping(root, "acceleration", &schema) else {
            return root
                .get("acceleration")
                .is_none_or(|n| n.is_null())
                .then_some(None);
        };
        let flowtable = self.defaulted(&fields, "flowtable", &Boolean);
        let hardware_offload = self.defaulted(&fields, "hardware_offload", &Boolean);
        let (flowtable, hardware_offload) = (
            flowtable?.unwrap_or(false),
            hardware_offload?.unwrap_or(false),
        );
        if hardware_offload && !flowtable {
            let node = fields.get("hardware_offload").expect("read above");
            let message = "hardware offload hands the NIC the flowtable's flows: \
                           it needs `flowtable: true`"
                .to_owned();
            self.report(node.mark, fields.path("hardware_offload"), message);
            return None;
        }
        Some(flowtable.then_some(Acceleration { hardware_offload }))
    }

    /// Reports a metrics endpoint on an address and port that a target
    /// balances: its DNAT would take every scrape from another host.
    fn metrics_reachable(&mut self, fields: &Fields, listen: SocketAddr) {
        let Some(node) = fields.get("listen") else {
            return;
        };
        let taken_by = self
            .listeners
            .get(&(Protocol::Tcp, listen.port()))
            .filter(|target| target.ip.is_some_and(|ip| balances(ip, listen.ip())));
        if let Some(target) = taken_by {
            let message = format!(
                "tcp port {} of {} is balanced by target `{}` (line {}): no scrape from another host would reach the endpoint; choose another port",
                listen.port(),
                listen.ip(),
                target.target,
                target.line
            );
            self.report(node.mark, fields.path("listen"), message);
        }
    }

    /// `Some(None)` when absent or null.
    fn events(&mut self, root: &Fields) -> Option<Option<EventsConfig>> {
        let schema = ["command", "webhook", "timeout"];
        let Some(fields) = self.optional_mapping(root, "events", &schema) else {
            // Absent and null are no events; anything else was reported.
            return root
                .get("events")
                .is_none_or(|n| n.is_null())
                .then_some(None);
        };
        if fields.get("command").is_none() && fields.get("webhook").is_none() {
            let message = "expected `command`, `webhook` or both".to_owned();
            self.report(fields.mark, fields.path.to_string(), message);
        }
        let command = self.command(&fields);
        let webhook = self.defaulted(&fields, "webhook", &WebhookUrl);
        let timeout = self.defaulted(&fields, "timeout", &EVENT_TIMEOUT);
        Some(Some(EventsConfig {
            command: command?,
            webhook: webhook?,
            timeout: timeout?.map_or(DEFAULT_EVENT_TIMEOUT, Duration::from_secs),
        }))
    }

    /// `events.command`: `Some(None)` when absent, `None` when invalid.
    fn command(&mut self, events: &Fields) -> Option<Option<Vec<String>>> {
        let Some(node) = events.get("command") else {
            return Some(None);
        };
        let expected = "a list: the program and its arguments";
        let items = self.list(events, "command", expected, true);
        if matches!(node.value(), Value::Sequence(items) if items.is_empty()) {
            let message = format!("expected {expected}, found an empty list");
            self.report(node.mark, events.path("command"), message);
        }
        let argv: Vec<Option<String>> = items
            .into_iter()
            .enumerate()
            .map(|(i, (path, node))| self.read(node, path, &Argument { program: i == 0 }))
            .collect();
        let argv: Vec<String> = argv.into_iter().collect::<Option<_>>()?;
        // Empty: reported above, or the list was not one.
        (!argv.is_empty()).then_some(Some(argv))
    }

    /// The targets of one `lb` entry (`None` for those that are invalid),
    /// its `acceleration` and its `nftables` keys (`None` when invalid).
    fn load_balancer(&mut self, node: &Node, path: At) -> Entry {
        let schema = ["engine", "defaults", "targets", "acceleration", "nftables"];
        let Some(fields) = self.mapping(node, path, &schema) else {
            return (Vec::new(), Some(None), Some(NftablesKeys::default()));
        };
        let acceleration = self.acceleration(&fields);
        let nftables = self.nftables(&fields);
        self.optional(&fields, "engine", &ENGINE);
        let defaults = match self.optional_mapping(&fields, "defaults", &POLICY_KEYS) {
            Some(defaults) => self.policy(&defaults, &Policy::default()),
            None => Some(Policy::default()),
        };
        self.entry_defaults
            .push(defaults.clone().unwrap_or_default());
        let targets = self
            .list(&fields, "targets", "a list of targets", true)
            .into_iter()
            .map(|(path, node)| self.target(node, path, defaults.as_ref()))
            .collect();
        (targets, acceleration, nftables)
    }

    /// The policy keys of `fields` over `defaults`; `None` when one is
    /// invalid (reported).
    fn policy(&mut self, fields: &Fields, defaults: &Policy) -> Option<Policy> {
        let list = |this: &mut Self, key: &str| -> Option<Option<Vec<IpNet>>> {
            if fields.get(key).is_none_or(|n| n.is_null()) {
                return Some(None);
            }
            let items = this.list(fields, key, "a list of addresses or CIDR ranges", false);
            let nets: Vec<Option<IpNet>> = items
                .into_iter()
                .map(|(path, node)| this.read(node, path, &IpRange))
                .collect();
            nets.into_iter().collect::<Option<Vec<_>>>().map(Some)
        };
        let allow = list(self, "allow");
        let block = list(self, "block");
        let source_nat = match fields.get("source_nat").filter(|n| !n.is_null()) {
            None => Some(None),
            Some(node) => match node.value() {
                Value::Mapping(_) => self
                    .optional_mapping(fields, "source_nat", &["address"])
                    .and_then(|snat| self.required(&snat, "address", &SnatAddress))
                    .map(Some),
                _ => self
                    .read(node, fields.at("source_nat"), &SOURCE_NAT)
                    .map(|masquerade| {
                        Some(if masquerade {
                            SourceNat::Masquerade
                        } else {
                            SourceNat::None
                        })
                    }),
            },
        };
        let interface = self.optional(fields, "interface", &InterfaceName);
        let interface_valid =
            interface.is_some() || fields.get("interface").is_none_or(|n| n.is_null());
        let limits = match fields.get("limits").filter(|n| !n.is_null()) {
            None => Some(defaults.limits),
            Some(node) => self.limits(node, fields.at("limits")),
        };
        let local = self.optional(fields, "local", &Boolean);
        let local_valid = local.is_some() || fields.get("local").is_none_or(|n| n.is_null());
        let mirror = self.mirror(fields);
        if !local_valid {
            return None;
        }
        Some(Policy {
            limits: limits?,
            local: local.unwrap_or(defaults.local),
            mirror: mirror?.or(defaults.mirror),
            allow: allow?.or_else(|| defaults.allow.clone()),
            block: block?.unwrap_or_else(|| defaults.block.clone()),
            source_nat: source_nat?.unwrap_or_else(|| defaults.source_nat.clone()),
            interface: if interface_valid {
                interface.or_else(|| defaults.interface.clone())
            } else {
                return None;
            },
        })
    }

    /// `limits`, whole: a target's replaces its entry's defaults. An empty
    /// mapping is no limit.
    fn limits(&mut self, node: &Node, path: At) -> Option<Limits> {
        let schema: Vec<&str> = LIMIT_KEYS.into_iter().chain(["per_source"]).collect();
        let fields = self.mapping(node, path, &schema)?;
        let target = self.limit(&fields);
        let per_source = match fields.get("per_source") {
            None => Some(Limit::default()),
            Some(node) => self.per_source(node, fields.at("per_source")),
        };
        let (target, per_source) = (target?, per_source?);
        if let (Some(own), Some(whole), Some(node)) = (
            per_source.max_connections,
            target.max_connections,
            fields.get("per_source"),
        ) && own >= whole
        {
            let message = format!(
                "a client's max_connections ({own}) is not below the target's ({whole}): \
                 no client could ever reach it"
            );
            self.report(node.mark, fields.path("per_source"), message);
            return None;
        }
        Some(Limits { target, per_source })
    }

    /// `per_source`, which must limit something.
    fn per_source(&mut self, node: &Node, path: At) -> Option<Limit> {
        let expected = "`new_connections_per_second`, `max_connections` or both";
        if node.is_null() {
            let message = format!("expected a mapping with {expected}, found nothing");
            self.report(node.mark, path.to_string(), message);
            return None;
        }
        let fields = self.mapping(node, path, &LIMIT_KEYS)?;
        let limit = self.limit(&fields)?;
        if limit == Limit::default() {
            let message = format!("limits nothing; expected {expected}");
            self.report(fields.mark, fields.path.to_string(), message);
            return None;
        }
        Some(limit)
    }

    /// The rate and connection limit of one scope. The burst defaults to
    /// one second's worth of connections.
    fn limit(&mut self, fields: &Fields) -> Option<Limit> {
        let per_second = self.defaulted(fields, "new_connections_per_second", &RATE);
        let burst = self.defaulted(fields, "burst", &BURST);
        let max_connections = self.defaulted(fields, "max_connections", &MAX_CONNECTIONS);
        let (per_second, burst, max_connections) = (per_second?, burst?, max_connections?);
        if let (None, Some(_), Some(node)) = (per_second, burst, fields.get("burst")) {
            let message =
                "a burst needs `new_connections_per_second`, the rate that refills it".to_owned();
            self.report(node.mark, fields.path("burst"), message);
            return None;
        }
        Some(Limit {
            rate: per_second.map(|per_second| Rate {
                per_second: count(per_second),
                burst: count(burst.unwrap_or(per_second)),
            }),
            max_connections: max_connections.map(count),
        })
    }

    fn target(&mut self, node: &Node, path: At, defaults: Option<&Policy>) -> Option<Target> {
        let keys: Vec<&str> = ["name", "protocol", "port", "ip", "upstream_group"]
            .into_iter()
            .chain(POLICY_KEYS)
            .collect();
        let fields = self.mapping(node, path, &keys)?;
        let name = self.required(&fields, "name", &Name);
        if let Some(name) = &name {
            self.unique_name(Which::Targets, &fields, name, "target");
        }
        let protocol = self.required(&fields, "protocol", &PROTOCOL);
        let port = self.required(&fields, "port", &PORT).map(port_number);
        let ip = self.optional(&fields, "ip", &IpRange);
        let ip_valid = ip.is_some() || fields.get("ip").is_none_or(|n| n.is_null());
        if let (Some(protocol), Some(port), Some(port_node)) = (protocol, port, fields.get("port"))
        {
            let listener = Listener {
                target: name.clone().unwrap_or_default(),
                line: port_node.mark.line,
                ip: ip_valid.then_some(ip),
            };
            self.unique_listener(protocol, port, port_node, &fields, listener);
        }
        let group = self
            .required_mapping(
                &fields,
                "upstream_group",
                &["name", "distribution", "upstreams", "persistence"],
            )
            .and_then(|group| self.group(&group, protocol));
        if let (Some(ip), Some(group), Some(ip_node)) = (ip, &group, fields.get("ip")) {
            self.family_served(ip, group, ip_node, &fields);
        }
        let policy = self.policy(&fields, defaults.unwrap_or(&Policy::default()));
        if let (Some(Policy { source_nat, .. }), Some(ip)) = (&policy, ip) {
            self.snat_family(source_nat, ip, &fields);
        }
        if let (
            Some(Policy {
                mirror: Some(mirror),
                ..
            }),
            Some(group),
        ) = (&policy, &group)
            && ip_valid
        {
            self.mirror_family(*mirror, ip, group, &fields);
        }
        Some(Target {
            name: name?,
            protocol: protocol?,
            port: port?,
            ip,
            group: group?,
            policy: policy?,
        })
    }

    /// `mirror: { to: IP }`: `Some(None)` when absent or null.
    fn mirror(&mut self, policy: &Fields) -> Option<Option<IpAddr>> {
        let Some(fields) = self.optional_mapping(policy, "mirror", &["to"]) else {
            return policy
                .get("mirror")
                .is_none_or(|n| n.is_null())
                .then_some(None);
        };
        self.required(&fields, "to", &UsableAddress).map(Some)
    }

    /// A mirror copies the packets of its own family (netfilter duplicates
    /// a packet as it is): the target must be able to serve that family.
    fn mirror_family(
        &mut self,
        mirror: IpAddr,
        ip: Option<IpNet>,
        group: &UpstreamGroup,
        fields: &Fields,
    ) {
        let family = Family::of(mirror);
        let why = match ip {
            Some(ip) if ip.family() != family => format!("the target only serves {ip}"),
            Some(_) => return,
            None if group.upstreams.iter().any(|u| match &u.host {
                Host::Ip(addr) => Family::of(*addr) == family,
                Host::Fqdn(_) => true,
            }) =>
            {
                return;
            }
            None => format!(
                "no upstream of this target has an {} address",
                family.as_str()
            ),
        };
        // Reported where it is written: the target's own key, or its
        // entry's defaults when the target has none.
        let (node, path) = match fields.get("mirror") {
            Some(node) => (node, fields.path("mirror")),
            None => match fields.get("name") {
                Some(node) => (node, fields.path("name")),
                None => return,
            },
        };
        let message = format!(
            "mirror to {mirror}: an {} copy of the target's traffic, but {why}; \
             netfilter duplicates packets in their own family",
            family.as_str()
        );
        self.report(node.mark, path, message);
    }

    /// `nftables` of one entry: the keys it gives (`None` when invalid).
    fn nftables(&mut self, entry: &Fields) -> Option<NftablesKeys> {
        let Some(fields) = self.optional_mapping(entry, "nftables", &["table", "priority"]) else {
            return entry
                .get("nftables")
                .is_none_or(|n| n.is_null())
                .then_some(NftablesKeys::default());
        };
        let table = self.defaulted(&fields, "table", &TableName);
        let priority = self.defaulted(&fields, "priority", &Priority);
        Some(NftablesKeys {
            table: located(&fields, "table", table?),
            priority: located(&fields, "priority", priority?),
        })
    }

    /// The entries' `nftables` keys as one: one daemon owns one table, so
    /// entries that give a key must agree, and one that leaves it out
    /// follows the others.
    fn one_table(&mut self, entries: Vec<Option<NftablesKeys>>) -> Option<Nftables> {
        let mut table: Option<(String, Mark, String)> = None;
        let mut priority: Option<(i32, Mark, String)> = None;
        let mut valid = true;
        for entry in entries {
            let Some(entry) = entry else {
                valid = false;
                continue;
            };
            if let Some((name, mark, path)) = entry.table {
                match &table {
                    Some((first, first_mark, _)) if *first != name => {
                        let message = format!(
                            "table `{name}`, but an earlier entry names table `{first}` (line {}); \
                             one daemon owns one table: run another lobby for another table",
                            first_mark.line
                        );
                        self.report(mark, path, message);
                        valid = false;
                    }
                    Some(_) => {}
                    None => table = Some((name, mark, path)),
                }
            }
            if let Some((value, mark, path)) = entry.priority {
                match &priority {
                    Some((first, first_mark, _)) if *first != value => {
                        let message = format!(
                            "priority {value}, but an earlier entry sets {first} (line {}); \
                             all targets share the table's nat chains, so entries must agree",
                            first_mark.line
                        );
                        self.report(mark, path, message);
                        valid = false;
                    }
                    Some(_) => {}
                    None => priority = Some((value, mark, path)),
                }
            }
        }
        let defaults = Nftables::default();
        valid.then(|| Nftables {
            table: table.map_or(defaults.table, |(name, ..)| name),
            priority: priority.map_or(defaults.priority, |(value, ..)| value),
        })
    }

    /// SNAT addresses must be of the family the target serves.
    fn snat_family(&mut self, source_nat: &SourceNat, ip: IpNet, fields: &Fields) {
        let addresses: Vec<IpAddr> = match source_nat {
            SourceNat::Addresses(addresses) => addresses.clone(),
            SourceNat::Range(first, last) => vec![*first, *last],
            SourceNat::Masquerade | SourceNat::None => return,
        };
        if let Some(other) = addresses.iter().find(|a| Family::of(**a) != ip.family())
            && let Some(node) = fields.get("source_nat")
        {
            let message = format!(
                "{other} is not an {} address, and the target only serves {ip}",
                ip.family().as_str()
            );
            self.report(node.mark, fields.path("source_nat"), message);
        }
    }

    /// A target whose `ip` is of one family needs an upstream that can be
    /// of that family (netfilter cannot translate between families): an
    /// address of it, or a name, which may resolve to one.
    fn family_served(&mut self, ip: IpNet, group: &UpstreamGroup, ip_node: &Node, fields: &Fields) {
        let can_serve = group.upstreams.iter().any(|u| match &u.host {
            Host::Ip(addr) => Family::of(*addr) == ip.family(),
            Host::Fqdn(_) => true,
        });
        if !can_serve && !group.upstreams.is_empty() {
            let message = format!(
                "{ip} is an {} range but no upstream of this target has an {} address; \
                 netfilter cannot translate between families",
                ip.family().as_str(),
                ip.family().as_str()
            );
            self.report(ip_node.mark, fields.path("ip"), message);
        }
    }

    fn unique_listener(
        &mut self,
        protocol: Protocol,
        port: u16,
        port_node: &Node,
        fields: &Fields,
        listener: Listener,
    ) {
        if let Some(other) = self.listeners.get(&(protocol, port)) {
            let message = format!(
                "{} port {port} is already the port of target `{}` (line {})",
                protocol.as_str(),
                other.target,
                other.line
            );
            self.report(port_node.mark, fields.path("port"), message);
        } else {
            self.listeners.insert((protocol, port), listener);
        }
    }

    /// `protocol` is the target's, which every upstream shares.
    fn group(&mut self, fields: &Fields, protocol: Option<Protocol>) -> Option<UpstreamGroup> {
        let name = self.required(fields, "name", &Name);
        if let Some(name) = &name {
            self.unique_name(Which::Groups, fields, name, "upstream group");
        }
        let distribution = self.required(fields, "distribution", &DISTRIBUTION);
        let items = self.list(fields, "upstreams", "a list of upstreams", true);
        if let Some(node) = fields.get("upstreams")
            && matches!(node.value(), Value::Sequence(items) if items.is_empty())
        {
            let message = "expected at least one upstream, found an empty list".to_owned();
            self.report(node.mark, fields.path("upstreams"), message);
        }
        let mut upstream_names = Seen::default();
        let upstreams: Vec<Option<Upstream>> = items
            .into_iter()
            .map(|(path, node)| self.upstream(node, path, protocol, &mut upstream_names))
            .collect();
        let upstreams: Option<Vec<Upstream>> = upstreams.into_iter().collect();
        let persistence = self.persistence(fields, distribution, upstreams.as_deref());
        if let (Some(distribution), Some(upstreams)) = (distribution, &upstreams) {
            self.selection_needs(fields, distribution, upstreams);
        }
        Some(UpstreamGroup {
            name: name?,
            distribution: distribution?,
            upstreams: upstreams?,
            persistence: persistence?,
        })
    }

    /// `persistence: { timeout: SECS }`: `Some(None)` when absent or null.
    /// Refused with `ip-src-hash`, which already keeps a client on one
    /// upstream while the available ones stay the same, and with an
    /// upstream's `max_connections`: both pick the upstream through chains
    /// of their own, which are not made to work together yet.
    fn persistence(
        &mut self,
        group: &Fields,
        distribution: Option<Distribution>,
        upstreams: Option<&[Upstream]>,
    ) -> Option<Option<Duration>> {
        let Some(fields) = self.optional_mapping(group, "persistence", &["timeout"]) else {
            return group
                .get("persistence")
                .is_none_or(|n| n.is_null())
                .then_some(None);
        };
        let timeout = self.required(&fields, "timeout", &PERSISTENCE_TIMEOUT);
        if distribution == Some(Distribution::IpSrcHash) {
            let message = "pointless with `ip-src-hash`, which already sends a client address \
                           to the same upstream while the available upstreams stay the same \
                           (and moves only the clients of an upstream that leaves); remove it \
                           or choose another distribution"
                .to_owned();
            self.report(fields.mark, fields.path.to_string(), message);
            return None;
        }
        let capped = upstreams
            .unwrap_or_default()
            .iter()
            .find(|u| u.max_connections.is_some());
        if let Some(capped) = capped {
            let message = format!(
                "not with upstream caps yet: upstream `{}` has `max_connections`; remove one \
                 of the two",
                capped.name
            );
            self.report(fields.mark, fields.path.to_string(), message);
            return None;
        }
        Some(Some(Duration::from_secs(timeout?)))
    }

    /// What a distribution needs of the upstreams: `least-latency` measures
    /// health probes, so every upstream needs a health check. A group whose
    /// every weight is 0 takes no connection: valid (all drained) but said.
    fn selection_needs(
        &mut self,
        group: &Fields,
        distribution: Distribution,
        upstreams: &[Upstream],
    ) {
        let items = match group.get("upstreams").map(Node::value) {
            Some(Value::Sequence(items)) => items.as_slice(),
            _ => &[],
        };
        if distribution == Distribution::LeastLatency {
            for (i, (upstream, node)) in upstreams.iter().zip(items).enumerate() {
                if upstream.health_check.is_none() {
                    let message = format!(
                        "`least-latency` picks upstreams by their health probes' round trips, \
                         but upstream `{}` has no health check; give it one or choose another \
                         distribution",
                        upstream.name
                    );
                    self.report(node.mark, format!("{}.upstreams[{i}]", group.path), message);
                }
            }
        }
        if !upstreams.is_empty() && upstreams.iter().all(|u| u.weight == 0) {
            let message =
                "every upstream has weight 0: the target refuses every new connection".to_owned();
            let mark = group.get("upstreams").map_or(group.mark, |n| n.mark);
            self.warn(mark, group.path("upstreams"), message);
        }
    }

    fn upstream(
        &mut self,
        node: &Node,
        path: At,
        target_protocol: Option<Protocol>,
        names: &mut Seen,
    ) -> Option<Upstream> {
        let fields = self.mapping(
            node,
            path,
            &[
                "name",
                "protocol",
                "host",
                "port",
                "health_check",
                "dns",
                "weight",
                "backup",
                "max_connections",
            ],
        )?;
        let name = self.required(&fields, "name", &Name);
        if let Some(name) = &name {
            self.unique_name(Which::Local(names), &fields, name, "upstream");
        }
        let weight = self
            .optional(&fields, "weight", &WEIGHT)
            .map_or(1, |w| u32::try_from(w).expect("at most 1000"));
        let backup = self.optional(&fields, "backup", &Boolean).unwrap_or(false);
        let max_connections = self
            .optional(&fields, "max_connections", &MAX_CONNECTIONS)
            .map(count);
        // Accepted as in the original, where it repeats the target's.
        if let (Some(own), Some(target)) = (
            self.optional(&fields, "protocol", &PROTOCOL),
            target_protocol,
        ) && own != target
        {
            let message = format!(
                "expected `{}` (the target's protocol), found `{}`",
                target.as_str(),
                own.as_str()
            );
            if let Some(node) = fields.get("protocol") {
                self.report(node.mark, fields.path("protocol"), message);
            }
        }
        let host = self.required(&fields, "host", &HostName);
        let port = self.required(&fields, "port", &PORT).map(port_number);
        let health_check = self.health_check(&fields, host.as_ref());
        let dns = self.dns(&fields, host.as_ref());
        Some(Upstream {
            name: name?,
            host: host?,
            port: port?,
            health_check: health_check?,
            dns: dns?,
            weight,
            backup,
            max_connections,
        })
    }

    /// `Some(None)` when there is none: absent, null or an empty mapping.
    /// `host` is the upstream's, the default Host of an http(s) probe.
    fn health_check(
        &mut self,
        upstream: &Fields,
        host: Option<&Host>,
    ) -> Option<Option<HealthCheck>> {
        let node = upstream.get("health_check");
        if node
            .is_none_or(|n| n.is_null() || matches!(n.value(), Value::Mapping(e) if e.is_empty()))
        {
            return Some(None);
        }
        let mut schema = vec!["protocol", "port", "start_available", "probe"];
        schema.extend(PROTOCOL_KEYS.iter().map(|(key, _)| *key));
        let fields = self.optional_mapping(upstream, "health_check", &schema)?;
        let kind = self.required(&fields, "protocol", &HEALTH_PROTOCOL);
        let protocol = self.health_protocol(&fields, kind, host);
        let port = self.required(&fields, "port", &PORT).map(port_number);
        let start_available = self
            .optional(&fields, "start_available", &Boolean)
            .unwrap_or(false);
        let probe = self.required_mapping(
            &fields,
            "probe",
            &[
                "check_interval",
                "timeout",
                "success_count",
                "failure_count",
            ],
        )?;
        let interval = self.required(&probe, "check_interval", &CHECK_INTERVAL);
        let timeout = self.required(&probe, "timeout", &TIMEOUT);
        let success_count = self.required(&probe, "success_count", &COUNT);
        let failure_count = self.defaulted(&probe, "failure_count", &COUNT);
        Some(Some(HealthCheck {
            protocol: protocol?,
            port: port?,
            start_available,
            interval: Duration::from_secs(interval?),
            timeout: Duration::from_secs(timeout?),
            success_count: count(success_count?),
            failure_count: failure_count?.map_or(DEFAULT_FAILURE_COUNT, count),
        }))
    }

    /// The probe of `kind` with its own keys. The keys of other protocols are
    /// reported; with no valid `kind`, every key's value is still checked so
    /// that all errors come at once.
    fn health_protocol(
        &mut self,
        fields: &Fields,
        kind: Option<ProbeKind>,
        host: Option<&Host>,
    ) -> Option<HealthProtocol> {
        for (key, kinds) in PROTOCOL_KEYS {
            if let (Some(kind), Some(node)) = (kind, fields.get(key))
                && !kinds.contains(&kind)
            {
                let message = format!(
                    "not for `{}` checks; only for {}",
                    kind.name(),
                    enumerate(kinds.iter().map(|kind| format!("`{}`", kind.name())))
                );
                self.report(node.mark, fields.path(key), message);
            }
        }
        let send = self.protocol_key(fields, kind, "send", &SEND);
        let expect = self.protocol_key(fields, kind, "expect", &EXPECT);
        let path = self.protocol_key(fields, kind, "path", &UrlPath);
        let http_host = self.protocol_key(fields, kind, "host", &HttpHost);
        let expect_status = self.protocol_key(fields, kind, "expect_status", &Statuses);
        let tls_verify = self.protocol_key(fields, kind, "tls_verify", &Boolean);
        let expect = expect?.map(Arc::from);
        let http = || {
            Some(HttpProbe {
                path: path?.unwrap_or_else(|| PathAndQuery::from_static("/")),
                host: http_host?.or_else(|| host.map(Host::to_string))?,
                expect_status: expect_status?.unwrap_or(DEFAULT_STATUSES),
                expect: expect.clone(),
            })
        };
        Some(match kind? {
            ProbeKind::Tcp => HealthProtocol::Tcp,
            ProbeKind::Udp => HealthProtocol::Udp(UdpProbe {
                send: send?.unwrap_or_default(),
                expect: expect.clone(),
            }),
            ProbeKind::Http => HealthProtocol::Http(http()?),
            ProbeKind::Https => HealthProtocol::Https {
                http: http()?,
                tls_verify: tls_verify?.unwrap_or(true),
            },
            ProbeKind::Sctp => HealthProtocol::Sctp,
        })
    }

    /// A key only some probe protocols take: `Some(None)` when absent or
    /// not taken by `kind` (reported by the caller), `None` when invalid.
    fn protocol_key<W: Want>(
        &mut self,
        fields: &Fields,
        kind: Option<ProbeKind>,
        key: &str,
        want: &W,
    ) -> Option<Option<W::Value>> {
        if kind.is_some_and(|kind| !kind.takes(key)) {
            return Some(None);
        }
        self.defaulted(fields, key, want)
    }
    /// `Some(None)` when absent, null or empty.
    fn dns(&mut self, upstream: &Fields, host: Option<&Host>) -> Option<Option<DnsConfig>> {
        let node = upstream.get("dns").filter(|n| !n.is_null());
        let Some(node) = node else {
            return Some(None);
        };
        if let Some(Host::Ip(ip)) = host {
            let message = format!(
                "only for a host name; the host is the IP address {ip}, which is never resolved"
            );
            self.report(node.mark, upstream.path("dns"), message);
        }
        let fields = self.mapping(
            node,
            upstream.at("dns"),
            &["servers", "ttl", "all_addresses"],
        )?;
        let servers: Vec<_> = self
            .list(&fields, "servers", "a list of resolver addresses", false)
            .into_iter()
            .map(|(path, node)| self.read(node, path, &Resolver))
            .collect();
        let ttl = self.defaulted(&fields, "ttl", &TTL);
        let all_addresses = self.defaulted(&fields, "all_addresses", &Boolean);
        let dns = DnsConfig {
            servers: servers.into_iter().collect::<Option<_>>()?,
            ttl: ttl?.map(Duration::from_secs),
            all_addresses: all_addresses?.unwrap_or(false),
        };
        // One way to say "the host's resolvers, the answer's TTL, one
        // address of each family".
        Some(Some(dns).filter(|dns| *dns != DnsConfig::default()))
    }
}

/// `health_check.protocol` before its keys are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProbeKind {
    Tcp,
    Udp,
    Http,
    Https,
    Sctp,
}

impl ProbeKind {
    fn name(self) -> &'static str {
        HEALTH_PROTOCOL
            .choices
            .iter()
            .find(|(_, kind)| *kind == self)
            .map_or("", |(name, _)| name)
    }

    /// Whether a check of this protocol takes `key` of [`PROTOCOL_KEYS`].
    fn takes(self, key: &str) -> bool {
        PROTOCOL_KEYS
            .iter()
            .any(|(k, kinds)| *k == key && kinds.contains(&self))
    }
}

/// What one `lb` entry holds: its targets, `acceleration` and `nftables`.
type Entry = (
    Vec<Option<Target>>,
    Option<Option<Acceleration>>,
    Option<NftablesKeys>,
);

/// `value` of `key` with where it is written; `None` when absent.
fn located<T>(fields: &Fields, key: &str, value: Option<T>) -> Option<(T, Mark, String)> {
    let node = fields.get(key)?;
    Some((value?, node.mark, fields.path(key)))
}

/// The `nftables` keys one entry gives, with where each is written.
#[derive(Default)]
struct NftablesKeys {
    table: Option<(String, Mark, String)>,
    priority: Option<(i32, Mark, String)>,
}

/// Where a target takes connections, as far as its keys are valid.
struct Listener {
    target: String,
    /// Of its `port`.
    line: usize,
    /// Its `ip`; `None` when that is invalid (and reported).
    ip: Option<Option<IpNet>>,
}

/// Which names a name must differ from.
enum Which<'s> {
    Targets,
    Groups,
    Local(&'s mut Seen),
}

/// `a`, `a and b`, `a, b and c`.
fn enumerate(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    match items.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Whether a target on `ip` (`None`: every local address) takes the
/// connections to `listen`. Lobby's DNAT hooks prerouting, which sees only
/// packets from other hosts: a loopback address is never taken.
pub(crate) fn balances(ip: Option<IpNet>, listen: IpAddr) -> bool {
    if listen.is_loopback() {
        return false;
    }
    match (ip, listen) {
        (None, _) => true,
        (Some(_), listen) if listen.is_unspecified() => true,
        (Some(net), IpAddr::V6(listen)) if let Some(v4) = listen.to_ipv4_mapped() => {
            net.contains(v4.into())
        }
        (Some(net), listen) => net.contains(listen),
    }
}

/// Values read through [`PORT`] fit.
fn port_number(port: u64) -> u16 {
    u16::try_from(port).unwrap_or(u16::MAX)
}

/// Values read through [`COUNT`] and the limits' bounds fit.
fn count(count: u64) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// The message for a key not in `schema`, with the closest known key when one
/// is close enough to be a typo.
fn unknown_key(key: &str, schema: &[&str]) -> String {
    let closest = schema
        .iter()
        .map(|known| (edit_distance(key, known), known))
        .min()
        .filter(|(distance, known)| *distance <= (known.len() / 3).max(1));
    match closest {
        Some((_, known)) => format!("unknown key `{key}`; did you mean `{known}`?"),
        None => format!(
            "unknown key `{key}`; expected one of: {}",
            schema.join(", ")
        ),
    }
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_take_the_addresses_other_hosts_reach() {
        let net = |text: &str| {
            let (addr, len) = text.split_once('/').unwrap();
            Some(IpNet {
                addr: addr.parse().unwrap(),
                prefix_len: len.parse().unwrap(),
            })
        };
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        assert!(balances(None, ip("198.18.0.1")));
        assert!(balances(None, ip("0.0.0.0")));
        assert!(balances(net("198.18.0.0/24"), ip("::")));
        assert!(balances(net("198.18.0.0/24"), ip("198.18.0.1")));
        assert!(balances(net("198.18.0.0/24"), ip("::ffff:198.18.0.1")));
        assert!(!balances(net("198.18.0.0/24"), ip("198.18.1.1")));
        assert!(!balances(net("198.18.0.0/24"), ip("2001:db8::1")));
        assert!(!balances(None, ip("127.0.0.1")));
        assert!(!balances(None, ip("::1")));
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("sucess_count", "success_count"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn suggestions() {
        let schema = [
            "check_interval",
            "timeout",
            "success_count",
            "failure_count",
        ];
        assert_eq!(
            unknown_key("sucess_count", &schema),
            "unknown key `sucess_count`; did you mean `success_count`?"
        );
        assert_eq!(
            unknown_key("retries", &schema),
            "unknown key `retries`; expected one of: check_interval, timeout, success_count, failure_count"
        );
    }
}
