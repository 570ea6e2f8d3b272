//! Upstream host names: resolves each name with its resolvers, strictly in
//! order, once per period however many upstreams use it, and reports the
//! address the upstreams should use.
//!
//! Each server is asked through its own single-server hickory resolver, so
//! that the order is ours (hickory's pool would race or reorder servers)
//! and a dead first server costs one short timeout. Caching is off: the
//! re-resolution period (`dns.ttl` or the answer's TTL) is Lobby's.
use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hickory_resolver::{
    Resolver,
    config::{
        ConnectionConfig, NameServerConfig, ProtocolConfig, ResolveHosts, ResolverConfig,
        ResolverOpts,
    },
    net::{DnsError, NetError, runtime::TokioRuntimeProvider},
    proto::{
        op::ResponseCode,
        rr::{Name, RData, RecordType},
    },
};
use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::config::{DnsConfig, unusable_upstream};

/// How long one server may take before the next is asked.
pub const SERVER_TIMEOUT: Duration = Duration::from_secs(1);
/// Bounds of the re-resolution period taken from an answer's TTL: a zero
/// TTL must not spin, a day-long one must not hide a move for a day.
pub const MIN_PERIOD: Duration = Duration::from_secs(1);
pub const MAX_PERIOD: Duration = Duration::from_secs(3600);
/// Back-off after a failed resolution: 1 s, doubling, at most 30 s (or the
/// period, when that is shorter).
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// Where the host's resolvers are listed; read at every resolution, so that
/// a changed file (or `ip netns exec`'s /etc/netns bind mount) is followed.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// One unit of resolution: upstreams with the same name, resolvers and TTL
/// override share it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResolverKey {
    pub name: String,
    /// Empty: the host's resolvers.
    pub servers: Vec<SocketAddr>,
    pub ttl: Option<Duration>,
}

impl ResolverKey {
    pub fn new(name: &str, dns: Option<&DnsConfig>) -> Self {
        Self {
            name: name.to_owned(),
            servers: dns.map(|d| d.servers.clone()).unwrap_or_default(),
            ttl: dns.and_then(|d| d.ttl),
        }
    }
}

/// The address upstreams of `key` should use from now on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressUpdate {
    pub key: ResolverKey,
    pub address: IpAddr,
}

/// Queries by result, for `lobby_dns_resolutions_total{result}`.
#[derive(Debug, Default)]
pub struct DnsStats {
    counts: [AtomicU64; QueryResult::ALL.len()],
}

impl DnsStats {
    fn record(&self, result: QueryResult) {
        self.counts[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// (result label, count) of every result.
    pub fn counts(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        QueryResult::ALL
            .iter()
            .map(|r| (r.label(), self.counts[*r as usize].load(Ordering::Relaxed)))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QueryResult {
    Success,
    Timeout,
    Servfail,
    Refused,
    Nxdomain,
    NoAddress,
    Malformed,
    Error,
}

impl QueryResult {
    const ALL: [Self; 8] = [
        Self::Success,
        Self::Timeout,
        Self::Servfail,
        Self::Refused,
        Self::Nxdomain,
        Self::NoAddress,
        Self::Malformed,
        Self::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Timeout => "timeout",
            Self::Servfail => "servfail",
            Self::Refused => "refused",
            Self::Nxdomain => "nxdomain",
            Self::NoAddress => "no_address",
            Self::Malformed => "malformed",
            Self::Error => "error",
        }
    }
}

/// Why one server gave no usable answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ServerFailure {
    #[error("timeout after {0:?}")]
    Timeout(Duration),
    #[error("SERVFAIL")]
    ServFail,
    #[error("REFUSED")]
    Refused,
    #[error("NXDOMAIN")]
    NxDomain,
    #[error("no A or AAAA record")]
    NoAddress,
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("{0}")]
    Other(String),
}

impl ServerFailure {
    fn result(&self) -> QueryResult {
        match self {
            Self::Timeout(_) => QueryResult::Timeout,
            Self::ServFail => QueryResult::Servfail,
            Self::Refused => QueryResult::Refused,
            Self::NxDomain => QueryResult::Nxdomain,
            Self::NoAddress => QueryResult::NoAddress,
            Self::Malformed(_) => QueryResult::Malformed,
            Self::Other(_) => QueryResult::Error,
        }
    }
}

/// A resolution in which no server answered usably.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("no answer from any server ({})", list(.0))]
    AllFailed(Vec<(SocketAddr, ServerFailure)>),
    #[error("no resolver in {RESOLV_CONF}: {0}")]
    NoSystemResolver(String),
}

