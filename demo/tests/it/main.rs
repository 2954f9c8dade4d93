//! The demo's and the deployment's tests, in one binary (one link instead of two).

mod demo;
mod deploy;
