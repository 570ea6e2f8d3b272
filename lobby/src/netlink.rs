//! Route lookups over rtnetlink: which interfaces the kernel sends the
//! traffic for given addresses through, by index and name. What the
//! counters attach to.
use std::{collections::BTreeSet, io, net::IpAddr};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        link::LinkAttribute,
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
