use std::{
    io::{IsTerminal as _, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{ArgAction, Parser, Subcommand, ValueEnum};
use lobby::{config, ctl, daemon};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// Lobby: layer-4 load balancing by the kernel (nftables DNAT), with exact
/// per-upstream counters (eBPF).
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    disable_version_flag = true
)]
struct Cli {
    /// Print the version (`-v` as in the original Lobby, `-V` as clap's).
    #[arg(short = 'v', long, short_alias = 'V', action = ArgAction::Version)]
    version: (),
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
    /// Log level; the original Lobby's names (critical, warning,
    /// verboseDebug) are taken too, in any case.
    #[arg(
        short = 'l',
        long = "log-level",
        value_enum,
        ignore_case = true,
        default_value_t = LogLevel::Info
    )]
    log_level: LogLevel,
    /// Control socket that `lobby stats` talks to.
    #[arg(long, default_value = ctl::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Where BPF maps are pinned; must be on a bpffs.
    #[arg(long, default_value = "/sys/fs/bpf/lobby")]
    pin_dir: PathBuf,
    /// Seconds between the log lines of each upstream's traffic; 0 turns
    /// them off.
    #[arg(long, default_value_t = 60)]
    traffic_log_interval: u64,
    /// Balance without loading the eBPF counters (stats then show zeros).
    #[arg(long)]
    no_counters: bool,
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
    /// Runtime control: drain, enable or disable an upstream until the next
    /// restart; show the state; reload the configuration.
    Ctl {
        /// The daemon's control socket.
        #[arg(long, global = true, default_value = ctl::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(subcommand)]
        action: CtlAction,
    },
}

#[derive(Subcommand, Debug, PartialEq, Eq)]
enum CtlAction {
    /// No new connections to the upstream; established ones continue.
    Drain {
        #[arg(value_name = "TARGET/UPSTREAM")]
        upstream: ctl::UpstreamRef,
    },
    /// Back to the configured state.
    Enable {
        #[arg(value_name = "TARGET/UPSTREAM")]
        upstream: ctl::UpstreamRef,
    },
    /// Out of rotation at once.
    Disable {
        #[arg(value_name = "TARGET/UPSTREAM")]
        upstream: ctl::UpstreamRef,
    },
    /// Every upstream's health, admin state and weight.
    State {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Reload the configuration file, as SIGHUP does, and print the outcome.
    Reload,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogLevel {
    #[value(alias = "critical")]
    Error,
    #[value(alias = "warning")]
    Warn,
    Info,
    Debug,
    #[value(alias = "verboseDebug")]
    Trace,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Check { config }) => return check(config),
        Some(Command::Stats {
            socket,
            json,
            watch,
        }) => stats(&socket, json, watch),
        Some(Command::Ctl { socket, action }) => control(&socket, action),
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
    check_privileges()?;
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

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, error::ErrorKind};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("lobby").chain(args.iter().copied()))
    }

    #[test]
    fn the_parser_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn v_prints_the_version_as_in_the_original() {
        for flag in ["-v", "-V", "--version"] {
            let error = parse(&[flag]).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::DisplayVersion, "{flag}");
            assert_eq!(
                error.to_string(),
                format!("lobby {}\n", env!("CARGO_PKG_VERSION"))
            );
        }
    }

    #[test]
    fn log_levels_take_the_originals_names_in_any_case() {
        let level = |name: &str| parse(&["-l", name]).unwrap().run.log_level;
        assert_eq!(level("critical"), LogLevel::Error);
        assert_eq!(level("warning"), LogLevel::Warn);
        assert_eq!(level("WARNING"), LogLevel::Warn);
        assert_eq!(level("Info"), LogLevel::Info);
        assert_eq!(level("debug"), LogLevel::Debug);
        assert_eq!(level("verboseDebug"), LogLevel::Trace);
        assert_eq!(level("verbosedebug"), LogLevel::Trace);
        assert_eq!(level("trace"), LogLevel::Trace);
        assert_eq!(level("warn"), LogLevel::Warn);
        assert!(parse(&["-l", "loud"]).is_err());
        let cli = parse(&["-l", "warning", "-c", "/etc/lobby/lobby.conf"]).unwrap();
        assert_eq!(cli.run.config, Some(PathBuf::from("/etc/lobby/lobby.conf")));
        assert_eq!(cli.run.log_level, LogLevel::Warn);
    }

    fn ctl_command(args: &[&str]) -> (PathBuf, CtlAction) {
        match parse(args).unwrap().command {
            Some(Command::Ctl { socket, action }) => (socket, action),
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn ctl_takes_a_command_and_the_socket_before_or_after_it() {
        let web1 = || ctl::UpstreamRef {
            target: "web".into(),
            upstream: "web1".into(),
        };
        let default = ctl::DEFAULT_SOCKET;
        let cases: [(&[&str], &str, CtlAction); 6] = [
            (
                &["drain", "web/web1"],
                default,
                CtlAction::Drain { upstream: web1() },
            ),
            (
                &["--socket", "/tmp/l.sock", "enable", "web/web1"],
                "/tmp/l.sock",
                CtlAction::Enable { upstream: web1() },
            ),
            (
                &["disable", "web/web1", "--socket", "/tmp/l.sock"],
                "/tmp/l.sock",
                CtlAction::Disable { upstream: web1() },
            ),
            (
                &["state", "--json"],
                default,
                CtlAction::State { json: true },
            ),
            (&["state"], default, CtlAction::State { json: false }),
            (&["reload"], default, CtlAction::Reload),
        ];
        for (args, socket, action) in cases {
            let args: Vec<&str> = std::iter::once("ctl").chain(args.iter().copied()).collect();
            assert_eq!(
                ctl_command(&args),
                (PathBuf::from(socket), action),
                "{args:?}"
            );
        }
        let error = parse(&["ctl", "drain", "web"]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("expected TARGET/UPSTREAM such as web/web1"),
            "{error}"
        );
        assert!(parse(&["ctl"]).is_err());
    }
}
