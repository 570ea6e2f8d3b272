//! Event delivery (SPEC "Runtime control and events"): an upstream goes up
//! or down, a target empties or serves again, a reload is applied or fails,
//! and the configured command and webhook are told, in order.
//!
//! The daemon's loop calls [`Events::emit`], which never waits: the event
//! joins a bounded queue ([`QUEUE`]) or, when the queue is full, is dropped
//! with a warning. One task takes the events in order and delivers each to
//! the command and the webhook at once, each bounded by `timeout`, so a
//! receiver that never answers costs at most `timeout` per event and holds
//! up only the events behind it, never the loop.
use std::{
    fmt,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{Request, StatusCode, Uri, header};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::mpsc::{self, error::TrySendError},
    time::Instant,
};
use tokio_rustls::TlsConnector;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

use crate::{config::EventsConfig, health::tls};

/// Events waiting for delivery, at most (SPEC).
pub const QUEUE: usize = 1_000;

/// How often a full queue says so, at most.
const DROP_WARNING_PERIOD: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    UpstreamUp,
    UpstreamDown,
    TargetEmpty,
    TargetNotEmpty,
    ReloadApplied,
    ReloadFailed,
}

impl EventKind {
    /// The name receivers see in `LOBBY_EVENT` and `"event"`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::UpstreamUp => "upstream_up",
            EventKind::UpstreamDown => "upstream_down",
            EventKind::TargetEmpty => "target_empty",
            EventKind::TargetNotEmpty => "target_not_empty",
            EventKind::ReloadApplied => "reload_applied",
            EventKind::ReloadFailed => "reload_failed",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event as receivers get it; the names are absent where they do not
/// apply (a reload has no upstream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LobbyEvent {
    pub kind: EventKind,
    pub target: Option<String>,
    pub upstream: Option<String>,
    /// The upstream's address, as balanced to.
    pub address: Option<String>,
    /// The log line's words: why, or what changed.
    pub detail: String,
    pub time: SystemTime,
}

impl LobbyEvent {
    /// The command's environment: absent names are empty strings.
    fn environment(&self) -> [(&'static str, &str); 5] {
        [
            ("LOBBY_EVENT", self.kind.as_str()),
            ("LOBBY_TARGET", or_empty(&self.target)),
            ("LOBBY_UPSTREAM", or_empty(&self.upstream)),
            ("LOBBY_ADDRESS", or_empty(&self.address)),
            ("LOBBY_DETAIL", &self.detail),
        ]
    }

    /// The webhook's body: absent names are `null`.
    fn json(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "event": self.kind,
            "target": self.target,
            "upstream": self.upstream,
            "address": self.address,
            "detail": self.detail,
            "time": rfc3339(self.time),
        }))
        .expect("plain data serializes")
    }

    /// `upstream_down web/web1`, for log lines.
    fn describe(&self) -> String {
        match (&self.target, &self.upstream) {
            (Some(target), Some(upstream)) => format!("{} {target}/{upstream}", self.kind),
            (Some(target), None) => format!("{} {target}", self.kind),
            _ => self.kind.to_string(),
        }
    }
}

fn or_empty(value: &Option<String>) -> &str {
    value.as_deref().unwrap_or_default()
}

/// Why one delivery failed.
#[derive(Debug, thiserror::Error)]
enum DeliveryError {
    #[error("event command {program} could not start")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("event command {program} could not be waited for")]
    Wait {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("event command {program} failed ({status})")]
    Exit {
        program: String,
        status: std::process::ExitStatus,
    },
    #[error("event command {program} did not finish within {after:?}; killed")]
    CommandTimeout { program: String, after: Duration },
    #[error("webhook {uri}: {op}")]
    Connect {
        uri: Uri,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("webhook {uri}: the host is not a valid TLS server name")]
    ServerName { uri: Uri },
    #[error("webhook {uri}: the HTTP exchange failed")]
    Http {
        uri: Uri,
        #[source]
        source: hyper::Error,
    },
    #[error("webhook {uri} answered {status}")]
    Status { uri: Uri, status: StatusCode },
    #[error("webhook {uri} did not answer within {after:?}")]
    WebhookTimeout { uri: Uri, after: Duration },
}

/// The error and its causes on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Where the daemon's loop hands events over; cheap to clone.
#[derive(Clone, Debug)]
pub struct Events {
    /// `None` when no receiver is configured: events go nowhere.
    queue: Option<mpsc::Sender<LobbyEvent>>,
    drops: Arc<Drops>,
}

