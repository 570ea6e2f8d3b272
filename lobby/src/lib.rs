//! Lobby: a layer-4 load balancer whose data plane is the kernel's.
//!
//! - [`config`]: YAML text to validated types (pure).
//! - [`model`]: the desired state: which upstreams each target balances over.
//! - [`nft`]: renders the desired state to nftables and applies it; the only
//!   module that runs `nft`.
//! - [`ebpf`]: loads and attaches the counters, reads their maps; the only
//!   module that imports aya.
//! - [`daemon`]: the reconcile loop that wires them together.
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
