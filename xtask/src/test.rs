//! Everything CI checks, in the order that fails fastest.
use crate::{
    build_ebpf::EBPF_TARGET_ARGS,
    cmd::{cargo, checked, nightly_cargo, workspace_root},
};

pub fn run() -> anyhow::Result<()> {
    crate::setup::run()?;
    let root = workspace_root();
    checked(cargo().current_dir(&root).args(["fmt", "--all", "--check"]))?;
    checked(cargo().current_dir(&root).args([
        "clippy",
        "--workspace",
        "--exclude",
        "lobby-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    crate::build_ebpf::run()?;
    clippy_ebpf(&root)?;
    // The integration tests run the binary: build it first.
    checked(cargo().current_dir(&root).args(["build", "-p", "lobby"]))?;
    checked(cargo().current_dir(&root).args([
        "test",
        "--workspace",
        "--exclude",
        "lobby-ebpf",
        "--exclude",
        "lobby-tests",
    ]))?;
    // The namespace tests measure detection times and drive thousands of
    // connections through reloads: run one at a time, so that they do not
    // compete for the machine's two cores.
    checked(cargo().current_dir(&root).args([
        "test",
        "-p",
        "lobby-tests",
        "--",
        "--test-threads=1",
    ]))?;
    // The oldest supported kernel line, booted under QEMU: what this
    // machine's own kernel cannot show.
    crate::vm_test::run(Some(crate::vm_test::OLDEST_SUPPORTED), false)?;
    // The Debian package of the binary built above: lintian, then a real
    // install, removal and purge into an empty root.
    crate::deb_test::run(&lobby_tests::lobby::binary())
}

/// The eBPF crate is linted on its own target with the nightly: a host
/// build would pull std into it.
fn clippy_ebpf(root: &std::path::Path) -> anyhow::Result<()> {
    checked(
        nightly_cargo()
            .current_dir(root.join("lobby-ebpf"))
            .arg("clippy")
            .args(EBPF_TARGET_ARGS)
            .args(["--", "-D", "warnings"]),
    )
}
