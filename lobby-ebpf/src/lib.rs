#![no_std]
// This file exists to give the crate a library target: `lobby` lists it as a
// build-dependency so that edits to the eBPF program rebuild the daemon.
