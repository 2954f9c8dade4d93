//! The DNS side of the proxy (issue 3, in progress).
//!
//! Built so far: [`upstream`], which forwards a query to the configured resolvers, and [`cache`], which
//! keeps their answers for their TTLs. Still to come: the hickory-server request handler that answers
//! hijacked names from `keel_schemas::dns::HijackTable` and forwards the rest through the cache, its
//! wiring into `Proxy::apply`, metrics and `/config_dump`.

pub mod cache;
pub mod server;
pub mod upstream;
