//! Builds the eBPF counters (lobby-ebpf) with the nightly toolchain and
//! places the object in OUT_DIR, where `ebpf.rs` embeds it: one binary is all
//! an operator installs.
//!
//! `AYA_BUILD_SKIP=1` skips that build (for `cargo check` on a machine
//! without bpf-linker) and embeds an empty object instead; such a binary
//! refuses to start the daemon with a message that says why.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

const EBPF_PACKAGE: &str = "lobby-ebpf";
const EBPF_BINARY: &str = "lobby-counters";

fn main() -> anyhow::Result<()> {
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
        fs::write(out_dir.join(EBPF_BINARY), []).context("writing the empty eBPF stub")?;
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let package = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == EBPF_PACKAGE)
        .ok_or_else(|| anyhow!("package {EBPF_PACKAGE} not found in the workspace"))?;
    let root_dir = package
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{EBPF_PACKAGE}'s manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
