//! Every golden transaction of lobby/tests/golden, applied in order to the
//! real nft in a namespace: the files the unit tests compare against are
//! transactions the kernel accepts. Cases with a flowtable are the
//! exception by design: this host's kernel has no nf_flow_table; those
//! rulesets are applied by `cargo xtask vm-test` on Debian's kernels.
use std::path::{Path, PathBuf};

use lobby_tests::{NetNs, privileged};

#[test]
fn golden_transactions_apply_in_sequence() {
    if !privileged() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lobby/tests/golden");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() && !asks_for_a_flowtable(p))
        .collect();
    cases.sort();
    assert!(!cases.is_empty());
    for case in cases {
        let ns = NetNs::new("golden");
        let mut steps: Vec<PathBuf> = std::fs::read_dir(&case)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "nft"))
            .collect();
        steps.sort();
        for step in steps {
            let output = ns.try_exec("nft", &["-f", step.to_str().unwrap()]);
            assert!(
                output.status.success(),
                "{}: {}",
                step.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// Whether a golden case's configuration turns the flowtable on.
fn asks_for_a_flowtable(case: &Path) -> bool {
    std::fs::read_to_string(case.join("lobby.yaml")).is_ok_and(|c| c.contains("flowtable: true"))
}
