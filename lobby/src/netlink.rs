//! Route lookups over rtnetlink: which interfaces the kernel sends the
//! traffic for given addresses through, by index and name (what the
//! counters attach to), and every interface with its addresses (what the
//! flowtable's client side is chosen from).
use std::{collections::BTreeSet, io, net::IpAddr};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkFlags},
        route::{RouteAttribute, RouteType},
    },
};
use tracing::warn;

/// A network interface as the kernel names it now. The index tells a
/// recreated interface from the one it replaced under the same name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interface {
    pub name: String,
    pub index: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket")]
    Connect(#[source] io::Error),
    #[error("listing the interfaces and their addresses")]
    Dump(#[source] rtnetlink::Error),
}

/// Why one address has no interface to count on.
#[derive(Debug, thiserror::Error)]
enum LookupError {
    #[error(transparent)]
    Netlink(#[from] rtnetlink::Error),
    #[error("the kernel answered no route")]
    NoRoute,
    #[error("the route names no output interface")]
    NoInterface,
    #[error("interface {index} is gone or has no name")]
    NoLink { index: u32 },
}

/// The interfaces the kernel routes each of `addresses` through, as
/// `ip route get` would answer. An address without a route (or with a local
/// one: traffic to this host is not forwarded) is left out with a warning:
/// its traffic cannot flow anyway, and the other addresses still count.
pub async fn interfaces_toward(
    addresses: &BTreeSet<IpAddr>,
) -> Result<BTreeSet<Interface>, NetlinkError> {
    if addresses.is_empty() {
        return Ok(BTreeSet::new());
    }
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
    // Ends when the last handle is dropped, at the end of this function.
    tokio::spawn(connection);
    let mut interfaces = BTreeSet::new();
    for &address in addresses {
        match interface_toward(&handle, address).await {
            Ok(Some(interface)) => {
                interfaces.insert(interface);
            }
            Ok(None) => {}
            Err(reason) => warn!(
                %address,
                %reason,
                "upstream address {address} has no route ({reason}); its traffic is not counted"
            ),
        }
    }
    Ok(interfaces)
}

/// Every interface of the namespace, with its addresses.
pub async fn links() -> Result<Vec<crate::accel::Link>, NetlinkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
    tokio::spawn(connection);
    let mut links = std::collections::BTreeMap::new();
    let mut dump = handle.link().get().execute();
    while let Some(link) = dump.try_next().await.map_err(NetlinkError::Dump)? {
        let name = link.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name),
            _ => None,
        });
        if let Some(name) = name {
            links.insert(
                link.header.index,
                crate::accel::Link {
                    name,
                    loopback: link.header.flags.contains(LinkFlags::Loopback),
                    addresses: Vec::new(),
                },
            );
        }
    }
    let mut dump = handle.address().get().execute();
    while let Some(message) = dump.try_next().await.map_err(NetlinkError::Dump)? {
        let Some(link) = links.get_mut(&message.header.index) else {
            continue;
        };
        // IFA_LOCAL is the interface's own address where it differs from
        // IFA_ADDRESS (the peer's, on point-to-point links).
        let local = message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = local.or_else(|| {
            message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        link.addresses.extend(address);
    }
    Ok(links.into_values().collect())
}

/// The interface toward `address`, `None` for a local address.
async fn interface_toward(
    handle: &Handle,
    address: IpAddr,
) -> Result<Option<Interface>, LookupError> {
    let prefix = if address.is_ipv4() { 32 } else { 128 };
    let query = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(address, prefix)
        .expect("a full-length prefix of the address's own family")
        .build();
    let route = handle
        .route()
        .get(query)
        .execute()
        .try_next()
        .await?
        .ok_or(LookupError::NoRoute)?;
    if route.header.kind == RouteType::Local {
        return Ok(None);
    }
    let index = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Oif(index) => Some(*index),
            _ => None,
        })
        .ok_or(LookupError::NoInterface)?;
    let link = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await?
        .ok_or(LookupError::NoLink { index })?;
    let name = link
        .attributes
        .into_iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name),
            _ => None,
        })
        .ok_or(LookupError::NoLink { index })?;
    Ok(Some(Interface { name, index }))
}
