//! Lobby: a layer-4 load balancer whose data plane is the kernel's.
//!
//! - [`accel`]: packet acceleration: the flowtable's interfaces (pure).
//! - [`cli`]: the command line's clap definitions (the binary parses them;
//!   the man page and shell completions are generated from them).
//! - [`config`]: YAML text to validated types (pure).
//! - [`model`]: the desired state: which upstreams each target balances over.
//! - [`nft`]: renders the desired state to nftables (pure `render`/`plan`)
//!   and applies it in one transaction; the only module that runs `nft`.
//! - [`ebpf`]: loads and attaches the counters, reads their maps; the only
//!   module that imports aya.
//! - [`netlink`]: route lookups: the interfaces toward the upstreams.
//! - [`health`]: TCP probes and the state machine of availability.
//! - [`dns`]: resolves upstream host names, in order, once per period.
//! - [`watch`]: notices changes of the configuration file.
//! - [`ctl`]: the control socket, `lobby stats` and `lobby ctl`.
//! - [`events`]: delivery of state changes to the configured command and
//!   webhook, in order, off the loop.
//! - [`metrics`]: the Prometheus endpoint.
//! - [`listen`]: accepting with a connection cap and an idle timeout, for
//!   every listener.
//! - [`systemd`]: readiness notifications.
//! - [`process`]: running nft with a script on stdin.
//! - [`reconcile`]: the reconcile core: every decision of the daemon, pure
//!   (events in, actions out).
//! - [`plane`]: the data plane the loop drives (nft, eBPF), behind a trait
//!   that tests replace with a fake.
//! - [`ownership`]: the lock that keeps a live daemon's table its own.
//! - [`traffic`]: traffic lines and reset warnings from the counters.
//! - [`conntrack`]: how full the connection-tracking table is, with a
//!   warning before it fills up, and the established connections per
//!   upstream (a ctnetlink dump) that least-connections picks by.
//! - [`nfnetlink`]: dumps over netfilter's netlink (conntrack entries, the
//!   table's named counters) without running a tool.
//! - [`parallel`]: the few jobs large enough to split over the CPUs.
//! - [`table_watch`]: the kernel's notifications of ruleset changes, heard
//!   for everyone's commits but Lobby's own.
//! - [`daemon`]: the loop that turns channels into the core's events and
//!   its actions into calls on the data plane.
pub mod accel;
pub mod cli;
pub mod config;
pub mod conntrack;
pub mod ctl;
pub mod daemon;
pub mod dns;
pub mod ebpf;
pub mod events;
pub mod health;
pub mod listen;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod nfnetlink;
pub mod nft;
pub mod ownership;
pub mod parallel;
pub mod plane;
pub mod process;
pub mod reconcile;
pub mod reloads;
pub mod systemd;
pub mod table_watch;
pub mod traffic;
pub mod watch;
