//! Route lookups over rtnetlink: which interfaces the kernel sends the
//! traffic for given addresses through, by index and name (what the
//! counters attach to), every interface with its addresses (what the
//! flowtable's client side is chosen from), and when any of that may have
//! changed.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::IpAddr,
    sync::Arc,
};

use futures_util::{StreamExt as _, TryStreamExt as _, stream};
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkFlags},
        route::{RouteAttribute, RouteType},
    },
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

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

/// Which addresses a lookup asks the kernel about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Only addresses not looked up before: what a change of the upstreams
    /// needs, cheap at 10,000 upstreams when one changes.
    NewAddresses,
    /// Every address again: routes and interfaces change under a running
    /// daemon.
    All,
}

/// Where the kernel sends the traffic for one address.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    Via(Interface),
    /// Traffic to this host is not forwarded: nothing to count.
    Local,
    Unroutable,
}

// rtnetlink's multicast groups (linux/rtnetlink.h): what a route lookup's
// answer and the interfaces' list depend on.
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV4_RULE: u32 = 8;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RTNLGRP_IPV6_RULE: u32 = 19;

/// Sends `()` on `changed` whenever the kernel says a link, an address, a
/// route or a routing rule changed (or that such news was lost), until
/// `cancel`. Without the notifications (the socket cannot be opened, or
/// fails), every `fallback` instead, as a lookup of every route used to
/// run: at 10,000 upstreams that pass costs ~175 ms of CPU.
pub async fn watch_routes(
    changed: mpsc::Sender<()>,
    fallback: std::time::Duration,
    cancel: CancellationToken,
) {
    let groups = [
        RTNLGRP_LINK,
        RTNLGRP_IPV4_IFADDR,
        RTNLGRP_IPV4_ROUTE,
        RTNLGRP_IPV4_RULE,
        RTNLGRP_IPV6_IFADDR,
        RTNLGRP_IPV6_ROUTE,
        RTNLGRP_IPV6_RULE,
    ];
    let failure = match crate::nfnetlink::subscribe(libc::NETLINK_ROUTE, &groups) {
        Ok(socket) => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let received = tokio::select! {
                    () = cancel.cancelled() => return,
                    received = crate::nfnetlink::receive(&socket, &mut buf) => received,
                };
                match received {
                    Err(e) if e.raw_os_error() != Some(libc::ENOBUFS) => break e.to_string(),
                    // What arrived is not read: any change means looking
                    // again, and the receiver rate-limits the lookups.
                    _ => {
                        let _ = changed.try_send(());
                    }
                }
            }
        }
        Err(e) => e.to_string(),
    };
    warn!(
        error = %failure,
        "following the kernel's route changes: every route toward the upstreams is looked up every {} s instead",
        fallback.as_secs()
    );
    let mut every = tokio::time::interval(fallback);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = every.tick() => {
                let _ = changed.try_send(());
            }
        }
    }
}

/// The route toward each address as last looked up, so that a change of
/// the upstreams asks the kernel about the new addresses only, and an
/// address without a route is reported when it loses it, not at every
/// lookup.
#[derive(Debug, Default)]
pub struct Routes {
    known: HashMap<IpAddr, Route>,
}

/// Route lookups in flight at once: one netlink socket answers them in
/// any order, so a full pass costs round trips / this.
const CONCURRENT_LOOKUPS: usize = 64;

impl Routes {
    /// The interfaces the kernel routes `addresses` through, as `ip route
    /// get` would answer, forgetting the addresses not asked for. An
    /// address without a route (or with a local one) is left out: its
    /// traffic cannot flow, and the other addresses still count.
    pub async fn interfaces_toward(
        &mut self,
        addresses: &BTreeSet<IpAddr>,
        lookup: Lookup,
    ) -> Result<BTreeSet<Interface>, NetlinkError> {
        let forgotten: BTreeSet<IpAddr> = self
            .known
            .keys()
            .filter(|a| !addresses.contains(a))
            .copied()
            .collect();
        self.update(&forgotten, addresses, lookup).await
    }

