//! Interface addresses from the kernel, over rtnetlink: a dump of every address with its flags
//! (`RTM_GETADDR`), and a subscription to address events (`RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR`).
//!
//! The flags come from the kernel (`IFA_FLAGS`, falling back to `ifa_flags`), never from the address
//! bits: temporary, tentative, deprecated and DAD-failed are the kernel's own words. Events only say that
//! something changed; the reporter then dumps again and decides from the whole picture, so a lost or
//! reordered event cannot leave it wrong.
//!
//! This is one of three modules with `unsafe` (with `splice.rs` and `dns/batch.rs`): the socket calls.
//! Parsing works on plain byte slices and is checked against the lengths the kernel gives.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use tokio::io::unix::AsyncFd;

pub const IFA_F_TEMPORARY: u32 = 0x01;
pub const IFA_F_DADFAILED: u32 = 0x08;
pub const IFA_F_DEPRECATED: u32 = 0x20;
pub const IFA_F_TENTATIVE: u32 = 0x40;
pub const IFA_F_PERMANENT: u32 = 0x80;

const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_CACHEINFO: u16 = 6;
const IFA_FLAGS: u16 = 8;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
/// `RT_SCOPE_UNIVERSE`: a global address.
pub const SCOPE_UNIVERSE: u8 = 0;

/// One address as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub index: u32,
    pub address: IpAddr,
    pub prefix_len: u8,
    pub scope: u8,
    pub flags: u32,
    /// Preferred lifetime in seconds (`u32::MAX`: forever); 0 for a deprecated address.
    pub preferred: u32,
}

impl InterfaceAddress {
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

fn netlink_socket(groups: u32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2)/bind(2) calls; the descriptor is owned by the returned OwnedFd, and
    // `address` is a zeroed sockaddr_nl of the size passed.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut address: libc::sockaddr_nl = std::mem::zeroed();
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        address.nl_groups = groups;
        let size = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        if libc::bind(fd.as_raw_fd(), (&raw const address).cast(), size) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor, and nothing closes or replaces it while registered.
    unsafe { Ok(AsyncFd::register(fd)?) }
}

