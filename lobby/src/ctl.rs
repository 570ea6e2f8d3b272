//! The control socket: a Unix socket, root only, that answers one JSON
//! request per connection with one JSON line. `lobby stats` is its client.
//! Serving is split from answering: the daemon's loop owns the state and
//! answers [`Request`]s that arrive over a channel.
use std::{
    fmt::Write as _,
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::listen::{Limits, Watched, accept_until};

/// The default control socket.
pub const DEFAULT_SOCKET: &str = "/run/lobby/lobby.sock";

/// The `lobby stats --json` contract (SPEC.md): fields may be added, never
/// change meaning.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    pub targets: Vec<TargetStats>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStats {
    pub name: String,
    pub protocol: String,
    pub port: u16,
    pub upstream_group: String,
    pub distribution: String,
    pub upstreams: Vec<UpstreamStats>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamStats {
    pub name: String,
    pub host: String,
    /// `None` while the host name has never resolved.
    pub address: Option<String>,
    pub port: u16,
    pub available: bool,
    pub connections: u64,
    pub resets: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
enum WireRequest {
    Stats,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireResponse {
    Stats(StatsReport),
    Error(String),
}

/// A request for the daemon's loop, with where to send the answer.
pub enum Request {
    Stats(oneshot::Sender<StatsReport>),
    Metrics(oneshot::Sender<crate::metrics::Snapshot>),
}

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{op} {path}")]
    Socket {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another lobby is running: {path} answers")]
    InUse { path: PathBuf },
    #[error("talking to the daemon over {path}")]
    Exchange {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon's answer over {path} is not understood")]
    Decode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("lobby daemon at {path} did not answer within {}s", after.as_secs())]
    Timeout { path: PathBuf, after: Duration },
    #[error("the daemon answered: {0}")]
    Daemon(String),
}

/// Binds the socket (mode 0600, in a directory it creates), replacing a
/// stale socket file but refusing to steal one a live daemon answers on.
pub async fn bind(path: &Path) -> Result<UnixListener, CtlError> {
    let socket_error = |op, source| CtlError::Socket {
        op,
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| socket_error("creating the directory of", e))?;
    }
    if UnixStream::connect(path).await.is_ok() {
        return Err(CtlError::InUse {
            path: path.to_owned(),
        });
    }
    match tokio::fs::remove_file(path).await {
        Ok(()) => debug!(path = %path.display(), "removed a stale control socket"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error("removing the stale", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| socket_error("binding", e))?;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .await
        .map_err(|e| socket_error("restricting the mode of", e))?;
    Ok(listener)
}

/// The control socket's share of the daemon's descriptors and how long a
/// client may take: a request is one short line, sent at once.
pub const LIMITS: Limits = Limits {
    max_connections: 64,
    request_timeout: Duration::from_secs(5),
    idle_timeout: Duration::from_secs(5),
};

/// How long `lobby stats` waits for the daemon's answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts connections until `cancel`, forwarding their requests to the
/// loop, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    requests: mpsc::Sender<Request>,
    cancel: CancellationToken,
) {
    serve_within(listener, requests, &cancel, LIMITS).await;
    let _ = tokio::fs::remove_file(&path).await;
}

async fn serve_within(
    listener: UnixListener,
    requests: mpsc::Sender<Request>,
    cancel: &CancellationToken,
    limits: Limits,
) {
    accept_until(
        cancel,
        "control",
        limits,
        || async { listener.accept().await.map(|(stream, _)| stream) },
        |stream| {
            let requests = requests.clone();
            async move { answer(stream, &requests, limits.request_timeout).await }
        },
    )
    .await;
}

async fn answer(
    stream: Watched<UnixStream>,
    requests: &mpsc::Sender<Request>,
    request_timeout: Duration,
) -> io::Result<()> {
    let (read, mut write) = tokio::io::split(stream);
    let mut line = String::new();
    // One bounded line: a client cannot make the daemon buffer without end.
    let mut reader = BufReader::new(read.take(4096));
    tokio::time::timeout(request_timeout, reader.read_line(&mut line))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no request within {request_timeout:?}"),
            )
        })??;
    let response = match serde_json::from_str::<WireRequest>(&line) {
        Ok(WireRequest::Stats) => {
            let (reply, answer) = oneshot::channel();
            match requests.send(Request::Stats(reply)).await {
                Ok(()) => answer.await.map_or_else(
                    |_| WireResponse::Error("the daemon is shutting down".into()),
                    WireResponse::Stats,
                ),
                Err(_) => WireResponse::Error("the daemon is shutting down".into()),
            }
        }
        Err(e) => WireResponse::Error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&response).expect("plain data serializes");
    out.push(b'\n');
    write.write_all(&out).await
}

