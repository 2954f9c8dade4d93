//! Moves bytes between a downstream and an upstream TCP connection until both sides are done.
//!
//! Each direction is a pump: read into its own buffer, write all of it to the other side, count it.
//! When one side sends FIN, the pump shuts down the write half of the other side (half-close) and the
//! other direction keeps flowing until it ends too. The relay ends early when a side fails, when no byte
//! moved in either direction for the idle timeout, or when the proxy closes connections at the end of a
//! drain.
//!
//! Buffers are 32 KiB per direction, allocated when bytes arrive and given back after a read that drained
//! the socket, so an idle connection holds no buffer memory; reads fill spare capacity without zeroing it.
//!
//! One `recv` and one `send` per chunk each way, and no wasted `recv` that only says EAGAIN (see `pump`).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::Counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes read per syscall at most. A read that drains the socket is a sleep and a wake-up; 64 KiB reads
/// drained it every few reads where HAProxy's 16 KiB rarely do. A paired run beside HAProxy, one iperf3
/// stream: 32 KiB 1.00x HAProxy's where 64 KiB gave 0.74x, eight streams 1.15x against 1.04x, requests
/// per second and p99 within the noise (0.94x against 0.97x, 0.92x against 0.89x).
const BUFFER_SIZE: usize = 32 * 1024;

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
pub(crate) struct Activity {
    start: Instant,
    last_millis: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Self {
        Self { start: Instant::now(), last_millis: AtomicU64::new(0) }
    }

    pub(crate) fn touch(&self) {
        let millis = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_millis.store(millis, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_millis.load(Ordering::Relaxed))
    }
}

/// Relays until both directions end. `upload` counts client → upstream bytes, `download` the reverse.
pub async fn relay(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    idle_timeout: Option<Duration>,
    upload: &DirectionCounters,
    download: &DirectionCounters,
    close: &CancellationToken,
) -> Result<RelayEnd, RelayError> {
    let activity = Activity::new();
    let (mut down_read, mut down_write) = downstream.split();
    let (mut up_read, mut up_write) = upstream.split();
    let up =
        pump(&mut down_read, &mut up_write, upload, &activity, RelayError::Downstream, RelayError::Upstream);
    let down = pump(
        &mut up_read,
        &mut down_write,
        download,
        &activity,
        RelayError::Upstream,
        RelayError::Downstream,
    );
    tokio::select! {
        result = async { tokio::try_join!(up, down) } => result.map(|_| RelayEnd::Closed),
        () = idle(&activity, idle_timeout) => Ok(RelayEnd::IdleTimeout),
        () = close.cancelled() => Ok(RelayEnd::ClosedByProxy),
    }
}

/// Copies one direction until EOF, then half-closes the writer.
///
/// Reads go through `AsyncRead` on the borrowed half rather than `try_read`: after a read shorter than
/// the buffer, tokio knows the socket is drained and waits for the next edge instead of issuing one more
/// `recv` that would only say EAGAIN (which doubled the syscalls per request before).
async fn pump(
    from: &mut ReadHalf<'_>,
    to: &mut WriteHalf<'_>,
    counters: &DirectionCounters,
    activity: &Activity,
    read_side: fn(io::Error) -> RelayError,
    write_side: fn(io::Error) -> RelayError,
) -> Result<(), RelayError> {
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        if buffer.capacity() == 0 {
            // Allocate only once there is something to read: an idle connection holds no buffer.
            let stream: &TcpStream = from.as_ref();
            stream.readable().await.map_err(read_side)?;
            buffer.reserve_exact(BUFFER_SIZE);
        }
        if from.read_buf(&mut buffer).await.map_err(read_side)? == 0 {
            break;
        }
        activity.touch();
        to.write_all(&buffer).await.map_err(write_side)?;
        let length = buffer.len();
        counters.from.increment(length as u64);
        counters.to.increment(length as u64);
        activity.touch();
        if length < BUFFER_SIZE {
            // A short read drained the socket: the connection may now sit idle (a pooled keep-alive
            // connection, say), so give the buffer back and take one again when bytes arrive. A bulk
            // transfer fills the buffer on every read and keeps it.
            buffer = Vec::new();
        } else {
            buffer.clear();
        }
    }
    // The reader is done: pass the FIN on, and let the other direction finish on its own.
    match to.shutdown().await {
        Ok(()) => Ok(()),
        // The peer is already gone; the other direction will see it too.
        Err(error) if error.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(error) => Err(write_side(error)),
    }
}

/// Resolves once nothing has moved for `timeout`; never, when there is no timeout.
pub(crate) async fn idle(activity: &Activity, timeout: Option<Duration>) {
    let Some(timeout) = timeout else { return std::future::pending().await };
    loop {
        let deadline = activity.last() + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}
