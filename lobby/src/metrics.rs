//! The HTTP endpoint on `metrics.listen` (hyper, HTTP/1.1): `/metrics`
//! renders what the daemon knows in the Prometheus text exposition format
//! (version 0.0.4) with `prometheus-client`; `/api/stats` answers the
//! `lobby stats --json` contract; `/` is the read-only status page
//! ([`page`]) that draws it. The counters are the same the control socket
//! reports.
mod page;

use std::{collections::BTreeMap, convert::Infallible, fmt, io, net::SocketAddr, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Response, StatusCode, body::Bytes, header, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;

use crate::{
    ctl::{AdminState, Request, StatsReport, TargetStats, UpstreamStats},
    listen::{Limits, accept_until},
};

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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamExtras {
    pub health_successes: u64,
    pub health_failures: u64,
    pub state_changes: u64,
}

/// Everything the endpoint shows, gathered by the daemon's loop.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub stats: StatsReport,
    /// One per upstream entry of `stats`, in its order (target by target).
    pub extras: Vec<UpstreamExtras>,
    /// By result (`success`, `nxdomain`, ...).
    pub dns_resolutions: BTreeMap<String, u64>,
    pub reloads_succeeded: u64,
    pub reloads_failed: u64,
    pub last_reload_successful: bool,
    pub apply_duration: Histogram,
    /// The connection-tracking table of the daemon's namespace; `None`
    /// where the kernel tracks no connections.
    pub conntrack: Option<crate::conntrack::Usage>,
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        // prometheus-client takes the count of each bucket alone and sums
        // them up itself; ours are already cumulative.
        let mut below = 0;
        let buckets: Vec<(f64, u64)> = APPLY_BUCKETS
            .iter()
            .zip(self.buckets)
            .map(|(bound, cumulative)| {
                let alone = cumulative - below;
                below = cumulative;
                (*bound, alone)
            })
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The text exposition format (version 0.0.4).
pub fn render(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exposition(snapshot)));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

/// The snapshot of one scrape, encoded family by family. A collector rather
/// than registered counters: the daemon's loop owns the figures and hands
/// over a copy per scrape, so every sample is a constant of that copy.
#[derive(Debug)]
struct Exposition(Snapshot);

