//! The data plane as the daemon's loop sees it: a transaction to apply, a
//! table to list, counters to keep and read. [`DataPlane`] is what the loop
//! is written against; [`KernelPlane`] is the real one (nft, eBPF, the
//! interfaces toward the upstreams) and tests bring a recording fake.
use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::IpAddr,
    sync::{Arc, Mutex, OnceLock},
};

use lobby_common::UpstreamCounters;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    accel::{self, DeviceQuery, Devices},
    ebpf::{self, Counters},
    model::{Backend, BackendDelta},
    netlink::Routes,
    nft::{self, NftError, Rotation},
    table_watch::{Heard, TableWatch},
};

/// What the loop needs from the kernel. Methods take `&self`: the loop
/// runs applies and map reads on tasks of their own, so that the task that
/// owns the state never waits for the kernel.
pub trait DataPlane: Send + Sync + 'static {
    /// The rotation of a table a dead run left, `None` without one.
    fn existing_rotation(&self) -> impl Future<Output = Result<Option<Rotation>, NftError>> + Send;
    /// Runs one transaction: all of it or none of it.
    fn apply(&self, script: String) -> impl Future<Output = Result<(), NftError>> + Send;
    /// Lobby's table as text, `None` when it does not exist.
    fn list_table(&self) -> impl Future<Output = Result<Option<String>, NftError>> + Send;
    /// Counts the backends `change` adds from now on, and no longer those
    /// it takes away, on the interfaces that route to the counted ones
    /// (looking up the routes `lookup` says); called again periodically
    /// with no change and [`Lookup::All`] so that counting follows routes
    /// and interfaces that change. Changes come in the order they happened.
    fn track(&self, change: &BackendDelta, lookup: Lookup) -> impl Future<Output = ()> + Send;
    /// The counters of the tracked backends. May block: the loop calls it
    /// off its own task.
    fn read_counters(&self) -> BTreeMap<Backend, UpstreamCounters>;
    /// The packets each of the table's named counters counted (the
    /// policies' refusals), by counter name.
    fn read_denied(&self) -> impl Future<Output = BTreeMap<String, u64>> + Send;
    /// Counts in `heard` what may have changed Lobby's table, until
    /// `cancel`.
    fn watch_table(
        &self,
        heard: watch::Sender<Heard>,
        cancel: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static;
    /// Sends `()` on `changed` whenever routes, links or addresses may have
    /// changed, until `cancel`; without such news, every `fallback`.
    /// Planes without routes (tests' fakes) send nothing.
    fn watch_routes(
        &self,
        changed: mpsc::Sender<()>,
        fallback: std::time::Duration,
        cancel: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let _ = (changed, fallback);
        async move { cancel.cancelled().await }
    }
    /// Removes the ruleset and the counters: a clean shutdown.
    fn remove(&self) -> impl Future<Output = ()> + Send;
    /// The interfaces the flowtable covers for `query`, `None` when they
    /// cannot be looked up (said in the log). Planes without interfaces
    /// (tests' fakes) have none.
    fn flowtable_devices(
        &self,
        query: &DeviceQuery,
        lookup: Lookup,
    ) -> impl Future<Output = Option<Devices>> + Send {
        let _ = (query, lookup);
        async { None }
    }
}

pub use crate::netlink::Lookup;

/// The kernel: nft for the ruleset, the eBPF counters (when loaded).
pub struct KernelPlane {
    /// The name of Lobby's table (`nftables.table`).
    table: String,
    nft: nft::Nft,
    /// `None` when counting is off, and after [`DataPlane::remove`].
    counters: Mutex<Option<Tracked>>,
    /// The interfaces last checked for hardware offload, and whether all
    /// of them can: checked again only when they change.
    offload: Mutex<Option<(std::collections::BTreeSet<String>, bool)>>,
    /// The routes toward the counted upstreams and toward the flowtable's.
    counted_routes: tokio::sync::Mutex<Routes>,
    flowtable_routes: tokio::sync::Mutex<Routes>,
    /// Set once the table is watched: applies then commit unheard by it.
    watch: OnceLock<Arc<TableWatch>>,
}

