//! The desired state: for each target, the upstreams new connections go to.
//! Derived purely from the configuration and what health checks and DNS
//! currently say about each upstream.
use std::{
    collections::BTreeMap,
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

use crate::config::{Config, Ipv4Net, Protocol};

/// Names one upstream of one target, as operators read it in logs:
/// `web/web1`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamId {
    pub target: String,
    pub upstream: String,
}

impl UpstreamId {
    pub fn new(target: impl Into<String>, upstream: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            upstream: upstream.into(),
        }
    }
}

impl fmt::Display for UpstreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.target, self.upstream)
    }
}

/// What the control plane currently knows about one upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamState {
    /// `None` while an FQDN has never resolved.
    pub address: Option<Ipv4Addr>,
    pub available: bool,
}

/// The ruleset's content, independent of how nftables spells it. Sorted
/// maps keep rendering deterministic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub targets: BTreeMap<String, DesiredTarget>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTarget {
    pub protocol: Protocol,
    pub port: u16,
    pub ip: Option<Ipv4Net>,
    /// Available upstreams with a known address, in configuration order:
    /// round robin walks them in this order.
    pub upstreams: Vec<SocketAddrV4>,
}

impl Desired {
    /// Every upstream of `config` whose state says it is available and has
    /// an address; upstreams missing from `states` are left out.
    pub fn from_config(config: &Config, states: &BTreeMap<UpstreamId, UpstreamState>) -> Self {
        let targets = config
            .targets
            .iter()
            .map(|target| {
                let upstreams = target
                    .group
                    .upstreams
                    .iter()
                    .filter_map(|upstream| {
                        let state = states.get(&UpstreamId::new(&target.name, &upstream.name))?;
                        let address = state.address.filter(|_| state.available)?;
                        Some(SocketAddrV4::new(address, upstream.port))
                    })
                    .collect();
                let desired = DesiredTarget {
                    protocol: target.protocol,
                    port: target.port,
                    ip: target.ip,
                    upstreams,
                };
                (target.name.clone(), desired)
            })
            .collect();
        Self { targets }
    }
}
