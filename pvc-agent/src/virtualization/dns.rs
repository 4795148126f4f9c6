//! The virtual DNS (paper §4.2): `NAME.DOMAIN` resolves to the virtual
//! address of the member the master admitted as NAME, for unmodified
//! programs through the host's normal resolver (`getaddrinfo`, `ssh
//! node1.pvc`). Names come only from master-signed records the agent
//! verified: a revoked or expired member disappears with its record.
//!
//! The agent answers on its virtual address, port 53 (UDP and TCP), and
//! makes itself the host's resolver for the domain:
//! - where systemd-resolved runs, through a link of its own (a dummy
//!   interface) whose DNS server is that address and whose routing domain
//!   is `~DOMAIN`: only the domain's names come here;
//! - elsewhere, as a block of the hosts file, which every resolver reads
//!   first (names of other domains never see the agent).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use anyhow::Context as _;
use rtnetlink::{Handle, LinkDummy, LinkIfb};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, UdpSocket},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::config::{DnsConfig, DnsResolver};

type Names = Arc<RwLock<BTreeMap<String, Ipv4Addr>>>;

/// How the host's resolver reaches the virtual DNS.
enum Integration {
    Resolved { link: String },
    Hosts { file: PathBuf, marker: String },
}

pub struct Dns {
    names: Names,
    domain: String,
    integration: Integration,
    servers: Vec<JoinHandle<()>>,
}

impl Dns {
    /// Serves the domain on `vip`:53 and wires the host's resolver to it.
    pub async fn start(
        config: &DnsConfig,
        vip: Ipv4Addr,
        instance: &str,
        handle: &Handle,
    ) -> anyhow::Result<Self> {
        let domain = config.domain.trim_matches('.').to_ascii_lowercase();
        let at = SocketAddr::from((vip, 53));
        let hint = "set [dns] enable = false to run without the virtual DNS";
        let udp = UdpSocket::bind(at)
            .await
            .with_context(|| format!("cannot serve the virtual DNS on {at} (UDP): {hint}"))?;
        let tcp = TcpListener::bind(at)
            .await
            .with_context(|| format!("cannot serve the virtual DNS on {at} (TCP): {hint}"))?;
        let names = Names::default();
        let servers = vec![
            tokio::spawn(serve_udp(udp, domain.clone(), names.clone())),
            tokio::spawn(serve_tcp(tcp, domain.clone(), names.clone())),
        ];
        let resolved = match config.resolver {
            DnsResolver::Resolved => true,
            DnsResolver::Hosts => false,
            DnsResolver::Auto => resolved_runs(),
        };
        let link = link_name(instance);
        let routed = if resolved {
            match resolved_link(handle, &link, vip, &domain).await {
                Ok(()) => true,
                // Asked for explicitly: say why it cannot be.
                Err(e) if config.resolver == DnsResolver::Resolved => {
                    return Err(e.context(format!(
                        "cannot route the domain {domain} to the virtual DNS through \
                         systemd-resolved (set [dns] resolver = \"hosts\" to use the hosts file)"
                    )));
                }
                Err(e) => {
                    warn!(
                        "systemd-resolved runs but cannot be given the domain ({e:#}): using the hosts file"
                    );
                    let _ = super::remove_link(handle, &link).await;
                    false
                }
            }
        } else {
            false
        };
        let integration = if routed {
            info!(
                domain,
                link, "systemd-resolved sends the domain's names to the virtual DNS"
            );
            Integration::Resolved { link }
        } else {
            info!(domain, file = %config.hosts_file.display(), "member names are kept in the hosts file");
            Integration::Hosts {
                file: config.hosts_file.clone(),
                marker: format!("pvc {instance}"),
            }
        };
        info!(%at, domain, "virtual DNS serving member names");
        let dns = Self {
            names,
            domain,
            integration,
            servers,
        };
        // A crashed predecessor's block goes at once.
        dns.write_hosts(&BTreeMap::new());
        Ok(dns)
    }

    /// The members' names now (verified records only).
    pub fn set_names(&mut self, names: BTreeMap<String, Ipv4Addr>) {
        if *self.names.read().unwrap() == names {
            return;
        }
        debug!(names = names.len(), "virtual DNS names updated");
        self.write_hosts(&names);
        *self.names.write().unwrap() = names;
    }

    fn write_hosts(&self, names: &BTreeMap<String, Ipv4Addr>) {
        if let Integration::Hosts { file, marker } = &self.integration
            && let Err(e) = update_hosts_block(file, marker, &self.domain, names)
        {
            warn!(file = %file.display(), "cannot update the hosts file: {e:#}");
        }
    }

    /// Stops serving, and unwires the host's resolver.
    pub async fn stop(self, handle: &Handle) {
        for s in &self.servers {
            s.abort();
        }
        match &self.integration {
            Integration::Hosts { file, marker } => {
                if let Err(e) = update_hosts_block(file, marker, &self.domain, &BTreeMap::new()) {
                    warn!(file = %file.display(), "cannot clean the hosts file: {e:#}");
                }
            }
            Integration::Resolved { link } => {
                if let Err(e) = super::remove_link(handle, link).await {
                    warn!(link, "cannot remove the virtual DNS link: {e:#}");
                }
            }
        }
    }
}

