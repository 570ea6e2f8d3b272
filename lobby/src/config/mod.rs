//! Configuration: YAML text to validated types. Pure: no I/O but reading the
//! file in [`load`], no network, no kernel.
//!
//! The types below are what the rest of Lobby consumes; they hold only
//! values that passed validation.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http::uri::PathAndQuery;

mod error;
mod parsed;
mod validate;
mod values;
mod yaml;

pub use error::{ConfigError, ConfigErrors};
pub use parsed::Parsed;

/// Where [`find_default_path`] looks, in this order: Lobby's own name first,
/// then the original Lobby's.
pub const DEFAULT_PATHS: [&str; 4] = [
    "./lobby.yaml",
    "/etc/lobby/lobby.yaml",
    "./lobby.conf",
    "/etc/lobby/lobby.conf",
];

/// The configuration in `text`, or every problem in it; `file` only names
/// the text in the errors.
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigErrors> {
    let document = yaml::parse_document(text);
    parse_root(document.as_ref().map(|d| d.root.as_ref()), file).map(|(config, _)| config)
}

/// The configuration a parsed document holds, and the `defaults` of each
/// `lb` entry.
fn parse_root(
    document: Result<Option<&yaml::Node>, &yaml::SyntaxError>,
    file: &Path,
) -> Result<(Config, Vec<Policy>), ConfigErrors> {
    match document {
        Ok(Some(root)) => validate::config_and_defaults(root, file).map_err(ConfigErrors::new),
        Ok(None) => Err(ConfigErrors::of_document(
            file,
            1,
            1,
            "empty configuration; expected a mapping with the key `lb`".to_owned(),
        )),
        Err(error) => Err(ConfigErrors::of_document(
            file,
            error.mark.line,
            error.mark.column,
            error.message.clone(),
        )),
    }
}

/// The configuration in the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    parse(&read(path)?, path)
}

/// The largest configuration file Lobby reads: far above any real one (a
/// file of 5,000 targets is about 2 MiB), far below what would hurt the
/// daemon's memory.
pub const MAX_FILE_SIZE: u64 = 16 << 20;

/// The text of the file at `path`, which must be a regular file of at most
/// [`MAX_FILE_SIZE`] bytes of UTF-8. Never blocks on what is not a regular
/// file: a FIFO is opened without waiting for a writer, then refused.
pub fn read(path: &Path) -> Result<String, ConfigErrors> {
    let bytes = read_regular_file(path)
        .map_err(|message| ConfigErrors::of_document(path, 0, 0, message))?;
    String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let before = String::from_utf8_lossy(&bytes[..e.utf8_error().valid_up_to()]);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigErrors::of_document(path, line, column, "not UTF-8 text".to_owned())
    })
}

/// The bytes of the regular file at `path`, or what is wrong with it.
fn read_regular_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::{io::Read as _, os::unix::fs::OpenOptionsExt as _};
    // O_NONBLOCK: opening a FIFO for reading would wait for a writer.
    // O_NOCTTY: a terminal never becomes the daemon's controlling one.
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot read: {e}"))?;
    let metadata = file.metadata().map_err(|e| format!("cannot read: {e}"))?;
    if !metadata.is_file() {
        return Err(format!(
            "not a regular file but {}; the configuration must be a regular file",
            file_kind(metadata.file_type())
        ));
    }
    let too_large = |size: String| {
        format!("too large ({size} bytes); the configuration may be at most {MAX_FILE_SIZE} bytes")
    };
    if metadata.len() > MAX_FILE_SIZE {
        return Err(too_large(metadata.len().to_string()));
    }
    // Bounded again while reading: the file may grow after the fstat.
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len()).unwrap_or_default());
    file.take(MAX_FILE_SIZE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    match u64::try_from(bytes.len()) {
        Ok(size) if size <= MAX_FILE_SIZE => Ok(bytes),
        _ => Err(too_large(format!("more than {MAX_FILE_SIZE}"))),
    }
}

