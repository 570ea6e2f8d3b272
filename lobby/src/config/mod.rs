//! Configuration: YAML text to validated types. Pure: no I/O but reading the
//! file in [`load`], no network, no kernel.
//!
//! The types below are what the rest of Lobby consumes; they hold only
//! values that passed validation.
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

/// A whole, valid configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub targets: Vec<Target>,
    pub metrics: Option<MetricsConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
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
    pub protocol: Protocol,
    pub port: u16,
    pub start_available: bool,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that make an unavailable upstream available.
    pub success_count: u32,
    /// Consecutive failures that make an available upstream unavailable.
    pub failure_count: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DnsConfig {
    /// Asked in order; empty means the host's resolvers (/etc/resolv.conf).
    pub servers: Vec<SocketAddr>,
    /// Overrides the answer's TTL as the re-resolution period.
    pub ttl: Option<Duration>,
}
mod interim;
pub use interim::*;
