//! Valid files parse to exactly the expected [`Config`], and the default
//! path is looked for in the documented order.
use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http::uri::PathAndQuery;
use lobby::config::{
    self, Config, Distribution, DnsConfig, EventsConfig, HealthCheck, HealthProtocol, Host,
    HttpProbe, IpNet, Limit, Limits, MetricsConfig, Protocol, Rate, StatusRange, Summary, Target,
    UdpProbe, Upstream, UpstreamGroup,
};

fn load(name: &str) -> Config {
    let path = Path::new("tests/data/config/valid").join(name);
    config::load(&path).unwrap_or_else(|errors| panic!("{errors}"))
}

fn ip(text: &str) -> Host {
    Host::Ip(text.parse().expect("an IPv4 address"))
}

fn fqdn(name: &str) -> Host {
    Host::Fqdn(name.to_owned())
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("a socket address")
}

fn target(
    name: &str,
    port: u16,
    ip: Option<IpNet>,
    group: &str,
    upstreams: Vec<Upstream>,
) -> Arc<Target> {
    Arc::new(Target {
        name: name.to_owned(),
        protocol: Protocol::Tcp,
        port,
        ip,
        group: UpstreamGroup {
            name: group.to_owned(),
            distribution: Distribution::RoundRobin,
            upstreams,
            persistence: None,
        },
        policy: Default::default(),
    })
}

fn upstream(name: &str, host: Host, port: u16) -> Upstream {
    Upstream {
        name: name.to_owned(),
        host,
        port,
        health_check: None,
        dns: None,
        weight: 1,
        backup: false,
        max_connections: None,
    }
}

/// A TCP check with `failure_count` 1 and `start_available` false unless
/// changed by the caller.
fn check(port: u16, interval: u64, timeout: u64, success_count: u32) -> HealthCheck {
    HealthCheck {
        protocol: HealthProtocol::Tcp,
        port,
        start_available: false,
        interval: Duration::from_secs(interval),
        timeout: Duration::from_secs(timeout),
        success_count,
        failure_count: 1,
    }
}

#[test]
fn an_original_lobby_file_loads_unchanged() {
    let expected = Config {
        metrics: None,
        events: None,
        acceleration: None,
        warnings: Vec::new(),
        nftables: Default::default(),
        targets: vec![
            target(
                "web",
                8081,
                None,
                "web-pool",
                vec![
                    Upstream {
                        health_check: Some(HealthCheck {
                            start_available: true,
                            ..check(9000, 2, 1, 3)
                        }),
                        ..upstream("web1", ip("198.18.1.11"), 9000)
                    },
                    Upstream {
                        dns: Some(DnsConfig {
                            servers: vec![addr("198.18.0.53:53"), addr("198.18.0.54:5353")],
                            ttl: Some(Duration::from_secs(30)),
                            all_addresses: false,
                        }),
                        ..upstream("web2", fqdn("web2.example.test"), 9000)
                    },
                    upstream("web3", ip("198.18.1.13"), 9000),
                ],
            ),
            target(
                "api",
                8082,
                None,
                "api-pool",
                vec![Upstream {
                    dns: Some(DnsConfig {
                        servers: vec![
                            addr("1.1.1.1:53"),
                            addr("[2606:4700::1111]:53"),
                            addr("[2001:db8::53]:5353"),
                        ],
                        ttl: None,
                        all_addresses: false,
                    }),
                    health_check: Some(check(8080, 10, 2, 5)),
                    ..upstream("api1", fqdn("api.example.test"), 8443)
                }],
            ),
        ],
    };
    let config = load("original.yaml");
    assert_eq!(config, expected);
    assert_eq!(
        config.summary(),
        Summary {
            targets: 2,
            upstreams: 4,
            health_checked: 2,
            fqdn: 2
        }
    );
    assert_eq!(
        config.summary().to_string(),
        "2 targets, 4 upstreams (2 health-checked, 2 FQDN)"
    );
}

