//! Control-plane figures, each beside its anchor measured in the same run:
//! the very transaction Lobby sent, applied by a bare `nft -f -` in a fresh
//! namespace that holds what the kernel held before it. Lobby's transactions
//! are captured once (an `nft` shim on the daemon's PATH) and the timed runs
//! go without the shim. Also: how fast a dead upstream leaves the rotation,
//! how fast an outside deletion of the table is repaired, and what the
//! daemon costs at idle.
use std::{
    fs::File,
    io::Write as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use lobby_tests::{
    Launch, Lobby, NameServer, NetNs, Topology,
    fixtures::{
        ConfigBuilder, UPSTREAM_PORT, health_check, in_rotation, start_server, start_servers,
    },
    lobby::running_children,
    wait_for,
};

use super::{busy_ticks, servers, went_quiet};

/// Waits, up to 30 s, until the machine is quiet (a twentieth of a CPU
/// busy over 300 ms, [`went_quiet`]). The kernel frees a deleted
/// namespace's tables in the background, seconds of CPU after a 5,000 x 2
/// table: without this wait, from-scratch applies at 5,000 x 2 read about
/// 3.0 s on both sides in one run and 3.7-11.4 s in the next, each side
/// slowed by the teardown of the namespace before it (2026-12-01).
fn wait_for_quiet_machine() {
    if !went_quiet(busy_ticks) {
        eprintln!("bench: the machine stayed busy for 30 s; timing anyway");
    }
}

/// How long the daemon is left alone after an apply before the next
/// change is timed: its check of the table after an apply is over and
/// removed upstreams have stopped lingering (2 s, then one more apply).
const SETTLE: Duration = Duration::from_millis(2600);

/// The load balancer's namespace for control-plane figures, with a route
/// to 198.19.0.0/16 (through the one upstream namespace, which drops it)
/// as upstreams have in production: without it every upstream is looked
/// up and warned about at each apply. (This kernel has no dummy links.)
fn lb_topology() -> Topology {
    let topology = Topology::new(1);
    topology.lb.ip(&[
        "route",
        "add",
        "198.19.0.0/16",
        "via",
        &Topology::upstream_addr(0).to_string(),
    ]);
    topology
}

/// What a scale configuration changes from the base one, to time reloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// Target 0 loses its last upstream.
    OneTarget,
    /// As `OneTarget`, and target 1's first upstream gets weight 3.
    OneTargetAndWeight,
    /// Every target loses its last upstream (and target 1's weight stays).
    AllTargets,
}

/// A config of `targets` x `per_target` upstreams at distinct addresses
/// in 198.19.0.0/16, which no namespace routes: no traffic goes to them.
pub fn scale_config(targets: usize, per_target: usize, change: Change) -> String {
    scale_targets(ConfigBuilder::new(), targets, per_target, change).build()
}

/// `config` with `targets` more targets of `per_target` unchecked
/// upstreams each, changed as `change` says.
fn scale_targets(
    config: ConfigBuilder,
    targets: usize,
    per_target: usize,
    change: Change,
) -> ConfigBuilder {
    let shorter = |t: usize| match change {
        Change::None => false,
        Change::OneTarget | Change::OneTargetAndWeight => t == 0,
        Change::AllTargets => true,
    };
    let weighted = matches!(change, Change::OneTargetAndWeight | Change::AllTargets);
    config.unrouted_targets(
        0..targets,
        per_target,
        |t| {
            if shorter(t) {
                per_target - 1
            } else {
                per_target
            }
        },
        |t, u| {
            let weight = weighted && t == 1 && u == 0;
            if weight { "weight: 3" } else { "" }.to_owned()
        },
    )
}

