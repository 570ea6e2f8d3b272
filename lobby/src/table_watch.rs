//! Notices when something besides Lobby changes its table: follows the
//! kernel's nftables notifications (what `nft monitor` prints) on a netlink
//! socket of the daemon's own, and leaves their group while Lobby's own
//! transaction commits.
//!
//! The kernel builds a notification of every object a transaction touches,
//! in the committing process, but only while some socket listens to the
//! group. Measured on nft 1.0.6 and kernel 6.18, a reload of every target
//! at 1,000 x 10 (a 0.47 MB transaction) committed in 230-420 ms alone and
//! 250-480 ms with a listener, a third slower by the medians with one that
//! never reads. Lobby's own commits are recognised by the ruleset's
//! generation instead, which every commit moves by one: a generation that
//! moved by more while Lobby was out of the group means someone else's
//! commit, and the table is checked.
use std::future::Future;

use tokio::{
    io::unix::AsyncFd,
    sync::{Mutex, watch},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info};

use crate::{
    nfnetlink::{self, Asker, DumpError, Message, Request, Subscription, attribute},
    nft,
};

// nf_tables' numbers (linux/netfilter/nfnetlink.h, nf_tables.h).
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNLGRP_NFTABLES: u32 = 7;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NFT_MSG_TRACE: u16 = 17;
const NFTA_GEN_ID: u16 = 1;
/// The table's name in every object's notification (`NFTA_TABLE_NAME`,
/// `NFTA_CHAIN_TABLE`, `NFTA_RULE_TABLE`, `NFTA_SET_TABLE`, ...).
const NFTA_OBJECT_TABLE: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("the kernel's ruleset notifications")]
    Subscribe(#[source] DumpError),
    #[error("reading the ruleset notifications")]
    Read(#[source] std::io::Error),
    #[error("joining the notifications' group again after a commit")]
    Rejoin(#[source] std::io::Error),
    #[error("a socket to read the ruleset's generation")]
    Asker(#[source] DumpError),
}

/// What a watch has heard so far, as counts: whoever reads them late
/// still tells a certain change from a doubt by which count moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heard {
    /// Notifications that named the table: another process changed it.
    pub named: u64,
    /// Times notifications were lost, or another commit came in beside
    /// Lobby's own: either may hide a change of the table.
    pub doubts: u64,
}

/// The socket that follows the ruleset's notifications for one table.
pub struct TableWatch {
    socket: AsyncFd<Subscription>,
    table: String,
    heard: watch::Sender<Heard>,
    /// Held while Lobby's own transaction commits with the socket out of
    /// the group: one at a time, so that the generation counts one commit.
    /// Holds the socket that reads the generation.
    own_commit: Mutex<Asker>,
    /// Cancelled when the watch stops reading (it ended, or the socket
    /// could not join the group again): its socket stays out of the group.
    deaf: CancellationToken,
}

impl TableWatch {
    /// Starts listening: from here on a notification about `table` in a
    /// family Lobby owns it in counts in `heard`. Needs the runtime.
    pub fn open(table: String, heard: watch::Sender<Heard>) -> Result<Self, WatchError> {
        Ok(Self {
            socket: nfnetlink::subscribe(libc::NETLINK_NETFILTER, &[NFNLGRP_NFTABLES])
                .map_err(WatchError::Subscribe)?,
            table,
            heard,
            own_commit: Mutex::new(Asker::open().map_err(WatchError::Asker)?),
            deaf: CancellationToken::new(),
        })
    }

    /// Reads notifications until `cancel` (`Ok`) or until the socket
    /// fails. Notifications it cannot read count as changes of the table,
    /// lost ones (the receive buffer overflowed) as doubts. A watch that stops
    /// reading leaves the group for good: a member nobody reads would make
    /// every commit on the host build notifications for nothing.
    pub async fn follow(&self, cancel: CancellationToken) -> Result<(), WatchError> {
        let outcome = self.read_until(cancel).await;
        self.deaf.cancel();
        let _ = self.socket.get_ref().listen(false);
        outcome
    }

    async fn read_until(&self, cancel: CancellationToken) -> Result<(), WatchError> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut commit = CommitSeen::default();
        loop {
            let received = tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                () = self.deaf.cancelled() => return Ok(()),
                received = nfnetlink::receive(&self.socket, &mut buf) => received,
            };
            match received {
                Ok(length) => {
                    if commit.names_table(&buf[..length], &self.table) {
                        self.heard.send_modify(|heard| heard.named += 1);
                    }
                }
                // Other tables' commits overflow the buffer too (a busy
                // host's): a doubt, not a change.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    debug!("ruleset notifications were lost: checking Lobby's table");
                    commit.lost();
                    self.heard.send_modify(|heard| heard.doubts += 1);
                }
                Err(e) => return Err(WatchError::Read(e)),
            }
        }
    }

    /// Runs `commit`, Lobby's own transaction, with the socket out of the
    /// group, and reports a change of the table when the ruleset's
    /// generation says another commit came in between. When the
    /// generation cannot be read, the commit runs heard, as before.
    pub async fn unheard<T, E>(&self, commit: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        let asker = self.own_commit.lock().await;
        if self.deaf.is_cancelled() {
            return commit.await;
        }
        let before = match generation(&asker) {
            Ok(before) => before,
            Err(e) => {
                debug!(error = %e, "reading the ruleset's generation: Lobby's commit is heard");
                return commit.await;
            }
        };
        if let Err(e) = self.socket.get_ref().listen(false) {
            debug!(error = %e, "leaving the ruleset notifications: Lobby's commit is heard");
            return commit.await;
        }
        let outcome = commit.await;
        if let Err(e) = self.socket.get_ref().listen(true) {
            error!(error = %e, "joining the ruleset notifications again: outside changes of the table are found by the periodic check only");
            self.deaf.cancel();
        }
        let own = u32::from(outcome.is_ok());
        if generation(&asker).ok() != Some(before.wrapping_add(own)) {
            self.heard.send_modify(|heard| heard.doubts += 1);
        }
        outcome
    }
}

