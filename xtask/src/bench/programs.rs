//! What Lobby's counters cost, as the kernel measures it: the run time of
//! its eBPF programs (BPF_ENABLE_STATS, type BPF_STATS_RUN_TIME), read
//! before and after a measurement. Throughput with and without counters
//! differs by less than the machine's noise; the programs' own run time
//! beside the machine's busy time does not depend on that noise.
use std::{collections::BTreeSet, os::fd::OwnedFd};

use anyhow::Context as _;
use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};

/// Turns the kernel's run-time statistics of every eBPF program on until
/// the returned descriptor is closed. No sysctl is written
/// (`kernel.bpf_stats_enabled` stays as it was): the statistics end with
/// the bench, also when it is killed. While they are on, each program run
/// also pays for two clock reads, which the figure therefore includes.
pub fn enable_run_time_stats() -> anyhow::Result<OwnedFd> {
    enable_stats(Stats::RunTime)
        .context("enabling the kernel's BPF run-time statistics (BPF_ENABLE_STATS, Linux 5.8+)")
}

/// Summed run time and runs of a set of programs.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunTime {
    pub ns: u64,
    pub runs: u64,
}

impl RunTime {
    /// The programs that process `pid` holds (as program or link
    /// descriptors): other daemons on the machine, of other tests, load
    /// programs of the same names.
    pub fn of_process(pid: u32) -> Self {
        let ids = program_ids(pid);
        assert!(
            !ids.is_empty(),
            "process {pid} holds no eBPF program: were its counters loaded?"
        );
        let mut total = Self::default();
        let mut found = 0;
        // A program of another process may go away during the walk: its
        // error is not ours.
        for program in loaded_programs().filter_map(Result::ok) {
            if ids.contains(&program.id()) {
                total.ns += program.run_time().as_nanos() as u64;
                total.runs += program.run_count();
                found += 1;
            }
        }
        assert_eq!(found, ids.len(), "the programs of process {pid}: {ids:?}");
        total
    }

    pub fn since(self, earlier: Self) -> Self {
        Self {
            ns: self.ns - earlier.ns,
            runs: self.runs - earlier.runs,
        }
    }
}

/// The ids of the eBPF programs behind process `pid`'s descriptors, from
/// their `prog_id:` lines in /proc/PID/fdinfo.
fn program_ids(pid: u32) -> BTreeSet<u32> {
    let dir = format!("/proc/{pid}/fdinfo");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect()
}
