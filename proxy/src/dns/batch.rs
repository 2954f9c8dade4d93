//! Batched UDP I/O for the DNS front end: `recvmmsg(2)` and `sendmmsg(2)`.
//!
//! Under load most of a DNS server's time is spent in the kernel, and a good part of that is the cost of
//! entering it once per packet in each direction. Reading every queued query with one call and sending
//! the answers that are ready at once with another removes most of those entries, and hands the client a
//! burst of answers to read in one wake-up instead of one wake-up per answer.
//!
//! This module is the only place in the DNS server with `unsafe` code: the two system calls, on buffers
//! it owns, and the conversion of the kernel's socket addresses.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

/// Packets moved per system call at most.
pub const BATCH: usize = 32;

/// Room for `BATCH` received datagrams of up to `size` bytes each, with their senders.
pub struct RecvBatch {
    size: usize,
    buffers: Box<[u8]>,
    lengths: [usize; BATCH],
    truncated: [bool; BATCH],
    senders: [Option<SocketAddr>; BATCH],
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").field("size", &self.size).finish_non_exhaustive()
    }
}

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    pub bytes: &'a [u8],
    pub sender: SocketAddr,
    /// The datagram was longer than the buffer and `bytes` holds only its start.
    pub truncated: bool,
}

impl RecvBatch {
    /// Buffers for datagrams of up to `size` bytes (longer ones are cut and marked truncated). The memory
    /// is only touched, and so only becomes resident, as packets arrive.
    pub fn new(size: usize) -> Self {
        Self {
            size,
            buffers: vec![0u8; size * BATCH].into_boxed_slice(),
            lengths: [0; BATCH],
            truncated: [false; BATCH],
            senders: [None; BATCH],
        }
    }

    /// Reads the datagrams queued on `socket`, up to [`BATCH`], without blocking; returns how many were
    /// read (`WouldBlock` when none was queued). The socket must be non-blocking.
    pub fn receive(&mut self, socket: BorrowedFd<'_>) -> io::Result<usize> {
        let mut addresses = [MaybeUninit::<libc::sockaddr_storage>::zeroed(); BATCH];
        let mut iovecs: [libc::iovec; BATCH] = std::array::from_fn(|index| libc::iovec {
            iov_base: self.buffers[index * self.size..].as_mut_ptr().cast(),
            iov_len: self.size,
        });
        // SAFETY: `mmsghdr` is plain data for which all-zero bytes are a valid value.
        let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for ((header, iovec), address) in headers.iter_mut().zip(iovecs.iter_mut()).zip(addresses.iter_mut())
        {
            header.msg_hdr.msg_name = address.as_mut_ptr().cast();
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at an address slot and one iovec over a distinct `size`-byte part of
        // `self.buffers`, all of which outlive the call; the kernel writes at most `msg_namelen` and
        // `iov_len` bytes into them.
        let received = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if received < 0 {
            return Err(io::Error::last_os_error());
        }
        let received = received as usize;
        for (index, header) in headers.iter().enumerate().take(received) {
            self.lengths[index] = (header.msg_len as usize).min(self.size);
            self.truncated[index] = header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            // SAFETY: the kernel filled `msg_namelen` bytes of this slot with the sender's address.
            self.senders[index] = unsafe { socket_addr(addresses[index].assume_init_ref()) };
        }
        Ok(received)
    }

    /// The `index`th datagram of the last [`receive`](Self::receive), if it came from an IP address.
    pub fn datagram(&self, index: usize) -> Option<Datagram<'_>> {
        let sender = (*self.senders.get(index)?)?;
        let start = index * self.size;
        Some(Datagram {
            bytes: &self.buffers[start..start + self.lengths[index]],
            sender,
            truncated: self.truncated[index],
        })
    }
}

