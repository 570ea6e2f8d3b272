//! The traffic counters in the kernel: loads the embedded eBPF object, pins
//! its map in bpffs (so counters survive a crash and a restart), attaches
//! the classifiers to the interfaces that route to the upstreams, keeps the
//! map's keys equal to the configured upstreams and reads it. The only
//! module that talks to aya.
//!
//! Counting goes on while the daemon is dead (kill -9, a crash): since 6.6
//! the classifiers are TCX links, pinned in the pin directory next to the
//! map (`tcx_<ifindex>_<program>`), and the next start swaps its own
//! program into them (one atomic `bpf_link_update`: never two programs,
//! never none). Before 6.6 they are tc filters, which outlive the process
//! by themselves; the next start deletes them and attaches its own, a gap
//! of a few microseconds. A clean shutdown removes the pins and detaches.
use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuHashMap, PerCpuValues},
    programs::{
        Link as _, LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions},
    },
    util::{KernelVersion, nr_cpus},
};
use lobby_common::{
    COUNTERS_MAP, ETHERNET_HEADER, LINK_HEADER_SLOTS, LINK_HEADERS_MAP, UpstreamCounters,
    UpstreamKey,
};
use tracing::{debug, info, warn};

pub use crate::netlink::Interface;

/// The object built from lobby-ebpf by build.rs; empty when the build was
/// told to skip it (AYA_BUILD_SKIP).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lobby-counters"));

const EGRESS: &str = "lobby_egress";
const INGRESS: &str = "lobby_ingress";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// How the pins of TCX links start: `tcx_<ifindex>_<program>`.
const TCX_PIN_PREFIX: &str = "tcx_";
/// Where systemd mounts bpffs; Lobby mounts it there when nobody did.
const BPF_FS_ROOT: &str = "/sys/fs/bpf";

/// The default pin directory of the daemon of `table`: /sys/fs/bpf/lobby
/// for the default table, /sys/fs/bpf/lobby-TABLE for another. Pins are
/// global, not per network namespace: two daemons of different tables
/// never share one.
pub fn default_pin_dir(table: &str) -> PathBuf {
    let name = if table == crate::config::Nftables::DEFAULT_TABLE {
        table.to_owned()
    } else {
        format!("lobby-{table}")
    };
    Path::new(BPF_FS_ROOT).join(name)
}

#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    #[error(
        "this lobby binary was built without its eBPF object (AYA_BUILD_SKIP); rebuild it with `cargo xtask build-ebpf` or a plain `cargo build`"
    )]
    NoObject,
    #[error("{op} {path}")]
    PinDir {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not on a bpffs; mount one there (mount -t bpf bpf DIR) or choose another --pin-dir"
    )]
    NotBpfFs { path: PathBuf },
    #[error("loading the eBPF counters (needs CAP_BPF and CAP_NET_ADMIN, or root)")]
    Load(#[source] aya::EbpfError),
    #[error("preparing eBPF program {program}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching the counters to interface {interface}")]
    Attach {
        interface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning the counter on interface {interface} at {path}")]
    PinLink {
        interface: String,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("adding the clsact qdisc to interface {interface}")]
    Clsact {
        interface: String,
        #[source]
        source: tc::TcError,
    },
    #[error("counter map {op}")]
    Map {
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("counting the CPUs: {0}")]
    Cpus(String),
}

/// What is attached where, and the map of per-upstream counters.
pub struct Counters {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    /// By index as well as name: an interface deleted and created again
    /// under its old name is a new one, and its programs went with the old.
    /// Egress, then ingress.
    links: BTreeMap<Interface, [Attachment; 2]>,
    /// The index of each interface the counters left because it was gone:
    /// one that comes back under its name was recreated. Routes are looked
    /// up again when the kernel says they changed, so a deletion and the
    /// creation after it are usually seen apart.
    vanished: BTreeMap<String, u32>,
    cpus: usize,
    /// Before 6.6 programs are attached as tc filters, which outlive a
    /// crashed daemon; those of a previous run are removed before attaching.
    netlink_filters: bool,
    /// Whether the map's keys are those the last [`Counters::track`] was
    /// told (the programs never add one): not before the first, nor after
    /// a failed update; the map is then listed, one system call per key.
    in_sync: bool,
}

/// The counters of every key of the per-CPU hash map `map`, summed over
/// `cpus` (the possible CPUs), a batch of keys per system call
/// (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6): read one by one, 10,000 upstreams
/// took 20,000 calls, every 2 s for the reset check. An error (a kernel
/// without batches) leaves the caller to read them one by one.
fn read_in_batches(
    map: std::os::fd::BorrowedFd<'_>,
    cpus: usize,
) -> std::io::Result<BTreeMap<UpstreamKey, UpstreamCounters>> {
    /// `union bpf_attr`'s batch member (linux/bpf.h).
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const BATCH: usize = 512;
    // A per-CPU value is 8-byte aligned per CPU, which the counters are.
    const _: () = assert!(std::mem::size_of::<UpstreamCounters>().is_multiple_of(8));
    let empty_key = UpstreamKey {
        addr: [0; 16],
        port: 0,
        protocol: 0,
        family: 0,
    };
    let mut keys = vec![empty_key; BATCH];
    let mut values = vec![UpstreamCounters::default(); BATCH * cpus];
    // A hash map's batch position is its next bucket.
    let (mut position, mut next) = (0u32, 0u32);
    let mut all = BTreeMap::new();
    for first in std::iter::once(true).chain(std::iter::repeat(false)) {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                (&raw const position) as u64
            },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: the attribute points at buffers of `count` keys and
        // `count` x `cpus` values, and at the positions, all of which live
        // across the call.
        let done = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                std::mem::size_of::<BatchAttr>(),
            )
        } < 0;
        let error = std::io::Error::last_os_error();
        // The last batch ends with ENOENT, holding what was left.
        if done && error.raw_os_error() != Some(libc::ENOENT) {
            return Err(error);
        }
        let read = (attr.count as usize).min(BATCH);
        for (key, per_cpu) in keys[..read].iter().zip(values.chunks(cpus)) {
            all.insert(*key, summed(per_cpu));
        }
        if done {
            break;
        }
        position = next;
    }
    Ok(all)
}

