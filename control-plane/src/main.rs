//! `control-plane`: parse arguments, read tokens, set up logging and signals, and run the library.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use keel_control_plane::auth::Tokens;
use keel_control_plane::{ControlPlane, NetCheckSettings, Settings};

const DEFAULT_MAX_CONNECTIONS: NonZeroUsize =
    NonZeroUsize::new(keel_control_plane::DEFAULT_MAX_CONNECTIONS).unwrap();

#[derive(Parser)]
#[command(
    name = "control-plane",
    version,
    about = "Keel's control plane: resources in SQLite, snapshots streamed to proxies"
)]
struct Cli {
    /// Address of the REST API and the proxies' stream.
    #[arg(long, default_value = "127.0.0.1:7080", env = "KEEL_CP_LISTEN")]
    listen: SocketAddr,
    /// The SQLite database file; created, and migrated, on start.
    #[arg(long, default_value = "keel-control-plane.db", env = "KEEL_CP_DATABASE")]
    database: PathBuf,
    /// File of operator tokens (one per line) for the REST API and /debug.
    #[arg(long, env = "KEEL_CP_OPERATOR_TOKEN_FILE")]
    operator_token_file: Option<PathBuf>,
    /// File of viewer tokens (one per line): read-only access to what operator tokens read, `/metrics`
    /// included (for Prometheus and dashboards); every write refused.
    #[arg(long, env = "KEEL_CP_VIEWER_TOKEN_FILE")]
    viewer_token_file: Option<PathBuf>,
    /// File of proxy tokens (one per line) for the snapshot stream.
    #[arg(long, env = "KEEL_CP_PROXY_TOKEN_FILE")]
    proxy_token_file: Option<PathBuf>,
    /// PEM certificate chain; with --tls-key-file, serve HTTPS (HTTP/2 by ALPN).
    #[arg(long, env = "KEEL_CP_TLS_CERT_FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, env = "KEEL_CP_TLS_KEY_FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Allow a non-loopback address without tokens (anyone who reaches it could change every proxy).
    #[arg(long)]
    insecure_no_auth: bool,
    /// Network checking: a seed 002 client that has not sent a heartbeat for this long is gone, with its
    /// results (seed 002's CACHE_KEY_SECOND).
    #[arg(long, default_value = "15s", env = "KEEL_CP_NETCHECK_EXPIRY", value_parser = humantime::parse_duration)]
    netcheck_expiry: Duration,
    /// How often the network health report is logged (seed 002's REPORT_INTERVAL); 0s for never.
    #[arg(long, default_value = "300s", env = "KEEL_CP_NETCHECK_REPORT_INTERVAL", value_parser = humantime::parse_duration)]
    netcheck_report_interval: Duration,
    /// Serve seed 002's endpoints (heartbeat, test results, queries) without a token: its clients send
    /// none. Only on a cluster-internal address.
    #[arg(long, env = "KEEL_CP_NETCHECK_ANONYMOUS")]
    netcheck_anonymous: bool,
    /// Export a series per probed pair (`keel_netcheck_pair_up`, `keel_netcheck_pair_latency_seconds`);
    /// off by default: a 1,000-node mesh is a million series.
    #[arg(long)]
    netcheck_pair_metrics: bool,
    /// Log filter, such as `info` or `keel_control_plane=debug`.
    #[arg(long, default_value = "info", env = "KEEL_LOG")]
    log_level: String,
    /// Connections served at once (proxies' streams and API clients); past it, new connections are
    /// closed at once.
    #[arg(long, env = "KEEL_CP_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: NonZeroUsize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter: tracing_subscriber::filter::Targets = cli.log_level.parse().unwrap_or_else(|error| {
        eprintln!("invalid --log-level {:?} ({error}); using info", cli.log_level);
        tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
    });
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Tokens from a file (one per line, `#` comments) or, without one, from a comma-separated variable.
fn tokens(file: Option<&PathBuf>, variable: &str) -> anyhow::Result<Vec<String>> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))?,
        None => std::env::var(variable).unwrap_or_default().replace(',', "\n"),
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(String::from)
        .collect())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let tokens = Tokens::new(
        tokens(cli.operator_token_file.as_ref(), "KEEL_CP_OPERATOR_TOKENS")?,
        tokens(cli.proxy_token_file.as_ref(), "KEEL_CP_PROXY_TOKENS")?,
    )
    .with_viewers(tokens(cli.viewer_token_file.as_ref(), "KEEL_CP_VIEWER_TOKENS")?);
    let open = !tokens.requires(keel_control_plane::auth::Role::Operator)
        || !tokens.requires(keel_control_plane::auth::Role::Proxy);
    if open && !cli.listen.ip().is_loopback() && !cli.insecure_no_auth {
        anyhow::bail!(
            "{} is not a loopback address and operator or proxy tokens are missing: give --operator-token-file and --proxy-token-file (or KEEL_CP_OPERATOR_TOKENS / KEEL_CP_PROXY_TOKENS), or pass --insecure-no-auth",
            cli.listen
        );
    }
    if open {
        tracing::warn!(
            "no operator or no proxy tokens: those endpoints are open to anyone who reaches {}",
            cli.listen
        );
    }
    let settings = Settings {
        tls: cli.tls_cert_file.zip(cli.tls_key_file),
        max_connections: cli.max_connections.get(),
        netcheck: NetCheckSettings {
            expiry: cli.netcheck_expiry,
            report_interval: cli.netcheck_report_interval,
            anonymous: cli.netcheck_anonymous,
            pair_metrics: cli.netcheck_pair_metrics,
        },
        ..Settings::new(cli.listen, cli.database, tokens)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let control_plane = ControlPlane::start(settings).await?;
        let stop = control_plane.state.stop.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) =
                (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
            else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down");
            stop.cancel();
        });
        control_plane.wait().await;
        tracing::info!("stopped");
        Ok(())
    })
}