/// The `n`-th (from 0) `ruleset applied` line: its `elapsed_ms` (the nft
/// run), its timestamp, and its `config_to_apply_ms` if it carried a
/// configuration.
fn applied(lobby: &Lobby, n: usize) -> Option<(f64, SystemTime, Option<f64>)> {
    let line = logged_line(lobby, "ruleset applied", n)?;
    let field = |name: &str| -> Option<f64> {
        line.split(&format!("{name}="))
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some((
        field("elapsed_ms")?,
        timestamp(&line)?,
        field("config_to_apply_ms"),
    ))
}

/// The `n`th line (from 0) of the daemon's log that holds `needle`.
fn logged_line(lobby: &Lobby, needle: &str, n: usize) -> Option<String> {
    lobby
        .log()
        .lines()
        .filter(|l| l.contains(needle))
        .nth(n)
        .map(str::to_owned)
}

/// The RFC 3339 UTC timestamp tracing puts first on a line
/// (`2026-11-30T08:35:13.123456Z`).
fn timestamp(line: &str) -> Option<SystemTime> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut ymd = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, d) = (ymd.next()?.ok()?, ymd.next()?.ok()?, ymd.next()?.ok()?);
    let mut hms = time.split(':');
    let (h, min) = (
        hms.next()?.parse::<i64>().ok()?,
        hms.next()?.parse::<i64>().ok()?,
    );
    let secs: f64 = hms.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let whole = days * 86_400 + h * 3600 + min * 60;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(whole as f64 + secs))
}

