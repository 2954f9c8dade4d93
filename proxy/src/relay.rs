//! Moves bytes between a downstream and an upstream TCP connection until both sides are done.
//!
//! Each direction is a pump: read into its own buffer, write all of it to the other side, count it.
//! When one side sends FIN, the pump shuts down the write half of the other side (half-close) and the
//! other direction keeps flowing until it ends too. The relay ends early when a side fails, when no byte
//! moved in either direction for the idle timeout, or when the proxy closes connections at the end of a
//! drain.
//!
//! Buffers are 64 KiB per direction and are allocated only when the first bytes arrive, so an idle
//! connection costs no buffer memory; reads fill spare capacity without zeroing it first.
//!
//! The pumps use tokio's readiness API directly (`readable()` then `try_read_buf`), one syscall per
//! chunk each way with no intermediate copies.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::Counter;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes read per syscall at most; large enough for full-speed loopback transfers.
const BUFFER_SIZE: usize = 64 * 1024;

/// Which side of the relay failed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("downstream: {0}")]
    Downstream(io::Error),
    #[error("upstream: {0}")]
    Upstream(io::Error),
}

/// How a relay ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides closed their half.
    Closed,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// The proxy closed the connection (end of a drain, fast shutdown).
    ClosedByProxy,
}

/// Counters one direction adds its bytes to (the listener's and the cluster's).
#[derive(Debug)]
pub struct DirectionCounters {
    pub from: Counter,
    pub to: Counter,
}

/// The time of the last byte moved, shared by both pumps and the idle watchdog.
struct Activity {
    start: Instant,
    last_millis: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self { start: Instant::now(), last_millis: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let millis = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_millis.store(millis, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_millis.load(Ordering::Relaxed))
    }
}

/// Relays until both directions end. `upload` counts client → upstream bytes, `download` the reverse.
pub async fn relay(
    downstream: &TcpStream,
    upstream: &TcpStream,
    idle_timeout: Option<Duration>,
    upload: &DirectionCounters,
    download: &DirectionCounters,
    close: &CancellationToken,
) -> Result<RelayEnd, RelayError> {
    let activity = Activity::new();
    let up = pump(downstream, upstream, upload, &activity, RelayError::Downstream, RelayError::Upstream);
    let down = pump(upstream, downstream, download, &activity, RelayError::Upstream, RelayError::Downstream);
    tokio::select! {
        result = async { tokio::try_join!(up, down) } => result.map(|_| RelayEnd::Closed),
        () = idle(&activity, idle_timeout) => Ok(RelayEnd::IdleTimeout),
        () = close.cancelled() => Ok(RelayEnd::ClosedByProxy),
    }
}

/// Copies one direction until EOF, then half-closes the writer. Both pumps of a relay share the two
/// sockets: tokio's readiness API takes `&TcpStream`, so no split or lock is needed.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    counters: &DirectionCounters,
    activity: &Activity,
    read_side: fn(io::Error) -> RelayError,
    write_side: fn(io::Error) -> RelayError,
) -> Result<(), RelayError> {
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        from.readable().await.map_err(read_side)?;
        if buffer.capacity() == 0 {
            buffer.reserve_exact(BUFFER_SIZE);
        }
        match from.try_read_buf(&mut buffer) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(read_side(error)),
        }
        activity.touch();
        write_all(to, &buffer).await.map_err(write_side)?;
        let length = buffer.len() as u64;
        counters.from.increment(length);
        counters.to.increment(length);
        activity.touch();
        buffer.clear();
    }
    // The reader is done: pass the FIN on, and let the other direction finish on its own.
    match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
        Ok(()) => Ok(()),
        // The peer is already gone; the other direction will see it too.
        Err(error) if error.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(error) => Err(write_side(error)),
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(written) => bytes = &bytes[written..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Resolves once nothing has moved for `timeout`; never, when there is no timeout.
async fn idle(activity: &Activity, timeout: Option<Duration>) {
    let Some(timeout) = timeout else { return std::future::pending().await };
    loop {
        let deadline = activity.last() + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}