fn list(failures: &[(SocketAddr, ServerFailure)]) -> String {
    let items: Vec<String> = failures
        .iter()
        .map(|(server, failure)| format!("{server}: {failure}"))
        .collect();
    items.join(", ")
}

/// A usable answer: its IPv4 addresses in the order given, and the
/// smallest TTL among them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub addresses: Vec<IpAddr>,
    pub ttl: Duration,
}

/// The address to use: the current one while the answer still holds it
/// (rotated answers do not move traffic), else the answer's first.
pub fn choose(current: Option<IpAddr>, addresses: &[IpAddr]) -> Option<IpAddr> {
    match current {
        Some(current) if addresses.contains(&current) => Some(current),
        _ => addresses.first().copied(),
    }
}

/// The addresses of an answer that can be balanced to, in order, and
/// those that cannot with why (a name that resolves to 127.0.0.1 would
/// black-hole its upstream's share of the connections).
pub fn usable(addresses: &[IpAddr]) -> (Vec<IpAddr>, Vec<(IpAddr, &'static str)>) {
    let mut usable = Vec::with_capacity(addresses.len());
    let mut skipped = Vec::new();
    for address in addresses {
        match unusable_upstream(*address) {
            Some(why) => skipped.push((*address, why)),
            None => usable.push(*address),
        }
    }
    (usable, skipped)
}

/// When to resolve again after a success: the configured TTL, else the
/// answer's within [`MIN_PERIOD`, `MAX_PERIOD`].
pub fn period(configured: Option<Duration>, answer_ttl: Duration) -> Duration {
    configured
        .unwrap_or(answer_ttl)
        .clamp(MIN_PERIOD, MAX_PERIOD)
}

/// The back-off after `failures` consecutive failed resolutions.
pub fn retry_delay(failures: u32, configured: Option<Duration>) -> Duration {
    let cap = configured.map_or(RETRY_MAX, |ttl| ttl.clamp(MIN_PERIOD, RETRY_MAX));
    RETRY_FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(cap)
}

/// One resolution: asks `servers` (or the host's resolvers when empty) in
/// order until one gives a usable answer. Every query is counted in `stats`.
pub async fn resolve(
    name: &str,
    servers: &[SocketAddr],
    stats: &DnsStats,
) -> Result<Answer, ResolveError> {
    let system;
    let servers = if servers.is_empty() {
        system = system_servers().await?;
        &system
    } else {
        servers
    };
    let mut failures = Vec::new();
    for server in servers {
        match query(name, *server).await {
            Ok(answer) => {
                stats.record(QueryResult::Success);
                if !failures.is_empty() {
                    debug!(name, server = %server, "answered after {}", list(&failures));
                }
                return Ok(answer);
            }
            Err(failure) => {
                stats.record(failure.result());
                debug!(name, server = %server, %failure, "no answer; asking the next server");
                failures.push((*server, failure));
            }
        }
    }
    Err(ResolveError::AllFailed(failures))
}

/// The nameservers of /etc/resolv.conf, in its order.
async fn system_servers() -> Result<Vec<SocketAddr>, ResolveError> {
    let text = tokio::fs::read(RESOLV_CONF)
        .await
        .map_err(|e| ResolveError::NoSystemResolver(e.to_string()))?;
    parse_resolv_conf(&text)
}

/// The nameservers of a resolv.conf text, each on port 53.
pub fn parse_resolv_conf(text: &[u8]) -> Result<Vec<SocketAddr>, ResolveError> {
    let (config, _) = hickory_resolver::system_conf::parse_resolv_conf(text)
        .map_err(|e| ResolveError::NoSystemResolver(e.to_string()))?;
    let mut servers: Vec<SocketAddr> = Vec::new();
    for server in config.name_servers() {
        let addr = SocketAddr::new(server.ip, 53);
        if !servers.contains(&addr) {
            servers.push(addr);
        }
    }
    if servers.is_empty() {
        return Err(ResolveError::NoSystemResolver(
            "no nameserver line".to_owned(),
        ));
    }
    Ok(servers)
}

/// Asks one server for the A records of `name` (taken as absolute: no
/// search domains), over UDP with TCP for truncated answers; a name with no
/// A record is asked for its AAAA records, so that an IPv6-only upstream
/// works. (A name with both serves IPv4 clients only, for now.)
async fn query(name: &str, server: SocketAddr) -> Result<Answer, ServerFailure> {
    match query_type(name, server, RecordType::A).await {
        Err(ServerFailure::NoAddress) => query_type(name, server, RecordType::AAAA).await,
        answer => answer,
    }
}

async fn query_type(
    name: &str,
    server: SocketAddr,
    record_type: RecordType,
) -> Result<Answer, ServerFailure> {
    let fqdn = Name::from_str(&format!("{}.", name.trim_end_matches('.')))
        .map_err(|e| ServerFailure::Other(format!("invalid name: {e}")))?;
    let connection = |protocol| {
        let mut connection = ConnectionConfig::new(protocol);
        connection.port = server.port();
        connection
    };
    let name_server = NameServerConfig::new(
        server.ip(),
        true,
        vec![
            connection(ProtocolConfig::Udp),
            connection(ProtocolConfig::Tcp),
        ],
    );
    let mut options = ResolverOpts::default();
    options.timeout = SERVER_TIMEOUT;
    options.attempts = 1;
    options.cache_size = 0;
    options.use_hosts_file = ResolveHosts::Never;
    options.num_concurrent_reqs = 1;
    let resolver = Resolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], vec![name_server]),
        TokioRuntimeProvider::default(),
    )
    .with_options(options)
    .build()
    .map_err(|e| ServerFailure::Other(e.to_string()))?;
    // hickory's own timeout covers one exchange; this bounds the whole.
    let lookup = tokio::time::timeout(SERVER_TIMEOUT * 2, resolver.lookup(fqdn, record_type))
        .await
        .map_err(|_| ServerFailure::Timeout(SERVER_TIMEOUT))?
        .map_err(classify)?;
    let mut addresses = Vec::new();
    let mut ttl = u32::MAX;
    for record in lookup.answers() {
        let address = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        if !addresses.contains(&address) {
            addresses.push(address);
        }
        ttl = ttl.min(record.ttl);
    }
    if addresses.is_empty() {
        return Err(ServerFailure::NoAddress);
    }
    Ok(Answer {
        addresses,
        ttl: Duration::from_secs(u64::from(ttl)),
    })
}

