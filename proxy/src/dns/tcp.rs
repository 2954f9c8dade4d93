//! DNS over TCP (RFC 7766): Keel accepts the connections, hickory-server frames the messages and sends
//! the answers, and the [`Handler`] answers as it does for hickory's other transports.
//!
//! Accepting here rather than in hickory's `Server` is what bounds the connections: at most
//! [`MAX_CONNECTIONS`] per listen address, and at that limit the idle ones (waiting for their next message)
//! are closed to make room, which RFC 7766 section 6.2.3 allows a server under pressure. A connection
//! must also send a whole message within [`IDLE_TIMEOUT`] of its last one, so a slow client holds its
//! slot that long at most. Messages on one connection are answered in order: pipelining works, and a
//! client cannot make the server hold more than one of its queries per connection.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use hickory_proto::op::SerialMessage;
use hickory_server::net::DnsStreamHandle;
use hickory_server::net::runtime::TokioTime;
use hickory_server::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_server::net::tcp::TcpStream;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandle, TimeoutStream};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::server::{Handler, form_error};
use crate::limit::{Admission, ConnectionLimit};

/// TCP connections held at once on one listen address (BIND's `tcp-clients` default is 150).
pub const MAX_CONNECTIONS: usize = 256;
/// How long a connection may go without sending a whole message.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers queued for a connection's socket.
const RESPONSE_BUFFER: usize = 32;

/// Serves `listener` until `stop`.
pub async fn serve(listener: TcpListener, handler: Handler, stop: CancellationToken) {
    let mut limit = ConnectionLimit::new("DNS TCP", MAX_CONNECTIONS);
    let connections = tokio_util::task::TaskTracker::new();
    while let Some((stream, client, admission)) = limit.accept(&listener, &stop).await {
        connections.spawn(connection(stream, client, handler.clone(), admission, stop.clone()));
    }
    connections.close();
    connections.wait().await;
}

/// One client's connection: each message answered in turn until the client closes, goes quiet, is shed,
/// or the server stops.
async fn connection(
    stream: tokio::net::TcpStream,
    client: SocketAddr,
    handler: Handler,
    admission: Admission,
    stop: CancellationToken,
) {
    let Admission { slot: _slot, shed } = admission;
    let (messages, mut answers) =
        TcpStream::from_stream_with_buffer_size(AsyncIoTokioAsStd(stream), client, RESPONSE_BUFFER);
    // Polling `messages` also writes the queued answers, all of them before it reads again.
    let mut messages = TimeoutStream::new(messages, IDLE_TIMEOUT);
    loop {
        let message = tokio::select! {
            // First, so that the last answer is written before a shed or a stop closes the connection.
            biased;
            message = messages.next() => message,
            () = shed.cancelled() => return,
            () = stop.cancelled() => return,
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                tracing::debug!(%client, %error, "DNS TCP connection closed");
                return;
            }
            None => return,
        };
        let (bytes, source) = message.into_parts();
        let unreadable = form_error(&bytes);
        match Request::from_bytes(bytes, source, Protocol::Tcp) {
            Ok(request) => {
                let response = ResponseHandle::new(source, answers.clone(), Protocol::Tcp);
                handler.handle_request::<_, TokioTime>(&request, response).await;
            }
            // A message with a header but nothing readable after it gets FORMERR; less than a header, nothing.
            Err(_) => {
                if let Some(reply) = unreadable
                    && answers.send(SerialMessage::new(reply, source)).is_err()
                {
                    return;
                }
            }
        }
    }
}