impl Events {
    /// Starts the delivery task on `tracker`, which ends at `cancel` (the
    /// event being delivered then is abandoned, its command killed).
    pub fn start(
        config: Option<EventsConfig>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Events {
        let queue = config.map(|config| {
            let (queue, events) = mpsc::channel(QUEUE);
            tracker.spawn(deliver_all(events, config, cancel));
            queue
        });
        Events {
            queue,
            drops: Arc::default(),
        }
    }

    /// Queues `event` for delivery without waiting; when the queue is full
    /// the event is dropped and a warning says so (at most every
    /// [`DROP_WARNING_PERIOD`]).
    pub fn emit(&self, event: LobbyEvent) {
        let Some(queue) = &self.queue else {
            return;
        };
        match queue.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(event)) => self.drops.drop_one(&event),
            Err(TrySendError::Closed(event)) => {
                debug!(event = %event.kind, "shutting down; event not delivered");
            }
        }
    }

    /// Events dropped because the queue was full, since the start.
    pub fn dropped(&self) -> u64 {
        self.drops.total.load(Ordering::Relaxed)
    }
}

/// Dropped events, counted between rate-limited warnings.
#[derive(Debug, Default)]
struct Drops {
    total: AtomicU64,
    window: Mutex<DropWindow>,
}

impl Drops {
    fn drop_one(&self, event: &LobbyEvent) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let warn_now = self
            .window
            .lock()
            .expect("the drop window is never poisoned")
            .count(Instant::now());
        if let Some(dropped) = warn_now {
            warn!(
                event = %event.kind,
                dropped,
                queue = QUEUE,
                "event queue full ({QUEUE} waiting): {dropped} event(s) dropped, the latest {}",
                event.describe()
            );
        }
    }
}

/// The rate limit of the "queue full" warning: the first drop warns, later
/// ones are counted until [`DROP_WARNING_PERIOD`] has passed.
#[derive(Debug, Default)]
struct DropWindow {
    since_warning: u64,
    warned_at: Option<Instant>,
}

impl DropWindow {
    /// Counts one drop at `now`; `Some(drops)` when it is time to warn about
    /// the drops since the last warning.
    fn count(&mut self, now: Instant) -> Option<u64> {
        self.since_warning += 1;
        if self
            .warned_at
            .is_some_and(|at| now.duration_since(at) < DROP_WARNING_PERIOD)
        {
            return None;
        }
        self.warned_at = Some(now);
        Some(std::mem::take(&mut self.since_warning))
    }
}

/// The delivery task: one event at a time, in order, until `cancel`.
async fn deliver_all(
    mut events: mpsc::Receiver<LobbyEvent>,
    config: EventsConfig,
    cancel: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            event = events.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = deliver(&event, &config) => {}
        }
    }
}

/// To the command and the webhook at once, each within the timeout.
async fn deliver(event: &LobbyEvent, config: &EventsConfig) {
    let command = async {
        if let Some(argv) = &config.command {
            run_command(argv, event, config.timeout).await
        } else {
            Ok(())
        }
    };
    let webhook = async {
        if let Some(uri) = &config.webhook {
            post(uri, event, config.timeout).await
        } else {
            Ok(())
        }
    };
    let (command, webhook) = tokio::join!(command, webhook);
    for outcome in [command, webhook] {
        match outcome {
            Ok(()) => {}
            Err(error) => warn!(
                event = %event.kind,
                target = event.target.as_deref(),
                upstream = event.upstream.as_deref(),
                "{}; event {} dropped",
                chain(&error),
                event.describe()
            ),
        }
    }
    debug!(event = %event.kind, "event delivered");
}

/// `argv` without a shell, the event in its environment; killed after
/// `timeout`.
async fn run_command(
    argv: &[String],
    event: &LobbyEvent,
    timeout: Duration,
) -> Result<(), DeliveryError> {
    let program = argv.first().map_or_else(String::new, String::clone);
    let mut child = tokio::process::Command::new(&program)
        .args(&argv[1..])
        .envs(event.environment())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| DeliveryError::Spawn {
            program: program.clone(),
            source,
        })?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(DeliveryError::Exit { program, status }),
        Ok(Err(source)) => Err(DeliveryError::Wait { program, source }),
        Err(_) => {
            // Reaped here, so that no zombie is left behind.
            if let Err(error) = child.kill().await {
                debug!(%error, program, "killing an event command that timed out");
            }
            Err(DeliveryError::CommandTimeout {
                program,
                after: timeout,
            })
        }
    }
}

