use std::{io::IsTerminal as _, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use lobby::{config, daemon};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// Lobby: layer-4 load balancing by the kernel (nftables DNAT), with exact
/// per-upstream counters (eBPF).
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Configuration file (default: ./lobby.yaml, /etc/lobby/lobby.yaml,
    /// ./lobby.conf, /etc/lobby/lobby.conf).
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Log level.
    #[arg(short = 'l', long = "log-level", value_enum, default_value_t = LogLevel::Info)]
    log_level: LogLevel,
    /// Where BPF maps are pinned; must be on a bpffs.
    #[arg(long, default_value = "/sys/fs/bpf/lobby")]
    pin_dir: PathBuf,
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

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { config }) => check(config),
        None => match run_daemon(cli.run) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e:#}");
                ExitCode::FAILURE
            }
        },
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

fn run_daemon(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_level);
    check_privileges()?;
    let config_path = match args.config {
        Some(path) => path,
        None => lobby::config::find_default_path().context(
            "no configuration file: none of ./lobby.yaml, /etc/lobby/lobby.yaml, ./lobby.conf, /etc/lobby/lobby.conf exists; pass -c FILE",
        )?,
    };
    let options = daemon::Options {
        config_path,
        pin_dir: args.pin_dir,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        daemon::run(options, shutdown)
            .await
            .map_err(anyhow::Error::from)
    })
}

/// Completes on the first SIGINT or SIGTERM.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received, shutting down"),
            _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
        }
    })
}

/// One event a line on stderr; colours only on a terminal, so that
/// journald and files get plain text.
fn init_logging(level: LogLevel) {
    let level = match level {
        LogLevel::Error => "error",
        LogLevel::Warn => "warn",
        LogLevel::Info => "info",
        LogLevel::Debug => "debug",
        LogLevel::Trace => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(format!("lobby={level},warn")))
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Fails early, with what is missing, rather than on the first syscall.
fn check_privileges() -> anyhow::Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("reading the effective capabilities")?;
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN (nftables, tc)");
    }
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF or CAP_SYS_ADMIN (eBPF counters)");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        anyhow::bail!(
            "lobby needs {}: run it as root or grant these capabilities",
            missing.join(" and ")
        )
    }
}