/// Asks the daemon listening on `path` for its stats, giving up after
/// [`CLIENT_TIMEOUT`].
pub async fn fetch_stats(path: &Path) -> Result<StatsReport, CtlError> {
    tokio::time::timeout(CLIENT_TIMEOUT, exchange(path))
        .await
        .map_err(|_| CtlError::Timeout {
            path: path.to_owned(),
            after: CLIENT_TIMEOUT,
        })?
}

async fn exchange(path: &Path) -> Result<StatsReport, CtlError> {
    let exchange = |source| CtlError::Exchange {
        path: path.to_owned(),
        source,
    };
    let stream = UnixStream::connect(path).await.map_err(exchange)?;
    let (read, mut write) = stream.into_split();
    let mut request = serde_json::to_vec(&WireRequest::Stats).expect("plain data serializes");
    request.push(b'\n');
    write.write_all(&request).await.map_err(exchange)?;
    let mut line = String::new();
    BufReader::new(read)
        .read_line(&mut line)
        .await
        .map_err(exchange)?;
    match serde_json::from_str(&line).map_err(|source| CtlError::Decode {
        path: path.to_owned(),
        source,
    })? {
        WireResponse::Stats(report) => Ok(report),
        WireResponse::Error(message) => Err(CtlError::Daemon(message)),
    }
}

/// Per-second rates of one upstream between two reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    pub connections: f64,
    pub bytes_out: f64,
    pub bytes_in: f64,
}

/// The rates of `upstream` of `target` since `earlier`, when `earlier` knew
/// it at the same address (counters of a changed upstream restart).
pub fn rates(
    earlier: &StatsReport,
    target: &str,
    upstream: &UpstreamStats,
    seconds: f64,
) -> Option<Rates> {
    let before = earlier
        .targets
        .iter()
        .find(|t| t.name == target)?
        .upstreams
        .iter()
        .find(|u| u.name == upstream.name && u.address == upstream.address)?;
    let per_second = |now: u64, then: u64| now.saturating_sub(then) as f64 / seconds;
    Some(Rates {
        connections: per_second(upstream.connections, before.connections),
        bytes_out: per_second(upstream.bytes_out, before.bytes_out),
        bytes_in: per_second(upstream.bytes_in, before.bytes_in),
    })
}