/// `target`, `upstream`, `address` (`ADDRESS:PORT`, `[ADDRESS]:PORT` for
/// IPv6, empty while unresolved), `protocol` (the target's) and `family`
/// (the address's, empty while unresolved): one sample per address of an
/// upstream.
type UpstreamLabels<'a> = [(&'static str, &'a str); 5];

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let snapshot = &self.0;
        let addresses: Vec<String> = upstreams(&snapshot.stats)
            .map(|(_, u)| crate::ctl::socket_address(u).unwrap_or_default())
            .collect();
        let upstreams: Vec<(UpstreamLabels, &UpstreamStats, UpstreamExtras)> =
            upstreams(&snapshot.stats)
                .zip(&addresses)
                .enumerate()
                .map(|(i, ((target, u), address))| {
                    let extras = snapshot.extras.get(i).copied().unwrap_or_default();
                    let labels = [
                        ("target", target.name.as_str()),
                        ("upstream", u.name.as_str()),
                        ("address", address.as_str()),
                        ("protocol", target.protocol.as_str()),
                        ("family", u.family.as_deref().unwrap_or_default()),
                    ];
                    (labels, u, extras)
                })
                .collect();
        let per_upstream = |value: fn(&UpstreamStats) -> u64| {
            upstreams
                .iter()
                .map(move |(labels, u, _)| (*labels, ConstCounter::new(value(u))))
        };
        let directional = |value: fn(&UpstreamStats) -> (u64, u64)| {
            upstreams.iter().flat_map(move |(labels, u, _)| {
                let (inbound, outbound) = value(u);
                [
                    ((*labels, [("direction", "in")]), ConstCounter::new(inbound)),
                    (
                        (*labels, [("direction", "out")]),
                        ConstCounter::new(outbound),
                    ),
                ]
            })
        };
        // Counters are named without `_total`: prometheus-client appends it.
        family(
            &mut encoder,
            "lobby_upstream_up",
            "Whether new connections go to the upstream (1) or not (0).",
            upstreams
                .iter()
                .map(|(labels, u, _)| (*labels, ConstGauge::new(i64::from(u.available)))),
        )?;
        family(
            &mut encoder,
            "lobby_upstream_admin_state",
            "The operator's say over the upstream (lobby ctl): 1 for its current state.",
            upstreams.iter().flat_map(|(labels, u, _)| {
                AdminState::ALL.map(|state| {
                    (
                        (*labels, [("state", state.as_str())]),
                        ConstGauge::new(i64::from(u.admin_state == state)),
                    )
                })
            }),
        )?;
        family(
            &mut encoder,
            "lobby_upstream_weight",
            "The upstream's share of new connections: its weight, 0 when drained or disabled.",
            upstreams
                .iter()
                .map(|(labels, u, _)| (*labels, ConstGauge::new(i64::from(u.weight)))),
        )?;
        family(
            &mut encoder,
            "lobby_upstream_established_connections",
            "Established connections the kernel translated to the upstream, as conntrack counted them last (upstreams of least-connections targets).",
            upstreams.iter().filter_map(|(labels, u, _)| {
                let established = i64::try_from(u.established_connections?).unwrap_or(i64::MAX);
                Some((*labels, ConstGauge::new(established)))
            }),
        )?;
        family(
            &mut encoder,
            "lobby_upstream_probe_latency_seconds",
            "The smoothed round trip of the upstream's successful health probes (what least-latency picks by).",
            upstreams.iter().filter_map(|(labels, u, _)| {
                let latency = u.probe_latency_seconds?.0.as_secs_f64();
                Some((*labels, ConstGauge::new(latency)))
            }),
        )?;
        family(
            &mut encoder,
            "lobby_upstream_connections",
            "Connections sent to the upstream (SYNs toward it).",
            per_upstream(|u| u.connections),
        )?;
        // Counters are named without `_total`: prometheus-client appends it.
        family(
            &mut encoder,
            "lobby_target_denied_packets",
            "Packets the target's traffic policy refused, by reason.",
            snapshot.stats.targets.iter().flat_map(|t| {
                let d = &t.denied;
                [
                    ("blocked", d.blocked),
                    ("not_allowed", d.not_allowed),
                    ("rate_limited", d.rate_limited),
                    ("connection_limited", d.connection_limited),
                ]
                .map(|(reason, packets)| {
                    (
                        [("target", t.name.as_str()), ("reason", reason)],
                        ConstCounter::new(packets),
                    )
                })
            }),
        )?;
        family(
            &mut encoder,
            "lobby_upstream_resets",
            "TCP resets from the upstream.",
            per_upstream(|u| u.resets),
        )?;
        family(
            &mut encoder,
            "lobby_upstream_packets",
            "Packets from (in) and to (out) the upstream.",
            directional(|u| (u.packets_in, u.packets_out)),
        )?;
        family(
            &mut encoder,
            "lobby_upstream_bytes",
            "IP bytes from (in) and to (out) the upstream.",
            directional(|u| (u.bytes_in, u.bytes_out)),
        )?;
        family(
            &mut encoder,
            "lobby_upstream_health_checks",
            "Health-check probes by result.",
            upstreams.iter().flat_map(|(labels, _, extras)| {
                [
                    (
                        (*labels, [("result", "success")]),
                        ConstCounter::new(extras.health_successes),
                    ),
                    (
                        (*labels, [("result", "failure")]),
                        ConstCounter::new(extras.health_failures),
                    ),
                ]
            }),
        )?;
        family(
            &mut encoder,
            "lobby_upstream_state_changes",
            "Changes between available and unavailable.",
            upstreams
                .iter()
                .map(|(labels, _, extras)| (*labels, ConstCounter::new(extras.state_changes))),
        )?;
        family(
            &mut encoder,
            "lobby_dns_resolutions",
            "Upstream name resolutions by result.",
            snapshot
                .dns_resolutions
                .iter()
                .map(|(result, n)| ([("result", result.as_str())], ConstCounter::new(*n))),
        )?;
        family(
            &mut encoder,
            "lobby_config_reloads",
            "Configuration reloads by result.",
            [
                ("success", snapshot.reloads_succeeded),
                ("failure", snapshot.reloads_failed),
            ]
            .map(|(result, n)| ([("result", result)], ConstCounter::new(n))),
        )?;
        ConstGauge::new(i64::from(snapshot.last_reload_successful)).encode(
            encoder.encode_descriptor(
                "lobby_config_last_reload_successful",
                "Whether the last reload succeeded (1) or was rejected (0).",
                None,
                MetricType::Gauge,
            )?,
        )?;
        if let Some(conntrack) = snapshot.conntrack {
            for (name, help, value) in [
                (
                    "lobby_conntrack_entries",
                    "Entries in the connection-tracking table of Lobby's network namespace.",
                    conntrack.entries,
                ),
                (
                    "lobby_conntrack_max",
                    "Entries the connection-tracking table holds (net.netfilter.nf_conntrack_max).",
                    conntrack.max,
                ),
            ] {
                ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
                    .encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
            }
        }
        snapshot.apply_duration.encode(encoder.encode_descriptor(
            "lobby_nft_apply_duration_seconds",
            "Time to apply one nftables transaction.",
            None,
            MetricType::Histogram,
        )?)
    }
}

