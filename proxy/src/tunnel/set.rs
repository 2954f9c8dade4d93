//! The running tunnels of a config, changed entry by entry.
//!
//! An apply is two steps, like the rest of the proxy's: [`TunnelSet::plan`] binds every listener the new
//! config needs (the router's, the new or changed visitors') and changes nothing, so a bind failure
//! rejects the config whole; [`TunnelSet::commit`] then stops what went away or changed and starts what
//! is new. An entry whose settings (and whose routers' settings) did not change is left alone, with its
//! sessions, pools and connections. A stopped entry's relays in progress finish on their own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use keel_schemas::config::{ClientTls, Publish, RouterRef, TunnelServer, Tunnels, Visit};
use keel_schemas::dns::{HijackTable, visited_service_name};
use keel_schemas::{Config, ConfigPath, Diagnostic};
use serde::Serialize;
use tokio::net::TcpListener;

use super::publisher::{Publication, PublicationStatus};
use super::router::{Router, RouterStatus};
use super::visitor::{Visitation, VisitationStatus};
use super::{Context, RouterEndpoint, tls};

/// Everything that identifies a running entry: when any of it changes, the entry restarts.
/// `tls_files` fingerprints the contents of the TLS files an entry uses, so that a reload after
/// certificates were replaced in place (as cert-manager does) picks the new ones up.
#[derive(Clone, Debug, PartialEq)]
struct RouterKey {
    server: TunnelServer,
    max_skew: Duration,
    tls_files: u64,
}

#[derive(Clone, Debug, PartialEq)]
struct PublishKey {
    entry: Publish,
    routers: Vec<RouterRef>,
    max_skew: Duration,
    tls_files: u64,
}

#[derive(Clone, Debug, PartialEq)]
struct VisitKey {
    entry: Visit,
    routers: Vec<RouterRef>,
    listen: SocketAddr,
    tls_files: u64,
}

/// An entry's routers as it reaches them, in its order.
type Endpoints = Vec<RouterEndpoint>;

/// The tunnels running now.
#[derive(Debug)]
pub struct TunnelSet {
    context: Context,
    router: Option<(RouterKey, Router)>,
    publications: HashMap<String, (PublishKey, Publication)>,
    visitations: HashMap<String, (VisitKey, Visitation)>,
}

/// What a commit will do, with the listeners already bound.
#[derive(Debug)]
pub struct TunnelPlan {
    router: RouterPlan,
    publications: Vec<(PublishKey, Endpoints)>,
    visitations: Vec<(VisitKey, Option<(TcpListener, Endpoints)>)>,
}

#[derive(Debug)]
enum RouterPlan {
    Keep,
    Stop,
    Start(Box<RouterKey>, TcpListener, Option<tls::Server>),
}

/// What `/tunnels` shows.
#[derive(Debug, Serialize)]
pub struct TunnelsStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub router: Option<RouterStatus>,
    pub publish: Vec<PublicationStatus>,
    pub visit: Vec<VisitationStatus>,
}

/// The routers an entry goes through: the ones it names, in its order, or all of them.
fn routers_of(names: &[String], tunnels: &Tunnels) -> Vec<RouterRef> {
    if names.is_empty() {
        return tunnels.routers.clone();
    }
    names
        .iter()
        .filter_map(|name| tunnels.routers.iter().find(|router| &router.name == name).cloned())
        .collect()
}

/// FNV-1a over the contents of `paths` (a file that cannot be read counts as empty: building the TLS
/// configuration reports it).
fn fingerprint<'a>(paths: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for path in paths {
        for byte in path.bytes().chain(std::fs::read(path).unwrap_or_default()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    hash
}

fn client_files(tls: &ClientTls) -> impl Iterator<Item = &str> {
    std::iter::once(tls.ca_file.as_str()).chain(tls.cert_file.as_deref()).chain(tls.key_file.as_deref())
}

fn routers_fingerprint(routers: &[RouterRef]) -> u64 {
    fingerprint(routers.iter().filter_map(|router| router.tls.as_ref()).flat_map(client_files))
}

/// A listener for a tunnel entry. `SO_REUSEPORT` lets a changed entry bind its address again while the
/// entry it replaces still holds it.
fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(address), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

