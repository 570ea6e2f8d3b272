//! The guest's whole file system, as a newc cpio archive for `-initrd`:
//! busybox, the init script, lobby and the guest's UDP server, nft and
//! iproute2's ip with the shared libraries they link, and the kernel
//! modules the scenario needs in the order they load.
//!
//! The archive is written here rather than by the cpio command so that
//! owners are root and /dev/console exists without privileges on the host.
use std::{
    collections::{BTreeSet, HashMap},
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::kernel::Kernel;
use crate::cmd::{stdout, stdout_bytes};

/// Modules the scenario needs, by what uses them; their dependencies come
/// from modules.dep. Modules built into a kernel are skipped.
const MODULES: &[&str] = &[
    // Lobby's inet ruleset: nat chains, fib, numgen, jhash, dnat,
    // masquerade, ct status, and the refusals (TCP reset, ICMP and ICMPv6
    // unreachable) of a target without upstreams, in both families.
    "nft_chain_nat",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_fib_ipv6",
    "nft_numgen",
    "nft_hash",
    "nft_nat",
    "nft_masq",
    "nft_ct",
    "nft_reject_inet",
    "nft_reject_ipv4",
    "nft_reject_ipv6",
    // The health probes' exemption from conntrack: `socket mark` (nft_socket
    // pulls in nf_socket_ipv4/ipv6 from modules.dep); `notrack` is nft_ct's.
    "nft_socket",
    // Acceleration: the flowtable type, `flow add`, and conntrack's
    // netlink interface for `conntrack -L` (the OFFLOAD flag).
    "nf_flow_table_inet",
    "nft_flow_offload",
    "nf_conntrack_netlink",
    // The topology's links, and SCTP sockets for the SCTP target's
    // servers, clients and probes.
    "veth",
    "sctp",
    // The counters' attachment before TCX (6.6): a clsact qdisc and cls_bpf.
    "sch_ingress",
    "cls_bpf",
];

/// The static busybox of Debian's busybox-static package: every command of
/// the guest that is not copied from the host.
const BUSYBOX: &str = "/bin/busybox";

/// Dynamically linked host programs the guest runs: nft for lobby,
/// iproute2's ip for lobby's route lookups and for `ip netns`, which
/// busybox's ip lacks, conntrack to see flows offloaded, and socat for
/// SCTP servers and UDP and SCTP clients (busybox has neither).
const HOST_PROGRAMS: &[&str] = &[
    "/usr/sbin/nft",
    "/usr/sbin/ip",
    "/usr/sbin/conntrack",
    "/usr/bin/socat",
];

/// Host files that glibc reads for protocol and service names, which nft
/// parses and prints.
const HOST_FILES: &[&str] = &["/etc/protocols", "/etc/services"];

/// The guest's list of modules to insmod, one name a line, in order.
const MODULE_LIST: &str = "etc/vm-test/modules";

/// Writes the initramfs for `kernel` to `out`, with the workspace's
/// `programs` (lobby, the test servers) in /usr/bin.
pub fn build(
    out: &Path,
    kernel: &Kernel,
    programs: &[PathBuf],
    init_script: &str,
) -> anyhow::Result<()> {
    let mut archive = Cpio::default();
    for dir in ["proc", "sys", "dev", "run", "tmp", "usr/bin"] {
        archive.dir(Path::new(dir));
    }
    // iproute2 keeps namespaces in /var/run/netns.
    archive.symlink(Path::new("var/run"), "/run");
    archive.char_device(Path::new("dev/console"), 5, 1);
    archive.file(Path::new("init"), 0o755, init_script.as_bytes());
    archive.file(Path::new("bin/busybox"), 0o755, &read(Path::new(BUSYBOX))?);
    for program in programs {
        let name = program.file_name().context("a program's file name")?;
        archive.elf(program, &Path::new("usr/bin").join(name))?;
    }
    for program in HOST_PROGRAMS {
        archive.elf(Path::new(program), &relative(Path::new(program)))?;
    }
    for file in HOST_FILES {
        archive.file(&relative(Path::new(file)), 0o644, &read(Path::new(file))?);
    }
    let mut load_order = String::new();
    for module in modules_in_load_order(&kernel.modules, MODULES)? {
        let name = module_name(&module);
        archive.file(
            &Path::new("lib/modules").join(format!("{name}.ko")),
            0o644,
            &module_object(&kernel.modules.join(&module))?,
        );
        load_order.push_str(&name);
        load_order.push('\n');
    }
    archive.file(Path::new(MODULE_LIST), 0o644, load_order.as_bytes());
    std::fs::write(out, archive.finish()).with_context(|| format!("writing {}", out.display()))
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// `path` inside the archive, which holds no leading slash.
fn relative(path: &Path) -> PathBuf {
    path.components()
        .filter(|component| matches!(component, Component::Normal(_)))
        .collect()
}

/// The shared libraries `elf` loads, as `ldd` resolves them on the host,
/// the dynamic loader included.
fn shared_libraries(elf: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let listing = stdout(Command::new("ldd").arg(elf))?;
    Ok(listing
        .lines()
        .filter_map(|line| {
            // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
            // `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
            let resolved = line.split_once("=>").map_or(line, |(_, path)| path);
            let path = resolved.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Module paths, relative to `modules` as modules.dep writes them, of
/// `wanted` and everything they depend on, each after its dependencies.
fn modules_in_load_order(modules: &Path, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let [deps, builtin] = ["modules.dep", "modules.builtin"].map(|name| {
        let path = modules.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    });
    load_order(&deps?, &builtin?, wanted)
        .with_context(|| format!("choosing modules in {}", modules.display()))
}

/// [`modules_in_load_order`] from the text of modules.dep and
/// modules.builtin.
fn load_order(deps: &str, builtin: &str, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let dependencies: HashMap<String, (String, Vec<String>)> = deps
        .lines()
        .filter_map(|line| {
            let (module, needs) = line.split_once(':')?;
            let needs = needs.split_whitespace().map(str::to_owned).collect();
            Some((module_name(module), (module.to_owned(), needs)))
        })
        .collect();
    let builtin: BTreeSet<String> = builtin.lines().map(module_name).collect();

    let mut order = Vec::new();
    let mut placed = BTreeSet::new();
    for name in wanted {
        if builtin.contains(*name) {
            continue;
        }
        let Some((path, _)) = dependencies.get(*name) else {
            bail!("kernel module {name} is neither in modules.dep nor built in");
        };
        place(path, &dependencies, &mut placed, &mut order);
    }
    Ok(order)
}

/// Appends `path` to `order` after its dependencies, each once.
fn place(
    path: &str,
    dependencies: &HashMap<String, (String, Vec<String>)>,
    placed: &mut BTreeSet<String>,
    order: &mut Vec<String>,
) {
    if !placed.insert(path.to_owned()) {
        return;
    }
    if let Some((_, needs)) = dependencies.get(&module_name(path)) {
        for need in needs {
            place(need, dependencies, placed, order);
        }
    }
    order.push(path.to_owned());
}

/// `kernel/net/netfilter/nf_tables.ko.xz` is module `nf_tables`; the
/// kernel treats `-` and `_` in module names alike.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split_once(".ko").map_or(file, |(stem, _)| stem);
    stem.replace('-', "_")
}

/// The module's object, decompressed: busybox's insmod hands the kernel
/// what it reads, and not every kernel decompresses modules itself.
fn module_object(path: &Path) -> anyhow::Result<Vec<u8>> {
    match path.extension().and_then(|ext| ext.to_str()) {
        Some("xz") => stdout_bytes(Command::new("xz").arg("-dc").arg(path)),
        Some("ko") => read(path),
        _ => bail!("unknown module compression: {}", path.display()),
    }
}

/// A newc ("070701") cpio archive being written in memory. Parent
/// directories are added on first use; everything belongs to root.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    /// Every path written so far: directories and shared libraries are
    /// wanted by several entries but written once.
    paths: BTreeSet<PathBuf>,
    next_inode: u32,
}

const S_IFMT: u32 = 0o170_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl Cpio {
    fn dir(&mut self, path: &Path) {
        if path.as_os_str().is_empty() || self.paths.contains(path) {
            return;
        }
        self.parent(path);
        self.entry(path, S_IFDIR | 0o755, (0, 0), b"");
    }

    fn file(&mut self, path: &Path, permissions: u32, data: &[u8]) {
        self.parent(path);
        self.entry(path, S_IFREG | permissions, (0, 0), data);
    }

    fn symlink(&mut self, path: &Path, target: &str) {
        self.parent(path);
        self.entry(path, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    fn char_device(&mut self, path: &Path, major: u32, minor: u32) {
        self.parent(path);
        self.entry(path, S_IFCHR | 0o600, (major, minor), b"");
    }

    /// A host program at `path` in the archive, with its shared libraries
    /// at the paths the host's loader found them, where the guest's loader
    /// looks too.
    fn elf(&mut self, host: &Path, path: &Path) -> anyhow::Result<()> {
        self.file(path, 0o755, &read(host)?);
        for library in shared_libraries(host)? {
            let in_archive = relative(&library);
            if !self.paths.contains(&in_archive) {
                self.file(&in_archive, 0o755, &read(&library)?);
            }
        }
        Ok(())
    }

    fn parent(&mut self, path: &Path) {
        if let Some(parent) = path.parent() {
            self.dir(parent);
        }
    }

    fn entry(&mut self, path: &Path, mode: u32, (rdev_major, rdev_minor): (u32, u32), data: &[u8]) {
        self.paths.insert(path.to_owned());
        let name = path.to_string_lossy();
        self.next_inode += 1;
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            if mode & S_IFMT == S_IFDIR { 2 } else { 1 },
            0, // mtime: the same bytes for the same inputs
            u32::try_from(data.len()).expect("an initramfs file under 4 GiB"),
            0, // devmajor
            0, // devminor
            rdev_major,
            rdev_minor,
            u32::try_from(name.len() + 1).expect("a short name"),
            0, // check: unused by newc
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    /// newc aligns each name and each file's data to 4 bytes.
    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry(Path::new("TRAILER!!!"), 0, (0, 0), b"");
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_after_their_dependencies_each_once() {
        let deps = "kernel/net/netfilter/nft_nat.ko.xz: kernel/net/netfilter/nf_tables.ko.xz kernel/net/netfilter/nf_nat.ko.xz
kernel/net/netfilter/nf_nat.ko.xz: kernel/net/netfilter/nf_conntrack.ko.xz
kernel/net/netfilter/nf_conntrack.ko.xz:
kernel/net/netfilter/nf_tables.ko.xz:
kernel/net/netfilter/nft_masq.ko.xz: kernel/net/netfilter/nf_tables.ko.xz kernel/net/netfilter/nf_nat.ko.xz
";
        let builtin = "kernel/net/sched/sch-ingress.ko\n";
        let order = load_order(deps, builtin, &["nft_nat", "sch_ingress", "nft_masq"]).unwrap();
        let names: Vec<String> = order.iter().map(|path| module_name(path)).collect();
        assert_eq!(
            names,
            ["nf_tables", "nf_conntrack", "nf_nat", "nft_nat", "nft_masq"]
        );
        assert!(load_order(deps, builtin, &["cls_bpf"]).is_err());
    }

    #[test]
    fn cpio_entries_are_aligned_and_parents_come_first() {
        let mut archive = Cpio::default();
        archive.file(Path::new("etc/vm-test/modules"), 0o644, b"veth\n");
        archive.symlink(Path::new("var/run"), "/run");
        let bytes = archive.finish();
        let mut names = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            assert_eq!(&bytes[at..at + 6], b"070701", "a header at {at}");
            let field = |index: usize| {
                let start = at + 6 + index * 8;
                let hex = std::str::from_utf8(&bytes[start..start + 8]).unwrap();
                usize::from_str_radix(hex, 16).unwrap()
            };
            let (size, name_size) = (field(6), field(11));
            let name_start = at + 110;
            names.push(
                String::from_utf8(bytes[name_start..name_start + name_size - 1].to_vec()).unwrap(),
            );
            let data_start = (name_start + name_size).next_multiple_of(4);
            at = (data_start + size).next_multiple_of(4);
        }
        assert_eq!(at, bytes.len());
        assert_eq!(
            names,
            [
                "etc",
                "etc/vm-test",
                "etc/vm-test/modules",
                "var",
                "var/run",
                "TRAILER!!!"
            ]
        );
    }
}
