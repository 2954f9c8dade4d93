//! The one road from keel.yaml text (or a typed [`Config`]) to a [`ValidatedConfig`].
//!
//! text → YAML tree with positions → interpolated JSON value → typed [`Config`] (structural errors
//! collected section by section, list item by list item) → semantic [`validate`] → secrets read from their
//! `*_file` fields. Any problem at any step makes the whole config rejected, with every problem listed.

use std::ops::Deref;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::{
    AddressSink, AddressSource, Admin, Cluster, Config, ControlPlane, Dns, Listener, Node, Probe, Reporter,
    Tunnels,
};
use crate::diagnostic::{ConfigErrors, ConfigPath, Diagnostic, SourceMap};
use crate::interpolate::Environment;
use crate::types::{Duration, Secret};
use crate::validate::validate;
use crate::yaml;

/// A config that passed every check and whose secrets are loaded. The only way to make one is
/// [`load`] or [`ValidatedConfig::from_config`], so whatever applies a config knows it is whole.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidatedConfig(Config);

impl ValidatedConfig {
    /// Validates a config built in code (from environment shorthands, or decoded from a snapshot).
    pub fn from_config(
        mut config: Config,
        origin: &str,
        env: &dyn Environment,
    ) -> Result<Self, ConfigErrors> {
        crate::dns::add_visited_services(&mut config);
        let mut diagnostics = validate(&config);
        if diagnostics.is_empty() {
            diagnostics = resolve_secrets(&mut config, env);
        }
        if diagnostics.is_empty() {
            Ok(Self(config))
        } else {
            Err(ConfigErrors { origin: origin.to_string(), diagnostics })
        }
    }

    pub fn config(&self) -> &Config {
        &self.0
    }
}

impl Deref for ValidatedConfig {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.0
    }
}

/// Parses, interpolates, deserializes and validates keel.yaml text. `origin` names the source in error
/// lines (usually the file name).
pub fn load(text: &str, origin: &str, env: &dyn Environment) -> Result<ValidatedConfig, ConfigErrors> {
    load_with(text, origin, env, &|_| Ok(()))
}

/// A change made to a parsed config before it is validated (environment shorthands); its problems are
/// reported with the config's, without a location.
pub type Prepare<'a> = &'a dyn Fn(&mut Config) -> Result<(), Vec<Diagnostic>>;

/// [`load`], with `prepare` run on the parsed config before validation and secrets.
pub fn load_with(
    text: &str,
    origin: &str,
    env: &dyn Environment,
    prepare: Prepare<'_>,
) -> Result<ValidatedConfig, ConfigErrors> {
    let fail = |diagnostics: Vec<Diagnostic>| ConfigErrors { origin: origin.to_string(), diagnostics };
    let root = yaml::parse(text).map_err(|diagnostic| fail(vec![diagnostic]))?;
    let converted = yaml::to_value(root.as_ref(), env);
    let source_map = converted.source_map;
    if !converted.diagnostics.is_empty() {
        return Err(fail(converted.diagnostics));
    }
    let mut config: Config = match serde_path_to_error::deserialize(&converted.value) {
        Ok(config) => config,
        Err(first) => {
            let mut diagnostics = structural_errors(&converted.value, &source_map);
            if diagnostics.is_empty() {
                diagnostics.push(serde_diagnostic(&ConfigPath::root(), &first, &source_map));
            }
            return Err(fail(diagnostics));
        }
    };
    if let Err(prepared) = prepare(&mut config) {
        return Err(fail(prepared));
    }
    crate::dns::add_visited_services(&mut config);
    let mut diagnostics = validate(&config);
    if diagnostics.is_empty() {
        diagnostics = resolve_secrets(&mut config, env);
    }
    if diagnostics.is_empty() {
        return Ok(ValidatedConfig(config));
    }
    for diagnostic in &mut diagnostics {
        diagnostic.location = source_map.value(&diagnostic.path);
    }
    Err(fail(diagnostics))
}

/// Deserializes each top-level section, and each item of the list sections, on its own, so that one
/// mistake does not hide the others. Serde stops at the first error within one item.
fn structural_errors(value: &Value, source_map: &SourceMap) -> Vec<Diagnostic> {
    let root = ConfigPath::root();
    let Value::Object(sections) = value else {
        let message = "keel.yaml must be a mapping of sections (node, admin, listeners, clusters, ...)";
        return vec![Diagnostic::new(root.clone(), message).at(source_map.value(&root))];
    };
    let mut out = Vec::new();
    for (key, value) in sections {
        let path = root.key(key);
        match key.as_str() {
            "node" => check::<Node>(value, &path, source_map, &mut out),
            "admin" => check::<Admin>(value, &path, source_map, &mut out),
            "listeners" => check_each::<Listener>(value, &path, source_map, &mut out),
            "clusters" => check_each::<Cluster>(value, &path, source_map, &mut out),
            "drain_timeout" => check::<Duration>(value, &path, source_map, &mut out),
            "dns" => check::<Dns>(value, &path, source_map, &mut out),
            "tunnels" => check::<Tunnels>(value, &path, source_map, &mut out),
            "control_plane" => check::<ControlPlane>(value, &path, source_map, &mut out),
            "reporters" => check_each::<Reporter>(value, &path, source_map, &mut out),
            "probes" => check_each::<Probe>(value, &path, source_map, &mut out),
            _ => out.push(
                Diagnostic::new(
                    path.clone(),
                    format!("unknown key {key:?}, expected one of: {}", SECTIONS.join(", ")),
                )
                .at(source_map.key(&path)),
            ),
        }
    }
    out
}