/// Removes what a crashed agent of `instance` left for the resolver.
pub async fn cleanup(config: &DnsConfig, instance: &str, handle: &Handle) {
    let _ = super::remove_link(handle, &link_name(instance)).await;
    if config.enable && config.resolver != DnsResolver::Resolved {
        let marker = format!("pvc {instance}");
        let _ = update_hosts_block(&config.hosts_file, &marker, "", &BTreeMap::new());
    }
}

async fn serve_udp(socket: UdpSocket, domain: String, names: Names) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let reply = {
            let names = names.read().unwrap();
            pvc_proto::dns::answer(&buf[..n], &domain, &names)
        };
        if let Some(reply) = reply {
            let _ = socket.send_to(&reply, from).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, domain: String, names: Names) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let (domain, names) = (domain.clone(), names.clone());
        tokio::spawn(async move {
            // Length-prefixed messages (RFC 1035 4.2.2), until the client
            // closes or stays silent.
            let idle = std::time::Duration::from_secs(10);
            loop {
                let mut len = [0u8; 2];
                if !matches!(
                    tokio::time::timeout(idle, stream.read_exact(&mut len)).await,
                    Ok(Ok(_))
                ) {
                    return;
                }
                let mut query = vec![0u8; u16::from_be_bytes(len) as usize];
                if !matches!(
                    tokio::time::timeout(idle, stream.read_exact(&mut query)).await,
                    Ok(Ok(_))
                ) {
                    return;
                }
                let reply = {
                    let names = names.read().unwrap();
                    pvc_proto::dns::answer(&query, &domain, &names)
                };
                let Some(reply) = reply else { return };
                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                if stream.write_all(&framed).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// Rewrites this instance's block of the hosts file (removes it when
/// `names` is empty), leaving every other line as it was. Written in place:
/// the file may be a bind mount (containers), which a rename would break.
fn update_hosts_block(
    file: &Path,
    marker: &str,
    domain: &str,
    names: &BTreeMap<String, Ipv4Addr>,
) -> anyhow::Result<()> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    let begin = format!("# {marker}: members of the virtual cluster, kept by pvc-agent");
    let end = format!("# {marker} end");
    let mut out = String::new();
    let mut inside = false;
    for line in text.lines() {
        if line == begin {
            inside = true;
        } else if line == end {
            inside = false;
        } else if !inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    if !names.is_empty() {
        out.push_str(&begin);
        out.push('\n');
        for (name, vip) in names {
            out.push_str(&format!("{vip}\t{name}.{domain}\n"));
        }
        out.push_str(&end);
        out.push('\n');
    }
    if out != text {
        std::fs::write(file, out).with_context(|| format!("cannot write {}", file.display()))?;
    }
    Ok(())
}

fn resolved_runs() -> bool {
    Path::new("/run/systemd/resolve/io.systemd.Resolve").exists()
}

/// The dummy link that carries the domain's DNS route for systemd-resolved
/// (interface names have at most 15 bytes).
fn link_name(instance: &str) -> String {
    let mut name = format!("pvc-{instance}");
    name.truncate(15);
    name
}

async fn resolved_link(
    handle: &Handle,
    link: &str,
    vip: Ipv4Addr,
    domain: &str,
) -> anyhow::Result<()> {
    let _ = super::remove_link(handle, link).await;
    let dummy = handle
        .link()
        .add(LinkDummy::new(link).up().build())
        .execute()
        .await;
    if dummy.is_err() {
        // Kernels without dummy devices: an ifb device carries the route
        // as well (resolved only needs a link to hang it on).
        handle
            .link()
            .add(LinkIfb::new(link).up().build())
            .execute()
            .await
            .with_context(|| format!("cannot create the link {link} (dummy or ifb)"))?;
    }
    for args in [
        vec!["dns", link, &vip.to_string()],
        vec!["domain", link, &format!("~{domain}")],
        vec!["default-route", link, "false"],
    ] {
        // Quick local calls, once at start.
        let out = std::process::Command::new("resolvectl")
            .args(&args)
            .output()
            .context("cannot run resolvectl")?;
        anyhow::ensure!(
            out.status.success(),
            "resolvectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hosts_block_is_ours_alone_and_goes_when_empty() {
        let dir = std::env::temp_dir().join(format!("pvc-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hosts");
        std::fs::write(&file, "127.0.0.1\tlocalhost\n").unwrap();
        let names: BTreeMap<String, Ipv4Addr> =
            [("node1".to_string(), Ipv4Addr::new(240, 0, 0, 7))].into();
        update_hosts_block(&file, "pvc x", "pvc", &names).unwrap();
        update_hosts_block(&file, "pvc x", "pvc", &names).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.matches("240.0.0.7\tnode1.pvc").count(), 1, "{text}");
        assert!(text.starts_with("127.0.0.1\tlocalhost\n"));
        // Another instance's block is left alone.
        update_hosts_block(&file, "pvc y", "pvc", &names).unwrap();
        update_hosts_block(&file, "pvc x", "pvc", &BTreeMap::new()).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(text.matches("node1.pvc").count(), 1, "{text}");
        assert!(!text.contains("# pvc x"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
