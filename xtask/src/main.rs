//! Project tasks: `cargo xtask <task>`.
mod bench;
mod bless;
mod build_ebpf;
mod cmd;
mod deb;
mod deb_test;
mod demo;
mod ha_demo;
mod install;
mod setup;
mod test;
mod vm_test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Lobby's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (apt packages, rust-src,
    /// bpf-linker); quick when already done.
    Setup,
    /// Build the eBPF counters (lobby-ebpf) with the nightly toolchain.
    BuildEbpf,
    /// Setup, format check, clippy -D warnings, unit and integration tests,
    /// then vm-test on the 6.1 kernel and the Debian package (lintian, install,
    /// purge).
    Test,
    /// Install the binary, the systemd unit and (if absent) an example
    /// /etc/lobby/lobby.yaml.
    Install {
        /// Stage below this directory instead of / (for packaging).
        #[arg(long)]
        destdir: Option<std::path::PathBuf>,
        #[arg(long, default_value = "/usr")]
        prefix: std::path::PathBuf,
        /// Install this binary instead of building a release one.
        #[arg(long)]
        binary: Option<std::path::PathBuf>,
    },
    /// Build target/debian/lobby_VERSION_ARCH.deb: the binary, the unit, the
    /// example configuration as a conffile, man pages and completions.
    Deb {
        /// Package this binary instead of building a release one.
        #[arg(long)]
        binary: Option<std::path::PathBuf>,
    },
    /// Measure Lobby against plain forwarding, HAProxy and a hand-written
    /// nft DNAT ruleset, and the control plane; writes target/bench/.
    Bench {
        /// Fewer and shorter rounds, for development.
        #[arg(long)]
        quick: bool,
    },
    /// Rewrite the golden files and the config error corpus from what the
    /// code produces now.
    Bless,
    /// Start Lobby in a namespace topology and show connections going to the
    /// upstreams in turn; cleans up after itself.
    Demo,
    /// Fail the master of two Lobby hosts under keepalived and conntrackd
    /// (dist/ha) and show established connections going on through the
    /// backup; cleans up after itself.
    HaDemo,
    /// Run the balancing scenario (round robin, health-check removal, exact
    /// counters) on Debian's cloud kernels under QEMU: by default the
    /// newest 6.1 and the newest the apt archive offers.
    VmTest {
        /// A kernel line (6.1, 6.12) or full package version (6.1.0-56):
        /// its newest package is tested alone.
        #[arg(long)]
        kernel: Option<String>,
        /// Self-test of the harness: the guest expects one connection more
        /// than it makes, so the run must fail.
        #[arg(long)]
        wrong_expectation: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build_ebpf::run(),
        Task::Test => test::run(),
        Task::Demo => demo::run(),
        Task::HaDemo => ha_demo::run(),
        Task::Bless => bless::run(),
        Task::Deb { binary } => deb::run(binary),
        Task::Bench { quick } => bench::run(quick),
        Task::Install {
            destdir,
            prefix,
            binary,
        } => install::run(destdir, prefix, binary),
        Task::VmTest {
            kernel,
            wrong_expectation,
        } => vm_test::run(kernel.as_deref(), wrong_expectation),
    }
}