impl TunnelSet {
    pub fn new(context: Context) -> Self {
        Self { context, router: None, publications: HashMap::new(), visitations: HashMap::new() }
    }

    /// The node name entries started from now on use (`node.id` may change with a reload).
    pub fn set_node(&mut self, node: String) {
        self.context.node = node;
    }

    /// Binds what `config` needs that is not running yet. `table` is the hijack table the config's DNS
    /// section gives (visitors without `listen` listen on their service's VIP).
    pub fn plan(&self, config: &Config, table: Option<&HijackTable>) -> Result<TunnelPlan, Vec<Diagnostic>> {
        let empty = Tunnels {
            server: None,
            routers: Vec::new(),
            publish: Vec::new(),
            visit: Vec::new(),
            max_skew: keel_schemas::config::defaults::max_skew(),
        };
        let tunnels = config.tunnels.as_ref().unwrap_or(&empty);
        let root = ConfigPath::root().key("tunnels");
        let mut problems = Vec::new();

        let router = match (&tunnels.server, &self.router) {
            (None, None) => RouterPlan::Keep,
            (None, Some(_)) => RouterPlan::Stop,
            (Some(server), running) => {
                let tls_files = server.tls.as_ref().map_or(0, |tls| {
                    let files = [tls.cert_file.as_str(), tls.key_file.as_str()];
                    fingerprint(files.into_iter().chain(tls.client_ca_file.as_deref()))
                });
                let key = RouterKey { server: server.clone(), max_skew: tunnels.max_skew.get(), tls_files };
                match running {
                    Some((running_key, _)) if *running_key == key => RouterPlan::Keep,
                    // The acceptor is built (its files read) only for a router that (re)starts.
                    _ => match (bind(server.listen.0), server.tls.as_ref().map(tls::Server::new).transpose())
                    {
                        (Ok(listener), Ok(tls)) => RouterPlan::Start(Box::new(key), listener, tls),
                        (bound, tls) => {
                            if let Err(error) = bound {
                                let path = root.key("server").key("listen");
                                problems.push(Diagnostic::new(
                                    path,
                                    format!("cannot bind {}: {error}", server.listen),
                                ));
                            }
                            if let Err(error) = tls {
                                problems.push(Diagnostic::new(root.key("server").key("tls"), error));
                            }
                            RouterPlan::Keep
                        }
                    },
                }
            }
        };

        // Every router's TLS client, built once: a bad file is reported where the router names it.
        let mut clients: HashMap<&str, Option<tls::Client>> = HashMap::new();
        for (index, router) in tunnels.routers.iter().enumerate() {
            let client = match &router.tls {
                Some(tls) => match tls::Client::new(tls, &router.address) {
                    Ok(client) => Some(client),
                    Err(error) => {
                        problems.push(Diagnostic::new(root.key("routers").index(index).key("tls"), error));
                        None
                    }
                },
                None => None,
            };
            clients.insert(router.name.as_str(), client);
        }
        let endpoints_of = |routers: &[RouterRef]| -> Endpoints {
            routers
                .iter()
                .map(|router| {
                    RouterEndpoint::new(router, clients.get(router.name.as_str()).cloned().flatten())
                })
                .collect()
        };

        let publications = tunnels
            .publish
            .iter()
            .map(|entry| {
                let routers = routers_of(&entry.routers, tunnels);
                let endpoints = endpoints_of(&routers);
                let tls_files = routers_fingerprint(&routers);
                let key =
                    PublishKey { entry: entry.clone(), routers, max_skew: tunnels.max_skew.get(), tls_files };
                (key, endpoints)
            })
            .collect();

        let mut visitations = Vec::new();
        for (index, entry) in tunnels.visit.iter().enumerate() {
            let at = root.key("visit").index(index);
            let listen = match (entry.listen, entry.port, config.dns.as_ref(), table) {
                (Some(listen), _, _, _) => listen.0,
                (None, Some(port), Some(dns), Some(table)) => {
                    let name = visited_service_name(entry, dns);
                    match table.lookup(&name) {
                        Some(vip) => SocketAddr::new(vip, port),
                        None => {
                            problems
                                .push(Diagnostic::new(at, format!("{name} has no VIP in the hijack table")));
                            continue;
                        }
                    }
                }
                _ => {
                    problems.push(Diagnostic::new(at, "no listen address and no DNS section to give a VIP"));
                    continue;
                }
            };
            let routers = routers_of(&entry.routers, tunnels);
            let tls_files = routers_fingerprint(&routers);
            let key = VisitKey { entry: entry.clone(), routers, listen, tls_files };
            let unchanged = self.visitations.get(&entry.name).is_some_and(|(running, _)| *running == key);
            if unchanged {
                visitations.push((key, None));
                continue;
            }
            match bind(listen) {
                Ok(listener) => {
                    let endpoints = endpoints_of(&key.routers);
                    visitations.push((key, Some((listener, endpoints))));
                }
                Err(error) => {
                    let path = if entry.listen.is_some() { at.key("listen") } else { at.key("port") };
                    problems.push(Diagnostic::new(path, format!("cannot bind {listen}: {error}")));
                }
            }
        }
        if problems.is_empty() { Ok(TunnelPlan { router, publications, visitations }) } else { Err(problems) }
    }

