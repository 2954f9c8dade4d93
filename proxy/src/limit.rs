//! Caps on how many connections a listener of Keel's own serves at once (the admin API, DNS over TCP,
//! the tunnel router's handshakes), so that a peer opening connections cannot take every file
//! descriptor the data plane needs.
//!
//! [`ConnectionLimit`] sheds rather than refuses: at its limit it tells every connection that is waiting
//! on its peer (no request head yet, or idle between DNS messages) to close, and gives the new
//! connection the first slot that frees. A slow client therefore holds a slot only until the next
//! client needs it, and a flood of silent connections cannot lock out a probe; only connections that
//! are all busy at once make new ones wait, and then be closed. [`RefusedLog`] says how many were
//! closed without logging a line for each.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How long a new connection waits at the limit for a shed connection's slot before it is closed.
const SHED_WAIT: Duration = Duration::from_millis(100);
/// How long to wait after a failed accept (out of file descriptors, mostly) rather than spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A listener's connection cap; see the module documentation.
#[derive(Debug)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    /// Cancelled to shed: every connection admitted since the last shed holds this token.
    shed: CancellationToken,
    refused: RefusedLog,
}

/// A connection's place under a [`ConnectionLimit`]: hold `_slot` while the connection lives, and close
/// the connection when `shed` is cancelled while it waits on its peer.
#[derive(Debug)]
pub struct Admission {
    pub slot: OwnedSemaphorePermit,
    pub shed: CancellationToken,
}

impl ConnectionLimit {
    /// At most `max` connections at once on the listener named `listener` (for the log).
    pub fn new(listener: &'static str, max: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            shed: CancellationToken::new(),
            refused: RefusedLog::new(listener, max),
        }
    }

    /// The next connection on `listener` that got a slot, or `None` once `stop` is cancelled. A failed
    /// accept is logged and retried after a pause; a connection that found every slot busy is closed.
    pub async fn accept(
        &mut self,
        listener: &TcpListener,
        stop: &CancellationToken,
    ) -> Option<(TcpStream, SocketAddr, Admission)> {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = stop.cancelled() => return None,
            };
            match accepted {
                Ok((stream, peer)) => {
                    if let Some(admission) = self.admit().await {
                        return Some((stream, peer, admission));
                    }
                }
                Err(error) => {
                    tracing::warn!(listener = self.refused.listener, %error, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_PAUSE) => {}
                        () = stop.cancelled() => return None,
                    }
                }
            }
        }
    }

    /// A slot for a connection just accepted, or `None` (close it) when every slot stayed busy.
    pub async fn admit(&mut self) -> Option<Admission> {
        let slot = match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                self.shed.cancel();
                self.shed = CancellationToken::new();
                match tokio::time::timeout(SHED_WAIT, Arc::clone(&self.slots).acquire_owned()).await {
                    Ok(Ok(slot)) => slot,
                    _ => {
                        self.refused.count();
                        return None;
                    }
                }
            }
        };
        Some(Admission { slot, shed: self.shed.clone() })
    }
}

/// Connections closed at a limit, logged at most once a second with how many since the last line.
#[derive(Debug)]
pub struct RefusedLog {
    listener: &'static str,
    limit: usize,
    since_logged: u64,
    logged_at: Option<tokio::time::Instant>,
}

impl RefusedLog {
    pub fn new(listener: &'static str, limit: usize) -> Self {
        Self { listener, limit, since_logged: 0, logged_at: None }
    }

    /// Counts one connection closed at the limit.
    pub fn count(&mut self) {
        self.since_logged += 1;
        let now = tokio::time::Instant::now();
        if self.logged_at.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
            tracing::warn!(
                listener = self.listener,
                refused = self.since_logged,
                limit = self.limit,
                "at the connection limit: new connections are closed at once"
            );
            self.since_logged = 0;
            self.logged_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn at_the_limit_idle_connections_are_shed_for_a_new_one() {
        let mut limit = ConnectionLimit::new("test", 2);
        let first = limit.admit().await.expect("a free slot");
        let second = limit.admit().await.expect("a free slot");
        assert!(!first.shed.is_cancelled());
        // The third is admitted once a shed connection lets go of its slot.
        let (shed, slot) = (first.shed.clone(), first.slot);
        let release = tokio::spawn(async move {
            shed.cancelled().await;
            drop(slot);
        });
        let third = limit.admit().await.expect("the shed connection's slot");
        release.await.unwrap();
        assert!(second.shed.is_cancelled(), "every connection admitted before the shed is told");
        assert!(!third.shed.is_cancelled(), "the new connection is not");
    }

    #[tokio::test(start_paused = true)]
    async fn when_no_slot_frees_the_new_connection_is_closed() {
        let mut limit = ConnectionLimit::new("test", 1);
        let _busy = limit.admit().await.expect("a free slot");
        let started = tokio::time::Instant::now();
        assert!(limit.admit().await.is_none());
        assert_eq!(started.elapsed(), SHED_WAIT);
    }
}