fn send(fd: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: `bytes` is valid for its length for the duration of the call.
    let sent = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn receive(fd: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buffer` is valid and writable for its length for the duration of the call.
    let received = unsafe { libc::recv(fd.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
    if received < 0 { Err(io::Error::last_os_error()) } else { Ok(received as usize) }
}

/// Every address of every interface, now.
pub async fn dump() -> io::Result<Vec<InterfaceAddress>> {
    let fd = register(netlink_socket(0)?)?;
    // nlmsghdr (16 bytes) + ifaddrmsg (8 bytes, family AF_UNSPEC: both families).
    let mut request = [0u8; 24];
    request[0..4].copy_from_slice(&24u32.to_ne_bytes());
    request[4..6].copy_from_slice(&RTM_GETADDR.to_ne_bytes());
    request[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request[8..12].copy_from_slice(&1u32.to_ne_bytes());
    send(fd.get_ref(), &request)?;
    let mut addresses = Vec::new();
    let mut buffer = vec![0u8; 32 << 10];
    loop {
        let mut ready = fd.readable().await?;
        let received = match ready.try_io(|fd| receive(fd.get_ref(), &mut buffer)) {
            Ok(result) => result?,
            Err(_would_block) => continue,
        };
        match parse(&buffer[..received], &mut addresses)? {
            Parsed::Done => return Ok(addresses),
            Parsed::More => {}
        }
    }
}

/// Where a dump stands after one datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The kernel's `NLMSG_DONE`: every address has been sent.
    Done,
    /// More datagrams follow.
    More,
}

/// Parses the messages of one datagram of a dump, adding each address to `out`. The bytes come from the
/// kernel, but are checked as if they did not: a message or attribute whose length runs past the
/// datagram is an error or skipped, never read.
pub fn parse(mut bytes: &[u8], out: &mut Vec<InterfaceAddress>) -> io::Result<Parsed> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {what}"));
    while bytes.len() >= 16 {
        let length = u32::from_ne_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(bytes[4..6].try_into().expect("2 bytes"));
        if length < 16 || length > bytes.len() {
            return Err(invalid("truncated message"));
        }
        let body = &bytes[16..length];
        match kind {
            NLMSG_DONE => return Ok(Parsed::Done),
            NLMSG_ERROR => {
                let code = body.get(0..4).map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                // The kernel sends a negative errno (0 is an acknowledgement); anything else is malformed,
                // and i32::MIN has no positive counterpart (found by fuzz/, netlink_dump).
                match code.checked_neg() {
                    Some(0) => {}
                    Some(errno) if errno > 0 => return Err(io::Error::from_raw_os_error(errno)),
                    _ => return Err(invalid("an error message with a code that is not an errno")),
                }
            }
            RTM_NEWADDR => {
                if let Some(address) = parse_address(body) {
                    out.push(address);
                }
            }
            _ => {}
        }
        bytes = &bytes[align(length).min(bytes.len())..];
    }
    Ok(Parsed::More)
}

fn align(length: usize) -> usize {
    (length + 3) & !3
}

/// An `ifaddrmsg` and its attributes.
fn parse_address(body: &[u8]) -> Option<InterfaceAddress> {
    if body.len() < 8 {
        return None;
    }
    let family = i32::from(body[0]);
    let prefix_len = body[1];
    let mut flags = u32::from(body[2]);
    let scope = body[3];
    let index = u32::from_ne_bytes(body[4..8].try_into().ok()?);
    let (mut address, mut local, mut preferred) = (None, None, u32::MAX);
    let mut attributes = &body[8..];
    while attributes.len() >= 4 {
        let length = usize::from(u16::from_ne_bytes(attributes[0..2].try_into().ok()?));
        let kind = u16::from_ne_bytes(attributes[2..4].try_into().ok()?);
        if length < 4 || length > attributes.len() {
            break;
        }
        let value = &attributes[4..length];
        let ip = |value: &[u8]| -> Option<IpAddr> {
            match (family, value.len()) {
                (libc::AF_INET, 4) => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(value).ok()?))),
                (libc::AF_INET6, 16) => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(value).ok()?))),
                _ => None,
            }
        };
        match kind {
            IFA_ADDRESS => address = ip(value),
            IFA_LOCAL => local = ip(value),
            IFA_FLAGS if value.len() >= 4 => flags = u32::from_ne_bytes(value[0..4].try_into().ok()?),
            // struct ifa_cacheinfo { ifa_prefered, ifa_valid, cstamp, tstamp }
            IFA_CACHEINFO if value.len() >= 8 => preferred = u32::from_ne_bytes(value[0..4].try_into().ok()?),
            _ => {}
        }
        attributes = &attributes[align(length).min(attributes.len())..];
    }
    // For IPv4 IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on point-to-point links).
    let address = local.or(address)?;
    Some(InterfaceAddress { index, address, prefix_len, scope, flags, preferred })
}

/// Address events: each call to [`AddressEvents::changed`] returns once something changed.
#[derive(Debug)]
pub struct AddressEvents {
    fd: AsyncFd<OwnedFd>,
    buffer: Vec<u8>,
}

impl AddressEvents {
    pub fn subscribe() -> io::Result<Self> {
        let fd = register(netlink_socket(RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)?)?;
        Ok(Self { fd, buffer: vec![0u8; 32 << 10] })
    }

    /// Waits for address events, reads every queued one, and returns. An overflowing queue (ENOBUFS)
    /// counts as a change too: the caller dumps again anyway.
    pub async fn changed(&mut self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut got_any = false;
            loop {
                match receive(ready.get_inner(), &mut self.buffer) {
                    Ok(_) => got_any = true,
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        ready.clear_ready();
                        break;
                    }
                    Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => got_any = true,
                    Err(error) => return Err(error),
                }
            }
            if got_any {
                return Ok(());
            }
        }
    }
}

/// The index of interface `name`, if it exists.
pub fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_loopback_interface_has_its_addresses() {
        let addresses = dump().await.unwrap();
        let lo = interface_index("lo").unwrap();
        assert!(
            addresses.iter().any(|a| a.index == lo && a.address == IpAddr::V4(Ipv4Addr::LOCALHOST)),
            "{addresses:?}"
        );
        assert!(interface_index("no-such-if0").is_none());
    }

    #[test]
    fn parses_an_ipv6_address_with_extended_flags() {
        // nlmsghdr + ifaddrmsg(AF_INET6, /64, flags 0, scope 0, index 7) + IFA_ADDRESS + IFA_FLAGS.
        let mut message = Vec::new();
        let attribute = |kind: u16, value: &[u8], body: &mut Vec<u8>| {
            body.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(value);
            while !body.len().is_multiple_of(4) {
                body.push(0);
            }
        };
        let mut body = vec![libc::AF_INET6 as u8, 64, 0, 0];
        body.extend_from_slice(&7u32.to_ne_bytes());
        let ip: Ipv6Addr = "2001:db8::5".parse().unwrap();
        attribute(IFA_ADDRESS, &ip.octets(), &mut body);
        attribute(IFA_FLAGS, &(IFA_F_TEMPORARY | IFA_F_DEPRECATED).to_ne_bytes(), &mut body);
        message.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        message.extend_from_slice(&RTM_NEWADDR.to_ne_bytes());
        message.extend_from_slice(&[0u8; 10]);
        message.extend_from_slice(&body);
        let mut out = Vec::new();
        assert!(matches!(parse(&message, &mut out).unwrap(), Parsed::More));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].address, IpAddr::V6(ip));
        assert_eq!((out[0].index, out[0].prefix_len), (7, 64));
        assert!(out[0].has(IFA_F_TEMPORARY) && out[0].has(IFA_F_DEPRECATED) && !out[0].has(IFA_F_TENTATIVE));
        // Truncated input is an error, not a panic.
        assert!(parse(&message[..20], &mut out).is_err());
    }
}
