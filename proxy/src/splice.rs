//! A relay between two TCP connections that never copies the bytes through user space: `splice(2)`
//! moves them from one socket into a pipe and from the pipe into the other socket, page references
//! instead of copies. Used where the proxy only forwards (the tunnels' hops); same behaviour as
//! [`crate::relay::relay`]: half-close passed on, idle timeout, closed with the proxy's close token.
//!
//! Each direction has its own pipe (two descriptors), held only while the relay runs. The pipe is grown
//! to [`PIPE_SIZE`] when the kernel allows, so that one `splice` moves a large chunk.
//!
//! This module and the DNS server's batch I/O are the proxy's only `unsafe` code: the system calls, on
//! descriptors this module owns or borrows for the duration of the call.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::relay::{Activity, DirectionCounters, RelayEnd, RelayError, idle};

/// Bytes one `splice` moves at most.
const CHUNK: usize = 1 << 20;
/// The pipe size asked for (the kernel's default ceiling for unprivileged users is 1 MiB).
const PIPE_SIZE: libc::c_int = 1 << 20;

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
    let (up_pipe, down_pipe) = match (Pipe::new(), Pipe::new()) {
        (Ok(up), Ok(down)) => (up, down),
        // Out of descriptors for pipes: the copying relay needs none.
        _ => return crate::relay::relay(downstream, upstream, idle_timeout, upload, download, close).await,
    };
    let activity = Activity::new();
    let (down, up): (&TcpStream, &TcpStream) = (downstream, upstream);
    let upload_pump =
        pump(down, up, &up_pipe, upload, &activity, RelayError::Downstream, RelayError::Upstream);
    let download_pump =
        pump(up, down, &down_pipe, download, &activity, RelayError::Upstream, RelayError::Downstream);
    tokio::select! {
        result = async { tokio::try_join!(upload_pump, download_pump) } => result.map(|_| RelayEnd::Closed),
        () = idle(&activity, idle_timeout) => Ok(RelayEnd::IdleTimeout),
        () = close.cancelled() => Ok(RelayEnd::ClosedByProxy),
    }
}

/// One direction: socket → pipe → socket until end of file, then the write side is shut down.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    pipe: &Pipe,
    counters: &DirectionCounters,
    activity: &Activity,
    read_side: fn(io::Error) -> RelayError,
    write_side: fn(io::Error) -> RelayError,
) -> Result<(), RelayError> {
    let mut in_pipe = 0usize;
    loop {
        if in_pipe == 0 {
            from.readable().await.map_err(read_side)?;
            match from.try_io(Interest::READABLE, || splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK))
            {
                Ok(0) => break,
                Ok(moved) => {
                    in_pipe = moved;
                    activity.touch();
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
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
    // The reader is done: pass the FIN on, and let the other direction finish on its own.
    match socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotConnected => Ok(()),
        Err(error) => Err(write_side(error)),
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
    }
}
