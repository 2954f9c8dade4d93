//! The tunnel protocol's frames (docs/tunnel-protocol.md): a type byte, a big-endian `u16` payload length,
//! the payload. Encoding is to a `Vec`, decoding from a whole payload, so that a frame is read and
//! written with one call each and a malformed one never leaves a stream half-read.

use std::fmt;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The first bytes of every `Hello`.
pub const MAGIC: [u8; 4] = *b"KEEL";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;

pub type Nonce = [u8; 16];
pub type Mac = [u8; 32];

/// What a connection is for, named in its `Hello`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Control,
    PublisherPool,
    VisitorPool,
}

impl Kind {
    pub(crate) fn code(self) -> u8 {
        match self {
            Kind::Control => 1,
            Kind::PublisherPool => 2,
            Kind::VisitorPool => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Kind::Control),
            2 => Some(Kind::PublisherPool),
            3 => Some(Kind::VisitorPool),
            _ => None,
        }
    }
}

/// Why a router or a publisher refused something; carried in `Refused` and `Rejected`, and the label of
/// the handshake-failure metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    UnsupportedVersion,
    BadToken,
    ClockSkew,
    Replayed,
    UnknownService,
    BadSecret,
    LocalUnreachable,
    Malformed,
    NameTaken,
    Busy,
    /// A TLS handshake failed; only counted, never sent (there is no session to send it on).
    TlsHandshake,
}

impl Reason {
    pub const ALL: [Reason; 11] = [
        Reason::UnsupportedVersion,
        Reason::BadToken,
        Reason::ClockSkew,
        Reason::Replayed,
        Reason::UnknownService,
        Reason::BadSecret,
        Reason::LocalUnreachable,
        Reason::Malformed,
        Reason::NameTaken,
        Reason::Busy,
        Reason::TlsHandshake,
    ];

    fn code(self) -> u8 {
        match self {
            Reason::UnsupportedVersion => 1,
            Reason::BadToken => 2,
            Reason::ClockSkew => 3,
            Reason::Replayed => 4,
            Reason::UnknownService => 5,
            Reason::BadSecret => 6,
            Reason::LocalUnreachable => 7,
            Reason::Malformed => 8,
            Reason::NameTaken => 9,
            Reason::Busy => 10,
            Reason::TlsHandshake => 11,
        }
    }

    fn from_code(code: u8) -> Self {
        Reason::ALL.into_iter().find(|reason| reason.code() == code).unwrap_or(Reason::Malformed)
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::UnsupportedVersion => "unsupported_version",
            Reason::BadToken => "bad_token",
            Reason::ClockSkew => "clock_skew",
            Reason::Replayed => "replayed",
            Reason::UnknownService => "unknown_service",
            Reason::BadSecret => "bad_secret",
            Reason::LocalUnreachable => "local_unreachable",
            Reason::Malformed => "malformed",
            Reason::NameTaken => "name_taken",
            Reason::Busy => "busy",
            Reason::TlsHandshake => "tls_handshake",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label().replace('_', " "))
    }
}

/// The first frame of every connection: who is connecting, for what, and proof of the router token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u8,
    pub kind: Kind,
    pub node: String,
    /// The service, on a publisher's pooled connection; empty otherwise.
    pub service: String,
    /// The control session a publisher's pooled connection belongs to; 0 otherwise.
    pub session: u64,
    pub time: u64,
    pub nonce: Nonce,
    pub mac: Mac,
}

/// A visitor's request for a service, with its proof of the service secret. The router passes it on to
/// the publisher unchanged, as `Connect`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    pub service: String,
    pub node: String,
    pub time: u64,
    pub nonce: Nonce,
    pub mac: Mac,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Welcome {
        router: String,
        version: u8,
        session: u64,
    },
    Refused {
        reason: Reason,
        detail: String,
    },
    Register {
        service: String,
        share: bool,
    },
    Watch {
        service: String,
    },
    Status {
        service: String,
        publishers: u16,
    },
    Need {
        service: String,
        count: u16,
    },
    Ping(u64),
    Pong(u64),
    Open(Open),
    Opened,
    Connect(Open),
    Accepted,
    Rejected {
        reason: Reason,
        detail: String,
    },
    /// A frame type this build does not know; control connections skip it (newer peers may send it).
    Unknown(u8),
}

/// A stream that did not carry a well-formed frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
}

