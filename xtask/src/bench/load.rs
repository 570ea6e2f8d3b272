//! The client's side: threads inside the client namespace that open
//! connections, stream bulk data or time round trips, for a bounded time.
use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lobby_tests::server::connect_from;

/// Moves the calling thread into network namespace `ns`.
fn enter(ns: &str) {
    let file = File::open(format!("/run/netns/{ns}")).expect("opening the client namespace");
    // SAFETY: setns on this thread only, with a valid namespace fd.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Runs `work(worker index, deadline)` on `workers` threads in `ns`.
fn on_threads<T: Send + 'static>(
    ns: &str,
    workers: usize,
    duration: Duration,
    work: impl Fn(usize, Instant) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let work = Arc::new(work);
    let deadline = Instant::now() + duration;
    let threads: Vec<_> = (0..workers)
        .map(|i| {
            let (ns, work) = (ns.to_owned(), work.clone());
            std::thread::spawn(move || {
                enter(&ns);
                work(i, deadline)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("a load thread panicked"))
        .collect()
}

/// Result of a connection-rate run.
pub struct Rate {
    pub connections: u64,
    pub failures: u64,
    pub seconds: f64,
}

/// `workers` concurrent clients, each connecting, reading one byte and
/// closing, in turn over `targets`, until `duration` is over. With
/// `sources`, worker i connects from `sources[i % len]`, so that every
/// source address opens connections for the whole run; without, from the
/// address the route gives.
pub fn connection_rate(
    ns: &str,
    targets: Vec<SocketAddr>,
    sources: Vec<IpAddr>,
    workers: usize,
    duration: Duration,
) -> Rate {
    let started = Instant::now();
    let results = on_threads(ns, workers, duration, move |worker, deadline| {
        let (mut ok, mut failed) = (0u64, 0u64);
        let mut next = worker;
        let source =
            (!sources.is_empty()).then(|| SocketAddr::new(sources[worker % sources.len()], 0));
        let timeout = Duration::from_secs(3);
        while Instant::now() < deadline {
            let target = targets[next % targets.len()];
            next += 1;
            let connected = match source {
                Some(source) => connect_from(source, target, timeout),
                None => TcpStream::connect_timeout(&target, timeout),
            };
            let done = connected.and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(3)))?;
                let mut byte = [0u8; 1];
                s.read_exact(&mut byte)
            });
            match done {
                Ok(()) => ok += 1,
                Err(_) => failed += 1,
            }
        }
        (ok, failed)
    });
    Rate {
        connections: results.iter().map(|r| r.0).sum(),
        failures: results.iter().map(|r| r.1).sum(),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Result of a bulk run.
pub struct Bulk {
    pub bytes: u64,
    pub seconds: f64,
}

/// The bytes that `streams` connections push to sink servers.
pub fn bulk(ns: &str, targets: Vec<SocketAddr>, streams: usize, duration: Duration) -> Bulk {
    let sent = Arc::new(AtomicU64::new(0));
    let counted = sent.clone();
    let started = Instant::now();
    on_threads(ns, streams, duration, move |worker, deadline| {
        let target = targets[worker % targets.len()];
        let Ok(mut stream) = TcpStream::connect_timeout(&target, Duration::from_secs(3)) else {
            return;
        };
        let chunk = vec![0x5au8; 128 * 1024];
        while Instant::now() < deadline {
            match stream.write(&chunk) {
                Ok(n) => counted.fetch_add(n as u64, Ordering::Relaxed),
                Err(_) => return,
            };
        }
    });
    Bulk {
        bytes: sent.load(Ordering::Relaxed),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// `flows` UDP flows (one socket, so one source port, each), flow `i`
/// to `targets[i % len]`, each sending 64-byte datagrams as fast as it
/// can until `duration` is over; returns the seconds it took. What
/// arrived is counted by the receivers.
pub fn udp_flood(ns: &str, targets: Vec<SocketAddr>, flows: usize, duration: Duration) -> f64 {
    let started = Instant::now();
    on_threads(ns, flows, duration, move |flow, deadline| {
        let target = targets[flow % targets.len()];
        let local: SocketAddr = if target.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let socket = UdpSocket::bind(local).expect("a UDP socket");
        socket.connect(target).expect("connecting the UDP socket");
        let datagram = [0x5au8; 64];
        while Instant::now() < deadline {
            for _ in 0..64 {
                // Refusals and full queues are the measurement's, not errors.
                let _ = socket.send(&datagram);
            }
        }
    });
    started.elapsed().as_secs_f64()
}

/// Pins the calling thread to `cpu`: round trips between threads that
/// share a CPU and threads that do not differ tenfold, and an unpinned
/// run flips between the two.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Round trips of a 64-byte message over one connection, the client on
/// CPU 0 and the echo server on CPU 1: (p50, p99) in microseconds.
pub fn latency(ns: &str, target: SocketAddr, round_trips: usize) -> (f64, f64) {
    let mut samples = on_threads(ns, 1, Duration::from_secs(60), move |_, deadline| {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))
            .expect("latency connection");
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let message = [7u8; 64];
        let mut echo = [0u8; 64];
        let mut samples = Vec::with_capacity(round_trips);
        while samples.len() < round_trips && Instant::now() < deadline {
            let started = Instant::now();
            stream.write_all(&message).expect("latency write");
            stream.read_exact(&mut echo).expect("latency read");
            samples.push(started.elapsed().as_secs_f64() * 1e6);
        }
        samples
    })
    .pop()
    .unwrap_or_default();
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (at(0.5), at(0.99))
}
