//! ICMP echo (ping) for IPv4 and IPv6, without privileges where the kernel allows it.
//!
//! The first choice is an unprivileged "ping socket" (`SOCK_DGRAM` with `IPPROTO_ICMP`/`ICMPV6`): the
//! kernel allows it to processes whose group is in `net.ipv4.ping_group_range` (which governs IPv6 too),
//! sets the echo identifier itself and hands each socket only its own replies. When that is refused, a
//! raw socket (CAP_NET_RAW) does the same job: it sees every ICMP packet of the host, so replies are
//! matched by identifier, sequence number and a random token in the payload. When both are refused the
//! error says how to allow either.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;

/// How the echo request was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// An unprivileged ping socket.
    Datagram,
    /// A raw socket (CAP_NET_RAW).
    Raw,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Datagram => "datagram",
            Method::Raw => "raw",
        }
    }
}

/// Why no echo request could be sent.
#[derive(Debug, thiserror::Error)]
pub enum PingError {
    #[error(
        "ICMP is not allowed: neither a ping socket (add this process's group to net.ipv4.ping_group_range, e.g. sysctl -w net.ipv4.ping_group_range=\"0 2147483647\") nor a raw socket (grant CAP_NET_RAW) may be opened"
    )]
    NotPermitted,
    #[error("ICMP socket: {0}")]
    Io(#[from] io::Error),
    #[error("no echo reply within {0:?}")]
    Timeout(Duration),
}

/// Opens an ICMP socket for `target`'s family: a ping socket if allowed, else a raw one.
fn open(target: IpAddr) -> Result<(UdpSocket, Method), PingError> {
    let (domain, protocol) = match target {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
    };
    let attempt = |kind: Type| -> io::Result<UdpSocket> {
        let socket = Socket::new(domain, kind, Some(protocol))?;
        socket.set_nonblocking(true)?;
        // A datagram socket of any protocol: tokio's UdpSocket only needs sendto/recvfrom.
        UdpSocket::from_std(std::net::UdpSocket::from(socket))
    };
    let refused = |error: &io::Error| {
        matches!(error.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM))
            || error.kind() == io::ErrorKind::PermissionDenied
    };
    match attempt(Type::DGRAM) {
        Ok(socket) => Ok((socket, Method::Datagram)),
        Err(error) if refused(&error) => match attempt(Type::RAW) {
            Ok(socket) => {
                only_echo_replies(&socket, target.is_ipv6());
                Ok((socket, Method::Raw))
            }
            Err(error) if refused(&error) => Err(PingError::NotPermitted),
            Err(error) => Err(PingError::Io(error)),
        },
        Err(error) => Err(PingError::Io(error)),
    }
}

