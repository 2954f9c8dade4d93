//! Network probes (seed 002's checks): every `interval`, check each target of a probe, keep its state
//! and export it.
//!
//! One task per probe ([`run`]). A round checks its targets concurrently (at most [`CONCURRENCY`] in
//! flight), each bounded by `timeout`, then the next round starts `interval` after this one did, give or
//! take 10% so that proxies started together do not probe in lockstep. A target is up after a
//! successful check and down after `failure_threshold` failed ones in a row; before its first check it
//! is neither. Results land in the probe's [`ProbeState`], which the [`Registry`] lists for the admin
//! API (`/probes`) and for the status the proxy sends its control plane, and in metrics.
//!
//! Kinds: `icmp` ([`icmp`]), `tcp` (connect), `http` (GET, expected status), `dns` (resolve, then
//! connect to the first address), `udp` (datagrams to an echo service, counted back: [`udp`]).

pub mod icmp;
pub mod udp;

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Mutex;

use keel_schemas::config::Probe;
use keel_schemas::stream::ProbeResult;
use keel_schemas::types::HostPort;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Checks in flight per probe.
pub const CONCURRENCY: usize = 64;
/// Checks remembered per target for the loss ratio of kinds that send one packet per check.
const LOSS_WINDOW: usize = 20;

/// What one check found.
#[derive(Debug)]
struct Outcome {
    latency: Result<Duration, String>,
    /// The lost share of this check's packets, for kinds that send several (UDP).
    loss: Option<f64>,
}

/// One target's state, as [`ProbeResult`] reports it.
#[derive(Debug, Default)]
struct TargetState {
    result: ProbeResult,
    recent: VecDeque<bool>,
}

/// The live state of one running probe.
#[derive(Debug)]
pub struct ProbeState {
    targets: Mutex<Vec<TargetState>>,
}

impl ProbeState {
    fn new(probe: &Probe, kind: &str) -> Self {
        let targets = probe
            .targets()
            .into_iter()
            .map(|target| TargetState {
                result: ProbeResult {
                    probe: probe.name.clone(),
                    kind: kind.to_string(),
                    target,
                    ..ProbeResult::default()
                },
                recent: VecDeque::new(),
            })
            .collect();
        Self { targets: Mutex::new(targets) }
    }

    async fn results(&self) -> Vec<ProbeResult> {
        self.targets.lock().await.iter().map(|target| target.result.clone()).collect()
    }
}

/// The running probes' states, by probe name.
#[derive(Debug, Default)]
pub struct Registry {
    probes: ArcSwap<BTreeMap<String, Arc<ProbeState>>>,
}

impl Registry {
    /// Every target of every probe, ordered by probe and then as configured.
    pub async fn results(&self) -> Vec<ProbeResult> {
        let probes = self.probes.load_full();
        let mut out = Vec::new();
        for state in probes.values() {
            out.extend(state.results().await);
        }
        out
    }

    fn insert(&self, name: &str, state: Arc<ProbeState>) {
        self.probes.rcu(|probes| {
            let mut probes = BTreeMap::clone(probes);
            probes.insert(name.to_string(), Arc::clone(&state));
            probes
        });
    }

    /// Forgets a probe that stopped; a task still finishing a round writes only to its own state.
    pub fn remove(&self, name: &str) {
        self.probes.rcu(|probes| {
            let mut probes = BTreeMap::clone(probes);
            probes.remove(name);
            probes
        });
    }
}

/// A target as a check needs it.
#[derive(Clone, Debug)]
enum Target {
    Icmp(IpAddr),
    Tcp(HostPort),
    Http { url: String, expected: Vec<u16> },
    Dns { name: String, port: Option<u16> },
    Udp { address: HostPort, packets: u32 },
}

fn targets(probe: &Probe) -> Vec<Target> {
    let mut out = Vec::new();
    if let Some(icmp) = &probe.icmp {
        out.extend(icmp.targets.iter().map(|ip| Target::Icmp(*ip)));
    }
    if let Some(tcp) = &probe.tcp {
        out.extend(tcp.targets.iter().cloned().map(Target::Tcp));
    }
    if let Some(http) = &probe.http {
        out.extend(
            http.targets
                .iter()
                .map(|url| Target::Http { url: url.clone(), expected: http.expected_status.clone() }),
        );
    }
    if let Some(dns) = &probe.dns {
        out.extend(dns.targets.iter().map(|name| Target::Dns { name: name.clone(), port: dns.port }));
    }
    if let Some(udp) = &probe.udp {
        out.extend(
            udp.targets.iter().map(|address| Target::Udp { address: address.clone(), packets: udp.packets }),
        );
    }
    out
}

