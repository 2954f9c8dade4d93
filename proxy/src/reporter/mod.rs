//! Address reporters (the DDNS agent's job): watch an address, and report each change to a sink until
//! the sink confirms it.
//!
//! A reporter reads its address ([`detect`]): for an interface, a netlink dump filtered by the kernel's
//! flags and the configured policy ([`select`]); or STUN, HTTP echo, another node's report held by the
//! control plane ([`seed_api`]), or a static value. It looks again on every netlink address event (after
//! a debounce, since the kernel re-announces addresses on each router advertisement), when the control
//! plane's long poll answers, every `interval`, and when a retry is due. A new address becomes *pending*
//! and is written to the state file before it is sent; it becomes *delivered* only when the sink
//! confirmed it: a 2xx from the control plane, or, for a DNS provider (keel-ddns), a read-back showing
//! exactly the address. A newer address replaces a pending
//! one (only the latest matters). Failures retry with jittered backoff (1 s doubling to 60 s), forever;
//! nothing here ever exits on a network error. After a restart the pending address is sent again and a
//! delivered one is not.

pub mod echo;
pub mod netlink;
pub mod seed_api;
pub mod stun;

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use keel_schemas::config::{AddressFamily, AddressPolicy, AddressSink, AddressSource, Reporter};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use netlink::{
    IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TEMPORARY, IFA_F_TENTATIVE, InterfaceAddress, SCOPE_UNIVERSE,
};

/// Delivery retries start here and double up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How long one DNS update (change and read-back, several requests) may take.
const DNS_UPDATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Picks the address `policy` wants among `addresses` of interface `index` in `family`.
///
/// Never: another interface or family, a non-global scope, loopback, link-local, tentative, DAD-failed
/// or deprecated. Among the rest, `temporary` prefers temporary addresses, `stable` takes only
/// non-temporary ones, `any` takes all; ties go to the longest preferred lifetime (the newest temporary
/// address), then to the lowest address, so the choice is stable.
pub fn select(
    addresses: &[InterfaceAddress],
    index: u32,
    family: AddressFamily,
    policy: AddressPolicy,
) -> Option<IpAddr> {
    let usable = addresses.iter().filter(|a| {
        let family_matches = match family {
            AddressFamily::Ipv6 => a.address.is_ipv6(),
            AddressFamily::Ipv4 => a.address.is_ipv4(),
        };
        let link_local = match a.address {
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
            IpAddr::V4(v4) => v4.is_link_local(),
        };
        a.index == index
            && family_matches
            && a.scope == SCOPE_UNIVERSE
            && !a.address.is_loopback()
            && !link_local
            && !a.has(IFA_F_TENTATIVE | IFA_F_DADFAILED | IFA_F_DEPRECATED)
            && a.preferred > 0
    });
    let wanted: Vec<&InterfaceAddress> = match policy {
        AddressPolicy::Any => usable.collect(),
        AddressPolicy::Stable => usable.filter(|a| !a.has(IFA_F_TEMPORARY)).collect(),
        AddressPolicy::Temporary => {
            let all: Vec<&InterfaceAddress> = usable.collect();
            let temporary: Vec<&InterfaceAddress> =
                all.iter().copied().filter(|a| a.has(IFA_F_TEMPORARY)).collect();
            if temporary.is_empty() { all } else { temporary }
        }
    };
    wanted
        .into_iter()
        .max_by(|a, b| a.preferred.cmp(&b.preferred).then(b.address.cmp(&a.address)))
        .map(|a| a.address)
}

/// Why no address could be read.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("no interface named {0:?}")]
    NoInterface(String),
    #[error("reading addresses: {0}")]
    Netlink(#[from] io::Error),
    #[error("STUN: {0}")]
    Stun(String),
    #[error("HTTP echo: {0}")]
    Echo(String),
    #[error("control plane: {0}")]
    ControlPlane(#[from] seed_api::CallError),
}

/// The address the source gives now, if it has one.
pub async fn detect(source: &AddressSource) -> Result<Option<IpAddr>, DetectError> {
    match source {
        AddressSource::Static(address) => Ok(Some(*address)),
        AddressSource::Http(http) => {
            echo::echoed_address(&http.urls, http.family).await.map(Some).map_err(DetectError::Echo)
        }
        AddressSource::Stun(stun) => {
            stun::mapped_address(&stun.servers, stun.family, stun::Schedule::default())
                .await
                .map(Some)
                .map_err(DetectError::Stun)
        }
        AddressSource::ControlPlane(source) => {
            Ok(seed_api::read_public_ip(&source.url, source.token.as_ref(), &source.node, source.family)
                .await?)
        }
        AddressSource::Interface(interface) => {
            let index = netlink::interface_index(&interface.name)
                .ok_or_else(|| DetectError::NoInterface(interface.name.clone()))?;
            let addresses = netlink::dump().await?;
            Ok(select(&addresses, index, interface.family, interface.policy))
        }
    }
}

/// Why a report was not confirmed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    ControlPlane(#[from] seed_api::CallError),
    #[error("DNS update: {message}")]
    Dns { message: String, retry_after: Option<Duration> },
    #[error("DNS update: no confirmation within {DNS_UPDATE_TIMEOUT:?}")]
    DnsTimeout,
}

