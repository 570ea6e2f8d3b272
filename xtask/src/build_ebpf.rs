//! Builds the eBPF object alone, as lobby's build.rs does when it embeds it.
use crate::cmd::{checked, nightly_cargo, workspace_root};

/// Arguments that build lobby-ebpf for the BPF target.
pub const EBPF_TARGET_ARGS: &[&str] = &[
    "-Z",
    "build-std=core",
    "--target",
    "bpfel-unknown-none",
    "--release",
];

/// Where the build puts the object, below the workspace root.
pub const OBJECT: &str = "target/bpfel-unknown-none/release/lobby-counters";

pub fn run() -> anyhow::Result<()> {
    checked(
        nightly_cargo()
            .current_dir(workspace_root().join("lobby-ebpf"))
            .arg("build")
            .args(EBPF_TARGET_ARGS),
    )?;
    eprintln!("build-ebpf: {OBJECT}");
    Ok(())
}
