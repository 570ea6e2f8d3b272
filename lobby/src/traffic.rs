//! What the counters say, told in the log: a line per upstream with its
//! traffic since the last line, and a warning when an upstream that is
//! marked available answers new connections with resets. Runs on a task of
//! its own and reads stats the way `lobby stats` does, so that reading the
//! maps never holds up the loop that owns the state.
use std::{collections::BTreeMap, time::Duration};

use lobby_common::UpstreamCounters;
use tokio::{
    sync::{mpsc, oneshot},
    time::{Instant, MissedTickBehavior},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ctl::{self, Request, StatsReport};

/// How often counters are compared to catch an available upstream that
/// answers new connections with resets.
pub const RESET_CHECK: Duration = Duration::from_secs(2);
/// Fewer resets than this in one check are never worth a warning: a client
/// that aborts, or an upstream restarting its listener, resets a few.
const RESET_FLOOR: u64 = 3;
/// Resets must be at least this share (percent) of the new connections.
const RESET_SHARE_PERCENT: u64 = 10;

/// One upstream at one address, as counted.
type Key = (String, String, Option<String>, u16);

/// Logs until `cancel`: reset warnings every [`RESET_CHECK`], and traffic
/// lines every `traffic_interval` (never when `None`).
pub async fn watch(
    requests: mpsc::Sender<Request>,
    traffic_interval: Option<Duration>,
    cancel: CancellationToken,
) {
    let mut reset_check = tokio::time::interval_at(Instant::now() + RESET_CHECK, RESET_CHECK);
    reset_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let traffic_period = traffic_interval.unwrap_or(Duration::from_secs(3600));
    let mut traffic_log = tokio::time::interval_at(Instant::now() + traffic_period, traffic_period);
    traffic_log.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut resets_seen = BTreeMap::new();
    let mut traffic_seen = BTreeMap::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = reset_check.tick() => {
                let Some(now) = counted(&requests).await else { return };
                warn_about_resets(&resets_seen, &now);
                resets_seen = now;
            }
            _ = traffic_log.tick(), if traffic_interval.is_some() => {
                let Some(now) = counted(&requests).await else { return };
                log_traffic(&traffic_seen, &now);
                traffic_seen = now;
            }
        }
    }
}

/// Every upstream's counters and availability; `None` once the daemon
/// stops answering.
async fn counted(
    requests: &mpsc::Sender<Request>,
) -> Option<BTreeMap<Key, (bool, UpstreamCounters)>> {
    let (reply, answer) = oneshot::channel();
    requests.send(Request::Stats(reply)).await.ok()?;
    Some(by_upstream(&answer.await.ok()?))
}

fn by_upstream(report: &StatsReport) -> BTreeMap<Key, (bool, UpstreamCounters)> {
    report
        .targets
        .iter()
        .flat_map(|t| {
            t.upstreams.iter().map(|u| {
                let key = (t.name.clone(), u.name.clone(), u.address.clone(), u.port);
                let counters = UpstreamCounters {
                    connections: u.connections,
                    resets: u.resets,
                    packets_out: u.packets_out,
                    bytes_out: u.bytes_out,
                    packets_in: u.packets_in,
                    bytes_in: u.bytes_in,
                };
                (key, (u.available, counters))
            })
        })
        .collect()
}

/// Whether `delta` of an available upstream is a reason to warn: enough
/// resets, and a real share of the new connections.
fn resets_are_alarming(delta: &UpstreamCounters) -> bool {
    delta.resets >= RESET_FLOOR
        && delta.connections > 0
        && delta.resets * 100 >= delta.connections * RESET_SHARE_PERCENT
}

fn warn_about_resets(
    seen: &BTreeMap<Key, (bool, UpstreamCounters)>,
    now: &BTreeMap<Key, (bool, UpstreamCounters)>,
) {
    for (key @ (target, upstream, address, port), (available, counters)) in now {
        let delta = since(seen.get(key).map(|(_, c)| c), counters);
        if *available && resets_are_alarming(&delta) {
            warn!(
                upstream = %format!("{target}/{upstream}"),
                address = address.as_deref().unwrap_or("-"),
                port,
                "upstream {target}/{upstream} is marked available but answers new connections with resets ({} resets to {} new connections in {RESET_CHECK:?})",
                delta.resets,
                delta.connections,
            );
        }
    }
}

fn log_traffic(
    seen: &BTreeMap<Key, (bool, UpstreamCounters)>,
    now: &BTreeMap<Key, (bool, UpstreamCounters)>,
) {
    for (key @ (target, upstream, address, port), (_, counters)) in now {
        let Some(address) = address else { continue };
        let delta = since(seen.get(key).map(|(_, c)| c), counters);
        info!(
            upstream = %format!("{target}/{upstream}"),
            address = %format!("{address}:{port}"),
            "upstream {target}/{upstream} traffic: {} connections, {} resets, {} packets / {} out, {} packets / {} in",
            delta.connections,
            delta.resets,
            delta.packets_out,
            ctl::human_bytes(delta.bytes_out as f64),
            delta.packets_in,
            ctl::human_bytes(delta.bytes_in as f64),
        );
    }
}

/// What `now` gained since `before` (all of it when there is no before:
/// the upstream is new, or counted at a new address).
fn since(before: Option<&UpstreamCounters>, now: &UpstreamCounters) -> UpstreamCounters {
    let before = before.copied().unwrap_or_default();
    UpstreamCounters {
        connections: now.connections.saturating_sub(before.connections),
        resets: now.resets.saturating_sub(before.resets),
        packets_out: now.packets_out.saturating_sub(before.packets_out),
        bytes_out: now.bytes_out.saturating_sub(before.bytes_out),
        packets_in: now.packets_in.saturating_sub(before.packets_in),
        bytes_in: now.bytes_in.saturating_sub(before.bytes_in),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(connections: u64, resets: u64) -> UpstreamCounters {
        UpstreamCounters {
            connections,
            resets,
            ..Default::default()
        }
    }

    #[test]
    fn occasional_resets_under_load_are_not_alarming() {
        // The false alarm found by the hostile run: 2 resets in 1,381.
        assert!(!resets_are_alarming(&counters(1381, 2)));
        assert!(!resets_are_alarming(&counters(1000, 50)));
        assert!(!resets_are_alarming(&counters(0, 5)));
    }

    #[test]
    fn a_refusing_upstream_is_alarming() {
        assert!(resets_are_alarming(&counters(3, 3)));
        assert!(resets_are_alarming(&counters(1000, 100)));
    }

    #[test]
    fn deltas_start_over_without_a_previous_count() {
        assert_eq!(since(Some(&counters(5, 1)), &counters(8, 1)).connections, 3);
        assert_eq!(since(None, &counters(2, 0)).connections, 2);
    }
}
