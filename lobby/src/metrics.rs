//! The Prometheus endpoint: renders what the daemon knows in the text
//! exposition format and serves it over plain HTTP on `metrics.listen`.
//! The counters are the same the control socket reports.
use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;

use crate::ctl::{Request, StatsReport};

/// Upper bounds (seconds) of the apply-duration histogram: an apply takes
/// milliseconds at small scale and a few hundred at 10,000 upstreams.
pub const APPLY_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A histogram of nft apply durations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Observations at or below each bound of [`APPLY_BUCKETS`].
    pub buckets: [u64; APPLY_BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (bucket, bound) in self.buckets.iter_mut().zip(APPLY_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// Per-upstream figures that are not in the stats report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpstreamExtras {
    pub health_successes: u64,
    pub health_failures: u64,
    pub state_changes: u64,
}

/// Everything the endpoint shows, gathered by the daemon's loop.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub stats: StatsReport,
    /// By (target, upstream).
    pub extras: BTreeMap<(String, String), UpstreamExtras>,
    /// By result (`success`, `nxdomain`, ...).
    pub dns_resolutions: BTreeMap<String, u64>,
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
    pub last_reload_successful: bool,
    pub apply_duration: Histogram,
}

/// The text exposition format (version 0.0.4).
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
        writeln!(out, "# HELP {name} {help}").unwrap();
        writeln!(out, "# TYPE {name} {kind}").unwrap();
        for (labels, value) in samples {
            writeln!(out, "{name}{labels} {value}").unwrap();
        }
    };
    // (target, labels, stats) of every upstream.
    let upstreams: Vec<(&str, String, &crate::ctl::UpstreamStats)> = snapshot
        .stats
        .targets
        .iter()
        .flat_map(|t| {
            t.upstreams.iter().map(move |u| {
                let labels = format!(
                    "target=\"{}\",upstream=\"{}\",address=\"{}\"",
                    escape(&t.name),
                    escape(&u.name),
                    u.address
                        .as_deref()
                        .map_or(String::new(), |a| format!("{a}:{}", u.port))
                );
                (t.name.as_str(), labels, u)
            })
        })
        .collect();
    let per_upstream = |value: &dyn Fn(&crate::ctl::UpstreamStats) -> String| {
        upstreams
            .iter()
            .map(|(_, labels, u)| (format!("{{{labels}}}"), value(u)))
            .collect()
    };
    family(
        "lobby_upstream_up",
        "gauge",
        "Whether new connections go to the upstream (1) or not (0).",
        per_upstream(&|u| u8::from(u.available).to_string()),
    );
    family(
        "lobby_upstream_connections_total",
        "counter",
        "Connections sent to the upstream (SYNs toward it).",
        per_upstream(&|u| u.connections.to_string()),
    );
    family(
        "lobby_upstream_resets_total",
        "counter",
        "TCP resets from the upstream.",
        per_upstream(&|u| u.resets.to_string()),
    );
    let directional = |value: &dyn Fn(&crate::ctl::UpstreamStats) -> (u64, u64)| {
        upstreams
            .iter()
            .flat_map(|(_, labels, u)| {
                let (inbound, outbound) = value(u);
                [
                    (
                        format!("{{{labels},direction=\"in\"}}"),
                        inbound.to_string(),
                    ),
                    (
                        format!("{{{labels},direction=\"out\"}}"),
                        outbound.to_string(),
                    ),
                ]
            })
            .collect()
    };
    family(
        "lobby_upstream_packets_total",
        "counter",
        "Packets from (in) and to (out) the upstream.",
        directional(&|u| (u.packets_in, u.packets_out)),
    );
    family(
        "lobby_upstream_bytes_total",
        "counter",
        "IP bytes from (in) and to (out) the upstream.",
        directional(&|u| (u.bytes_in, u.bytes_out)),
    );
    let mut checks = Vec::new();
    let mut changes = Vec::new();
    for (target, labels, upstream) in &upstreams {
        let extras = snapshot
            .extras
            .get(&((*target).to_owned(), upstream.name.clone()))
            .cloned()
            .unwrap_or_default();
        checks.push((
            format!("{{{labels},result=\"success\"}}"),
            extras.health_successes.to_string(),
        ));
        checks.push((
            format!("{{{labels},result=\"failure\"}}"),
            extras.health_failures.to_string(),
        ));
        changes.push((format!("{{{labels}}}"), extras.state_changes.to_string()));
    }
    family(
        "lobby_upstream_health_checks_total",
        "counter",
        "Health-check probes by result.",
        checks,
    );
    family(
        "lobby_upstream_state_changes_total",
        "counter",
        "Changes between available and unavailable.",
        changes,
    );
    family(
        "lobby_dns_resolutions_total",
        "counter",
        "Upstream name resolutions by result.",
        snapshot
            .dns_resolutions
            .iter()
            .map(|(result, n)| (format!("{{result=\"{}\"}}", escape(result)), n.to_string()))
            .collect(),
    );
    family(
        "lobby_config_reloads_total",
        "counter",
        "Configuration reloads by result.",
        vec![
            (
                "{result=\"success\"}".into(),
                snapshot.reloads_succeeded.to_string(),
            ),
            (
                "{result=\"failure\"}".into(),
                snapshot.reloads_failed.to_string(),
            ),
        ],
    );
    family(
        "lobby_config_last_reload_successful",
        "gauge",
        "Whether the last reload succeeded (1) or was rejected (0).",
        vec![(
            String::new(),
            u8::from(snapshot.last_reload_successful).to_string(),
        )],
    );
    let h = &snapshot.apply_duration;
    let mut samples: Vec<(String, String)> = APPLY_BUCKETS
        .iter()
        .zip(h.buckets)
        .map(|(bound, n)| (format!("_bucket{{le=\"{bound}\"}}"), n.to_string()))
        .collect();
    samples.push(("_bucket{le=\"+Inf\"}".into(), h.count.to_string()));
    samples.push(("_sum".into(), h.sum.to_string()));
    samples.push(("_count".into(), h.count.to_string()));
    family(
        "lobby_nft_apply_duration_seconds",
        "histogram",
        "Time to apply one nftables transaction.",
        samples,
    );
    out
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[derive(Debug, thiserror::Error)]
#[error("listening for metrics on {addr}")]
pub struct MetricsError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError { addr, source })
}

