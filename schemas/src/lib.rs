//! Keel's contract: the typed model of keel.yaml that the proxy runs and the control plane serves.
//!
//! This crate does no I/O. Text comes in as a `&str`, the outside world (environment variables, secret
//! files) through the [`Environment`] trait, and what comes out is either a [`ValidatedConfig`] or
//! [`ConfigErrors`] naming every problem with its YAML path and line:column.
//!
//! - [`config`]: the structs, their defaults and docs (which become the JSON Schema's descriptions).
//! - [`types`]: durations, addresses, CIDRs and secrets as keel.yaml spells them.
//! - [`load`](mod@load): text → validated config; [`validate`](validate::validate): the semantic checks.
//! - [`dns`]: DNS names and the hijack table (which name answers with which VIP).
//! - [`resource`]: the control plane's resources (Kubernetes shape) and how their specs are checked.
//! - [`stream`]: the messages between a proxy and the control plane.
//! - [`json_schema`]: the schema committed as `schemas/keel.schema.json` for editors.

pub mod config;
pub mod diagnostic;
pub mod dns;
pub mod interpolate;
pub mod load;
pub mod resource;
pub mod stream;
pub mod types;
pub mod validate;
mod yaml;

pub use config::Config;
pub use diagnostic::{ConfigErrors, ConfigPath, Diagnostic, Location};
pub use interpolate::{Environment, MapEnvironment};
pub use load::{Prepare, ValidatedConfig, load, load_with};

/// The version of a config text, a file's or a snapshot's: FNV-1a of its bytes, so the same content always
/// has the same version, in the proxy and in the control plane, across builds and platforms.
pub fn version_of(text: &str) -> String {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("{hash:016x}")
}

/// The JSON Schema of keel.yaml, as committed in `schemas/keel.schema.json`.
pub fn json_schema() -> serde_json::Value {
    let mut schema = schemars::schema_for!(Config).to_value();
    if let Some(object) = schema.as_object_mut() {
        object.insert("title".into(), "keel.yaml".into());
        object.insert(
            "description".into(),
            "Configuration of a Keel proxy. Unknown keys are errors; values may use ${VAR} and ${VAR:-default}."
                .into(),
        );
    }
    schema
}

/// The committed schema file, pretty-printed with a trailing newline.
pub fn json_schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&json_schema()).expect("a JSON value always serializes");
    text.push('\n');
    text
}
