//! A relay between two TCP connections that moves long bursts without copying them through user space:
//! `splice(2)` moves the bytes from one socket into a pipe and from the pipe into the other socket, page
//! references instead of copies. Used where the proxy only forwards (the tunnels' hops); same behaviour as
//! [`crate::relay::relay`]: half-close passed on, idle timeout, closed with the proxy's close token.
//!
//! Small bursts (a request, a reply) are copied instead: for them a read and a write cost less than two
//! splices and a pipe. Each burst's first `COPY_FIRST` bytes go through a per-thread buffer, and only
//! a burst longer than that is spliced. A direction holds a pipe (two descriptors) only while a long
//! burst is on its way: when its socket has nothing more to read, the emptied pipe goes back to a small
//! per-thread pool, and the next long burst takes one from there (or makes one). An idle connection
//! therefore costs its two sockets and nothing more, which is what lets a sidecar hold tens of
//! thousands of them. Without a pipe to be had (out of descriptors), bursts are copied whole. Pipes are
//! grown to `PIPE_SIZE` when the kernel allows, so that one `splice` moves a large chunk.
//!
//! This module and the DNS server's batch I/O are the proxy's only `unsafe` code: the system calls, on
//! descriptors this module owns or borrows for the duration of the call.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;

use crate::relay::{Activity, DirectionCounters, RelayEnd, RelayError, idle};

/// Bytes one `splice` moves at most.
const CHUNK: usize = 1 << 20;
/// The pipe size asked for (the kernel's default ceiling for unprivileged users is 1 MiB).
const PIPE_SIZE: libc::c_int = 1 << 20;

/// Emptied pipes kept per thread for the next burst; more are closed.
const SPARE_PIPES: usize = 64;
/// Bytes of each burst copied through user space before the rest is spliced (see [`pump`]).
const COPY_FIRST: usize = 16 << 10;

thread_local! {
    static SPARE: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    /// The buffer a burst's first bytes are copied through: one per thread, used within one poll.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; COPY_FIRST].into_boxed_slice());
}

/// A pipe from this thread's spares, or a new one.
fn take_pipe() -> io::Result<Pipe> {
    match SPARE.with(|spare| spare.borrow_mut().pop()) {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// Gives back an empty pipe.
fn give_back(pipe: Pipe) {
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARE_PIPES {
            spare.push(pipe);
        }
    });
}

/// A pipe, closed when dropped.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds: [RawFd; 2] = [-1, -1];
        // SAFETY: `fds` is a valid array of two descriptors for the kernel to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and now owned here alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A larger pipe moves more per call; if the kernel refuses, the default (64 KiB) still works.
        // SAFETY: F_SETPIPE_SZ on a pipe this function owns.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Self { read, write })
    }
}

/// Moves up to `length` bytes from `from` to `to` without blocking; `Ok(0)` is end of file.
fn splice(from: RawFd, to: RawFd, length: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are open for the duration of the call (borrowed from live objects by
    // the callers), and null offsets mean "the current position", as pipes and sockets require.
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            length,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if moved < 0 { Err(io::Error::last_os_error()) } else { Ok(moved as usize) }
}

/// Relays until both directions end, like [`crate::relay::relay`].
pub async fn relay(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    idle_timeout: Option<Duration>,
    upload: &DirectionCounters,
    download: &DirectionCounters,
    close: &CancellationToken,
) -> Result<RelayEnd, RelayError> {
    let activity = Activity::new();
    let (down_read, down_write) = downstream.split();
    let (up_read, up_write) = upstream.split();
    let upload_pump =
        pump(down_read, up_write, upload, &activity, RelayError::Downstream, RelayError::Upstream);
    let download_pump =
        pump(up_read, down_write, download, &activity, RelayError::Upstream, RelayError::Downstream);
    tokio::select! {
        result = async { tokio::try_join!(upload_pump, download_pump) } => result.map(|_| RelayEnd::Closed),
        () = idle(&activity, idle_timeout) => Ok(RelayEnd::IdleTimeout),
        () = close.cancelled() => Ok(RelayEnd::ClosedByProxy),
    }
}

/// One direction, burst by burst, until end of file; then the write side is shut down.
///
/// A burst starts with a copy through a per-thread buffer of [`COPY_FIRST`] bytes: most bursts are a
/// request or a reply, smaller than that, and for them one read and one write cost less than two
/// splices and a pipe (and a short read tells tokio the socket is drained, so no further call is made
/// to find out). A read that fills the buffer means more is queued: the rest of the burst is spliced.
async fn pump(
    mut from: ReadHalf<'_>,
    to: WriteHalf<'_>,
    counters: &DirectionCounters,
    activity: &Activity,
    read_side: fn(io::Error) -> RelayError,
    write_side: fn(io::Error) -> RelayError,
) -> Result<(), RelayError> {
    let to: &TcpStream = to.as_ref();
    loop {
        let copied = copy_first(&mut from, to, counters, activity, read_side, write_side).await?;
        let ended = match copied {
            Burst::EndOfFile => true,
            Burst::Copied => false,
            Burst::More => splice_rest(from.as_ref(), to, counters, activity, read_side, write_side).await?,
        };
        if ended {
            break;
        }
    }
    // The reader is done: pass the FIN on, and let the other direction finish on its own.
    match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(error) => Err(write_side(error)),
    }
}

/// What the first read of a burst found.
enum Burst {
    EndOfFile,
    /// All of it, copied.
    Copied,
    /// A full buffer, copied; more is queued.
    More,
}

