//! UDP echo (RFC 862) for packet loss: send numbered datagrams to an echo service and count what comes
//! back before the timeout. Each datagram carries a random token of this check and its number, so that
//! late replies of an earlier check, or anybody else's datagrams, are not counted.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use keel_schemas::types::HostPort;
use tokio::net::UdpSocket;
use tokio::time::Instant;

/// Spacing between the datagrams of one check, so that they are not one burst.
const SPACING: Duration = Duration::from_millis(10);

/// What one check counted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Round {
    pub sent: u32,
    pub received: u32,
    /// Mean round trip of the datagrams that came back.
    pub mean_rtt: Duration,
}

impl Round {
    pub fn loss(&self) -> f64 {
        if self.sent == 0 { 0.0 } else { f64::from(self.sent - self.received) / f64::from(self.sent) }
    }
}

/// Sends `packets` datagrams to `target` and waits until all are back or `timeout` has passed since the
/// first was sent.
pub async fn echo(target: &HostPort, packets: u32, timeout: Duration) -> io::Result<Round> {
    let address: SocketAddr = match target.socket_addr() {
        Some(address) => address,
        None => {
            let host = match &target.host {
                keel_schemas::types::Host::Name(name) => name.clone(),
                keel_schemas::types::Host::Ip(ip) => ip.to_string(),
            };
            *crate::cluster::resolve(&host, target.port).await?.first().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("{host} resolved to no address"))
            })?
        }
    };
    let local: SocketAddr = if address.is_ipv6() { "[::]:0".parse() } else { "0.0.0.0:0".parse() }
        .map_err(|_| io::Error::other("unreachable: literal addresses parse"))?;
    let socket = UdpSocket::bind(local).await?;
    socket.connect(address).await?;
    let token = fastrand::u64(..).to_be_bytes();
    let deadline = Instant::now() + timeout;
    let mut sent_at: HashMap<u32, Instant> = HashMap::new();
    let mut rtts: Vec<Duration> = Vec::new();
    let mut buffer = [0u8; 64];
    let mut next_send = Instant::now();
    let mut sequence = 0u32;
    while Instant::now() < deadline && rtts.len() < packets as usize {
        let send_now = sequence < packets;
        let wake = if send_now { next_send.min(deadline) } else { deadline };
        tokio::select! {
            () = tokio::time::sleep_until(wake), if send_now => {
                let mut datagram = token.to_vec();
                datagram.extend_from_slice(&sequence.to_be_bytes());
                // A refused send (ICMP port unreachable from an earlier datagram) is a lost datagram.
                let _ = socket.send(&datagram).await;
                sent_at.insert(sequence, Instant::now());
                sequence += 1;
                next_send = Instant::now() + SPACING;
            }
            received = socket.recv(&mut buffer) => {
                // ECONNREFUSED: nothing listens there; the datagrams are lost, keep counting until the end.
                let Ok(length) = received else { continue };
                if length == 12 && buffer[..8] == token {
                    let number = u32::from_be_bytes([buffer[8], buffer[9], buffer[10], buffer[11]]);
                    if let Some(at) = sent_at.remove(&number) {
                        rtts.push(at.elapsed());
                    }
                }
            }
            () = tokio::time::sleep_until(deadline) => break,
        }
    }
    let received = rtts.len() as u32;
    let mean_rtt = if rtts.is_empty() { Duration::ZERO } else { rtts.iter().sum::<Duration>() / received };
    Ok(Round { sent: sequence, received, mean_rtt })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo service that drops every `drop_every`-th datagram (0: none).
    async fn echo_service(drop_every: usize) -> HostPort {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buffer = [0u8; 1500];
            let mut count = 0usize;
            loop {
                let Ok((length, from)) = socket.recv_from(&mut buffer).await else { return };
                count += 1;
                if drop_every > 0 && count.is_multiple_of(drop_every) {
                    continue;
                }
                let _ = socket.send_to(&buffer[..length], from).await;
            }
        });
        address.to_string().parse().unwrap()
    }

    #[tokio::test]
    async fn counts_what_comes_back() {
        let all = echo(&echo_service(0).await, 5, Duration::from_secs(1)).await.unwrap();
        assert_eq!((all.sent, all.received, all.loss()), (5, 5, 0.0));
        let half = echo(&echo_service(2).await, 10, Duration::from_millis(500)).await.unwrap();
        assert_eq!((half.sent, half.received), (10, 5));
        assert!((half.loss() - 0.5).abs() < 1e-9);
        // Nobody there: everything lost, no error.
        let nobody: HostPort = {
            let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().to_string().parse().unwrap()
        };
        let lost = echo(&nobody, 3, Duration::from_millis(300)).await.unwrap();
        assert_eq!((lost.sent, lost.received, lost.loss()), (3, 0, 1.0));
    }
}
