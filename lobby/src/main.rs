use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lobby::config;

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
        Some(Command::Check { config }) => check(config),
        None => ExitCode::SUCCESS,
    }
}

/// `lobby check`: exit 0 with a summary when the file is valid, 1 with every
/// error otherwise. Reads the file and nothing else.
fn check(path: Option<PathBuf>) -> ExitCode {
    let Some(path) = path.or_else(config::find_default_path) else {
        eprintln!(
            "no configuration file: -c not given and none of {} exists",
            config::DEFAULT_PATHS.join(", ")
        );
        return ExitCode::FAILURE;
    };
    match config::load(&path) {
        Ok(config) => {
            println!("{}: valid: {}", path.display(), config.summary());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}