    /// [`Self::interfaces_toward`] the addresses known before but
    /// `forgotten`, and `new`: a change of a few upstreams among 10,000
    /// walks only theirs (and the routes, for the interfaces).
    pub async fn update(
        &mut self,
        forgotten: &BTreeSet<IpAddr>,
        new: &BTreeSet<IpAddr>,
        lookup: Lookup,
    ) -> Result<BTreeSet<Interface>, NetlinkError> {
        for address in forgotten {
            self.known.remove(address);
        }
        let unknown = new.iter().filter(|a| !self.known.contains_key(a)).copied();
        let asked: Vec<IpAddr> = match lookup {
            Lookup::All => self.known.keys().copied().chain(unknown).collect(),
            Lookup::NewAddresses => unknown.collect(),
        };
        if !asked.is_empty() {
            for (address, route) in look_up(&asked).await? {
                self.learn(address, route);
            }
        }
        Ok(self
            .known
            .values()
            .filter_map(|route| match route {
                Route::Via(interface) => Some(interface.clone()),
                Route::Local | Route::Unroutable => None,
            })
            .collect())
    }

    fn learn(&mut self, address: IpAddr, found: Result<Route, LookupError>) {
        let route = match found {
            Ok(route) => route,
            Err(reason) => {
                if self.known.get(&address) != Some(&Route::Unroutable) {
                    warn!(
                        %address,
                        %reason,
                        "upstream address {address} has no route ({reason}); its traffic is not counted"
                    );
                }
                Route::Unroutable
            }
        };
        if self.known.get(&address) == Some(&Route::Unroutable) && route != Route::Unroutable {
            info!(%address, "upstream address {address} has a route again; its traffic is counted");
        }
        self.known.insert(address, route);
    }
}

/// One route lookup per address, [`CONCURRENT_LOOKUPS`] at a time, and
/// one dump of the interfaces for their names.
async fn look_up(
    addresses: &[IpAddr],
) -> Result<Vec<(IpAddr, Result<Route, LookupError>)>, NetlinkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
    // Ends when the last handle is dropped, at the end of this function.
    tokio::spawn(connection);
    let names = Arc::new(named_links(&handle).await?);
    let routes = stream::iter(addresses.iter().copied())
        .map(move |address| {
            let (handle, names) = (handle.clone(), names.clone());
            async move { (address, route_toward(&handle, &names, address).await) }
        })
        .buffer_unordered(CONCURRENT_LOOKUPS)
        .collect()
        .await;
    Ok(routes)
}

/// Every named interface of the namespace by index, with whether it is a
/// loopback.
async fn named_links(handle: &Handle) -> Result<BTreeMap<u32, (String, bool)>, NetlinkError> {
    let mut links = BTreeMap::new();
    let mut dump = handle.link().get().execute();
    while let Some(link) = dump.try_next().await.map_err(NetlinkError::Dump)? {
        let loopback = link.header.flags.contains(LinkFlags::Loopback);
        if let Some(name) = link.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name),
            _ => None,
        }) {
            links.insert(link.header.index, (name, loopback));
        }
    }
    Ok(links)
}

/// Every interface of the namespace, with its addresses.
pub async fn links() -> Result<Vec<crate::accel::Link>, NetlinkError> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
    tokio::spawn(connection);
    let mut links: BTreeMap<u32, crate::accel::Link> = named_links(&handle)
        .await?
        .into_iter()
        .map(|(index, (name, loopback))| {
            let link = crate::accel::Link {
                name,
                loopback,
                addresses: Vec::new(),
            };
            (index, link)
        })
        .collect();
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

async fn route_toward(
    handle: &Handle,
    names: &BTreeMap<u32, (String, bool)>,
    address: IpAddr,
) -> Result<Route, LookupError> {
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
        return Ok(Route::Local);
    }
    let index = route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Oif(index) => Some(*index),
            _ => None,
        })
        .ok_or(LookupError::NoInterface)?;
    // An interface created after the dump: its name on the next lookup.
    let (name, _) = names.get(&index).ok_or(LookupError::NoLink { index })?;
    Ok(Route::Via(Interface {
        name: name.clone(),
        index,
    }))
}
