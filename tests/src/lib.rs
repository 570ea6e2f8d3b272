//! Test harness: network namespaces joined by veth links, small TCP servers
//! that answer with their name, and the real `lobby` binary running in the
//! load balancer's namespace.
//!
//! Everything lives in namespaces whose names are unique to the run and are
//! deleted on drop, even when a test panics. Links are created with
//! `ip -n`, so the root namespace's interfaces, routes, sysctls and
//! nftables are never touched. Addresses are in 198.18.0.0/15, and no
//! namespace has a route out.
pub mod browser;
pub mod conntrack;
pub mod dns;
pub mod fixtures;
pub mod ha;
pub mod load;
pub mod lobby;
pub mod netns;
pub mod repeat;
pub mod server;

pub use lobby::{Launch, Lobby};
pub use netns::{NetNs, Topology};
pub use repeat::Repeat;
pub use server::{NameServer, SlowHealthServer, UdpFlow, UdpNameServer};

use std::time::{Duration, Instant};

/// Whether this process may build namespaces and load eBPF. Outside CI a
/// test without them is skipped with a message; under CI=true it fails.
pub fn privileged() -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (network namespaces, nftables, eBPF)");
    }
    for tool in ["ip", "nft"] {
        if !command_exists(tool) {
            missing.push(if tool == "ip" {
                "the ip command (iproute2)"
            } else {
                "the nft command (nftables)"
            });
        }
    }
    requires(missing)
}

/// Whether nothing is `missing`. Outside CI a test that misses something is
/// skipped with a message; under CI=true it fails.
pub fn requires<S: AsRef<str>>(missing: impl IntoIterator<Item = S>) -> bool {
    let missing: Vec<String> = missing.into_iter().map(|m| m.as_ref().to_owned()).collect();
    if missing.is_empty() {
        return true;
    }
    let message = format!("this test needs {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{message} (CI=true: not skipping)");
    }
    eprintln!("skipped: {message}");
    false
}

fn command_exists(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// Polls `check` until it returns `Some`, failing the test with `what` after
/// `deadline`. Deadlines are generous: they catch hangs, not slowness.
pub fn wait_for<T>(what: &str, deadline: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
