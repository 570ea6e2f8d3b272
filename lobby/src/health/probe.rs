//! One probe of one upstream per protocol. Each returns the round trip it
//! measured on success: the connect for `tcp` and `sctp`, the request to the
//! response head for `http(s)`, the datagram out to the reply for `udp`.
//! Each probe opens its own sockets of the target's address family, marked
//! with [`PROBE_MARK`] so that they need no conntrack entry, closes them
//! when it ends and never takes longer than its timeout.
use std::{
    io,
    net::SocketAddr,
    os::fd::AsRawFd as _,
    sync::{Once, OnceLock},
    time::Duration,
};

use http::{
    HeaderValue, Request, Uri,
    header::{CONNECTION, HOST, USER_AGENT},
};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use socket2::{Domain, Socket, Type};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, unix::AsyncFd},
    net::{TcpSocket, TcpStream, UdpSocket},
    time::{self, Instant},
};
use tokio_rustls::TlsConnector;
use tracing::warn;

use super::{
    PROBE_MARK,
    state::{FailureReason, HttpFailure, TlsFailure},
    tls,
};
use crate::config::{HealthProtocol, HttpProbe, UdpProbe};

/// The largest datagram a UDP reply can be.
const MAX_DATAGRAM: usize = 65536;
const USER_AGENT_VALUE: &str = concat!("lobby-health-check/", env!("CARGO_PKG_VERSION"));

/// Probes `target` with `protocol`; the round trip on success.
pub(super) async fn probe(
    protocol: &HealthProtocol,
    target: SocketAddr,
    timeout: Duration,
) -> Result<Duration, FailureReason> {
    match protocol {
        HealthProtocol::Tcp => probe_tcp(target, timeout).await,
        HealthProtocol::Udp(udp) => probe_udp(target, udp, timeout).await,
        HealthProtocol::Http(http) => probe_http(target, http, None, timeout).await,
        HealthProtocol::Https { http, tls_verify } => {
            probe_http(target, http, Some(*tls_verify), timeout).await
        }
        HealthProtocol::Sctp => probe_sctp(target, timeout).await,
    }
}

/// Succeeds when the handshake completes within `timeout`. A refusal fails
/// as soon as the reset arrives; a connect still pending at the timeout is
/// dropped, which closes its socket.
async fn probe_tcp(target: SocketAddr, timeout: Duration) -> Result<Duration, FailureReason> {
    let started = Instant::now();
    within(timeout, async {
        let connection = connect_resetting_on_close(target).await?;
        drop(connection);
        Ok(started.elapsed())
    })
    .await
}

/// Connects with `SO_LINGER` 0, so that dropping the connection resets it.
/// The prober closes first, and an orderly close would leave it a TIME_WAIT
/// socket for a minute per probe: 600,000 at 10,000 probes a second, beyond
/// the kernel's usual `tcp_max_tw_buckets`.
async fn connect_resetting_on_close(target: SocketAddr) -> Result<TcpStream, FailureReason> {
    let connect = async {
        let socket = probe_socket(target, Type::STREAM, None)?;
        socket.set_linger(Some(Duration::ZERO))?;
        TcpSocket::from_std_stream(socket.into())
            .connect(target)
            .await
    };
    connect.await.map_err(|error| FailureReason::from(&error))
}

/// The local ports of TCP probes (tcp, http, https), when confined: the
/// rule of Lobby's table that exempts the answers to probes from conntrack
/// must look up the socket a packet is for, a hash lookup or two of every
/// packet the host receives or forwards (0.940 [0.920, 0.960] of the
/// connection rate of a bare DNAT ruleset, interleaved, n=6). Confined,
/// TCP packets to other ports skip it; the rest (UDP, SCTP, ICMP errors)
/// are looked up as before, since a UDP probe holds its port until its
/// timeout, and 10,000 of them in flight would not fit a narrow range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbePorts {
    pub first: u16,
    pub last: u16,
}