    /// Makes the running tunnels what `plan` says.
    pub fn commit(&mut self, plan: TunnelPlan) {
        match plan.router {
            RouterPlan::Keep => {}
            RouterPlan::Stop => {
                if let Some((_, router)) = self.router.take() {
                    router.stop();
                }
            }
            RouterPlan::Start(key, listener, tls) => {
                let router = Router::start(listener, &key.server, tls, key.max_skew, self.context.clone());
                if let Some((_, old)) = self.router.replace((*key, router)) {
                    old.stop();
                }
            }
        }

        let mut publications = HashMap::new();
        for (key, endpoints) in plan.publications {
            let name = key.entry.name.clone();
            let running = match self.publications.remove(&name) {
                Some((running_key, publication)) if running_key == key => (running_key, publication),
                other => {
                    if let Some((_, old)) = other {
                        old.stop();
                    }
                    let publication =
                        Publication::start(&key.entry, &endpoints, key.max_skew, self.context.clone());
                    (key, publication)
                }
            };
            publications.insert(name, running);
        }
        for (_, (_, removed)) in self.publications.drain() {
            removed.stop();
        }
        self.publications = publications;

        let mut visitations = HashMap::new();
        for (key, listener) in plan.visitations {
            let name = key.entry.name.clone();
            let running = match (self.visitations.remove(&name), listener) {
                (Some(running), None) => running,
                (old, Some((listener, endpoints))) => {
                    if let Some((_, old)) = old {
                        old.stop();
                    }
                    let visitation =
                        Visitation::start(listener, &key.entry, &endpoints, self.context.clone());
                    (key, visitation)
                }
                // Planned as unchanged but no longer running: cannot happen while applies are serialized.
                (None, None) => continue,
            };
            visitations.insert(name, running);
        }
        for (_, (_, removed)) in self.visitations.drain() {
            removed.stop();
        }
        self.visitations = visitations;
    }

    /// Stops everything (shutdown): listeners, sessions and pools; relays in progress go on.
    pub fn stop_all(&mut self) {
        if let Some((_, router)) = self.router.take() {
            router.stop();
        }
        for (_, (_, publication)) in self.publications.drain() {
            publication.stop();
        }
        for (_, (_, visitation)) in self.visitations.drain() {
            visitation.stop();
        }
    }

    pub async fn status(&self) -> TunnelsStatus {
        let router = match &self.router {
            Some((_, router)) => Some(router.status().await),
            None => None,
        };
        let mut publish: Vec<PublicationStatus> =
            self.publications.values().map(|(_, publication)| publication.status()).collect();
        publish.sort_by(|a, b| a.service.cmp(&b.service));
        let mut visit = Vec::new();
        for (_, visitation) in self.visitations.values() {
            visit.push(visitation.status().await);
        }
        visit.sort_by(|a, b| a.service.cmp(&b.service));
        TunnelsStatus { router, publish, visit }
    }

    /// The address a visitor listens on (with its port filled in), by service name.
    pub fn visitor_addr(&self, service: &str) -> Option<SocketAddr> {
        self.visitations.get(service).map(|(_, visitation)| visitation.local_addr)
    }

    /// The router's bound address, when this proxy is one.
    pub fn router_addr(&self) -> Option<SocketAddr> {
        self.router.as_ref().map(|(_, router)| router.local_addr)
    }
}