/// One check of one target, bounded by `timeout`.
async fn check(target: &Target, sequence: u16, timeout: Duration) -> Outcome {
    let started = Instant::now();
    let failed = |error: String| Outcome { latency: Err(error), loss: None };
    let bounded = async {
        match target {
            Target::Icmp(ip) => match icmp::ping(*ip, sequence, timeout).await {
                Ok((rtt, _method)) => Outcome { latency: Ok(rtt), loss: None },
                Err(error) => failed(error.to_string()),
            },
            Target::Tcp(address) => match crate::cluster::connect_to(address).await {
                Ok(_stream) => Outcome { latency: Ok(started.elapsed()), loss: None },
                Err(error) => failed(format!("connect: {error}")),
            },
            Target::Http { url, expected } => {
                let headers = [("User-Agent", concat!("keel-probe/", env!("CARGO_PKG_VERSION")))];
                // Boxed: the TLS client's future is large, and every check future would be that size.
                match Box::pin(keel_ddns::http::request("GET", url, &headers, None)).await {
                    Ok(answer) => {
                        let wanted = if expected.is_empty() {
                            (200..400).contains(&answer.status)
                        } else {
                            expected.contains(&answer.status)
                        };
                        if wanted {
                            Outcome { latency: Ok(started.elapsed()), loss: None }
                        } else {
                            failed(format!("status {}", answer.status))
                        }
                    }
                    Err(error) => failed(error),
                }
            }
            Target::Dns { name, port } => match crate::cluster::resolve(name, port.unwrap_or(0)).await {
                Ok(addresses) if addresses.is_empty() => failed(format!("{name} resolved to no address")),
                Ok(addresses) => match port {
                    None => Outcome { latency: Ok(started.elapsed()), loss: None },
                    Some(_) => match tokio::net::TcpStream::connect(addresses[0]).await {
                        Ok(_stream) => Outcome { latency: Ok(started.elapsed()), loss: None },
                        Err(error) => failed(format!("resolved to {}, connect: {error}", addresses[0])),
                    },
                },
                Err(error) => failed(format!("resolve: {error}")),
            },
            Target::Udp { address, packets } => match udp::echo(address, *packets, timeout).await {
                Ok(round) if round.received == 0 => Outcome {
                    latency: Err(format!("none of {packets} datagrams came back")),
                    loss: Some(1.0),
                },
                Ok(round) => Outcome { latency: Ok(round.mean_rtt), loss: Some(round.loss()) },
                Err(error) => failed(error.to_string()),
            },
        }
    };
    tokio::time::timeout(timeout, bounded)
        .await
        .unwrap_or_else(|_| failed(format!("no answer within {}", humantime::format_duration(timeout))))
}

/// Metric handles of one target.
struct TargetMetrics {
    up: metrics::Gauge,
    latency: metrics::Gauge,
    loss: metrics::Gauge,
    consecutive_failures: metrics::Gauge,
    successes: metrics::Counter,
    failures: metrics::Counter,
}

impl TargetMetrics {
    fn new(metrics: &Metrics, probe: &str, kind: &str, target: &str) -> Self {
        let labels = [("probe", probe), ("kind", kind), ("target", target)];
        let with_result = |result: &'static str| {
            metrics.counter(
                "keel_probe_checks_total",
                &[("probe", probe), ("kind", kind), ("target", target), ("result", result)],
            )
        };
        Self {
            up: metrics.gauge("keel_probe_up", &labels),
            latency: metrics.gauge("keel_probe_latency_seconds", &labels),
            loss: metrics.gauge("keel_probe_loss_ratio", &labels),
            consecutive_failures: metrics.gauge("keel_probe_consecutive_failures", &labels),
            successes: with_result("success"),
            failures: with_result("failure"),
        }
    }
}