/// Every upstream entry with its target, in the report's order.
fn upstreams(stats: &StatsReport) -> impl Iterator<Item = (&TargetStats, &UpstreamStats)> {
    stats
        .targets
        .iter()
        .flat_map(|t| t.upstreams.iter().map(move |u| (t, u)))
}

/// One family: its HELP and TYPE lines, then a sample per label set.
fn family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error("listening for metrics on {addr}")]
pub struct MetricsError {
    addr: SocketAddr,
    #[source]
    source: io::Error,
}

/// The endpoint's listener on `addr`, bound at once (within the runtime):
/// the loop rebinds on a reload without waiting.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    };
    socket
        .and_then(|socket| {
            // As TcpListener::bind does: a port whose connections linger
            // in TIME_WAIT is free to bind again.
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(1024)
        })
        .map_err(|source| MetricsError { addr, source })
}

/// The endpoint's share of the daemon's descriptors and how long a client
/// may take. A scraper sends its request at once and scrapes every few
/// seconds at most; a keep-alive connection waiting for the next request
/// is held to `request_timeout` too (hyper starts the header timer when it
/// waits for a request head, not at its first byte).
pub const LIMITS: Limits = Limits {
    max_connections: 256,
    request_timeout: Duration::from_secs(5),
    idle_timeout: Duration::from_secs(30),
};

/// Serves the metrics, the stats and the status page until `cancel`.
pub async fn serve(
    listener: TcpListener,
    requests: mpsc::Sender<Request>,
    cancel: CancellationToken,
) {
    serve_within(listener, requests, &cancel, LIMITS).await;
}

async fn serve_within(
    listener: TcpListener,
    requests: mpsc::Sender<Request>,
    cancel: &CancellationToken,
    limits: Limits,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.request_timeout);
    accept_until(
        cancel,
        "metrics",
        limits,
        || async { listener.accept().await.map(|(stream, _)| stream) },
        |stream| {
            let requests = requests.clone();
            let connection = http.serve_connection(
                TokioIo::new(stream),
                service_fn(move |request| answer(request, requests.clone())),
            );
            async move { connection.await.map_err(io::Error::other) }
        },
    )
    .await;
}