#[test]
fn every_field_and_extension_loads() {
    let shared_check = check(8080, 5, 2, 2);
    let expected = Config {
        metrics: Some(MetricsConfig {
            listen: addr("[::1]:9091"),
        }),
        events: None,
        acceleration: None,
        warnings: Vec::new(),
        nftables: Default::default(),
        targets: vec![
            target(
                "web",
                443,
                Some(IpNet {
                    addr: Ipv4Addr::new(198, 18, 0, 10).into(),
                    prefix_len: 32,
                }),
                "web-pool",
                vec![
                    Upstream {
                        health_check: Some(shared_check.clone()),
                        dns: Some(DnsConfig {
                            servers: vec![
                                addr("198.18.0.53:53"),
                                addr("198.18.0.54:5353"),
                                addr("[2001:db8::53]:53"),
                                addr("[2001:db8::54]:5353"),
                            ],
                            ttl: Some(Duration::from_secs(60)),
                            all_addresses: false,
                        }),
                        ..upstream("web1", fqdn("web1.example.test"), 8443)
                    },
                    Upstream {
                        health_check: Some(HealthCheck {
                            start_available: true,
                            failure_count: 3,
                            ..shared_check
                        }),
                        ..upstream("web2", ip("198.18.1.12"), 8443)
                    },
                ],
            ),
            target(
                "dns-tcp",
                53,
                Some(IpNet {
                    addr: Ipv4Addr::new(198, 18, 0, 0).into(),
                    prefix_len: 24,
                }),
                "resolvers",
                vec![
                    upstream("r1", fqdn("resolver.example.test"), 53),
                    upstream("r2", fqdn("resolver.example.test"), 5353),
                ],
            ),
        ],
    };
    assert_eq!(load("full.yaml"), expected);
}

#[test]
fn an_empty_lb_list_is_a_lobby_with_nothing_to_balance() {
    let config = load("empty_lb.yaml");
    assert!(config.targets.is_empty());
    assert_eq!(
        config.summary().to_string(),
        "0 targets, 0 upstreams (0 health-checked, 0 FQDN)"
    );
}

/// The probe of each upstream of `config`, by upstream name.
#[test]
fn events_load_with_their_default_timeout() {
    let events = |name| load(name).events.expect("an events section");
    assert_eq!(
        events("events.yaml"),
        EventsConfig {
            command: Some(vec![
                "/usr/local/bin/lobby-notify".into(),
                "--retries".into(),
                "3".into(),
                "".into(),
            ]),
            webhook: Some(
                "https://alerts.example.test:8443/hooks/lobby?team=net"
                    .parse()
                    .unwrap()
            ),
            timeout: Duration::from_secs(5),
        }
    );
    assert_eq!(load("minimal.yaml").events, None);
}

#[test]
fn limits_replace_the_defaults_whole_and_a_burst_defaults_to_the_rate() {
    let config = load("limits.yaml");
    let limits: Vec<Limits> = config.targets.iter().map(|t| t.policy.limits).collect();
    let rate = |per_second, burst| Some(Rate { per_second, burst });
    assert_eq!(
        limits,
        [
            // The entry's defaults: one second's worth of burst.
            Limits {
                target: Limit {
                    rate: rate(1000, 1000),
                    max_connections: None,
                },
                per_source: Limit {
                    rate: rate(20, 40),
                    max_connections: Some(100),
                },
            },
            // Its own, whole: nothing of the defaults' per_source rate.
            Limits {
                target: Limit {
                    rate: rate(50, 10),
                    max_connections: Some(10000),
                },
                per_source: Limit {
                    rate: None,
                    max_connections: Some(10),
                },
            },
            // `limits: {}` lifts them.
            Limits::default(),
        ]
    );
    let caps: Vec<Option<u32>> = config
        .targets
        .iter()
        .flat_map(|t| &t.group.upstreams)
        .map(|u| u.max_connections)
        .collect();
    assert_eq!(caps, [Some(500), None, Some(5000), Some(5000), None]);
}

