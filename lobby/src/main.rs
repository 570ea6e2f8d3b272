use std::{
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser as _;
use lobby::{
    cli::{Cli, Command, CtlAction, DaemonSocket, LogLevel, RunArgs},
    config, ctl, daemon,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Check { config }) => return check(config),
        Some(Command::Stats {
            daemon,
            json,
            watch,
        }) => daemon_socket(&daemon).and_then(|socket| stats(&socket, json, watch)),
        Some(Command::Ctl { daemon, action }) => {
            daemon_socket(&daemon).and_then(|socket| control(&socket, action))
        }
        None => run_daemon(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if tracing::dispatcher::has_been_set() {
                tracing::error!("{e:#}");
            } else {
                eprintln!("lobby: {e:#}");
            }
            ExitCode::FAILURE
        }
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
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            println!("{}: valid: {}", path.display(), config.summary());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}

/// How long a plain `lobby stats` samples to show rates.
const RATE_SAMPLE: Duration = Duration::from_secs(1);

/// The runtime of a client command: one thread is plenty.
fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The control socket of the daemon a client command names.
fn daemon_socket(daemon: &DaemonSocket) -> anyhow::Result<PathBuf> {
    let socket = daemon
        .path()
        .context("reading the daemon's table from its configuration file")?;
    // A file whose table was renamed since its daemon started names a
    // socket no one binds: say so rather than only that it is missing.
    if let Some(file) = &daemon.config
        && !socket.exists()
    {
        anyhow::bail!(
            "no daemon of the table {} names: {} does not exist (a daemon keeps the table it started with until it restarts)",
            file.display(),
            socket.display()
        );
    }
    Ok(socket)
}

/// `lobby ctl`: prints the daemon's answer; its refusal is the error.
fn control(socket: &std::path::Path, action: CtlAction) -> anyhow::Result<()> {
    client_runtime()?.block_on(async {
        let text = match action {
            CtlAction::Drain { upstream } => {
                ctl::admin(socket, ctl::AdminCommand::Drain, &upstream).await?
            }
            CtlAction::Enable { upstream } => {
                ctl::admin(socket, ctl::AdminCommand::Enable, &upstream).await?
            }
            CtlAction::Disable { upstream } => {
                ctl::admin(socket, ctl::AdminCommand::Disable, &upstream).await?
            }
            CtlAction::State { json: true } => {
                let report = ctl::fetch_state(socket).await?;
                serde_json::to_string_pretty(&report).expect("plain data serializes")
            }
            CtlAction::State { json: false } => {
                let table = ctl::render_state(&ctl::fetch_state(socket).await?);
                table.trim_end().to_owned()
            }
            CtlAction::Reload => ctl::reload(socket).await?,
        };
        print_out(&format!("{text}\n"))?;
        Ok(())
    })
}

fn stats(socket: &std::path::Path, json: bool, watch: Option<u64>) -> anyhow::Result<()> {
    client_runtime()?.block_on(async {
        if json && watch.is_none() {
            let report = ctl::fetch_stats(socket).await?;
            let text = serde_json::to_string_pretty(&report).expect("plain data serializes");
            print_out(&format!("{text}\n"))?;
            return Ok(());
        }
        let period = watch.map_or(RATE_SAMPLE, |secs| Duration::from_secs(secs.max(1)));
        let mut earlier = ctl::fetch_stats(socket).await?;
        loop {
            tokio::time::sleep(period).await;
            let now = ctl::fetch_stats(socket).await?;
            let text = if json {
                let line = serde_json::to_string(&now).expect("plain data serializes");
                format!("{line}\n")
            } else {
                let clear = if watch.is_some() && std::io::stdout().is_terminal() {
                    "\x1b[2J\x1b[H"
                } else {
                    ""
                };
                let table = ctl::render_table(&now, Some((&earlier, period.as_secs_f64())));
                format!("{clear}{table}")
            };
            if !print_out(&text)? || watch.is_none() {
                return Ok(());
            }
            earlier = now;
        }
    })
}

