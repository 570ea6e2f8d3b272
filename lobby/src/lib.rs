//! Lobby: a layer-4 load balancer whose data plane is the kernel's.
//!
//! - [`cli`]: the command line's clap definitions (the binary parses them;
//!   the man page and shell completions are generated from them).
//! - [`config`]: YAML text to validated types (pure).
//! - [`model`]: the desired state: which upstreams each target balances over.
//! - [`nft`]: renders the desired state to nftables (pure `render`/`plan`)
//!   and applies it in one transaction; the only module that runs `nft`.
//! - [`ebpf`]: loads and attaches the counters, reads their maps; the only
//!   module that imports aya.
//! - [`health`]: TCP probes and the state machine of availability.
//! - [`dns`]: resolves upstream host names, in order, once per period.
//! - [`watch`]: notices changes of the configuration file.
//! - [`ctl`]: the control socket and `lobby stats`.
//! - [`metrics`]: the Prometheus endpoint.
//! - [`systemd`]: readiness notifications.
//! - [`process`]: running nft and ip with a script on stdin.
//! - [`daemon`]: the reconcile loop that owns the state and wires them.
pub mod cli;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod dns;
pub mod ebpf;
pub mod health;
pub mod metrics;
pub mod model;
pub mod nft;
pub mod process;
pub mod systemd;
pub mod watch;