/// How many ports TCP probes use: the top of the ephemeral range. A TCP
/// connect shares a local port between destinations, so one port per
/// concurrent probe of the same upstream address and port is what it
/// takes; other programs' connections may use them too.
const PROBE_PORT_COUNT: u16 = 4096;

/// Linux's `IP_LOCAL_PORT_RANGE` (6.3+): a socket's own ephemeral range,
/// within the namespace's.
const IP_LOCAL_PORT_RANGE: libc::c_int = 51;

static PROBE_PORTS: OnceLock<ProbePorts> = OnceLock::new();

/// Confines the local ports of TCP probes to the top [`PROBE_PORT_COUNT`]
/// ports of this namespace's ephemeral range (`ip_local_port_range`), if
/// the kernel has `IP_LOCAL_PORT_RANGE`; the range, `None` when it cannot
/// (then every packet's socket is looked up, as before). A later change of
/// `ip_local_port_range` that leaves the range out makes the kernel ignore
/// it: answers to probes then pass conntrack like any packet, which a full
/// table can drop.
pub fn confine_probe_ports() -> Option<ProbePorts> {
    if let Some(ports) = PROBE_PORTS.get() {
        return Some(*ports);
    }
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut bounds = range.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(low)), Some(Ok(high))) = (bounds.next(), bounds.next()) else {
        return None;
    };
    let ports = ProbePorts {
        first: low.max(high.saturating_sub(PROBE_PORT_COUNT - 1)),
        last: high,
    };
    let probe = Socket::new(Domain::IPV4, Type::STREAM, None).ok()?;
    set_local_port_range(&probe, ports).ok()?;
    Some(*PROBE_PORTS.get_or_init(|| ports))
}

fn set_local_port_range(socket: &Socket, ports: ProbePorts) -> io::Result<()> {
    let range: u32 = u32::from(ports.last) << 16 | u32::from(ports.first);
    // SAFETY: a valid descriptor, and a u32 option value of its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            IP_LOCAL_PORT_RANGE,
            (&raw const range).cast(),
            size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A non-blocking socket of `target`'s family for one probe, marked with
/// [`PROBE_MARK`]: Lobby's table exempts its packets from conntrack, so a
/// full conntrack table cannot make a healthy upstream look dead. A TCP
/// socket takes its port among the [`ProbePorts`], when confined.
fn probe_socket(
    target: SocketAddr,
    kind: Type,
    protocol: Option<socket2::Protocol>,
) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(target), kind.nonblocking(), protocol)?;
    if kind == Type::STREAM
        && protocol.is_none()
        && let Some(ports) = PROBE_PORTS.get()
    {
        set_local_port_range(&socket, *ports)?;
    }
    if let Err(error) = socket.set_mark(PROBE_MARK) {
        // SO_MARK needs CAP_NET_ADMIN (or CAP_NET_RAW). The daemon has it,
        // nft needs it too: only probes run without it (unit tests as an
        // ordinary user) get here. Unmarked, a probe still works, tracked
        // like any other connection.
        if error.kind() != io::ErrorKind::PermissionDenied {
            return Err(error);
        }
        static UNMARKED: Once = Once::new();
        UNMARKED.call_once(|| {
            warn!(%error, "health probes cannot be marked: they depend on conntrack entries");
        });
    }
    Ok(socket)
}

/// `probe` cut short at `timeout`, which it then fails with.
async fn within(
    timeout: Duration,
    probe: impl Future<Output = Result<Duration, FailureReason>>,
) -> Result<Duration, FailureReason> {
    time::timeout(timeout, probe)
        .await
        .unwrap_or(Err(FailureReason::Timeout { after: timeout }))
}

