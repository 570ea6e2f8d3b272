//! Configurations and servers the tests share.
use std::{
    fmt::Display,
    net::{Ipv4Addr, SocketAddr},
    ops::Range,
};

use crate::{NameServer, Topology, server::ask_name};

/// The port upstream servers listen on.
pub const UPSTREAM_PORT: u16 = 9000;

/// Builds a lobby.yaml: targets, each followed by its upstreams.
#[derive(Clone, Debug, Default)]
pub struct ConfigBuilder {
    targets: Vec<TargetYaml>,
    metrics: Option<String>,
}

#[derive(Clone, Debug)]
struct TargetYaml {
    name: String,
    protocol: &'static str,
    port: u16,
    /// Extra keys of the target (`ip: ...`), as YAML lines.
    extra: String,
    upstreams: Vec<String>,
}

impl ConfigBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn target(mut self, name: &str, port: u16) -> Self {
        self.targets.push(TargetYaml {
            name: name.to_owned(),
            protocol: "tcp",
            port,
            extra: String::new(),
            upstreams: Vec::new(),
        });
        self
    }

    /// The last target's protocol (`tcp` unless set).
    pub fn protocol(mut self, protocol: &'static str) -> Self {
        self.last().protocol = protocol;
        self
    }

    /// Only traffic to `ip` (an address or range) is balanced.
    pub fn ip(mut self, ip: impl Display) -> Self {
        self.last()
            .extra
            .push_str(&format!("        ip: \"{ip}\"\n"));
        self
    }

    fn last(&mut self) -> &mut TargetYaml {
        self.targets.last_mut().expect("a target to configure")
    }

    /// An upstream of the last target, with extra keys (e.g.
    /// [`health_check`]) as YAML lines indented under it.
    pub fn upstream_with(mut self, name: &str, host: impl Display, port: u16, extra: &str) -> Self {
        let mut yaml = format!(
            "            - name: {name}\n              host: \"{host}\"\n              port: {port}\n"
        );
        for line in extra.lines() {
            yaml.push_str(&format!("              {line}\n"));
        }
        self.last().upstreams.push(yaml);
        self
    }

    pub fn upstream(self, name: &str, host: impl Display, port: u16) -> Self {
        self.upstream_with(name, host, port, "")
    }

    /// Upstreams `web0..` at the topology's upstream addresses.
    pub fn topology_upstreams(mut self, count: usize, extra: &str) -> Self {
        for i in 0..count {
            self = self.topology_upstream(i, extra);
        }
        self
    }

    /// Upstream `web{i}` at the topology's upstream address `i`.
    pub fn topology_upstream(self, i: usize, extra: &str) -> Self {
        self.upstream_with(
            &format!("web{i}"),
            Topology::upstream_addr(i),
            UPSTREAM_PORT,
            extra,
        )
    }

    /// Targets `t{n}` for each `n` in `targets`, on port 10,000 + n, with
    /// `upstreams(n)` (at most `per_target`) upstreams `u0`, `u1`, ... at
    /// distinct addresses in 198.19.0.0/16, which no namespace routes: no
    /// traffic goes to them. `extra(n, u)` is upstream `u`'s extra keys.
    pub fn unrouted_targets(
        mut self,
        targets: Range<usize>,
        per_target: usize,
        upstreams: impl Fn(usize) -> usize,
        extra: impl Fn(usize, usize) -> String,
    ) -> Self {
        for t in targets {
            self = self.target(&format!("t{t}"), 10_000 + t as u16);
            for u in 0..upstreams(t) {
                let index = t * per_target + u;
                let addr = Ipv4Addr::new(198, 19, (index / 250) as u8, (index % 250) as u8 + 1);
                self = self.upstream_with(&format!("u{u}"), addr, 8080, &extra(t, u));
            }
        }
        self
    }

    /// A Prometheus endpoint on `listen`.
    pub fn metrics(mut self, listen: &str) -> Self {
        self.metrics = Some(listen.to_owned());
        self
    }

    pub fn build(&self) -> String {
        let mut yaml = String::from("lb:\n  - engine: nftables\n    targets:\n");
        for target in &self.targets {
            let TargetYaml {
                name,
                protocol,
                port,
                extra,
                upstreams,
            } = target;
            yaml.push_str(&format!(
                "      - name: {name}\n        protocol: {protocol}\n        port: {port}\n{extra}        upstream_group:\n          name: {name}-pool\n          distribution: round-robin\n          upstreams:\n"
            ));
            if upstreams.is_empty() {
                yaml.push_str("            []\n");
            }
            for upstream in upstreams {
                yaml.push_str(upstream);
            }
        }
        if let Some(listen) = &self.metrics {
            yaml.push_str(&format!("metrics:\n  listen: \"{listen}\"\n"));
        }
        yaml
    }
}

/// A `health_check:` block: TCP probes of `port`.
pub fn health_check(
    port: u16,
    start_available: bool,
    interval: u32,
    success: u32,
    failure: u32,
) -> String {
    format!(
        "health_check:\n  protocol: tcp\n  port: {port}\n  start_available: {start_available}\n  probe: {{ check_interval: {interval}, timeout: 1, success_count: {success}, failure_count: {failure} }}"
    )
}

/// A name server on each upstream namespace, named `web0..`.
pub fn start_servers(topology: &Topology) -> Vec<NameServer> {
    (0..topology.upstreams.len())
        .map(|i| start_server(topology, i))
        .collect()
}

pub fn start_server(topology: &Topology, i: usize) -> NameServer {
    NameServer::start(
        &topology.upstreams[i],
        SocketAddr::from((Topology::upstream_addr(i), UPSTREAM_PORT)),
        &format!("web{i}"),
    )
}

/// `count` /32 prefixes of 10.0.0.0/8, two addresses apart so that no two
/// merge into one interval: the bulk of large allow and block lists.
pub fn spaced_prefixes(count: u32) -> impl Iterator<Item = String> {
    (1..=count).map(|i| {
        let [_, a, b, c] = (i * 2).to_be_bytes();
        format!("10.{a}.{b}.{c}/32")
    })
}

/// A target's address as the client sees it.
pub fn target_addr(port: u16) -> SocketAddr {
    SocketAddr::from((Topology::LB_ADDR, port))
}

/// Whether upstream `i` is among the DNAT targets of the applied ruleset.
pub fn in_rotation(topology: &Topology, i: usize) -> bool {
    topology
        .lb
        .lobby_ruleset()
        .contains(&format!("{} . {UPSTREAM_PORT}", Topology::upstream_addr(i)))
}

/// The names of the servers `count` connections to the target on `port`
/// reached, in order; any failed connection fails the test.
pub fn names(topology: &Topology, port: u16, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            ask_name(&topology.client, target_addr(port))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect()
}

/// How many of `names` are `name`.
pub fn count(names: &[String], name: &str) -> usize {
    names.iter().filter(|n| *n == name).count()
}

/// Each of `upstreams` got an equal share of `names`, in turn: the
/// sequence repeats with the period of the upstream count.
pub fn assert_round_robin(names: &[String], upstreams: usize) {
    for name in names {
        let n = count(names, name);
        assert_eq!(
            n,
            names.len() / upstreams,
            "{name} got {n} of {} connections: {names:?}",
            names.len()
        );
    }
    for (i, name) in names.iter().enumerate().skip(upstreams) {
        assert_eq!(
            name,
            &names[i - upstreams],
            "not in turn at connection {i}: {names:?}"
        );
    }
}
