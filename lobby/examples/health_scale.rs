//! What health checking costs at scale: 10,000 checkers probing listeners on
//! 127.0.0.1 every second, measured over 20 s after a warm-up. Prints the
//! process's CPU time as a share of one core (and the part of it spent by
//! the listeners' thread, which a real daemon would not have), its resident
//! memory and the probe counts.
//!
//! `cargo run --release -p lobby --example health_scale [-- CHECKERS [SECONDS]]`
use std::{
    error::Error,
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use lobby::{
    config::{HealthCheck, HealthProtocol},
    health::{CheckerRuntime, ProbeStats, raise_fd_limit, spawn_checker},
    model::UpstreamId,
};
use tokio::{
    net::{TcpListener, TcpSocket},
    runtime::{self, Runtime},
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
    time::{self, Instant},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Ports the checkers are spread over, so that no accept queue overflows.
const LISTENERS: usize = 8;
const ACCEPT_QUEUE: u32 = 4096;
/// Lets the first probes (spread over 500 ms) and allocations settle.
const WARM_UP: Duration = Duration::from_secs(2);

type Result<T> = std::result::Result<T, Box<dyn Error>>;

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let checkers: usize = args.next().map_or(Ok(10_000), |arg| arg.parse())?;
    let seconds: u64 = args.next().map_or(Ok(20), |arg| arg.parse())?;
    let fd_limit = raise_fd_limit()?;

    let (ports, listeners_tid) = start_listeners().await?;
    let (_address, address_rx) = watch::channel(Some(Ipv4Addr::LOCALHOST));
    let (reports_tx, mut reports) = mpsc::channel(1024);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    // As in the daemon: the checkers on a thread of their own.
    let checker_runtime = CheckerRuntime::start()?;
    let stats: Vec<Arc<ProbeStats>> = (0..checkers).map(|_| Arc::default()).collect();
    for (index, upstream_stats) in stats.iter().enumerate() {
        let check = HealthCheck {
            protocol: HealthProtocol::Tcp,
            port: ports[index % ports.len()],
            start_available: true,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_count: 1,
            failure_count: 1,
        };
        spawn_checker(
            UpstreamId::new("scale", format!("upstream{index}")),
            check,
            true,
            address_rx.clone(),
            std::future::ready(()),
            reports_tx.clone(),
            Arc::clone(upstream_stats),
            cancel.clone(),
            &tracker,
            checker_runtime.handle(),
        );
    }
    drop(reports_tx);
    let transitions = tokio::spawn(async move {
        let mut count = 0_u64;
        while let Some(report) = reports.recv().await {
            if count < 5 {
                println!("{report}");
            }
            count += 1;
        }
        count
    });

    time::sleep(WARM_UP).await;
    let listeners_stat = format!("/proc/self/task/{listeners_tid}/stat");
    let start = Sample::take(&stats, &listeners_stat)?;
    time::sleep(Duration::from_secs(seconds)).await;
    let end = Sample::take(&stats, &listeners_stat)?;
    let open_fds = std::fs::read_dir("/proc/self/fd")?.count();
    let rss = memory_kib("VmRSS")?;
    let peak_rss = memory_kib("VmHWM")?;

    cancel.cancel();
    tracker.close();
    tracker.wait().await;

    let elapsed = end.at - start.at;
    let share = |cpu: Duration| 100.0 * cpu.as_secs_f64() / elapsed.as_secs_f64();
    let process_cpu = end.process_cpu - start.process_cpu;
    let listeners_cpu = end.listeners_cpu - start.listeners_cpu;
    let user_cpu = end.process_user_cpu - start.process_user_cpu;
    let successes = end.successes - start.successes;
    let failures = end.failures - start.failures;
    println!("checkers: {checkers} at 1 s over {LISTENERS} ports; fd limit {fd_limit}");
    println!(
        "measured {:.1} s: {successes} successes, {failures} failures ({:.0} probes/s)",
        elapsed.as_secs_f64(),
        (successes + failures) as f64 / elapsed.as_secs_f64()
    );
    println!(
        "cpu: {:.2}% of one core for the process ({:.2}% in user space), \
         of which {:.2}% the listeners' thread",
        share(process_cpu),
        share(user_cpu),
        share(listeners_cpu)
    );
    println!("rss: {rss} KiB (peak {peak_rss} KiB); open fds: {open_fds}");
    println!("transitions reported: {}", transitions.await?);
    Ok(())
}

/// Listeners that accept and close, on a thread of their own so that their
/// CPU time can be told apart. Returns their ports and the thread's id.
async fn start_listeners() -> Result<(Vec<u16>, libc::pid_t)> {
    let (ready_tx, ready_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("listeners".into())
        .spawn(move || match bind_listeners() {
            Err(error) => {
                let _ = ready_tx.send(Err(error));
            }
            Ok((runtime, listeners)) => {
                let ports: io::Result<Vec<u16>> = listeners
                    .iter()
                    .map(|listener| listener.local_addr().map(|address| address.port()))
                    .collect();
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                let _ = ready_tx.send(ports.map(|ports| (ports, tid)));
                runtime.block_on(accept_and_close(listeners));
            }
        })?;
    Ok(ready_rx.await??)
}

/// A deeper accept queue than the usual 1024: each port takes over a
/// thousand connections within the 500 ms that first probes spread over.
fn bind_listeners() -> io::Result<(Runtime, Vec<TcpListener>)> {
    let runtime = runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _context = runtime.enter();
    let listeners = (0..LISTENERS)
        .map(|_| {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
            socket.listen(ACCEPT_QUEUE)
        })
        .collect::<io::Result<_>>()?;
    Ok((runtime, listeners))
}

async fn accept_and_close(listeners: Vec<TcpListener>) {
    let mut accepting = JoinSet::new();
    for listener in listeners {
        accepting.spawn(async move {
            while let Ok((connection, _)) = listener.accept().await {
                drop(connection);
            }
        });
    }
    accepting.join_all().await;
}

struct Sample {
    at: Instant,
    process_cpu: Duration,
    process_user_cpu: Duration,
    listeners_cpu: Duration,
    successes: u64,
    failures: u64,
}

impl Sample {
    fn take(stats: &[Arc<ProbeStats>], listeners_stat: &str) -> Result<Self> {
        let count = |counter: fn(&ProbeStats) -> u64| stats.iter().map(|s| counter(s)).sum();
        let (process_user_cpu, process_system_cpu) = cpu_times("/proc/self/stat")?;
        let (listeners_user_cpu, listeners_system_cpu) = cpu_times(listeners_stat)?;
        Ok(Self {
            at: Instant::now(),
            process_cpu: process_user_cpu + process_system_cpu,
            process_user_cpu,
            listeners_cpu: listeners_user_cpu + listeners_system_cpu,
            successes: count(|s| s.successes.load(Ordering::Relaxed)),
            failures: count(|s| s.failures.load(Ordering::Relaxed)),
        })
    }
}

/// (utime, stime) of a /proc stat file: fields 14 and 15, counted after
/// the command name, which may hold spaces.
fn cpu_times(stat_path: &str) -> Result<(Duration, Duration)> {
    let stat = std::fs::read_to_string(stat_path)?;
    let after_name = stat.rsplit_once(')').ok_or("no command name")?.1;
    let mut fields = after_name.split_whitespace().skip(11);
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut next_time = || -> Result<Duration> {
        let ticks: u64 = fields.next().ok_or("short stat")?.parse()?;
        Ok(Duration::from_secs_f64(ticks as f64 / ticks_per_second))
    };
    Ok((next_time()?, next_time()?))
}

fn memory_kib(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .ok_or("no such field in /proc/self/status")?;
    Ok(line.trim().trim_end_matches("kB").trim().parse()?)
}