/// Sends `udp.send` from a connected socket and waits for a datagram back
/// that contains `udp.expect`, when set. On a connected socket the kernel
/// reports an ICMP port unreachable as `ECONNREFUSED`: a failure at once.
async fn probe_udp(
    target: SocketAddr,
    udp: &UdpProbe,
    timeout: Duration,
) -> Result<Duration, FailureReason> {
    let io_failure = |error: io::Error| match error.kind() {
        io::ErrorKind::ConnectionRefused => FailureReason::PortUnreachable,
        _ => FailureReason::from(&error),
    };
    let socket = probe_socket(target, Type::DGRAM, None)
        .and_then(|socket| UdpSocket::from_std(socket.into()))
        .map_err(io_failure)?;
    // Connecting binds the socket to an ephemeral port.
    socket.connect(target).await.map_err(io_failure)?;
    let started = Instant::now();
    socket.send(udp.send.as_bytes()).await.map_err(io_failure)?;
    // Any reply will do without `expect`: one byte of it is enough.
    let mut reply = Vec::with_capacity(if udp.expect.is_some() {
        MAX_DATAGRAM
    } else {
        1
    });
    let mut replied = false;
    let awaiting = async {
        loop {
            reply.clear();
            socket.recv_buf(&mut reply).await.map_err(io_failure)?;
            match &udp.expect {
                Some(expect) if !contains(&reply, expect.as_bytes()) => replied = true,
                _ => return Ok(started.elapsed()),
            }
        }
    };
    match time::timeout(timeout, awaiting).await {
        Ok(result) => result,
        Err(_elapsed) => Err(match &udp.expect {
            Some(expect) if replied => FailureReason::ReplyLacks {
                expect: expect.clone(),
            },
            _ => FailureReason::NoReply { after: timeout },
        }),
    }
}

/// `GET http.path` on a connection of its own, over TLS when `tls_verify`
/// is set (to whether the certificate is verified). Redirects are answers
/// like others: their status decides.
async fn probe_http(
    target: SocketAddr,
    http: &HttpProbe,
    tls_verify: Option<bool>,
    timeout: Duration,
) -> Result<Duration, FailureReason> {
    within(timeout, async {
        let tcp = connect_resetting_on_close(target).await?;
        let Some(verify) = tls_verify else {
            return exchange(tcp, http).await;
        };
        // rustls takes a name for SNI and verification, and an address for
        // verification against the certificate's IP addresses (no SNI).
        // Validated hosts are both; rustls's own rules could still differ.
        let name = ServerName::try_from(http.host.clone())
            .map_err(|_| FailureReason::Tls(TlsFailure::Handshake))?;
        let stream = TlsConnector::from(tls::client_config(verify))
            .connect(name, tcp)
            .await
            .map_err(|error| io_failure(&error))?;
        exchange(stream, http).await
    })
    .await
}

/// One request and its response on `stream`, which is closed after it.
async fn exchange<S>(stream: S, http: &HttpProbe) -> Result<Duration, FailureReason>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| hyper_failure(&error))?;
    let started = Instant::now();
    let response = async {
        let response = sender
            .send_request(request(http))
            .await
            .map_err(|error| hyper_failure(&error))?;
        let round_trip = started.elapsed();
        let status = response.status().as_u16();
        if !http.expect_status.contains(status) {
            return Err(FailureReason::Status(status));
        }
        if let Some(expect) = &http.expect
            && !body_contains(response.into_body(), expect.as_bytes()).await?
        {
            return Err(FailureReason::BodyLacks {
                expect: expect.clone(),
            });
        }
        Ok(round_trip)
    };
    // The connection does the I/O while the response is awaited; it may end
    // first when the server closes after a complete response.
    tokio::pin!(response, connection);
    tokio::select! {
        result = &mut response => result,
        ended = &mut connection => match ended {
            Ok(()) => response.await,
            Err(error) => Err(hyper_failure(&error)),
        },
    }
}

fn request(http: &HttpProbe) -> Request<Empty<Bytes>> {
    let mut request = Request::new(Empty::new());
    *request.uri_mut() = Uri::from(http.path.clone());
    let host = if http.host.contains(':') {
        // An IPv6 address, which a Host header brackets.
        HeaderValue::try_from(format!("[{}]", http.host))
    } else {
        HeaderValue::try_from(http.host.as_str())
    };
    let headers = request.headers_mut();
    headers.insert(
        HOST,
        host.expect("a validated host name or address is header text"),
    );
    headers.insert(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE));
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    request
}