/// What a request asks for.
#[derive(Debug)]
enum Route {
    Asset(&'static page::Asset),
    Stats,
    Metrics,
}

/// The route of a request, or the status and message that refuse it.
fn route(method: &Method, path: &str) -> Result<Route, (StatusCode, &'static str)> {
    if method != Method::GET {
        return Err((StatusCode::METHOD_NOT_ALLOWED, "only GET\n"));
    }
    match path {
        "/metrics" => Ok(Route::Metrics),
        "/api/stats" => Ok(Route::Stats),
        path => page::asset(path)
            .map(Route::Asset)
            .ok_or((StatusCode::NOT_FOUND, "see / or /metrics\n")),
    }
}

async fn answer<B>(
    request: hyper::Request<B>,
    requests: mpsc::Sender<Request>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let plain = "text/plain; charset=utf-8";
    let shutting_down = (
        StatusCode::SERVICE_UNAVAILABLE,
        plain,
        Bytes::from_static(b"shutting down\n"),
    );
    let (status, content_type, body) = match route(request.method(), request.uri().path()) {
        Err((status, message)) => (status, plain, Bytes::from_static(message.as_bytes())),
        Ok(Route::Asset(asset)) => (
            StatusCode::OK,
            asset.content_type,
            Bytes::from_static(asset.body),
        ),
        Ok(Route::Stats) => match ask(&requests, Request::Stats).await {
            Some(report) => (
                StatusCode::OK,
                "application/json",
                Bytes::from(serde_json::to_vec(&report).expect("plain data serializes")),
            ),
            None => shutting_down,
        },
        Ok(Route::Metrics) => match ask(&requests, Request::Metrics).await {
            Some(snapshot) => (
                StatusCode::OK,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                Bytes::from(render(snapshot)),
            ),
            None => shutting_down,
        },
    };
    Ok(Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        // Every answer is either live figures or a page that a newer binary
        // may change: never from a cache.
        .header(header::CACHE_CONTROL, "no-store")
        .header(
            header::CONTENT_SECURITY_POLICY,
            page::CONTENT_SECURITY_POLICY,
        )
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .body(Full::new(body))
        .expect("a status and valid headers make a response"))
}

/// The loop's answer to the request `make` builds, or `None` when the loop
/// is gone (shutting down).
async fn ask<T>(
    requests: &mpsc::Sender<Request>,
    make: impl FnOnce(oneshot::Sender<T>) -> Request,
) -> Option<T> {
    let (reply, answer) = oneshot::channel();
    requests.send(make(reply)).await.ok()?;
    answer.await.ok()
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
        time::Instant,
    };

    use super::*;
    use crate::ctl::{DeniedStats, TargetStats};

    /// One upstream with every figure set, DNS results and reloads.
    fn busy_snapshot() -> Snapshot {
        let mut apply_duration = Histogram::default();
        apply_duration.observe(Duration::from_millis(7));
        let web1 = UpstreamStats {
            name: "web1".into(),
            host: "web1.test".into(),
            address: Some("198.18.1.11".into()),
            family: Some("ipv4".into()),
            port: 9000,
            available: true,
            connections: 12,
            resets: 1,
            packets_out: 100,
            bytes_out: 5000,
            packets_in: 90,
            bytes_in: 80000,
            admin_state: AdminState::Drained,
            weight: 0,
            established_connections: Some(7),
            probe_latency_seconds: Some(crate::ctl::Latency(Duration::from_micros(1500))),
        };
        Snapshot {
            stats: StatsReport {
                targets: vec![TargetStats {
                    denied: DeniedStats {
                        rate_limited: 7,
                        connection_limited: 3,
                        ..DeniedStats::default()
                    },
                    name: "web".into(),
                    protocol: "tcp".into(),
                    port: 8081,
                    upstream_group: "pool".into(),
                    distribution: "round-robin".into(),
                    upstreams: vec![
                        web1.clone(),
                        // Its name's AAAA: an entry of its own.
                        UpstreamStats {
                            address: Some("2001:2::11".into()),
                            family: Some("ipv6".into()),
                            available: false,
                            connections: 3,
                            // Each address is measured apart.
                            established_connections: Some(2),
                            probe_latency_seconds: None,
                            ..web1
                        },
                    ],
                }],
            },
            extras: vec![
                UpstreamExtras {
                    health_successes: 40,
                    health_failures: 2,
                    state_changes: 1,
                },
                UpstreamExtras {
                    health_successes: 0,
                    health_failures: 5,
                    state_changes: 1,
                },
            ],
            dns_resolutions: BTreeMap::from([("success".into(), 5), ("nxdomain".into(), 1)]),
            reloads_succeeded: 3,
            reloads_failed: 1,
            last_reload_successful: true,
            apply_duration,
            conntrack: Some(crate::conntrack::Usage {
                entries: 950,
                max: 1000,
            }),
        }
    }