/// One upstream's counters over the CPUs.
fn summed<'a>(per_cpu: impl IntoIterator<Item = &'a UpstreamCounters>) -> UpstreamCounters {
    let mut total = UpstreamCounters::default();
    for cpu in per_cpu {
        total.add(cpu);
    }
    total
}

/// One classifier on one interface. Dropping it (a daemon that fails) is
/// not detaching it: see [`Attachment::detach`].
enum Attachment {
    /// A TCX link (6.6+): the pin at `pin` keeps it attached when the
    /// process dies.
    Tcx { link: FdLink, pin: PathBuf },
    /// A tc filter (before 6.6): outlives the process by itself.
    Filter(SchedClassifierLink),
}

impl Attachment {
    /// Detaches the classifier from its interface, if the interface is
    /// still there.
    fn detach(self) -> Result<(), String> {
        match self {
            Self::Tcx { link, pin } => {
                let unpinned = remove_pin(&pin);
                // The last reference: the kernel detaches the link.
                drop(link);
                unpinned.map_err(|e| format!("removing {}: {e}", pin.display()))
            }
            Self::Filter(link) => link.detach().map_err(|e| e.to_string()),
        }
    }
}

impl Counters {
    /// Loads the programs and opens (or creates) the pinned counter map in
    /// `pin_dir`, mounting bpffs at /sys/fs/bpf first if `pin_dir` is below
    /// it and nothing is mounted there.
    pub fn load(pin_dir: &Path) -> Result<Self, CountersError> {
        if OBJECT.is_empty() {
            return Err(CountersError::NoObject);
        }
        prepare_pin_dir(pin_dir)?;
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(COUNTERS_MAP, pin_dir.join(COUNTERS_MAP))
            .load(OBJECT)
            .map_err(CountersError::Load)?;
        for program in [EGRESS, INGRESS] {
            let classifier: &mut SchedClassifier = ebpf
                .program_mut(program)
                .expect("the object defines both classifiers")
                .try_into()
                .map_err(|source| CountersError::Program { program, source })?;
            classifier
                .load()
                .map_err(|source| CountersError::Program { program, source })?;
        }
        let cpus = nr_cpus().map_err(|(what, e)| CountersError::Cpus(format!("{what}: {e}")))?;
        let netlink_filters =
            KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 6, 0));
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            links: BTreeMap::new(),
            vanished: BTreeMap::new(),
            cpus,
            netlink_filters,
            in_sync: false,
        })
    }

    /// Attaches both classifiers to every interface of `interfaces` that
    /// lacks them and detaches them from every other one, including an
    /// interface of the same name but another index: the kernel removed the
    /// programs with the interface it deleted.
    pub fn attach_to(&mut self, interfaces: &BTreeSet<Interface>) -> Result<(), CountersError> {
        let stale: Vec<Interface> = self
            .links
            .keys()
            .filter(|i| !interfaces.contains(*i))
            .cloned()
            .collect();
        for old in stale {
            let interface = old.name.as_str();
            for (program, attachment) in [EGRESS, INGRESS]
                .into_iter()
                .zip(self.links.remove(&old).expect("listed above"))
            {
                // The interface may be gone already, taking the program
                // with it.
                if let Err(e) = attachment.detach() {
                    debug!(interface, index = old.index, program, error = %e, "detaching a counter");
                }
            }
            self.set_link_header(&old, 0);
            if !interfaces.iter().any(|i| i.name == old.name) {
                info!(interface, index = old.index, "counters detached");
            }
            self.vanished.insert(old.name, old.index);
        }
        for interface in interfaces {
            if self.links.contains_key(interface) {
                continue;
            }
            let recreated = self
                .vanished
                .remove(&interface.name)
                .filter(|old| *old != interface.index);
            let name = interface.name.as_str();
            if self.netlink_filters {
                prepare_clsact(name)?;
            }
            let egress = self.attach(interface, EGRESS, TcAttachType::Egress)?;
            let ingress = match self.attach(interface, INGRESS, TcAttachType::Ingress) {
                Ok(attachment) => attachment,
                Err(e) => {
                    let _ = egress.detach();
                    return Err(e);
                }
            };
            self.links.insert(interface.clone(), [egress, ingress]);
            let link_header = link_header(name);
            self.set_link_header(interface, link_header);
            match recreated {
                Some(old_index) => info!(
                    interface = name,
                    old_index,
                    new_index = interface.index,
                    link_header,
                    "interface {name} was recreated (index {old_index} -> {}); counters move to the new one",
                    interface.index
                ),
                None => info!(
                    interface = name,
                    index = interface.index,
                    link_header,
                    "counters attached"
                ),
            }
        }
        if !self.netlink_filters {
            self.remove_stale_pins();
        }
        Ok(())
    }

    /// Attaches `program` to `interface`: as a tc filter before 6.6; since,
    /// into the TCX link a previous run pinned there if there is one (it
    /// counted while no daemon ran), else as a new link, pinned.
    fn attach(
        &mut self,
        interface: &Interface,
        program: &'static str,
        direction: TcAttachType,
    ) -> Result<Attachment, CountersError> {
        let name = interface.name.as_str();
        let attach_error = |source| CountersError::Attach {
            interface: name.to_owned(),
            source,
        };
        if self.netlink_filters {
            let classifier = self.classifier(program);
            let options = TcAttachOptions::Netlink(NlOptions::default());
            let id = classifier
                .attach_with_options(name, direction, options)
                .map_err(attach_error)?;
            return Ok(Attachment::Filter(take_link(classifier, id)));
        }
        let pin = self
            .pin_dir
            .join(format!("{TCX_PIN_PREFIX}{}_{program}", interface.index));
        let classifier = self.classifier(program);
        if let Some(id) = adopt(classifier, &pin, name) {
            let link = take_link(classifier, id)
                .try_into()
                .expect("a TCX attachment is an fd link");
            return Ok(Attachment::Tcx { link, pin });
        }
        let options = TcAttachOptions::TcxOrder(LinkOrder::default());
        let id = classifier
            .attach_with_options(name, direction, options)
            .map_err(attach_error)?;
        let link: FdLink = take_link(classifier, id)
            .try_into()
            .expect("a TCX attachment is an fd link");
        // A failed pin drops the link, which detaches it: counting then
        // never outlives the daemon unnoticed.
        let link = link.pin(&pin).map_err(|source| CountersError::PinLink {
            interface: name.to_owned(),
            path: pin.clone(),
            source,
        })?;
        Ok(Attachment::Tcx {
            link: link.into(),
            pin,
        })
    }

    /// Removes the TCX link pins that no attachment of this run holds:
    /// those a previous run left on interfaces that no longer route to an
    /// upstream, or that are gone. The kernel detaches each link with its
    /// last reference.
    fn remove_stale_pins(&self) {
        let held: BTreeSet<&Path> = self
            .links
            .values()
            .flatten()
            .filter_map(|attachment| match attachment {
                Attachment::Tcx { pin, .. } => Some(pin.as_path()),
                Attachment::Filter(_) => None,
            })
            .collect();
        let entries = match std::fs::read_dir(&self.pin_dir) {
            Ok(entries) => entries,
            Err(e) => {
                warn!(path = %self.pin_dir.display(), error = %e, "listing the pin directory");
                return;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let ours = entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.starts_with(TCX_PIN_PREFIX));
            if !ours || held.contains(path.as_path()) {
                continue;
            }
            match remove_pin(&path) {
                Ok(()) => info!(
                    path = %path.display(),
                    "removed a counter left by a previous run"
                ),
                Err(e) => warn!(path = %path.display(), error = %e, "removing a stale counter pin"),
            }
        }
    }

    /// Takes the `gone` keys out of the map and puts the `added` ones in
    /// (the caller keeps the keys: exactly those that leave and join):
    /// new upstreams start at zero, the counters of those still configured
    /// are left as they are, and removed upstreams are forgotten. When the
    /// map's keys may differ from the caller's (the first call: a map a
    /// previous run pinned holds its keys; a failed update), they are
    /// listed and made exactly `every_key()`, the keys after the change.
    pub fn track(
        &mut self,
        gone: &[UpstreamKey],
        added: &[UpstreamKey],
        every_key: impl FnOnce() -> BTreeSet<UpstreamKey>,
    ) -> Result<(), CountersError> {
        if std::mem::take(&mut self.in_sync) {
            self.update_keys(gone.iter(), added.iter())?;
        } else {
            let present = self.listed_keys()?;
            let keys = every_key();
            self.update_keys(present.difference(&keys), keys.difference(&present))?;
        }
        self.in_sync = true;
        Ok(())
    }

    /// The keys in the map, one system call each.
    fn listed_keys(&mut self) -> Result<BTreeSet<UpstreamKey>, CountersError> {
        self.map_mut()?
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| CountersError::Map {
                op: "listing keys",
                source,
            })
    }

    /// Removes `gone` from the map and inserts `added` at zero.
    fn update_keys<'k>(
        &mut self,
        gone: impl Iterator<Item = &'k UpstreamKey>,
        added: impl Iterator<Item = &'k UpstreamKey>,
    ) -> Result<(), CountersError> {
        let cpus = self.cpus;
        let mut map = self.map_mut()?;
        for key in gone {
            map.remove(key).map_err(|source| CountersError::Map {
                op: "removing a key",
                source,
            })?;
        }
        for key in added {
            let zeros =
                PerCpuValues::try_from(vec![UpstreamCounters::default(); cpus]).map_err(|e| {
                    CountersError::Map {
                        op: "zeroing a value",
                        source: aya::maps::MapError::IoError(e),
                    }
                })?;
            // BPF_NOEXIST: never reset a key the programs already count in.
            map.insert(key, zeros, 1)
                .map_err(|source| CountersError::Map {
                    op: "inserting a key",
                    source,
                })?;
        }
        Ok(())
    }

    /// The counters of every tracked upstream, summed over the CPUs.
    pub fn read(&self) -> Result<BTreeMap<UpstreamKey, UpstreamCounters>, CountersError> {
        let map = self
            .ebpf
            .map(COUNTERS_MAP)
            .expect("the object defines the counter map");
        if let aya::maps::Map::PerCpuHashMap(data) = map {
            match read_in_batches(std::os::fd::AsFd::as_fd(data.fd()), self.cpus) {
                Ok(all) => {
                    // Every test build reads the map both ways.
                    #[cfg(debug_assertions)]
                    {
                        let one_by_one = self.read_one_by_one()?;
                        let keys = |all: &BTreeMap<UpstreamKey, _>| {
                            all.keys().copied().collect::<Vec<_>>()
                        };
                        assert_eq!(keys(&all), keys(&one_by_one), "a batch read missed keys");
                        // Traffic may count between the two reads.
                        for (key, counters) in &all {
                            assert!(
                                counters.packets_out <= one_by_one[key].packets_out,
                                "a batch read out of order"
                            );
                        }
                    }
                    return Ok(all);
                }
                Err(e) => {
                    debug!(error = %e, "reading the counters in batches; reading them one by one");
                }
            }
        }
        self.read_one_by_one()
    }

    /// [`Self::read`] with two system calls per key.
    fn read_one_by_one(&self) -> Result<BTreeMap<UpstreamKey, UpstreamCounters>, CountersError> {
        let map = self
            .ebpf
            .map(COUNTERS_MAP)
            .expect("the object defines the counter map");
        let map: PerCpuHashMap<&MapData, UpstreamKey, UpstreamCounters> =
            map.try_into().map_err(|source| CountersError::Map {
                op: "opening",
                source,
            })?;
        map.iter()
            .map(|entry| {
                let (key, per_cpu) = entry.map_err(|source| CountersError::Map {
                    op: "reading",
                    source,
                })?;
                Ok((key, summed(per_cpu.iter())))
            })
            .collect()
    }

    /// Detaches the programs and removes the pins: a clean shutdown leaves
    /// nothing behind.
    pub fn remove(mut self) {
        for (interface, attachments) in std::mem::take(&mut self.links) {
            for (program, attachment) in [EGRESS, INGRESS].into_iter().zip(attachments) {
                if let Err(e) = attachment.detach() {
                    warn!(interface = interface.name, program, error = %e, "detaching a counter");
                }
            }
        }
        let pin_dir = self.pin_dir.clone();
        drop(self);
        let map_pin = pin_dir.join(COUNTERS_MAP);
        if let Err(e) = remove_pin(&map_pin) {
            warn!(path = %map_pin.display(), error = %e, "removing the pinned counter map");
        }
        // Only succeeds when empty: never removes what others pinned.
        let _ = std::fs::remove_dir(&pin_dir);
    }

    fn classifier(&mut self, program: &'static str) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(program)
            .expect("the object defines both classifiers")
            .try_into()
            .expect("checked at load")
    }

    /// Tells the programs the length of `interface`'s link-layer header
    /// (0: find the IP header through the helper). Until they are told,
    /// and on an index the array does not cover, they use the helper:
    /// slower, never wrong.
    fn set_link_header(&mut self, interface: &Interface, length: u32) {
        if interface.index >= LINK_HEADER_SLOTS {
            return;
        }
        let map = self
            .ebpf
            .map_mut(LINK_HEADERS_MAP)
            .expect("the object defines the link header map");
        let set = Array::<&mut MapData, u32>::try_from(map)
            .and_then(|mut array| array.set(interface.index, length, 0));
        if let Err(e) = set {
            warn!(interface = %interface.name, error = %e, "telling the counters the interface's link type; they read its packets through the helper");
        }
    }

    fn map_mut(
        &mut self,
    ) -> Result<PerCpuHashMap<&mut MapData, UpstreamKey, UpstreamCounters>, CountersError> {
        self.ebpf
            .map_mut(COUNTERS_MAP)
            .expect("the object defines the counter map")
            .try_into()
            .map_err(|source| CountersError::Map {
                op: "opening",
                source,
            })
    }
}