fn ms_between(earlier: SystemTime, later: SystemTime) -> f64 {
    later
        .duration_since(earlier)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// A daemon as operators run it, at the default log level. The tests'
/// harness runs it at debug, which writes a line per target and upstream
/// a reload changes: 2,000 lines and ~13 ms of an every-target reload at
/// 1,000 x 10 (first to last of the reload's lines: 24 ms at debug, 10.5
/// at info).
fn control_daemon(ns: &NetNs, config: &str) -> Lobby {
    Lobby::start_with_args(ns, config, Launch::Setns, &["-l", "info"])
}

/// Lobby's binary behind a wrapper that, while a flag file exists, runs
/// the daemon with `--nft-process` and an `nft` shim first on its PATH;
/// the shim keeps each transaction the daemon applies (the text is the
/// same through libnftables). Without the flag the wrapper only execs the
/// binary.
pub struct Capture {
    dir: PathBuf,
}

impl Capture {
    /// Writes the wrapper and the shim; returns the wrapper's path for
    /// `LOBBY_BIN`.
    pub fn install(binary: &Path) -> anyhow::Result<(Self, PathBuf)> {
        let dir = std::env::temp_dir().join(format!("lobby-bench-{}", std::process::id()));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::create_dir_all(dir.join("scripts"))?;
        let d = dir.display();
        let wrapper = dir.join("lobby");
        write_executable(
            &wrapper,
            &format!(
                "#!/bin/sh\nif [ -e {d}/on ]; then PATH={d}/bin:$PATH; export PATH; exec {lobby} --nft-process \"$@\"; fi\nexec {lobby} \"$@\"\n",
                lobby = binary.display()
            ),
        )?;
        write_executable(
            &bin.join("nft"),
            &format!(
                "#!/bin/sh\nif [ \"$1\" = -f ] && [ \"$2\" = - ]; then\n  f={d}/scripts/$(date +%s%N).nft\n  cat > \"$f\"\n  exec {nft} -f \"$f\"\nfi\nexec {nft} \"$@\"\n",
                nft = real_nft()
            ),
        )?;
        Ok((Self { dir }, wrapper))
    }

    /// The transactions the daemons started within `run` applied, in order.
    pub fn scripts(&self, run: impl FnOnce()) -> Vec<String> {
        let scripts = self.dir.join("scripts");
        let _ = std::fs::remove_dir_all(&scripts);
        std::fs::create_dir_all(&scripts).expect("the capture directory");
        File::create(self.dir.join("on")).expect("the capture flag");
        run();
        let _ = std::fs::remove_file(self.dir.join("on"));
        let mut paths: Vec<PathBuf> = std::fs::read_dir(&scripts)
            .expect("the captured scripts")
            .filter_map(|e| Some(e.ok()?.path()))
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|p| std::fs::read_to_string(p).expect("a captured script"))
            .collect()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_executable(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

fn real_nft() -> String {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("nft")
        .to_owned()
}

/// Runs `nft ARGS` inside `ns`, with `stdin` piped in: wall time of the
/// whole process and its stderr on failure. Spawned from a thread that
/// entered the namespace, so that std spawns as the daemon's tokio does
/// (posix_spawn; a `pre_exec` setns would force a slower fork).
pub fn nft_in(ns: &NetNs, args: &[&str], stdin: Option<&str>) -> (Duration, Result<(), String>) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let stdin = stdin.map(str::to_owned);
    ns.within(move || {
        let mut command = Command::new(real_nft());
        command
            .args(&args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = command.spawn().expect("running nft");
        if let Some(text) = &stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .expect("feeding nft");
        }
        let output = child.wait_with_output().expect("waiting for nft");
        let elapsed = started.elapsed();
        let outcome = if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
        };
        (elapsed, outcome)
    })
}

/// Milliseconds a bare `nft -f -` takes for `scripts.last()` in a fresh
/// namespace that first received the others (untimed).
pub fn raw_ms(scripts: &[String]) -> f64 {
    RawApply::prepare(scripts).time()
}

/// The last of some captured transactions, to be applied by a bare `nft -f
/// -` in a fresh namespace that already received the others.
pub struct RawApply {
    ns: NetNs,
    last: String,
}

impl RawApply {
    pub fn prepare(scripts: &[String]) -> Self {
        let ns = NetNs::new("raw");
        let (last, before) = scripts.split_last().expect("a script to time");
        for script in before {
            if let Err(e) = nft_in(&ns, &["-f", "-"], Some(script)).1 {
                panic!("replaying a captured transaction: {e}");
            }
        }
        Self {
            ns,
            last: last.clone(),
        }
    }

    /// Milliseconds the last transaction takes, once the machine is quiet.
    pub fn time(self) -> f64 {
        wait_for_quiet_machine();
        let (elapsed, outcome) = nft_in(&self.ns, &["-f", "-"], Some(&self.last));
        if let Err(e) = outcome {
            panic!("the captured transaction does not apply: {e}");
        }
        elapsed.as_secs_f64() * 1000.0
    }
}

/// The transactions of a first start with `config`, then of reloads to
/// each of `reloads`: every transaction in order (lingering upstreams'
/// removals too) and, per apply asked, the index of its own.
pub fn capture(capture: &Capture, config: &str, reloads: &[String]) -> (Vec<String>, Vec<usize>) {
    let mut marks = Vec::new();
    let scripts = capture.scripts(|| {
        let topology = lb_topology();
        let lobby = control_daemon(&topology.lb, config);
        marks.push(0);
        for next in reloads {
            let before = lobby.log_count("ruleset applied");
            reload(&lobby, next);
            marks.push(before);
        }
        std::thread::sleep(SETTLE);
    });
    assert!(
        marks.last().is_none_or(|m| *m < scripts.len()),
        "a transaction per apply"
    );
    (scripts, marks)
}

/// A reload's milliseconds: from SIGHUP to the apply's log line (read,
/// parse, diff, render, counters' map entries, nft), and from the parsed
/// configuration's arrival in the core to the same line (diff, render,
/// nft: Lobby's part besides reading its file).
pub struct ReloadMs {
    pub signalled: f64,
    pub parsed: f64,
}

/// Writes `config`, sends SIGHUP and waits for the apply it causes.
fn reload(lobby: &Lobby, config: &str) -> ReloadMs {
    // Steady state: see SETTLE.
    std::thread::sleep(SETTLE);
    let before = lobby.log_count("ruleset applied");
    lobby.write_config(config);
    let sent = SystemTime::now();
    lobby.reload();
    let (_, at, parsed) = wait_for("the reload to apply", Duration::from_secs(60), || {
        applied(lobby, before)
    });
    ReloadMs {
        signalled: ms_between(sent, at),
        parsed: parsed.expect("a reload's apply logs config_to_apply_ms"),
    }
}

/// Apply time (ms, as the daemon logs it: its nft run) of a first start.
pub fn first_apply_ms(config: &str) -> f64 {
    let topology = lb_topology();
    wait_for_quiet_machine();
    let lobby = control_daemon(&topology.lb, config);
    applied(&lobby, 0).expect("the first apply is logged").0
}

/// Milliseconds from SIGHUP to each reload's apply, starting from
/// `config` and reloading to each of `reloads` in turn, each beside its
/// anchor (`anchors`, one a reload), timed right after it. The machine's
/// speed drifts within minutes (the same bare transaction 325 ms median at
/// one hour, 410-500 at the next, on either CPU): an anchor timed after
/// all the reloads and its namespace's replays was 10-15 s from its reload.
pub fn reloads_ms(
    config: &str,
    reloads: &[String],
    anchors: Vec<RawApply>,
) -> Vec<(ReloadMs, f64)> {
    assert_eq!(reloads.len(), anchors.len(), "an anchor a reload");
    let topology = lb_topology();
    let lobby = control_daemon(&topology.lb, config);
    reloads
        .iter()
        .zip(anchors)
        .map(|(next, anchor)| (reload(&lobby, next), anchor.time()))
        .collect()
}

/// The daemon's line when it hears a commit from outside touch its table.
const OUTSIDE_COMMIT: &str = "a commit from outside Lobby changed its table";

/// Milliseconds from the daemon hearing an outside `nft delete table inet
/// lobby` (its log line of the commit's first notification) to its log
/// line of the apply that put the table back, `repetitions` times on one
/// daemon, each paired with a bare `nft -f -` of `full_table` (the last
/// of those scripts, as [`raw_ms`] times it) right after. From the
/// deleting process's start instead, the figure also held that process's
/// own start and cache fetch (several ms at 100 x 10), which is no part of
/// the repair. Polling with `nft list table` until it succeeded added the
/// poll's latency and the polling processes' competition for the CPU and
/// nftables' lock: at 100 x 10 it read 39-54 ms even from the deleting
/// process's exit (runs by hand, 2026-12-01).
pub fn repair_ms(config: &str, full_table: &[String], repetitions: usize) -> (Vec<f64>, Vec<f64>) {
    let topology = lb_topology();
    let lobby = control_daemon(&topology.lb, config);
    let listed = || {
        nft_in(&topology.lb, &["list", "table", "inet", "lobby"], None)
            .1
            .is_ok()
    };
    let mut repaired_ms = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..repetitions {
        // Let the daemon settle (its check of the table after an apply).
        std::thread::sleep(Duration::from_millis(300));
        assert!(listed(), "the table is there before the deletion");
        let before = lobby.log_count("ruleset applied");
        let heard_before = lobby.log_count(OUTSIDE_COMMIT);
        if let Err(e) = nft_in(&topology.lb, &["delete", "table", "inet", "lobby"], None).1 {
            panic!("deleting the table: {e}");
        }
        let (_, repaired, _) = wait_for("the table's repair", Duration::from_secs(20), || {
            applied(&lobby, before)
        });
        let heard = logged_line(&lobby, OUTSIDE_COMMIT, heard_before)
            .and_then(|line| timestamp(&line))
            .expect("the deletion was heard");
        assert!(listed(), "the repair put the table back");
        repaired_ms.push(ms_between(heard, repaired));
        raw.push(raw_ms(full_table));
    }
    (repaired_ms, raw)
}

/// Milliseconds from a health-checked upstream's death (its server stops)
/// to its removal from the ruleset, with probes every second.
pub fn death_to_removal_ms() -> f64 {
    let topology = Topology::new(3);
    let mut servers: Vec<Option<NameServer>> =
        start_servers(&topology).into_iter().map(Some).collect();
    let check = health_check(lobby_tests::fixtures::UPSTREAM_PORT, true, 1, 1, 1);
    let _lobby = control_daemon(
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

/// What the daemon costs at idle with probed upstreams, beside what the
/// same probes cost without it.
pub struct IdleCost {
    /// The daemon's CPU in each of its windows, % of one core.
    pub lobby_cpu: Vec<f64>,
    /// The bare prober's CPU in the window after each of the daemon's.
    pub bare_prober_cpu: Vec<f64>,
    pub rss_kib: u64,
    /// The daemon's RSS with [`IDLE_BASE`] probed upstreams.
    pub base_rss_kib: u64,
}

/// Probed upstreams of the smallest idle daemon, the base of the memory
/// per upstream: one target.
pub const IDLE_BASE: usize = 10;

/// Probes every second with a 1 s timeout, as `idle_config` asks.
const IDLE_PROBE_INTERVAL: Duration = Duration::from_secs(1);
const IDLE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The daemon with `count` upstreams probed every second and a bare prober
/// doing the same connects in the same namespace, in `pairs` pairs of
/// windows of `window` back to back (one measure of either is at the
/// mercy of what else the machine runs). Each pair starts a daemon (its
/// checkers at random phases, as in production) and stops it cleanly
/// before the prober runs. Then the daemon's RSS with [`IDLE_BASE`]
/// upstreams.
pub fn idle_cost(count: usize, window: Duration, pairs: usize) -> IdleCost {
    let topology = Topology::new(3);
    for (i, ns) in topology.upstreams.iter().enumerate() {
        servers::start(ns, std::net::IpAddr::V4(Topology::upstream_addr(i)));
    }
    let mut cost = IdleCost {
        lobby_cpu: Vec::new(),
        bare_prober_cpu: Vec::new(),
        rss_kib: 0,
        base_rss_kib: 0,
    };
    for _ in 0..pairs {
        let lobby = idle_daemon(&topology, count);
        let before = daemon_cpu_ticks(lobby.pid());
        std::thread::sleep(window);
        let ticks = daemon_cpu_ticks(lobby.pid()) - before;
        cost.lobby_cpu
            .push(ticks as f64 / ticks_per_second() / window.as_secs_f64() * 100.0);
        cost.rss_kib = stop_idle_daemon(lobby);
        cost.bare_prober_cpu.push(bare_prober_cpu(
            &topology.lb,
            (0..count).map(idle_upstream).collect(),
            window,
        ));
    }
    cost.base_rss_kib = stop_idle_daemon(idle_daemon(&topology, IDLE_BASE));
    cost
}

/// Where idle upstream `i` is: the three upstream namespaces' greeting
/// servers in turn.
fn idle_upstream(i: usize) -> SocketAddr {
    SocketAddr::from((Topology::upstream_addr(i % 3), servers::GREET_PORT))
}

/// A daemon with `count` probed upstreams, ten per target, after its first
/// probes and applies.
fn idle_daemon(topology: &Topology, count: usize) -> Lobby {
    let check = health_check(servers::GREET_PORT, true, 1, 1, 1);
    let mut config = ConfigBuilder::new();
    for t in 0..count / 10 {
        config = config.target(&format!("t{t}"), 10_000 + t as u16);
        for u in 0..10 {
            let upstream = idle_upstream(t * 10 + u);
            config = config.upstream_with(&format!("u{u}"), upstream.ip(), upstream.port(), &check);
        }
    }
    let lobby = control_daemon(&topology.lb, &config.build());
    std::thread::sleep(Duration::from_secs(3)); // first probes, first applies
    lobby
}

/// The daemon's RSS (KiB), then a clean stop: its table and programs go.
fn stop_idle_daemon(mut lobby: Lobby) -> u64 {
    let rss = rss_kib(lobby.pid());
    let status = lobby.stop_with(libc::SIGTERM);
    assert!(status.success(), "the idle daemon stopped with {status}");
    rss
}

/// The anchor of the daemon's idle CPU: one thread in `ns` that connects
/// to each of `upstreams` once a [`IDLE_PROBE_INTERVAL`], spaced evenly
/// (the daemon's checkers start at random phases), as the daemon's TCP
/// probe does (a nonblocking connect with a timeout, then a close that
/// resets: SO_LINGER 0), and nothing else. Its CPU (% of one core) over
/// `window`, after a first interval left out as the daemon's first probes
/// are.
fn bare_prober_cpu(ns: &NetNs, upstreams: Vec<SocketAddr>, window: Duration) -> f64 {
    ns.within(move || {
        let spacing = IDLE_PROBE_INTERVAL / upstreams.len() as u32;
        let mut next = Instant::now();
        let measured_from = next + IDLE_PROBE_INTERVAL;
        let mut measuring: Option<(Instant, Duration)> = None;
        for target in upstreams.iter().cycle() {
            match measuring {
                None if next >= measured_from => measuring = Some((Instant::now(), thread_cpu())),
                Some((since, _)) if since.elapsed() >= window => break,
                _ => {}
            }
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            next += spacing;
            if let Ok(stream) = TcpStream::connect_timeout(target, IDLE_PROBE_TIMEOUT) {
                socket2::SockRef::from(&stream)
                    .set_linger(Some(Duration::ZERO))
                    .expect("SO_LINGER on a probe");
            }
        }
        let (since, cpu) = measuring.expect("a measured window");
        (thread_cpu() - cpu).as_secs_f64() / since.elapsed().as_secs_f64() * 100.0
    })
}

/// User and system CPU time of the calling thread.
fn thread_cpu() -> Duration {
    // SAFETY: a zeroed rusage is valid; getrusage fills it.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// CPU time of a process and of the children it waited for (the daemon's
/// nft runs), in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    cpu_fields(pid).expect("/proc/PID/stat").iter().sum()
}

/// CPU a daemon used, in clock ticks: its own (utime + stime), its
/// children's that ended (cutime + cstime) and its running children's (the
/// nft runs it waits for). A daemon's own figure alone
/// misses the nft runs, which are where a large table costs.
pub fn daemon_cpu_ticks(pid: u32) -> u64 {
    let own = cpu_fields(pid).map_or(0, |f| f.iter().sum());
    let running_children: u64 = running_children(pid)
        .into_iter()
        .filter_map(cpu_fields)
        .map(|f| f.iter().sum::<u64>())
        .sum();
    own + running_children
}

/// utime, stime, cutime and cstime of a process, in clock ticks; `None`
/// once it is gone.
fn cpu_fields(pid: u32) -> Option<[u64; 4]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: utime is the
    // 14th field of the whole line.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    fields.try_into().ok()
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

/// How long health changes wait for their transaction at 10,000
/// upstreams: the `report_to_apply_ms` of every apply a flapping server
/// causes (10 checked upstreams of one target go DOWN and UP `flaps`
/// times), while `lobby stats --json` reads all 10,000 upstreams back to
/// back (`scraping`) or nobody asks. Returns the samples and how many
/// scrapes completed.
pub fn report_to_apply_ms(scraping: bool, flaps: usize) -> (Vec<f64>, usize) {
    let topology = lb_topology();
    let mut server = Some(start_server(&topology, 0));
    let check = health_check(UPSTREAM_PORT, true, 1, 1, 1);
    let mut config = ConfigBuilder::new().target("checked", 9_999);
    for u in 0..10 {
        config = config.upstream_with(
            &format!("u{u}"),
            Topology::upstream_addr(0),
            UPSTREAM_PORT,
            &check,
        );
    }
    let config = scale_targets(config, 999, 10, Change::None).build();
    let lobby = control_daemon(&topology.lb, &config);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scraper = scraping.then(|| {
        let stop = stop.clone();
        let socket = lobby.socket_path.clone();
        std::thread::spawn(move || {
            let mut scrapes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ok = Command::new(lobby_tests::lobby::binary())
                    .args(["stats", "--json", "--socket"])
                    .arg(&socket)
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                scrapes += usize::from(ok);
            }
            scrapes
        })
    });
    let applies_before = lobby.log_count("report_to_apply_ms=");
    for _ in 0..flaps {
        for up in [false, true] {
            server = up.then(|| start_server(&topology, 0));
            wait_for(
                "the checked upstreams to follow",
                Duration::from_secs(20),
                || (in_rotation(&topology, 0) == up).then_some(()),
            );
            // Every upstream at the address reported, each in its phase.
            std::thread::sleep(Duration::from_millis(1500));
        }
    }
    drop(server);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let scrapes = scraper.map_or(0, |s| s.join().expect("the scraper"));
    let samples = lobby
        .log()
        .lines()
        .filter_map(|l| l.split("report_to_apply_ms=").nth(1))
        .skip(applies_before)
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    (samples, scrapes)
}
