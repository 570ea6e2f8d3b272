//! The choice of the dynamic distributions, part of the core: which of a
//! target's backends in rotation new connections go to, from what the
//! daemon measured. `least-connections`: those with the fewest established
//! connections per weight, counting as tied those within a count's noise
//! of the fewest (see [`tied`]; ties share, in proportion to their
//! weights: upstreams about equally loaded share new connections rather
//! than take turns receiving all of them for a second each);
//! `least-latency`: those whose health probes' smoothed round trip is
//! at most 1.5 times the lowest plus 1 ms (so that two equally fast
//! upstreams share rather than flap).
//!
//! A choice changes on new measures at most once per [`CHOICE_PERIOD`],
//! and only when the measures prefer other backends; a change of the
//! rotation itself (an upstream up, down, drained, a weight) rewrites the
//! target's chain anyway, so the choice is made again at once.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;

use super::AddressKey;
use crate::{
    config::{Distribution, Family, Protocol},
    model::{Backend, Desired, UpstreamId},
};

/// How often a target's choice may change on new measures, at most.
pub const CHOICE_PERIOD: Duration = Duration::from_secs(1);

/// How much slower than the fastest an upstream may be and still be picked
/// by `least-latency`: half as slow again, plus 1 ms for round trips too
/// short to compare (a LAN's are tens of microseconds apart).
fn within_band(latency: Duration, lowest: Duration) -> bool {
    latency <= lowest + lowest / 2 + LATENCY_SLACK
}

const LATENCY_SLACK: Duration = Duration::from_millis(1);

/// Whether `(count, weight)` is within a dump's noise of the least
/// loaded's, per weight: at most three standard deviations of a count of
/// that size (its square root, as for arrivals at random) or a quarter,
/// whichever is more, plus two connections above it. A strict minimum
/// sends a whole second's connections to whichever upstream a dump caught
/// lowest, and the next dump finds it highest; the counts of steady short
/// connections (a few to a few dozen) vary by more than a quarter from one
/// dump to the next.
fn tied((count, weight): (u64, u64), (least, least_weight): (u64, u64)) -> bool {
    let per_weight = |count: u64, weight: u64| count as f64 / weight.max(1) as f64;
    let fewest = per_weight(least, least_weight);
    per_weight(count, weight) <= fewest + (3.0 * fewest.sqrt()).max(fewest / 4.0) + 2.0
}

/// What the daemon measured, as an [`super::Event::Measured`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Measures {
    /// Established connections per backend, from one conntrack dump: a
    /// backend missing from it has none.
    Established(BTreeMap<Backend, u64>),
    /// The smoothed probe round trip of each health-checked address of an
    /// upstream (each has its own checker); one without a successful probe
    /// yet is missing.
    Latency(BTreeMap<(UpstreamId, AddressKey), Duration>),
}

/// The measures and the choices made from them.
#[derive(Debug, Default)]
pub(super) struct Selection {
    /// `None` until the first dump: every backend in rotation is taken.
    established: Option<BTreeMap<Backend, u64>>,
    /// By target and backend.
    latency: BTreeMap<(String, SocketAddr), Duration>,
    choices: BTreeMap<(String, Family), Choice>,
}

#[derive(Debug)]
struct Choice {
    distribution: Distribution,
    protocol: Protocol,
    /// The backends in rotation when the choice was made, with their
    /// weights (slots).
    rotation: BTreeMap<SocketAddr, u32>,
    chosen: BTreeSet<SocketAddr>,
    at: Instant,
    /// The measures prefer other backends, which the choice takes from
    /// `at + CHOICE_PERIOD`.
    pending: bool,
}

impl Selection {
    pub(super) fn record_established(&mut self, established: BTreeMap<Backend, u64>) {
        self.established = Some(established);
    }

    /// `latency` keyed by target and backend.
    pub(super) fn record_latency(&mut self, latency: BTreeMap<(String, SocketAddr), Duration>) {
        self.latency = latency;
    }

    /// Whether the measures now prefer other backends for some choice.
    pub(super) fn reconsider(&self) -> bool {
        self.choices
            .iter()
            .any(|((target, _), choice)| self.preferred(target, choice) != choice.chosen)
    }

