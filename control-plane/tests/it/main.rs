//! The control plane's integration tests, in one binary: one link instead of one per file, which is
//! most of the build's time and disk. `cargo test -p keel-control-plane --test it faults` runs one module.

mod support;

mod alibaba;
mod api;
mod cloudflare;
mod ddns;
mod faults;
mod fleet;
mod gandi;
mod netcheck;
mod rfc2136;
mod slow_clients;
mod state_page;
