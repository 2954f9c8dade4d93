//! The proxy's DNS server: hijacked service names answered with VIPs, everything else forwarded.
//!
//! - [`server`]: how a query is answered, Keel's UDP front end, the worker threads;
//! - [`tcp`]: DNS over TCP, with hickory's framing, under a connection limit;
//! - [`batch`]: `recvmmsg`/`sendmmsg` for the UDP front end;
//! - [`wire`]: plain A/AAAA queries for hijacked names answered from the bytes;
//! - [`upstream`]: forwarding to the configured resolvers;
//! - [`cache`]: forwarded answers kept for their TTLs.
//!
//! The names and VIPs themselves come from `keel_schemas::dns::HijackTable`.

pub mod batch;
pub mod cache;
pub mod server;
pub mod tcp;
pub mod upstream;
pub mod wire;
