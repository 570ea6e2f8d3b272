//! Project tasks: `cargo xtask <task>`.
mod bench;
mod bless;
mod build_ebpf;
mod cmd;
mod demo;
mod install;
mod setup;
mod test;

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
    /// Setup, format check, clippy -D warnings, unit and integration tests.
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build_ebpf::run(),
        Task::Test => test::run(),
        Task::Demo => demo::run(),
        Task::Bless => bless::run(),
        Task::Bench { quick } => bench::run(quick),
        Task::Install {
            destdir,
            prefix,
            binary,
        } => install::run(destdir, prefix, binary),
    }
}
