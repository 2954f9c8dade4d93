//! The address HTTP echo services see (`https://api64.ipify.org`, `https://ifconfig.co/ip`): a GET over
//! the wanted family (the server's address of that family is dialled), whose body is the address.

use std::net::IpAddr;
use std::time::Duration;

use keel_schemas::config::AddressFamily;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Asks each URL in turn; the first that answers with an address of `family` wins.
pub async fn echoed_address(urls: &[String], family: AddressFamily) -> Result<IpAddr, String> {
    let mut problems = Vec::new();
    for url in urls {
        match tokio::time::timeout(TIMEOUT, ask(url, family)).await {
            Ok(Ok(address)) => return Ok(address),
            Ok(Err(problem)) => problems.push(format!("{url}: {problem}")),
            Err(_) => problems.push(format!("{url}: no answer within {TIMEOUT:?}")),
        }
    }
    Err(if problems.is_empty() { "no echo URLs".to_string() } else { problems.join("; ") })
}

async fn ask(url: &str, family: AddressFamily) -> Result<IpAddr, String> {
    let uri: hyper::Uri = url.parse().map_err(|error| format!("invalid URL: {error}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("only http:// and https:// URLs".to_string()),
    };
    let host = uri.host().ok_or("no host")?.trim_matches(['[', ']']).to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let candidates = match host.parse::<IpAddr>() {
        Ok(ip) => vec![std::net::SocketAddr::new(ip, port)],
        Err(_) => crate::cluster::resolve(&host, port).await.map_err(|error| error.to_string())?,
    };
    let target = candidates
        .into_iter()
        .find(|address| address.is_ipv6() == (family == AddressFamily::Ipv6))
        .ok_or_else(|| format!("{host} has no {family:?} address"))?;
    let user_agent = concat!("keel/", env!("CARGO_PKG_VERSION"));
    let headers = [("User-Agent", user_agent), ("Accept", "text/plain")];
    let answer = keel_ddns::http::request_at(target, "GET", url, &headers, None).await?;
    if !(200..300).contains(&answer.status) {
        return Err(format!("answered {}", answer.status));
    }
    let text = String::from_utf8_lossy(&answer.body);
    let address: IpAddr = text.trim().parse().map_err(|_| {
        format!("the answer is not an address: {:?}", text.chars().take(64).collect::<String>())
    })?;
    if address.is_ipv6() != (family == AddressFamily::Ipv6) {
        return Err(format!("asked over {family:?}, answered {address}"));
    }
    Ok(address)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A one-connection echo service answering `body`.
    async fn echo_service(body: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, peer) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).await.unwrap();
            let request = String::from_utf8_lossy(&request[..n]).to_string();
            assert!(request.starts_with("GET /ip HTTP/1.1\r\n"), "{request}");
            let body = if body.is_empty() { peer.ip().to_string() } else { body.to_string() };
            let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
            stream.write_all(reply.as_bytes()).await.unwrap();
        });
        format!("http://{address}/ip")
    }

    #[tokio::test]
    async fn the_first_url_that_answers_with_an_address_wins() {
        let garbage = echo_service("<html>not an address</html>").await;
        let good = echo_service("").await;
        let urls = vec!["http://127.0.0.1:1/ip".to_string(), garbage, good];
        assert_eq!(echoed_address(&urls, AddressFamily::Ipv4).await.unwrap(), IpAddr::from([127, 0, 0, 1]));
        let error =
            echoed_address(&["http://127.0.0.1:1/ip".to_string()], AddressFamily::Ipv4).await.unwrap_err();
        assert!(error.contains("127.0.0.1:1"), "{error}");
        // Over IPv6 a literal IPv4 URL has no address of the family.
        assert!(echoed_address(&[echo_service("").await], AddressFamily::Ipv6).await.is_err());
    }
}