/// The length of the link-layer header in front of the IP header where
/// the programs see a packet of interface `name`: an Ethernet header on
/// an Ethernet interface (`SIOCGIFHWADDR`'s address family is the link
/// type), else 0 (an IP tunnel or WireGuard has none, other types other
/// ones). An interface that cannot be asked gets 0: the helper then finds
/// the IP header.
fn link_header(name: &str) -> u32 {
    // SAFETY: an ifreq is plain old data; zeroes are a valid one.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= request.ifr_name.len() {
        return 0;
    }
    for (to, from) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *to = from as libc::c_char;
    }
    // SAFETY: a socket call with constant arguments.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return 0;
    }
    // SAFETY: `raw` is a descriptor just opened, which nothing else holds.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `request` is an ifreq naming the interface, which the call
    // fills; the socket is ours.
    let asked = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFHWADDR, &mut request) };
    // SAFETY: SIOCGIFHWADDR filled the address member of the union.
    let link_type = unsafe { request.ifr_ifru.ifru_hwaddr.sa_family };
    if asked == 0 && link_type == libc::ARPHRD_ETHER {
        ETHERNET_HEADER
    } else {
        0
    }
}

/// The link that a previous run pinned at `pin`, now running
/// `classifier`'s program. `None` when there is no pin, or when the link
/// cannot take the program (its interface was deleted: the link is
/// defunct); then the pin is removed.
fn adopt(
    classifier: &mut SchedClassifier,
    pin: &Path,
    interface: &str,
) -> Option<SchedClassifierLinkId> {
    let pinned = match PinnedLink::from_pin(pin) {
        Ok(pinned) => pinned,
        Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => {
            return None;
        }
        Err(e) => {
            warn!(interface, path = %pin.display(), error = %e, "opening a pinned counter");
            let _ = remove_pin(pin);
            return None;
        }
    };
    let adopted = SchedClassifierLink::try_from(FdLink::from(pinned))
        .map_err(|e| e.to_string())
        .and_then(|link| classifier.attach_to_link(link).map_err(|e| e.to_string()));
    match adopted {
        Ok(id) => {
            info!(interface, path = %pin.display(), "took over the counter a previous run left");
            Some(id)
        }
        Err(e) => {
            info!(interface, path = %pin.display(), error = %e, "replacing a counter a previous run left");
            let _ = remove_pin(pin);
            None
        }
    }
}