impl Frame {
    fn code(&self) -> u8 {
        match self {
            Frame::Hello(_) => 1,
            Frame::Welcome { .. } => 2,
            Frame::Refused { .. } => 3,
            Frame::Register { .. } => 4,
            Frame::Watch { .. } => 5,
            Frame::Status { .. } => 6,
            Frame::Need { .. } => 7,
            Frame::Ping(_) => 8,
            Frame::Pong(_) => 9,
            Frame::Open(_) => 10,
            Frame::Opened => 11,
            Frame::Connect(_) => 12,
            Frame::Accepted => 13,
            Frame::Rejected { .. } => 14,
            Frame::Unknown(code) => *code,
        }
    }

    /// The frame's bytes: header and payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Payload::default();
        match self {
            Frame::Hello(hello) => {
                payload.bytes(&MAGIC);
                payload.u8(hello.version);
                payload.u8(hello.kind.code());
                payload.str(&hello.node);
                payload.str(&hello.service);
                payload.u64(hello.session);
                payload.u64(hello.time);
                payload.bytes(&hello.nonce);
                payload.bytes(&hello.mac);
            }
            Frame::Welcome { router, version, session } => {
                payload.str(router);
                payload.u8(*version);
                payload.u64(*session);
            }
            Frame::Refused { reason, detail } | Frame::Rejected { reason, detail } => {
                payload.u8(reason.code());
                payload.str(detail);
            }
            Frame::Register { service, share } => {
                payload.str(service);
                payload.u8(u8::from(*share));
            }
            Frame::Watch { service } => payload.str(service),
            Frame::Status { service, publishers: count } | Frame::Need { service, count } => {
                payload.str(service);
                payload.u16(*count);
            }
            Frame::Ping(sequence) | Frame::Pong(sequence) => payload.u64(*sequence),
            Frame::Open(open) | Frame::Connect(open) => {
                payload.str(&open.service);
                payload.str(&open.node);
                payload.u64(open.time);
                payload.bytes(&open.nonce);
                payload.bytes(&open.mac);
            }
            Frame::Opened | Frame::Accepted | Frame::Unknown(_) => {}
        }
        let mut bytes = Vec::with_capacity(3 + payload.0.len());
        bytes.push(self.code());
        bytes.extend_from_slice(&(payload.0.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&payload.0);
        bytes
    }

    /// The frame of type `code` with `payload`. Bytes after the fields a frame has are ignored (later
    /// versions may append fields).
    pub fn decode(code: u8, payload: &[u8]) -> Result<Frame, FrameError> {
        let mut r = Reader(payload);
        Ok(match code {
            1 => {
                if r.take(4)? != MAGIC {
                    return Err(FrameError::Malformed("not a Keel tunnel connection"));
                }
                let version = r.u8()?;
                let kind =
                    Kind::from_code(r.u8()?).ok_or(FrameError::Malformed("unknown connection kind"))?;
                Frame::Hello(Hello {
                    version,
                    kind,
                    node: r.str()?,
                    service: r.str()?,
                    session: r.u64()?,
                    time: r.u64()?,
                    nonce: r.array()?,
                    mac: r.array()?,
                })
            }
            2 => Frame::Welcome { router: r.str()?, version: r.u8()?, session: r.u64()? },
            3 => Frame::Refused { reason: Reason::from_code(r.u8()?), detail: r.str()? },
            4 => Frame::Register { service: r.str()?, share: r.u8()? != 0 },
            5 => Frame::Watch { service: r.str()? },
            6 => Frame::Status { service: r.str()?, publishers: r.u16()? },
            7 => Frame::Need { service: r.str()?, count: r.u16()? },
            8 => Frame::Ping(r.u64()?),
            9 => Frame::Pong(r.u64()?),
            10 | 12 => {
                let open = Open {
                    service: r.str()?,
                    node: r.str()?,
                    time: r.u64()?,
                    nonce: r.array()?,
                    mac: r.array()?,
                };
                if code == 10 { Frame::Open(open) } else { Frame::Connect(open) }
            }
            11 => Frame::Opened,
            13 => Frame::Accepted,
            14 => Frame::Rejected { reason: Reason::from_code(r.u8()?), detail: r.str()? },
            other => Frame::Unknown(other),
        })
    }
}

#[derive(Default)]
struct Payload(Vec<u8>);