/// POSTs the event as JSON to `uri`, over TLS (verified against the
/// system's roots) for https; any 2xx answer is a delivery.
async fn post(uri: &Uri, event: &LobbyEvent, timeout: Duration) -> Result<(), DeliveryError> {
    let status = tokio::time::timeout(timeout, exchange(uri, event.json()))
        .await
        .map_err(|_| DeliveryError::WebhookTimeout {
            uri: uri.clone(),
            after: timeout,
        })??;
    if status.is_success() {
        Ok(())
    } else {
        Err(DeliveryError::Status {
            uri: uri.clone(),
            status,
        })
    }
}

async fn exchange(uri: &Uri, body: Vec<u8>) -> Result<StatusCode, DeliveryError> {
    let connect = |op, source| DeliveryError::Connect {
        uri: uri.clone(),
        op,
        source,
    };
    // Validated: an http(s) URL with a host; an IPv6 host is bracketed.
    let authority = uri.authority().map_or("", |a| a.as_str());
    let host = uri.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let request = Request::post(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(header::HOST, authority)
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            header::USER_AGENT,
            concat!("lobby/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(body)))
        .expect("a validated URL makes a valid request");
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| connect("connecting", e))?;
    let status = if https {
        let name = ServerName::try_from(host.to_owned())
            .map_err(|_| DeliveryError::ServerName { uri: uri.clone() })?;
        let tls = TlsConnector::from(tls::client_config(true))
            .connect(name, tcp)
            .await
            .map_err(|e| connect("TLS handshake", e))?;
        send(tls, request).await
    } else {
        send(tcp, request).await
    };
    status.map_err(|source| DeliveryError::Http {
        uri: uri.clone(),
        source,
    })
}

/// One request on `stream`; the answer's status, its body unread.
async fn send<S>(stream: S, request: Request<Full<Bytes>>) -> Result<StatusCode, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let response = sender.send_request(request);
    tokio::pin!(response, connection);
    // The connection does the I/O while the response is awaited.
    tokio::select! {
        response = &mut response => response.map(|r| r.status()),
        ended = &mut connection => {
            ended?;
            response.await.map(|r| r.status())
        }
    }
}

/// `2024-02-29T12:34:56.500Z`: RFC 3339 in UTC, to the millisecond.
fn rfc3339(time: SystemTime) -> String {
    const DAY: u64 = 86_400;
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since.as_secs();
    let (year, month, day) = civil_from_days(seconds / DAY);
    let of_day = seconds % DAY;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_millis()
    )
}

