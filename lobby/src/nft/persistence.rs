//! Client persistence in the kernel's packet path: per target and backend
//! in rotation, a set of client addresses with a timeout and a chain that
//! refreshes the client's entry and translates to that backend. The target
//! chain sends a client found in a backend's set to that backend's chain,
//! and a new client to the chain of the backend its distribution picks, so
//! the kernel alone remembers and forgets clients; the daemon never writes
//! an element.
//!
//! A backend that leaves rotation loses its set and chain in the same
//! transaction that takes it out: its clients are balanced afresh at once,
//! and find an empty set if it comes back. The names hold everything the
//! objects are made of (backend, protocol, timeout), so a change is a new
//! object, added before the target chain refers to it, and the old one
//! deleted after.
use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, time::Duration};

use super::{FAMILY, address_keyword, chain_name};
use crate::{
    config::{Family, Protocol},
    model::{Desired, DesiredTarget, FamilyRotation, Persistence},
};

/// The set and chain of one backend of one target, under one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Object {
    name: String,
    backend: SocketAddr,
    protocol: Protocol,
    timeout: Duration,
}

impl Object {
    fn family(&self) -> Family {
        Family::of(self.backend.ip())
    }

    fn set_type(&self) -> &'static str {
        match self.family() {
            Family::Ipv4 => "ipv4_addr",
            Family::Ipv6 => "ipv6_addr",
        }
    }

    fn set_spec(&self) -> String {
        format!(
            "type {}; flags dynamic,timeout; timeout {}s;",
            self.set_type(),
            self.timeout.as_secs()
        )
    }

    /// The chain's one rule: `update` inserts the client or restarts its
    /// timeout, then the translation.
    fn rule(&self) -> String {
        let family = address_keyword(self.family());
        let to = match self.backend {
            SocketAddr::V4(v4) => v4.to_string(),
            SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
        };
        format!(
            "meta l4proto {} update @{} {{ {family} saddr }} dnat {family} to {to}",
            self.protocol.as_str(),
            self.name
        )
    }

    pub(super) fn render(&self, out: &mut String) {
        writeln!(out, "\tset {} {{", self.name).unwrap();
        writeln!(out, "\t\ttype {}", self.set_type()).unwrap();
        writeln!(out, "\t\tflags dynamic,timeout").unwrap();
        writeln!(out, "\t\ttimeout {}s", self.timeout.as_secs()).unwrap();
        writeln!(out, "\t}}").unwrap();
        writeln!(out, "\tchain {} {{", self.name).unwrap();
        writeln!(out, "\t\t{}", self.rule()).unwrap();
        writeln!(out, "\t}}").unwrap();
    }

    pub(super) fn add(&self, out: &mut String, table: &str) {
        let name = &self.name;
        writeln!(
            out,
            "add set {FAMILY} {table} {name} {{ {} }}",
            self.set_spec()
        )
        .unwrap();
        writeln!(out, "add chain {FAMILY} {table} {name}").unwrap();
        writeln!(out, "add rule {FAMILY} {table} {name} {}", self.rule()).unwrap();
    }

    /// The chain first: its rule refers to the set.
    pub(super) fn delete(&self, out: &mut String, table: &str) {
        writeln!(out, "delete chain {FAMILY} {table} {}", self.name).unwrap();
        writeln!(out, "delete set {FAMILY} {table} {}", self.name).unwrap();
    }
}

/// Every persistence object of `desired`, by name.
pub(super) fn objects(desired: &Desired) -> BTreeMap<String, Object> {
    let mut objects = BTreeMap::new();
    for (target_name, target) in &desired.targets {
        let Some(persistence) = &target.persistence else {
            continue;
        };
        for backend in &persistence.backends {
            let name = name(target_name, target, persistence, backend);
            let object = Object {
                name: name.clone(),
                backend: *backend,
                protocol: target.protocol,
                timeout: persistence.timeout,
            };
            objects.insert(name, object);
        }
    }
    objects
}

/// The names (of set and chain alike) of the backends of `rotation`'s
/// family, in backend order: the target chain looks a client up in each.
pub(super) fn names_of_family(
    target_name: &str,
    target: &DesiredTarget,
    persistence: &Persistence,
    rotation: &FamilyRotation,
) -> Vec<String> {
    persistence
        .backends
        .iter()
        .filter(|b| Family::of(b.ip()) == rotation.family)
        .map(|b| name(target_name, target, persistence, b))
        .collect()
}

/// `target-web.198.18.1.11.9000.tcp.3s`: the target's chain, a dot (which
/// [`chain_name`] never writes, so names of distinct targets stay
/// distinct), the backend (an IPv6 address as its eight groups joined by
/// `-`, since nft names take no `:`), protocol and timeout.
pub(super) fn name(
    target_name: &str,
    target: &DesiredTarget,
    persistence: &Persistence,
    backend: &SocketAddr,
) -> String {
    let address = match backend.ip() {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => {
            let groups: Vec<String> = v6.segments().iter().map(|g| format!("{g:x}")).collect();
            groups.join("-")
        }
    };
    format!(
        "{}.{address}.{}.{}.{}s",
        chain_name(target_name),
        backend.port(),
        target.protocol.as_str(),
        persistence.timeout.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hold_target_backend_protocol_and_timeout() {
        let target = DesiredTarget {
            protocol: Protocol::Tcp,
            port: 8081,
            ip: None,
            distribution: crate::config::Distribution::RoundRobin,
            policy: Default::default(),
            families: Vec::new(),
            caps: Default::default(),
            persistence: None,
        };
        let persistence = Persistence {
            timeout: Duration::from_secs(3),
            backends: Default::default(),
        };
        let v4: SocketAddr = "198.18.1.11:9000".parse().unwrap();
        let v6: SocketAddr = "[2001:2::1]:9000".parse().unwrap();
        assert_eq!(
            name("web", &target, &persistence, &v4),
            "target-web.198.18.1.11.9000.tcp.3s"
        );
        assert_eq!(
            name("web.1", &target, &persistence, &v6),
            "target-web_2e1.2001-2-0-0-0-0-0-1.9000.tcp.3s"
        );
    }
}
