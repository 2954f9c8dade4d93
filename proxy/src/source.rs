//! The static-file config source: read keel.yaml, name its version, and watch it for changes.
//!
//! The watcher watches the file's directory rather than the file, because editors save by writing a new
//! file and renaming it over the old one, and Kubernetes updates a mounted ConfigMap by swapping the
//! `..data` symlink: both replace the inode a file watch would be holding. Every event in the directory
//! triggers a debounced re-read; the proxy applies it only if the content's version differs from the
//! running one (and from the last rejected one, so a bad file is reported once, not on every event).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keel_schemas::{ConfigErrors, ConfigPath, Diagnostic, Environment, ValidatedConfig};
use notify::Watcher;
use tokio::sync::mpsc;

use crate::runtime::Proxy;

/// How long the watcher waits for a burst of file events to settle.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// A loaded, validated config and its version.
#[derive(Debug)]
pub struct Loaded {
    pub config: ValidatedConfig,
    pub version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("{errors}")]
    Invalid { version: String, errors: ConfigErrors },
}

impl LoadError {
    pub fn version(&self) -> Option<&str> {
        match self {
            LoadError::Read { .. } => None,
            LoadError::Invalid { version, .. } => Some(version),
        }
    }

    /// The error as config errors, for `/config_dump`'s last-rejected record.
    pub fn as_config_errors(&self) -> ConfigErrors {
        match self {
            LoadError::Invalid { errors, .. } => errors.clone(),
            LoadError::Read { path, error } => ConfigErrors {
                origin: path.display().to_string(),
                diagnostics: vec![Diagnostic::new(
                    ConfigPath::root(),
                    format!("cannot read the file: {error}"),
                )],
            },
        }
    }
}

pub use keel_schemas::version_of;

/// How a file source is named in logs, metrics and dumps.
pub fn file_source_name(path: &Path) -> String {
    format!("file:{}", path.display())
}

/// Loads and validates config text, with the seed sidecar's environment shorthand applied before
/// validation (see [`crate::shorthand`]).
pub fn load_text(text: &str, origin: &str, env: &dyn Environment) -> Result<Loaded, LoadError> {
    let version = version_of(text);
    let prepare = |config: &mut keel_schemas::Config| crate::shorthand::apply(config, env);
    match keel_schemas::load_with(text, origin, env, &prepare) {
        Ok(config) => Ok(Loaded { config, version }),
        Err(errors) => Err(LoadError::Invalid { version, errors }),
    }
}

/// Reads, parses and validates a config file.
pub fn load_file(path: &Path, env: &dyn Environment) -> Result<Loaded, LoadError> {
    let text =
        std::fs::read_to_string(path).map_err(|error| LoadError::Read { path: path.to_path_buf(), error })?;
    load_text(&text, &path.display().to_string(), env)
}

/// Watches `proxy`'s config file and applies each new version. Runs until the proxy shuts down; a
/// watcher that cannot start is an error (SIGHUP and `POST /reload` keep working without it).
pub async fn watch_file(proxy: Proxy) -> notify::Result<()> {
    let Some(path) = proxy.config_file().cloned() else { return Ok(()) };
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (events, mut receive) = mpsc::channel::<()>(1);
    let file_name = path.file_name().map(|name| name.to_os_string());
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Changes (not reads: our own read of the file raises access events, which would loop) to the
        // config file itself, or to kubelet's `..data` / `..<timestamp>` entries; not to unrelated files.
        let relevant = event.is_ok_and(|event| {
            let change = matches!(
                event.kind,
                notify::EventKind::Create(_) | notify::EventKind::Modify(_) | notify::EventKind::Remove(_)
            );
            change
                && event.paths.iter().any(|changed| {
                    let name = changed.file_name();
                    name == file_name.as_deref()
                        || name.is_some_and(|n| n.to_string_lossy().starts_with(".."))
                })
        });
        if relevant {
            // A full channel already holds a wake-up: dropping this one loses nothing.
            let _ = events.try_send(());
        }
    })?;
    watcher.watch(&directory, notify::RecursiveMode::NonRecursive)?;
    tracing::info!(file = %path.display(), "watching the config file for changes");
    // The file may have changed between the first load and the watch: look once now.
    reload_if_changed(&proxy, &path).await;
    let mut shutdown = proxy.shutdown_requests();
    loop {
        tokio::select! {
            event = receive.recv() => if event.is_none() { break },
            _ = shutdown.changed() => break,
        }
        tokio::time::sleep(DEBOUNCE).await;
        while receive.try_recv().is_ok() {}
        if proxy.is_draining() {
            break;
        }
        reload_if_changed(&proxy, &path).await;
    }
    drop(watcher);
    Ok(())
}

async fn reload_if_changed(proxy: &Proxy, path: &Path) {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        // In the middle of a replace the file can be briefly missing; the next event brings it back.
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            tracing::debug!(file = %path.display(), "config file missing for now");
            return;
        }
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "cannot read the config file");
            return;
        }
    };
    let version = version_of(&text);
    let running = proxy.applied().map(|applied| applied.version.clone());
    // A text already rejected as invalid fails the same way again; one that failed for an outside
    // reason (a port in use) is worth another try.
    let rejected = proxy
        .last_rejected()
        .filter(|rejected| rejected.invalid_text)
        .and_then(|rejected| rejected.version.clone());
    if running.as_deref() == Some(version.as_str()) || rejected.as_deref() == Some(version.as_str()) {
        return;
    }
    // Failures are logged and recorded as rejected on the way.
    let loaded = load_text(&text, &path.display().to_string(), proxy.env());
    let _ = proxy.apply_loaded(path, loaded).await;
}
