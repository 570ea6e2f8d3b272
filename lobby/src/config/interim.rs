// INTERIM (not committed): minimal loader until the config branch lands.
use super::*;
use std::path::{Path, PathBuf};
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigErrors(pub String);
#[derive(serde::Deserialize)]
struct RawFile {
    lb: Vec<RawLb>,
}
#[derive(serde::Deserialize)]
struct RawLb {
    targets: Vec<RawTarget>,
}
#[derive(serde::Deserialize)]
struct RawTarget {
    name: String,
    port: u16,
    upstream_group: RawGroup,
}
#[derive(serde::Deserialize)]
struct RawGroup {
    name: String,
    upstreams: Vec<RawUp>,
}
#[derive(serde::Deserialize)]
struct RawUp {
    name: String,
    host: String,
    port: u16,
    health_check: Option<RawHc>,
}
#[derive(serde::Deserialize)]
struct RawHc {
    port: u16,
    start_available: bool,
    probe: RawProbe,
}
#[derive(serde::Deserialize)]
struct RawProbe {
    check_interval: u64,
    timeout: u64,
    success_count: u32,
}
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors(e.to_string()))?;
    let raw: RawFile = serde_norway::from_str(&text).map_err(|e| ConfigErrors(e.to_string()))?;
    Ok(Config {
        metrics: None,
        targets: raw
            .lb
            .into_iter()
            .flat_map(|l| l.targets)
            .map(|t| Target {
                name: t.name,
                protocol: Protocol::Tcp,
                port: t.port,
                ip: None,
                group: UpstreamGroup {
                    name: t.upstream_group.name,
                    distribution: Distribution::RoundRobin,
                    upstreams: t
                        .upstream_group
                        .upstreams
                        .into_iter()
                        .map(|u| Upstream {
                            name: u.name,
                            host: u.host.parse().map(Host::Ip).unwrap_or(Host::Fqdn(u.host)),
                            port: u.port,
                            dns: None,
                            health_check: u.health_check.map(|h| HealthCheck {
                                protocol: Protocol::Tcp,
                                port: h.port,
                                start_available: h.start_available,
                                interval: std::time::Duration::from_secs(h.probe.check_interval),
                                timeout: std::time::Duration::from_secs(h.probe.timeout),
                                success_count: h.probe.success_count,
                                failure_count: 1,
                            }),
                        })
                        .collect(),
                },
            })
            .collect(),
    })
}
pub fn find_default_path() -> Option<PathBuf> {
    None
}
