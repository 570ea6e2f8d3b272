//! Golden files for the reconcile core, as nftlb keeps them: one folder per
//! case under tests/golden/, holding `lobby.yaml` and numbered steps. Step
//! `NN-what.txt` changes upstream states, one per line:
//!
//! ```text
//! web/web1 down
//! web/web2 up
//! web/web2 address 198.18.1.13
//! config other.yaml        # reload with another file of the folder
//! ```
//!
//! and `NN-what.nft` is the transaction `nft::plan` must produce from the
//! previous step's state (`00-start.nft`: the first, full one). A missing or
//! differing file fails; `LOBBY_BLESS=1 cargo test -p lobby --test golden`
//! (or `cargo xtask bless`) rewrites them from what the code says now:
//! review the diff.
use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use lobby::{
    config::{self, Config},
    model::{Desired, UpstreamId, UpstreamState},
    nft,
};

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

/// Every upstream as the daemon starts it.
fn initial_states(config: &Config) -> BTreeMap<UpstreamId, UpstreamState> {
    let mut states = BTreeMap::new();
    for target in &config.targets {
        for upstream in &target.group.upstreams {
            let state = UpstreamState::at_start(&upstream.host, upstream.health_check.as_ref());
            states.insert(UpstreamId::new(&target.name, &upstream.name), state);
        }
    }
    states
}

fn apply_step(
    case: &Path,
    step: &str,
    config: &mut Config,
    states: &mut BTreeMap<UpstreamId, UpstreamState>,
) {
    for line in step
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let ["config", file] = words.as_slice() {
            *config = config::load(&case.join(file))
                .unwrap_or_else(|e| panic!("{}: {e}", case.join(file).display()));
            let fresh = initial_states(config);
            // Upstreams that stay keep their state, as a reload keeps them.
            let kept: BTreeMap<_, _> = fresh
                .into_iter()
                .map(|(id, s)| (id.clone(), *states.get(&id).unwrap_or(&s)))
                .collect();
            *states = kept;
            continue;
        }
        let (id, change) = match words.as_slice() {
            [id, change @ ..] => (*id, change),
            [] => unreachable!(),
        };
        let (target, upstream) = id
            .split_once('/')
            .unwrap_or_else(|| panic!("`{line}`: expected target/upstream"));
        let state = states
            .get_mut(&UpstreamId::new(target, upstream))
            .unwrap_or_else(|| panic!("`{line}`: no upstream {id} in {}", case.display()));
        match change {
            ["up"] => state.available = true,
            ["down"] => state.available = false,
            ["address", addr] => {
                state.address = Some(addr.parse().unwrap_or_else(|e| panic!("`{line}`: {e}")))
            }
            _ => panic!("`{line}`: expected `up`, `down`, `address ADDR` or `config FILE`"),
        }
    }
}

#[test]
fn plans_match_the_golden_files() {
    let bless = std::env::var_os("LOBBY_BLESS").is_some();
    let cases = cases();
    assert!(!cases.is_empty(), "no golden cases");
    let mut failures = Vec::new();
    for case in &cases {
        let mut config = config::load(&case.join("lobby.yaml"))
            .unwrap_or_else(|e| panic!("{}: {e}", case.display()));
        let mut states = initial_states(&config);
        let mut steps: Vec<PathBuf> = fs::read_dir(case)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "txt"))
            .collect();
        steps.sort();
        let mut applied: Option<Desired> = None;
        // A fresh start: no table yet.
        let start = case.join("00-start.txt");
        for step in std::iter::once(start.clone()).chain(steps.into_iter().filter(|s| *s != start))
        {
            if step.exists() {
                apply_step(
                    case,
                    &fs::read_to_string(&step).unwrap(),
                    &mut config,
                    &mut states,
                );
            }
            let desired = Desired::from_config(&config, &states);
            let actual = nft::plan(
                applied
                    .as_ref()
                    .map_or(nft::Applied::Nothing, nft::Applied::Known),
                &desired,
            )
            .unwrap_or_else(|| "# no change\n".to_owned());
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
            applied = Some(desired);
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
