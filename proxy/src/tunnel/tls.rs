//! TLS for tunnel connections (rustls with the `ring` provider): the router's acceptor and the
//! publishers' and visitors' connectors, built from PEM files when a config is applied. A file that
//! cannot be read or parsed rejects the config, with the path of the setting that names it.

use std::sync::Arc;

use keel_schemas::config::{ClientTls, ServerTls};
use keel_schemas::types::{Host, HostPort};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::conn::Conn;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|error| format!("cannot read {path}: {error}"))
}

fn certificates(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path)?;
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|error| format!("{path}: not PEM certificates: {error}"))?;
    if certificates.is_empty() {
        return Err(format!("{path}: no certificate in the file"));
    }
    Ok(certificates)
}

fn private_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|error| format!("{path}: no usable private key: {error}"))
}

fn roots(path: &str) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(path)? {
        roots.add(certificate).map_err(|error| format!("{path}: not a usable CA certificate: {error}"))?;
    }
    Ok(Arc::new(roots))
}

/// The router's side of TLS.
#[derive(Clone)]
pub struct Server(TlsAcceptor);

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").finish_non_exhaustive()
    }
}

impl Server {
    /// The acceptor for `tls`.
    pub fn new(tls: &ServerTls) -> Result<Self, String> {
        acceptor(tls).map(Self)
    }

    /// TLS over an accepted `stream`, the client's certificate checked when the router asks for one.
    pub async fn accept(&self, stream: TcpStream) -> std::io::Result<Conn> {
        let tls = self.0.accept(stream).await?;
        Ok(Conn::Tls(Box::new(tls.into())))
    }
}

fn acceptor(tls: &ServerTls) -> Result<TlsAcceptor, String> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?;
    let builder = match &tls.client_ca_file {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                .build()
                .map_err(|error| format!("{ca}: {error}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(certificates(&tls.cert_file)?, private_key(&tls.key_file)?)
        .map_err(|error| format!("{} and {}: {error}", tls.cert_file, tls.key_file))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// How to open TLS to one router.
#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl Client {
    /// The connector for a router at `address`.
    pub fn new(tls: &ClientTls, address: &HostPort) -> Result<Self, String> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?
            .with_root_certificates(roots(&tls.ca_file)?);
        let config = match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(certificates(cert)?, private_key(key)?)
                .map_err(|error| format!("{cert} and {key}: {error}"))?,
            _ => builder.with_no_client_auth(),
        };
        let name = match (&tls.server_name, &address.host) {
            (Some(name), _) => name.clone(),
            (None, Host::Name(name)) => name.clone(),
            (None, Host::Ip(ip)) => ip.to_string(),
        };
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| format!("{name:?} is not a valid server name"))?;
        Ok(Self { connector: TlsConnector::from(Arc::new(config)), server_name })
    }

    /// TLS over `stream`, the router's certificate checked.
    pub async fn connect(&self, stream: TcpStream) -> std::io::Result<Conn> {
        let tls = self.connector.connect(self.server_name.clone(), stream).await?;
        Ok(Conn::Tls(Box::new(tls.into())))
    }
}

/// TLS to the control plane: its certificate checked against `ca_file` for `server_name`, HTTP/1.1 by
/// ALPN.
#[derive(Clone)]
pub struct ControlPlaneClient {
    connector: TlsConnector,
    server_name: ServerName<'static>,
}

impl std::fmt::Debug for ControlPlaneClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneClient").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl ControlPlaneClient {
    pub async fn connect(
        &self,
        stream: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        self.connector.connect(self.server_name.clone(), stream).await
    }
}

pub fn control_plane_client(ca_file: &str, server_name: &str) -> Result<ControlPlaneClient, String> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_root_certificates(roots(ca_file)?)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server_name = ServerName::try_from(server_name.to_string())
        .map_err(|_| format!("{server_name:?} is not a valid server name"))?;
    Ok(ControlPlaneClient { connector: TlsConnector::from(Arc::new(config)), server_name })
}
