//! Packet acceleration (SPEC "Packet acceleration"): which interfaces the
//! flowtable covers, and what the desired state holds of it. Pure: the
//! interfaces come from [`crate::netlink`], the ruleset is
//! [`crate::nft`]'s.
//!
//! The flowtable's fast path starts at the ingress hook of the interface a
//! packet arrives on, so it must cover both sides of Lobby's traffic:
//! - the upstream side: the interfaces the kernel routes each upstream
//!   through (the counters' interfaces);
//! - the client side: every interface with a local address inside a
//!   target's `ip`; a target without `ip` balances traffic to every local
//!   address, arriving on any interface, so then every interface but
//!   loopback (connections from this host itself are not forwarded and
//!   never take the fast path).
//!
//! A flow whose interfaces are outside the flowtable is still balanced and
//! counted, on the slow path.
use std::{collections::BTreeSet, net::IpAddr};

use crate::config::{Acceleration, Config, IpNet};

/// An interface as the flowtable's client side is chosen from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub loopback: bool,
    pub addresses: Vec<IpAddr>,
}

/// Where clients' traffic arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientSide {
    /// Some target has no `ip`: any interface.
    Everywhere,
    /// The interfaces with an address inside one of these.
    Within(Vec<IpNet>),
}

/// What the daemon looks up, every time the counters' interfaces are looked
/// up, to know the flowtable's interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceQuery {
    pub client_side: ClientSide,
    /// Every upstream address with a known address.
    pub upstreams: BTreeSet<IpAddr>,
    /// Whether to find out if every interface can offload flows.
    pub hardware_offload: bool,
}

impl DeviceQuery {
    /// The query of `config` with acceleration on, over `upstreams`.
    pub fn of(config: &Config, upstreams: BTreeSet<IpAddr>) -> Option<Self> {
        let acceleration = config.acceleration?;
        let ips: Option<Vec<IpNet>> = config.targets.iter().map(|t| t.ip).collect();
        Some(Self {
            client_side: ips.map_or(ClientSide::Everywhere, ClientSide::Within),
            upstreams,
            hardware_offload: acceleration.hardware_offload,
        })
    }
}

/// The client side's interfaces among `links`.
pub fn client_interfaces(links: &[Link], side: &ClientSide) -> BTreeSet<String> {
    links
        .iter()
        .filter(|link| !link.loopback)
        .filter(|link| match side {
            ClientSide::Everywhere => true,
            ClientSide::Within(nets) => link
                .addresses
                .iter()
                .any(|address| nets.iter().any(|net| net.contains(*address))),
        })
        .map(|link| link.name.clone())
        .collect()
}

/// What the data plane found: the interfaces, and whether all of them can
/// offload flows to hardware (`false` when not asked).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Devices {
    pub names: BTreeSet<String>,
    pub offload: bool,
}

/// The flowtable as the desired state holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flowtable {
    /// Never empty: a flowtable without interfaces is not rendered.
    pub devices: BTreeSet<String>,
    /// `flags offload`.
    pub offload: bool,
}

/// The flowtable that `acceleration` asks for over `devices`, `None` when
/// off, or while no interface is known.
pub fn flowtable(
    acceleration: Option<Acceleration>,
    devices: Option<&Devices>,
) -> Option<Flowtable> {
    let acceleration = acceleration?;
    let devices = devices.filter(|d| !d.names.is_empty())?;
    Some(Flowtable {
        devices: devices.names.clone(),
        offload: acceleration.hardware_offload && devices.offload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, loopback: bool, addresses: &[&str]) -> Link {
        Link {
            name: name.to_owned(),
            loopback,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn the_client_side_is_where_the_targets_addresses_are() {
        let links = [
            link("lo", true, &["127.0.0.1", "::1"]),
            link("eth0", false, &["198.18.0.1", "fe80::1"]),
            link("eth1", false, &["198.18.1.1"]),
            link("down0", false, &[]),
        ];
        let all = client_interfaces(&links, &ClientSide::Everywhere);
        assert_eq!(
            all,
            BTreeSet::from(["eth0", "eth1", "down0"].map(String::from))
        );
        let vip = IpNet {
            addr: [198, 18, 0, 0].into(),
            prefix_len: 24,
        };
        let within = client_interfaces(&links, &ClientSide::Within(vec![vip]));
        assert_eq!(within, BTreeSet::from(["eth0".to_owned()]));
        // Loopback never, even when a target's range covers its address.
        let local = IpNet {
            addr: [127, 0, 0, 0].into(),
            prefix_len: 8,
        };
        assert!(client_interfaces(&links, &ClientSide::Within(vec![local])).is_empty());
    }

    #[test]
    fn offload_needs_both_the_ask_and_every_interface() {
        let devices = Devices {
            names: BTreeSet::from(["eth0".to_owned()]),
            offload: true,
        };
        let asked = Some(Acceleration {
            hardware_offload: true,
        });
        let software = Some(Acceleration {
            hardware_offload: false,
        });
        assert!(flowtable(asked, Some(&devices)).unwrap().offload);
        assert!(!flowtable(software, Some(&devices)).unwrap().offload);
        let unable = Devices {
            offload: false,
            ..devices.clone()
        };
        assert!(!flowtable(asked, Some(&unable)).unwrap().offload);
        assert_eq!(flowtable(None, Some(&devices)), None);
        assert_eq!(flowtable(asked, None), None);
        assert_eq!(flowtable(asked, Some(&Devices::default())), None);
    }
}