fn probes(config: &Config) -> Vec<(&str, &HealthProtocol)> {
    config
        .targets
        .iter()
        .flat_map(|target| &target.group.upstreams)
        .map(|upstream| {
            let check = upstream.health_check.as_ref().expect("a health check");
            (upstream.name.as_str(), &check.protocol)
        })
        .collect()
}

#[test]
fn each_probe_protocol_loads_with_its_keys_and_defaults() {
    let config = load("health_protocols.yaml");
    let http = |path: &'static str, host: &str, (first, last), expect: Option<&str>| HttpProbe {
        path: PathAndQuery::from_static(path),
        host: host.to_owned(),
        expect_status: StatusRange { first, last },
        expect: expect.map(Arc::from),
    };
    let udp = |send: &str, expect: Option<&str>| {
        HealthProtocol::Udp(UdpProbe {
            send: send.to_owned(),
            expect: expect.map(Arc::from),
        })
    };
    let expected = [
        (
            "http-all",
            HealthProtocol::Http(http(
                "/health?deep=1",
                "www.example.test",
                (200, 200),
                Some("ok"),
            )),
        ),
        (
            // The Host defaults to the upstream's host.
            "http-defaults",
            HealthProtocol::Http(http("/", "web2.example.test", (200, 399), None)),
        ),
        (
            "https-all",
            HealthProtocol::Https {
                http: http("/", "2001:db8::13", (200, 299), Some(r#""status": "up""#)),
                tls_verify: false,
            },
        ),
        (
            "https-defaults",
            HealthProtocol::Https {
                http: http("/", "198.18.1.14", (200, 204), None),
                tls_verify: true,
            },
        ),
        ("sctp", HealthProtocol::Sctp),
        ("udp-all", udp("ping\n", Some("pong"))),
        ("udp-defaults", udp("", None)),
    ];
    let expected: Vec<(&str, &HealthProtocol)> = expected
        .iter()
        .map(|(name, probe)| (*name, probe))
        .collect();
    assert_eq!(probes(&config), expected);
}

/// A fresh folder for one test, under cargo's temporary directory.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("etc")).expect("creating a scratch folder");
    dir
}

/// The default paths' shape, inside `dir`.
fn candidates(dir: &Path) -> Vec<PathBuf> {
    [
        "lobby.yaml",
        "etc/lobby.yaml",
        "lobby.conf",
        "etc/lobby.conf",
    ]
    .iter()
    .map(|name| dir.join(name))
    .collect()
}

#[test]
fn the_yaml_name_is_preferred_over_the_conf_name() {
    let dir = scratch("default-path-yaml");
    let candidates = candidates(&dir);
    fs::write(&candidates[2], "lb: []\n").expect("writing lobby.conf");
    assert_eq!(config::first_file(&candidates), Some(candidates[2].clone()));
    fs::write(&candidates[0], "lb: []\n").expect("writing lobby.yaml");
    assert_eq!(config::first_file(&candidates), Some(candidates[0].clone()));
}

#[test]
fn the_etc_file_is_found_when_there_is_none_here() {
    let dir = scratch("default-path-etc");
    let candidates = candidates(&dir);
    assert_eq!(config::first_file(&candidates), None);
    fs::write(&candidates[3], "lb: []\n").expect("writing etc/lobby.conf");
    assert_eq!(config::first_file(&candidates), Some(candidates[3].clone()));
    fs::write(&candidates[1], "lb: []\n").expect("writing etc/lobby.yaml");
    assert_eq!(config::first_file(&candidates), Some(candidates[1].clone()));
    // A folder by that name is not a configuration file.
    fs::create_dir_all(&candidates[0]).expect("creating a folder");
    assert_eq!(config::first_file(&candidates), Some(candidates[1].clone()));
}

#[test]
fn the_default_paths_are_the_documented_ones() {
    assert_eq!(
        config::DEFAULT_PATHS,
        [
            "./lobby.yaml",
            "/etc/lobby/lobby.yaml",
            "./lobby.conf",
            "/etc/lobby/lobby.conf"
        ]
    );
}
