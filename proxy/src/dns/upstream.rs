//! Forwarding a query to upstream resolvers.
//!
//! Upstreams are tried in order. Each gets the query over UDP under a fresh random ID (a reply is
//! accepted only with that ID and the same question, so a stray or forged datagram is ignored), and
//! again over TCP when its UDP answer comes back truncated. An upstream that fails or has not answered
//! within the timeout gives way to the next, and is passed over (tried after the healthy ones) for a
//! while, so that a black-holed resolver costs one query the timeout, not every query: 5 s after its
//! first failure, doubling with each failure in a row up to 60 s; one answer ends it. A semaphore bounds
//! the queries waiting on upstreams; past it, a query fails at once rather than queueing without limit.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// Largest DNS message over UDP or TCP.
const MAX_MESSAGE: usize = 65_535;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver is configured")]
    NoUpstream,
    #[error("{0} queries are already waiting for an upstream")]
    Busy(usize),
    #[error("the query is not a DNS message: {0}")]
    BadQuery(String),
    #[error("every upstream failed; the last, {upstream}: {error}")]
    AllFailed { upstream: SocketAddr, error: String },
}

/// An upstream's answer, with the client's ID put back.
#[derive(Debug)]
pub struct Answer {
    pub message: Message,
    pub upstream: SocketAddr,
    /// The answer came over TCP, after a truncated UDP answer.
    pub over_tcp: bool,
}

/// How long an upstream is passed over after its first failure in a row; each further failure doubles
/// it, up to [`MAX_PASS_OVER`].
const FIRST_PASS_OVER: Duration = Duration::from_secs(5);
const MAX_PASS_OVER: Duration = Duration::from_secs(60);

/// One upstream's recent record.
#[derive(Debug, Default)]
struct Health {
    failures_in_a_row: AtomicU32,
    /// Until when (milliseconds after [`Upstreams::epoch`]) the upstream is tried only after the others.
    passed_over_until: AtomicU64,
}

/// The upstream resolvers of one config.
#[derive(Debug)]
pub struct Upstreams {
    servers: Vec<SocketAddr>,
    health: Vec<Health>,
    epoch: tokio::time::Instant,
    timeout: Duration,
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
}

impl Upstreams {
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration, max_in_flight: usize) -> Self {
        let health = servers.iter().map(|_| Health::default()).collect();
        Self {
            servers,
            health,
            epoch: tokio::time::Instant::now(),
            timeout,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
        }
    }

    fn now_millis(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The order to try the upstreams in: those not passed over, then the rest, each in config order.
    /// Decided once, before the first is tried (a failure during the query must not reorder it).
    fn order(&self) -> Vec<usize> {
        let now = self.now_millis();
        let (mut healthy, passed_over): (Vec<usize>, Vec<usize>) = (0..self.servers.len())
            .partition(|&index| self.health[index].passed_over_until.load(Ordering::Relaxed) <= now);
        healthy.extend(passed_over);
        healthy
    }

    fn answered(&self, index: usize) {
        let health = &self.health[index];
        if health.failures_in_a_row.swap(0, Ordering::Relaxed) > 0 {
            health.passed_over_until.store(0, Ordering::Relaxed);
            tracing::info!(upstream = %self.servers[index], "upstream answers again");
        }
    }

    fn failed(&self, index: usize, error: &str) {
        let health = &self.health[index];
        let in_a_row = health.failures_in_a_row.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let pass_over = FIRST_PASS_OVER.saturating_mul(1 << (in_a_row - 1).min(4)).min(MAX_PASS_OVER);
        let until =
            self.now_millis().saturating_add(u64::try_from(pass_over.as_millis()).unwrap_or(u64::MAX));
        health.passed_over_until.store(until, Ordering::Relaxed);
        if in_a_row == 1 {
            tracing::warn!(upstream = %self.servers[index], error, ?pass_over, "upstream failed; passing it over");
        }
    }

    /// Forwards `query` (a whole DNS message) and returns the first answer an upstream gives.
    pub async fn forward(&self, query: &Message) -> Result<Answer, ForwardError> {
        if self.servers.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let _permit = self.in_flight.try_acquire().map_err(|_| ForwardError::Busy(self.max_in_flight))?;
        let mut outgoing = query.clone();
        let mut last = None;
        for index in self.order() {
            let upstream = self.servers[index];
            outgoing.metadata.id = fastrand::u16(..);
            let bytes = outgoing.to_vec().map_err(|error| ForwardError::BadQuery(error.to_string()))?;
            let exchange = self.exchange(upstream, &bytes, &outgoing);
            let error = match tokio::time::timeout(self.timeout, exchange).await {
                Ok(Ok((mut message, over_tcp))) => {
                    self.answered(index);
                    message.metadata.id = query.metadata.id;
                    return Ok(Answer { message, upstream, over_tcp });
                }
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no answer within {:?}", self.timeout),
            };
            self.failed(index, &error);
            tracing::debug!(%upstream, %error, "upstream failed; trying the next");
            last = Some((upstream, error));
        }
        let (upstream, error) = last.expect("at least one upstream was tried");
        Err(ForwardError::AllFailed { upstream, error })
    }

    async fn exchange(
        &self,
        upstream: SocketAddr,
        bytes: &[u8],
        query: &Message,
    ) -> io::Result<(Message, bool)> {
        let answer = udp_exchange(upstream, bytes, query).await?;
        if answer.metadata.truncation {
            return tcp_exchange(upstream, bytes, query).await.map(|answer| (answer, true));
        }
        Ok((answer, false))
    }
}

