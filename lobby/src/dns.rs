//! Upstream host names: resolves each name (A and AAAA) with its resolvers,
//! strictly in order, once per period however many upstreams use it, and
//! reports the usable addresses of the answer; which of them each upstream
//! takes ([`choose`]) is the reconcile core's decision.
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

use crate::config::{DnsConfig, Family, unusable_upstream};

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

/// The addresses upstreams of `key` choose from from now on: the usable
/// addresses of the latest answer, in its order (IPv4 first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressUpdate {
    pub key: ResolverKey,
    pub addresses: Vec<IpAddr>,
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

/// A usable answer: its IPv4 then its IPv6 addresses in the order given,
/// and the smallest TTL among them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub addresses: Vec<IpAddr>,
    pub ttl: Duration,
    /// A family whose query failed while the other's was answered: its
    /// addresses are unknown, not gone.
    pub unknown: Option<Family>,
}

/// The addresses an upstream uses out of `answer`, given those it uses
/// now: every one with `all_addresses`; else one of each family, the
/// current one while the answer still holds it (rotated answers do not
/// move traffic), else the family's first. IPv4 first.
pub fn choose(current: &[IpAddr], answer: &[IpAddr], all_addresses: bool) -> Vec<IpAddr> {
    let mut chosen: Vec<IpAddr> = if all_addresses {
        answer.to_vec()
    } else {
        Family::BOTH
            .into_iter()
            .filter_map(|family| {
                let of_family = || answer.iter().filter(move |a| Family::of(**a) == family);
                current
                    .iter()
                    .find(|c| Family::of(**c) == family && of_family().any(|a| a == *c))
                    .or_else(|| of_family().next())
                    .copied()
            })
            .collect()
    };
    chosen.sort_by_key(|a| (Family::of(*a), *a));
    chosen.dedup();
    chosen
}

/// The addresses to report after an answer: its usable ones, and those of
/// `previous` of a family the answer could not say (a failed AAAA query
/// takes no IPv6 address away, as a failed resolution takes none).
pub fn merge(previous: &[IpAddr], usable: &[IpAddr], unknown: Option<Family>) -> Vec<IpAddr> {
    let kept = previous
        .iter()
        .filter(|a| Some(Family::of(**a)) == unknown && !usable.contains(a));
    usable.iter().chain(kept).copied().collect()
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

/// Asks one server for the A and the AAAA records of `name` (taken as
/// absolute: no search domains) at once, over UDP with TCP for truncated
/// answers.
async fn query(name: &str, server: SocketAddr) -> Result<Answer, ServerFailure> {
    let fqdn = Name::from_str(&format!("{}.", name.trim_end_matches('.')))
        .map_err(|e| ServerFailure::Other(format!("invalid name: {e}")))?;
    let resolver = resolver_for(server)?;
    let (a, aaaa) = tokio::join!(
        query_type(&resolver, fqdn.clone(), RecordType::A),
        query_type(&resolver, fqdn, RecordType::AAAA)
    );
    combine(a, aaaa)
}

/// One server's answer from its answers to the A and the AAAA query: a
/// family without records adds none; when one query failed outright and
/// the other brought records, the failed family is unknown.
fn combine(
    a: Result<Answer, ServerFailure>,
    aaaa: Result<Answer, ServerFailure>,
) -> Result<Answer, ServerFailure> {
    match (a, aaaa) {
        (Ok(a), Ok(aaaa)) => Ok(Answer {
            addresses: a.addresses.into_iter().chain(aaaa.addresses).collect(),
            ttl: a.ttl.min(aaaa.ttl),
            unknown: None,
        }),
        (Ok(answer), Err(ServerFailure::NoAddress))
        | (Err(ServerFailure::NoAddress), Ok(answer)) => Ok(answer),
        (Ok(answer), Err(_)) => Ok(Answer {
            unknown: Some(Family::Ipv6),
            ..answer
        }),
        (Err(_), Ok(answer)) => Ok(Answer {
            unknown: Some(Family::Ipv4),
            ..answer
        }),
        (Err(ServerFailure::NoAddress), Err(failure)) | (Err(failure), Err(_)) => Err(failure),
    }
}

/// A resolver that asks `server` alone, once, without a cache.
fn resolver_for(server: SocketAddr) -> Result<Resolver<TokioRuntimeProvider>, ServerFailure> {
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
    Resolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], vec![name_server]),
        TokioRuntimeProvider::default(),
    )
    .with_options(options)
    .build()
    .map_err(|e| ServerFailure::Other(e.to_string()))
}