/// The Rust form of an IPv4 or IPv6 socket address written by the kernel; `None` for other families.
///
/// # Safety
/// `storage` must hold an address of the family it names, as the kernel writes it.
unsafe fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a `sockaddr_in`, which it is large enough for.
            let v4 = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(v4.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for `sockaddr_in6`.
            let v6 = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(v6.sin6_port),
                v6.sin6_flowinfo,
                v6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The kernel's form of `address`, and its length.
fn raw_socket_addr(address: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: `sockaddr_storage` is plain data for which all-zero bytes are a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match address {
        SocketAddr::V4(v4) => {
            // SAFETY: `sockaddr_storage` is large and aligned enough for any socket address type.
            let raw =
                unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            raw.sin_family = libc::AF_INET as libc::sa_family_t;
            raw.sin_port = v4.port().to_be();
            raw.sin_addr = libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() };
            (storage, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above.
            let raw =
                unsafe { &mut *(&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            raw.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            raw.sin6_port = v6.port().to_be();
            raw.sin6_flowinfo = v6.flowinfo();
            raw.sin6_addr = libc::in6_addr { s6_addr: v6.ip().octets() };
            raw.sin6_scope_id = v6.scope_id();
            (storage, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

/// Answers waiting to be sent with one `sendmmsg(2)`.
#[derive(Debug, Default)]
pub struct SendBatch {
    packets: Vec<(SocketAddr, Vec<u8>)>,
}

impl SendBatch {
    pub fn push(&mut self, destination: SocketAddr, bytes: Vec<u8>) {
        self.packets.push((destination, bytes));
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// Forgets the packets not sent yet.
    pub fn clear(&mut self) {
        self.packets.clear();
    }

    /// Sends as many of the queued packets as the socket takes without blocking, in order, and forgets
    /// them; the rest stay queued. A packet the kernel refuses outright (an unreachable destination, say)
    /// is dropped with the error returned, as a lone `send_to` would.
    pub fn send(&mut self, socket: BorrowedFd<'_>) -> io::Result<()> {
        while !self.packets.is_empty() {
            let count = self.packets.len().min(BATCH);
            let mut addresses: [(libc::sockaddr_storage, libc::socklen_t); BATCH] =
                // SAFETY: plain data for which all-zero bytes are a valid value.
                unsafe { std::mem::zeroed() };
            let mut iovecs: [libc::iovec; BATCH] =
                std::array::from_fn(|_| libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 });
            // SAFETY: as above.
            let mut headers: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
            for (index, (destination, bytes)) in self.packets.iter().take(count).enumerate() {
                addresses[index] = raw_socket_addr(*destination);
                iovecs[index] =
                    libc::iovec { iov_base: bytes.as_ptr() as *mut libc::c_void, iov_len: bytes.len() };
                let header = &mut headers[index].msg_hdr;
                header.msg_name = (&mut addresses[index].0 as *mut libc::sockaddr_storage).cast();
                header.msg_namelen = addresses[index].1;
                header.msg_iov = &mut iovecs[index];
                header.msg_iovlen = 1;
            }
            // SAFETY: the first `count` headers point at initialised addresses and at iovecs over packets
            // that outlive the call; the kernel only reads them.
            let sent = unsafe {
                libc::sendmmsg(
                    socket.as_raw_fd(),
                    headers.as_mut_ptr(),
                    count as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            if sent < 0 {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::WouldBlock {
                    // sendmmsg reports the first packet's error when it sent none: drop that packet.
                    self.packets.remove(0);
                }
                return Err(error);
            }
            self.packets.drain(..sent as usize);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn socket_addresses_round_trip_through_the_kernel_form() {
        for address in ["127.0.0.1:53", "[::1]:5353", "[fe80::1%2]:1"] {
            let address: SocketAddr = address.parse().unwrap();
            let (storage, _) = raw_socket_addr(address);
            // SAFETY: `raw_socket_addr` wrote an address of the family it names.
            assert_eq!(unsafe { socket_addr(&storage) }, Some(address));
        }
    }

    #[test]
    fn a_batch_goes_out_and_comes_back_in_order() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        server.set_nonblocking(true).unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut batch = RecvBatch::new(16);
        let error = batch.receive(server.as_fd()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::WouldBlock);

        let mut out = SendBatch::default();
        for index in 0..BATCH + 3 {
            out.push(server.local_addr().unwrap(), vec![index as u8; 1 + index % 20]);
        }
        client.set_nonblocking(true).unwrap();
        out.send(client.as_fd()).unwrap();
        assert!(out.is_empty());

        let mut seen = Vec::new();
        while seen.len() < BATCH + 3 {
            let count = batch.receive(server.as_fd()).unwrap();
            assert!(count <= BATCH);
            for index in 0..count {
                let datagram = batch.datagram(index).unwrap();
                assert_eq!(datagram.sender, client.local_addr().unwrap());
                seen.push((datagram.bytes.to_vec(), datagram.truncated));
            }
        }
        for (index, (bytes, truncated)) in seen.into_iter().enumerate() {
            let length = 1 + index % 20;
            // Longer than the 16-byte buffers: cut, and said so.
            assert_eq!(truncated, length > 16);
            assert_eq!(bytes, vec![index as u8; length.min(16)]);
        }
    }
}