impl Payload {
    fn u8(&mut self, value: u8) {
        self.0.push(value);
    }
    fn u16(&mut self, value: u16) {
        self.0.extend_from_slice(&value.to_be_bytes());
    }
    fn u64(&mut self, value: u64) {
        self.0.extend_from_slice(&value.to_be_bytes());
    }
    fn bytes(&mut self, value: &[u8]) {
        self.0.extend_from_slice(value);
    }
    /// A string of at most 255 bytes; longer ones are cut at a character boundary (names are
    /// validated far shorter, and details are for humans).
    fn str(&mut self, value: &str) {
        let mut end = value.len().min(255);
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        self.0.push(end as u8);
        self.0.extend_from_slice(&value.as_bytes()[..end]);
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.0.len() < n {
            return Err(FrameError::Malformed("payload too short"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }
    fn str(&mut self) -> Result<String, FrameError> {
        let length = usize::from(self.u8()?);
        let bytes = self.take(length)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FrameError::Malformed("a string is not UTF-8"))
    }
}

/// Reads one frame, reading exactly its bytes and no more (the relayed bytes that may follow stay in the
/// stream).
pub async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Frame, FrameError> {
    let (code, length) = read_header(stream).await?;
    Frame::decode(code, &read_payload(stream, length).await?)
}

/// Reads one frame and whatever bytes had arrived behind it, up to `most` of them: for the last frame
/// before raw bytes (`Open` at a router, `Connect` at a publisher), so that what an application sent
/// along with it costs no read of its own and goes on in the same write. An idle pooled connection
/// waits here holding only the three header bytes; the buffer is taken once the frame has begun.
pub async fn read_frame_and_following<S: AsyncRead + Unpin>(
    stream: &mut S,
    most: usize,
) -> Result<(Frame, Vec<u8>), FrameError> {
    let (code, length) = read_header(stream).await?;
    let mut bytes = vec![0u8; length + most];
    let mut filled = 0;
    while filled < length {
        match stream.read(&mut bytes[filled..]).await? {
            0 => return Err(FrameError::Malformed("connection closed inside a frame")),
            read => filled += read,
        }
    }
    bytes.truncate(filled);
    let following = bytes.split_off(length);
    Ok((Frame::decode(code, &bytes)?, following))
}

/// A frame's type and payload length.
async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(u8, usize), FrameError> {
    let mut header = [0u8; 3];
    match stream.read_exact(&mut header).await {
        Ok(_) => Ok((header[0], usize::from(u16::from_be_bytes([header[1], header[2]])))),
        Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => Err(FrameError::Closed),
        Err(error) => Err(error.into()),
    }
}

async fn read_payload<S: AsyncRead + Unpin>(stream: &mut S, length: usize) -> Result<Vec<u8>, FrameError> {
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).await.map_err(|error| match error.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Malformed("connection closed inside a frame"),
        _ => FrameError::Io(error),
    })?;
    Ok(payload)
}

/// The first whole frame at the start of `bytes` and how many bytes it took, or `None` if more bytes
/// are needed.
pub fn parse_frame(bytes: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(header) = bytes.get(..3) else { return Ok(None) };
    let length = usize::from(u16::from_be_bytes([header[1], header[2]]));
    match bytes.get(3..3 + length) {
        Some(payload) => Ok(Some((Frame::decode(header[0], payload)?, 3 + length))),
        None => Ok(None),
    }
}

/// Longest `Hello` payload: magic, version, kind, two strings, three numbers, nonce and MAC.
const MAX_HELLO: usize = 4 + 1 + 1 + 2 * 256 + 8 + 8 + 16 + 32;

/// Reads the first frame of a connection, which must be a `Hello`: anything else (another protocol,
/// say) is refused on its first byte instead of waiting for a length it made up.
pub async fn read_hello<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Hello, FrameError> {
    let (code, length) = read_header(stream).await?;
    if code != 1 || length > MAX_HELLO {
        return Err(FrameError::Malformed("not a Keel tunnel connection"));
    }
    match Frame::decode(code, &read_payload(stream, length).await?)? {
        Frame::Hello(hello) => Ok(hello),
        _ => Err(FrameError::Malformed("not a Keel tunnel connection")),
    }
}

