//! The control socket: a Unix socket, root only, that answers one JSON
//! request per connection with one JSON line. `lobby stats` and `lobby ctl`
//! are its clients. Serving is split from answering: the daemon's loop owns
//! the state and answers [`Request`]s and [`Control`]s that arrive over
//! channels.
use std::{
    fmt::{self, Write as _},
    io,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::listen::{Limits, Watched, accept_until};

/// Where the control sockets live by default.
const SOCKET_DIR: &str = "/run/lobby";

/// The default control socket of the daemon of `table`:
/// /run/lobby/TABLE.sock, so the default table's is /run/lobby/lobby.sock.
pub fn default_socket(table: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{table}.sock"))
}

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
    /// Packets refused by the target's traffic policy, by reason.
    #[serde(default)]
    pub denied: DeniedStats,
}

/// Packets a target's policy refused, by reason (`lobby stats --json`
/// `denied`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeniedStats {
    pub blocked: u64,
    pub not_allowed: u64,
    pub rate_limited: u64,
    pub connection_limited: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamStats {
    pub name: String,
    pub host: String,
    /// `None` while the host name has never resolved. An upstream with
    /// several addresses has an entry for each.
    pub address: Option<String>,
    /// `ipv4` or `ipv6`, the address's; `None` with it (and from a daemon
    /// older than dual-stack upstreams).
    #[serde(default)]
    pub family: Option<String>,
    pub port: u16,
    pub available: bool,
    pub connections: u64,
    pub resets: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    /// The operator's say (`lobby ctl`); absent from an older daemon's
    /// answer, which knew only enabled upstreams.
    #[serde(default)]
    pub admin_state: AdminState,
    /// Its share of new connections: the configured weight, 0 when drained
    /// or disabled.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Established connections the kernel translated to it, as conntrack
    /// counted them last: for `least-connections` targets, whose choice it
    /// drives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub established_connections: Option<u64>,
    /// The smoothed round trip of its successful health probes, what
    /// `least-latency` picks by; absent before the first success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_latency_seconds: Option<Latency>,
}

/// A round trip, in seconds (a fraction) in JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latency(pub Duration);

impl Serialize for Latency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.0.as_secs_f64())
    }
}

impl<'de> Deserialize<'de> for Latency {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let seconds = f64::deserialize(deserializer)?;
        Duration::try_from_secs_f64(seconds)
            .map(Latency)
            .map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for Latency {
    /// `0.42ms`, `51.3ms`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2}ms", self.0.as_secs_f64() * 1000.0)
    }
}

/// The weight of an upstream the file gives none: what an older daemon's
/// answer means by its absence.
fn default_weight() -> u32 {
    1
}

/// `lobby ctl state --json`: every target's upstreams with their health and
/// the operator's say over them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReport {
    pub targets: Vec<TargetState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetState {
    pub name: String,
    pub upstreams: Vec<UpstreamState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamState {
    pub name: String,
    /// `IP:PORT` traffic goes to; `None` while the host name has never
    /// resolved.
    pub address: Option<String>,
    /// What the health checks say.
    pub available: bool,
    pub admin_state: AdminState,
    /// Its share of new connections: 0 when drained or disabled.
    pub weight: u32,
}

/// What `lobby ctl` asks of one upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminCommand {
    /// Weight 0: no new connections, established ones continue.
    Drain,
    /// Back to the configured state.
    Enable,
    /// Out of rotation at once.
    Disable,
}

impl AdminCommand {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminCommand::Drain => "drain",
            AdminCommand::Enable => "enable",
            AdminCommand::Disable => "disable",
        }
    }

    /// The state the upstream is in once the command took effect.
    pub fn state(self) -> AdminState {
        match self {
            AdminCommand::Drain => AdminState::Drained,
            AdminCommand::Enable => AdminState::Enabled,
            AdminCommand::Disable => AdminState::Disabled,
        }
    }
}

/// The operator's say over an upstream, kept across a reload that leaves it
/// unchanged and lost on restart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    #[default]
    Enabled,
    Drained,
    Disabled,
}

impl AdminState {
    pub const ALL: [AdminState; 3] = [
        AdminState::Enabled,
        AdminState::Drained,
        AdminState::Disabled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Enabled => "enabled",
            AdminState::Drained => "drained",
            AdminState::Disabled => "disabled",
        }
    }
}