/// An aligned table, one line per upstream under its target's heading;
/// rates when an earlier report `seconds` before is given.
pub fn render_table(report: &StatsReport, earlier: Option<(&StatsReport, f64)>) -> String {
    let header = [
        "UPSTREAM",
        "STATE",
        "ADDRESS",
        "CONNS",
        "RESETS",
        "PKTS OUT",
        "BYTES OUT",
        "PKTS IN",
        "BYTES IN",
        "CONN/S",
        "OUT/S",
        "IN/S",
    ];
    let mut out = String::new();
    for target in &report.targets {
        let available = target.upstreams.iter().filter(|u| u.available).count();
        writeln!(
            out,
            "target {} ({} port {}, {} {}): {available} of {} upstreams available",
            target.name,
            target.protocol,
            target.port,
            target.upstream_group,
            target.distribution,
            target.upstreams.len()
        )
        .unwrap();
        let mut rows = vec![header.map(str::to_owned).to_vec()];
        for upstream in &target.upstreams {
            let rates =
                earlier.and_then(|(report, secs)| rates(report, &target.name, upstream, secs));
            let address = match &upstream.address {
                Some(address) => format!("{address}:{}", upstream.port),
                None => format!("{} (unresolved)", upstream.host),
            };
            rows.push(vec![
                upstream.name.clone(),
                if upstream.available { "up" } else { "down" }.to_owned(),
                address,
                upstream.connections.to_string(),
                upstream.resets.to_string(),
                upstream.packets_out.to_string(),
                human_bytes(upstream.bytes_out as f64),
                upstream.packets_in.to_string(),
                human_bytes(upstream.bytes_in as f64),
                rates.map_or("-".into(), |r| format!("{:.1}", r.connections)),
                rates.map_or("-".into(), |r| human_bytes(r.bytes_out)),
                rates.map_or("-".into(), |r| human_bytes(r.bytes_in)),
            ]);
        }
        let widths: Vec<usize> = (0..header.len())
            .map(|col| {
                rows.iter()
                    .map(|row| row[col].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                // Names and addresses read left to right, numbers line up right.
                .map(|(col, (cell, width))| {
                    if col < 3 {
                        format!("{cell:<width$}")
                    } else {
                        format!("{cell:>width$}")
                    }
                })
                .collect();
            writeln!(out, "  {}", cells.join("  ").trim_end()).unwrap();
        }
    }
    if report.targets.is_empty() {
        out.push_str("no targets configured\n");
    }
    out
}

/// Bytes in binary units with one decimal: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024.0 {
        return format!("{bytes:.0} B");
    }
    let mut value = bytes / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(name: &str, connections: u64, bytes_out: u64) -> UpstreamStats {
        UpstreamStats {
            name: name.into(),
            host: "198.18.1.11".into(),
            address: Some("198.18.1.11".into()),
            port: 9000,
            available: true,
            connections,
            resets: 0,
            packets_out: 10,
            bytes_out,
            packets_in: 9,
            bytes_in: 2048,
        }
    }

    fn report(upstreams: Vec<UpstreamStats>) -> StatsReport {
        StatsReport {
            targets: vec![TargetStats {
                name: "web".into(),
                protocol: "tcp".into(),
                port: 8081,
                upstream_group: "web-pool".into(),
                distribution: "round-robin".into(),
                upstreams,
            }],
        }
    }

    #[test]
    fn json_matches_the_contract() {
        let json = serde_json::to_value(report(vec![upstream("web1", 12, 5000)])).unwrap();
        let expected = serde_json::json!({"targets": [{"name": "web", "protocol": "tcp", "port": 8081,
            "upstream_group": "web-pool", "distribution": "round-robin",
            "upstreams": [{"name": "web1", "host": "198.18.1.11", "address": "198.18.1.11", "port": 9000,
                "available": true, "connections": 12, "resets": 0, "packets_out": 10, "bytes_out": 5000,
                "packets_in": 9, "bytes_in": 2048}]}]});
        assert_eq!(json, expected);
    }

    #[test]
    fn rates_are_per_second_and_need_the_same_address() {
        let before = report(vec![upstream("web1", 10, 1000)]);
        let now = upstream("web1", 30, 5000);
        let rates = rates(&before, "web", &now, 2.0).unwrap();
        assert_eq!(rates.connections, 10.0);
        assert_eq!(rates.bytes_out, 2000.0);
        let mut moved = now.clone();
        moved.address = Some("198.18.1.12".into());
        assert_eq!(super::rates(&before, "web", &moved, 2.0), None);
    }

    #[test]
    fn table_aligns_columns_and_shows_rates() {
        let before = report(vec![
            upstream("web1", 10, 1000),
            upstream("web-long-name", 0, 0),
        ]);
        let now = report(vec![
            upstream("web1", 30, 5000),
            upstream("web-long-name", 1, 3 << 20),
        ]);
        let table = render_table(&now, Some((&before, 2.0)));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "target web (tcp port 8081, web-pool round-robin): 2 of 2 upstreams available"
        );
        assert!(
            lines[1].starts_with("  UPSTREAM       STATE  ADDRESS"),
            "{table}"
        );
        assert!(
            lines[2].contains("10.0") && lines[2].contains("2.0 KiB"),
            "{table}"
        );
        assert!(lines[3].contains("3.0 MiB"), "{table}");
        let column = |line: &str| line.find("up ").unwrap();
        assert_eq!(column(lines[2]), column(lines[3]), "{table}");
    }

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
        assert_eq!(human_bytes(5.0 * 1024.0 * 1024.0 * 1024.0), "5.0 GiB");
    }

    /// A control socket in `dir` within `limits` whose loop answers every
    /// request with `report`, until the returned token is cancelled.
    async fn daemon(
        dir: &Path,
        limits: Limits,
        report: StatsReport,
    ) -> (PathBuf, CancellationToken) {
        let path = dir.join("lobby.sock");
        let listener = bind(&path).await.unwrap();
        let (requests, mut incoming) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        let serving = cancel.clone();
        tokio::spawn(async move { serve_within(listener, requests, &serving, limits).await });
        tokio::spawn(async move {
            while let Some(Request::Stats(reply)) = incoming.recv().await {
                let _ = reply.send(report.clone());
            }
        });
        (path, cancel)
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_at_the_cap_closes_the_oldest_silent_client() {
        // Shorter than the client's own timeout, so it can still be served.
        let limits = Limits {
            max_connections: 2,
            request_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(2),
        };
        assert!(limits.request_timeout < CLIENT_TIMEOUT);
        let dir = tempfile::tempdir().unwrap();
        let expected = report(vec![upstream("web1", 1, 2)]);
        let (path, cancel) = daemon(dir.path(), limits, expected.clone()).await;
        let start = tokio::time::Instant::now();
        let mut silent = Vec::new();
        for _ in 0..limits.max_connections {
            silent.push(UnixStream::connect(&path).await.unwrap());
        }
        assert_eq!(fetch_stats(&path).await.unwrap(), expected);
        assert!(
            start.elapsed() < limits.request_timeout,
            "answered after {:?}: it waited for a silent client's timeout",
            start.elapsed()
        );
        for mut client in silent {
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "{rest:?}");
        }
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn stats_give_up_on_a_daemon_that_does_not_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lobby.sock");
        // Bound, never accepted: connecting and sending succeed, no answer.
        let _listener = UnixListener::bind(&path).unwrap();
        let start = tokio::time::Instant::now();
        let error = fetch_stats(&path).await.unwrap_err();
        assert!(matches!(error, CtlError::Timeout { .. }), "{error:?}");
        assert_eq!(start.elapsed(), CLIENT_TIMEOUT);
        assert_eq!(
            error.to_string(),
            format!(
                "lobby daemon at {} did not answer within 5s",
                path.display()
            )
        );
    }

    #[tokio::test]
    async fn a_request_reaches_the_loop_and_its_answer_the_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl/lobby.sock");
        let listener = bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (requests, mut incoming) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, path.clone(), requests, cancel.clone()));
        let expected = report(vec![upstream("web1", 1, 2)]);
        let answering = {
            let expected = expected.clone();
            tokio::spawn(async move {
                let Some(Request::Stats(reply)) = incoming.recv().await else {
                    panic!("no request")
                };
                reply.send(expected).unwrap();
            })
        };
        assert_eq!(fetch_stats(&path).await.unwrap(), expected);
        answering.await.unwrap();
        // A second daemon must not steal the socket of a live one.
        assert!(matches!(bind(&path).await, Err(CtlError::InUse { .. })));
        cancel.cancel();
        server.await.unwrap();
        assert!(!path.exists(), "socket file left behind");
    }
}
