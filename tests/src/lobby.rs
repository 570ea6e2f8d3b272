//! The real `lobby` binary, running in the load balancer's namespace with
//! its own config file, bpffs pin directory and log file.
use std::{
    ffi::OsStr,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use crate::{NetNs, wait_for};

pub struct Lobby {
    child: Option<Child>,
    /// Unmounted before `dir` is removed (fields drop in this order).
    _bpffs: Bpffs,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub pin_dir: PathBuf,
    pub log_path: PathBuf,
    pub socket_path: PathBuf,
    ns_name: String,
    launch: Launch,
    /// More arguments for the daemon.
    args: Vec<String>,
    /// Whether `socket_path` is passed with `--socket`, or is the default
    /// the daemon finds itself.
    pass_socket: bool,
}

/// How the daemon enters the load balancer's namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launch {
    /// setns before exec: only the network namespace changes.
    Setns,
    /// `ip netns exec`, as operators do: /etc/netns/NAME files are
    /// bind-mounted too (resolv.conf).
    IpNetnsExec,
}

/// The lobby binary of this workspace's build: `LOBBY_BIN`, else
/// target/debug/lobby (the xtask test builds it first).
pub fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LOBBY_BIN") {
        return path.into();
    }
    let path = target_dir().join("debug/lobby");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build -p lobby` (cargo xtask test does)",
        path.display()
    );
    path
}

/// A copy of [`binary`] that any user may run, in a directory of its own:
/// the workspace may lie below a directory other users cannot enter (a
/// clone in root's home), so a test that runs lobby as nobody runs this.
pub fn binary_for_anyone() -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::Builder::new()
        .prefix("lobby-bin")
        .tempdir_in("/tmp")
        .expect("a temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .expect("opening the temp dir to everyone");
    let copy = dir.path().join("lobby");
    std::fs::copy(binary(), &copy).expect("copying the binary");
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))
        .expect("making the copy executable by everyone");
    (dir, copy)
}

/// The workspace's cargo target directory: `CARGO_TARGET_DIR`, else
/// target/ in the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

impl Lobby {
    /// Starts lobby in `ns` with `config` and waits until it balances.
    pub fn start(ns: &NetNs, config: &str) -> Self {
        Self::start_with(ns, config, Launch::Setns)
    }

    pub fn start_with(ns: &NetNs, config: &str, launch: Launch) -> Self {
        Self::start_with_args(ns, config, launch, &[])
    }

    /// Starts lobby with more arguments, e.g. `--no-counters`.
    pub fn start_with_args(ns: &NetNs, config: &str, launch: Launch, args: &[&str]) -> Self {
        Self::start_on(ns, config, launch, args, None)
    }

    /// Starts lobby without `--socket`: its control socket is the default
    /// of `table` (the config's `nftables.table`), /run/lobby/TABLE.sock.
    pub fn start_on_table_socket(ns: &NetNs, config: &str, table: &str) -> Self {
        let socket = PathBuf::from(format!("/run/lobby/{table}.sock"));
        Self::start_on(ns, config, Launch::Setns, &[], Some(socket))
    }

    /// `default_socket`: the socket the daemon finds itself, not passed;
    /// `None`: one in the test's directory, passed with `--socket`.
    fn start_on(
        ns: &NetNs,
        config: &str,
        launch: Launch,
        args: &[&str],
        default_socket: Option<PathBuf>,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let bpffs = Bpffs::mount(dir.path().join("bpffs"));
        let pass_socket = default_socket.is_none();
        let mut lobby = Self {
            child: None,
            config_path: dir.path().join("lobby.yaml"),
            pin_dir: bpffs.0.join("lobby"),
            log_path: dir.path().join("lobby.log"),
            socket_path: default_socket.unwrap_or_else(|| dir.path().join("lobby.sock")),
            _bpffs: bpffs,
            dir,
            ns_name: ns.name.clone(),
            launch,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            pass_socket,
        };
        lobby.write_config(config);
        lobby.spawn();
        lobby.wait_for_log("lobby is balancing");
        lobby
    }

    /// Starts the binary again (after a stop or a kill), on the same
    /// config, pins and log file, and waits until it balances.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "lobby is still running");
        let before = self.log().matches("lobby is balancing").count();
        self.spawn();
        wait_for("lobby to balance again", Duration::from_secs(20), || {
            (self.log().matches("lobby is balancing").count() > before).then_some(())
        });
    }

    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, config).expect("writing the config");
    }

    /// Writes `config` and reloads it with `lobby ctl reload`, which
    /// returns once the kernel has it. (Waiting for the log's next "reload
    /// applied" after a SIGHUP could return on the config watcher's reload
    /// of an earlier write.)
    pub fn reload_with(&self, config: &str) {
        self.write_config(config);
        let reloaded = self.ctl(&["reload"]);
        assert!(
            reloaded.status.success(),
            "lobby ctl reload: {}{}\n{}",
            String::from_utf8_lossy(&reloaded.stdout),
            String::from_utf8_lossy(&reloaded.stderr),
            self.log()
        );
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file");
        let mut command = match self.launch {
            Launch::Setns => Command::new(binary()),
            Launch::IpNetnsExec => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &self.ns_name]).arg(binary());
                command
            }
        };
        command
            .arg("-c")
            .arg(&self.config_path)
            .arg("--pin-dir")
            .arg(&self.pin_dir);
        // Debug lines tell what a failing test saw; a caller that passes
        // its own level (the bench: the operators' default) keeps it.
        if !self.args.iter().any(|a| a == "-l" || a == "--log-level") {
            command.args(["-l", "debug"]);
        }
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        if self.pass_socket {
            command.arg("--socket").arg(&self.socket_path);
        }
        let ns = NetNs::attach(&self.ns_name);
        let child = match self.launch {
            // Entering only the network namespace keeps the mount
            // namespace, where the test's bpffs is.
            Launch::Setns => ns.spawn(&mut command),
            Launch::IpNetnsExec => command.spawn(),
        };
        self.child = Some(child.expect("starting lobby"));
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn wait_for_log(&mut self, needle: &str) {
        let deadline = Duration::from_secs(20);
        let start = std::time::Instant::now();
        loop {
            if self.log().contains(needle) {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "lobby exited ({status}) before logging {needle:?}; its log:\n{}",
                    self.log()
                );
            }
            if start.elapsed() > deadline {
                panic!(
                    "lobby did not log {needle:?} within {deadline:?}; its log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `lobby ctl ARGS` against this daemon: its output, whatever its exit.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary())
            .arg("ctl")
            .args(args)
            .arg("--socket")
            .arg(&self.socket_path)
            .output()
            .expect("running lobby ctl")
    }

    /// `lobby stats --json` against this daemon.
    pub fn stats(&self) -> serde_json::Value {
        let output = Command::new(binary())
            .args(["stats", "--json", "--socket"])
            .arg(&self.socket_path)
            .output()
            .expect("running lobby stats");
        assert!(
            output.status.success(),
            "lobby stats failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("lobby stats --json prints JSON")
    }

    /// The stats of one upstream of one target.
    /// Every stats entry of an upstream: one per address it has (one,
    /// with a null address, while its name never resolved).
    pub fn upstream_entries(&self, target: &str, upstream: &str) -> Vec<serde_json::Value> {
        let stats = self.stats();
        stats["targets"]
            .as_array()
            .and_then(|targets| targets.iter().find(|t| t["name"] == target))
            .and_then(|t| t["upstreams"].as_array())
            .map(|upstreams| {
                upstreams
                    .iter()
                    .filter(|u| u["name"] == upstream)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn upstream_stats(&self, target: &str, upstream: &str) -> serde_json::Value {
        let stats = self.stats();
        let found = stats["targets"]
            .as_array()
            .and_then(|targets| targets.iter().find(|t| t["name"] == target))
            .and_then(|t| t["upstreams"].as_array())
            .and_then(|upstreams| upstreams.iter().find(|u| u["name"] == upstream))
            .cloned();
        found.unwrap_or_else(|| panic!("no upstream {target}/{upstream} in {stats}"))
    }

    /// Sends SIGHUP (reload).
    pub fn reload(&self) {
        self.signal(libc::SIGHUP);
    }

    /// How many times `needle` occurs in the log.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// Waits until `needle` occurs more than `before` times in the log.
    pub fn wait_for_log_count(&self, needle: &str, before: usize) {
        wait_for(
            &format!("log line {needle:?}"),
            Duration::from_secs(20),
            || (self.log_count(needle) > before).then_some(()),
        );
    }

    /// After a clean stop: no table, program or pinned map of Lobby's is
    /// left in `ns` or the pin directory.
    pub fn assert_nothing_left(&self, ns: &NetNs) {
        assert!(self.child.is_none(), "lobby is still running");
        let tables = ns.exec("nft", &["list", "tables"]);
        assert!(
            !String::from_utf8_lossy(&tables.stdout).contains("lobby"),
            "table left behind"
        );
        assert!(
            !self.pin_dir.exists(),
            "pins left behind in {}",
            self.pin_dir.display()
        );
        let attached = ns.exec("bpftool", &["net", "show"]);
        assert!(
            !String::from_utf8_lossy(&attached.stdout).contains("lobby_"),
            "programs left attached"
        );
        // bpftool 7.1 does not list TCX links: ask the kernel.
        for interface in ns.interfaces() {
            assert_eq!(
                ns.tc_programs(&interface),
                [0, 0],
                "programs left attached to {interface}"
            );
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("lobby is running").id()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill on our own child's pid.
        let rc = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(rc, 0, "kill({signal})");
    }

    /// Sends `signal` and waits for the process to exit; returns its status.
    pub fn stop_with(&mut self, signal: i32) -> std::process::ExitStatus {
        self.signal(signal);
        let mut child = self.child.take().expect("lobby is running");
        wait_for("lobby to exit", Duration::from_secs(20), || {
            child.try_wait().expect("waiting for lobby")
        })
    }
}

impl Drop for Lobby {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- lobby log ({}) ---\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// A bpffs mounted for a test's pins, unmounted on drop.
pub struct Bpffs(pub PathBuf);

impl Bpffs {
    /// Mounts a bpffs on `path`, which it creates.
    pub fn mount(path: PathBuf) -> Self {
        std::fs::create_dir_all(&path).expect("bpffs mount point");
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting a bpffs for the test's pins");
        Self(path)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// `COMMAND...` (the lobby binary, or a wrapper such as setpriv that
/// runs it) started in `ns`'s network namespace only, as an operator's
/// command line would be: none of [`Lobby`]'s flags are added. Its output
/// goes to `output`.
pub fn spawn_in<S: AsRef<OsStr>>(ns: &NetNs, command: &[S], output: &Path) -> Child {
    let output = File::create(output).expect("a file for the output");
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name))
        .args(command)
        .stdin(Stdio::null())
        .stdout(output.try_clone().expect("output"))
        .stderr(output)
        .spawn()
        .expect("running nsenter")
}

/// `lobby ARGS` run once in `ns` (its network namespace only), stopped
/// after `deadline`: its status, everything it printed and how long it ran.
pub fn run_once(ns: &NetNs, args: &[&OsStr], deadline: Duration) -> (ExitStatus, String, Duration) {
    run_once_with(ns, &[], args, deadline)
}

/// [`run_once`], the binary started by `wrapper` (`env PATH=...`,
/// `setpriv ...`).
pub fn run_once_with(
    ns: &NetNs,
    wrapper: &[&OsStr],
    args: &[&OsStr],
    deadline: Duration,
) -> (ExitStatus, String, Duration) {
    let output = tempfile::NamedTempFile::new().expect("a file for the output");
    let binary = binary();
    let command: Vec<&OsStr> = wrapper
        .iter()
        .copied()
        .chain(std::iter::once(binary.as_os_str()))
        .chain(args.iter().copied())
        .collect();
    let mut child = spawn_in(ns, &command, output.path());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for lobby") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "lobby {args:?} still running after {deadline:?}: {}",
                std::fs::read_to_string(output.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let said = std::fs::read_to_string(output.path()).expect("the output");
    (status, said, started.elapsed())
}

/// The pids of the running children of process `pid` (of all its threads);
/// none once it is gone.
pub fn running_children(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|children| {
            children
                .split_whitespace()
                .filter_map(|child| child.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}
