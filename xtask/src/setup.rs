//! Installs what building and testing Lobby needs on a Debian 12 machine,
//! idempotently: whatever is already there is skipped.
use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context as _, bail};

use crate::cmd::{cargo, checked, find_file, stdout};

/// Debian packages: nftables for the data plane; iproute2 for namespaces
/// and routes; util-linux for mount; QEMU, a static busybox and xz (the
/// kernel modules are compressed) for the guests of `vm-test`; the rest for
/// the tests and the bench; lintian, dpkg-dev (dpkg-shlibdeps,
/// dpkg-parsechangelog) and binutils (strip) for the Debian package;
/// headless Chromium for the status page's test; keepalived, conntrackd
/// and BIRD for the several-hosts recipes (dist/ha, dist/ecmp); socat for
/// the SCTP servers and the UDP and SCTP clients of `vm-test`'s guests.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("nft", "nftables"),
    ("ip", "iproute2"),
    ("mount", "mount"),
    ("conntrack", "conntrack"),
    ("dnsmasq", "dnsmasq-base"),
    ("haproxy", "haproxy"),
    ("wrk", "wrk"),
    ("iperf3", "iperf3"),
    ("bpftool", "bpftool"),
    ("promtool", "prometheus"),
    ("systemd-analyze", "systemd"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("xz", "xz-utils"),
    ("lintian", "lintian"),
    ("dpkg-shlibdeps", "dpkg-dev"),
    ("strip", "binutils"),
    ("chromium", "chromium"),
    ("keepalived", "keepalived"),
    ("conntrackd", "conntrackd"),
    ("bird", "bird2"),
    ("socat", "socat"),
];

/// Where bpf-linker finds the nightly's own LLVM (Debian's is too old).
const LLVM_PREFIX: &str = "/opt/rustllvm";

pub fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    eprintln!("setup: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn has_command(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|dir| dir.join(name).is_file())
    })
}

fn apt_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(command, _)| !has_command(command))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        eprintln!("setup: apt packages present");
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    checked(Command::new("apt-get").args(["update", "-qq"]))?;
    checked(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn rust_src() -> anyhow::Result<()> {
    let installed = stdout(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: rust-src present");
        return Ok(());
    }
    checked(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker built against the LLVM that the nightly ships: its major
/// version is read from `rustc +nightly -vV`, not assumed.
fn bpf_linker() -> anyhow::Result<()> {
    if has_command("bpf-linker") || Path::new(&home_cargo_bin("bpf-linker")).is_file() {
        eprintln!("setup: bpf-linker present");
        return Ok(());
    }
    let version = stdout(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV shows no LLVM version")?
        .to_owned();
    let sysroot = stdout(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    // The real shared object, not the linker script named libLLVM-*-rust-*.so.
    let real = find_file(&lib_dir, |name| name.starts_with("libLLVM.so."))?
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    let prefix_lib = Path::new(LLVM_PREFIX).join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link in [
        prefix_lib.join("libLLVM.so"),
        prefix_lib.join(real.file_name().expect("a file")),
    ] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&real, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!("setup: building bpf-linker against LLVM {major}");
    checked(
        cargo()
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )?;
    if !Path::new(&home_cargo_bin("bpf-linker")).is_file() && !has_command("bpf-linker") {
        bail!("bpf-linker was installed but is not on PATH");
    }
    Ok(())
}

fn home_cargo_bin(name: &str) -> String {
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| {
        format!(
            "{}/.cargo",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into())
        )
    });
    format!("{cargo_home}/bin/{name}")
}