/// What a file that is not a regular one is, for an error message.
fn file_kind(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO (named pipe)"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// Why no connection can ever be balanced to `ip`, or `None` when one can:
/// the kernel never forwards to these addresses, so a DNAT to them
/// black-holes its share of the connections. For a configured host this is
/// an error; an address a name resolves to is skipped.
pub fn unusable_upstream(ip: IpAddr) -> Option<&'static str> {
    match ip {
        _ if ip.is_unspecified() => Some("the unspecified address, which names no host"),
        IpAddr::V4(ip) if ip.is_broadcast() => Some("the broadcast address"),
        IpAddr::V4(ip) if ip.octets()[0] == 0 => {
            Some("an address of 0.0.0.0/8, which names no host")
        }
        _ if ip.is_loopback() => Some("a loopback address, which the kernel never forwards to"),
        _ if ip.is_multicast() => Some("a multicast address, which no connection goes to"),
        _ => None,
    }
}

/// The first of [`DEFAULT_PATHS`] that is a file.
pub fn find_default_path() -> Option<PathBuf> {
    first_file(&DEFAULT_PATHS)
}

/// The first of `candidates` that is a file.
pub fn first_file<P: AsRef<Path>>(candidates: &[P]) -> Option<PathBuf> {
    candidates
        .iter()
        .map(|p| p.as_ref())
        .find(|p| p.is_file())
        .map(Path::to_path_buf)
}

/// What a configuration holds, in numbers, for `lobby check`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub targets: usize,
    pub upstreams: usize,
    pub health_checked: usize,
    /// Upstreams whose host is a name to resolve.
    pub fqdn: usize,
}

/// `2 targets, 5 upstreams (3 health-checked, 1 FQDN)`.
impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: usize| if n == 1 { "" } else { "s" };
        write!(
            f,
            "{} target{}, {} upstream{} ({} health-checked, {} FQDN)",
            self.targets,
            plural(self.targets),
            self.upstreams,
            plural(self.upstreams),
            self.health_checked,
            self.fqdn
        )
    }
}

impl Config {
    pub fn summary(&self) -> Summary {
        let upstreams = || self.targets.iter().flat_map(|t| &t.group.upstreams);
        Summary {
            targets: self.targets.len(),
            upstreams: upstreams().count(),
            health_checked: upstreams().filter(|u| u.health_check.is_some()).count(),
            fqdn: upstreams().filter(|u| u.host.is_name()).count(),
        }
    }
}

/// A whole, valid configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Shared, so that a reload that keeps a target keeps it without a copy.
    pub targets: Vec<Arc<Target>>,
    pub metrics: Option<MetricsConfig>,
    pub events: Option<EventsConfig>,
    /// The kernel's flowtable fast path; `None`: off.
    pub acceleration: Option<Acceleration>,
    /// What is valid but probably not meant (a group whose every weight is
    /// 0), with its place: `lobby check` prints them, the daemon logs them.
    pub warnings: Vec<ConfigError>,
    /// Lobby's table and where its nat chains hook.
    pub nftables: Nftables,
}

/// `nftables`: the name of the one table this daemon owns and the priority
/// of its nat chains (prerouting, and output for `local` targets).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Nftables {
    /// A name nft takes as a table name and a file name (the control
    /// socket and the pin directory follow it).
    pub table: String,
    /// Within [`Nftables::PRIORITIES`].
    pub priority: i32,
}

impl Nftables {
    /// The table of Lobby before the key existed.
    pub const DEFAULT_TABLE: &str = "lobby";
    /// nft's `dstnat`: where DNAT hooks by convention.
    pub const DSTNAT: i32 = -100;
    /// Above conntrack (-200: the kernel refuses a nat chain at or below
    /// it) and below the conntrack helpers (300), which must see a
    /// connection with its NAT already set up.
    pub const PRIORITIES: std::ops::RangeInclusive<i32> = -199..=299;
}

