//! A yardstick for the tunnel benchmark, not a product: the cheapest TCP relay one can write on Linux.
//! Each accepted connection is paired with a new connection to the target, and each direction gets a
//! thread of its own that moves bytes with blocking `splice(2)` calls through a pipe: no event loop, no
//! copies through user space, no metrics, no limits, no timeouts, no handshake. A chain of these relays
//! measures what a chain's topology (its number of TCP connections) costs on a machine by itself, so
//! the benchmark can say how far a real relay is from that floor.
//!
//! Built by `benches/tunnel.sh` with `rustc` alone (the standard library; `splice` and `pipe2` are
//! declared here, from the C library every Rust binary on Linux links):
//!
//!   floor-relay LISTEN_PORT TARGET_PORT      # both on 127.0.0.1
//!
//! Not part of the workspace, never shipped, used only by the benchmark on loopback.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread;

/// Bytes one `splice` call asks for, and the pipe size asked for (the unprivileged ceiling).
const CHUNK: usize = 1 << 20;
const F_SETPIPE_SZ: i32 = 1031;
const SPLICE_F_MOVE: u32 = 1;
const O_CLOEXEC: i32 = 0o2_000_000;

unsafe extern "C" {
    fn splice(fd_in: i32, off_in: *mut i64, fd_out: i32, off_out: *mut i64, len: usize, flags: u32) -> isize;
    fn pipe2(fds: *mut i32, flags: i32) -> i32;
    fn fcntl(fd: i32, cmd: i32, ...) -> i32;
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen_port, target_port] = &args[..] else {
        eprintln!("usage: floor-relay LISTEN_PORT TARGET_PORT");
        std::process::exit(2);
    };
    let listener = TcpListener::bind(("127.0.0.1", listen_port.parse::<u16>().expect("LISTEN_PORT")))
        .expect("bind LISTEN_PORT");
    let target_port: u16 = target_port.parse().expect("TARGET_PORT");
    for accepted in listener.incoming() {
        let Ok(downstream) = accepted else { continue };
        let Ok(upstream) = TcpStream::connect(("127.0.0.1", target_port)) else { continue };
        for stream in [&downstream, &upstream] {
            let _ = stream.set_nodelay(true);
        }
        let (Ok(down_again), Ok(up_again)) = (downstream.try_clone(), upstream.try_clone()) else { continue };
        thread::spawn(move || pump(&downstream, &upstream));
        thread::spawn(move || pump(&up_again, &down_again));
    }
}

/// Moves bytes from `from` to `to` until end of file or an error, then passes the FIN on.
fn pump(from: &TcpStream, to: &TcpStream) {
    if let Ok((read, write)) = pipe() {
        'relay: loop {
            // SAFETY: both descriptors are open for the call; null offsets are the current positions.
            let mut in_pipe = unsafe {
                splice(
                    from.as_raw_fd(),
                    std::ptr::null_mut(),
                    write.as_raw_fd(),
                    std::ptr::null_mut(),
                    CHUNK,
                    SPLICE_F_MOVE,
                )
            };
            if in_pipe <= 0 {
                break;
            }
            while in_pipe > 0 {
                // SAFETY: as above.
                let moved = unsafe {
                    splice(
                        read.as_raw_fd(),
                        std::ptr::null_mut(),
                        to.as_raw_fd(),
                        std::ptr::null_mut(),
                        in_pipe as usize,
                        SPLICE_F_MOVE,
                    )
                };
                if moved <= 0 {
                    break 'relay;
                }
                in_pipe -= moved;
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A pipe grown to `CHUNK` bytes where the kernel allows.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1i32; 2];
    // SAFETY: `fds` is an array of two descriptors for the kernel to fill.
    if unsafe { pipe2(fds.as_mut_ptr(), O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded; the descriptors are owned here alone from now on.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on a pipe owned here; a refusal leaves the default size, which still works.
    unsafe { fcntl(write.as_raw_fd(), F_SETPIPE_SZ, CHUNK as i32) };
    Ok((read, write))
}
