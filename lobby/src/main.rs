use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// Lobby: layer-4 load balancing by the kernel (nftables DNAT), with exact
/// per-upstream counters (eBPF).
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a configuration file and print a summary; touches nothing.
    Check {
        /// Configuration file (default: ./lobby.yaml, /etc/lobby/lobby.yaml,
        /// ./lobby.conf, /etc/lobby/lobby.conf).
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config: _ }) => ExitCode::SUCCESS,
        None => ExitCode::SUCCESS,
    }
}
