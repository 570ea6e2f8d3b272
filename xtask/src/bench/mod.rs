//! `cargo xtask bench`: Lobby against plain forwarding, HAProxy and a
//! hand-written nft DNAT ruleset, side by side in one run, plus the control
//! plane's figures. Every data-plane measurement gets fresh namespaces and
//! the variants take turns within each round, so machine noise hits them
//! alike; each figure is the median over the rounds.
mod control;
mod load;
mod servers;
mod variants;

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use anyhow::{Context as _, bail};
use serde_json::json;
use variants::{Service, Setup, Variant};

use crate::cmd::{build_lobby_release, workspace_root};

/// How long and how often: a full run and a quick one for development.
struct Plan {
    rounds: usize,
    rate_secs: u64,
    bulk_secs: u64,
    round_trips: usize,
    apply_runs: usize,
    idle_window: Duration,
}

const FULL: Plan = Plan {
    rounds: 5,
    rate_secs: 4,
    bulk_secs: 3,
    round_trips: 3000,
    apply_runs: 5,
    idle_window: Duration::from_secs(20),
};

const QUICK: Plan = Plan {
    rounds: 2,
    rate_secs: 2,
    bulk_secs: 1,
    round_trips: 500,
    apply_runs: 2,
    idle_window: Duration::from_secs(5),
};

/// Concurrent connections of the connection-rate test.
const CONCURRENCY: usize = 32;
/// Long-lived streams of the bulk test.
const STREAMS: usize = 4;