fn classify(error: NetError) -> ServerFailure {
    match error {
        NetError::Timeout => ServerFailure::Timeout(SERVER_TIMEOUT),
        NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)) => ServerFailure::ServFail,
        NetError::Dns(DnsError::ResponseCode(ResponseCode::Refused)) => ServerFailure::Refused,
        NetError::Dns(DnsError::ResponseCode(code)) => {
            ServerFailure::Other(format!("response code {code}"))
        }
        NetError::Dns(DnsError::NoRecordsFound(records))
            if records.response_code == ResponseCode::NXDomain =>
        {
            ServerFailure::NxDomain
        }
        NetError::Dns(DnsError::NoRecordsFound(_)) => ServerFailure::NoAddress,
        NetError::Proto(e) => ServerFailure::Malformed(e.to_string()),
        other => ServerFailure::Other(other.to_string()),
    }
}

/// Resolves `key` until `cancel`: once per period after a success, with
/// back-off after a failure. Sends an [`AddressUpdate`] whenever the chosen
/// address changes; a failure never takes an address away.
pub fn spawn_resolver(
    key: ResolverKey,
    updates: mpsc::Sender<AddressUpdate>,
    stats: Arc<DnsStats>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        let mut current: Option<IpAddr> = None;
        let mut failures: u32 = 0;
        // Said once, until the answer changes.
        let mut warned_skipped = Vec::new();
        loop {
            let next = match resolve(&key.name, &key.servers, &stats).await {
                Ok(answer) => {
                    failures = 0;
                    let (addresses, skipped) = usable(&answer.addresses);
                    if skipped != warned_skipped {
                        for (address, why) in &skipped {
                            warn!(name = %key.name, %address, "{} resolves to {address}, {why}: skipped", key.name);
                        }
                        warned_skipped = skipped;
                    }
                    let chosen = choose(current, &addresses);
                    if let Some(address) = chosen.filter(|a| Some(*a) != current) {
                        info!(name = %key.name, %address, "{} resolves to {address}", key.name);
                        current = Some(address);
                        if updates.send(AddressUpdate { key: key.clone(), address }).await.is_err() {
                            return; // the daemon is gone
                        }
                    }
                    period(key.ttl, answer.ttl)
                }
                Err(error) => {
                    failures += 1;
                    let delay = retry_delay(failures, key.ttl);
                    match current {
                        Some(address) => warn!(name = %key.name, "dns {}: {error}; keeping {address}, retrying in {delay:?}", key.name),
                        None => warn!(name = %key.name, "dns {}: {error}; its upstreams stay unavailable, retrying in {delay:?}", key.name),
                    }
                    delay
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(next) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 11));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 12));
    const C: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 13));

    #[test]
    fn addresses_no_connection_can_reach_are_skipped_with_why() {
        let loopback = IpAddr::from(Ipv4Addr::LOCALHOST);
        let multicast = IpAddr::from([0xff02, 0, 0, 0, 0, 0, 0, 1]);
        let unspecified = IpAddr::from(Ipv4Addr::UNSPECIFIED);
        let (addresses, skipped) = usable(&[loopback, A, unspecified, B, multicast]);
        assert_eq!(addresses, [A, B]);
        let skipped: Vec<IpAddr> = skipped.into_iter().map(|(address, _)| address).collect();
        assert_eq!(skipped, [loopback, unspecified, multicast]);
        // An answer of nothing usable chooses nothing: the current address
        // stays, as when the name stops resolving.
        let (addresses, _) = usable(&[loopback, Ipv4Addr::BROADCAST.into()]);
        assert_eq!(choose(Some(C), &addresses), None);
        assert_eq!(
            usable(&[loopback]).1[0].1,
            "a loopback address, which the kernel never forwards to"
        );
    }

    #[test]
    fn the_current_address_stays_while_answered() {
        assert_eq!(choose(None, &[A, B]), Some(A));
        assert_eq!(choose(Some(B), &[A, B]), Some(B));
        assert_eq!(choose(Some(B), &[B, A]), Some(B));
        assert_eq!(choose(Some(C), &[A, B]), Some(A));
        assert_eq!(choose(Some(C), &[]), None);
    }

    #[test]
    fn the_period_is_the_override_or_the_bounded_ttl() {
        assert_eq!(
            period(Some(Duration::from_secs(30)), Duration::from_secs(5)),
            Duration::from_secs(30)
        );
        assert_eq!(period(None, Duration::from_secs(5)), Duration::from_secs(5));
        assert_eq!(period(None, Duration::ZERO), MIN_PERIOD);
        assert_eq!(period(None, Duration::from_secs(86_400)), MAX_PERIOD);
    }

    #[test]
    fn retries_back_off_up_to_a_cap() {
        let delays: Vec<u64> = (1..=7).map(|n| retry_delay(n, None).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(
            retry_delay(9, Some(Duration::from_secs(5))),
            Duration::from_secs(5)
        );
        assert_eq!(retry_delay(u32::MAX, None), RETRY_MAX);
    }

    #[test]
    fn resolv_conf_servers_keep_their_order() {
        let text = b"# comment\nsearch example.test\nnameserver 198.18.0.53\nnameserver 2001:db8::53\nnameserver 198.18.0.53\n";
        let servers = parse_resolv_conf(text).unwrap();
        assert_eq!(
            servers,
            [
                "198.18.0.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
        assert!(parse_resolv_conf(b"search example.test\n").is_err());
    }

    #[test]
    fn keys_share_name_servers_and_ttl() {
        let dns = DnsConfig {
            servers: vec!["198.18.0.53:53".parse().unwrap()],
            ttl: Some(Duration::from_secs(30)),
        };
        assert_eq!(
            ResolverKey::new("web.test", Some(&dns)),
            ResolverKey::new("web.test", Some(&dns.clone()))
        );
        assert_ne!(
            ResolverKey::new("web.test", Some(&dns)),
            ResolverKey::new("web.test", None)
        );
    }
}
