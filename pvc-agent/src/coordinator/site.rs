//! The agent's side of site discovery (`connectivity::discovery`): the PVC
//! port's probe sockets, the brokers' observations and probe answers, the
//! UPnP forward, and telling the brokers (hence the members) the result.

use std::{net::SocketAddrV4, time::Instant};

use pvc_proto::{AgentMessage, SiteInfo};
use tokio::{
    net::{TcpListener, TcpSocket, UdpSocket},
    sync::mpsc,
};
use tracing::{info, warn};

use super::{agent::Agent, broker::Outgoing};
use crate::connectivity::upnp::{self, Mapping};

/// The PVC port's sockets: brokers' TCP probes are accepted (and closed),
/// their UDP datagrams read.
pub(super) struct ProbeSockets {
    pub tcp: TcpListener,
    pub udp: UdpSocket,
}

impl ProbeSockets {
    /// Bound to the real address only: the virtual address's port space
    /// belongs to the applications.
    pub fn open(real: std::net::Ipv4Addr, port: u16) -> anyhow::Result<Self> {
        let tcp = TcpSocket::new_v4()?;
        // The broker sessions leave from the same port.
        tcp.set_reuseaddr(true)?;
        tcp.set_reuseport(true)?;
        tcp.bind(std::net::SocketAddr::from((real, port)))
            .map_err(|e| {
                anyhow::anyhow!("cannot listen on the PVC port {port} (connectivity.port): {e}")
            })?;
        let tcp = tcp.listen(16)?;
        let udp = std::net::UdpSocket::bind((real, port))
            .map_err(|e| anyhow::anyhow!("cannot bind UDP port {port} (connectivity.port): {e}"))?;
        udp.set_nonblocking(true)?;
        Ok(Self {
            tcp,
            udp: UdpSocket::from_std(udp)?,
        })
    }
}

/// Looks for a UPnP gateway and asks it to forward the PVC port, in the
/// background (a search takes seconds); the result comes back on `done`.
/// First removes what a crashed predecessor left (also when this agent is
/// not to `map` anything: UPnP was turned off after the crash).
pub(super) fn start_upnp(
    local: std::net::Ipv4Addr,
    port: u16,
    instance: String,
    record: std::path::PathBuf,
    map: bool,
    lease: std::time::Duration,
    done: mpsc::Sender<anyhow::Result<Mapping>>,
) {
    tokio::spawn(async move {
        upnp::remove_leftover(&record, local).await;
        if map {
            let _ = done
                .send(upnp::map(local, port, &instance, &record, lease).await)
                .await;
        }
    });
}

impl Agent {
    /// Tells every broker (hence every member) what this host found out.
    async fn publish_site(&mut self, site: SiteInfo) {
        info!(
            public = ?site.public,
            nat = ?site.nat,
            inbound = ?site.inbound,
            upnp = ?site.upnp,
            "this host's site"
        );
        let _ = self.outgoing.try_send(Outgoing {
            broker: None,
            msg: AgentMessage::Site(site),
        });
        let effects = self.core.set_site(site);
        self.apply(effects).await;
    }

    /// A broker session is up: where the brokers see us may have changed,
    /// and a first probe is due.
    pub(super) async fn site_after_welcome(&mut self, broker: &str) {
        let observed: Vec<SocketAddrV4> = self.core.brokers.values().copied().collect();
        if let Some(site) = self.discovery.observed(observed) {
            self.publish_site(site).await;
        } else {
            // A new broker learns what the others know.
            let site = self.discovery.site;
            let _ = self.outgoing.try_send(Outgoing {
                broker: Some(broker.to_string()),
                msg: AgentMessage::Site(site),
            });
        }
        if self.probed_at.is_none() {
            self.probe(broker);
        }
    }

    /// Asks `broker` to reach back to the PVC port.
    pub(super) fn probe(&mut self, broker: &str) {
        let nonce = self.discovery.start_probe();
        self.probed_at = Some(Instant::now());
        self.probed_via = Some(broker.to_string());
        let _ = self.outgoing.try_send(Outgoing {
            broker: Some(broker.to_string()),
            msg: AgentMessage::Probe {
                port: self.config.connectivity.port,
                nonce,
            },
        });
    }

    /// Probes again: through another broker if the last did not answer
    /// (it may be the one that is gone), and now and then in case the
    /// network changed.
    pub(super) async fn check_probe(&mut self) {
        if let Some(site) = self.discovery.settle(Instant::now()) {
            self.publish_site(site).await;
        }
        let Some(at) = self.probed_at else {
            return;
        };
        let unanswered = self.discovery.probing() && at.elapsed() >= super::agent::PROBE_PATIENCE;
        if !unanswered && at.elapsed() < super::agent::REPROBE {
            return;
        }
        let next = self
            .core
            .brokers
            .keys()
            .find(|b| Some(*b) != self.probed_via.as_ref())
            .or_else(|| self.core.brokers.keys().next())
            .cloned();
        if let Some(b) = next {
            self.probe(&b);
        }
    }

    pub(super) async fn probe_result(&mut self, nonce: u64, reached: bool) {
        if let Some(site) = self.discovery.probe_result(nonce, reached, Instant::now()) {
            self.publish_site(site).await;
        }
    }

    pub(super) async fn probe_datagram(&mut self, bytes: &[u8]) {
        if let Some(site) = self.discovery.datagram(bytes) {
            self.publish_site(site).await;
        }
    }

    pub(super) async fn upnp_done(&mut self, result: anyhow::Result<Mapping>) {
        match result {
            Ok(mapping) => {
                let external = mapping.external;
                self.upnp = Some(mapping);
                if let Some(site) = self.discovery.upnp(Some(external)) {
                    self.publish_site(site).await;
                }
                // Reachable now through the forward: probe again.
                if let Some(b) = self.core.brokers.keys().next().cloned() {
                    self.probe(&b);
                }
            }
            Err(e) => info!("no UPnP forward: {e:#}"),
        }
    }

    pub(super) async fn renew_upnp(&mut self) {
        if let Some(m) = &self.upnp
            && let Err(e) = m.renew(&self.config.instance).await
        {
            warn!("{e:#}");
        }
    }
}