/// The top-level keys of keel.yaml, as [`structural_errors`] knows them. A test checks this list against
/// the fields of [`Config`].
pub(crate) const SECTIONS: [&str; 10] = [
    "node",
    "admin",
    "listeners",
    "clusters",
    "drain_timeout",
    "dns",
    "tunnels",
    "reporters",
    "probes",
    "control_plane",
];

fn check<T: DeserializeOwned>(
    value: &Value,
    path: &ConfigPath,
    source_map: &SourceMap,
    out: &mut Vec<Diagnostic>,
) {
    if let Err(error) = serde_path_to_error::deserialize::<_, T>(value) {
        out.push(serde_diagnostic(path, &error, source_map));
    }
}

fn check_each<T: DeserializeOwned>(
    value: &Value,
    path: &ConfigPath,
    source_map: &SourceMap,
    out: &mut Vec<Diagnostic>,
) {
    match value {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                check::<T>(item, &path.index(i), source_map, out);
            }
        }
        _ => check::<Vec<T>>(value, path, source_map, out),
    }
}

/// Turns a serde error at `base` + its recorded path into a located diagnostic. Unknown keys point at
/// the key; other errors at the value.
fn serde_diagnostic(
    base: &ConfigPath,
    error: &serde_path_to_error::Error<serde_json::Error>,
    source_map: &SourceMap,
) -> Diagnostic {
    let path = base.join(&ConfigPath::from_serde(error.path()));
    let message = error.inner().to_string();
    // serde_json appends " at line 1 column 2" positions of its own in-memory value: meaningless here.
    let message = match message.rfind(" at line ") {
        Some(cut) => message[..cut].to_string(),
        None => message,
    };
    if let Some(unknown) = message.strip_prefix("unknown field `") {
        let name = unknown.split('`').next().unwrap_or_default();
        let key_path = if path.segments().last() == Some(&crate::diagnostic::Segment::Key(name.to_string())) {
            path.clone()
        } else {
            path.key(name)
        };
        let message = message.replacen("unknown field", "unknown key", 1);
        return Diagnostic::new(key_path.clone(), message).at(source_map.key(&key_path));
    }
    let location = source_map.value(&path);
    Diagnostic::new(path, message).at(location)
}

/// Reads every `*_file` secret into its sibling field.
fn resolve_secrets(config: &mut Config, env: &dyn Environment) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let root = ConfigPath::root();
    let admin = &mut config.admin;
    read_secret(
        env,
        &root.key("admin").key("token_file"),
        admin.token_file.as_deref(),
        &mut admin.token,
        &mut out,
    );
    for (i, reporter) in config.reporters.iter_mut().enumerate() {
        let path = root.key("reporters").index(i);
        if let AddressSource::ControlPlane(source) = &mut reporter.source {
            let at = path.key("source").key("control_plane").key("token_file");
            read_secret(env, &at, source.token_file.as_deref(), &mut source.token, &mut out);
        }
        match &mut reporter.sink {
            AddressSink::ControlPlane(endpoint) => {
                let at = path.key("sink").key("control_plane").key("token_file");
                read_secret(env, &at, endpoint.token_file.as_deref(), &mut endpoint.token, &mut out);
            }
            AddressSink::Dns(dns) => {
                // Credentials are read again at each update (so they can be rotated); here only whether
                // they can be read at all, so a wrong path is a config error, not a failed update later.
                let at = path.key("sink").key("dns").key("provider");
                for (field, file) in dns.provider.secret_files() {
                    let mut unused = None;
                    read_secret(env, &at.key(field.0).key(field.1), Some(file), &mut unused, &mut out);
                }
            }
        }
    }
    if let Some(control_plane) = &mut config.control_plane {
        let at = root.key("control_plane").key("token_file");
        read_secret(env, &at, control_plane.token_file.as_deref(), &mut control_plane.token, &mut out);
    }
    if let Some(tunnels) = &mut config.tunnels {
        let path = root.key("tunnels");
        if let Some(server) = &mut tunnels.server {
            let at = path.key("server").key("token_file");
            read_secret(env, &at, server.token_file.as_deref(), &mut server.token, &mut out);
        }
        for (i, router) in tunnels.routers.iter_mut().enumerate() {
            let at = path.key("routers").index(i).key("token_file");
            read_secret(env, &at, router.token_file.as_deref(), &mut router.token, &mut out);
        }
        for (i, publish) in tunnels.publish.iter_mut().enumerate() {
            let at = path.key("publish").index(i).key("secret_file");
            read_secret(env, &at, publish.secret_file.as_deref(), &mut publish.secret, &mut out);
        }
        for (i, visit) in tunnels.visit.iter_mut().enumerate() {
            let at = path.key("visit").index(i).key("secret_file");
            read_secret(env, &at, visit.secret_file.as_deref(), &mut visit.secret, &mut out);
        }
    }
    out
}

/// Reads a `*_file` secret, when one is named, into `secret`.
fn read_secret(
    env: &dyn Environment,
    path: &ConfigPath,
    file: Option<&str>,
    secret: &mut Option<Secret>,
    out: &mut Vec<Diagnostic>,
) {
    let Some(file) = file else { return };
    match env.read_file(file) {
        Ok(contents) if contents.trim().is_empty() => {
            out.push(Diagnostic::new(path.clone(), format!("{file}: the file is empty")));
        }
        Ok(contents) => *secret = Some(Secret::new(contents.trim())),
        Err(error) => out.push(Diagnostic::new(path.clone(), format!("cannot read {file}: {error}"))),
    }
}
