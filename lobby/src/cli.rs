//! The command line: clap definitions shared by the binary and by what is
//! generated from them (man pages, shell completions).
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::ctl;

/// Lobby: layer-4 load balancing by the kernel (nftables DNAT), with exact
/// per-upstream counters (eBPF).
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Configuration file (default: ./lobby.yaml, /etc/lobby/lobby.yaml,
    /// ./lobby.conf, /etc/lobby/lobby.conf).
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// Log level.
    #[arg(short = 'l', long = "log-level", value_enum, default_value_t = LogLevel::Info)]
    pub log_level: LogLevel,
    /// Control socket that `lobby stats` talks to.
    #[arg(long, default_value = ctl::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where BPF maps are pinned; must be on a bpffs.
    #[arg(long, default_value = "/sys/fs/bpf/lobby")]
    pub pin_dir: PathBuf,
    /// Seconds between the log lines of each upstream's traffic; 0 turns
    /// them off.
    #[arg(long, default_value_t = 60)]
    pub traffic_log_interval: u64,
    /// Balance without loading the eBPF counters (stats then show zeros).
    #[arg(long)]
    pub no_counters: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Validate a configuration file and print a summary; touches nothing.
    Check {
        /// Configuration file (default: ./lobby.yaml, /etc/lobby/lobby.yaml,
        /// ./lobby.conf, /etc/lobby/lobby.conf).
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
    },
    /// Show each target's upstreams: state, address, connections, packets
    /// and bytes each way, and rates.
    Stats {
        /// The daemon's control socket.
        #[arg(long, default_value = ctl::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the JSON contract instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh every SECS seconds until interrupted.
        #[arg(long, value_name = "SECS")]
        watch: Option<u64>,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}
