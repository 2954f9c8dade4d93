//! The address a STUN server sees (RFC 8489): a Binding request over UDP, retransmitted on the RFC's
//! schedule, and the XOR-MAPPED-ADDRESS of the success response (MAPPED-ADDRESS from an RFC 3489 server).
//!
//! Written here rather than taken from a STUN crate: the reporter needs two fixed messages with no
//! authentication, about sixty lines, and every crate in the proxy costs idle memory.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use keel_schemas::config::AddressFamily;
use keel_schemas::types::HostPort;
use tokio::net::UdpSocket;

const MAGIC_COOKIE: u32 = 0x2112_A442;
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const BINDING_ERROR: u16 = 0x0111;
const MAPPED_ADDRESS: u16 = 0x0001;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// RFC 8489 §6.2.1: the first retransmission timeout, the number of requests (Rc) and the last wait,
/// as a multiple of the first timeout (Rm).
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    pub rto: Duration,
    pub requests: u32,
    pub last_wait: u32,
}

impl Default for Schedule {
    fn default() -> Self {
        Self { rto: Duration::from_millis(500), requests: 7, last_wait: 16 }
    }
}

/// Asks each server in turn; the first answer of `family` wins.
pub async fn mapped_address(
    servers: &[HostPort],
    family: AddressFamily,
    schedule: Schedule,
) -> Result<IpAddr, String> {
    let mut problems = Vec::new();
    for server in servers {
        let addresses = match server.socket_addr() {
            Some(address) => vec![address],
            None => {
                let keel_schemas::types::Host::Name(name) = &server.host else { continue };
                crate::cluster::resolve(name, server.port)
                    .await
                    .map_err(|error| format!("{server}: {error}"))?
            }
        };
        let wanted = addresses.into_iter().find(|address| match family {
            AddressFamily::Ipv4 => address.is_ipv4(),
            AddressFamily::Ipv6 => address.is_ipv6(),
        });
        let Some(address) = wanted else {
            problems.push(format!("{server}: no {family:?} address"));
            continue;
        };
        match binding(address, schedule).await {
            Ok(mapped) => return Ok(mapped.ip()),
            Err(problem) => problems.push(format!("{server}: {problem}")),
        }
    }
    Err(if problems.is_empty() { "no STUN servers".to_string() } else { problems.join("; ") })
}

/// One Binding transaction with `server`.
pub async fn binding(server: SocketAddr, schedule: Schedule) -> Result<SocketAddr, String> {
    let local: SocketAddr =
        if server.is_ipv4() { "0.0.0.0:0".parse() } else { "[::]:0".parse() }.expect("literal");
    let socket = UdpSocket::bind(local).await.map_err(|error| error.to_string())?;
    socket.connect(server).await.map_err(|error| error.to_string())?;
    let transaction: [u8; 12] = std::array::from_fn(|_| fastrand::u8(..));
    let mut request = Vec::with_capacity(20);
    request.extend_from_slice(&BINDING_REQUEST.to_be_bytes());
    request.extend_from_slice(&0u16.to_be_bytes());
    request.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    request.extend_from_slice(&transaction);
    let mut buffer = [0u8; 1500];
    let mut timeout = schedule.rto;
    for sent in 1..=schedule.requests {
        socket.send(&request).await.map_err(|error| error.to_string())?;
        let wait = if sent == schedule.requests { schedule.rto * schedule.last_wait } else { timeout };
        let deadline = tokio::time::Instant::now() + wait;
        // Anything that is not our answer (a stray datagram) is ignored until the deadline.
        while let Ok(received) = tokio::time::timeout_at(deadline, socket.recv(&mut buffer)).await {
            let Ok(length) = received else { continue };
            match parse(&buffer[..length], &transaction) {
                Ok(Some(mapped)) => return Ok(mapped),
                Ok(None) => {}
                Err(problem) => return Err(problem),
            }
        }
        timeout *= 2;
    }
    Err(format!("no answer after {} requests", schedule.requests))
}

/// The mapped address in a Binding success response for `transaction`; `None` for a message that is not
/// one; an error for a Binding error response.
pub fn parse(message: &[u8], transaction: &[u8; 12]) -> Result<Option<SocketAddr>, String> {
    if message.len() < 20 || message[4..8] != MAGIC_COOKIE.to_be_bytes() || message[8..20] != transaction[..]
    {
        return Ok(None);
    }
    let kind = u16::from_be_bytes([message[0], message[1]]);
    let length = usize::from(u16::from_be_bytes([message[2], message[3]]));
    let attributes = message.get(20..20 + length).unwrap_or(&[]);
    if kind == BINDING_ERROR {
        return Err("the server answered with a Binding error".to_string());
    }
    if kind != BINDING_SUCCESS {
        return Ok(None);
    }
    let (mut xor, mut plain) = (None, None);
    let mut rest = attributes;
    while rest.len() >= 4 {
        let kind = u16::from_be_bytes([rest[0], rest[1]]);
        let length = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let Some(value) = rest.get(4..4 + length) else { break };
        match kind {
            XOR_MAPPED_ADDRESS => xor = address(value, Some(transaction)),
            MAPPED_ADDRESS => plain = address(value, None),
            _ => {}
        }
        // Attributes are padded to four bytes.
        rest = rest.get(4 + length.div_ceil(4) * 4..).unwrap_or(&[]);
    }
    xor.or(plain).map(Some).ok_or_else(|| "the response has no mapped address".to_string())
}

