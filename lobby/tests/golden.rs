//! Golden files for the reconcile core, as nftlb keeps them: one folder per
//! case under tests/golden/, holding `lobby.yaml` and numbered steps. The
//! steps drive the real core (`lobby::reconcile::Core`) with events; a step
//! `NN-what.txt` holds one per line:
//!
//! ```text
//! web/web1 down
//! web/web2 up
//! web/web2 198.18.1.13 down      # that address of an upstream with several
//! web/web2 address 198.18.1.13   # its name resolves to these addresses
//! web/web2 address 198.18.1.13 2001:2::13
//! web/web1 established 20        # conntrack counts 20 connections to it
//! web/web1 latency 50            # its probes' smoothed round trip, in ms
//! web/web2 198.18.1.13 latency 50  # ... of that address of several
//! config other.yaml              # reload with another file of the folder
//! takeover web 198.18.1.11:9000  # (00-start only) a dead run's table balanced there
//! wait 2                         # seconds pass
//! devices eth0 up1               # the flowtable's interfaces now
//! devices-offload eth0 up1       # ... and every one can offload flows
//! fail                           # this step's transaction is refused
//! ```
//!
//! and `NN-what.nft` is the transaction the core asks for after the step
//! (`00-start.nft`: the first, full one; `# no change` when none). A missing
//! or differing file fails; `LOBBY_BLESS=1 cargo test -p lobby --test golden`
//! (or `cargo xtask bless`) rewrites them from what the code says now:
//! review the diff.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use lobby::{
    config::{self, Host},
    dns::{AddressUpdate, ResolverKey},
    health::{HealthReport, ProbePorts},
    model::UpstreamId,
    nft::{self, Rotation},
    reconcile::{Action, AddressKey, Core, Event, Measures},
};
use tokio::time::Instant;

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<PathBuf> = fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("reading {}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    cases
}

/// The lines of a step, without comments and blanks.
fn lines(step: &str) -> impl Iterator<Item = Vec<&str>> {
    step.lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.split_whitespace().collect())
}

/// The rotation that `takeover` lines of the first step describe.
fn inherited(step: &str) -> Option<Rotation> {
    let mut rotation = Rotation::new();
    for words in lines(step) {
        if let ["takeover", target, upstreams @ ..] = words.as_slice() {
            let upstreams = upstreams
                .iter()
                .map(|u| u.parse::<std::net::SocketAddr>().unwrap());
            rotation
                .entry(nft::chain_name(target))
                .or_default()
                .extend(upstreams);
        }
    }
    (!rotation.is_empty()).then_some(rotation)
}

/// A case run step by step: the core, its clock and the running file.
struct Run<'a> {
    case: &'a Path,
    core: Core,
    now: Instant,
    config: config::Config,
    /// The measures so far: each line adds to them, and the event carries
    /// all of them, as the daemon's measures do.
    established: BTreeMap<(SocketAddr, config::Protocol), u64>,
    latency: BTreeMap<(UpstreamId, AddressKey), Duration>,
    /// The reads of the file so far, as the daemon numbers them.
    reads: u64,
}