/// `TARGET/UPSTREAM`, as an operator names an upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamRef {
    pub target: String,
    pub upstream: String,
}

impl FromStr for UpstreamRef {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.split_once('/') {
            Some((target, upstream))
                if !target.is_empty() && !upstream.is_empty() && !upstream.contains('/') =>
            {
                Ok(UpstreamRef {
                    target: target.to_owned(),
                    upstream: upstream.to_owned(),
                })
            }
            _ => Err(format!(
                "expected TARGET/UPSTREAM such as web/web1, found {text:?}"
            )),
        }
    }
}

impl fmt::Display for UpstreamRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.target, self.upstream)
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
enum WireRequest {
    Stats,
    Admin {
        command: AdminCommand,
        target: String,
        upstream: String,
    },
    State,
    Reload,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum WireResponse {
    Stats(StatsReport),
    State(StateReport),
    /// A command took effect; what to tell the operator.
    Done(String),
    Error(String),
}

/// A request for the daemon's loop, with where to send the answer.
pub enum Request {
    Stats(oneshot::Sender<StatsReport>),
    Metrics(oneshot::Sender<crate::metrics::Snapshot>),
}

/// Where a command's answer goes: the text to print, or why it was
/// refused.
pub type Answer = oneshot::Sender<Result<String, String>>;

/// A runtime command for the daemon's loop (`lobby ctl`), with where to
/// send the answer.
pub enum Control {
    Admin {
        command: AdminCommand,
        target: String,
        upstream: String,
        /// Who asked (SO_PEERCRED), for the log.
        peer_uid: u32,
        reply: Answer,
    },
    State(oneshot::Sender<StateReport>),
    /// Like SIGHUP, answered once the outcome is known.
    Reload(Answer),
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
    #[error("permission denied on {path}: {client} needs root or the socket's owner")]
    PermissionDenied { path: PathBuf, client: &'static str },
    #[error("the daemon at {path} answered something else than {expected}")]
    Unexpected {
        path: PathBuf,
        expected: &'static str,
    },
    /// The daemon's own words: why it refused.
    #[error("{0}")]
    Daemon(String),
}

/// The error of a client that could not reach the socket at `path`: a
/// missing permission said plainly, since only root (or the socket's owner)
/// may connect to the 0600 socket.
fn connect_error(path: &Path, client: &'static str, source: io::Error) -> CtlError {
    if source.kind() == io::ErrorKind::PermissionDenied {
        CtlError::PermissionDenied {
            path: path.to_owned(),
            client,
        }
    } else {
        CtlError::Exchange {
            path: path.to_owned(),
            source,
        }
    }
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

/// How long the daemon waits for the outcome of a runtime command before
/// it answers that there is none yet. A reload reads, plans and applies the
/// file (seconds for a 100,000-prefix block list in a debug build), and
/// one whose apply fails is reported when a retry succeeds.
const OUTCOME_WAIT: Duration = Duration::from_secs(60);

/// How long `lobby ctl` waits for a command's answer: beyond
/// [`OUTCOME_WAIT`], so that the daemon's word on it arrives first.
const COMMAND_TIMEOUT: Duration = OUTCOME_WAIT.saturating_add(CLIENT_TIMEOUT);

/// Where the server hands what it reads to the loop.
#[derive(Clone)]
struct Loop {
    requests: mpsc::Sender<Request>,
    /// `None`: this daemon takes no runtime commands, which are refused.
    control: Option<mpsc::Sender<Control>>,
}

/// Accepts connections until `cancel`, forwarding their requests to the
/// loop, then removes the socket file. `lobby ctl`'s commands are refused:
/// see [`serve_with_control`].
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    requests: mpsc::Sender<Request>,
    cancel: CancellationToken,
) {
    let to = Loop {
        requests,
        control: None,
    };
    serve_within(listener, to, &cancel, LIMITS).await;
    let _ = tokio::fs::remove_file(&path).await;
}

/// [`serve`], with `lobby ctl`'s commands forwarded to `control`.
pub async fn serve_with_control(
    listener: UnixListener,
    path: PathBuf,
    requests: mpsc::Sender<Request>,
    control: mpsc::Sender<Control>,
    cancel: CancellationToken,
) {
    let to = Loop {
        requests,
        control: Some(control),
    };
    serve_within(listener, to, &cancel, LIMITS).await;
    let _ = tokio::fs::remove_file(&path).await;
}

async fn serve_within(
    listener: UnixListener,
    to: Loop,
    cancel: &CancellationToken,
    limits: Limits,
) {
    accept_until(
        cancel,
        "control",
        limits,
        || async { listener.accept().await.map(|(stream, _)| stream) },
        |stream| {
            let to = to.clone();
            async move { answer(stream, &to, limits).await }
        },
    )
    .await;
}

const SHUTTING_DOWN: &str = "the daemon is shutting down";

/// Sends what `make` builds around a reply channel to `to` and waits for
/// the answer; `None` when the loop is gone.
async fn ask_loop<T, R>(
    to: &mpsc::Sender<T>,
    make: impl FnOnce(oneshot::Sender<R>) -> T,
) -> Option<R> {
    let (reply, answer) = oneshot::channel();
    to.send(make(reply)).await.ok()?;
    answer.await.ok()
}

/// The outcome of a command the loop was asked (`None`: the loop is gone),
/// or word that none came within [`OUTCOME_WAIT`].
async fn outcome(asked: impl Future<Output = Option<Result<String, String>>>) -> WireResponse {
    match tokio::time::timeout(OUTCOME_WAIT, asked).await {
        Ok(Some(Ok(text))) => WireResponse::Done(text),
        Ok(Some(Err(error))) => WireResponse::Error(error),
        Ok(None) => WireResponse::Error(SHUTTING_DOWN.into()),
        Err(_) => WireResponse::Error(format!(
            "no outcome within {}s; the daemon goes on with it, and its log says how it ends",
            OUTCOME_WAIT.as_secs()
        )),
    }
}

/// The loop's answer to one runtime command from the peer `uid`.
async fn control(request: WireRequest, uid: io::Result<u32>, to: &Loop) -> WireResponse {
    let Some(control) = &to.control else {
        return WireResponse::Error("this daemon does not take runtime commands".into());
    };
    match request {
        WireRequest::Admin {
            command,
            target,
            upstream,
        } => {
            let peer_uid = match uid {
                Ok(uid) => uid,
                Err(e) => return WireResponse::Error(format!("cannot tell who is asking: {e}")),
            };
            info!(
                uid = peer_uid,
                command = command.as_str(),
                target = %target,
                upstream = %upstream,
                "control: uid {peer_uid} asks to {} {target}/{upstream}",
                command.as_str()
            );
            outcome(ask_loop(control, |reply| Control::Admin {
                command,
                target,
                upstream,
                peer_uid,
                reply,
            }))
            .await
        }
        WireRequest::State => ask_loop(control, Control::State).await.map_or_else(
            || WireResponse::Error(SHUTTING_DOWN.into()),
            WireResponse::State,
        ),
        WireRequest::Reload => {
            info!(uid = uid.as_ref().ok().copied(), "control: reload asked");
            outcome(ask_loop(control, Control::Reload)).await
        }
        WireRequest::Stats => unreachable!("stats are answered by the caller"),
    }
}

async fn answer(stream: Watched<UnixStream>, to: &Loop, limits: Limits) -> io::Result<()> {
    let Limits {
        request_timeout,
        idle_timeout,
        ..
    } = limits;
    let uid = stream.get_ref().peer_cred().map(|cred| cred.uid());
    let busy = stream.busy();
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
        Ok(WireRequest::Stats) => ask_loop(&to.requests, Request::Stats).await.map_or_else(
            || WireResponse::Error(SHUTTING_DOWN.into()),
            WireResponse::Stats,
        ),
        Ok(request) => {
            busy.during(control(request, uid, to), idle_timeout / 2)
                .await
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
    match ask(path, "lobby stats", &WireRequest::Stats, CLIENT_TIMEOUT).await? {
        WireResponse::Stats(report) => Ok(report),
        _ => Err(unexpected(path, "stats")),
    }
}

/// `lobby ctl state`: every upstream's health and admin state.
pub async fn fetch_state(path: &Path) -> Result<StateReport, CtlError> {
    match ask(path, "lobby ctl", &WireRequest::State, CLIENT_TIMEOUT).await? {
        WireResponse::State(report) => Ok(report),
        _ => Err(unexpected(path, "the state")),
    }
}

/// `lobby ctl drain|enable|disable TARGET/UPSTREAM`: what the daemon did.
pub async fn admin(
    path: &Path,
    command: AdminCommand,
    upstream: &UpstreamRef,
) -> Result<String, CtlError> {
    let request = WireRequest::Admin {
        command,
        target: upstream.target.clone(),
        upstream: upstream.upstream.clone(),
    };
    done(
        path,
        ask(path, "lobby ctl", &request, COMMAND_TIMEOUT).await?,
    )
}

/// `lobby ctl reload`: the outcome of the reload.
pub async fn reload(path: &Path) -> Result<String, CtlError> {
    done(
        path,
        ask(path, "lobby ctl", &WireRequest::Reload, COMMAND_TIMEOUT).await?,
    )
}

fn done(path: &Path, response: WireResponse) -> Result<String, CtlError> {
    match response {
        WireResponse::Done(text) => Ok(text),
        _ => Err(unexpected(path, "an outcome")),
    }
}

fn unexpected(path: &Path, expected: &'static str) -> CtlError {
    CtlError::Unexpected {
        path: path.to_owned(),
        expected,
    }
}

/// One request and its answer, within `wait`; the daemon's refusal is an
/// error. `client` names the command in a permission error.
async fn ask(
    path: &Path,
    client: &'static str,
    request: &WireRequest,
    wait: Duration,
) -> Result<WireResponse, CtlError> {
    let response = tokio::time::timeout(wait, exchange(path, client, request))
        .await
        .map_err(|_| CtlError::Timeout {
            path: path.to_owned(),
            after: wait,
        })??;
    match response {
        WireResponse::Error(message) => Err(CtlError::Daemon(message)),
        response => Ok(response),
    }
}

async fn exchange(
    path: &Path,
    client: &'static str,
    request: &WireRequest,
) -> Result<WireResponse, CtlError> {
    let exchange = |source| CtlError::Exchange {
        path: path.to_owned(),
        source,
    };
    let stream = UnixStream::connect(path)
        .await
        .map_err(|e| connect_error(path, client, e))?;
    let (read, mut write) = stream.into_split();
    let mut request = serde_json::to_vec(request).expect("plain data serializes");
    request.push(b'\n');
    write.write_all(&request).await.map_err(exchange)?;
    let mut line = String::new();
    BufReader::new(read)
        .read_line(&mut line)
        .await
        .map_err(exchange)?;
    serde_json::from_str(&line).map_err(|source| CtlError::Decode {
        path: path.to_owned(),
        source,
    })
}

/// Where an entry's traffic goes, `IP:PORT` (`[IPv6]:PORT`); `None` while
/// unresolved.
pub fn socket_address(upstream: &UpstreamStats) -> Option<String> {
    let address = upstream.address.as_deref()?;
    Some(match address.parse::<std::net::IpAddr>() {
        Ok(ip) => std::net::SocketAddr::new(ip, upstream.port).to_string(),
        Err(_) => format!("{address}:{}", upstream.port),
    })
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
        "ADMIN",
        "ADDRESS",
        "WEIGHT",
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
        // The measure a dynamic distribution picks by, beside the weight.
        let measure = match target.distribution.as_str() {
            "least-connections" => Some("ESTABLISHED"),
            "least-latency" => Some("LATENCY"),
            _ => None,
        };
        let mut heading = header.map(str::to_owned).to_vec();
        if let Some(measure) = measure {
            heading.insert(5, measure.to_owned());
        }
        let mut rows = vec![heading];
        for upstream in &target.upstreams {
            let rates =
                earlier.and_then(|(report, secs)| rates(report, &target.name, upstream, secs));
            let address = socket_address(upstream)
                .unwrap_or_else(|| format!("{} (unresolved)", upstream.host));
            rows.push(vec![
                upstream.name.clone(),
                if upstream.available { "up" } else { "down" }.to_owned(),
                upstream.admin_state.as_str().to_owned(),
                address,
                upstream.weight.to_string(),
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
            let row = rows.last_mut().expect("just pushed");
            match measure {
                Some("ESTABLISHED") => row.insert(
                    5,
                    upstream
                        .established_connections
                        .map_or("-".into(), |n| n.to_string()),
                ),
                Some(_) => row.insert(
                    5,
                    upstream
                        .probe_latency_seconds
                        .map_or("-".into(), |l| l.to_string()),
                ),
                None => {}
            }
        }
        // Names, states and addresses read left to right, numbers line up
        // right.
        out.push_str(&aligned(&rows, 4));
    }
    if report.targets.is_empty() {
        out.push_str("no targets configured\n");
    }
    out
}

/// `rows` as indented columns: the first `left` aligned left, the others
/// right.
fn aligned(rows: &[Vec<String>], left: usize) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|col| {
            rows.iter()
                .map(|row| row[col].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(col, (cell, width))| {
                if col < left {
                    format!("{cell:<width$}")
                } else {
                    format!("{cell:>width$}")
                }
            })
            .collect();
        writeln!(out, "  {}", cells.join("  ").trim_end()).unwrap();
    }
    out
}

/// `lobby ctl state`: one line per upstream under its target's heading.
pub fn render_state(report: &StateReport) -> String {
    let mut out = String::new();
    for target in &report.targets {
        writeln!(out, "target {}", target.name).unwrap();
        let mut rows = vec![
            ["UPSTREAM", "ADDRESS", "HEALTH", "ADMIN", "WEIGHT"]
                .map(str::to_owned)
                .to_vec(),
        ];
        for upstream in &target.upstreams {
            rows.push(vec![
                upstream.name.clone(),
                upstream
                    .address
                    .clone()
                    .unwrap_or_else(|| "(unresolved)".to_owned()),
                if upstream.available { "up" } else { "down" }.to_owned(),
                upstream.admin_state.as_str().to_owned(),
                upstream.weight.to_string(),
            ]);
        }
        out.push_str(&aligned(&rows, 4));
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

    #[test]
    fn each_table_has_its_socket_and_pin_directory() {
        assert_eq!(default_socket("lobby"), Path::new("/run/lobby/lobby.sock"));
        assert_eq!(default_socket("lb2"), Path::new("/run/lobby/lb2.sock"));
        assert_eq!(
            crate::ebpf::default_pin_dir("lobby"),
            Path::new("/sys/fs/bpf/lobby")
        );
        assert_eq!(
            crate::ebpf::default_pin_dir("lb2"),
            Path::new("/sys/fs/bpf/lobby-lb2")
        );
    }

    fn upstream(name: &str, connections: u64, bytes_out: u64) -> UpstreamStats {
        UpstreamStats {
            name: name.into(),
            host: "198.18.1.11".into(),
            address: Some("198.18.1.11".into()),
            family: Some("ipv4".into()),
            port: 9000,
            available: true,
            connections,
            resets: 0,
            packets_out: 10,
            bytes_out,
            packets_in: 9,
            bytes_in: 2048,
            admin_state: AdminState::Enabled,
            weight: 1,
            established_connections: None,
            probe_latency_seconds: None,
        }
    }

    fn report(upstreams: Vec<UpstreamStats>) -> StatsReport {
        StatsReport {
            targets: vec![TargetStats {
                denied: Default::default(),
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
            "upstreams": [{"name": "web1", "host": "198.18.1.11", "address": "198.18.1.11",
                "family": "ipv4", "port": 9000,
                "available": true, "connections": 12, "resets": 0, "packets_out": 10, "bytes_out": 5000,
                "packets_in": 9, "bytes_in": 2048, "admin_state": "enabled", "weight": 1}],
            "denied": {"blocked": 0, "not_allowed": 0, "rate_limited": 0, "connection_limited": 0}}]});
        assert_eq!(json, expected);
    }

    #[test]
    fn an_older_daemons_stats_read_as_enabled_at_weight_one() {
        let mut json = serde_json::to_value(report(vec![upstream("web1", 12, 5000)])).unwrap();
        let upstream = json["targets"][0]["upstreams"][0].as_object_mut().unwrap();
        upstream.remove("admin_state");
        upstream.remove("weight");
        upstream.remove("family");
        let read: StatsReport = serde_json::from_value(json).unwrap();
        let older = UpstreamStats {
            family: None,
            ..self::upstream("web1", 12, 5000)
        };
        assert_eq!(read, report(vec![older]));
    }

    #[test]
    fn an_ipv6_address_is_bracketed_before_its_port() {
        let mut upstream = upstream("web1", 0, 0);
        assert_eq!(socket_address(&upstream).unwrap(), "198.18.1.11:9000");
        upstream.address = Some("2001:2::11".into());
        assert_eq!(socket_address(&upstream).unwrap(), "[2001:2::11]:9000");
        upstream.address = None;
        assert_eq!(socket_address(&upstream), None);
    }

    #[test]
    fn dynamic_targets_show_the_measure_they_pick_by() {
        let mut loaded = upstream("web1", 12, 5000);
        loaded.established_connections = Some(20);
        loaded.probe_latency_seconds = Some(Latency(Duration::from_micros(51_300)));
        let mut report = report(vec![loaded, upstream("web2", 0, 0)]);
        report.targets[0].distribution = "least-connections".into();
        let json = serde_json::to_value(&report).unwrap();
        let upstreams = &json["targets"][0]["upstreams"];
        assert_eq!(upstreams[0]["established_connections"], 20);
        assert_eq!(upstreams[0]["probe_latency_seconds"], 0.0513);
        assert!(upstreams[1].get("established_connections").is_none());
        let read: StatsReport = serde_json::from_value(json).unwrap();
        assert_eq!(read, report);
        let table = render_table(&report, None);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[1].contains("WEIGHT  ESTABLISHED  CONNS"), "{table}");
        assert!(lines[2].contains("1           20     12"), "{table}");
        assert!(lines[3].contains("1            -      0"), "{table}");
        report.targets[0].distribution = "least-latency".into();
        let table = render_table(&report, None);
        assert!(table.contains("WEIGHT  LATENCY  CONNS"), "{table}");
        assert!(table.contains("1  51.30ms     12"), "{table}");
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
        let mut drained = upstream("web-long-name", 1, 3 << 20);
        drained.admin_state = AdminState::Drained;
        drained.weight = 0;
        let now = report(vec![upstream("web1", 30, 5000), drained]);
        let table = render_table(&now, Some((&before, 2.0)));
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "target web (tcp port 8081, web-pool round-robin): 2 of 2 upstreams available"
        );
        assert!(
            lines[1].starts_with("  UPSTREAM       STATE  ADMIN    ADDRESS           WEIGHT"),
            "{table}"
        );
        assert!(
            lines[2].contains("up     enabled  198.18.1.11:9000       1"),
            "{table}"
        );
        assert!(
            lines[3].contains("up     drained  198.18.1.11:9000       0"),
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
        let to = Loop {
            requests,
            control: None,
        };
        tokio::spawn(async move { serve_within(listener, to, &serving, limits).await });
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

    fn state_report() -> StateReport {
        let upstream = |name: &str, address: Option<&str>, available| UpstreamState {
            name: name.into(),
            address: address.map(str::to_owned),
            available,
            admin_state: AdminState::Enabled,
            weight: 1,
        };
        StateReport {
            targets: vec![TargetState {
                name: "web".into(),
                upstreams: vec![
                    upstream("web1", Some("198.18.1.11:9000"), true),
                    upstream("web-long-name", None, false),
                ],
            }],
        }
    }

    /// A control server on `dir`'s socket, and what it asks the loop.
    async fn control_server(dir: &Path) -> (PathBuf, CancellationToken, mpsc::Receiver<Control>) {
        let path = dir.join("lobby.sock");
        let listener = bind(&path).await.unwrap();
        let (requests, _) = mpsc::channel(1);
        let (control, incoming) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        tokio::spawn(serve_with_control(
            listener,
            path.clone(),
            requests,
            control,
            cancel.clone(),
        ));
        (path, cancel, incoming)
    }

    /// A control socket in `dir` whose loop keeps `state_report()`, applies
    /// admin commands to it, refuses unknown upstreams by naming the ones
    /// there are, and answers reloads: applied, then failed.
    async fn controlled_daemon(dir: &Path) -> (PathBuf, CancellationToken) {
        let (path, cancel, mut incoming) = control_server(dir).await;
        tokio::spawn(async move {
            let mut state = state_report();
            let mut reloads = 0;
            while let Some(request) = incoming.recv().await {
                match request {
                    Control::Admin {
                        command,
                        target,
                        upstream,
                        peer_uid,
                        reply,
                    } => {
                        let group = &mut state.targets[0];
                        let names: Vec<String> =
                            group.upstreams.iter().map(|u| u.name.clone()).collect();
                        let answer = match group.upstreams.iter_mut().find(|u| u.name == upstream) {
                            Some(found) if target == group.name => {
                                found.admin_state = command.state();
                                found.weight = u32::from(command == AdminCommand::Enable);
                                Ok(format!(
                                    "{target}/{upstream} {} (asked by uid {peer_uid})",
                                    found.admin_state.as_str()
                                ))
                            }
                            _ => Err(format!(
                                "no upstream {target}/{upstream}; {} has {}",
                                group.name,
                                names.join(", ")
                            )),
                        };
                        reply.send(answer).unwrap();
                    }
                    Control::State(reply) => reply.send(state.clone()).unwrap(),
                    Control::Reload(reply) => {
                        reloads += 1;
                        let answer = if reloads == 1 {
                            Ok("reload applied: 1 target, 2 upstreams".to_owned())
                        } else {
                            Err("lobby.yaml:3:5: lb: expected a list".to_owned())
                        };
                        reply.send(answer).unwrap();
                    }
                }
            }
        });
        (path, cancel)
    }

    fn web(upstream: &str) -> UpstreamRef {
        UpstreamRef {
            target: "web".into(),
            upstream: upstream.into(),
        }
    }

    #[tokio::test]
    async fn admin_commands_reach_the_loop_with_the_peers_uid() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        // The test made the directory: its owner is this process's uid.
        let uid = std::fs::metadata(dir.path()).unwrap().uid();
        let (path, cancel) = controlled_daemon(dir.path()).await;
        let answer = admin(&path, AdminCommand::Drain, &web("web1"))
            .await
            .unwrap();
        assert_eq!(answer, format!("web/web1 drained (asked by uid {uid})"));
        let state = fetch_state(&path).await.unwrap();
        let web1 = &state.targets[0].upstreams[0];
        assert_eq!((web1.admin_state, web1.weight), (AdminState::Drained, 0));
        admin(&path, AdminCommand::Disable, &web("web-long-name"))
            .await
            .unwrap();
        admin(&path, AdminCommand::Enable, &web("web1"))
            .await
            .unwrap();
        let state = fetch_state(&path).await.unwrap();
        let admin_states: Vec<_> = state.targets[0]
            .upstreams
            .iter()
            .map(|u| (u.admin_state, u.weight))
            .collect();
        assert_eq!(
            admin_states,
            [(AdminState::Enabled, 1), (AdminState::Disabled, 0)]
        );
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_refusal_is_the_daemons_own_words() {
        let dir = tempfile::tempdir().unwrap();
        let (path, cancel) = controlled_daemon(dir.path()).await;
        let error = admin(&path, AdminCommand::Drain, &web("nosuch"))
            .await
            .unwrap_err();
        assert!(matches!(error, CtlError::Daemon(_)), "{error:?}");
        assert_eq!(
            error.to_string(),
            "no upstream web/nosuch; web has web1, web-long-name"
        );
        cancel.cancel();
    }

    #[tokio::test]
    async fn reload_prints_the_outcome_or_the_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (path, cancel) = controlled_daemon(dir.path()).await;
        assert_eq!(
            reload(&path).await.unwrap(),
            "reload applied: 1 target, 2 upstreams"
        );
        assert_eq!(
            reload(&path).await.unwrap_err().to_string(),
            "lobby.yaml:3:5: lb: expected a list"
        );
        cancel.cancel();
    }

    /// A daemon on the shipped limits whose reloads take `takes` (`None`:
    /// forever).
    async fn slow_reloading_daemon(
        dir: &Path,
        takes: Option<Duration>,
    ) -> (PathBuf, CancellationToken) {
        let (path, cancel, mut incoming) = control_server(dir).await;
        tokio::spawn(async move {
            let mut unanswered = Vec::new();
            while let Some(Control::Reload(reply)) = incoming.recv().await {
                match takes {
                    Some(takes) => {
                        tokio::time::sleep(takes).await;
                        let _ = reply.send(Ok("reload applied: no change".to_owned()));
                    }
                    None => unanswered.push(reply),
                }
            }
        });
        (path, cancel)
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_longer_than_the_idle_timeout_gets_its_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let takes = LIMITS.idle_timeout * 4;
        let (path, cancel) = slow_reloading_daemon(dir.path(), Some(takes)).await;
        let start = tokio::time::Instant::now();
        assert_eq!(reload(&path).await.unwrap(), "reload applied: no change");
        assert!(start.elapsed() >= takes);
        cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_without_an_outcome_says_so_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (path, cancel) = slow_reloading_daemon(dir.path(), None).await;
        let start = tokio::time::Instant::now();
        let error = reload(&path).await.unwrap_err();
        assert_eq!(start.elapsed(), OUTCOME_WAIT);
        assert_eq!(
            error.to_string(),
            "no outcome within 60s; the daemon goes on with it, and its log says how it ends"
        );
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_daemon_without_runtime_control_refuses_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, cancel) = daemon(dir.path(), LIMITS, report(Vec::new())).await;
        let error = reload(&path).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            "this daemon does not take runtime commands"
        );
        cancel.cancel();
    }