/// A (XOR-)MAPPED-ADDRESS value: reserved byte, family, port, address.
fn address(value: &[u8], xor_with: Option<&[u8; 12]>) -> Option<SocketAddr> {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let mut port = u16::from_be_bytes([*value.get(2)?, *value.get(3)?]);
    if xor_with.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match value.get(1)? {
        0x01 => {
            let mut octets: [u8; 4] = value.get(4..8)?.try_into().ok()?;
            if xor_with.is_some() {
                octets.iter_mut().zip(cookie).for_each(|(byte, mask)| *byte ^= mask);
            }
            Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(octets)), port))
        }
        0x02 => {
            let mut octets: [u8; 16] = value.get(4..20)?.try_into().ok()?;
            if let Some(transaction) = xor_with {
                let mask = cookie.iter().chain(transaction.iter());
                octets.iter_mut().zip(mask).for_each(|(byte, mask)| *byte ^= mask);
            }
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transaction ID of RFC 5769's sample responses.
    const TRANSACTION: [u8; 12] = [0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae];

    fn response(attributes: &[u8]) -> Vec<u8> {
        let mut message = vec![0x01, 0x01];
        message.extend_from_slice(&(attributes.len() as u16).to_be_bytes());
        message.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        message.extend_from_slice(&TRANSACTION);
        message.extend_from_slice(attributes);
        message
    }

    #[test]
    fn rfc_5769_sample_responses() {
        // SOFTWARE "test vector" (padded), then XOR-MAPPED-ADDRESS 192.0.2.1:32853 (RFC 5769 §2.2).
        let mut attributes = vec![0x80, 0x22, 0x00, 0x0b];
        attributes.extend_from_slice(b"test vector\x20");
        attributes
            .extend_from_slice(&[0x00, 0x20, 0x00, 0x08, 0x00, 0x01, 0xa1, 0x47, 0xe1, 0x12, 0xa6, 0x43]);
        assert_eq!(
            parse(&response(&attributes), &TRANSACTION).unwrap(),
            Some("192.0.2.1:32853".parse().unwrap())
        );
        // XOR-MAPPED-ADDRESS [2001:db8:1234:5678:11:2233:4455:6677]:32853 (RFC 5769 §2.3).
        let v6 = [
            0x00, 0x20, 0x00, 0x14, 0x00, 0x02, 0xa1, 0x47, 0x01, 0x13, 0xa9, 0xfa, 0xa5, 0xd3, 0xf1, 0x79,
            0xbc, 0x25, 0xf4, 0xb5, 0xbe, 0xd2, 0xb9, 0xd9,
        ];
        assert_eq!(
            parse(&response(&v6), &TRANSACTION).unwrap(),
            Some("[2001:db8:1234:5678:11:2233:4455:6677]:32853".parse().unwrap())
        );
        // Another transaction, or garbage: not ours. A Binding error: an error.
        assert_eq!(parse(&response(&v6), &[0; 12]).unwrap(), None);
        assert_eq!(parse(&[1, 2, 3], &TRANSACTION).unwrap(), None);
        let mut error = response(&[]);
        error[1] = 0x11;
        assert!(parse(&error, &TRANSACTION).is_err());
    }

    #[tokio::test]
    async fn a_lost_request_is_sent_again() {
        // A server that ignores the first request and answers the second with the sender's address.
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buffer = [0u8; 1500];
            let (_, _) = server.recv_from(&mut buffer).await.unwrap();
            let (length, from) = server.recv_from(&mut buffer).await.unwrap();
            assert_eq!(length, 20);
            assert_eq!(&buffer[0..2], &[0x00, 0x01]);
            let transaction: [u8; 12] = buffer[8..20].try_into().unwrap();
            let IpAddr::V4(ip) = from.ip() else { panic!() };
            let cookie = MAGIC_COOKIE.to_be_bytes();
            let mut value = vec![0x00, 0x01];
            value.extend_from_slice(&(from.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
            value.extend(ip.octets().iter().zip(cookie).map(|(byte, mask)| byte ^ mask));
            let mut answer = vec![0x01, 0x01, 0x00, 0x0c];
            answer.extend_from_slice(&cookie);
            answer.extend_from_slice(&transaction);
            answer.extend_from_slice(&[0x00, 0x20, 0x00, 0x08]);
            answer.extend_from_slice(&value);
            server.send_to(&answer, from).await.unwrap();
        });
        let schedule = Schedule { rto: Duration::from_millis(50), requests: 3, last_wait: 4 };
        let mapped = binding(address, schedule).await.unwrap();
        assert_eq!(mapped.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        // A server that never answers: an error after the schedule, not a hang.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let schedule = Schedule { rto: Duration::from_millis(10), requests: 2, last_wait: 2 };
        assert!(binding(silent.local_addr().unwrap(), schedule).await.unwrap_err().contains("no answer"));
    }
}
