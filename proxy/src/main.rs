//! `proxy`: parse arguments, set up logging and signals, and hand over to the `keel_proxy` library.

// Printing results (OK, the schema) to stdout is this binary's job; libraries never print.
#![allow(clippy::print_stdout)]

mod libm_shim;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use keel_proxy::source::{self, LoadError, Loaded};
use keel_proxy::{ProcessEnvironment, Proxy, Shutdown};

#[derive(Parser)]
#[command(name = "proxy", version, about = "Keel: a config-driven sidecar proxy")]
struct Cli {
    /// keel.yaml to run; without it, the embedded quickstart config runs.
    #[arg(long, short, env = "KEEL_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", env = "KEEL_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    /// Worker threads for the data path (like Envoy's --concurrency); the number of CPUs by default.
    #[arg(long, env = "KEEL_CONCURRENCY", value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: Option<u16>,
    /// Log filter, such as `info` or `keel_proxy=debug,info`.
    #[arg(long, default_value = "info", env = "KEEL_LOG", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Check a config file and print OK or every error; binds nothing.
    Validate,
    /// Print the JSON Schema of keel.yaml.
    Schema,
    /// Run each reporter of the config once: read its address and report it (the proxy itself runs
    /// reporters continuously).
    Report {
        /// One round, then exit: 0 when every reporter succeeded.
        #[arg(long)]
        once: bool,
        /// Read and print the addresses, report nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Validate) => validate(cli.config),
        Some(Command::Schema) => {
            // The committed schema, which a test keeps equal to the one the types generate; shipping the
            // generator (schemars) would cost every proxy idle memory.
            print!("{}", include_str!("../../schemas/keel.schema.json"));
            ExitCode::SUCCESS
        }
        Some(Command::Report { once, dry_run }) => report(cli.config, once, dry_run),
        None => {
            init_logging(cli.log_format, &cli.log_level);
            match run(cli.config, cli.concurrency) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn load(config: Option<&PathBuf>) -> Result<Loaded, LoadError> {
    match config {
        Some(path) => source::load_file(path, &ProcessEnvironment),
        None => {
            source::load_text(keel_proxy::EMBEDDED_CONFIG, "embedded:quickstart.yaml", &ProcessEnvironment)
        }
    }
}

fn validate(config: Option<PathBuf>) -> ExitCode {
    let Some(path) = config else {
        eprintln!("proxy validate needs --config FILE");
        return ExitCode::from(2);
    };
    match load(Some(&path)) {
        Ok(_) => {
            println!("OK");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}

fn report(config: Option<PathBuf>, once: bool, dry_run: bool) -> ExitCode {
    if !once {
        eprintln!("proxy report takes --once; `proxy --config FILE` runs the reporters continuously");
        return ExitCode::from(2);
    }
    let loaded = match load(config.as_ref()) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    if loaded.config.reporters.is_empty() {
        eprintln!("the config has no reporters (nor SERVER_URL and NETWORK_INTERFACE in the environment)");
        return ExitCode::FAILURE;
    }
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return ExitCode::FAILURE;
    };
    let node = keel_proxy::tunnel::node_name(&loaded.config);
    let mut failed = false;
    runtime.block_on(async {
        for reporter in &loaded.config.reporters {
            match keel_proxy::reporter::report_once(reporter, &node, dry_run).await {
                Ok(address) if dry_run || reporter.dry_run => {
                    println!("{}: {address} (dry run: not reported)", reporter.name)
                }
                Ok(address) => println!("{}: {address} reported", reporter.name),
                Err(error) => {
                    println!("{}: {error}", reporter.name);
                    failed = true;
                }
            }
        }
    });
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

fn init_logging(format: LogFormat, filter: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // `Targets` takes the usual `info,keel_proxy=debug` directives without pulling in a regex engine.
    let filter: tracing_subscriber::filter::Targets = filter.parse().unwrap_or_else(|error| {
        eprintln!("invalid --log-level {filter:?} ({error}); using info");
        tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
    });
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => {
            registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init()
        }
        LogFormat::Json => {
            registry.with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr)).init()
        }
    }
}

fn run(config: Option<PathBuf>, concurrency: Option<u16>) -> anyhow::Result<()> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = concurrency {
        runtime.worker_threads(usize::from(workers));
    }
    let runtime = runtime.enable_all().build()?;
    runtime.block_on(async {
        let loaded = load(config.as_ref()).map_err(|error| anyhow::anyhow!("{error}"))?;
        let source = match &config {
            Some(path) => source::file_source_name(path),
            None => "embedded:quickstart.yaml".to_string(),
        };
        let proxy = Proxy::new(Arc::new(ProcessEnvironment), config.clone());
        // Code that only start-up and reloads run leaves the resident set once the config holds still.
        tokio::spawn(keel_proxy::resident::release_after_applies(
            proxy.applies(),
            keel_proxy::resident::release_and_log,
        ));
        let admin = keel_proxy::bind_admin(&loaded.config).context("cannot bind the admin API")?;
        if loaded.config.control_plane.is_some() {
            // The file is a bootstrap; the control plane (or, until it answers, the cache) gives the rest.
            keel_proxy::control_plane::start_following(&proxy, loaded.config.config().clone()).await;
        } else {
            proxy.apply(loaded.config, &source, &loaded.version).await?;
        }
        tokio::spawn(handle_signals(proxy.clone()));
        keel_proxy::serve(proxy, admin).await?;
        Ok(())
    })
}

/// SIGTERM/SIGINT: graceful shutdown, a second one: fast. SIGHUP: reload the config file.
async fn handle_signals(proxy: Proxy) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    let mut stopping = false;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {
                match proxy.reload().await {
                    Ok(report) => tracing::info!(version = %report.version, "SIGHUP: config reloaded"),
                    Err(error) => tracing::warn!(%error, "SIGHUP: reload failed"),
                }
                continue;
            }
        }
        proxy.shutdown(if stopping { Shutdown::Fast } else { Shutdown::Graceful });
        stopping = true;
    }
}