impl ReportError {
    /// How long the sink asked us to wait before trying again, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ReportError::Dns { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Sends `address` to `sink`; `Ok` only when the sink confirmed it (for a DNS provider: when reading the
/// record back shows exactly the address).
pub async fn report(sink: &AddressSink, node: &str, address: IpAddr) -> Result<(), ReportError> {
    match sink {
        AddressSink::ControlPlane(endpoint) => {
            Ok(seed_api::post_public_ip(&endpoint.url, endpoint.token.as_ref(), node, address).await?)
        }
        AddressSink::Dns(dns) => {
            let fqdn = keel_schemas::resource::record_fqdn(&dns.zone, &dns.name);
            let target = keel_ddns::Target { zone: &dns.zone, fqdn: &fqdn, ttl: dns.ttl.get() };
            match tokio::time::timeout(DNS_UPDATE_TIMEOUT, keel_ddns::update(&dns.provider, &target, address))
                .await
            {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(failure)) => {
                    Err(ReportError::Dns { message: failure.message, retry_after: failure.retry_after })
                }
                Err(_) => Err(ReportError::DnsTimeout),
            }
        }
    }
}

/// What a reporter keeps across restarts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportState {
    /// The last address the sink confirmed.
    pub delivered: Option<IpAddr>,
    /// An address waiting to be confirmed.
    pub pending: Option<IpAddr>,
}

impl ReportState {
    pub fn load(path: Option<&str>) -> Self {
        let Some(path) = path else { return Self::default() };
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_else(|error| {
                tracing::warn!(file = path, %error, "unreadable reporter state; starting afresh");
                Self::default()
            }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Self::default(),
            Err(error) => {
                tracing::warn!(file = path, %error, "cannot read the reporter state; starting afresh");
                Self::default()
            }
        }
    }

    /// Writes the state next to its final name and renames it over (atomic).
    pub fn save(&self, path: Option<&str>) {
        let Some(path) = path else { return };
        let temporary = format!("{path}.tmp");
        let written = std::fs::write(&temporary, serde_json::to_vec(self).unwrap_or_default())
            .and_then(|()| std::fs::rename(&temporary, path));
        if let Err(error) = written {
            tracing::warn!(file = path, %error, "cannot write the reporter state");
        }
    }

    /// Takes a newly detected address: it becomes pending unless it is already delivered or pending.
    /// Returns whether it is new.
    pub fn observe(&mut self, address: IpAddr) -> bool {
        if self.pending == Some(address) || (self.pending.is_none() && self.delivered == Some(address)) {
            return false;
        }
        // Back to the delivered address while another was pending: the pending one is dropped.
        if self.delivered == Some(address) {
            self.pending = None;
            return false;
        }
        self.pending = Some(address);
        true
    }
}

/// One round for operators (`proxy report --once`): read the address and, unless `dry_run`, report it
/// and record it as delivered. Returns the address.
pub async fn report_once(reporter: &Reporter, node: &str, dry_run: bool) -> Result<IpAddr, String> {
    let address = detect(&reporter.source)
        .await
        .map_err(|error| error.to_string())?
        .ok_or_else(|| "no usable address".to_string())?;
    if dry_run || reporter.dry_run {
        return Ok(address);
    }
    report(&reporter.sink, node, address).await.map_err(|error| error.to_string())?;
    let state_file = reporter.state_file.as_deref();
    let mut state = ReportState::load(state_file);
    state.delivered = Some(address);
    if state.pending == Some(address) {
        state.pending = None;
    }
    state.save(state_file);
    Ok(address)
}

/// What, besides the poll `interval` and due retries, makes a reporter look again.
enum Wakeups {
    /// Netlink address events (an interface source).
    Netlink(netlink::AddressEvents),
    /// The control plane's long poll (a control-plane source).
    LongPoll,
    None,
}