    #[test]
    fn exposition_has_every_spec_family_with_its_type() {
        let text = render(busy_snapshot());
        let upstream = "target=\"web\",upstream=\"web1\",address=\"198.18.1.11:9000\",protocol=\"tcp\",family=\"ipv4\"";
        let upstream6 = "target=\"web\",upstream=\"web1\",address=\"[2001:2::11]:9000\",protocol=\"tcp\",family=\"ipv6\"";
        for (name, kind, sample) in [
            ("lobby_upstream_up", "gauge", format!("{{{upstream6}}} 0")),
            (
                "lobby_upstream_established_connections",
                "gauge",
                format!("{{{upstream6}}} 2"),
            ),
            (
                "lobby_upstream_connections_total",
                "counter",
                format!("{{{upstream6}}} 3"),
            ),
            (
                "lobby_upstream_health_checks_total",
                "counter",
                format!("{{{upstream6},result=\"failure\"}} 5"),
            ),
            ("lobby_upstream_up", "gauge", format!("{{{upstream}}} 1")),
            (
                "lobby_upstream_admin_state",
                "gauge",
                format!("{{{upstream},state=\"drained\"}} 1"),
            ),
            (
                "lobby_upstream_admin_state",
                "gauge",
                format!("{{{upstream},state=\"enabled\"}} 0"),
            ),
            (
                "lobby_upstream_weight",
                "gauge",
                format!("{{{upstream}}} 0"),
            ),
            (
                "lobby_upstream_established_connections",
                "gauge",
                format!("{{{upstream}}} 7"),
            ),
            (
                "lobby_upstream_probe_latency_seconds",
                "gauge",
                format!("{{{upstream}}} 0.0015"),
            ),
            (
                "lobby_upstream_connections_total",
                "counter",
                format!("{{{upstream}}} 12"),
            ),
            (
                "lobby_upstream_resets_total",
                "counter",
                format!("{{{upstream}}} 1"),
            ),
            (
                "lobby_upstream_packets_total",
                "counter",
                format!("{{{upstream},direction=\"out\"}} 100"),
            ),
            (
                "lobby_upstream_bytes_total",
                "counter",
                format!("{{{upstream},direction=\"in\"}} 80000"),
            ),
            (
                "lobby_upstream_health_checks_total",
                "counter",
                format!("{{{upstream},result=\"failure\"}} 2"),
            ),
            (
                "lobby_upstream_state_changes_total",
                "counter",
                format!("{{{upstream}}} 1"),
            ),
            (
                "lobby_dns_resolutions_total",
                "counter",
                "{result=\"nxdomain\"} 1".to_owned(),
            ),
            (
                "lobby_config_reloads_total",
                "counter",
                "{result=\"success\"} 3".to_owned(),
            ),
            (
                "lobby_config_last_reload_successful",
                "gauge",
                " 1".to_owned(),
            ),
            (
                "lobby_target_denied_packets_total",
                "counter",
                "{target=\"web\",reason=\"rate_limited\"} 7".to_owned(),
            ),
            (
                "lobby_target_denied_packets_total",
                "counter",
                "{target=\"web\",reason=\"connection_limited\"} 3".to_owned(),
            ),
            ("lobby_conntrack_entries", "gauge", " 950".to_owned()),
            ("lobby_conntrack_max", "gauge", " 1000".to_owned()),
            (
                "lobby_nft_apply_duration_seconds",
                "histogram",
                "_bucket{le=\"0.01\"} 1".to_owned(),
            ),
        ] {
            assert!(
                text.contains(&format!("\n# TYPE {name} {kind}\n")),
                "no TYPE line for {name}:\n{text}"
            );
            assert!(
                text.contains(&format!("\n{name}{sample}\n")),
                "no {name}{sample}:\n{text}"
            );
        }
    }

