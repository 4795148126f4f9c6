//! UPnP (paper §4.4.1): a member behind a home router asks it (an Internet
//! Gateway Device, found on the LAN by SSDP, no configuration) to forward
//! its PVC port; members then reach it directly at the router's public
//! address. The forward is renewed before its lease ends and removed at a
//! clean stop. The paper kept monitor daemons to clean up after failed
//! hosts; here the agent keeps a record of what it mapped in its state
//! folder, and the next start of the same instance removes whatever a
//! crashed predecessor left.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, anyhow};
use igd_next::{
    PortMappingProtocol, SearchOptions,
    aio::{Gateway, tokio::Tokio},
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::Pair;

/// The member's gateway forwards its PVC port: flows go to that public
/// port, and the tag names the port the application listens on.
pub fn path(pair: &Pair<'_>) -> Option<super::Path> {
    let external = pair.peer.upnp?;
    Some(super::Path {
        real: *external.ip(),
        local: pair.public_local(),
        technique: pvc_common::Technique::Upnp,
        port: external.port(),
    })
}

const SEARCH_TIMEOUT: Duration = Duration::from_secs(2);

/// What this instance asked a gateway to forward, kept on disk until it is
/// removed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    /// The gateway's control URL host, to find it again.
    gateway: SocketAddr,
    external_port: u16,
    internal: SocketAddrV4,
}

/// A forward a gateway granted.
pub struct Mapping {
    gateway: Gateway<Tokio>,
    record: Record,
    record_file: PathBuf,
    lease: Duration,
    /// The public endpoint members reach this host at.
    pub external: SocketAddrV4,
}

fn description(instance: &str) -> String {
    format!("pvc-agent {instance}")
}

async fn search(local: Ipv4Addr) -> anyhow::Result<Gateway<Tokio>> {
    let mut options = SearchOptions::default();
    options.bind_addr = SocketAddr::from((local, 0));
    options.timeout = Some(SEARCH_TIMEOUT);
    options.single_search_timeout = Some(SEARCH_TIMEOUT);
    igd_next::aio::tokio::search_gateway(options)
        .await
        .map_err(|e| anyhow!("no UPnP gateway answered on the LAN: {e}"))
}

/// Removes the forward a previous agent of this instance recorded and did
/// not remove (it crashed), if any.
pub async fn remove_leftover(record_file: &Path, local: Ipv4Addr) {
    let Ok(text) = std::fs::read_to_string(record_file) else {
        return;
    };
    let Ok(record) = serde_json::from_str::<Record>(&text) else {
        let _ = std::fs::remove_file(record_file);
        return;
    };
    match search(local).await {
        Ok(gateway) => {
            match gateway
                .remove_port(PortMappingProtocol::TCP, record.external_port)
                .await
            {
                Ok(()) => info!(
                    port = record.external_port,
                    "removed the UPnP forward a previous agent left"
                ),
                Err(e) => warn!(
                    port = record.external_port,
                    "cannot remove the UPnP forward a previous agent left: {e}"
                ),
            }
        }
        Err(e) => warn!("{e:#}; the forward a previous agent recorded may remain"),
    }
    let _ = std::fs::remove_file(record_file);
}

/// Asks the LAN's gateway to forward `port` (TCP) to `local:port`.
pub async fn map(
    local: Ipv4Addr,
    port: u16,
    instance: &str,
    record_file: &Path,
    lease: Duration,
) -> anyhow::Result<Mapping> {
    let gateway = search(local).await?;
    let internal = SocketAddrV4::new(local, port);
    gateway
        .add_port(
            PortMappingProtocol::TCP,
            port,
            SocketAddr::V4(internal),
            lease.as_secs() as u32,
            &description(instance),
        )
        .await
        .map_err(|e| anyhow!("the UPnP gateway refused to forward port {port}: {e}"))?;
    let record = Record {
        gateway: gateway.addr,
        external_port: port,
        internal,
    };
    // Recorded before anything else can fail: a crash from here on leaves
    // a forward the next start removes.
    if let Some(dir) = record_file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(record_file, serde_json::to_vec(&record)?).with_context(|| {
        format!(
            "cannot record the UPnP forward in {}",
            record_file.display()
        )
    })?;
    let ip = match gateway.get_external_ip().await {
        Ok(IpAddr::V4(ip)) => ip,
        Ok(other) => {
            return Err(anyhow!(
                "the gateway's external address {other} is not IPv4"
            ));
        }
        Err(e) => {
            return Err(anyhow!(
                "the UPnP gateway does not tell its external address: {e}"
            ));
        }
    };
    let external = SocketAddrV4::new(ip, port);
    info!(%external, %internal, "UPnP gateway forwards the PVC port");
    Ok(Mapping {
        gateway,
        record,
        record_file: record_file.to_path_buf(),
        lease,
        external,
    })
}

impl Mapping {
    /// Asks again, before the lease ends.
    pub async fn renew(&self, instance: &str) -> anyhow::Result<()> {
        self.gateway
            .add_port(
                PortMappingProtocol::TCP,
                self.record.external_port,
                SocketAddr::V4(self.record.internal),
                self.lease.as_secs() as u32,
                &description(instance),
            )
            .await
            .map_err(|e| anyhow!("cannot renew the UPnP forward: {e}"))
    }

    /// Removes the forward (clean stop) and its record.
    pub async fn remove(self) {
        match self
            .gateway
            .remove_port(PortMappingProtocol::TCP, self.record.external_port)
            .await
        {
            Ok(()) => info!(port = self.record.external_port, "UPnP forward removed"),
            Err(e) => warn!("cannot remove the UPnP forward: {e}"),
        }
        let _ = std::fs::remove_file(&self.record_file);
    }
}