impl Default for Nftables {
    fn default() -> Self {
        Self {
            table: Self::DEFAULT_TABLE.to_owned(),
            priority: Self::DSTNAT,
        }
    }
}

/// `acceleration`: established connections Lobby balanced take the
/// flowtable fast path (TCP and UDP; the kernel's flowtable has no SCTP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acceleration {
    /// Ask the NICs to carry the flows themselves (`flags offload`), where
    /// every interface of the flowtable supports it.
    pub hardware_offload: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

/// Who is told about state changes (upstream up or down, target empty or
/// not, reload applied or failed); at least one of `command` and `webhook`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventsConfig {
    /// The program and its arguments, run without a shell; never empty.
    pub command: Option<Vec<String>>,
    /// An `http` or `https` URL with a host, which gets a JSON POST.
    pub webhook: Option<http::Uri>,
    /// How long one delivery (the command, the POST) may take.
    pub timeout: Duration,
}

/// Where traffic arrives on the Lobby host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    /// Only traffic to this local address or range is balanced; `None` is
    /// every local address of both families.
    pub ip: Option<IpNet>,
    pub group: UpstreamGroup,
    /// Who may connect and how upstreams see them: the target's own keys
    /// over its entry's `defaults`.
    pub policy: Policy,
}

impl Target {
    /// Whether its policy or an upstream's cap drops traffic into a named
    /// counter.
    pub fn counts_refusals(&self) -> bool {
        let policy = &self.policy;
        !policy.block.is_empty()
            || policy.allow.is_some()
            || policy.limits != Limits::default()
            || self
                .group
                .upstreams
                .iter()
                .any(|u| u.max_connections.is_some())
    }
}

/// A target's traffic policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Only these sources are balanced; `None`: every source.
    pub allow: Option<Vec<IpNet>>,
    /// These sources are never balanced.
    pub block: Vec<IpNet>,
    pub source_nat: SourceNat,
    /// Only traffic arriving on this interface is balanced.
    pub interface: Option<String>,
    /// Connections opened on the Lobby host itself are balanced too.
    pub local: bool,
    /// Every packet of the target's connections is copied to this host
    /// (a neighbour: the copy goes to it as a next hop).
    pub mirror: Option<IpAddr>,
    pub limits: Limits,
}

/// How many new connections a target takes, how fast (`limits`): for the
/// whole target and for each client address. Over a limit, a new
/// connection is dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub target: Limit,
    pub per_source: Limit,
}

/// The limits of one scope (the target, or one client address); `None`:
/// unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limit {
    pub rate: Option<Rate>,
    /// Connections open at once, as conntrack holds them.
    pub max_connections: Option<u32>,
}

