//! The connection-tracking table as the daemon's network namespace sees
//! it: how full it is, and a warning before it fills up. A full table
//! drops every new client connection; health probes need no entry (their
//! sockets' mark exempts them, see `nft`), so upstreams keep their state
//! and the warning names the cause.
use std::{fmt, path::Path, time::Duration};

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

const COUNT: &str = "/proc/sys/net/netfilter/nf_conntrack_count";
const MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// How often the table's fill is looked at.
const CHECK_PERIOD: Duration = Duration::from_secs(5);
/// How often a table that stays near full says so again, at most.
const WARNING_PERIOD: Duration = Duration::from_secs(60);

/// Entries in the table and how many it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub entries: u64,
    pub max: u64,
}

impl Usage {
    /// Above 90% of the maximum.
    fn near_full(self) -> bool {
        u128::from(self.entries) * 10 > u128::from(self.max) * 9
    }
}

/// The table's usage now; `None` when the kernel tracks no connections
/// here (nf_conntrack not loaded) or the files cannot be read.
pub fn read() -> Option<Usage> {
    let number = |path: &str| -> Option<u64> {
        std::fs::read_to_string(Path::new(path))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    Some(Usage {
        entries: number(COUNT)?,
        max: number(MAX)?,
    })
}

/// What to tell the operator about one reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    NearFull(Usage),
    /// Back to 90% or below after a warning.
    Recovered(Usage),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::NearFull(u) => write!(
                f,
                "conntrack table nearly full ({} of {} entries): new client connections will be dropped when it is full (health probes are exempt); raise net.netfilter.nf_conntrack_max",
                u.entries, u.max
            ),
            Verdict::Recovered(u) => write!(
                f,
                "conntrack table below 90% again ({} of {} entries)",
                u.entries, u.max
            ),
        }
    }
}

/// The rate limit of the warning: said when the table crosses 90%, again
/// at most every [`WARNING_PERIOD`] while it stays there, and once more
/// when it is back below. No I/O, no clock.
#[derive(Debug, Default)]
pub struct Watch {
    warned_at: Option<Instant>,
}

impl Watch {
    pub fn check(&mut self, usage: Usage, now: Instant) -> Option<Verdict> {
        match (usage.near_full(), self.warned_at) {
            (true, Some(at)) if now.duration_since(at) < WARNING_PERIOD => None,
            (true, _) => {
                self.warned_at = Some(now);
                Some(Verdict::NearFull(usage))
            }
            (false, Some(_)) => {
                self.warned_at = None;
                Some(Verdict::Recovered(usage))
            }
            (false, None) => None,
        }
    }
}

/// Looks at the table every [`CHECK_PERIOD`] until `cancel`, logging what
/// [`Watch`] says.
pub async fn watch(cancel: CancellationToken) {
    let mut watch = Watch::default();
    let mut tick = tokio::time::interval(CHECK_PERIOD);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(usage) = tokio::task::spawn_blocking(read).await.ok().flatten() else {
            continue;
        };
        match watch.check(usage, Instant::now()) {
            Some(verdict @ Verdict::NearFull(_)) => {
                warn!(entries = usage.entries, max = usage.max, "{verdict}")
            }
            Some(verdict @ Verdict::Recovered(_)) => {
                info!(entries = usage.entries, max = usage.max, "{verdict}")
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(entries: u64) -> Usage {
        Usage { entries, max: 1000 }
    }

    #[test]
    fn near_full_is_above_ninety_percent() {
        assert!(!usage(900).near_full());
        assert!(usage(901).near_full());
        assert!(usage(1000).near_full());
        assert!(!Usage { entries: 0, max: 0 }.near_full());
        assert!(
            Usage {
                entries: u64::MAX,
                max: u64::MAX
            }
            .near_full()
        );
    }

    #[test]
    fn a_full_table_warns_once_a_period_then_says_it_recovered() {
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut watch = Watch::default();
        assert_eq!(watch.check(usage(500), at(0)), None);
        assert_eq!(
            watch.check(usage(950), at(5)),
            Some(Verdict::NearFull(usage(950)))
        );
        assert_eq!(watch.check(usage(990), at(10)), None);
        assert_eq!(watch.check(usage(990), at(64)), None);
        assert_eq!(
            watch.check(usage(999), at(65)),
            Some(Verdict::NearFull(usage(999)))
        );
        assert_eq!(
            watch.check(usage(800), at(70)),
            Some(Verdict::Recovered(usage(800)))
        );
        assert_eq!(watch.check(usage(800), at(75)), None);
        // Crossing again warns at once.
        assert_eq!(
            watch.check(usage(910), at(80)),
            Some(Verdict::NearFull(usage(910)))
        );
    }

    #[test]
    fn the_warning_names_the_table_its_fill_and_the_knob() {
        let text = Verdict::NearFull(usage(950)).to_string();
        assert!(
            text.starts_with("conntrack table nearly full (950 of 1000 entries)")
                && text.contains("nf_conntrack_max"),
            "{text}"
        );
    }
}