/// Serves `GET /metrics` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    requests: mpsc::Sender<Request>,
    cancel: CancellationToken,
) {
    crate::ctl::accept_until(
        &cancel,
        "metrics",
        || async { listener.accept().await.map(|(stream, _)| stream) },
        |stream| {
            let requests = requests.clone();
            async move { answer(stream, &requests).await }
        },
    )
    .await;
}

async fn answer(mut stream: TcpStream, requests: &mpsc::Sender<Request>) -> std::io::Result<()> {
    // Only the request line matters; a scrape's request fits in one read.
    let mut buf = [0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .map_err(std::io::Error::other)??;
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if !request.starts_with("GET ") {
        ("405 Method Not Allowed", "only GET\n".to_owned())
    } else if path != "/metrics" && path != "/" {
        ("404 Not Found", "see /metrics\n".to_owned())
    } else {
        let (reply, snapshot) = oneshot::channel();
        match requests.send(Request::Metrics(reply)).await {
            Ok(()) => match snapshot.await {
                Ok(snapshot) => ("200 OK", render(&snapshot)),
                Err(_) => ("503 Service Unavailable", "shutting down\n".to_owned()),
            },
            Err(_) => ("503 Service Unavailable", "shutting down\n".to_owned()),
        }
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::{TargetStats, UpstreamStats};

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(30));
        assert_eq!(h.buckets[0], 1); // <= 5 ms
        assert_eq!(h.buckets[3], 2); // <= 50 ms
        assert_eq!(h.count, 2);
        let text = render(&Snapshot {
            apply_duration: h,
            ..Default::default()
        });
        assert!(
            text.contains("lobby_nft_apply_duration_seconds_bucket{le=\"0.01\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("lobby_nft_apply_duration_seconds_bucket{le=\"+Inf\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("lobby_nft_apply_duration_seconds_count 2\n"),
            "{text}"
        );
    }

    #[test]
    fn upstream_samples_carry_escaped_labels() {
        let upstream = UpstreamStats {
            name: "web\"1".into(),
            host: "web.test".into(),
            address: None,
            port: 9000,
            available: false,
            connections: 7,
            resets: 1,
            packets_out: 10,
            bytes_out: 500,
            packets_in: 8,
            bytes_in: 700,
        };
        let snapshot = Snapshot {
            stats: StatsReport {
                targets: vec![TargetStats {
                    name: "web".into(),
                    protocol: "tcp".into(),
                    port: 8081,
                    upstream_group: "pool".into(),
                    distribution: "round-robin".into(),
                    upstreams: vec![upstream],
                }],
            },
            ..Default::default()
        };
        let text = render(&snapshot);
        let labels = "target=\"web\",upstream=\"web\\\"1\",address=\"\"";
        assert!(
            text.contains(&format!("lobby_upstream_up{{{labels}}} 0\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "lobby_upstream_bytes_total{{{labels},direction=\"in\"}} 700\n"
            )),
            "{text}"
        );
        assert!(
            text.contains("# TYPE lobby_upstream_connections_total counter\n"),
            "{text}"
        );
    }
}
