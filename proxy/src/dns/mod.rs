//! The proxy's DNS server: hijacked service names answered with VIPs, everything else forwarded.
//!
//! - [`server`]: the request handler, Keel's UDP front end and the per-CPU workers;
//! - [`upstream`]: forwarding to the configured resolvers;
//! - [`cache`]: forwarded answers kept for their TTLs.
//!
//! The names and VIPs themselves come from `keel_schemas::dns::HijackTable`.

pub mod batch;
pub mod cache;
pub mod server;
pub mod upstream;
pub mod wire;