/// Writes one frame with one write.
pub async fn write_frame<S: AsyncWrite + Unpin>(stream: &mut S, frame: &Frame) -> io::Result<()> {
    stream.write_all(&frame.encode()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_frame() -> Vec<Frame> {
        let open = Open {
            service: "mysql".into(),
            node: "pod-a".into(),
            time: 1_700_000_000,
            nonce: [7; 16],
            mac: [9; 32],
        };
        vec![
            Frame::Hello(Hello {
                version: VERSION,
                kind: Kind::PublisherPool,
                node: "node-1".into(),
                service: "mysql".into(),
                session: 42,
                time: 1_700_000_000,
                nonce: [1; 16],
                mac: [2; 32],
            }),
            Frame::Welcome { router: "r1".into(), version: VERSION, session: 42 },
            Frame::Refused { reason: Reason::Replayed, detail: "seen".into() },
            Frame::Register { service: "mysql".into(), share: true },
            Frame::Watch { service: "mysql".into() },
            Frame::Status { service: "mysql".into(), publishers: 3 },
            Frame::Need { service: "mysql".into(), count: 2 },
            Frame::Ping(5),
            Frame::Pong(5),
            Frame::Open(open.clone()),
            Frame::Opened,
            Frame::Connect(open),
            Frame::Accepted,
            Frame::Rejected { reason: Reason::BadSecret, detail: String::new() },
        ]
    }

    #[tokio::test]
    async fn frames_round_trip_over_a_stream_and_leave_what_follows() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        for frame in every_frame() {
            write_frame(&mut client, &frame).await.unwrap();
        }
        client.write_all(b"raw bytes").await.unwrap();
        drop(client);
        for frame in every_frame() {
            assert_eq!(read_frame(&mut server).await.unwrap(), frame);
        }
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"raw bytes");
    }

    #[tokio::test]
    async fn a_frame_is_read_with_the_bytes_behind_it_up_to_a_bound() {
        let open = every_frame().into_iter().find(|frame| matches!(frame, Frame::Open(_))).unwrap();
        // The frame and an application's first bytes in one write, as a visitor sends them.
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let mut sent = open.encode();
        sent.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        client.write_all(&sent).await.unwrap();
        let (frame, following) = read_frame_and_following(&mut server, 1024).await.unwrap();
        assert_eq!(frame, open);
        assert_eq!(following, b"GET / HTTP/1.1\r\n\r\n");

        // More behind the frame than the bound: the rest stays in the stream, in order.
        let mut sent = open.encode();
        sent.extend(0..100u8);
        client.write_all(&sent).await.unwrap();
        drop(client);
        let (frame, following) = read_frame_and_following(&mut server, 10).await.unwrap();
        assert_eq!(frame, open);
        assert_eq!(following, (0..10u8).collect::<Vec<_>>());
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, (10..100u8).collect::<Vec<_>>());

        // A frame that arrives a few bytes at a time, with nothing behind it.
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let reader = tokio::spawn(async move { read_frame_and_following(&mut server, 1024).await });
        for piece in open.encode().chunks(7) {
            client.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        let (frame, following) = reader.await.unwrap().unwrap();
        assert_eq!(frame, open);
        assert!(following.is_empty());

        // Closed before a byte, and closed inside a frame.
        let (client, mut server) = tokio::io::duplex(1024);
        drop(client);
        assert!(matches!(read_frame_and_following(&mut server, 1024).await, Err(FrameError::Closed)));
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&open.encode()[..20]).await.unwrap();
        drop(client);
        assert!(matches!(read_frame_and_following(&mut server, 1024).await, Err(FrameError::Malformed(_))));
    }

    #[tokio::test]
    async fn short_or_foreign_input_is_refused_cleanly() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        drop(client.write_all(&[]).await);
        drop(client);
        assert!(matches!(read_frame(&mut server).await, Err(FrameError::Closed)));

        // An HTTP request is not a Hello.
        assert!(matches!(Frame::decode(1, b"GET / HTTP/1.1\r\n"), Err(FrameError::Malformed(_))));
        // A frame cut short.
        let bytes = Frame::Status { service: "mysql".into(), publishers: 1 }.encode();
        assert!(matches!(Frame::decode(bytes[0], &bytes[3..bytes.len() - 1]), Err(FrameError::Malformed(_))));
        // Fields a later version appends are ignored; unknown types are reported as such.
        let mut longer = bytes[3..].to_vec();
        longer.extend_from_slice(b"future");
        assert_eq!(
            Frame::decode(6, &longer).unwrap(),
            Frame::Status { service: "mysql".into(), publishers: 1 }
        );
        assert_eq!(Frame::decode(200, b"").unwrap(), Frame::Unknown(200));
        // A frame whose length runs past the end of the stream.
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(&[6, 0, 50, 1, 2]).await.unwrap();
        drop(client);
        assert!(matches!(read_frame(&mut server).await, Err(FrameError::Malformed(_))));
    }
}