impl Run<'_> {
    /// Feeds one step's events; returns whether its transaction fails.
    fn step(&mut self, step: &str) -> bool {
        let mut fails = false;
        for words in lines(step) {
            let line = words.join(" ");
            let event = match words.as_slice() {
                ["config", file] => {
                    let path = self.case.join(file);
                    self.config =
                        config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    self.reads += 1;
                    Event::ConfigLoaded {
                        config: self.config.clone(),
                        read: self.reads,
                    }
                }
                ["takeover", ..] => continue,
                ["fail"] => {
                    fails = true;
                    continue;
                }
                [verb @ ("devices" | "devices-offload"), names @ ..] => {
                    Event::Devices(lobby::accel::Devices {
                        names: names.iter().map(|n| n.to_string()).collect(),
                        offload: *verb == "devices-offload",
                    })
                }
                ["wait", seconds] => {
                    self.now += std::time::Duration::from_secs_f64(seconds.parse().unwrap());
                    Event::Tick
                }
                [id, change @ ..] => self.upstream_event(id, change, &line),
                [] => unreachable!(),
            };
            let actions = self.core.on(event, self.now);
            assert!(
                transaction(&actions).is_none(),
                "`{line}`: planned before settling"
            );
        }
        fails
    }

    fn upstream_event(&mut self, id: &str, change: &[&str], line: &str) -> Event {
        let (target, name) = id
            .split_once('/')
            .unwrap_or_else(|| panic!("`{line}`: expected target/upstream"));
        let (protocol, upstream) = self
            .config
            .targets
            .iter()
            .filter(|t| t.name == target)
            .flat_map(|t| t.group.upstreams.iter().map(|u| (t.protocol, u)))
            .find(|(_, u)| u.name == name)
            .unwrap_or_else(|| panic!("`{line}`: no upstream {id} in {}", self.case.display()));
        let id = UpstreamId::new(target, name);
        // The address a line names, or the upstream's only one, with its key.
        let held = |address: Option<&str>| {
            let wanted: Option<IpAddr> =
                address.map(|a| a.parse().unwrap_or_else(|e| panic!("`{line}`: {e}")));
            let held: Vec<(AddressKey, IpAddr)> = self
                .core
                .upstream(&id)
                .into_iter()
                .flatten()
                .map(|(key, a)| (*key, a.address))
                .collect();
            match (wanted, &held[..]) {
                (None, [one]) => *one,
                (None, _) => panic!("`{line}`: {id} has the addresses {held:?}: say which"),
                (Some(wanted), _) => held
                    .iter()
                    .copied()
                    .find(|(_, a)| *a == wanted)
                    .unwrap_or_else(|| panic!("`{line}`: {id} does not hold {wanted}")),
            }
        };
        let health = |available, address: Option<&str>| {
            let address = match address {
                Some(address) => address.parse().unwrap_or_else(|e| panic!("`{line}`: {e}")),
                None => held(None).1,
            };
            Event::Health(HealthReport {
                id: id.clone(),
                address: Some(address),
                available,
                reason: "golden".to_owned(),
                run: 1,
                threshold: 1,
                decided_at: tokio::time::Instant::now(),
            })
        };
        match change {
            ["up"] => health(true, None),
            ["down"] => health(false, None),
            [address, "up"] => health(true, Some(address)),
            [address, "down"] => health(false, Some(address)),
            ["address", addresses @ ..] => {
                let Host::Fqdn(host) = &upstream.host else {
                    panic!("`{line}`: {id} has no name to resolve");
                };
                Event::Address(AddressUpdate {
                    key: ResolverKey::new(host, upstream.dns.as_ref()),
                    addresses: addresses
                        .iter()
                        .map(|a| a.parse().unwrap_or_else(|e| panic!("`{line}`: {e}")))
                        .collect(),
                })
            }
            [address @ .., "established", count] if address.len() <= 1 => {
                let (_, address) = held(address.first().copied());
                let backend = (SocketAddr::new(address, upstream.port), protocol);
                self.established.insert(
                    backend,
                    count.parse().unwrap_or_else(|e| panic!("`{line}`: {e}")),
                );
                Event::Measured(Measures::Established(self.established.clone()))
            }
            [address @ .., "latency", ms] if address.len() <= 1 => {
                let (key, _) = held(address.first().copied());
                let ms: f64 = ms.parse().unwrap_or_else(|e| panic!("`{line}`: {e}"));
                self.latency
                    .insert((id.clone(), key), Duration::from_secs_f64(ms / 1000.0));
                Event::Measured(Measures::Latency(self.latency.clone()))
            }
            _ => panic!(
                "`{line}`: expected `[ADDR] up`, `[ADDR] down`, `address ADDR...`, `[ADDR] established N`, \
                 `[ADDR] latency MS`, `config FILE`, `wait SECS` or `fail`"
            ),
        }
    }
}

fn transaction(actions: &[Action]) -> Option<&str> {
    actions.iter().find_map(|a| match a {
        Action::Apply(script) => Some(script.as_str()),
        _ => None,
    })
}

#[test]
fn plans_match_the_golden_files() {
    let bless = std::env::var_os("LOBBY_BLESS").is_some();
    let cases = cases();
    assert!(!cases.is_empty(), "no golden cases");
    let mut failures = Vec::new();
    for case in &cases {
        let config = config::load(&case.join("lobby.yaml"))
            .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        let start = case.join("00-start.txt");
        let first = fs::read_to_string(&start).unwrap_or_default();
        let mut run = Run {
            case,
            // IPv6 forwarding on: every family a target serves is rendered.
            // Ports as confined on a default ip_local_port_range.
            core: Core::new(inherited(&first), true).with_probe_ports(Some(ProbePorts {
                first: 56904,
                last: 60999,
            })),
            now: Instant::now(),
            config: config.clone(),
            established: BTreeMap::new(),
            latency: BTreeMap::new(),
            reads: 0,
        };
        run.core
            .on(Event::ConfigLoaded { config, read: 0 }, run.now);
        let mut steps: Vec<PathBuf> = fs::read_dir(case)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "txt") && *p != start)
            .collect();
        steps.sort();
        for step in std::iter::once(start.clone()).chain(steps) {
            let fails = run.step(&fs::read_to_string(&step).unwrap_or_default());
            let actions = run.core.settle(run.now);
            let actual = transaction(&actions).unwrap_or("# no change\n").to_owned();
            if transaction(&actions).is_some() {
                let outcome = if fails {
                    Err("refused by the golden step".to_owned())
                } else {
                    Ok(std::time::Duration::from_millis(1))
                };
                run.core.on(Event::Applied(outcome), run.now);
            }
            let expected_path = step.with_extension("nft");
            if bless {
                fs::write(&expected_path, &actual).unwrap();
            } else {
                match fs::read_to_string(&expected_path) {
                    Ok(expected) if expected == actual => {}
                    Ok(expected) => failures.push(format!(
                        "{}:\n--- expected\n{expected}--- actual\n{actual}",
                        expected_path.display()
                    )),
                    Err(e) => failures.push(format!("{}: {e}", expected_path.display())),
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
