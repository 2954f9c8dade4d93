//! Keel's data plane: the library behind the `proxy` binary.
//!
//! A config flows file → [`source`] (read, version, watch) → `keel_schemas::load` (parse, validate) →
//! [`Proxy::apply`] (diff, bind, swap; [`control_plane`] snapshots take the same road) → [`listener`]s that accept and hand each connection to a
//! [`cluster`] for an upstream and to the [`relay`] for the bytes. [`dns`] answers the pod's queries;
//! [`tunnel`] runs routers, publishers and visitors (relaying with [`splice`]); [`reporter`]s watch an
//! address and report its changes. [`admin`] serves
//! readiness, dumps, metrics and the reload/drain controls; [`serve`] runs it all until a shutdown
//! request, then drains.
//!
//! The library binds only the addresses its config names and reads the environment only through the
//! [`keel_schemas::Environment`] it is given.

pub mod admin;
pub mod cluster;
pub mod control_plane;
pub mod diff;
pub mod dns;
mod env;
pub mod limit;
pub mod listener;
pub mod metrics;
pub mod probe;
pub mod relay;
pub mod reporter;
pub mod resident;
pub mod runtime;
pub mod shorthand;
pub mod source;
pub mod splice;
pub mod tunnel;

use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use env::ProcessEnvironment;
pub use runtime::{ApplyError, Proxy, ReloadError, Shutdown};

/// The config `proxy` runs when given none: a relay on 127.0.0.1:10000 to its own admin API.
pub const EMBEDDED_CONFIG: &str = include_str!("../../examples/quickstart.yaml");

/// How long the admin API gets to finish its last requests at exit.
const ADMIN_STOP_GRACE: Duration = Duration::from_secs(1);

/// Binds the admin API's socket at the address `config` names. Bind it before applying the config, so
/// that a cluster pointing at the admin API (as the quickstart's does) is healthy from its first check.
pub fn bind_admin(config: &keel_schemas::Config) -> std::io::Result<TcpListener> {
    listener::bind(config.admin.address.0)
}

/// Runs the admin API and the config-file watcher until a shutdown is requested, then drains (graceful)
/// or closes everything (fast), and returns.
pub async fn serve(proxy: Proxy, admin: TcpListener) -> std::io::Result<()> {
    tracing::info!(address = %admin.local_addr()?, "admin listening");
    let stop_admin = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(admin, proxy.clone(), stop_admin.clone()));
    let watched = proxy.clone();
    let watcher = tokio::spawn(async move {
        // Following a control plane, the file is only the bootstrap: SIGHUP re-reads it.
        if watched.follows_control_plane() {
            return;
        }
        if let Err(error) = source::watch_file(watched).await {
            tracing::warn!(%error, "cannot watch the config file; SIGHUP and POST /reload still reload it");
        }
    });

    let mut requests = proxy.shutdown_requests();
    let kind = loop {
        if let Some(kind) = *requests.borrow_and_update() {
            break kind;
        }
        if requests.changed().await.is_err() {
            break Shutdown::Fast;
        }
    };
    tracing::info!(?kind, "shutting down");
    match kind {
        Shutdown::Graceful => {
            let fast = async {
                while *requests.borrow_and_update() != Some(Shutdown::Fast) {
                    if requests.changed().await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = proxy.drain() => {}
                () = fast => proxy.close_all_connections().await,
            }
        }
        Shutdown::Fast => proxy.close_all_connections().await,
    }
    watcher.abort();
    proxy.stop_health_checks();
    proxy.stop_dns().await;
    proxy.stop_tunnels().await;
    stop_admin.cancel();
    match tokio::time::timeout(ADMIN_STOP_GRACE, admin_task).await {
        Ok(Ok(result)) => result?,
        Ok(Err(join_error)) => tracing::error!(%join_error, "admin task failed"),
        Err(_) => tracing::warn!("admin API did not stop in time"),
    }
    tracing::info!("stopped");
    Ok(())
}
