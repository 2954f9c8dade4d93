//! The proxy's integration tests, built as one binary. Real sockets on 127.0.0.1:0 throughout.

mod admin;
mod balancing;
mod cli;
mod dns;
mod netns;
mod relay;
mod reload;
mod support;
mod tunnel;