/// The log line when the kernel's notifications cannot be followed.
const UNWATCHED: &str = "following the ruleset's notifications: outside changes of the table are found by the periodic check only";

struct Tracked {
    counters: Counters,
    backends: BTreeSet<Backend>,
    /// How many of `backends` are at each address: its route is looked up
    /// while one is.
    addresses: BTreeMap<IpAddr, usize>,
}

impl KernelPlane {
    /// `counters`: the loaded eBPF counters, `None` when counting is off;
    /// `table`: the name of Lobby's table; `nft`: how to reach nft.
    pub fn new(counters: Option<Counters>, table: String, nft: nft::Nft) -> Self {
        Self {
            table,
            nft,
            counters: Mutex::new(counters.map(|counters| Tracked {
                counters,
                backends: BTreeSet::new(),
                addresses: BTreeMap::new(),
            })),
            offload: Mutex::new(None),
            counted_routes: tokio::sync::Mutex::default(),
            flowtable_routes: tokio::sync::Mutex::default(),
            watch: OnceLock::new(),
        }
    }

    fn tracked(&self) -> std::sync::MutexGuard<'_, Option<Tracked>> {
        self.counters.lock().expect("no panic holds the lock")
    }
}

impl DataPlane for KernelPlane {
    async fn existing_rotation(&self) -> Result<Option<Rotation>, NftError> {
        self.nft.existing_rotation(&self.table).await
    }

    async fn apply(&self, script: String) -> Result<(), NftError> {
        match self.watch.get() {
            Some(watch) => watch.unheard(self.nft.apply(&script)).await,
            None => self.nft.apply(&script).await,
        }
    }

    async fn list_table(&self) -> Result<Option<String>, NftError> {
        self.nft.list_table(&self.table).await
    }

    async fn track(&self, change: &BackendDelta, lookup: Lookup) {
        let key = |(socket, protocol): &Backend| ebpf::key_of(*socket, protocol.number());
        let (forgotten, new) = {
            let mut tracked = self.tracked();
            let Some(tracked) = tracked.as_mut() else {
                return;
            };
            let (mut forgotten, mut new) = (BTreeSet::new(), BTreeSet::new());
            let (mut gone, mut added) = (Vec::new(), Vec::new());
            for backend in change.gone.iter().filter(|b| tracked.backends.remove(b)) {
                gone.push(key(backend));
                let address = backend.0.ip();
                let left = tracked.addresses.entry(address).or_default();
                *left = left.saturating_sub(1);
                if *left == 0 {
                    tracked.addresses.remove(&address);
                    forgotten.insert(address);
                }
            }
            for backend in change.added.iter().filter(|b| tracked.backends.insert(**b)) {
                added.push(key(backend));
                *tracked.addresses.entry(backend.0.ip()).or_default() += 1;
                new.insert(backend.0.ip());
            }
            let backends = &tracked.backends;
            let every_key = || backends.iter().map(key).collect();
            if let Err(e) = tracked.counters.track(&gone, &added, every_key) {
                error!(error = %e, "updating the counter map");
            }
            (forgotten, new)
        };
        let interfaces = self
            .counted_routes
            .lock()
            .await
            .update(&forgotten, &new, lookup)
            .await;
        let mut tracked = self.tracked();
        let Some(tracked) = tracked.as_mut() else {
            return;
        };
        match interfaces {
            Ok(interfaces) => {
                if let Err(e) = tracked.counters.attach_to(&interfaces) {
                    error!(error = %e, "attaching the counters");
                }
            }
            Err(e) => error!(error = %e, "finding the interfaces toward the upstreams"),
        }
    }

