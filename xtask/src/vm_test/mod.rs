//! `cargo xtask vm-test`: the balancing scenario on Debian's own kernels,
//! booted under QEMU, so that the kernels Lobby supports but this machine
//! does not run are tested too (the ruleset's expressions, the clsact
//! attachment that precedes TCX).
//!
//! Per kernel: fetch the package into the cache (kernel.rs), pack lobby
//! and the guest's tools into an initramfs (initramfs.rs), boot it
//! (qemu.rs) and let init.sh run the scenario and print the verdict.
mod initramfs;
mod kernel;
mod qemu;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};

pub use kernel::OLDEST_SUPPORTED;

use crate::cmd::{build_lobby, cargo, checked, workspace_root};

/// The guest's PID 1: the scenario itself.
const INIT_SCRIPT: &str = include_str!("init.sh");

/// What the guest's init finds on the kernel command line when the run is
/// a self-test of the harness: it then expects one connection more than it
/// makes, so the run must fail.
const WRONG_EXPECTATION: &str = "vmtest.wrong_expectation";

pub fn run(requested: Option<&str>, wrong_expectation: bool) -> anyhow::Result<()> {
    crate::setup::run()?;
    // The build the integration tests use, so that CI builds lobby once.
    let programs = [build_lobby()?, build_name_server()?];
    let work = lobby_tests::lobby::target_dir().join("vm-test");
    let cache = work.join("cache");
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;

    let versions = kernel::select(&kernel::available()?, requested)?;
    let cmdline = if wrong_expectation {
        WRONG_EXPECTATION
    } else {
        ""
    };
    let mut outcomes = Vec::new();
    for version in &versions {
        let started = Instant::now();
        let outcome = boot(&work, &cache, version, &programs, cmdline);
        outcomes.push((version, outcome, started.elapsed()));
    }

    for (version, outcome, elapsed) in &outcomes {
        let result = match outcome {
            Ok(()) => "PASS".to_owned(),
            Err(e) => format!("FAIL: {e:#}"),
        };
        eprintln!(
            "vm-test: kernel {version}: {result} ({:.0} s)",
            elapsed.as_secs_f64()
        );
    }
    let failed = outcomes.iter().filter(|(_, o, _)| o.is_err()).count();
    if failed > 0 {
        bail!("vm-test failed on {failed} of {} kernels", outcomes.len());
    }
    Ok(())
}

/// Fetches kernel `version`, builds its initramfs and boots it.
fn boot(
    work: &Path,
    cache: &Path,
    version: &str,
    programs: &[PathBuf],
    cmdline: &str,
) -> anyhow::Result<()> {
    let kernel = kernel::fetch(cache, version)?;
    let image = work.join(format!("initramfs-{}.cpio", kernel.release));
    initramfs::build(&image, &kernel, programs, INIT_SCRIPT)?;
    eprintln!("vm-test: booting {} under QEMU (TCG)", kernel.release);
    qemu::run(&kernel.vmlinuz, &image, cmdline)
}

/// The guest's UDP and SCTP upstream server (tests/src/bin/name-server.rs).
fn build_name_server() -> anyhow::Result<PathBuf> {
    const NAME: &str = "name-server";
    checked(cargo().current_dir(workspace_root()).args([
        "build",
        "-p",
        "lobby-tests",
        "--bin",
        NAME,
    ]))?;
    Ok(lobby_tests::lobby::target_dir().join("debug").join(NAME))
}
