//! Accepting connections for every listener of the daemon (control socket,
//! metrics) with a cap on how many are open at once and an idle timeout, so
//! that idle or half-open clients cannot take the descriptors that health
//! probes and nft need (issue 22: 24,000 idle connections to the metrics
//! port brought the daemon to its descriptor limit).
use std::{
    collections::VecDeque,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{Notify, Semaphore},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How many connections a listener holds and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once. Past it, each new client closes the
    /// oldest connection that has not sent a byte, or waits (with the
    /// clients behind it in the kernel's backlog, holding none of the
    /// daemon's descriptors) until a connection ends.
    pub max_connections: usize,
    /// The longest a client may take to send its whole request.
    pub request_timeout: Duration,
    /// A connection on which no byte moved either way for this long is
    /// closed, unless the daemon is working on its answer ([`Busy`]).
    pub idle_timeout: Duration,
}

/// How often a full listener says so, at most.
const FULL_WARNING_PERIOD: Duration = Duration::from_secs(60);

/// Accepts with `accept` until `cancel`, each connection handled on a task
/// of its own by `handle` within `limits`; errors of one connection are its
/// own.
pub async fn accept_until<S, Accepted, Handled>(
    cancel: &CancellationToken,
    what: &'static str,
    limits: Limits,
    accept: impl Fn() -> Accepted,
    handle: impl Fn(Watched<S>) -> Handled,
) where
    Accepted: Future<Output = io::Result<S>>,
    Handled: Future<Output = io::Result<()>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut warned_full: Option<Instant> = None;
    // Connections in order of arrival, until they end or say something.
    let mut silent: VecDeque<Silent> = VecDeque::new();
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = accept() => match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    warn!(listener = what, error = %e, "accepting a {what} connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // At the cap with a client waiting: the oldest connection
                // that never sent a byte makes room, so that held-open idle
                // clients cannot keep a real request waiting for their
                // timeouts. Others wait in the kernel's backlog.
                silent.retain(|c| !c.evict.is_cancelled() && !c.spoke.load(Ordering::Relaxed));
                if let Some(oldest) = silent.pop_front() {
                    oldest.evict.cancel();
                }
                if warned_full.is_none_or(|at| at.elapsed() >= FULL_WARNING_PERIOD) {
                    warn!(
                        listener = what,
                        max_connections = limits.max_connections,
                        "{what} connections at their cap; the oldest silent one is closed for each new one"
                    );
                    warned_full = Some(Instant::now());
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    slot = Arc::clone(&slots).acquire_owned() => {
                        slot.expect("the semaphore is never closed")
                    }
                }
            }
        };
        let activity = Arc::new(Notify::new());
        let connection = Silent {
            evict: CancellationToken::new(),
            spoke: Arc::new(AtomicBool::new(false)),
        };
        let handled = handle(Watched {
            inner: stream,
            activity: Arc::clone(&activity),
            spoke: Arc::clone(&connection.spoke),
        });
        let evict = connection.evict.clone();
        silent.push_back(connection);
        tokio::spawn(async move {
            let watched = until_idle(handled, &activity, limits.idle_timeout);
            match evict.run_until_cancelled(watched).await {
                Some(Err(e)) => debug!(listener = what, error = %e, "{what} connection ended"),
                Some(Ok(())) => {}
                None => debug!(
                    listener = what,
                    "silent {what} connection closed to make room"
                ),
            }
            // Marks it gone for the list of silent ones.
            evict.cancel();
            drop(slot);
        });
    }
}

/// Runs `handled` until it ends or `activity` stays quiet for `idle`.
async fn until_idle(
    handled: impl Future<Output = io::Result<()>>,
    activity: &Notify,
    idle: Duration,
) -> io::Result<()> {
    tokio::pin!(handled);
    loop {
        tokio::select! {
            outcome = &mut handled => return outcome,
            () = activity.notified() => {}
            () = tokio::time::sleep(idle) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("idle for {idle:?}, closed"),
                ));
            }
        }
    }
}

/// A connection as the accept loop tracks it: closed by `evict`, and
/// `spoke` once its client sent a byte.
struct Silent {
    evict: CancellationToken,
    spoke: Arc<AtomicBool>,
}

/// A connection that tells its watchdog whenever bytes move either way.
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    activity: Arc<Notify>,
    spoke: Arc<AtomicBool>,
}

impl<S> Watched<S> {
    /// The connection itself, e.g. to ask who is on the other end.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// What keeps the connection from counting as idle while the daemon
    /// works on its answer.
    pub fn busy(&self) -> Busy {
        Busy(Arc::clone(&self.activity))
    }

    fn moved(&self, bytes: usize) {
        if bytes > 0 {
            // Stores a permit when the watchdog is not waiting: no activity
            // is missed.
            self.activity.notify_one();
        }
    }
}

/// Keeps a [`Watched`] connection out of its idle timeout while the
/// daemon, not the client, takes its time: a reload that reads and applies
/// a large file.
pub struct Busy(Arc<Notify>);

impl Busy {
    /// Runs `work`, telling the watchdog every `every` that the connection
    /// is in use.
    pub async fn during<T>(&self, work: impl Future<Output = T>, every: Duration) -> T {
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                () = tokio::time::sleep(every) => self.0.notify_one(),
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.spoke.store(true, Ordering::Relaxed);
        }
        self.moved(read);
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.moved(n);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.moved(n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::{TcpListener, TcpStream},
        time::{Instant, sleep},
    };

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_a_quiet_connection_is_closed() {
        let limits = Limits {
            max_connections: 1,
            request_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let serving = cancel.clone();
        // Echoes until the client closes.
        tokio::spawn(async move {
            accept_until(
                &serving,
                "test",
                limits,
                || async { listener.accept().await.map(|(stream, _)| stream) },
                |stream| async move {
                    let (mut read, mut write) = tokio::io::split(stream);
                    tokio::io::copy(&mut read, &mut write).await.map(drop)
                },
            )
            .await;
        });
        let mut client = TcpStream::connect(addr).await.unwrap();
        let start = Instant::now();
        // Twice the idle timeout in all, but never quiet for as long.
        while start.elapsed() < limits.idle_timeout * 2 {
            sleep(limits.idle_timeout * 2 / 3).await;
            client.write_all(b"x").await.unwrap();
            let mut echo = [0u8; 1];
            client.read_exact(&mut echo).await.unwrap();
        }
        let quiet_since = Instant::now();
        assert_eq!(client.read(&mut [0u8; 1]).await.unwrap(), 0);
        assert!(quiet_since.elapsed() >= limits.idle_timeout);
        cancel.cancel();
    }
}
