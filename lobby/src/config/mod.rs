//! Configuration: YAML text to validated types. Pure: no I/O but reading the
//! file in [`load`], no network, no kernel.
//!
//! The types below are what the rest of Lobby consumes; they hold only
//! values that passed validation.
use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http::uri::PathAndQuery;

mod error;
mod validate;
mod values;
mod yaml;

pub use error::{ConfigError, ConfigErrors};

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
    match yaml::parse(text) {
        Ok(Some(root)) => validate::config(&root, file).map_err(ConfigErrors::new),
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
            error.message,
        )),
    }
}

/// The configuration in the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    parse(&read(path)?, path)
}

/// The text of the file at `path`, which must be UTF-8.
pub fn read(path: &Path) -> Result<String, ConfigErrors> {
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigErrors::of_document(path, 0, 0, format!("cannot read: {e}")))?;
    String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let before = String::from_utf8_lossy(&bytes[..e.utf8_error().valid_up_to()]);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ConfigErrors::of_document(path, line, column, "not UTF-8 text".to_owned())
    })
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
            fqdn: upstreams()
                .filter(|u| matches!(u.host, Host::Fqdn(_)))
                .count(),
        }
    }
}

/// A whole, valid configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub targets: Vec<Target>,
    pub metrics: Option<MetricsConfig>,
    pub events: Option<EventsConfig>,
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
    /// every local address.
    pub ip: Option<Ipv4Net>,
    pub group: UpstreamGroup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
        }
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
        }
    }
}

/// An IPv4 address with a prefix length; a plain address is a /32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ipv4Net {
    /// The network address (host bits are zero).
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamGroup {
    pub name: String,
    pub distribution: Distribution,
    pub upstreams: Vec<Upstream>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distribution {
    RoundRobin,
}

impl Distribution {
    pub fn as_str(self) -> &'static str {
        match self {
            Distribution::RoundRobin => "round-robin",
        }
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
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    Ip(Ipv4Addr),
    /// A valid FQDN, lower-cased, without a trailing dot.
    Fqdn(String),
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

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DnsConfig {
    /// Asked in order; empty means the host's resolvers (/etc/resolv.conf).
    pub servers: Vec<SocketAddr>,
    /// Overrides the answer's TTL as the re-resolution period.
    pub ttl: Option<Duration>,
}