/// Whether `answer` answers `query`: the same ID and the same question.
fn answers(answer: &Message, query: &Message) -> bool {
    answer.metadata.id == query.metadata.id && answer.queries == query.queries
}

fn invalid(error: impl ToString) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}

async fn udp_exchange(upstream: SocketAddr, bytes: &[u8], query: &Message) -> io::Result<Message> {
    let local: SocketAddr = if upstream.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(bytes).await?;
    let mut buffer = vec![0u8; MAX_MESSAGE];
    loop {
        let length = socket.recv(&mut buffer).await?;
        // Anything that is not the answer to this query (late, garbled or forged) is dropped; the
        // timeout around the exchange bounds the wait.
        if let Ok(answer) = Message::from_vec(&buffer[..length])
            && answers(&answer, query)
        {
            return Ok(answer);
        }
    }
}

async fn tcp_exchange(upstream: SocketAddr, bytes: &[u8], query: &Message) -> io::Result<Message> {
    let mut stream = TcpStream::connect(upstream).await?;
    let length = u16::try_from(bytes.len()).map_err(invalid)?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await?;
    let length = stream.read_u16().await?;
    let mut buffer = vec![0u8; usize::from(length)];
    stream.read_exact(&mut buffer).await?;
    let answer = Message::from_vec(&buffer).map_err(invalid)?;
    if !answers(&answer, query) {
        return Err(invalid("the TCP answer does not match the query"));
    }
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::{Name, RData, Record, RecordType, rdata::A};
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn query(name: &str) -> Message {
        let mut message = Message::new(4242, MessageType::Query, OpCode::Query);
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        message
    }

    fn reply(to: &Message, address: [u8; 4], truncated: bool) -> Vec<u8> {
        let mut answer = Message::new(to.metadata.id, MessageType::Response, OpCode::Query);
        answer.metadata.response_code = ResponseCode::NoError;
        answer.metadata.truncation = truncated;
        answer.queries = to.queries.clone();
        if !truncated {
            let name = to.queries[0].name().clone();
            answer.answers.push(Record::from_rdata(
                name,
                60,
                RData::A(A::from(std::net::Ipv4Addr::from(address))),
            ));
        }
        answer.to_vec().unwrap()
    }

    /// A UDP (and TCP, on the same port) fake resolver. `udp` answers a query with the datagrams to
    /// send back; TCP always answers in full with 10.0.0.2.
    async fn fake<F>(udp: F) -> SocketAddr
    where
        F: Fn(&Message) -> Vec<Vec<u8>> + Send + Sync + 'static,
    {
        // TCP on the UDP socket's port: another test may hold that TCP port (an outgoing connection's
        // ephemeral port, say), so take another pair when it does.
        let mut tries = 0;
        let (socket, addr, tcp) = loop {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = socket.local_addr().unwrap();
            match tokio::net::TcpListener::bind(addr).await {
                Ok(tcp) => break (socket, addr, tcp),
                Err(error) if tries < 16 && error.kind() == std::io::ErrorKind::AddrInUse => tries += 1,
                Err(error) => panic!("cannot bind a fake resolver's TCP port: {error}"),
            }
        };
        tokio::spawn(async move {
            let mut buffer = vec![0u8; MAX_MESSAGE];
            while let Ok((length, peer)) = socket.recv_from(&mut buffer).await {
                let query = Message::from_vec(&buffer[..length]).unwrap();
                for datagram in udp(&query) {
                    socket.send_to(&datagram, peer).await.unwrap();
                }
            }
        });
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                let length = stream.read_u16().await.unwrap();
                let mut buffer = vec![0u8; usize::from(length)];
                stream.read_exact(&mut buffer).await.unwrap();
                let answer = reply(&Message::from_vec(&buffer).unwrap(), [10, 0, 0, 2], false);
                stream.write_u16(answer.len() as u16).await.unwrap();
                stream.write_all(&answer).await.unwrap();
            }
        });
        addr
    }

    fn first_a(answer: &Answer) -> [u8; 4] {
        match &answer.message.answers[0].data {
            RData::A(a) => a.0.octets(),
            other => panic!("not an A record: {other:?}"),
        }
    }

    #[tokio::test]
    async fn forwards_over_udp_and_restores_the_client_id() {
        let upstream = fake(|q| vec![reply(q, [10, 0, 0, 1], false)]).await;
        let upstreams = Upstreams::new(vec![upstream], Duration::from_secs(2), 8);
        let answer = upstreams.forward(&query("example.com.")).await.unwrap();
        assert_eq!(answer.message.metadata.id, 4242);
        assert_eq!(first_a(&answer), [10, 0, 0, 1]);
        assert!(!answer.over_tcp);
    }

    #[tokio::test]
    async fn a_truncated_answer_is_fetched_again_over_tcp() {
        let upstream = fake(|q| vec![reply(q, [0, 0, 0, 0], true)]).await;
        let upstreams = Upstreams::new(vec![upstream], Duration::from_secs(2), 8);
        let answer = upstreams.forward(&query("big.example.")).await.unwrap();
        assert!(answer.over_tcp);
        assert_eq!(first_a(&answer), [10, 0, 0, 2]);
    }

    #[tokio::test]
    async fn forged_or_stray_replies_are_ignored() {
        let upstream = fake(|q| {
            let mut forged = Message::from_vec(&reply(q, [6, 6, 6, 6], false)).unwrap();
            forged.metadata.id = q.metadata.id.wrapping_add(1);
            let mut other_question = Message::from_vec(&reply(q, [7, 7, 7, 7], false)).unwrap();
            other_question.queries[0].set_name(Name::from_ascii("evil.example.").unwrap());
            vec![
                forged.to_vec().unwrap(),
                other_question.to_vec().unwrap(),
                b"garbage".to_vec(),
                reply(q, [10, 0, 0, 1], false),
            ]
        })
        .await;
        let upstreams = Upstreams::new(vec![upstream], Duration::from_secs(2), 8);
        let answer = upstreams.forward(&query("example.com.")).await.unwrap();
        assert_eq!(first_a(&answer), [10, 0, 0, 1]);
    }

    #[tokio::test]
    async fn a_silent_upstream_gives_way_to_the_next() {
        let asked = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&asked);
        let silent = fake(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
            Vec::new()
        })
        .await;
        let working = fake(|q| vec![reply(q, [10, 0, 0, 1], false)]).await;
        let upstreams = Upstreams::new(vec![silent, working], Duration::from_millis(200), 8);
        let answer = upstreams.forward(&query("example.com.")).await.unwrap();
        assert_eq!(answer.upstream, working);
        assert_eq!(asked.load(Ordering::Relaxed), 1, "the silent upstream was asked first");

        // Passed over now: the next queries go straight to the working one, without waiting.
        for name in ["a.example.", "b.example."] {
            let started = std::time::Instant::now();
            let answer = upstreams.forward(&query(name)).await.unwrap();
            assert_eq!(answer.upstream, working);
            assert!(started.elapsed() < Duration::from_millis(150), "{:?}", started.elapsed());
        }
        assert_eq!(asked.load(Ordering::Relaxed), 1, "the silent upstream was asked again");
        // Still tried when nothing else answers.
        let alone = Upstreams::new(vec![silent], Duration::from_millis(50), 8);
        for _ in 0..2 {
            assert!(alone.forward(&query("c.example.")).await.is_err());
        }
        assert_eq!(asked.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_passed_over_upstream_is_tried_first_again_when_its_time_is_up() {
        let upstreams = Upstreams::new(
            vec!["127.0.0.1:9".parse().unwrap(), "127.0.0.1:10".parse().unwrap()],
            Duration::from_secs(1),
            8,
        );
        upstreams.failed(0, "test");
        assert_eq!(upstreams.order(), [1, 0]);
        tokio::time::advance(FIRST_PASS_OVER).await;
        assert_eq!(upstreams.order(), [0, 1]);
        // Failures in a row double the time, up to a minute.
        for _ in 0..10 {
            upstreams.failed(0, "test");
        }
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(upstreams.order(), [1, 0]);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(upstreams.order(), [0, 1]);
        upstreams.answered(0);
        upstreams.failed(0, "test");
        tokio::time::advance(FIRST_PASS_OVER).await;
        assert_eq!(upstreams.order(), [0, 1], "an answer resets the doubling");
    }

    #[tokio::test]
    async fn every_upstream_failing_names_the_last_one() {
        let silent = fake(|_| Vec::new()).await;
        let upstreams = Upstreams::new(vec![silent], Duration::from_millis(100), 8);
        let error = upstreams.forward(&query("example.com.")).await.unwrap_err();
        assert!(matches!(error, ForwardError::AllFailed { upstream, .. } if upstream == silent), "{error}");
        assert!(matches!(
            Upstreams::new(vec![], Duration::from_secs(1), 8).forward(&query("a.")).await,
            Err(ForwardError::NoUpstream)
        ));
    }

    #[tokio::test]
    async fn queries_past_the_in_flight_bound_fail_at_once() {
        let silent = fake(|_| Vec::new()).await;
        let upstreams = Arc::new(Upstreams::new(vec![silent], Duration::from_secs(2), 1));
        let waiting = Arc::clone(&upstreams);
        let first = tokio::spawn(async move { waiting.forward(&query("slow.example.")).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let second = upstreams.forward(&query("example.com.")).await;
        assert!(matches!(second, Err(ForwardError::Busy(1))), "{second:?}");
        first.abort();
    }
}
