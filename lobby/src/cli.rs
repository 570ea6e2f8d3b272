//! The command line: clap definitions shared by the binary and by what is
//! generated from them (man pages, shell completions).
use std::path::PathBuf;

use clap::{ArgAction, Parser, Subcommand, ValueEnum};

use crate::{
    config::{self, ConfigErrors, Nftables},
    ctl,
};

/// Lobby: layer-4 load balancing by the kernel (nftables DNAT), with exact
/// per-upstream counters (eBPF).
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    disable_version_flag = true
)]
pub struct Cli {
    /// Print the version (`-v` as in the original Lobby, `-V` as clap's).
    #[arg(short = 'v', long, short_alias = 'V', action = ArgAction::Version)]
    pub version: (),
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
    /// Log level; the original Lobby's names (critical, warning,
    /// verboseDebug) are taken too, in any case.
    #[arg(
        short = 'l',
        long = "log-level",
        value_enum,
        ignore_case = true,
        default_value_t = LogLevel::Info
    )]
    pub log_level: LogLevel,
    /// Control socket that `lobby stats` talks to (default:
    /// /run/lobby/TABLE.sock, TABLE being `nftables.table`, `lobby` unless
    /// configured).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Where BPF maps are pinned; must be on a bpffs (default:
    /// /sys/fs/bpf/lobby, /sys/fs/bpf/lobby-TABLE for another table).
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Seconds between the log lines of each upstream's traffic; 0 turns
    /// them off.
    #[arg(long, default_value_t = 60)]
    pub traffic_log_interval: u64,
    /// Balance without loading the eBPF counters (stats then show zeros).
    #[arg(long)]
    pub no_counters: bool,
    /// Look at the table every 10 s instead of following the kernel's
    /// notifications of ruleset changes. While anyone listens to them, the
    /// kernel builds one for every object of every nft transaction on the
    /// host, other software's too; without them, an outside change of
    /// Lobby's table is repaired within 10 s instead of at once.
    #[arg(long)]
    pub no_table_notifications: bool,
    /// Apply each transaction by running the nft binary instead of through
    /// libnftables inside the daemon: a process per transaction, about
    /// 20 ms more per change at 1,000 targets.
    #[arg(long)]
    pub nft_process: bool,
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
        #[command(flatten)]
        daemon: DaemonSocket,
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
        #[command(flatten)]
        daemon: DaemonSocket,
        #[command(subcommand)]
        action: CtlAction,
    },
}

/// Which daemon a client command talks to: by its control socket, by its
/// table, whose default socket it finds, or by the configuration file it
/// runs, whose table it reads.
#[derive(clap::Args, Debug, PartialEq, Eq)]
pub struct DaemonSocket {
    /// The daemon's control socket.
    #[arg(long, global = true, conflicts_with = "table")]
    pub socket: Option<PathBuf>,
    /// The daemon of this table (`nftables.table`): its socket is
    /// /run/lobby/TABLE.sock.
    #[arg(long, global = true, default_value = Nftables::DEFAULT_TABLE)]
    pub table: String,
    /// The daemon running this configuration file: the socket of the
    /// file's table, as the daemon finds it when started with `-c FILE`
    /// and no `--socket` (what the systemd unit's reload relies on).
    #[arg(
        short = 'c',
        long = "config",
        value_name = "FILE",
        global = true,
        conflicts_with_all = ["socket", "table"]
    )]
    pub config: Option<PathBuf>,
}

impl DaemonSocket {
    /// The control socket; with `--config`, a file that does not validate
    /// names none, and its errors say why.
    pub fn path(&self) -> Result<PathBuf, ConfigErrors> {
        if let Some(socket) = &self.socket {
            return Ok(socket.clone());
        }
        let table = match &self.config {
            Some(file) => config::load(file)?.nftables.table,
            None => self.table.clone(),
        };
        Ok(ctl::default_socket(&table))
    }
}

#[derive(Subcommand, Debug, PartialEq, Eq)]
pub enum CtlAction {
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
pub enum LogLevel {
    #[value(alias = "critical")]
    Error,
    #[value(alias = "warning")]
    Warn,
    Info,
    Debug,
    #[value(alias = "verboseDebug")]
    Trace,
}
#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, error::ErrorKind};
    use std::path::PathBuf;

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
            Some(Command::Ctl { daemon, action }) => (daemon.path().unwrap(), action),
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn ctl_takes_a_command_and_the_socket_before_or_after_it() {
        let web1 = || ctl::UpstreamRef {
            target: "web".into(),
            upstream: "web1".into(),
        };
        let default = "/run/lobby/lobby.sock";
        let cases: [(&[&str], &str, CtlAction); 8] = [
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
            (
                &["--table", "lb2", "state"],
                "/run/lobby/lb2.sock",
                CtlAction::State { json: false },
            ),
            (
                &["reload", "--table", "lb2"],
                "/run/lobby/lb2.sock",
                CtlAction::Reload,
            ),
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
        assert!(
            parse(&["ctl", "--table", "lb2", "--socket", "/tmp/l.sock", "reload"]).is_err(),
            "a socket and a table are two answers to one question"
        );
    }

    #[test]
    fn stats_finds_the_socket_of_a_table() {
        let socket = |args: &[&str]| match parse(args).unwrap().command {
            Some(Command::Stats { daemon, .. }) => daemon.path().unwrap(),
            other => panic!("{args:?}: {other:?}"),
        };
        assert_eq!(socket(&["stats"]), PathBuf::from("/run/lobby/lobby.sock"));
        assert_eq!(
            socket(&["stats", "--table", "lb2", "--json"]),
            PathBuf::from("/run/lobby/lb2.sock")
        );
        assert_eq!(
            socket(&["stats", "--socket", "/tmp/l.sock"]),
            PathBuf::from("/tmp/l.sock")
        );
    }

    #[test]
    fn ctl_finds_the_daemon_of_a_configuration_file_by_its_table() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lobby.yaml");
        let config = r#"
lb:
  - engine: nftables
    nftables: { table: lb2 }
    targets:
      - name: web
        protocol: tcp
        port: 80
        upstream_group:
          name: pool
          distribution: round-robin
          upstreams:
            - { name: web1, host: 198.18.1.11, port: 80 }
"#;
        std::fs::write(&file, config).unwrap();
        let path = file.to_str().unwrap();
        assert_eq!(
            ctl_command(&["ctl", "-c", path, "reload"]),
            (PathBuf::from("/run/lobby/lb2.sock"), CtlAction::Reload)
        );
        assert_eq!(
            ctl_command(&["ctl", "reload", "--config", path]).0,
            PathBuf::from("/run/lobby/lb2.sock")
        );
        for other in ["--table", "--socket"] {
            assert!(
                parse(&["ctl", "-c", path, other, "x", "reload"]).is_err(),
                "the file names the daemon: {other} is a second answer"
            );
        }
        std::fs::write(
            &file,
            config.replace("port: 80\n        upstream", "port: 0\n        upstream"),
        )
        .unwrap();
        let Some(Command::Ctl { daemon, .. }) =
            parse(&["ctl", "-c", path, "reload"]).unwrap().command
        else {
            panic!("a ctl command");
        };
        let error = daemon.path().unwrap_err().to_string();
        assert!(error.contains("port"), "{error}");
    }
}