    /// An endpoint on 127.0.0.1 within `limits`, answered with
    /// [`busy_snapshot`], until the returned token is cancelled.
    async fn endpoint(limits: Limits) -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (requests, mut incoming) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        let serving = cancel.clone();
        tokio::spawn(async move { serve_within(listener, requests, &serving, limits).await });
        tokio::spawn(async move {
            while let Some(request) = incoming.recv().await {
                answer_with(request, busy_snapshot());
            }
        });
        (addr, cancel)
    }

    const TEST_LIMITS: Limits = Limits {
        max_connections: 4,
        ..LIMITS
    };

    /// What the server sends before it closes the connection.
    async fn until_closed(stream: &mut TcpStream) -> String {
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        String::from_utf8(rest).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_scrape_past_the_cap_closes_the_oldest_idle_client() {
        let (addr, cancel) = endpoint(TEST_LIMITS).await;
        let start = Instant::now();
        let mut idle = Vec::new();
        for _ in 0..TEST_LIMITS.max_connections {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut scraper = TcpStream::connect(addr).await.unwrap();
        scraper
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: lobby\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let response = until_closed(&mut scraper).await;
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(
            response.contains("\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
            "{response}"
        );
        assert!(
            response.contains("\nlobby_upstream_connections_total{"),
            "{response}"
        );
        assert!(
            start.elapsed() < TEST_LIMITS.request_timeout,
            "served after {:?}: it waited for an idle client's timeout",
            start.elapsed()
        );
        for mut stream in idle {
            // Closed without an answer: they never asked anything.
            assert_eq!(until_closed(&mut stream).await, "");
        }
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_kept_alive_connection_is_closed_when_no_request_follows() {
        let (addr, cancel) = endpoint(TEST_LIMITS).await;
        let mut scraper = TcpStream::connect(addr).await.unwrap();
        scraper
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: lobby\r\n\r\n")
            .await
            .unwrap();
        let mut response = Vec::new();
        let last_line = b"lobby_nft_apply_duration_seconds_count 1\n";
        while !response.ends_with(last_line) {
            let mut chunk = [0u8; 4096];
            let n = scraper.read(&mut chunk).await.unwrap();
            assert_ne!(n, 0, "closed mid-response");
            response.extend_from_slice(&chunk[..n]);
        }
        let answered = Instant::now();
        assert_eq!(until_closed(&mut scraper).await, "");
        assert!(answered.elapsed() >= TEST_LIMITS.request_timeout);
        cancel.cancel();
    }

    /// Answers one request of the endpoint as the daemon's loop would.
    fn answer_with(request: Request, snapshot: Snapshot) {
        match request {
            Request::Stats(reply) => drop(reply.send(snapshot.stats)),
            Request::Metrics(reply) => drop(reply.send(snapshot)),
        }
    }

    /// `method path` answered in-process, with a loop that answers with
    /// [`busy_snapshot`]: status, content type, body.
    async fn get(method: Method, path: &str) -> (StatusCode, String, Bytes) {
        let (requests, mut incoming) = mpsc::channel(1);
        let daemon = tokio::spawn(async move {
            if let Some(request) = incoming.recv().await {
                answer_with(request, busy_snapshot());
            }
        });
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        let response = answer(request, requests).await.unwrap();
        daemon.await.unwrap();
        let headers = response.headers();
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        assert_eq!(
            headers[header::CONTENT_SECURITY_POLICY],
            page::CONTENT_SECURITY_POLICY
        );
        let content_type = headers[header::CONTENT_TYPE].to_str().unwrap().to_owned();
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, content_type, body)
    }

    #[tokio::test]
    async fn each_path_gets_its_answer_and_others_none() {
        let html = "text/html; charset=utf-8";
        for (method, path, status, content_type, beginning) in [
            (Method::GET, "/", StatusCode::OK, html, "<!doctype html>"),
            (
                Method::GET,
                "/page.js",
                StatusCode::OK,
                "text/javascript; charset=utf-8",
                "//",
            ),
            (
                Method::GET,
                "/page.css",
                StatusCode::OK,
                "text/css; charset=utf-8",
                ":root",
            ),
            (
                Method::GET,
                "/api/stats",
                StatusCode::OK,
                "application/json",
                "{\"targets\":[{\"name\":\"web\"",
            ),
            (
                Method::GET,
                "/metrics?x=1",
                StatusCode::OK,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                "# HELP lobby_upstream_up ",
            ),
            (
                Method::GET,
                "/index.html",
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "see / or /metrics",
            ),
            (
                Method::GET,
                "/api/stats/",
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "see / or /metrics",
            ),
            (
                Method::POST,
                "/api/stats",
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "only GET",
            ),
            (
                Method::HEAD,
                "/",
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain; charset=utf-8",
                "only GET",
            ),
        ] {
            let (got, got_type, body) = get(method.clone(), path).await;
            let text = String::from_utf8_lossy(&body);
            assert_eq!(
                (got, got_type.as_str()),
                (status, content_type),
                "{method} {path}: {text}"
            );
            assert!(text.starts_with(beginning), "{method} {path}: {text}");
        }
    }

    #[tokio::test]
    async fn the_api_answers_what_the_control_socket_does() {
        let (_, _, body) = get(Method::GET, "/api/stats").await;
        let report: StatsReport = serde_json::from_slice(&body).unwrap();
        assert_eq!(report, busy_snapshot().stats);
    }

    #[tokio::test]
    async fn figures_asked_of_a_stopped_loop_are_unavailable() {
        for path in ["/api/stats", "/metrics"] {
            let (requests, incoming) = mpsc::channel(1);
            drop(incoming);
            let request = hyper::Request::get(path).body(()).unwrap();
            let response = answer(request, requests).await.unwrap();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE, "{path}");
        }
    }

    #[test]
    fn exposition_passes_promtool() {
        let promtool = std::path::Path::new("/usr/bin/promtool");
        if !promtool.exists() {
            let message = "promtool missing (Debian's prometheus package)";
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(!ci, "{message} (CI=true: not skipping)");
            eprintln!("skipped: {message}");
            return;
        }
        let text = render(busy_snapshot());
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
        let verdict = child.wait_with_output().unwrap();
        assert!(
            verdict.status.success() && verdict.stdout.is_empty() && verdict.stderr.is_empty(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&verdict.stdout),
            String::from_utf8_lossy(&verdict.stderr)
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(30));
        assert_eq!(h.buckets[0], 1); // <= 5 ms
        assert_eq!(h.buckets[3], 2); // <= 50 ms
        assert_eq!(h.count, 2);
        let text = render(Snapshot {
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
            family: None,
            port: 9000,
            available: false,
            connections: 7,
            resets: 1,
            packets_out: 10,
            bytes_out: 500,
            packets_in: 8,
            bytes_in: 700,
            admin_state: AdminState::Enabled,
            weight: 2,
            established_connections: None,
            probe_latency_seconds: None,
        };
        let snapshot = Snapshot {
            stats: StatsReport {
                targets: vec![TargetStats {
                    denied: Default::default(),
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
        let text = render(snapshot);
        let labels =
            "target=\"web\",upstream=\"web\\\"1\",address=\"\",protocol=\"tcp\",family=\"\"";
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
