//! One boot of the guest under QEMU's TCG (these machines have no KVM),
//! with the serial console echoed here and searched for the verdict line
//! that the guest's init prints before it powers off.
use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The line the guest ends with: `VM-TEST-RESULT: PASS` or
/// `VM-TEST-RESULT: FAIL <number of failed checks>`.
const VERDICT: &str = "VM-TEST-RESULT: ";

/// A cold guest under TCG takes about a minute; this catches a hang, not
/// slowness.
const TIMEOUT: Duration = Duration::from_secs(600);

/// Boots `vmlinuz` with `initramfs` and `cmdline` appended to the console
/// settings; Ok when the guest reports PASS.
pub fn run(vmlinuz: &Path, initramfs: &Path, cmdline: &str) -> anyhow::Result<()> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "1024"])
        // The serial console on stdout, no display, no network card: the
        // scenario's links are veths inside the guest.
        .args(["-nographic", "-nic", "none"])
        // A panic reboots at once (panic=-1), and a reboot ends QEMU, so a
        // dead guest ends the run instead of hanging it.
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {cmdline}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = qemu.spawn().with_context(|| format!("starting {qemu:?}"))?;
    let console = child.stdout.take().expect("stdout is piped");
    // Lines arrive through a channel so that the wait for them can time out.
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(console).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + TIMEOUT;
    let mut verdict = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => {
                let line = line.trim_end_matches('\r');
                println!("{line}");
                if let Some(result) = line.strip_prefix(VERDICT) {
                    verdict = Some(result.to_owned());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the guest did not finish within {TIMEOUT:?}");
            }
        }
    }
    let status = child.wait().context("waiting for QEMU")?;
    match verdict.as_deref() {
        Some("PASS") => Ok(()),
        Some(failed) => bail!("the guest's scenario reported {failed}"),
        None => bail!("the guest stopped ({status}) without a {VERDICT}line"),
    }
}