/// The link of `id`, owned by the caller from now on.
fn take_link(classifier: &mut SchedClassifier, id: SchedClassifierLinkId) -> SchedClassifierLink {
    classifier
        .take_link(id)
        .expect("the link was attached just now")
}

/// Removes a pin; one already gone is fine.
fn remove_pin(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The key under which the programs count an upstream.
pub fn key_of(address: SocketAddr, protocol: u8) -> UpstreamKey {
    UpstreamKey::new(address, protocol)
}

fn prepare_clsact(interface: &str) -> Result<(), CountersError> {
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => {}
        // Left by an earlier run or by other software: fine to share.
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(tc::TcError::AlreadyAttached) => {}
        Err(source) => {
            return Err(CountersError::Clsact {
                interface: interface.to_owned(),
                source,
            });
        }
    }
    for (program, direction) in [
        (EGRESS, TcAttachType::Egress),
        (INGRESS, TcAttachType::Ingress),
    ] {
        match tc::qdisc_detach_program(interface, direction, program) {
            Ok(()) => info!(
                interface,
                program, "removed a counter left by a previous run"
            ),
            Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(interface, program, error = %e, "removing a counter left by a previous run")
            }
        }
    }
    Ok(())
}

fn prepare_pin_dir(pin_dir: &Path) -> Result<(), CountersError> {
    let root = Path::new(BPF_FS_ROOT);
    if pin_dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).map_err(|source| CountersError::PinDir {
            op: "creating",
            path: root.to_owned(),
            source,
        })?;
        mount_bpffs(root)?;
        info!(path = BPF_FS_ROOT, "mounted bpffs");
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| CountersError::PinDir {
        op: "creating",
        path: pin_dir.to_owned(),
        source,
    })?;
    if !is_bpffs(pin_dir) {
        return Err(CountersError::NotBpfFs {
            path: pin_dir.to_owned(),
        });
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct and reads a valid C string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(path: &Path) -> Result<(), CountersError> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .expect("no NUL in a constant path");
    // SAFETY: valid C strings; bpffs takes no data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c_path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(CountersError::PinDir {
            op: "mounting bpffs on",
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lobby_common::{FAMILY_IPV4, FAMILY_IPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP};

    /// The key's bytes as the program builds them from a packet.
    fn key_bytes(key: &UpstreamKey) -> Vec<u8> {
        // SAFETY: UpstreamKey is Pod: 20 initialised bytes, no padding.
        unsafe {
            std::slice::from_raw_parts(
                (key as *const UpstreamKey).cast::<u8>(),
                std::mem::size_of::<UpstreamKey>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn an_ipv4_key_is_zero_padded_in_network_byte_order() {
        let key = key_of("198.18.1.11:9000".parse().unwrap(), IPPROTO_TCP);
        let mut expected = vec![198, 18, 1, 11];
        expected.extend([0; 12]);
        expected.extend(9000u16.to_be_bytes());
        expected.extend([IPPROTO_TCP, FAMILY_IPV4]);
        assert_eq!(key_bytes(&key), expected);
    }

    #[test]
    fn an_ipv6_key_holds_all_sixteen_bytes() {
        let key = key_of("[2001:db8::1:b]:53".parse().unwrap(), IPPROTO_UDP);
        let mut expected = vec![
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0x0b,
        ];
        expected.extend(53u16.to_be_bytes());
        expected.extend([IPPROTO_UDP, FAMILY_IPV6]);
        assert_eq!(key_bytes(&key), expected);
    }

    #[test]
    fn keys_differ_by_family_protocol_and_port() {
        // c612:10b:: starts with the four bytes of 198.18.1.11, and
        // ::ffff:198.18.1.11 is the v4-mapped form: neither is the IPv4 key.
        let keys: BTreeSet<UpstreamKey> = [
            ("198.18.1.11:9000", IPPROTO_TCP),
            ("198.18.1.11:9000", IPPROTO_UDP),
            ("198.18.1.11:9000", IPPROTO_SCTP),
            ("198.18.1.11:9001", IPPROTO_TCP),
            ("[::ffff:198.18.1.11]:9000", IPPROTO_TCP),
            ("[c612:10b::]:9000", IPPROTO_TCP),
        ]
        .into_iter()
        .map(|(a, p)| key_of(a.parse().unwrap(), p))
        .collect();
        assert_eq!(keys.len(), 6);
    }

    /// IPv6 end to end through this module alone, without the daemon:
    /// client -> router (counters) -> server, no NAT.
    /// Needs root; skipped without it, fails without it under CI=true.
    mod ipv6_namespaces {
        use std::{
            io::{Read as _, Write as _},
            net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
            os::fd::AsRawFd as _,
            process::Command,
            time::Duration,
        };

        use super::*;

        const CLIENT: &str = "2001:db8:c::2";
        const SERVER: &str = "2001:db8:5::11";
        const TCP_PORT: u16 = 9000;
        const UDP_PORT: u16 = 9001;
        const DATAGRAM: usize = 100;

        /// A namespace deleted on drop.
        struct Ns(String);

        impl Ns {
            fn new(role: &str) -> Self {
                let name = format!("lobbyu-{}-{role}", std::process::id());
                run("ip", &["netns", "add", &name]);
                let ns = Self(name);
                ns.ip(&["link", "set", "lo", "up"]);
                ns
            }

            fn ip(&self, args: &[&str]) -> String {
                run("ip", &[&["-n", self.0.as_str()], args].concat())
            }

            fn exec(&self, args: &[&str]) -> String {
                run("ip", &[&["netns", "exec", self.0.as_str()], args].concat())
            }

            /// Runs `f` on a thread inside the namespace.
            fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
                let path = format!("/run/netns/{}", self.0);
                std::thread::spawn(move || {
                    let file = std::fs::File::open(&path).expect("opening the namespace");
                    // SAFETY: setns on this thread only, with a valid fd.
                    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("the thread inside the namespace panicked")
            }
        }

        /// A bpffs on a temporary directory, unmounted on drop.
        struct BpfFs(tempfile::TempDir);

        impl BpfFs {
            fn new() -> Self {
                let dir = tempfile::tempdir().unwrap();
                mount_bpffs(dir.path()).unwrap();
                Self(dir)
            }
        }

        impl Drop for BpfFs {
            fn drop(&mut self) {
                let path = std::ffi::CString::new(self.0.path().as_os_str().as_encoded_bytes())
                    .expect("no NUL in a temporary path");
                // SAFETY: a valid C path; detaches the bpffs mounted there.
                unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
            }
        }

        impl Drop for Ns {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
            }
        }

        fn run(program: &str, args: &[&str]) -> String {
            let out = Command::new(program)
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
            assert!(
                out.status.success(),
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        fn privileged() -> bool {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                return true;
            }
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("this test needs root (CI=true: not skipping)");
            }
            eprintln!("skipped: this test needs root (namespaces, eBPF)");
            false
        }

        /// A veth pair `a_if` in `a` to `b_if` in `b`, both up, each with
        /// its /64 (no duplicate address detection: usable at once).
        fn link(a: &Ns, a_if: &str, a_addr: &str, b: &Ns, b_if: &str, b_addr: &str) {
            a.ip(&[
                "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.0,
            ]);
            a.ip(&["addr", "add", &format!("{a_addr}/64"), "dev", a_if, "nodad"]);
            b.ip(&["addr", "add", &format!("{b_addr}/64"), "dev", b_if, "nodad"]);
            a.ip(&["link", "set", a_if, "up"]);
            b.ip(&["link", "set", b_if, "up"]);
        }

        /// (packets, bytes) of the router's reference counter `comment`.
        fn reference(router: &Ns, comment: &str) -> (u64, u64) {
            let listing = router.exec(&["nft", "list", "table", "ip6", "reference"]);
            let line = listing
                .lines()
                .find(|l| l.contains(&format!("comment \"{comment}\"")))
                .unwrap_or_else(|| panic!("no counter {comment} in {listing}"));
            let after = |word: &str| -> u64 {
                let rest = &line[line.find(word).unwrap() + word.len()..];
                rest.split_whitespace().next().unwrap().parse().unwrap()
            };
            (after("packets "), after("bytes "))
        }

        /// Sends `count` datagrams from one socket and waits for each echo.
        fn udp_flow(client: &Ns, count: usize) {
            client.within(move || {
                let socket = UdpSocket::bind("[::]:0").unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                socket.connect((SERVER, UDP_PORT)).unwrap();
                let mut buf = [0u8; DATAGRAM];
                for _ in 0..count {
                    socket.send(&[1; DATAGRAM]).unwrap();
                    socket.recv(&mut buf).unwrap();
                }
            });
        }

        /// One TCP connection that sends `len` bytes and reads them back.
        fn tcp_exchange(client: &Ns, len: usize) {
            client.within(move || {
                let addr = SocketAddr::new(SERVER.parse().unwrap(), TCP_PORT);
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
                stream.write_all(&vec![7; len]).unwrap();
                let mut echo = vec![0; len];
                stream.read_exact(&mut echo).unwrap();
            });
        }

        #[test]
        fn ipv6_tcp_and_udp_are_counted_exactly_and_local_traffic_is_not() {
            if !privileged() {
                return;
            }
            let (client, router, server) =
                (Ns::new("client"), Ns::new("router"), Ns::new("server"));
            link(&client, "eth0", CLIENT, &router, "c0", "2001:db8:c::1");
            link(&router, "s0", "2001:db8:5::1", &server, "eth0", SERVER);
            client.ip(&["-6", "route", "add", "default", "via", "2001:db8:c::1"]);
            server.ip(&["-6", "route", "add", "default", "via", "2001:db8:5::1"]);
            router.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
            let rules = format!(
                "table ip6 reference {{\n chain forward {{\n  type filter hook forward priority 0;\n  \
                 ip6 daddr {SERVER} tcp dport {TCP_PORT} counter comment \"out\"\n  \
                 ip6 saddr {SERVER} tcp sport {TCP_PORT} counter comment \"in\"\n }}\n}}\n"
            );
            let rules_file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(rules_file.path(), rules).unwrap();
            router.exec(&["nft", "-f", rules_file.path().to_str().unwrap()]);

            // Echo servers.
            server.within(|| {
                let listener = TcpListener::bind((SERVER, TCP_PORT)).unwrap();
                let udp = UdpSocket::bind((SERVER, UDP_PORT)).unwrap();
                std::thread::spawn(move || {
                    for stream in listener.incoming() {
                        let mut stream = stream.unwrap();
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = stream.read(&mut buf) {
                            stream.write_all(&buf[..n]).unwrap();
                        }
                    }
                });
                std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    while let Ok((n, from)) = udp.recv_from(&mut buf) {
                        udp.send_to(&buf[..n], from).unwrap();
                    }
                });
            });

            let bpffs = BpfFs::new();
            let pin_dir = bpffs.0.path().join("lobby");
            let server_ip: Ipv6Addr = SERVER.parse().unwrap();
            let tcp_key = key_of(SocketAddr::new(server_ip.into(), TCP_PORT), 6);
            let udp_key = key_of(SocketAddr::new(server_ip.into(), UDP_PORT), 17);
            let counters = router.within(move || {
                let mut counters = Counters::load(&pin_dir).expect("loading the counters");
                let keys = [tcp_key, udp_key];
                counters.track(&[], &keys, || BTreeSet::from(keys)).unwrap();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let interfaces = runtime
                    .block_on(crate::netlink::Routes::default().interfaces_toward(
                        &BTreeSet::from([IpAddr::from(server_ip)]),
                        crate::netlink::Lookup::All,
                    ))
                    .unwrap();
                let names: Vec<&str> = interfaces.iter().map(|i| i.name.as_str()).collect();
                assert_eq!(names, ["s0"]);
                counters.attach_to(&interfaces).unwrap();
                counters
            });

            // The router's own traffic, like the daemon's probes (a TCP
            // connect closed with a reset, a connected UDP socket): not
            // counted.
            router.within(|| {
                let addr = SocketAddr::new(SERVER.parse().unwrap(), TCP_PORT);
                let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: a valid socket and option value of the right size.
                let rc = unsafe {
                    libc::setsockopt(
                        stream.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&raw const linger).cast(),
                        std::mem::size_of_val(&linger) as libc::socklen_t,
                    )
                };
                assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
            });
            udp_flow(&router, 2);
            // Client traffic: one TCP connection, two UDP flows.
            tcp_exchange(&client, 3000);
            udp_flow(&client, 3);
            udp_flow(&client, 1);

            let wait = std::time::Instant::now();
            let (tcp, udp) = loop {
                let all = counters.read().unwrap();
                let (tcp, udp) = (all[&tcp_key], all[&udp_key]);
                let matches = (tcp.packets_out, tcp.bytes_out) == reference(&router, "out")
                    && (tcp.packets_in, tcp.bytes_in) == reference(&router, "in");
                if matches || wait.elapsed() > Duration::from_secs(10) {
                    break (tcp, udp);
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            assert_eq!(
                (tcp.packets_out, tcp.bytes_out),
                reference(&router, "out"),
                "{tcp:?}"
            );
            assert_eq!(
                (tcp.packets_in, tcp.bytes_in),
                reference(&router, "in"),
                "{tcp:?}"
            );
            assert!(tcp.bytes_out > 3000, "{tcp:?}");
            assert_eq!((tcp.connections, tcp.resets), (1, 0), "{tcp:?}");
            // Each datagram: 40 bytes of IPv6 header, 8 of UDP, the payload.
            let bytes = 4 * (40 + 8 + DATAGRAM as u64);
            let expected = UpstreamCounters {
                connections: 2,
                resets: 0,
                packets_out: 4,
                bytes_out: bytes,
                packets_in: 4,
                bytes_in: bytes,
            };
            assert_eq!(udp, expected);

            counters.remove();
        }
    }
}
