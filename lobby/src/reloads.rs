//! When the daemon reads its configuration file again, and which outcome
//! answers each `lobby ctl reload`.
//!
//! One read at a time: two reads in flight could end in either order, and
//! the older file would then run while the newer one is on disk, until the
//! next change of the file. A read asked for while one is in flight starts
//! when it ends; asks that pile up meanwhile are one read, since it reads
//! the file as the last of them left it.
//!
//! A control request is answered by the outcome of a read that started
//! after it asked, never by a reload already on its way: that one may have
//! read the file before the operator's last write.

/// A read of the file to start now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Read {
    /// Numbered from 1 in the order they start; 0 is the start's read.
    pub id: u64,
    /// Asked for by an operator (SIGHUP, `lobby ctl reload`): applied even
    /// when the text is the running one.
    pub forced: bool,
}

/// The reads of the file in flight or asked for, and the control requests
/// waiting for their outcome (`R`, a reply's sender).
#[derive(Debug)]
pub struct Reloads<R> {
    /// Whether a read is in flight.
    reading: bool,
    /// A read asked for while another was in flight: whether forced.
    queued: Option<bool>,
    /// The number of the next read to start.
    next: u64,
    /// Each request with the read whose outcome answers it.
    waiting: Vec<(u64, R)>,
}

impl<R> Default for Reloads<R> {
    fn default() -> Self {
        Self {
            reading: false,
            queued: None,
            next: 1,
            waiting: Vec::new(),
        }
    }
}

impl<R> Reloads<R> {
    /// Asks for a read; `reply`, when given, waits for its outcome. The
    /// read to start now, or `None` while another is in flight.
    pub fn ask(&mut self, forced: bool, reply: Option<R>) -> Option<Read> {
        // The next read to start is the first that begins after this ask.
        if let Some(reply) = reply {
            self.waiting.push((self.next, reply));
        }
        if self.reading {
            self.queued = Some(self.queued.unwrap_or(false) || forced);
            return None;
        }
        Some(self.start(forced))
    }

    /// The read in flight ended and its outcome went to the core: the read
    /// asked for meanwhile, to start now.
    pub fn ended(&mut self) -> Option<Read> {
        self.reading = false;
        let forced = self.queued.take()?;
        Some(self.start(forced))
    }

    /// The requests answered by a configuration applied: it holds every
    /// read up to `through`, the newest it came from (a newer valid read
    /// supersedes an older one before it is applied).
    pub fn applied(&mut self, through: u64) -> Vec<R> {
        self.answer(|read| read <= through)
    }

    /// The requests answered by `read`'s file refused: those that waited
    /// for it. Older reads still wait for their configuration's apply.
    pub fn refused(&mut self, read: u64) -> Vec<R> {
        self.answer(|waited_for| waited_for == read)
    }

    fn start(&mut self, forced: bool) -> Read {
        let id = self.next;
        self.next += 1;
        self.reading = true;
        Read { id, forced }
    }

    fn answer(&mut self, answered: impl Fn(u64) -> bool) -> Vec<R> {
        self.waiting
            .extract_if(.., |(read, _)| answered(*read))
            .map(|(_, reply)| reply)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(id: u64, forced: bool) -> Option<Read> {
        Some(Read { id, forced })
    }

    #[test]
    fn one_read_at_a_time_and_asks_meanwhile_are_one_read() {
        let mut reloads = Reloads::<&str>::default();
        assert_eq!(reloads.ask(false, None), read(1, false));
        assert_eq!(reloads.ask(false, None), None);
        assert_eq!(reloads.ask(true, None), None);
        assert_eq!(reloads.ask(false, None), None);
        // Forced if any ask was.
        assert_eq!(reloads.ended(), read(2, true));
        assert_eq!(reloads.ended(), None);
        assert_eq!(reloads.ask(false, None), read(3, false));
    }

    #[test]
    fn a_request_is_answered_by_a_read_that_began_after_it() {
        let mut reloads = Reloads::default();
        assert_eq!(reloads.ask(true, Some("first")), read(1, true));
        // Read 1 may have read the file before this request's write.
        assert_eq!(reloads.ask(true, Some("second")), None);
        assert_eq!(reloads.ended(), read(2, true));
        assert_eq!(reloads.applied(1), vec!["first"]);
        assert_eq!(reloads.applied(2), vec!["second"]);
    }

    #[test]
    fn a_newer_read_applied_answers_the_older_ones_it_superseded() {
        let mut reloads = Reloads::default();
        reloads.ask(true, Some("first"));
        reloads.ask(true, Some("second"));
        reloads.ended();
        reloads.ended();
        assert_eq!(reloads.applied(2), vec!["first", "second"]);
    }

    #[test]
    fn a_refused_file_answers_only_the_requests_that_waited_for_it() {
        let mut reloads = Reloads::default();
        reloads.ask(true, Some("valid"));
        reloads.ask(true, Some("broken"));
        reloads.ended();
        // Read 1's configuration is still on its way to the kernel.
        assert_eq!(reloads.refused(2), vec!["broken"]);
        assert_eq!(reloads.applied(1), vec!["valid"]);
    }
}
