//! Headless Chromium (Debian's `chromium`) inside a namespace, driven over
//! the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
//! messages ended by a NUL byte, commands on its fd 3, answers and events
//! on its fd 4). A pipe rather than `--remote-debugging-port`: no port to
//! open, no websocket client, and the live page can be read many times
//! without a reload, which `--dump-dom` cannot do.
//!
//! The browser runs in a process group of its own, killed on drop with
//! every process it started. Its namespace has no route out, so nothing it
//! tries on its own (updates, safe browsing) leaves it.
use std::{
    fs::File,
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::{NetNs, command_exists, requires};

/// How long one command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// The viewport, also the screenshot's size.
pub const WIDTH: u32 = 1280;
pub const HEIGHT: u32 = 800;

/// One page of a headless Chromium, from its first message to its kill.
pub struct Browser {
    child: Child,
    commands: File,
    messages: Receiver<Value>,
    next_id: u64,
    session: String,
    /// Console messages, exceptions and log entries of level warning or
    /// error, as the protocol reported them.
    complaints: Vec<Value>,
    stderr_path: PathBuf,
    _profile: tempfile::TempDir,
}

/// Whether Chromium is installed. Outside CI its absence skips the test
/// with a message; under CI=true it fails it.
pub fn available() -> bool {
    requires(if command_exists("chromium") {
        Vec::new()
    } else {
        vec!["chromium (Debian's package; `cargo xtask setup` installs it)"]
    })
}

impl Browser {
    /// Starts Chromium in `ns` and opens `url` in a page of `WIDTH` x
    /// `HEIGHT`.
    pub fn open(ns: &NetNs, url: &str) -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let stderr_path = profile.path().join("chromium.log");
        let (to_browser, commands) = pipe();
        let (messages, from_browser) = pipe();
        let (read_fd, write_fd) = (to_browser.as_raw_fd(), from_browser.as_raw_fd());
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &ns.name, "chromium"])
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-pipe",
                "--enable-logging=stderr",
                "--v=0",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--mute-audio",
            ])
            .arg(format!("--window-size={WIDTH},{HEIGHT}"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path).expect("chromium's log"))
            .process_group(0);
        // SAFETY: dup2 is async-signal-safe; both fds stay open in the
        // parent until after the spawn.
        unsafe {
            command.pre_exec(move || {
                for (from, to) in [(read_fd, 3), (write_fd, 4)] {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("starting chromium");
        drop((to_browser, from_browser));
        let (sender, receiver) = mpsc::channel();
        std::thread::spawn(move || {
            for message in BufReader::new(File::from(messages)).split(0) {
                let Ok(message) = message else { return };
                let value = serde_json::from_slice(&message).expect("chromium sends JSON");
                if sender.send(value).is_err() {
                    return;
                }
            }
        });
        let mut browser = Self {
            child,
            commands: File::from(commands),
            messages: receiver,
            next_id: 0,
            session: String::new(),
            complaints: Vec::new(),
            stderr_path,
            _profile: profile,
        };
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"}));
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        browser.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            browser.call(domain, json!({}));
        }
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": false}),
        );
        browser.call("Page.navigate", json!({"url": url}));
        browser
    }

    /// Sends a command (to the page once attached) and returns its result,
    /// keeping the complaints that arrive meanwhile.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message).expect("plain data serializes");
        bytes.push(0);
        if let Err(e) = self.commands.write_all(&bytes) {
            panic!("sending {method} to chromium: {e}{}", self.stderr());
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = match self.messages.recv_timeout(left) {
                Ok(message) => message,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("chromium did not answer {method} within {COMMAND_TIMEOUT:?}")
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("chromium exited during {method}{}", self.stderr())
                }
            };
            if message["id"] == id {
                if let Some(error) = message.get("error") {
                    panic!("chromium refused {method}: {error}");
                }
                return message["result"].clone();
            }
            self.keep_if_complaint(message);
        }
    }

    fn keep_if_complaint(&mut self, event: Value) {
        let params = &event["params"];
        let complaint = match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => true,
            Some("Runtime.consoleAPICalled") => {
                matches!(
                    params["type"].as_str(),
                    Some("error" | "warning" | "assert")
                )
            }
            Some("Log.entryAdded") => {
                matches!(params["entry"]["level"].as_str(), Some("error" | "warning"))
            }
            _ => false,
        };
        if complaint {
            self.complaints.push(event);
        }
    }

    /// The value of a JavaScript expression in the page; an exception fails
    /// the test.
    pub fn evaluate(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Writes what the page shows now as a PNG.
    pub fn screenshot(&mut self, path: &Path) {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot in base64");
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// What the page's scripts complained of: exceptions, console errors
    /// and warnings, failed loads, in the protocol's events and in
    /// Chromium's own log ("Uncaught ..." and console lines).
    pub fn complaints(&mut self) -> Vec<String> {
        // Take the events that came after the last command.
        while let Ok(event) = self.messages.try_recv() {
            self.keep_if_complaint(event);
        }
        let mut found: Vec<String> = self.complaints.iter().map(Value::to_string).collect();
        let log = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        found.extend(
            log.lines()
                .filter(|line| line.contains("Uncaught") || line.contains(":CONSOLE("))
                .map(str::to_owned),
        );
        found
    }

    fn stderr(&self) -> String {
        let log = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        format!("; chromium's log:\n{log}")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill of the process group this browser leads.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A pipe, reading end first, both ends close-on-exec and numbered 10 or
/// above: the child's fds 3 and 4 are made from them by dup2, which would
/// clobber one of them if it were already 3 or 4.
fn pipe() -> (OwnedFd, OwnedFd) {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    (above(reader.into()), above(writer.into()))
}

fn above(fd: OwnedFd) -> OwnedFd {
    // SAFETY: fcntl on an open fd; the new fd is owned by the result.
    let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
    assert!(copy >= 0, "fcntl: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(copy) }
}