/// A token bucket of new connections: `per_second` on average, up to
/// `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// The source address upstreams see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SourceNat {
    /// The egress interface's address (the original behaviour).
    #[default]
    Masquerade,
    /// The client's own: replies must route back through the Lobby host.
    None,
    /// This address, or spread over this pool.
    Addresses(Vec<IpAddr>),
    /// Spread over the addresses from the first to the last.
    Range(IpAddr, IpAddr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

/// An IP address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    /// As `lobby stats --json` and the metrics say it.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

/// An address with a prefix length (a plain address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    /// The network address (host bits are zero).
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpNet {
    pub fn family(&self) -> Family {
        Family::of(self.addr)
    }

    /// Whether `ip` is in this range; an address of the other family never
    /// is.
    pub fn contains(self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamGroup {
    pub name: String,
    pub distribution: Distribution,
    pub upstreams: Vec<Upstream>,
    /// A client address keeps its upstream for new connections until it
    /// opened none for this long, or the upstream leaves rotation; `None`:
    /// every new connection is balanced afresh.
    pub persistence: Option<Duration>,
}

/// How new connections are spread over a group's upstreams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    /// The next upstream in turn, in proportion to weights.
    RoundRobin,
    /// An upstream drawn at random, in proportion to weights.
    Random,
    /// The client's address picks the upstream.
    IpSrcHash,
    /// The upstreams with the fewest established connections (per weight),
    /// as conntrack counts them.
    LeastConnections,
    /// The upstreams whose health probes' recent round trips are lowest.
    LeastLatency,
}

impl Distribution {
    pub fn as_str(self) -> &'static str {
        match self {
            Distribution::RoundRobin => "round-robin",
            Distribution::Random => "random",
            Distribution::IpSrcHash => "ip-src-hash",
            Distribution::LeastConnections => "least-connections",
            Distribution::LeastLatency => "least-latency",
        }
    }

    /// Whether the daemon picks the upstreams from what it measures, rather
    /// than the kernel alone from the configuration.
    pub fn is_dynamic(self) -> bool {
        matches!(
            self,
            Distribution::LeastConnections | Distribution::LeastLatency
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    pub host: Host,
    pub port: u16,
    /// `None`: no health check, the upstream is always available.
    pub health_check: Option<HealthCheck>,
    /// Only for an FQDN host; `None` means the host's resolvers with the
    /// answer's TTL.
    pub dns: Option<DnsConfig>,
    /// Share of new connections, 0..=1000 (default 1); 0 drains: no new
    /// connections, established ones continue.
    pub weight: u32,
    /// Receives new connections only while no other upstream of the group
    /// is available.
    pub backup: bool,
    /// Connections open to it at once; at the limit, new connections go to
    /// another upstream.
    pub max_connections: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    Ip(IpAddr),
    /// A valid FQDN, lower-cased, without a trailing dot.
    Fqdn(String),
}

impl Host {
    /// Whether the host is a name, which a resolver turns into addresses.
    pub fn is_name(&self) -> bool {
        matches!(self, Host::Fqdn(_))
    }
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Ip(ip) => ip.fmt(f),
            Host::Fqdn(name) => f.write_str(name),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub protocol: HealthProtocol,
    pub port: u16,
    pub start_available: bool,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that make an unavailable upstream available.
    pub success_count: u32,
    /// Consecutive failures that make an available upstream unavailable.
    pub failure_count: u32,
}

/// How an upstream is probed, with what only that protocol takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HealthProtocol {
    /// A connect that completes within the timeout.
    Tcp,
    /// A datagram out, any reply back.
    Udp(UdpProbe),
    Http(HttpProbe),
    Https {
        http: HttpProbe,
        tls_verify: bool,
    },
    /// An association set up within the timeout.
    Sctp,
}

impl HealthProtocol {
    pub fn as_str(&self) -> &'static str {
        match self {
            HealthProtocol::Tcp => "tcp",
            HealthProtocol::Udp(_) => "udp",
            HealthProtocol::Http(_) => "http",
            HealthProtocol::Https { .. } => "https",
            HealthProtocol::Sctp => "sctp",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpProbe {
    /// The datagram's payload; may be empty.
    pub send: String,
    /// A reply must contain this; `None` takes any reply.
    pub expect: Option<Arc<str>>,
}

/// A `GET` whose answer must have a status in `expect_status` and, when
/// `expect` is set, a body that contains it. Redirects are not followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProbe {
    pub path: PathAndQuery,
    /// The Host header and, over TLS, the name the certificate must be valid
    /// for: a host name or an IP address (an IPv6 one without brackets).
    pub host: String,
    pub expect_status: StatusRange,
    pub expect: Option<Arc<str>>,
}

/// HTTP status codes `first..=last`, within 100..=599.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatusRange {
    pub first: u16,
    pub last: u16,
}

impl StatusRange {
    pub fn contains(self, status: u16) -> bool {
        (self.first..=self.last).contains(&status)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsConfig {
    /// Asked in order; empty means the host's resolvers (/etc/resolv.conf).
    pub servers: Vec<SocketAddr>,
    /// Overrides the answer's TTL as the re-resolution period.
    pub ttl: Option<Duration>,
    /// Every address of the answer is a backend (DNS load balancing);
    /// without it the upstream holds one address of each family.
    pub all_addresses: bool,
}