async fn query_type(
    resolver: &Resolver<TokioRuntimeProvider>,
    fqdn: Name,
    record_type: RecordType,
) -> Result<Answer, ServerFailure> {
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
        unknown: None,
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
/// back-off after a failure. Sends an [`AddressUpdate`] whenever the set of
/// usable addresses changes; a failure never takes an address away, nor
/// does an answer with none usable.
pub fn spawn_resolver(
    key: ResolverKey,
    updates: mpsc::Sender<AddressUpdate>,
    stats: Arc<DnsStats>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        // What the last update said.
        let mut current: Vec<IpAddr> = Vec::new();
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
                    let addresses = merge(&current, &addresses, answer.unknown);
                    if !addresses.is_empty() && !same_set(&addresses, &current) {
                        let list = join(&addresses);
                        info!(name = %key.name, addresses = %list, "{} resolves to {list}", key.name);
                        current.clone_from(&addresses);
                        if updates.send(AddressUpdate { key: key.clone(), addresses }).await.is_err() {
                            return; // the daemon is gone
                        }
                    }
                    period(key.ttl, answer.ttl)
                }
                Err(error) => {
                    failures += 1;
                    let delay = retry_delay(failures, key.ttl);
                    if current.is_empty() {
                        warn!(name = %key.name, "dns {}: {error}; its upstreams stay unavailable, retrying in {delay:?}", key.name);
                    } else {
                        warn!(name = %key.name, "dns {}: {error}; keeping {}, retrying in {delay:?}", key.name, join(&current));
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

/// Whether two lists hold the same addresses, whatever their order.
fn same_set(a: &[IpAddr], b: &[IpAddr]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x))
}

fn join(addresses: &[IpAddr]) -> String {
    let shown: Vec<String> = addresses.iter().map(ToString::to_string).collect();
    shown.join(", ")
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
        assert!(addresses.is_empty());
        assert_eq!(
            usable(&[loopback]).1[0].1,
            "a loopback address, which the kernel never forwards to"
        );
    }

    const A6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x11));
    const B6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, 0x12));

    #[test]
    fn the_current_address_of_each_family_stays_while_answered() {
        assert_eq!(choose(&[], &[A, B], false), [A]);
        assert_eq!(choose(&[B], &[A, B], false), [B]);
        assert_eq!(choose(&[B], &[B, A], false), [B]);
        assert_eq!(choose(&[C], &[A, B], false), [A]);
        assert!(choose(&[C], &[], false).is_empty());
        // One of each family, IPv4 first whatever the answer's order.
        assert_eq!(choose(&[], &[A6, B6, A, B], false), [A, A6]);
        assert_eq!(choose(&[B, B6], &[A, B, A6, B6], false), [B, B6]);
        // An A-only answer grows an AAAA: the IPv4 address stays.
        assert_eq!(choose(&[B], &[A, B, B6], false), [B, B6]);
        assert_eq!(choose(&[B, B6], &[B], false), [B]);
    }

    #[test]
    fn all_addresses_takes_the_whole_answer_in_a_stable_order() {
        assert_eq!(choose(&[], &[C, A6, A, B], true), [A, B, C, A6]);
        assert_eq!(choose(&[A, B, C], &[B, C], true), [B, C]);
        assert_eq!(choose(&[A], &[B, A, B], true), [A, B]);
    }

    #[test]
    fn a_family_whose_query_failed_keeps_its_addresses() {
        assert_eq!(merge(&[A, A6], &[B], Some(Family::Ipv6)), [B, A6]);
        assert_eq!(merge(&[A, A6], &[B], None), [B]);
        assert_eq!(merge(&[A, A6], &[A6, B6], Some(Family::Ipv4)), [A6, B6, A]);
        assert!(same_set(&[A, B], &[B, A]));
        assert!(!same_set(&[A, B], &[A]));
    }

    fn answer(addresses: &[IpAddr], ttl: u64) -> Result<Answer, ServerFailure> {
        Ok(Answer {
            addresses: addresses.to_vec(),
            ttl: Duration::from_secs(ttl),
            unknown: None,
        })
    }

    #[test]
    fn a_server_answers_for_both_families_or_says_which_it_could_not() {
        let both = combine(answer(&[A], 30), answer(&[A6], 10)).unwrap();
        assert_eq!(
            (both.addresses, both.ttl),
            (vec![A, A6], Duration::from_secs(10))
        );
        let v4_only = combine(answer(&[A], 30), Err(ServerFailure::NoAddress)).unwrap();
        assert_eq!((v4_only.addresses, v4_only.unknown), (vec![A], None));
        let v6_only = combine(Err(ServerFailure::NoAddress), answer(&[A6], 30)).unwrap();
        assert_eq!((v6_only.addresses, v6_only.unknown), (vec![A6], None));
        let aaaa_timed_out = combine(answer(&[A], 30), Err(ServerFailure::ServFail)).unwrap();
        assert_eq!(aaaa_timed_out.unknown, Some(Family::Ipv6));
        assert_eq!(
            combine(Err(ServerFailure::NoAddress), Err(ServerFailure::NoAddress)),
            Err(ServerFailure::NoAddress)
        );
        assert_eq!(
            combine(Err(ServerFailure::NoAddress), Err(ServerFailure::ServFail)),
            Err(ServerFailure::ServFail)
        );
        assert_eq!(
            combine(Err(ServerFailure::NxDomain), Err(ServerFailure::NxDomain)),
            Err(ServerFailure::NxDomain)
        );
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
            all_addresses: false,
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