/// Writes `text` to stdout; `false` when the reader went away (`lobby stats
/// --json | head -1`), which ends the output quietly, not with a panic.
fn print_out(text: &str) -> anyhow::Result<bool> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e).context("writing to stdout"),
    }
}

fn run_daemon(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_level);
    check_privileges(!args.no_counters)?;
    let config_path = match args.config {
        Some(path) => path,
        None => config::find_default_path().with_context(|| {
            format!(
                "no configuration file: none of {} exists; pass -c FILE",
                config::DEFAULT_PATHS.join(", ")
            )
        })?,
    };
    let options = daemon::Options {
        config_path,
        pin_dir: args.pin_dir,
        socket_path: args.socket,
        traffic_log_interval: (args.traffic_log_interval > 0)
            .then(|| Duration::from_secs(args.traffic_log_interval)),
        counters: !args.no_counters,
        table_notifications: !args.no_table_notifications,
        nft_process: args.nft_process,
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        daemon::run(options, shutdown, || {})
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
/// Without counters CAP_NET_ADMIN alone is enough, as the original ran
/// under `setcap cap_net_admin,cap_net_raw+ep`.
fn check_privileges(counters: bool) -> anyhow::Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .context("reading the effective capabilities")?;
    missing_privileges(effective, counters).map_or(Ok(()), |message| anyhow::bail!(message))
}

/// What a process with the `effective` capability set lacks, said so that
/// the operator knows both remedies; `None` when it has what it needs.
fn missing_privileges(effective: u64, counters: bool) -> Option<String> {
    let has = |cap: u32| effective & (1 << cap) != 0;
    let net_admin = has(CAP_NET_ADMIN);
    let bpf = !counters || has(CAP_BPF) || has(CAP_SYS_ADMIN);
    match (net_admin, bpf) {
        (true, true) => None,
        (false, true) => {
            Some("lobby needs CAP_NET_ADMIN (nftables, tc): run it as root or grant it".to_owned())
        }
        (net_admin, false) => Some(format!(
            "lobby needs {}CAP_BPF or CAP_SYS_ADMIN (eBPF counters): run it as root, \
             grant {}, or run with --no-counters to balance without counters{}",
            if net_admin {
                ""
            } else {
                "CAP_NET_ADMIN (nftables, tc) and "
            },
            if net_admin { "it" } else { "them" },
            if net_admin {
                ""
            } else {
                " (CAP_NET_ADMIN alone is then enough)"
            },
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NET_ADMIN: u64 = 1 << CAP_NET_ADMIN;

    #[test]
    fn without_counters_cap_net_admin_is_enough() {
        assert_eq!(missing_privileges(NET_ADMIN, false), None);
        assert_eq!(
            missing_privileges(NET_ADMIN | 1 << CAP_BPF, true),
            None,
            "CAP_BPF for the counters"
        );
        assert_eq!(
            missing_privileges(NET_ADMIN | 1 << CAP_SYS_ADMIN, true),
            None
        );
    }

    #[test]
    fn a_missing_capability_is_named_with_the_way_around_it() {
        let message = missing_privileges(NET_ADMIN, true).unwrap();
        assert_eq!(
            message,
            "lobby needs CAP_BPF or CAP_SYS_ADMIN (eBPF counters): run it as root, \
             grant it, or run with --no-counters to balance without counters"
        );
        let message = missing_privileges(0, true).unwrap();
        assert!(
            message.starts_with(
                "lobby needs CAP_NET_ADMIN (nftables, tc) and CAP_BPF or CAP_SYS_ADMIN"
            ) && message.contains("--no-counters"),
            "{message}"
        );
        let message = missing_privileges(0, false).unwrap();
        assert!(
            message.contains("CAP_NET_ADMIN") && !message.contains("CAP_BPF"),
            "{message}"
        );
    }
}