#[derive(Default)]
struct Samples {
    rate: Vec<f64>,
    cpu_us_per_conn: Vec<f64>,
    failures: u64,
    conntrack_full: bool,
    bulk_bps: Vec<f64>,
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench builds network namespaces and loads eBPF: run it as root");
    }
    crate::setup::run()?;
    let binary = build_lobby_release()?;
    // SAFETY: still single-threaded; the harness reads it to find the binary.
    unsafe { std::env::set_var("LOBBY_BIN", binary) };
    let plan = if quick { QUICK } else { FULL };
    let started = std::time::Instant::now();

    let mut samples: BTreeMap<Variant, Samples> = BTreeMap::new();
    for round in 0..plan.rounds {
        eprintln!("bench: data plane, round {} of {}", round + 1, plan.rounds);
        // Rotate the order so no variant always runs first.
        let mut order = Variant::ALL.to_vec();
        order.rotate_left(round % Variant::ALL.len());
        for variant in order {
            let s = samples.entry(variant).or_default();
            measure_rate(variant, &plan, s);
            let setup = Setup::new(variant);
            s.bulk_bps.push(load::bulk(
                &setup.client().name,
                setup.targets(Service::Sink),
                STREAMS,
                Duration::from_secs(plan.bulk_secs),
            ));
            drop(setup);
            let setup = Setup::new(variant);
            let (p50, p99) = load::latency(
                &setup.client().name,
                setup.targets(Service::Echo)[0],
                plan.round_trips,
            );
            s.p50_us.push(p50);
            s.p99_us.push(p99);
        }
    }

    eprintln!("bench: control plane");
    let apply = |targets: usize, per: usize| -> f64 {
        median(
            (0..plan.apply_runs)
                .map(|_| control::first_apply_ms(&control::scale_config(targets, per, |_| false)))
                .collect(),
        )
    };
    let apply_10 = apply(1, 10);
    let apply_1000 = apply(100, 10);
    let apply_10000 = apply(1000, 10);
    let apply_1x10000 = apply(1, 10_000);
    let reloads: Vec<(f64, f64)> = (0..plan.apply_runs)
        .map(|_| control::reload_ms(1000, 10))
        .collect();
    let reload_one = median(reloads.iter().map(|r| r.0).collect());
    let reload_all = median(reloads.iter().map(|r| r.1).collect());
    let removal = median(
        (0..plan.apply_runs)
            .map(|_| control::death_to_removal_ms())
            .collect(),
    );
    let (idle_rss_kib, idle_cpu) = control::idle_cost(1000, plan.idle_window);

    let report = Report {
        samples,
        control: vec![
            (
                "apply from scratch, 1 x 10 upstreams (ms)",
                apply_10,
                Some(7.0),
            ),
            (
                "apply from scratch, 100 x 10 upstreams (ms)",
                apply_1000,
                Some(23.0),
            ),
            (
                "apply from scratch, 1,000 x 10 upstreams (ms)",
                apply_10000,
                Some(250.0),
            ),
            (
                "apply from scratch, 1 x 10,000 upstreams (ms)",
                apply_1x10000,
                Some(120.0),
            ),
            (
                "reload at 1,000 x 10, one target changed (ms)",
                reload_one,
                Some(30.0),
            ),
            (
                "reload at 1,000 x 10, every target changed (ms)",
                reload_all,
                Some(500.0),
            ),
            ("upstream death to removal, 1 s probes (ms)", removal, None),
            (
                "idle daemon RSS, 1,000 health-checked upstreams (MiB)",
                idle_rss_kib as f64 / 1024.0,
                None,
            ),
            (
                "idle daemon CPU, 1,000 upstreams probed every 1 s (% of a core)",
                idle_cpu,
                None,
            ),
        ],
    };
    let text = report.table();
    println!("{text}");
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).context("creating target/bench")?;
    let json_path = dir.join("results.json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&report.json(quick))?,
    )
    .context("writing results.json")?;
    std::fs::write(dir.join("results.md"), &text).context("writing results.md")?;
    eprintln!(
        "bench: {} and results.md written in {:.0} s",
        json_path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn measure_rate(variant: Variant, plan: &Plan, s: &mut Samples) {
    let setup = Setup::new(variant);
    let before = busy_ticks();
    let rate = load::connection_rate(
        &setup.client().name,
        setup.targets(Service::Greet),
        CONCURRENCY,
        Duration::from_secs(plan.rate_secs),
    );
    let busy = busy_ticks() - before;
    if let Some((count, max)) = setup.conntrack()
        && count * 10 >= max * 9
    {
        eprintln!(
            "bench: {}: conntrack table nearly full ({count} of {max}): new connections may be dropped",
            variant.name()
        );
        s.conntrack_full = true;
    }
    s.rate.push(rate.connections as f64 / rate.seconds);
    s.cpu_us_per_conn
        .push(busy as f64 / control::ticks_per_second() * 1e6 / rate.connections.max(1) as f64);
    s.failures += rate.failures;
}

/// Busy clock ticks of the whole machine (all CPUs) from /proc/stat.
fn busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: all but idle and iowait.
    fields.iter().take(8).sum::<u64>() - fields[3] - fields[4]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

struct Report {
    samples: BTreeMap<Variant, Samples>,
    /// (what, median, goal)
    control: Vec<(&'static str, f64, Option<f64>)>,
}

impl Report {
    fn medians(&self, variant: Variant) -> [f64; 5] {
        let s = &self.samples[&variant];
        [
            median(s.rate.clone()),
            median(s.cpu_us_per_conn.clone()),
            median(s.bulk_bps.clone()) * 8.0 / 1e9,
            median(s.p50_us.clone()),
            median(s.p99_us.clone()),
        ]
    }

    fn table(&self) -> String {
        let mut out = String::new();
        let base = self.medians(Variant::Forwarding);
        let haproxy = self.medians(Variant::HaProxy);
        writeln!(out, "| variant | conn/s | CPU us/conn | bulk Gbit/s | p50 us | p99 us | conn/s vs fwd | conn/s vs haproxy | bulk vs fwd | bulk vs haproxy |").unwrap();
        writeln!(out, "|---|---|---|---|---|---|---|---|---|---|").unwrap();
        for variant in Variant::ALL {
            let m = self.medians(variant);
            writeln!(
                out,
                "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
                variant.name(),
                m[0],
                m[1],
                m[2],
                m[3],
                m[4],
                m[0] / base[0],
                m[0] / haproxy[0],
                m[2] / base[2],
                m[2] / haproxy[2]
            )
            .unwrap();
        }
        let lobby = self.medians(Variant::Lobby);
        let raw = self.medians(Variant::RawNft);
        let bare = self.medians(Variant::LobbyWithoutCounters);
        writeln!(out, "\n| ratio | value | goal |\n|---|---|---|").unwrap();
        for (what, value, goal) in [
            ("Lobby bulk / forwarding", lobby[2] / base[2], ">= 0.95"),
            ("Lobby bulk / HAProxy", lobby[2] / haproxy[2], ">= 1.8"),
            ("Lobby conn/s / raw nft DNAT", lobby[0] / raw[0], ">= 0.97"),
            (
                "Lobby CPU per conn / raw nft DNAT",
                lobby[1] / raw[1],
                "<= 1.05",
            ),
            ("Lobby conn/s / HAProxy", lobby[0] / haproxy[0], ">= 1.3"),
            (
                "counters: conn/s with / without",
                lobby[0] / bare[0],
                ">= 0.97",
            ),
            (
                "counters: bulk with / without",
                lobby[2] / bare[2],
                ">= 0.97",
            ),
        ] {
            writeln!(out, "| {what} | {value:.3} | {goal} |").unwrap();
        }
        writeln!(out, "\n| control plane | median | goal |\n|---|---|---|").unwrap();
        for (what, value, goal) in &self.control {
            let goal = goal.map_or("-".to_owned(), |g| format!("<= {g}"));
            writeln!(out, "| {what} | {value:.1} | {goal} |").unwrap();
        }
        for (variant, s) in &self.samples {
            if s.failures > 0 || s.conntrack_full {
                writeln!(
                    out,
                    "\n{}: {} failed connections{}",
                    variant.name(),
                    s.failures,
                    if s.conntrack_full {
                        ", conntrack table nearly full"
                    } else {
                        ""
                    }
                )
                .unwrap();
            }
        }
        out
    }

    fn json(&self, quick: bool) -> serde_json::Value {
        let variants: serde_json::Map<String, serde_json::Value> = self
            .samples
            .iter()
            .map(|(variant, s)| {
                let value = json!({
                    "conn_per_s": s.rate, "cpu_us_per_conn": s.cpu_us_per_conn, "failed_connections": s.failures,
                    "conntrack_nearly_full": s.conntrack_full, "bulk_bytes_per_s": s.bulk_bps,
                    "latency_p50_us": s.p50_us, "latency_p99_us": s.p99_us,
                });
                (variant.name().to_owned(), value)
            })
            .collect();
        let control: serde_json::Map<String, serde_json::Value> = self
            .control
            .iter()
            .map(|(what, value, _)| ((*what).to_owned(), json!(value)))
            .collect();
        json!({
            "quick": quick,
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "concurrency": CONCURRENCY, "bulk_streams": STREAMS,
            "variants": variants,
            "control_plane": control,
        })
    }
}
