//! Test helpers: upstream servers, an in-process proxy on a temp config file, and a tiny HTTP client for
//! the admin API. Everything binds 127.0.0.1:0 and reads the port back.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keel_proxy::{ProcessEnvironment, Proxy, Shutdown, source};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// An upstream server that stops accepting (and closes its socket) when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// Serves each connection with `handler` on `addr` (use port 0 for a fresh one).
    pub async fn serve<F, Fut>(addr: SocketAddr, handler: F) -> Upstream
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(handler(stream));
            }
        });
        Upstream { addr, task }
    }

    /// Echoes every byte back; on EOF from the client, closes its write side too.
    pub async fn echo() -> Upstream {
        Self::echo_at("127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn echo_at(addr: SocketAddr) -> Upstream {
        Self::serve(addr, |mut stream| async move {
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
            let _ = write.shutdown().await;
        })
        .await
    }

    /// Writes `tag` and closes: tells a test which endpoint served the connection.
    pub async fn tagged(tag: &'static str) -> Upstream {
        Self::tagged_at("127.0.0.1:0".parse().unwrap(), tag).await
    }

    pub async fn tagged_at(addr: SocketAddr, tag: &'static str) -> Upstream {
        Self::serve(addr, move |mut stream| async move {
            let _ = stream.write_all(tag.as_bytes()).await;
            let _ = stream.shutdown().await;
        })
        .await
    }

    /// Writes `tag`, then holds the connection open until the client closes it.
    pub async fn tagged_holding(tag: &'static str) -> Upstream {
        Self::serve("127.0.0.1:0".parse().unwrap(), move |mut stream| async move {
            let _ = stream.write_all(tag.as_bytes()).await;
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink).await;
        })
        .await
    }
}

/// A port on which nothing listens: connects to it are refused.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Connects and reads until EOF.
pub async fn read_all(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut out = String::new();
    stream.read_to_string(&mut out).await.expect("read");
    out
}

/// One round trip through an echo path.
pub async fn echo_once(stream: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    stream.write_all(message).await?;
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back).await?;
    assert_eq!(back, message);
    Ok(())
}

/// Asserts that the peer closes `stream` (EOF or reset) within `limit`, without sending anything.
pub async fn expect_closed(stream: &mut TcpStream, limit: Duration) {
    let mut buffer = [0u8; 1];
    let read = tokio::time::timeout(limit, stream.read(&mut buffer)).await;
    let read = read.unwrap_or_else(|_| panic!("the connection is still open after {limit:?}"));
    assert!(matches!(read, Ok(0) | Err(_)), "expected the connection closed, read {read:?}");
}

/// Polls `check` every 20 ms until it is true, failing after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A proxy running in this process from a config file in a temp directory.
pub struct TestProxy {
    pub proxy: Proxy,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub dir: tempfile::TempDir,
    serve: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestProxy {
    pub async fn start(config: &str) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("keel.yaml");
        std::fs::write(&config_path, config).unwrap();
        Self::start_at(dir, config_path).await
    }

    /// Starts from an existing file (for symlinked layouts).
    pub async fn start_at(dir: tempfile::TempDir, config_path: PathBuf) -> TestProxy {
        let loaded = source::load_file(&config_path, &ProcessEnvironment).unwrap_or_else(|e| panic!("{e}"));
        let proxy = Proxy::new(Arc::new(ProcessEnvironment), Some(config_path.clone()));
        let admin_socket = keel_proxy::bind_admin(&loaded.config).unwrap();
        let admin = admin_socket.local_addr().unwrap();
        proxy.apply(loaded.config, &source::file_source_name(&config_path), &loaded.version).await.unwrap();
        let serve = Some(tokio::spawn(keel_proxy::serve(proxy.clone(), admin_socket)));
        TestProxy { proxy, admin, config_path, dir, serve }
    }

    pub async fn addr(&self, listener: &str) -> SocketAddr {
        self.proxy.listener_addr(listener).await.unwrap_or_else(|| panic!("no listener {listener}"))
    }

    /// Rewrites the config file the way editors do: a new file renamed over the old one.
    pub fn replace_config(&self, config: &str) {
        let temp = self.dir.path().join(".keel.yaml.tmp");
        std::fs::write(&temp, config).unwrap();
        std::fs::rename(&temp, &self.config_path).unwrap();
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http(self.admin, "GET", path, None).await
    }

    pub async fn post(&self, path: &str) -> (u16, String) {
        http(self.admin, "POST", path, None).await
    }

    pub async fn metric(&self, line_prefix: &str) -> f64 {
        let (_, body) = self.get("/stats/prometheus").await;
        body.lines()
            .find(|line| line.starts_with(line_prefix))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or(0.0)
    }

    /// Graceful shutdown, waiting for the proxy to finish.
    pub async fn stop(mut self) {
        self.proxy.shutdown(Shutdown::Graceful);
        if let Some(serve) = self.serve.take() {
            serve.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if self.serve.is_some() {
            self.proxy.shutdown(Shutdown::Fast);
        }
    }
}

/// A one-request HTTP/1.1 client: (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect admin");
    let auth = bearer.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: keel\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response).to_string();
    let status = response.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}