/// The Gregorian date `days` after 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let days = days + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::{
        path::{Path, PathBuf},
        time::Instant as StdInstant,
    };

    use tokio::{
        io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
        net::TcpListener,
    };

    use super::*;

    fn event(kind: EventKind, target: Option<&str>, upstream: Option<&str>) -> LobbyEvent {
        LobbyEvent {
            kind,
            target: target.map(str::to_owned),
            upstream: upstream.map(str::to_owned),
            address: upstream.map(|_| "198.18.1.11:9000".to_owned()),
            detail: format!("{kind} happened"),
            time: UNIX_EPOCH + Duration::from_millis(1_709_210_096_500),
        }
    }

    /// Down, up, then a reload that names nothing.
    fn flap() -> Vec<LobbyEvent> {
        vec![
            event(EventKind::UpstreamDown, Some("web"), Some("web1")),
            event(EventKind::UpstreamUp, Some("web"), Some("web1")),
            event(EventKind::ReloadFailed, None, None),
        ]
    }

    /// `sh -c SCRIPT FILE`: the script sees the file as `$0`.
    fn shell(script: &str, file: &Path) -> Vec<String> {
        vec![
            "sh".into(),
            "-c".into(),
            script.into(),
            file.display().to_string(),
        ]
    }

    /// Running [`Events`] whose command, when there is one, is a shell
    /// script writing to a scratch file.
    struct Harness {
        events: Events,
        file: PathBuf,
        tracker: TaskTracker,
        cancel: CancellationToken,
        _dir: tempfile::TempDir,
    }

    impl Harness {
        fn start(script: Option<&str>, webhook: Option<String>, timeout: Duration) -> Harness {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("events");
            let config = EventsConfig {
                command: script.map(|script| shell(script, &file)),
                webhook: webhook.map(|uri| uri.parse().expect("a URL")),
                timeout,
            };
            let tracker = TaskTracker::new();
            let cancel = CancellationToken::new();
            let events = Events::start(Some(config), &tracker, cancel.clone());
            Harness {
                events,
                file,
                tracker,
                cancel,
                _dir: dir,
            }
        }

        /// The file's text once it holds `lines` lines; panics after 10 s.
        async fn lines(&self, lines: usize) -> String {
            let deadline = StdInstant::now() + Duration::from_secs(10);
            loop {
                let text = std::fs::read_to_string(&self.file).unwrap_or_default();
                // A line is written and then its newline: count whole lines.
                if text.ends_with('\n') && text.lines().count() >= lines {
                    return text;
                }
                assert!(StdInstant::now() < deadline, "after 10 s:\n{text}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        /// Cancels delivery and waits for its task to end.
        async fn stop(self) {
            self.cancel.cancel();
            self.tracker.close();
            self.tracker.wait().await;
        }
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let at = |ms| rfc3339(UNIX_EPOCH + Duration::from_millis(ms));
        assert_eq!(at(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(at(1_709_210_096_500), "2024-02-29T12:34:56.500Z");
        assert_eq!(at(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }

    #[tokio::test]
    async fn the_command_gets_each_event_in_its_environment_in_order() {
        let script = r#"env | grep ^LOBBY_ | sort | tr '\n' ' ' >> "$0"; echo >> "$0""#;
        let harness = Harness::start(Some(script), None, Duration::from_secs(5));
        for event in flap() {
            harness.events.emit(event);
        }
        let text = harness.lines(3).await;
        let lines: Vec<&str> = text.lines().map(str::trim_end).collect();
        assert_eq!(
            lines,
            [
                "LOBBY_ADDRESS=198.18.1.11:9000 LOBBY_DETAIL=upstream_down happened \
                 LOBBY_EVENT=upstream_down LOBBY_TARGET=web LOBBY_UPSTREAM=web1",
                "LOBBY_ADDRESS=198.18.1.11:9000 LOBBY_DETAIL=upstream_up happened \
                 LOBBY_EVENT=upstream_up LOBBY_TARGET=web LOBBY_UPSTREAM=web1",
                "LOBBY_ADDRESS= LOBBY_DETAIL=reload_failed happened \
                 LOBBY_EVENT=reload_failed LOBBY_TARGET= LOBBY_UPSTREAM=",
            ]
        );
        harness.stop().await;
    }

    /// A minimal HTTP/1.1 server: each request's body goes to the channel,
    /// answered with `status`.
    async fn receiver(
        status: &'static str,
    ) -> (String, mpsc::UnboundedReceiver<serde_json::Value>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/hooks/lobby?team=net",
            listener.local_addr().unwrap()
        );
        let (bodies, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let mut stream = BufReader::new(stream);
                let mut head = Vec::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    stream.read_line(&mut line).await.unwrap();
                    if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = value.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push(line);
                }
                assert_eq!(head[0], "POST /hooks/lobby?team=net HTTP/1.1\r\n");
                assert!(
                    head.contains(&"content-type: application/json\r\n".to_owned()),
                    "{head:?}"
                );
                let mut body = vec![0; length];
                stream.read_exact(&mut body).await.unwrap();
                bodies.send(serde_json::from_slice(&body).unwrap()).unwrap();
                let answer =
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                stream.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        (url, received)
    }

    #[tokio::test]
    async fn the_webhook_gets_each_event_as_json_in_order() {
        let (url, mut received) = receiver("204 No Content").await;
        let harness = Harness::start(None, Some(url), Duration::from_secs(5));
        for event in flap() {
            harness.events.emit(event);
        }
        let time = "2024-02-29T12:34:56.500Z";
        let expected = [
            serde_json::json!({"event": "upstream_down", "target": "web", "upstream": "web1",
                "address": "198.18.1.11:9000", "detail": "upstream_down happened", "time": time}),
            serde_json::json!({"event": "upstream_up", "target": "web", "upstream": "web1",
                "address": "198.18.1.11:9000", "detail": "upstream_up happened", "time": time}),
            serde_json::json!({"event": "reload_failed", "target": null, "upstream": null,
                "address": null, "detail": "reload_failed happened", "time": time}),
        ];
        for expected in expected {
            assert_eq!(received.recv().await.unwrap(), expected);
        }
        harness.stop().await;
    }

    #[tokio::test]
    async fn a_refusing_webhook_is_an_error_with_its_status() {
        let (url, _received) = receiver("500 Internal Server Error").await;
        let uri: Uri = url.parse().unwrap();
        let error = post(&uri, &flap()[0], Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("webhook {uri} answered 500 Internal Server Error")
        );
    }

    #[tokio::test]
    async fn a_receiver_that_never_answers_costs_at_most_the_timeout_per_event() {
        let timeout = Duration::from_millis(300);
        // Accepts and holds every connection, never reading or answering.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let (accepted, mut accepts) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                held.push(listener.accept().await.unwrap().0);
                accepted.send(StdInstant::now()).unwrap();
            }
        });
        let harness = Harness::start(Some(r#"echo "$LOBBY_EVENT" >> "$0""#), Some(url), timeout);
        let start = StdInstant::now();
        for event in flap() {
            harness.events.emit(event);
        }
        let mut at = Vec::new();
        for _ in 0..3 {
            at.push(accepts.recv().await.unwrap() - start);
        }
        let text = harness.lines(3).await;
        assert_eq!(text, "upstream_down\nupstream_up\nreload_failed\n");
        eprintln!("silent webhook, timeout {timeout:?}: events reached it after {at:?}");
        // Each event waits for the one before it, and not for ever: the
        // upper bound is generous, a loaded machine is slow, not wrong.
        for (i, at) in at.iter().enumerate() {
            let earliest = timeout * i as u32;
            assert!(
                *at >= earliest && *at < earliest + Duration::from_secs(3),
                "event {i} after {at:?}"
            );
        }
        harness.stop().await;
    }

    #[tokio::test]
    async fn a_command_that_does_not_finish_is_killed_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let argv = shell(r#"echo $$ > "$0"; exec sleep 30"#, &pid_file);
        let start = StdInstant::now();
        let error = run_command(&argv, &flap()[0], Duration::from_millis(200))
            .await
            .unwrap_err();
        let took = start.elapsed();
        assert_eq!(
            error.to_string(),
            "event command sh did not finish within 200ms; killed"
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        assert!(
            !Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "the command's process {} is still there",
            pid.trim()
        );
    }

    #[tokio::test]
    async fn a_command_that_cannot_start_or_fails_is_an_error() {
        let missing = ["/nonexistent/lobby-notify".to_owned()];
        let error = run_command(&missing, &flap()[0], Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            chain(&error).starts_with("event command /nonexistent/lobby-notify could not start: "),
            "{}",
            chain(&error)
        );
        let failing = ["false".to_owned()];
        let error = run_command(&failing, &flap()[0], Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "event command false failed (exit status: 1)"
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_without_blocking_emit() {
        // The first delivery holds the task: the rest wait in the queue.
        let script = r#"echo >> "$0"; exec sleep 30"#;
        let harness = Harness::start(Some(script), None, Duration::from_secs(300));
        let events = &harness.events;
        events.emit(flap().remove(0));
        harness.lines(1).await;
        let sent = 10_000;
        let queued: Vec<LobbyEvent> = (0..sent).map(|_| flap().remove(0)).collect();
        let mut slowest = Duration::ZERO;
        let start = StdInstant::now();
        for event in queued {
            let one = StdInstant::now();
            events.emit(event);
            slowest = slowest.max(one.elapsed());
        }
        let took = start.elapsed();
        eprintln!(
            "emit with the queue full: {sent} events in {took:?} ({:?} each on average, slowest {slowest:?})",
            took / sent
        );
        assert_eq!(events.dropped(), (sent as usize - QUEUE) as u64);
        assert!(
            slowest < Duration::from_millis(50),
            "an emit took {slowest:?}"
        );
        harness.stop().await;
    }

    #[test]
    fn the_full_queue_warning_is_rate_limited() {
        let mut window = DropWindow::default();
        let start = Instant::now();
        assert_eq!(window.count(start), Some(1));
        assert_eq!(window.count(start + Duration::from_secs(1)), None);
        assert_eq!(window.count(start + Duration::from_secs(9)), None);
        assert_eq!(window.count(start + DROP_WARNING_PERIOD), Some(3));
        assert_eq!(window.count(start + DROP_WARNING_PERIOD), None);
    }

    #[tokio::test]
    async fn without_receivers_events_go_nowhere() {
        let tracker = TaskTracker::new();
        let events = Events::start(None, &tracker, CancellationToken::new());
        for _ in 0..2 * QUEUE {
            events.emit(flap().remove(0));
        }
        assert_eq!(events.dropped(), 0);
        assert!(tracker.is_empty());
    }
}