    fn read_counters(&self) -> BTreeMap<Backend, UpstreamCounters> {
        let tracked = self.tracked();
        let Some(tracked) = tracked.as_ref() else {
            return BTreeMap::new();
        };
        let all = match tracked.counters.read() {
            Ok(all) => all,
            Err(e) => {
                error!(error = %e, "reading the counters");
                return BTreeMap::new();
            }
        };
        tracked
            .backends
            .iter()
            .map(|backend @ (socket, protocol)| {
                let key = ebpf::key_of(*socket, protocol.number());
                (*backend, all.get(&key).copied().unwrap_or_default())
            })
            .collect()
    }

    async fn read_denied(&self) -> BTreeMap<String, u64> {
        nft::named_counters(&self.table).await.unwrap_or_else(|e| {
            error!(error = %e, "reading the policies' counters");
            BTreeMap::new()
        })
    }

    fn watch_table(
        &self,
        heard: watch::Sender<Heard>,
        cancel: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        let watch = match TableWatch::open(self.table.clone(), heard) {
            Ok(watch) => {
                let watch = Arc::new(watch);
                // Watched once: the daemon starts its services once.
                let _ = self.watch.set(watch.clone());
                Some(watch)
            }
            Err(e) => {
                warn!(error = %e, "{UNWATCHED}");
                None
            }
        };
        async move {
            let Some(watch) = watch else { return };
            if let Err(e) = watch.follow(cancel).await {
                warn!(error = %e, "{UNWATCHED}");
            }
        }
    }

    async fn flowtable_devices(&self, query: &DeviceQuery, lookup: Lookup) -> Option<Devices> {
        let links = match crate::netlink::links().await {
            Ok(links) => links,
            Err(e) => {
                error!(error = %e, "finding the flowtable's interfaces; they stay as they are");
                return None;
            }
        };
        let mut names = accel::client_interfaces(&links, &query.client_side);
        let toward = self
            .flowtable_routes
            .lock()
            .await
            .interfaces_toward(&query.upstreams, lookup)
            .await;
        match toward {
            Ok(toward) => names.extend(toward.into_iter().map(|i| i.name)),
            Err(e) => {
                error!(error = %e, "finding the interfaces toward the upstreams; the flowtable's stay as they are");
                return None;
            }
        }
        let offload = query.hardware_offload && self.offload_supported(&names).await;
        Some(Devices { names, offload })
    }

    fn watch_routes(
        &self,
        changed: mpsc::Sender<()>,
        fallback: std::time::Duration,
        cancel: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static {
        crate::netlink::watch_routes(changed, fallback, cancel)
    }

    async fn remove(&self) {
        match self.nft.apply(&nft::teardown(&self.table)).await {
            Ok(()) => info!(table = %self.table, "ruleset removed"),
            Err(e) => error!(error = %e, "removing the ruleset"),
        }
        if let Some(tracked) = self.tracked().take() {
            tracked.counters.remove();
        }
    }
}

impl KernelPlane {
    /// Whether every one of `names` can offload flows to hardware, checked
    /// when they change; the outcome is logged once per change.
    async fn offload_supported(&self, names: &BTreeSet<String>) -> bool {
        if let Some((known, able)) = &*self.offload.lock().expect("no panic holds the lock")
            && known == names
        {
            return *able;
        }
        let mut unable = Vec::new();
        for name in names {
            if let Err(e) = nft::flowtable::offload_supported(name).await {
                unable.push(format!("{name} ({e})"));
            }
        }
        let able = unable.is_empty();
        if able {
            info!(
                "hardware offload: the flowtable's flows are offloaded to the NICs of {}",
                names.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        } else {
            warn!(
                "hardware offload asked, but the NIC of {} cannot offload flows; \
                 the flowtable runs in software on every interface",
                unable.join(", ")
            );
        }
        *self.offload.lock().expect("no panic holds the lock") = Some((names.clone(), able));
        able
    }
}