/// Asks the kernel to queue only echo replies on a raw socket (every raw ICMP socket otherwise gets
/// every ICMP packet of the host, our own requests on loopback included, and a busy probe's sockets
/// overflow). Best effort: without the filter, replies are still matched, only less efficiently.
fn only_echo_replies(socket: &UdpSocket, ipv6: bool) {
    use std::os::fd::AsRawFd;
    const ICMP_FILTER: libc::c_int = 1;
    const ICMP6_FILTER: libc::c_int = 1;
    let fd = socket.as_raw_fd();
    // A set bit blocks that ICMP type.
    let result = if ipv6 {
        let mut blocked = [u32::MAX; 8];
        let reply = usize::from(ECHO_REPLY_V6);
        blocked[reply / 32] &= !(1 << (reply % 32));
        // SAFETY: a valid socket and a 32-byte struct icmp6_filter, as the option expects.
        unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_ICMPV6,
                ICMP6_FILTER,
                blocked.as_ptr().cast(),
                std::mem::size_of_val(&blocked) as libc::socklen_t,
            )
        }
    } else {
        let blocked: u32 = !(1 << ECHO_REPLY_V4);
        // SAFETY: a valid socket and a u32 mask, as ICMP_FILTER (level SOL_RAW) expects.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_RAW,
                ICMP_FILTER,
                (&blocked as *const u32).cast(),
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        }
    };
    if result != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "no ICMP filter on the raw socket");
    }
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An echo request: type, code 0, checksum, identifier, sequence, then the token.
fn echo_request(ipv6: bool, identifier: u16, sequence: u16, token: &[u8; 8]) -> Vec<u8> {
    let mut packet = vec![if ipv6 { ECHO_REQUEST_V6 } else { ECHO_REQUEST_V4 }, 0, 0, 0];
    packet.extend_from_slice(&identifier.to_be_bytes());
    packet.extend_from_slice(&sequence.to_be_bytes());
    packet.extend_from_slice(token);
    if !ipv6 {
        // The kernel fills ICMPv6 checksums (they cover a pseudo-header of addresses it chooses).
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    packet
}

/// Whether `packet` (as received: raw IPv4 sockets include the IP header) is the reply to our request.
fn is_reply(
    packet: &[u8],
    ipv6: bool,
    method: Method,
    identifier: u16,
    sequence: u16,
    token: &[u8; 8],
) -> bool {
    let icmp = if !ipv6 && method == Method::Raw {
        let header = usize::from(packet.first().map_or(0, |b| b & 0x0f)) * 4;
        match packet.get(header..) {
            Some(icmp) => icmp,
            None => return false,
        }
    } else {
        packet
    };
    if icmp.len() < 16 {
        return false;
    }
    let reply_type = if ipv6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
    // Ping sockets get their identifier from the kernel; only raw sockets must check it.
    let identifier_ok = method == Method::Datagram || icmp[4..6] == identifier.to_be_bytes();
    icmp[0] == reply_type && identifier_ok && icmp[6..8] == sequence.to_be_bytes() && icmp[8..16] == token[..]
}

/// Sends one echo request to `target` and waits up to `timeout` for its reply: the round-trip time and
/// the method used.
pub async fn ping(target: IpAddr, sequence: u16, timeout: Duration) -> Result<(Duration, Method), PingError> {
    let (socket, method) = open(target)?;
    let identifier = fastrand::u16(..);
    let token: [u8; 8] = fastrand::u64(..).to_be_bytes();
    let ipv6 = target.is_ipv6();
    let request = echo_request(ipv6, identifier, sequence, &token);
    let started = Instant::now();
    socket.send_to(&request, SocketAddr::new(target, 0)).await?;
    let wait = async {
        let mut buffer = [0u8; 1500];
        loop {
            let (length, from) = socket.recv_from(&mut buffer).await?;
            if from.ip() == target && is_reply(&buffer[..length], ipv6, method, identifier, sequence, &token)
            {
                return Ok::<_, io::Error>(started.elapsed());
            }
        }
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(rtt)) => Ok((rtt, method)),
        Ok(Err(error)) => Err(PingError::Io(error)),
        Err(_) => Err(PingError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_an_echo_request() {
        // Type 8, code 0, identifier 0x1234, sequence 1, token "abcdefgh": the checksum makes the
        // one's-complement sum of the whole packet 0xffff.
        let packet = echo_request(false, 0x1234, 1, b"abcdefgh");
        assert_eq!(checksum(&packet), 0);
        assert_eq!(&packet[4..8], &[0x12, 0x34, 0, 1]);
        assert_eq!(checksum(&[0x45, 0x00, 0x00, 0x73]), !0x4573);
    }

    #[test]
    fn replies_are_matched_by_sequence_and_token_and_by_identifier_on_raw_sockets() {
        let token = *b"abcdefgh";
        let mut reply = echo_request(false, 7, 3, &token);
        reply[0] = ECHO_REPLY_V4;
        assert!(is_reply(&reply, false, Method::Datagram, 99, 3, &token), "ping sockets: the kernel's id");
        assert!(!is_reply(&reply, false, Method::Datagram, 7, 4, &token), "another sequence");
        assert!(!is_reply(&reply, false, Method::Datagram, 7, 3, b"zzzzzzzz"), "another token");
        let mut with_ip_header = vec![0x45; 1];
        with_ip_header.extend_from_slice(&[0; 19]);
        with_ip_header.extend_from_slice(&reply);
        assert!(is_reply(&with_ip_header, false, Method::Raw, 7, 3, &token));
        assert!(!is_reply(&with_ip_header, false, Method::Raw, 8, 3, &token), "someone else's ping");
        let mut request = echo_request(true, 7, 3, &token);
        assert!(!is_reply(&request, true, Method::Raw, 7, 3, &token), "our own request, looped back");
        request[0] = ECHO_REPLY_V6;
        assert!(is_reply(&request, true, Method::Raw, 7, 3, &token));
    }

    #[tokio::test]
    async fn loopback_answers() {
        // Needs a ping socket or CAP_NET_RAW; says which was missing otherwise.
        match ping(IpAddr::from([127, 0, 0, 1]), 1, Duration::from_secs(2)).await {
            Ok((rtt, _)) => assert!(rtt < Duration::from_secs(2)),
            Err(PingError::NotPermitted) => eprintln!("skipping: no ICMP permission here"),
            Err(other) => panic!("{other}"),
        }
    }
}
