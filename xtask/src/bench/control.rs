//! Control-plane figures: how long applies take at scale, how fast a dead
//! upstream leaves the rotation, and what the daemon costs at idle.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use lobby_tests::{
    Lobby, NameServer, Topology,
    fixtures::{ConfigBuilder, health_check, in_rotation, start_servers},
    wait_for,
};

use super::servers;

/// A config of `targets` x `per_target` upstreams at distinct addresses
/// in 198.19.0.0/16, which no namespace routes: no traffic goes to them.
pub fn scale_config(
    targets: usize,
    per_target: usize,
    drop_last_of: impl Fn(usize) -> bool,
) -> String {
    let mut config = ConfigBuilder::new();
    for t in 0..targets {
        config = config.target(&format!("t{t}"), 10_000 + t as u16);
        let count = if drop_last_of(t) {
            per_target - 1
        } else {
            per_target
        };
        for u in 0..count {
            let index = t * per_target + u;
            let addr = Ipv4Addr::new(198, 19, (index / 250) as u8, (index % 250) as u8 + 1);
            config = config.upstream(&format!("u{u}"), addr, 8080);
        }
    }
    config.build()
}

/// The `elapsed_ms` of the `n`-th (from 0) `ruleset applied` line.
fn applied_ms(lobby: &Lobby, n: usize) -> Option<f64> {
    let log = lobby.log();
    let line = log
        .lines()
        .filter(|l| l.contains("ruleset applied"))
        .nth(n)?;
    line.split("elapsed_ms=")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Apply time of a first start with this configuration, in milliseconds.
pub fn first_apply_ms(config: &str) -> f64 {
    let topology = Topology::new(0);
    let lobby = Lobby::start(&topology.lb, config);
    applied_ms(&lobby, 0).expect("the first apply is logged")
}

/// Apply times (ms) of reloads from 1,000 x 10: one target changed, then
/// every target changed.
pub fn reload_ms(targets: usize, per_target: usize) -> (f64, f64) {
    let topology = Topology::new(0);
    let lobby = Lobby::start(&topology.lb, &scale_config(targets, per_target, |_| false));
    let reload = |config: String, nth: usize| {
        lobby.write_config(&config);
        lobby.reload();
        wait_for("the reload to apply", Duration::from_secs(60), || {
            applied_ms(&lobby, nth)
        })
    };
    let one = reload(scale_config(targets, per_target, |t| t == 0), 1);
    let all = reload(scale_config(targets, per_target, |_| true), 2);
    (one, all)
}

/// Milliseconds from a health-checked upstream's death (its server stops)
/// to its removal from the ruleset, with probes every second.
pub fn death_to_removal_ms() -> f64 {
    let topology = Topology::new(3);
    let mut servers: Vec<Option<NameServer>> =
        start_servers(&topology).into_iter().map(Some).collect();
    let check = health_check(lobby_tests::fixtures::UPSTREAM_PORT, true, 1, 1, 1);
    let _lobby = Lobby::start(
        &topology.lb,
        &ConfigBuilder::new()
            .target("web", 8081)
            .topology_upstreams(3, &check)
            .build(),
    );
    wait_for("upstream 1 in rotation", Duration::from_secs(10), || {
        in_rotation(&topology, 1).then_some(())
    });
    servers[1] = None;
    let died = Instant::now();
    wait_for("upstream 1 to leave", Duration::from_secs(20), || {
        (!in_rotation(&topology, 1)).then_some(())
    });
    died.elapsed().as_secs_f64() * 1000.0
}

/// The daemon's RSS (KiB) and CPU (% of one core) over `window` with
/// `count` upstreams probed every second.
pub fn idle_cost(count: usize, window: Duration) -> (u64, f64) {
    let topology = Topology::new(3);
    for (i, ns) in topology.upstreams.iter().enumerate() {
        servers::start(ns, Topology::upstream_addr(i));
    }
    let check = health_check(servers::GREET_PORT, true, 1, 1, 1);
    let mut config = ConfigBuilder::new();
    for t in 0..count / 10 {
        config = config.target(&format!("t{t}"), 10_000 + t as u16);
        for u in 0..10 {
            let i = (t * 10 + u) % 3;
            config = config.upstream_with(
                &format!("u{u}"),
                Topology::upstream_addr(i),
                servers::GREET_PORT,
                &check,
            );
        }
    }
    let lobby = Lobby::start(&topology.lb, &config.build());
    std::thread::sleep(Duration::from_secs(3)); // first probes, first applies
    let pid = lobby.pid();
    let before = cpu_ticks(pid);
    std::thread::sleep(window);
    let after = cpu_ticks(pid);
    let percent = (after - before) as f64 / ticks_per_second() / window.as_secs_f64() * 100.0;
    (rss_kib(pid), percent)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name, which may hold spaces: utime and
    // stime are the 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}
