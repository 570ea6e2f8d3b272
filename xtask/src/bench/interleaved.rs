//! Ratios of connection rates that decide a goal, measured by
//! interleaving: both variants set up at once, then short slices of
//! traffic through one and the other in turn (ABBA), so that what drifts
//! on a shared machine over seconds (steal, other tenants, the page
//! cache) hits both alike. The round robin of the main rounds puts a
//! variant's run minutes from its anchor's; back-to-back fresh setups
//! still differ by the setup (placement of 32 client threads on two
//! cores). Both are measured here: a round is fresh setups of the two,
//! one warm-up slice each (neighbours, caches), then `slices` pairs; its
//! ratio is the sum of one's slices over the other's, and the interval is
//! over rounds, so it covers the setups' spread too.
use std::time::Duration;

use super::{
    connection_rate,
    stats::{Ratio, median},
    variants::{Setup, Variant},
};

/// (what, measured, anchor, goal)
pub type Pair = (&'static str, Variant, Variant, &'static str);

/// The goal ratios between variants of the data plane.
pub const PAIRS: [Pair; 21] = [
    (
        "block list of 100,000 prefixes: Lobby conn/s / Lobby without",
        Variant::LobbyBlockList,
        Variant::Lobby,
        ">= 0.97",
    ),
    (
        "counters: conn/s with / without",
        Variant::Lobby,
        Variant::LobbyWithoutCounters,
        ">= 0.97",
    ),
    (
        "Lobby conn/s / raw nft DNAT",
        Variant::Lobby,
        Variant::RawNft,
        ">= 0.97",
    ),
    // The hand-written rulesets count nothing: the ruleset alone, to
    // tell its cost from the counters'.
    (
        "Lobby without counters conn/s / raw nft DNAT",
        Variant::LobbyWithoutCounters,
        Variant::RawNft,
        "-",
    ),
    // Like with like: the hand-written ruleset counting per upstream what
    // Lobby's programs count, in nft; and what that counting costs it.
    (
        "Lobby conn/s / raw nft DNAT counting per upstream in nft",
        Variant::Lobby,
        Variant::RawNftCounted,
        "-",
    ),
    (
        "raw nft DNAT counting per upstream in nft conn/s / raw nft DNAT",
        Variant::RawNftCounted,
        Variant::RawNft,
        "-",
    ),
    (
        "random: Lobby conn/s / raw nft numgen random",
        Variant::LobbyRandom,
        Variant::RawNftRandom,
        ">= 0.97",
    ),
    (
        "random: Lobby conn/s / raw nft numgen random counting per upstream in nft",
        Variant::LobbyRandom,
        Variant::RawNftRandomCounted,
        "-",
    ),
    (
        "random: Lobby conn/s / Lobby round-robin",
        Variant::LobbyRandom,
        Variant::Lobby,
        ">= 0.97",
    ),
    (
        "ip-src-hash: Lobby conn/s / raw nft jhash",
        Variant::LobbySourceHash,
        Variant::RawNftSourceHash,
        ">= 0.97",
    ),
    (
        "ip-src-hash: Lobby conn/s / raw nft jhash counting per upstream in nft",
        Variant::LobbySourceHash,
        Variant::RawNftSourceHashCounted,
        "-",
    ),
    (
        "weights 3:1:1: Lobby conn/s / raw nft numgen inc over 5 slots",
        Variant::LobbyWeighted,
        Variant::RawNftWeighted,
        ">= 0.97",
    ),
    (
        "weights 3:1:1: Lobby conn/s / raw nft numgen inc over 5 slots counting per upstream in nft",
        Variant::LobbyWeighted,
        Variant::RawNftWeightedCounted,
        "-",
    ),
    (
        "weights 3:1:1: Lobby conn/s / Lobby round-robin",
        Variant::LobbyWeighted,
        Variant::Lobby,
        ">= 0.97",
    ),
    (
        "persistence: Lobby conn/s / raw nft dynamic map",
        Variant::LobbyPersistence,
        Variant::RawNftPersistence,
        ">= 0.97",
    ),
    (
        "persistence: Lobby conn/s / raw nft dynamic map counting per upstream in nft",
        Variant::LobbyPersistence,
        Variant::RawNftPersistenceCounted,
        "-",
    ),
    (
        "ip-src-hash, 12 client addresses, source_nat none: Lobby conn/s / Lobby round-robin",
        Variant::LobbySourceHashMany,
        Variant::LobbyNoSnatMany,
        ">= 0.97",
    ),
    (
        "persistence, 12 client addresses, source_nat none: Lobby conn/s / Lobby round-robin",
        Variant::LobbyPersistenceMany,
        Variant::LobbyNoSnatMany,
        ">= 0.97",
    ),
    (
        "least-connections: Lobby conn/s / Lobby round-robin",
        Variant::LobbyLeastConnections,
        Variant::Lobby,
        ">= 0.97",
    ),
    (
        "least-latency: Lobby conn/s / Lobby round-robin, both health-checked",
        Variant::LobbyLeastLatency,
        Variant::LobbyChecked,
        ">= 0.97",
    ),
    (
        "TCP health checks on every upstream: Lobby conn/s / Lobby without",
        Variant::LobbyChecked,
        Variant::Lobby,
        "-",
    ),
];

/// How a pair is measured.
pub struct Schedule {
    pub rounds: usize,
    /// Counted slices of each variant per round.
    pub slices: usize,
    pub slice: Duration,
}

/// One pair's outcome: the ratio over rounds with each round's, and each
/// variant's median slice rate (conn/s).
pub struct Measured {
    pub pair: Pair,
    pub ratio: Ratio,
    pub rounds: Vec<f64>,
    pub measured_rate: f64,
    pub anchor_rate: f64,
    pub failures: u64,
}

pub fn measure(pair: Pair, schedule: &Schedule) -> Measured {
    let (what, measured, anchor, _) = pair;
    let (mut measured_sums, mut anchor_sums) = (Vec::new(), Vec::new());
    let (mut measured_rates, mut anchor_rates) = (Vec::new(), Vec::new());
    let mut failures = 0;
    for round in 0..schedule.rounds {
        eprintln!("bench: {what}, round {} of {}", round + 1, schedule.rounds);
        // Either is set up first (the second shares the machine with the
        // first's idle daemon while it starts, not while it is measured).
        let setups = if round % 2 == 0 {
            let first = Setup::new(measured);
            [first, Setup::new(anchor)]
        } else {
            let first = Setup::new(anchor);
            [Setup::new(measured), first]
        };
        for setup in &setups {
            connection_rate(setup, schedule.slice);
        }
        let mut sums = [0.0; 2];
        for n in 0..schedule.slices {
            let order = if (n + round) % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                let rate = connection_rate(&setups[i], schedule.slice);
                failures += rate.failures;
                let per_second = rate.connections as f64 / rate.seconds;
                sums[i] += per_second;
                [&mut measured_rates, &mut anchor_rates][i].push(per_second);
            }
        }
        measured_sums.push(sums[0]);
        anchor_sums.push(sums[1]);
    }
    Measured {
        pair,
        ratio: Ratio::paired(&measured_sums, &anchor_sums),
        rounds: measured_sums
            .iter()
            .zip(&anchor_sums)
            .map(|(m, a)| m / a)
            .collect(),
        measured_rate: median(&measured_rates),
        anchor_rate: median(&anchor_rates),
        failures,
    }
}