/// Folds one check's outcome into the target's state and metrics.
fn record(state: &mut TargetState, outcome: Outcome, threshold: u32, metrics: &TargetMetrics) {
    let ok = outcome.latency.is_ok();
    state.recent.push_back(ok);
    if state.recent.len() > LOSS_WINDOW {
        state.recent.pop_front();
    }
    let result = &mut state.result;
    result.checked_at = Some(humantime::format_rfc3339_millis(SystemTime::now()).to_string());
    match outcome.latency {
        Ok(latency) => {
            result.consecutive_failures = 0;
            result.up = Some(true);
            result.latency_ms = Some(latency.as_secs_f64() * 1000.0);
            result.error = None;
            metrics.successes.increment(1);
            metrics.latency.set(latency.as_secs_f64());
        }
        Err(error) => {
            result.consecutive_failures = result.consecutive_failures.saturating_add(1);
            if result.consecutive_failures >= threshold {
                result.up = Some(false);
            }
            result.error = Some(error);
            metrics.failures.increment(1);
        }
    }
    result.loss = outcome.loss.unwrap_or_else(|| {
        let lost = state.recent.iter().filter(|ok| !**ok).count();
        lost as f64 / state.recent.len() as f64
    });
    if let Some(up) = result.up {
        metrics.up.set(if up { 1.0 } else { 0.0 });
    }
    metrics.loss.set(result.loss);
    metrics.consecutive_failures.set(f64::from(result.consecutive_failures));
}

/// Runs `probe` until `stop`, publishing its state in `registry`.
pub async fn run(probe: Probe, registry: Arc<Registry>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let Some(kind) = probe.kind() else { return };
    let state = Arc::new(ProbeState::new(&probe, kind));
    registry.insert(&probe.name, Arc::clone(&state));
    let targets = Arc::new(targets(&probe));
    let names = probe.targets();
    let handles: Arc<Vec<TargetMetrics>> = Arc::new(
        names.iter().map(|target| TargetMetrics::new(&metrics, &probe.name, kind, target)).collect(),
    );
    let timeout = probe.timeout.get();
    let mut sequence: u16 = 0;
    loop {
        let round_started = tokio::time::Instant::now();
        sequence = sequence.wrapping_add(1);
        // At most CONCURRENCY checks exist at once (not one task per target waiting its turn), so a
        // probe of a thousand targets holds a few dozen check futures, not a thousand.
        let round = async {
            let mut checks = tokio::task::JoinSet::new();
            let mut next = 0;
            loop {
                while checks.len() < CONCURRENCY && next < targets.len() {
                    let (targets, index) = (Arc::clone(&targets), next);
                    checks.spawn(async move { (index, check(&targets[index], sequence, timeout).await) });
                    next += 1;
                }
                let Some(done) = checks.join_next().await else { break };
                let Ok((index, outcome)) = done else { continue };
                let mut states = state.targets.lock().await;
                record(&mut states[index], outcome, probe.failure_threshold, &handles[index]);
            }
        };
        tokio::select! {
            () = round => {}
            () = stop.cancelled() => return,
        }
        let next = round_started + probe.interval.get().mul_f64(0.9 + fastrand::f64() * 0.2);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handles() -> TargetMetrics {
        TargetMetrics::new(&Metrics::new(), "p", "tcp", "t")
    }

    #[test]
    fn down_after_the_threshold_up_after_one_success() {
        let metrics = handles();
        let mut state = TargetState::default();
        let fail = || Outcome { latency: Err("refused".into()), loss: None };
        let pass = || Outcome { latency: Ok(Duration::from_millis(2)), loss: None };
        record(&mut state, fail(), 3, &metrics);
        assert_eq!(state.result.up, None, "not judged before the threshold");
        record(&mut state, pass(), 3, &metrics);
        assert_eq!((state.result.up, state.result.consecutive_failures), (Some(true), 0));
        for _ in 0..2 {
            record(&mut state, fail(), 3, &metrics);
        }
        assert_eq!(state.result.up, Some(true), "two failures are not three");
        record(&mut state, fail(), 3, &metrics);
        assert_eq!((state.result.up, state.result.consecutive_failures), (Some(false), 3));
        assert_eq!(state.result.error.as_deref(), Some("refused"));
        assert!((state.result.loss - 4.0 / 5.0).abs() < 1e-9, "{}", state.result.loss);
        record(&mut state, pass(), 3, &metrics);
        assert_eq!(state.result.up, Some(true));
        assert_eq!(state.result.latency_ms, Some(2.0));
        // A UDP check says its own loss.
        record(&mut state, Outcome { latency: Ok(Duration::from_millis(1)), loss: Some(0.4) }, 3, &metrics);
        assert_eq!(state.result.loss, 0.4);
    }

    #[tokio::test]
    async fn tcp_checks_see_open_and_closed_ports() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open: HostPort = listener.local_addr().unwrap().to_string().parse().unwrap();
        let closed: HostPort = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().to_string().parse().unwrap()
        };
        let timeout = Duration::from_secs(1);
        assert!(check(&Target::Tcp(open), 1, timeout).await.latency.is_ok());
        let refused = check(&Target::Tcp(closed), 1, timeout).await.latency.unwrap_err();
        assert!(refused.contains("refused"), "{refused}");
    }
}
