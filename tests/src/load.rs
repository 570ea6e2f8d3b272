//! Load that runs while a test changes things: short connections without
//! pause, counted.
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use crate::{NetNs, fixtures::target_addr, server::ask_name};

/// Opens short connections to `port` without pause until stopped; counts
/// successes and failures.
pub struct ShortClients {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<JoinHandle<Vec<String>>>,
}

impl ShortClients {
    pub fn start(client: &NetNs, port: u16) -> Self {
        let (stop, ok, failed) = Default::default();
        let (stop2, ok2, failed2): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) =
            (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let ns = client.name.clone();
        let thread = std::thread::spawn(move || {
            let ns = NetNs::attach(&ns);
            let mut errors = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                match ask_name(&ns, target_addr(port)) {
                    Ok(_) => ok2.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e.to_string());
                        failed2.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        });
        Self {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    /// Stops and returns (successes, failures, error texts).
    pub fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.thread.take().unwrap().join().unwrap();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}
