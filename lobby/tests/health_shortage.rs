//! Out of file descriptors, probes are skipped, not failed: an upstream
//! that is UP stays UP, and the daemon says the shortage is its own, once
//! (issue 22, defect 3). The descriptors are used up in this process, so
//! this test has its binary to itself.
use std::{
    fs::File,
    io::Write,
    net::Ipv4Addr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use lobby::{
    config::{HealthCheck, HealthProtocol},
    health::{ProbeStats, spawn_checker},
    model::UpstreamId,
};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    time,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// What the checker logs, kept for the test to read.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Opens /dev/null until the process is out of descriptors; they are
/// free again when the files are dropped.
fn use_up_descriptors() -> Vec<File> {
    let mut held = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(file) => held.push(file),
            Err(e) if e.raw_os_error() == Some(libc::EMFILE) => return held,
            Err(e) => panic!("opening /dev/null: {e}"),
        }
    }
}

/// Lowers the soft limit so that using it up is quick.
fn lower_fd_limit(to: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only touch the struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = to.min(limit.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

#[tokio::test]
async fn out_of_descriptors_an_up_upstream_stays_up_and_one_warning_says_why() {
    let log = Log::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .init();
    lower_fd_limit(256);

    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let acceptor = tokio::spawn(async move {
        while let Ok((connection, _)) = listener.accept().await {
            drop(connection);
        }
    });
    let check = HealthCheck {
        protocol: HealthProtocol::Tcp,
        port,
        start_available: true,
        interval: Duration::from_millis(10),
        timeout: Duration::from_secs(5),
        success_count: 1,
        failure_count: 1,
    };
    let stats = Arc::new(ProbeStats::default());
    let (_address, address_rx) = watch::channel(Some(Ipv4Addr::LOCALHOST));
    let (reports_tx, mut reports) = mpsc::channel(4);
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();

    let held = use_up_descriptors();
    spawn_checker(
        UpstreamId::new("web", "web1"),
        check,
        true,
        address_rx,
        std::future::ready(()),
        reports_tx,
        Arc::clone(&stats),
        cancel.clone(),
        &tracker,
        &tokio::runtime::Handle::current(),
    );
    // A hundred probes are due in this second, each failing to open its
    // socket with EMFILE: a failure_count of 1 would take the upstream down
    // at the first.
    time::sleep(Duration::from_secs(1)).await;
    let text = log.text();
    let warning = "lobby is out of file descriptors (Too many open files (os error 24)); probes of web/web1 skipped (1 since the last warning), it stays UP";
    assert_eq!(text.matches(warning).count(), 1, "{text}");
    assert_eq!(
        text.matches("skipped").count(),
        1,
        "one warning a minute: {text}"
    );
    assert!(text.contains("WARN"), "{text}");
    assert_eq!(stats.failures.load(Ordering::Relaxed), 0);
    assert!(reports.try_recv().is_err(), "no change of state");

    // Descriptors back: probes succeed, and nothing changed on the way.
    drop(held);
    time::timeout(Duration::from_secs(10), async {
        while stats.successes.load(Ordering::Relaxed) == 0 {
            time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a successful probe once descriptors are free");
    assert!(reports.try_recv().is_err(), "no change of state");
    assert_eq!(stats.failures.load(Ordering::Relaxed), 0);

    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    acceptor.abort();
}