    #[test]
    fn the_wire_names_each_command() {
        let request = WireRequest::Admin {
            command: AdminCommand::Drain,
            target: "web".into(),
            upstream: "web1".into(),
        };
        assert_eq!(
            serde_json::to_string(&request).unwrap(),
            r#"{"request":"admin","command":"drain","target":"web","upstream":"web1"}"#
        );
        assert_eq!(
            serde_json::to_string(&WireRequest::State).unwrap(),
            r#"{"request":"state"}"#
        );
        assert_eq!(
            serde_json::to_string(&WireRequest::Reload).unwrap(),
            r#"{"request":"reload"}"#
        );
    }

    #[test]
    fn state_json_names_health_admin_state_and_weight() {
        let json = serde_json::to_value(state_report()).unwrap();
        let expected = serde_json::json!({"targets": [{"name": "web", "upstreams": [
            {"name": "web1", "address": "198.18.1.11:9000", "available": true,
             "admin_state": "enabled", "weight": 1},
            {"name": "web-long-name", "address": null, "available": false,
             "admin_state": "enabled", "weight": 1}]}]});
        assert_eq!(json, expected);
    }

    #[test]
    fn state_text_is_a_table_per_target() {
        let mut state = state_report();
        state.targets[0].upstreams[0].admin_state = AdminState::Drained;
        state.targets[0].upstreams[0].weight = 0;
        assert_eq!(
            render_state(&state),
            "target web\n\
             \x20 UPSTREAM       ADDRESS           HEALTH  ADMIN    WEIGHT\n\
             \x20 web1           198.18.1.11:9000  up      drained       0\n\
             \x20 web-long-name  (unresolved)      down    enabled       1\n"
        );
        assert_eq!(
            render_state(&StateReport::default()),
            "no targets configured\n"
        );
    }

    #[test]
    fn a_refused_connection_says_who_may_connect() {
        let path = Path::new("/run/lobby/lobby.sock");
        let denied = connect_error(
            path,
            "lobby ctl",
            io::Error::from(io::ErrorKind::PermissionDenied),
        );
        assert_eq!(
            denied.to_string(),
            "permission denied on /run/lobby/lobby.sock: lobby ctl needs root or the socket's owner"
        );
        let missing = connect_error(path, "lobby ctl", io::Error::from(io::ErrorKind::NotFound));
        assert!(matches!(missing, CtlError::Exchange { .. }), "{missing:?}");
    }

    #[test]
    fn upstreams_are_named_target_slash_upstream() {
        assert_eq!("web/web1".parse(), Ok(web("web1")));
        assert_eq!(web("web1").to_string(), "web/web1");
        for bad in ["web", "web/", "/web1", "web/web1/x", ""] {
            let error = bad.parse::<UpstreamRef>().unwrap_err();
            assert!(
                error.starts_with("expected TARGET/UPSTREAM"),
                "{bad}: {error}"
            );
        }
    }
}