/// Whether the body contains `expect`, read as it streams in; reading stops
/// at the first match.
async fn body_contains(mut body: Incoming, expect: &[u8]) -> Result<bool, FailureReason> {
    let mut search = Search::new(expect);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| hyper_failure(&error))?;
        // Trailers hold no body text.
        if let Ok(data) = frame.into_data()
            && search.feed(&data)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A search for a text in chunks, which keeps between them only the tail
/// that a match may straddle.
struct Search<'n> {
    needle: &'n [u8],
    tail: Vec<u8>,
}

impl<'n> Search<'n> {
    fn new(needle: &'n [u8]) -> Self {
        Self {
            needle,
            tail: Vec::new(),
        }
    }

    /// Whether the text so far contains the needle.
    fn feed(&mut self, chunk: &[u8]) -> bool {
        self.tail.extend_from_slice(chunk);
        if contains(&self.tail, self.needle) {
            return true;
        }
        let keep = self.needle.len().saturating_sub(1);
        self.tail.drain(..self.tail.len().saturating_sub(keep));
        false
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty()
        || haystack
            .windows(needle.len())
            .any(|window| window == needle)
}

/// An I/O error of the connection, which TLS may have caused.
fn io_failure(error: &io::Error) -> FailureReason {
    tls::failure(error).map_or_else(|| FailureReason::from(error), FailureReason::Tls)
}

fn hyper_failure(error: &hyper::Error) -> FailureReason {
    let io = std::error::Error::source(error).and_then(|source| source.downcast_ref::<io::Error>());
    match io {
        Some(io) => io_failure(io),
        None if error.is_parse() => FailureReason::Http(HttpFailure::Malformed),
        None if error.is_incomplete_message() || error.is_canceled() => {
            FailureReason::Http(HttpFailure::Incomplete)
        }
        None => FailureReason::Http(HttpFailure::Other),
    }
}

/// Succeeds when an SCTP association is set up within `timeout`. The socket
/// lingers 0, so that closing it aborts the association rather than
/// shutting it down.
async fn probe_sctp(target: SocketAddr, timeout: Duration) -> Result<Duration, FailureReason> {
    let started = Instant::now();
    let socket = probe_socket(
        target,
        Type::STREAM,
        Some(socket2::Protocol::from(libc::IPPROTO_SCTP)),
    )
    .map_err(|error| match error.raw_os_error() {
        Some(libc::EPROTONOSUPPORT | libc::ESOCKTNOSUPPORT) => {
            FailureReason::Unsupported { protocol: "SCTP" }
        }
        _ => FailureReason::from(&error),
    })?;
    let io_failure = |error: io::Error| FailureReason::from(&error);
    socket
        .set_linger(Some(Duration::ZERO))
        .map_err(io_failure)?;
    match socket.connect(&target.into()) {
        Ok(()) => return Ok(started.elapsed()),
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(error) => return Err(io_failure(error)),
    }
    // SAFETY: the socket owns its descriptor, which stays open and the same
    // until the AsyncFd, its owner, is dropped.
    let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::WRITABLE) }
        .map_err(|error| io_failure(error.into()))?;
    within(timeout, async {
        // Writable once the handshake has ended, either way; SO_ERROR says
        // which.
        let _ready = socket.writable().await.map_err(io_failure)?;
        match socket.get_ref().take_error().map_err(io_failure)? {
            Some(error) => Err(io_failure(error)),
            None => Ok(started.elapsed()),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::{
        future::pending,
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
        sync::Arc,
    };

    use http::uri::PathAndQuery;
    use rustls::ServerConfig;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        sync::mpsc,
    };
    use tokio_rustls::TlsAcceptor;

    use super::*;
    use crate::{
        config::StatusRange,
        health::test_support::{LONG_TIMEOUT, LOOPBACK, black_hole, closed_port, listen, within},
    };

    const SHORT_TIMEOUT: Duration = Duration::from_millis(300);

    fn at(port: u16) -> SocketAddr {
        SocketAddr::new(LOOPBACK, port)
    }

    /// The failure's log text, or the success.
    fn text(result: Result<Duration, FailureReason>) -> String {
        match result {
            Ok(_) => "success".to_owned(),
            Err(reason) => reason.to_string(),
        }
    }

    fn http_probe(expect: Option<&str>) -> HttpProbe {
        HttpProbe {
            path: PathAndQuery::from_static("/health?deep=1"),
            host: "localhost".to_owned(),
            expect_status: StatusRange {
                first: 200,
                last: 399,
            },
            expect: expect.map(Arc::from),
        }
    }

    fn http(probe: HttpProbe) -> HealthProtocol {
        HealthProtocol::Http(probe)
    }

    fn https(tls_verify: bool) -> HealthProtocol {
        HealthProtocol::Https {
            http: http_probe(Some("ok")),
            tls_verify,
        }
    }

    fn answer(status: &str, body: &str) -> Option<String> {
        Some(format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ))
    }

    /// What a test HTTP server saw of one request: the SNI name over TLS,
    /// and the request head.
    #[derive(Debug)]
    struct Seen {
        sni: Option<String>,
        head: String,
    }

    /// An HTTP server on loopback that reads each request head, reports it
    /// and sends `answer`, or holds the connection open without answering
    /// when `None`. Over TLS with `tls`.
    async fn http_server(
        answer: Option<String>,
        tls: Option<TlsAcceptor>,
    ) -> (u16, mpsc::UnboundedReceiver<Seen>) {
        let (listener, port) = listen().await;
        let (seen_tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.expect("accept");
                let (answer, tls, seen_tx) = (answer.clone(), tls.clone(), seen_tx.clone());
                tokio::spawn(async move {
                    let Some(tls) = tls else {
                        return respond(stream, None, answer, &seen_tx).await;
                    };
                    // A client that rejects the certificate closes here.
                    if let Ok(stream) = tls.accept(stream).await {
                        let sni = stream.get_ref().1.server_name().map(str::to_owned);
                        respond(stream, sni, answer, &seen_tx).await;
                    }
                });
            }
        });
        (port, seen)
    }

    async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
        mut stream: S,
        sni: Option<String>,
        answer: Option<String>,
        seen: &mpsc::UnboundedSender<Seen>,
    ) {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0];
            if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).expect("an ASCII request head");
        seen.send(Seen { sni, head }).expect("the test receives");
        match answer {
            Some(answer) => {
                stream.write_all(answer.as_bytes()).await.expect("answer");
                stream.shutdown().await.expect("close");
            }
            None => pending().await,
        }
    }

    /// A TLS acceptor with a fresh self-signed certificate for `localhost`.
    fn self_signed() -> TlsAcceptor {
        let signed = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a self-signed certificate");
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(signed.signing_key.serialize_der().into());
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("default versions")
                .with_no_client_auth()
                .with_single_cert(vec![signed.cert.der().clone()], key)
                .expect("a server configuration");
        TlsAcceptor::from(Arc::new(config))
    }

    /// A UDP socket on `ip` that echoes every datagram.
    async fn udp_echo(ip: IpAddr) -> u16 {
        let socket = UdpSocket::bind((ip, 0)).await.expect("bind");
        let port = socket.local_addr().expect("address").port();
        tokio::spawn(async move {
            let mut buffer = vec![0; MAX_DATAGRAM];
            loop {
                let (len, from) = socket.recv_from(&mut buffer).await.expect("receive");
                socket.send_to(&buffer[..len], from).await.expect("echo");
            }
        });
        port
    }

    #[tokio::test]
    async fn tcp_probe_succeeds_against_a_listener_with_its_connect_time() {
        let (_listener, port) = listen().await;
        let rtt = probe_tcp(at(port), LONG_TIMEOUT).await.expect("connected");
        assert!(rtt < Duration::from_secs(1), "{rtt:?}");
    }

    /// The mark is what Lobby's table exempts from conntrack (the namespace
    /// test `hardening.rs` proves the exemption end to end).
    #[test]
    fn probe_sockets_carry_the_probe_mark() {
        for kind in [Type::STREAM, Type::DGRAM] {
            let socket = probe_socket(at(9), kind, None).expect("a probe socket");
            assert_eq!(socket.mark().expect("SO_MARK"), PROBE_MARK, "{kind:?}");
        }
    }

    /// Confined (the daemon does it at start; here once for the whole test
    /// process, harmless to the other tests), TCP probes connect from ports
    /// of the range.
    #[tokio::test]
    async fn tcp_probes_connect_from_the_confined_ports() {
        let Some(ports) = confine_probe_ports() else {
            // Before Linux 6.3: nothing to confine them with.
            return;
        };
        assert!(ports.first <= ports.last, "{ports:?}");
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let target = listener.local_addr().unwrap();
        for _ in 0..20 {
            let (probed, accepted) =
                tokio::join!(probe_tcp(target, LONG_TIMEOUT), listener.accept());
            probed.expect("connected");
            let port = accepted.unwrap().1.port();
            assert!(
                (ports.first..=ports.last).contains(&port),
                "{port} not in {ports:?}"
            );
        }
    }

    #[tokio::test]
    async fn refused_connect_fails_without_waiting_for_the_timeout() {
        let target = at(closed_port().await);
        let started = Instant::now();
        let outcome = probe_tcp(target, LONG_TIMEOUT).await;
        let latency = started.elapsed();
        assert_eq!(outcome, Err(FailureReason::Refused));
        assert!(
            latency < Duration::from_secs(1),
            "refused after {latency:?}"
        );
    }

    /// This host's sockets waiting for the answer to their SYN (state 02 in
    /// /proc/net/tcp) from `port` on IPv4 loopback.
    fn connecting_to(port: u16) -> usize {
        let sockets = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
        // The kernel prints the address as the native-endian u32 of its
        // network-order bytes.
        let remote = format!(
            "{:08X}:{port:04X}",
            u32::from_ne_bytes(Ipv4Addr::LOCALHOST.octets())
        );
        sockets
            .lines()
            .filter(|line| {
                let mut fields = line.split_whitespace().skip(2);
                fields.next() == Some(remote.as_str()) && fields.next() == Some("02")
            })
            .count()
    }

    #[tokio::test]
    async fn hanging_connect_fails_at_the_timeout_and_closes_its_socket() {
        let (_listener, _queued, port) = black_hole().await;
        let started = Instant::now();
        let probing = tokio::spawn(probe_tcp(at(port), SHORT_TIMEOUT));
        time::sleep(SHORT_TIMEOUT / 3).await;
        assert_eq!(connecting_to(port), 1, "the probe's SYN goes unanswered");
        let outcome = probing.await.expect("probe task");
        let waited = started.elapsed();
        assert_eq!(connecting_to(port), 0, "the abandoned connect is closed");
        assert!(
            waited >= SHORT_TIMEOUT && waited < LONG_TIMEOUT,
            "{waited:?}"
        );
        assert_eq!(text(outcome), "timeout after 300 ms");
    }

    #[tokio::test]
    async fn tcp_probe_follows_an_ipv6_address() {
        let listener = TcpListener::bind((Ipv6Addr::LOCALHOST, 0))
            .await
            .expect("IPv6 loopback (::1) is needed");
        let target = listener.local_addr().expect("address");
        assert!(probe_tcp(target, LONG_TIMEOUT).await.is_ok());
    }

    #[tokio::test]
    async fn http_200_is_up_and_sends_the_path_and_host() {
        let (port, mut seen) = http_server(answer("200 OK", "all ok"), None).await;
        let outcome = probe(&http(http_probe(Some("ok"))), at(port), LONG_TIMEOUT).await;
        assert_eq!(text(outcome), "success");
        let request = seen
            .recv()
            .await
            .expect("a request")
            .head
            .to_ascii_lowercase();
        assert!(
            request.starts_with("get /health?deep=1 http/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("\r\nhost: localhost\r\n"), "{request}");
    }

    #[tokio::test]
    async fn http_503_is_down() {
        let (port, _seen) = http_server(answer("503 Service Unavailable", ""), None).await;
        let outcome = probe(&http(http_probe(None)), at(port), LONG_TIMEOUT).await;
        assert_eq!(text(outcome), "HTTP 503");
    }

    #[tokio::test]
    async fn a_redirect_is_judged_by_its_status_not_followed() {
        let redirect = answer("302 Found\r\nlocation: /elsewhere", "");
        let (port, mut seen) = http_server(redirect, None).await;
        let accepts_redirects = probe(&http(http_probe(None)), at(port), LONG_TIMEOUT).await;
        assert_eq!(text(accepts_redirects), "success");
        let only_200 = HttpProbe {
            expect_status: StatusRange {
                first: 200,
                last: 200,
            },
            ..http_probe(None)
        };
        assert_eq!(
            text(probe(&http(only_200), at(port), LONG_TIMEOUT).await),
            "HTTP 302"
        );
        for _ in 0..2 {
            let request = seen.recv().await.expect("a request").head;
            assert!(request.starts_with("GET /health"), "{request}");
        }
        assert!(seen.try_recv().is_err(), "/elsewhere was requested");
    }

    #[tokio::test]
    async fn http_body_without_the_expected_text_is_down() {
        let (port, _seen) = http_server(answer("200 OK", "degraded"), None).await;
        let outcome = probe(&http(http_probe(Some("ok"))), at(port), LONG_TIMEOUT).await;
        assert_eq!(text(outcome), r#"body lacks "ok""#);
    }

    #[tokio::test]
    async fn http_without_an_answer_times_out_after_sending_the_request() {
        let (port, mut seen) = http_server(None, None).await;
        let probing =
            tokio::spawn(
                async move { probe(&http(http_probe(None)), at(port), SHORT_TIMEOUT).await },
            );
        within("the request", seen.recv()).await.expect("a request");
        let outcome = probing.await.expect("the probe");
        assert_eq!(text(outcome), "timeout after 300 ms");
    }

    #[tokio::test]
    async fn http_garbage_is_a_malformed_response() {
        let (port, _seen) = http_server(Some("SSH-2.0-OpenSSH\r\n\r\n".to_owned()), None).await;
        let outcome = probe(&http(http_probe(None)), at(port), LONG_TIMEOUT).await;
        assert_eq!(text(outcome), "HTTP: malformed response");
    }

    #[tokio::test]
    async fn https_self_signed_is_down_when_verified_and_up_when_not() {
        let (port, mut seen) = http_server(answer("200 OK", "ok"), Some(self_signed())).await;
        let verified = probe(&https(true), at(port), LONG_TIMEOUT).await;
        assert_eq!(text(verified), "TLS: certificate not trusted");
        let unverified = probe(&https(false), at(port), LONG_TIMEOUT).await;
        assert_eq!(text(unverified), "success");
        let request = seen.recv().await.expect("the unverified probe's request");
        assert_eq!(request.sni.as_deref(), Some("localhost"));
        assert!(
            seen.try_recv().is_err(),
            "the verified probe sent a request"
        );
    }

    #[tokio::test]
    async fn https_to_an_address_sends_no_sni() {
        let (port, mut seen) = http_server(answer("200 OK", "ok"), Some(self_signed())).await;
        let protocol = HealthProtocol::Https {
            http: HttpProbe {
                host: "127.0.0.1".to_owned(),
                ..http_probe(None)
            },
            tls_verify: false,
        };
        assert_eq!(
            text(probe(&protocol, at(port), LONG_TIMEOUT).await),
            "success"
        );
        let request = seen.recv().await.expect("a request");
        assert_eq!(request.sni, None);
        assert!(request.head.contains("host: 127.0.0.1\r\n"), "{request:?}");
    }

    /// An http server on the port, which answers the ClientHello with a 400.
    #[tokio::test]
    async fn https_against_plain_http_fails_the_handshake() {
        let (listener, port) = listen().await;
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut hello = [0; 512];
            let _ = stream.read(&mut hello).await.expect("the ClientHello");
            let refusal = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n";
            stream.write_all(refusal).await.expect("answer");
            pending::<()>().await;
        });
        let outcome = probe(&https(false), at(port), LONG_TIMEOUT).await;
        assert_eq!(text(outcome), "TLS: handshake failed");
    }

    fn udp(send: &str, expect: Option<&str>) -> HealthProtocol {
        HealthProtocol::Udp(UdpProbe {
            send: send.to_owned(),
            expect: expect.map(Arc::from),
        })
    }

    #[tokio::test]
    async fn udp_echo_is_up_over_ipv4_and_ipv6() {
        for ip in [LOOPBACK, IpAddr::V6(Ipv6Addr::LOCALHOST)] {
            let port = udp_echo(ip).await;
            let target = SocketAddr::new(ip, port);
            let outcome = probe(&udp("ping", Some("ping")), target, LONG_TIMEOUT).await;
            assert_eq!(text(outcome), "success", "{ip}");
        }
    }

    #[tokio::test]
    async fn udp_reply_without_the_expected_text_is_down() {
        let port = udp_echo(LOOPBACK).await;
        let outcome = probe(&udp("ping", Some("pong")), at(port), SHORT_TIMEOUT).await;
        assert_eq!(text(outcome), r#"reply lacks "pong""#);
    }

    #[tokio::test]
    async fn udp_empty_payload_is_sent_and_any_reply_will_do() {
        let port = udp_echo(LOOPBACK).await;
        assert_eq!(
            text(probe(&udp("", None), at(port), LONG_TIMEOUT).await),
            "success"
        );
    }

    #[tokio::test]
    async fn udp_without_a_reply_is_down_at_the_timeout() {
        let silent = UdpSocket::bind((LOOPBACK, 0)).await.expect("bind");
        let port = silent.local_addr().expect("address").port();
        let outcome = probe(&udp("ping", None), at(port), SHORT_TIMEOUT).await;
        assert_eq!(text(outcome), "no reply in 300 ms");
        let mut received = [0; 8];
        let len = silent
            .try_recv(&mut received)
            .expect("the probe's datagram");
        assert_eq!(&received[..len], b"ping");
    }

    #[tokio::test]
    async fn closed_udp_port_is_down_at_once_by_icmp() {
        let port = {
            let socket = UdpSocket::bind((LOOPBACK, 0)).await.expect("bind");
            socket.local_addr().expect("address").port()
        };
        let started = Instant::now();
        let outcome = probe(&udp("ping", None), at(port), LONG_TIMEOUT).await;
        let waited = started.elapsed();
        assert_eq!(text(outcome), "ICMP port unreachable");
        assert!(waited < Duration::from_secs(1), "{waited:?}");
    }

    /// This host has no SCTP sockets (`EPROTONOSUPPORT`); one that has them
    /// refuses the association to a closed port.
    #[tokio::test]
    async fn sctp_probe_fails_with_its_reason() {
        let outcome = probe(&HealthProtocol::Sctp, at(closed_port().await), LONG_TIMEOUT).await;
        let reason = text(outcome);
        assert!(
            reason == "no SCTP sockets on this host (kernel module not loaded?)"
                || reason == "connect refused",
            "{reason}"
        );
    }

    #[test]
    fn an_expected_text_is_found_across_chunks() {
        let mut search = Search::new(b"ok!");
        assert!(!search.feed(b"all o"));
        assert!(search.feed(b"k!"));
        let mut search = Search::new(b"ok!");
        assert!(!search.feed(b"o"));
        assert!(!search.feed(b"k"));
        assert!(search.feed(b"!"));
        let mut search = Search::new(b"ok");
        assert!(!search.feed(b"o"));
        assert!(!search.feed(b"xk"));
    }
}
