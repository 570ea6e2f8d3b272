//! The desired state: for each target, the upstreams new connections go to.
//! Derived purely from the configuration and what health checks and DNS
//! currently say about each upstream.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::time::Instant;

use crate::config::{Config, Family, HealthCheck, Host, IpNet, Protocol};

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
    pub address: Option<IpAddr>,
    pub available: bool,
}

impl UpstreamState {
    /// How an upstream starts: at its static address (a host name waits for
    /// DNS), available unless its health check says to start unavailable.
    pub fn at_start(host: &Host, health_check: Option<&HealthCheck>) -> Self {
        Self {
            address: match host {
                Host::Ip(ip) => Some(*ip),
                Host::Fqdn(_) => None,
            },
            available: health_check.is_none_or(|h| h.start_available),
        }
    }
}

/// The ruleset's content, independent of how nftables spells it. Sorted
/// maps keep rendering deterministic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub targets: BTreeMap<String, DesiredTarget>,
    /// Upstreams no target sends new connections to any more, still
    /// masqueraded for a moment: a packet DNAT'd under the previous ruleset
    /// may reach the masquerade rule after the new one is committed.
    pub lingering: BTreeSet<Backend>,
}

/// An upstream as the masquerade rule matches it.
pub type Backend = (SocketAddr, Protocol);

/// How long a backend stays masqueraded after it leaves every target.
pub const BACKEND_LINGER: Duration = Duration::from_secs(2);

impl Desired {
    /// Every upstream some target sends new connections to.
    pub fn balanced(&self) -> BTreeSet<Backend> {
        self.targets
            .values()
            .flat_map(|t| {
                t.families
                    .iter()
                    .flat_map(|f| &f.upstreams)
                    .map(|u| (*u, t.protocol))
            })
            .collect()
    }

    /// The upstreams whose connections are masqueraded.
    pub fn backends(&self) -> BTreeSet<Backend> {
        self.balanced().union(&self.lingering).copied().collect()
    }
}

/// The lingering backends after a change from `before` to `after` at
/// `now`: those `before` masqueraded that `after` no longer balances stay
/// until their deadline in `lingering` (set at first sight), unless they are
/// balanced again.
pub fn linger(
    before: &BTreeSet<Backend>,
    after: &BTreeSet<Backend>,
    lingering: &mut BTreeMap<Backend, Instant>,
    now: Instant,
) {
    for backend in before.difference(after) {
        lingering.entry(*backend).or_insert(now + BACKEND_LINGER);
    }
    lingering.retain(|backend, until| !after.contains(backend) && *until > now);
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredTarget {
    pub protocol: Protocol,
    pub port: u16,
    pub ip: Option<IpNet>,
    /// The families the target serves, IPv4 first: netfilter cannot
    /// translate between families, so each has its own rotation.
    pub families: Vec<FamilyRotation>,
}

impl DesiredTarget {
    /// Whether no client of any family can be balanced.
    pub fn is_empty(&self) -> bool {
        self.families.iter().all(|f| f.upstreams.is_empty())
    }
}

/// The rotation of one family of a target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FamilyRotation {
    pub family: Family,
    /// Available upstreams of the family with a known address, in
    /// configuration order: round robin walks them in this order.
    pub upstreams: Vec<SocketAddr>,
}

impl Desired {
    /// Every upstream of `config` whose state says it is available and has
    /// an address; upstreams missing from `states` are left out. A target
    /// serves the family of its `ip`, or both without one; IPv6 only when
    /// `ipv6` (forwarding) allows it.
    pub fn from_config(
        config: &Config,
        states: &BTreeMap<UpstreamId, UpstreamState>,
        ipv6: bool,
    ) -> Self {
        let targets = config
            .targets
            .iter()
            .map(|target| {
                let upstreams: Vec<SocketAddr> = target
                    .group
                    .upstreams
                    .iter()
                    .filter_map(|upstream| {
                        let state = states.get(&UpstreamId::new(&target.name, &upstream.name))?;
                        let address = state.address.filter(|_| state.available)?;
                        Some(SocketAddr::new(address, upstream.port))
                    })
                    .collect();
                let families = Family::BOTH
                    .into_iter()
                    .filter(|f| target.ip.is_none_or(|ip| ip.family() == *f))
                    .filter(|f| ipv6 || *f == Family::Ipv4)
                    .map(|family| FamilyRotation {
                        family,
                        upstreams: upstreams
                            .iter()
                            .filter(|u| Family::of(u.ip()) == family)
                            .copied()
                            .collect(),
                    })
                    .collect();
                let desired = DesiredTarget {
                    protocol: target.protocol,
                    port: target.port,
                    ip: target.ip,
                    families,
                };
                (target.name.clone(), desired)
            })
            .collect();
        Self {
            targets,
            lingering: BTreeSet::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(host: u8) -> Backend {
        (SocketAddr::from(([198, 18, 1, host], 9000)), Protocol::Tcp)
    }

    #[test]
    fn removed_backends_linger_until_their_deadline() {
        let now = Instant::now();
        let mut lingering = BTreeMap::new();
        let both = BTreeSet::from([backend(1), backend(2)]);
        let one = BTreeSet::from([backend(1)]);
        linger(&both, &one, &mut lingering, now);
        assert_eq!(
            lingering,
            BTreeMap::from([(backend(2), now + BACKEND_LINGER)])
        );
        // A later change keeps the first deadline.
        linger(&one, &one, &mut lingering, now + Duration::from_secs(1));
        assert_eq!(lingering.get(&backend(2)), Some(&(now + BACKEND_LINGER)));
        linger(&one, &one, &mut lingering, now + BACKEND_LINGER);
        assert!(lingering.is_empty());
    }

    #[test]
    fn a_backend_balanced_again_stops_lingering() {
        let now = Instant::now();
        let mut lingering = BTreeMap::new();
        let both = BTreeSet::from([backend(1), backend(2)]);
        linger(&both, &BTreeSet::from([backend(1)]), &mut lingering, now);
        linger(&both, &both, &mut lingering, now);
        assert!(lingering.is_empty());
    }
}
