//! Network namespaces with unique names, deleted on drop.
use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::{Child, Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted (with its links) on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A fresh namespace named `lobbyt-<pid>-<n>-<role>` with `lo` up.
    pub fn new(role: &str) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("lobbyt-{}-{id}-{role}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A handle on an existing namespace that is not deleted on drop: for
    /// threads that act inside a namespace their test owns.
    pub fn attach(name: &str) -> std::mem::ManuallyDrop<Self> {
        std::mem::ManuallyDrop::new(Self {
            name: name.to_owned(),
        })
    }

    /// Runs `ip -n NAME ARGS`, panicking with its stderr on failure.
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args))
    }

    /// Runs a program inside the namespace and returns its output, whatever
    /// its exit status.
    pub fn try_exec(&self, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .expect("running ip netns exec")
    }

    /// Runs `f` on a thread that has entered this namespace: sockets it
    /// creates belong to the namespace for their whole life.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns into {path}: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .expect("the thread inside the namespace panicked")
    }

    /// Starts `command` inside this namespace: setns before exec, so only
    /// the network namespace changes (the mount namespace, with the test's
    /// bpffs and files, stays).
    pub fn spawn(&self, command: &mut Command) -> std::io::Result<Child> {
        let netns = File::open(format!("/run/netns/{}", self.name))?;
        let netns_fd = netns.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd stays open until after
        // the spawn.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn();
        drop(netns);
        child
    }

    /// A listening socket inside this namespace.
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        self.within(move || TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")))
    }

    /// A connection from this namespace.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
        self.within(move || TcpStream::connect_timeout(&addr, timeout))
    }
}

impl NetNs {
    /// The resolv.conf programs started with `ip netns exec` see: iproute2
    /// bind-mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf.
    pub fn set_resolv_conf(&self, text: &str) {
        let dir = format!("/etc/netns/{}", self.name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {dir}: {e}"));
        std::fs::write(format!("{dir}/resolv.conf"), text).expect("writing resolv.conf");
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.name));
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if !matches!(status, Ok(s) if s.success()) && !std::thread::panicking() {
            panic!("deleting namespace {}: {status:?}", self.name);
        }
    }
}

impl NetNs {
    /// `nft list table inet lobby` with each set's elements sorted, so that
    /// two listings of the same content compare equal whatever order the
    /// kernel's hash sets keep.
    pub fn lobby_ruleset(&self) -> String {
        let listing =
            String::from_utf8_lossy(&self.exec("nft", &["list", "table", "inet", "lobby"]).stdout)
                .into_owned();
        normalize_ruleset(&listing)
    }
}

/// Joins multi-line element lists and sorts their items.
pub fn normalize_ruleset(listing: &str) -> String {
    let flat = listing.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::new();
    let mut rest = flat.as_str();
    while let Some(start) = rest.find("elements = { ") {
        let (before, after) = rest.split_at(start + "elements = { ".len());
        let end = after.find(" }").expect("element lists are closed");
        let mut items: Vec<&str> = after[..end].split(", ").collect();
        items.sort_unstable();
        out.push_str(before);
        out.push_str(&items.join(", "));
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A client, a load balancer and N upstreams, each in its own namespace:
///
/// ```text
/// client 198.18.0.2 --- 198.18.0.1 lb 198.18.<i+1>.1 --- 198.18.<i+1>.11 upstream i
/// ```
///
/// Upstreams have no route back to the client: Lobby masquerades, so they
/// answer the load balancer.
pub struct Topology {
    pub client: NetNs,
    pub lb: NetNs,
    pub upstreams: Vec<NetNs>,
}

impl Topology {
    pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

    pub fn new(upstreams: usize) -> Self {
        assert!(upstreams < 250, "one /24 per upstream under 198.18.0.0/16");
        let client = NetNs::new("client");
        let lb = NetNs::new("lb");
        link(
            &client,
            "eth0",
            &Self::CLIENT_ADDR,
            &lb,
            "client0",
            &Self::LB_ADDR,
        );
        let upstreams = (0..upstreams)
            .map(|i| {
                let ns = NetNs::new(&format!("up{i}"));
                link(
                    &ns,
                    "eth0",
                    &Self::upstream_addr(i),
                    &lb,
                    &format!("up{i}"),
                    &Self::lb_addr_toward(i),
                );
                ns
            })
            .collect();
        Self {
            client,
            lb,
            upstreams,
        }
    }

    /// A second address of the client, added by [`Topology::add_other_client`].
    pub const OTHER_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);

    /// Gives the client a second address on its link, for a test that needs
    /// two clients.
    pub fn add_other_client(&self) -> IpAddr {
        let addr = Self::OTHER_CLIENT_ADDR;
        self.client
            .ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        addr.into()
    }

    pub const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
    pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);

    /// The topology of [`Topology::new`] with IPv6 beside IPv4 on every
    /// link (2001:2::/48, the IPv6 benchmarking range) and IPv6 forwarding
    /// on in the load balancer's namespace.
    pub fn dual_stack(upstreams: usize) -> Self {
        let topology = Self::new(upstreams);
        let add = |ns: &NetNs, addr: Ipv6Addr, dev: &str| {
            // nodad: usable at once, not after duplicate detection.
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                dev,
                "nodad",
            ]);
        };
        add(&topology.client, Self::CLIENT_ADDR6, "eth0");
        add(&topology.lb, Self::LB_ADDR6, "client0");
        for (i, ns) in topology.upstreams.iter().enumerate() {
            add(ns, Self::upstream_addr6(i), "eth0");
            add(&topology.lb, Self::lb_addr6_toward(i), &format!("up{i}"));
        }
        topology
            .lb
            .exec("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"]);
        topology
    }

    /// The IPv6 address of upstream `i`.
    pub fn upstream_addr6(i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, i as u16 + 1, 0, 0, 0, 0x11)
    }

    /// The load balancer's IPv6 address on the link to upstream `i`.
    pub fn lb_addr6_toward(i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, i as u16 + 1, 0, 0, 0, 1)
    }

    /// The address of upstream `i`.
    pub fn upstream_addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, i as u8 + 1, 11)
    }

    /// The load balancer's address on the link to upstream `i`.
    pub fn lb_addr_toward(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, i as u8 + 1, 1)
    }
}