/// Waits for a burst and copies its first [`COPY_FIRST`] bytes.
async fn copy_first(
    from: &mut ReadHalf<'_>,
    to: &TcpStream,
    counters: &DirectionCounters,
    activity: &Activity,
    read_side: fn(io::Error) -> RelayError,
    write_side: fn(io::Error) -> RelayError,
) -> Result<Burst, RelayError> {
    // Read into the thread's buffer and write at once, within one poll; only bytes the other socket
    // has no room for are kept, in a buffer of their own, to wait for room.
    let mut unwritten = Vec::new();
    let read = std::future::poll_fn(|cx| {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buffer = ReadBuf::new(&mut scratch[..]);
            if let Err(error) = ready!(Pin::new(&mut *from).poll_read(cx, &mut buffer)) {
                return Poll::Ready(Err(read_side(error)));
            }
            let read = buffer.filled().len();
            let written = match to.try_write(&scratch[..read]) {
                Ok(written) => written,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => 0,
                Err(error) => return Poll::Ready(Err(write_side(error))),
            };
            unwritten.extend_from_slice(&scratch[written..read]);
            Poll::Ready(Ok(read))
        })
    })
    .await?;
    if read == 0 {
        return Ok(Burst::EndOfFile);
    }
    activity.touch();
    let mut rest = &unwritten[..];
    while !rest.is_empty() {
        to.writable().await.map_err(write_side)?;
        match to.try_write(rest) {
            Ok(moved) => rest = &rest[moved..],
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(write_side(error)),
        }
    }
    counters.from.increment(read as u64);
    counters.to.increment(read as u64);
    Ok(if read == COPY_FIRST { Burst::More } else { Burst::Copied })
}

/// Splices the rest of a burst, socket to pipe to socket, until `from` has nothing more to read;
/// `true` at end of file. Without a pipe to be had (out of descriptors), the burst goes on being copied.
async fn splice_rest(
    from: &TcpStream,
    to: &TcpStream,
    counters: &DirectionCounters,
    activity: &Activity,
    read_side: fn(io::Error) -> RelayError,
    write_side: fn(io::Error) -> RelayError,
) -> Result<bool, RelayError> {
    let Ok(pipe) = take_pipe() else { return Ok(false) };
    let mut in_pipe = 0usize;
    loop {
        if in_pipe == 0 {
            match from.try_io(Interest::READABLE, || splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK))
            {
                Ok(0) => {
                    give_back(pipe);
                    return Ok(true);
                }
                Ok(moved) => {
                    in_pipe = moved;
                    activity.touch();
                }
                // Nothing more to read for now: the empty pipe goes back until the next long burst.
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    give_back(pipe);
                    return Ok(false);
                }
                // The pipe is closed with the connection, never reused.
                Err(error) => return Err(read_side(error)),
            }
        }
        to.writable().await.map_err(write_side)?;
        match to.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), to.as_raw_fd(), in_pipe)) {
            Ok(moved) => {
                in_pipe -= moved;
                counters.from.increment(moved as u64);
                counters.to.increment(moved as u64);
                activity.touch();
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(error) => return Err(write_side(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use metrics::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_whole_and_half_close_passes_through() {
        // client <-> (a | relay | b) <-> server
        let (mut client, mut a) = pair().await;
        let (mut b, mut server) = pair().await;
        let counters = || DirectionCounters { from: Counter::noop(), to: Counter::noop() };
        let (up, down, close) = (counters(), counters(), CancellationToken::new());
        let relay = tokio::spawn(async move { relay(&mut a, &mut b, None, &up, &down, &close).await });

        let payload: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.unwrap();
            reply
        });
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert!(received == payload, "the bytes differ");
        // The client's FIN arrived; the other direction still works until the server closes too.
        server.write_all(b"done").await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
        assert_eq!(relay.await.unwrap().unwrap(), RelayEnd::Closed);
        // The long burst was spliced: its pipe is back among this thread's spares.
        assert!(SPARE.with_borrow(Vec::len) > 0, "4 MiB crossed without a pipe");
    }

    fn pipes_open() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("pipe:"))
            .count()
    }

    #[tokio::test]
    async fn short_messages_take_no_pipe_and_idle_relays_hold_none() {
        let before = pipes_open();
        let counters = || DirectionCounters { from: Counter::noop(), to: Counter::noop() };
        let mut ends = Vec::new();
        for _ in 0..200 {
            let (mut client, mut a) = pair().await;
            let (mut b, mut server) = pair().await;
            tokio::spawn(async move {
                let (up, down, close) = (counters(), counters(), CancellationToken::new());
                relay(&mut a, &mut b, None, &up, &down, &close).await
            });
            client.write_all(b"ping").await.unwrap();
            let mut got = [0u8; 4];
            server.read_exact(&mut got).await.unwrap();
            server.write_all(b"pong").await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"pong");
            ends.push((client, server));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // 200 relays, each having moved a short message both ways: copied, no pipe opened.
        assert_eq!(pipes_open().saturating_sub(before), 0, "pipes opened for short messages");
        // Each then carries a long burst, spliced: the pipes go back to the spares when it ends (two
        // descriptors a pipe), where each relay used to hold two pipes for its whole life (800).
        let long = vec![7u8; 4 * COPY_FIRST];
        for (client, server) in &mut ends {
            client.write_all(&long).await.unwrap();
            let mut got = vec![0u8; long.len()];
            server.read_exact(&mut got).await.unwrap();
            assert!(got == long);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let held = pipes_open().saturating_sub(before);
        assert!(held > 0 && held <= 2 * SPARE_PIPES, "{held} pipe descriptors for 200 idle relays");
    }
}
