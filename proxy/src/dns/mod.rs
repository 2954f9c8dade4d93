//! The DNS side of the proxy (issue 3, in progress).
//!
//! Built so far: [`upstream`], which forwards a query to the configured resolvers. Still to come: the
//! hickory-server request handler that answers hijacked names from `keel_schemas::dns::HijackTable` and
//! forwards the rest through a cache, its wiring into `Proxy::apply`, metrics and `/config_dump`.

pub mod upstream;
