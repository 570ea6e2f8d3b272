//! systemd's notify protocol (`Type=notify`): one datagram per state change
//! to $NOTIFY_SOCKET. Outside systemd the variable is unset and nothing is
//! sent.
use std::os::{linux::net::SocketAddrExt as _, unix::net::UnixDatagram};

use tracing::warn;

/// The first ruleset is applied: Lobby balances.
pub fn ready() {
    notify("READY=1");
}

/// A reload starts; `ready` follows when it is done (`Type=notify-reload`
/// needs the monotonic timestamp).
pub fn reloading() {
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
}

pub fn stopping() {
    notify("STOPPING=1");
}

fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let sent = UnixDatagram::unbound().and_then(|socket| {
        // A leading '@' names a socket in the abstract namespace.
        match path.strip_prefix('@') {
            Some(name) => {
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
                socket.send_to_addr(state.as_bytes(), &addr)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        warn!(socket = %path, error = %e, "notifying systemd");
    }
}

fn monotonic_usec() -> u64 {
    // SAFETY: clock_gettime writes into the zeroed timespec.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_reach_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        // SAFETY: this test is the only one in this binary that touches
        // NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        ready();
        reloading();
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let n = socket.recv(&mut buf).unwrap();
        let reloading = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{reloading}"
        );
    }
}