enum Wakeup {
    /// An event of a burst: wait for the debounce first.
    Settle,
    /// Look now.
    Now,
    /// The event source broke: poll only from now on.
    Lost,
}

/// Runs one reporter until `stop`.
pub async fn run(
    reporter: Reporter,
    node: String,
    metrics: std::sync::Arc<Metrics>,
    stop: CancellationToken,
) {
    let name = reporter.name.as_str();
    let state_file = reporter.state_file.as_deref();
    let mut state = ReportState::load(state_file);
    let changes = metrics.counter("keel_reporter_address_changes_total", &[("reporter", name)]);
    let delivered =
        metrics.counter("keel_reporter_reports_total", &[("reporter", name), ("result", "delivered")]);
    let failed = metrics.counter("keel_reporter_reports_total", &[("reporter", name), ("result", "failed")]);
    let pending_gauge = metrics.gauge("keel_reporter_pending", &[("reporter", name)]);
    let mut wakeups = match &reporter.source {
        AddressSource::Interface(_) => match netlink::AddressEvents::subscribe() {
            Ok(events) => Wakeups::Netlink(events),
            Err(error) => {
                tracing::warn!(reporter = name, %error, "no netlink address events; polling only");
                Wakeups::None
            }
        },
        AddressSource::ControlPlane(_) => Wakeups::LongPoll,
        AddressSource::Static(_) | AddressSource::Stun(_) | AddressSource::Http(_) => Wakeups::None,
    };
    // The address last read, for the control plane's long poll.
    let mut seen: Option<IpAddr> = None;
    let mut retry_delay = RETRY_FIRST;
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut last_detect_error = String::new();
    loop {
        match detect(&reporter.source).await {
            Ok(Some(address)) => {
                seen = Some(address);
                last_detect_error.clear();
                let previous = state.pending.or(state.delivered);
                if state.observe(address) {
                    changes.increment(1);
                    tracing::info!(reporter = name, from = ?previous, to = %address, "address changed");
                    state.save(state_file);
                    retry_at = None;
                    retry_delay = RETRY_FIRST;
                }
            }
            Ok(None) => {
                seen = None;
                if last_detect_error != "none" {
                    tracing::warn!(reporter = name, "no usable address right now");
                    last_detect_error = "none".to_string();
                }
            }
            Err(error) => {
                let text = error.to_string();
                if last_detect_error != text {
                    tracing::warn!(reporter = name, error = text, "cannot read the address");
                    last_detect_error = text;
                }
            }
        }
        let due = retry_at.is_none_or(|at| tokio::time::Instant::now() >= at);
        if let Some(address) = state.pending.filter(|_| due) {
            if reporter.dry_run {
                tracing::info!(reporter = name, %address, "dry run: would report");
                state.delivered = Some(address);
                state.pending = None;
            } else {
                match report(&reporter.sink, &node, address).await {
                    Ok(()) => {
                        delivered.increment(1);
                        tracing::info!(reporter = name, %address, "address reported");
                        state.delivered = Some(address);
                        state.pending = None;
                        state.save(state_file);
                        retry_at = None;
                        retry_delay = RETRY_FIRST;
                    }
                    Err(error) => {
                        failed.increment(1);
                        let backoff = retry_delay.mul_f64(0.8 + fastrand::f64() * 0.4);
                        // A provider that said when to come back (429, throttling) is not asked sooner.
                        let delay = error.retry_after().map_or(backoff, |asked| asked.max(backoff));
                        tracing::warn!(reporter = name, %address, %error, retry_in = ?delay, "report failed; will retry");
                        retry_at = Some(tokio::time::Instant::now() + delay);
                        retry_delay = (retry_delay * 2).min(RETRY_MAX);
                    }
                }
            }
        }
        pending_gauge.set(if state.pending.is_some() { 1.0 } else { 0.0 });

        let next_poll = tokio::time::sleep(reporter.interval.get());
        let retry = async {
            match retry_at {
                Some(at) if state.pending.is_some() => tokio::time::sleep_until(at).await,
                _ => std::future::pending().await,
            }
        };
        let event = async {
            match &mut wakeups {
                Wakeups::Netlink(events) => match events.changed().await {
                    Ok(()) => Wakeup::Settle,
                    Err(error) => {
                        tracing::warn!(reporter = name, %error, "netlink events failed; polling only");
                        Wakeup::Lost
                    }
                },
                Wakeups::LongPoll => {
                    let AddressSource::ControlPlane(source) = &reporter.source else {
                        return Wakeup::Lost;
                    };
                    let token = source.token.as_ref();
                    match seed_api::next_public_ip(&source.url, token, &source.node, source.family, seen)
                        .await
                    {
                        Ok(_) => Wakeup::Now,
                        Err(_) => {
                            // Down: detect() says so at the next look; do not spin meanwhile.
                            tokio::time::sleep(RETRY_FIRST * 5).await;
                            Wakeup::Now
                        }
                    }
                }
                Wakeups::None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = next_poll => {}
            () = retry => {}
            wakeup = event => match wakeup {
                // Let the burst settle, then read whatever else queued up meanwhile.
                Wakeup::Settle => tokio::time::sleep(reporter.debounce.get()).await,
                Wakeup::Now => {}
                Wakeup::Lost => wakeups = Wakeups::None,
            },
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink::IFA_F_PERMANENT;

    fn address(text: &str, flags: u32, preferred: u32) -> InterfaceAddress {
        InterfaceAddress {
            index: 2,
            address: text.parse().unwrap(),
            prefix_len: 64,
            scope: 0,
            flags,
            preferred,
        }
    }

    #[test]
    fn policies_pick_by_the_kernel_flags() {
        let addresses = vec![
            address("fe80::1", IFA_F_PERMANENT, u32::MAX),
            address("2001:db8::1", IFA_F_PERMANENT, u32::MAX),
            address("2001:db8::aaaa", IFA_F_TEMPORARY, 3600),
            address("2001:db8::bbbb", IFA_F_TEMPORARY, 7200),
            address("2001:db8::dead", IFA_F_TEMPORARY | IFA_F_DEPRECATED, 0),
            address("2001:db8::7e47", IFA_F_TENTATIVE, u32::MAX),
            address("2001:db8::bad", IFA_F_DADFAILED, u32::MAX),
            address("192.0.2.7", IFA_F_PERMANENT, u32::MAX),
            InterfaceAddress { index: 3, ..address("2001:db8::3", IFA_F_TEMPORARY, u32::MAX) },
        ];
        let pick = |family, policy| select(&addresses, 2, family, policy).map(|ip| ip.to_string());
        assert_eq!(pick(AddressFamily::Ipv6, AddressPolicy::Temporary).as_deref(), Some("2001:db8::bbbb"));
        assert_eq!(pick(AddressFamily::Ipv6, AddressPolicy::Stable).as_deref(), Some("2001:db8::1"));
        assert_eq!(pick(AddressFamily::Ipv6, AddressPolicy::Any).as_deref(), Some("2001:db8::1"));
        assert_eq!(pick(AddressFamily::Ipv4, AddressPolicy::Any).as_deref(), Some("192.0.2.7"));
        // Without a temporary address, `temporary` falls back to a stable one, as seed 000 did.
        let stable_only: Vec<InterfaceAddress> =
            addresses.iter().filter(|a| !a.has(IFA_F_TEMPORARY)).cloned().collect();
        assert_eq!(
            select(&stable_only, 2, AddressFamily::Ipv6, AddressPolicy::Temporary)
                .map(|ip| ip.to_string())
                .as_deref(),
            Some("2001:db8::1")
        );
        // Only unusable ones: nothing.
        let unusable: Vec<InterfaceAddress> = addresses[4..7].to_vec();
        assert_eq!(select(&unusable, 2, AddressFamily::Ipv6, AddressPolicy::Any), None);
    }

    #[test]
    fn state_keeps_only_the_latest_pending_address() {
        let (a, b): (IpAddr, IpAddr) = ("2001:db8::a".parse().unwrap(), "2001:db8::b".parse().unwrap());
        let mut state = ReportState::default();
        assert!(state.observe(a));
        assert!(!state.observe(a));
        assert!(state.observe(b), "a newer address supersedes the pending one");
        assert_eq!(state.pending, Some(b));
        state.delivered = state.pending.take();
        assert!(!state.observe(b));
        assert!(state.observe(a));
        assert!(!state.observe(b), "back to the delivered address: nothing to send");
        assert_eq!(state.pending, None);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let path = path.to_str();
        let saved = ReportState { delivered: Some(a), pending: Some(b) };
        saved.save(path);
        assert_eq!(ReportState::load(path), saved);
        std::fs::write(path.unwrap(), "garbage").unwrap();
        assert_eq!(ReportState::load(path), ReportState::default());
    }
}
