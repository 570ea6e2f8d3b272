//! How long parsing and validating a large configuration takes: 1,000
//! targets of 10 health-checked upstreams (a tenth of them host names with
//! resolvers). Run with `cargo run --release -p lobby --example config_bench`;
//! the goal is under 200 ms.
use std::{fmt::Write as _, path::Path, time::Instant};

const TARGETS: usize = 1_000;
const UPSTREAMS: usize = 10;
const RUNS: usize = 5;

fn generate() -> String {
    let mut text = String::from("lb:\n  - engine: nftables\n    targets:\n");
    for t in 0..TARGETS {
        let port = 10_000 + t;
        let _ = write!(
            text,
            "      - name: target{t}\n        protocol: tcp\n        port: {port}\n        upstream_group:\n          name: group{t}\n          distribution: round-robin\n          upstreams:\n"
        );
        for u in 0..UPSTREAMS {
            let host = if u == 0 {
                format!("up{u}.target{t}.example.test")
            } else {
                format!("10.{}.{}.{u}", t / 256, t % 256)
            };
            let _ = write!(
                text,
                "            - name: up{u}\n              host: {host}\n              port: 8080\n              health_check:\n                protocol: tcp\n                port: 8080\n                start_available: true\n                probe: {{check_interval: 5, timeout: 2, success_count: 3, failure_count: 2}}\n"
            );
            if u == 0 {
                text.push_str("              dns: {servers: [198.18.0.53, \"[2001:db8::53]:5353\"], ttl: 30}\n");
            }
        }
    }
    text
}

fn main() {
    let text = generate();
    let mut best = f64::INFINITY;
    for _ in 0..RUNS {
        let start = Instant::now();
        let config = match lobby::config::parse(&text, Path::new("bench.yaml")) {
            Ok(config) => config,
            Err(errors) => {
                eprintln!("{errors}");
                std::process::exit(1);
            }
        };
        best = best.min(start.elapsed().as_secs_f64() * 1e3);
        assert_eq!(config.summary().upstreams, TARGETS * UPSTREAMS);
    }
    println!(
        "{TARGETS} targets x {UPSTREAMS} upstreams ({} KiB): best of {RUNS}: {best:.1} ms",
        text.len() / 1024
    );
}