/// A veth pair from `a` to `b`, created inside `a` with its peer moved
/// straight into `b`, both up, each with a /24.
fn link(a: &NetNs, a_if: &str, a_addr: &Ipv4Addr, b: &NetNs, b_if: &str, b_addr: &Ipv4Addr) {
    a.ip(&[
        "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
    ]);
    a.ip(&["addr", "add", &format!("{a_addr}/24"), "dev", a_if]);
    b.ip(&["addr", "add", &format!("{b_addr}/24"), "dev", b_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

impl NetNs {
    /// How many tc programs are attached to `interface`, egress and
    /// ingress: TCX links (asked of the kernel with BPF_PROG_QUERY, which
    /// bpftool 7.1 cannot show) and, before 6.6, cls_bpf filters.
    pub fn tc_programs(&self, interface: &str) -> [usize; 2] {
        let name = std::ffi::CString::new(interface).expect("no NUL in a name");
        let tcx = self.within(move || {
            // SAFETY: a valid C string.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(index, 0, "no interface {name:?}");
            // BPF_TCX_EGRESS, BPF_TCX_INGRESS.
            [47u32, 46].map(|attach_type| tcx_count(index, attach_type))
        });
        let filters = |direction: &str| {
            let listing = self.exec("tc", &["filter", "show", "dev", interface, direction]);
            String::from_utf8_lossy(&listing.stdout)
                .lines()
                .filter(|l| l.contains(" bpf "))
                .count()
        };
        [
            tcx[0].unwrap_or(0) + filters("egress"),
            tcx[1].unwrap_or(0) + filters("ingress"),
        ]
    }

    /// The interfaces of this namespace.
    pub fn interfaces(&self) -> Vec<String> {
        let listing = self.ip(&["-o", "link", "show"]);
        String::from_utf8_lossy(&listing.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|name| name.trim().split('@').next().unwrap_or_default().to_owned())
            .collect()
    }
}

/// The programs of TCX attach point `attach_type` on interface `index` of
/// the calling thread's namespace; `None` before 6.6 (no TCX).
fn tcx_count(index: u32, attach_type: u32) -> Option<usize> {
    // union bpf_attr's `query`: target_ifindex, attach_type, query_flags,
    // attach_flags, prog_ids (NULL: count only), count, then pointers
    // and the revision, all left zero.
    let mut attr = [0u32; 16];
    attr[0] = index;
    attr[1] = attach_type;
    const BPF_PROG_QUERY: libc::c_long = 16;
    // SAFETY: bpf() reads and writes the 64 bytes of `attr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "BPF_PROG_QUERY: {e}");
        return None;
    }
    Some(attr[6] as usize)
}