    /// When a choice that waits for its period may change.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.choices
            .values()
            .filter(|c| c.pending)
            .map(|c| c.at + CHOICE_PERIOD)
            .min()
    }

    /// The established connections last counted toward `backend`; `None`
    /// before the first count.
    pub(super) fn established(&self, backend: &Backend) -> Option<u64> {
        self.established
            .as_ref()
            .map(|counts| counts.get(backend).copied().unwrap_or(0))
    }

    /// Narrows the rotations of the dynamic targets of `desired` to the
    /// backends chosen at `now`.
    pub(super) fn narrow(&mut self, desired: &mut Desired, now: Instant) {
        let mut kept = BTreeSet::new();
        for (name, target) in &mut desired.targets {
            if !target.distribution.is_dynamic() {
                continue;
            }
            let mut narrowed_slots = Vec::new();
            for rotation in &target.families {
                let key = (name.clone(), rotation.family);
                let mut weights: BTreeMap<SocketAddr, u32> = BTreeMap::new();
                for slot in &rotation.slots {
                    *weights.entry(*slot).or_default() += 1;
                }
                let fresh = Choice {
                    distribution: target.distribution,
                    protocol: target.protocol,
                    rotation: weights,
                    chosen: BTreeSet::new(),
                    at: now,
                    pending: false,
                };
                let preferred = self.preferred(name, &fresh);
                let choice = match self.choices.remove(&key) {
                    Some(mut choice)
                        if choice.rotation == fresh.rotation
                            && choice.distribution == fresh.distribution
                            && choice.protocol == fresh.protocol =>
                    {
                        if choice.chosen == preferred {
                            choice.pending = false;
                        } else if now >= choice.at + CHOICE_PERIOD {
                            choice.chosen = preferred;
                            choice.at = now;
                            choice.pending = false;
                        } else {
                            choice.pending = true;
                        }
                        choice
                    }
                    _ => Choice {
                        chosen: preferred,
                        ..fresh
                    },
                };
                narrowed_slots.push(narrowed(&rotation.slots, &choice.chosen));
                self.choices.insert(key.clone(), choice);
                kept.insert(key);
            }
            // A copy only of a target whose rotation the choice narrows.
            if target.families.iter().map(|f| &f.slots).ne(&narrowed_slots) {
                let target = Arc::make_mut(target);
                for (rotation, slots) in target.families.iter_mut().zip(narrowed_slots) {
                    rotation.slots = slots;
                }
            }
        }
        self.choices.retain(|key, _| kept.contains(key));
    }

    /// The backends of `choice`'s rotation the measures prefer now.
    fn preferred(&self, target: &str, choice: &Choice) -> BTreeSet<SocketAddr> {
        let all = || choice.rotation.keys().copied().collect();
        match choice.distribution {
            Distribution::LeastConnections => {
                let Some(established) = &self.established else {
                    return all();
                };
                let load = |backend: &SocketAddr| {
                    let count = established
                        .get(&(*backend, choice.protocol))
                        .copied()
                        .unwrap_or(0);
                    (count, u64::from(choice.rotation[backend]))
                };
                let Some(least) = fewest(choice.rotation.keys().map(load)) else {
                    return BTreeSet::new();
                };
                choice
                    .rotation
                    .keys()
                    .filter(|b| tied(load(b), least))
                    .copied()
                    .collect()
            }
            Distribution::LeastLatency => {
                let measured: Vec<(SocketAddr, Duration)> = choice
                    .rotation
                    .keys()
                    .filter_map(|b| Some((*b, *self.latency.get(&(target.to_owned(), *b))?)))
                    .collect();
                let Some(lowest) = measured.iter().map(|(_, l)| *l).min() else {
                    return all();
                };
                measured
                    .into_iter()
                    .filter(|(_, latency)| within_band(*latency, lowest))
                    .map(|(b, _)| b)
                    .collect()
            }
            Distribution::RoundRobin | Distribution::Random | Distribution::IpSrcHash => all(),
        }
    }
}

/// The least `(count, weight)` of `loads` per weight, compared without
/// division.
fn fewest(loads: impl Iterator<Item = (u64, u64)>) -> Option<(u64, u64)> {
    loads.min_by(|a, b| {
        (u128::from(a.0) * u128::from(b.1)).cmp(&(u128::from(b.0) * u128::from(a.1)))
    })
}

/// `slots` with only the `chosen` backends, in their order, their shares
/// reduced by the common divisor: 2:2 of the rotation is 1:1 among them.
fn narrowed(slots: &[SocketAddr], chosen: &BTreeSet<SocketAddr>) -> Vec<SocketAddr> {
    let mut counts: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for slot in slots.iter().filter(|s| chosen.contains(s)) {
        *counts.entry(*slot).or_default() += 1;
    }
    let divisor = counts.values().fold(0, |a, b| gcd(a, *b)).max(1);
    let mut left: BTreeMap<SocketAddr, usize> =
        counts.into_iter().map(|(b, n)| (b, n / divisor)).collect();
    slots
        .iter()
        .filter(|slot| match left.get_mut(slot) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        })
        .copied()
        .collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::{fewest, tied};

    fn tied_with_fewest(loads: &[(u64, u64)]) -> Vec<usize> {
        let least = fewest(loads.iter().copied()).unwrap();
        (0..loads.len())
            .filter(|i| tied(loads[*i], least))
            .collect()
    }

    #[test]
    fn counts_within_a_dumps_noise_of_the_fewest_are_tied() {
        // The case: 20 held on the first, the others free.
        assert_eq!(tied_with_fewest(&[(20, 1), (0, 1), (1, 1)]), [1, 2]);
        // Steady short connections: counts a dump apart share.
        assert_eq!(tied_with_fewest(&[(11, 1), (10, 1), (12, 1)]), [0, 1, 2]);
        assert_eq!(tied_with_fewest(&[(3, 1), (9, 1), (5, 1)]), [0, 1, 2]);
        assert_eq!(tied_with_fewest(&[(21, 1), (7, 1), (1, 1)]), [2]);
        // Large counts: a quarter.
        assert_eq!(tied_with_fewest(&[(1000, 1), (1240, 1), (1300, 1)]), [0, 1]);
        // Per weight: 30 on weight 3 is 10 a weight, as loaded as 10 on 1.
        assert_eq!(tied_with_fewest(&[(30, 3), (10, 1), (40, 1)]), [0, 1]);
    }
}