/// The ruleset's generation: the kernel's count of committed
/// transactions, in the daemon's network namespace.
fn generation(asker: &Asker) -> Result<u32, DumpError> {
    let answer = asker.ask(&Request {
        subsystem: NFNL_SUBSYS_NFTABLES,
        message: NFT_MSG_GETGEN,
        family: 0,
        attributes: &[],
    })?;
    attribute(&answer, NFTA_GEN_ID)
        .and_then(|id| id.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or(DumpError::Malformed)
}

/// What the notifications read so far said of the commit they belong to:
/// a commit's notifications span many datagrams (a deleted table's name
/// every rule, set and chain) and end with its generation.
///
/// The generation alone did not tell commits apart: Lobby leaves the group
/// while its own commit runs, and a repair starts as soon as the first
/// notifications of a deletion are read, while the kernel is still sending
/// the rest; the deletion's generation then never arrived, and the next
/// outside commit went untold (the table was still checked and repaired).
/// Reproduced at 100 x 10 with `nft delete table inet lobby` every 0.3 s
/// beside another namespace's applies: 4 deletions of 40 untold. Each
/// notification also names its sender's port id, which differs from one
/// `nft` process to the next.
#[derive(Default)]
struct CommitSeen {
    /// The sender of the commit that touched the table (and that the log
    /// told), until its generation closes it.
    told: Option<u32>,
}

impl CommitSeen {
    /// Whether any notification in `received` is about `table` in a family
    /// Lobby owns it in; a datagram that cannot be read counts as one.
    /// Logs the first notification about the table of each commit: the
    /// moment an outside change is heard, once.
    fn names_table(&mut self, received: &[u8], table: &str) -> bool {
        let mut about_table = false;
        let walked = nfnetlink::walk_messages(received, &mut |message: Message| {
            if is_generation(&message) {
                self.told = None;
            } else if is_about(&message, table) {
                if self.told != Some(message.sender) {
                    info!(
                        table,
                        "a commit from outside Lobby changed its table: checking it"
                    );
                }
                self.told = Some(message.sender);
                about_table = true;
            }
        });
        about_table || walked.is_err()
    }

    /// Notifications were lost, the generation that closes a commit among
    /// them perhaps: the next one about the table is told.
    fn lost(&mut self) {
        self.told = None;
    }
}

fn is_generation(message: &Message) -> bool {
    message.kind == NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN
}

fn is_about(message: &Message, table: &str) -> bool {
    if message.kind >> 8 != NFNL_SUBSYS_NFTABLES
        || matches!(message.kind & 0xff, NFT_MSG_NEWGEN | NFT_MSG_TRACE)
    {
        return false;
    }
    if !nft::owns_family(message.family) {
        return false;
    }
    attribute(message.attributes, NFTA_OBJECT_TABLE)
        .and_then(|name| name.split(|b| *b == 0).next())
        .is_some_and(|name| name == table.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfnetlink::{message, push_attribute};

    /// Whether `received` names `table`, read as a commit's first datagram.
    fn names_table(received: &[u8], table: &str) -> bool {
        CommitSeen::default().names_table(received, table)
    }

    /// A notification of `kind` about an object of `table` in `family`.
    fn notification(kind: u16, family: u8, table: &str) -> Vec<u8> {
        sent_by(NFT_PROCESS, kind, family, table)
    }

    /// The port id of the `nft` process most notifications here come from.
    const NFT_PROCESS: u32 = 4242;

    /// [`notification`] from the socket with port id `sender`.
    fn sent_by(sender: u32, kind: u16, family: u8, table: &str) -> Vec<u8> {
        let mut body = vec![family, 0, 0, 0];
        let mut name = table.as_bytes().to_vec();
        name.push(0);
        let mut attributes = Vec::new();
        push_attribute(&mut attributes, NFTA_OBJECT_TABLE, &name);
        push_attribute(&mut attributes, 2, b"target-web\0");
        body.extend(attributes);
        let mut notification = message(NFNL_SUBSYS_NFTABLES << 8 | kind, &body);
        notification[12..16].copy_from_slice(&sender.to_ne_bytes());
        notification
    }

    #[test]
    fn notifications_about_the_own_table_in_every_owned_family() {
        const NEWRULE: u16 = 6;
        const DELTABLE: u16 = 2;
        const NEWCHAIN: u16 = 3;
        let (inet, ip, ip6, bridge) = (1, 2, 10, 7);
        assert!(names_table(&notification(NEWRULE, inet, "lb2"), "lb2"));
        assert!(names_table(&notification(DELTABLE, ip, "lb2"), "lb2"));
        assert!(names_table(&notification(NEWCHAIN, ip6, "lb2"), "lb2"));
        assert!(!names_table(&notification(NEWRULE, inet, "lobby"), "lb2"));
        assert!(!names_table(&notification(DELTABLE, bridge, "lb2"), "lb2"));
        assert!(!names_table(&notification(DELTABLE, inet, "lb20"), "lb2"));
        // A generation's attribute 1 is its number, not a table.
        let generation = notification(NFT_MSG_NEWGEN, 0, "lb2");
        assert!(!names_table(&generation, "lb2"));
        // One datagram carries several notifications.
        let both = [
            notification(NEWRULE, inet, "lobby"),
            notification(NEWRULE, inet, "lb2"),
        ]
        .concat();
        assert!(names_table(&both, "lb2"));
        // What cannot be read may have been about the table.
        assert!(names_table(&both[..20], "lb2"));
    }

    #[test]
    fn a_commit_is_told_once_and_its_generation_ends_it() {
        let inet = 1;
        let rule = notification(6, inet, "lb2");
        let generation = notification(NFT_MSG_NEWGEN, 0, "lb2");
        let mut seen = CommitSeen::default();
        assert!(seen.names_table(&rule, "lb2"));
        assert_eq!(seen.told, Some(NFT_PROCESS));
        assert!(seen.names_table(&[rule.clone(), generation.clone()].concat(), "lb2"));
        assert_eq!(seen.told, None, "the generation closes the commit");
        assert!(!seen.names_table(&generation, "lb2"));
        assert_eq!(seen.told, None);
    }

    #[test]
    fn a_commit_whose_generation_never_came_does_not_silence_the_next() {
        let inet = 1;
        let mut seen = CommitSeen::default();
        // A deletion's first notifications; Lobby then left the group for
        // its repair, and the rest of them, its generation too, never came.
        assert!(seen.names_table(&notification(2, inet, "lb2"), "lb2"));
        // The next deletion, by another nft process, is told.
        assert!(seen.names_table(&sent_by(NFT_PROCESS + 1, 2, inet, "lb2"), "lb2"));
        assert_eq!(seen.told, Some(NFT_PROCESS + 1));
        // So is one after lost notifications, from any process.
        seen.lost();
        assert_eq!(seen.told, None);
        assert!(seen.names_table(&sent_by(NFT_PROCESS + 1, 2, inet, "lb2"), "lb2"));
        assert_eq!(seen.told, Some(NFT_PROCESS + 1));
    }
}
