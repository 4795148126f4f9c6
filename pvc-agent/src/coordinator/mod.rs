//! The coordinator (paper §4, Fig. 2): runs the peer's workflow. It sets up
//! interposition and virtualization, keeps the broker session, turns
//! membership into paths in the kernel, and undoes everything on a clean stop.

pub mod broker;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use pvc_proto::{Member, Registration};
use rtnetlink::Handle;
use tokio::{
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, interval},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::broker::Membership;
use crate::{
    config::Config,
    connectivity::{self, Path as PeerPath},
    control::{self, PeerStatus, Query, Request, Status},
    interposition::{self, Attachment, Datapath, FlowEvent, Timeouts},
    virtualization::{self, Uplink},
};

/// How long a member whose broker session was lost (or who is missing from a
/// new broker's list) keeps its path: a crashed agent restarts, and after a
/// broker failover the new broker's list fills up as agents re-register.
const ABSENCE_GRACE: Duration = Duration::from_secs(20);
/// How often next hops are checked against the host's routing table.
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(30);

/// What the agent knows of a member.
struct Peer {
    member: Member,
    path: Option<PeerPath>,
    /// The next hop of the path's real address, as routed now.
    via: Option<Ipv4Addr>,
    /// Set when a broker's member list did not include this member.
    absent_since: Option<Instant>,
}

struct Agent {
    config: Config,
    handle: Handle,
    uplink: Uplink,
    real_ip: Ipv4Addr,
    advertised: Vec<Ipv4Addr>,
    datapath: Datapath,
    peers: BTreeMap<Ipv4Addr, Peer>,
    /// Paths found in the kernel at start (left by a previous agent): kept
    /// until the broker confirms the member or the grace period ends.
    inherited: BTreeMap<Ipv4Addr, Instant>,
    /// Routes of members that left, kept while flows still use them.
    retained_routes: BTreeSet<Ipv4Addr>,
    broker: Option<String>,
    flows_opened: BTreeMap<String, u64>,
    refusals_logged: u32,
    refusals_unlogged: u64,
}

/// The cgroup v2 root: `/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones.
pub fn default_cgroup() -> PathBuf {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "/sys/fs/cgroup".into()
    } else {
        "/sys/fs/cgroup/unified".into()
    }
}

fn check_cgroup(path: &Path) -> anyhow::Result<()> {
    if !path.join("cgroup.procs").exists() || path.join("tasks").exists() {
        bail!(
            "{} is not a cgroup v2 folder; set interposition.cgroup to one (for example {})",
            path.display(),
            default_cgroup().display()
        );
    }
    Ok(())
}

/// Runs the agent until SIGINT/SIGTERM, then removes everything it set up.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let cgroup = config
        .interposition
        .cgroup
        .clone()
        .unwrap_or_else(default_cgroup);
    check_cgroup(&cgroup)?;
    let handle = virtualization::connect()?;
    let uplink = virtualization::uplink(&handle, &config.interposition.uplink).await?;
    let real_ip = uplink
        .networks
        .first()
        .map(|n| n.address)
        .with_context(|| {
            format!(
                "uplink {} has no IPv4 address: configure one first",
                uplink.name
            )
        })?;
    let advertised = if config.advertise.is_empty() {
        uplink.networks.iter().map(|n| n.address).collect()
    } else {
        config.advertise.clone()
    };
    let registration = Registration {
        cluster: config.cluster.clone(),
        member: Member {
            name: config.name.clone(),
            virtual_ip: config.virtual_ip,
            addresses: advertised.clone(),
        },
        software: format!("pvc-agent {}", env!("CARGO_PKG_VERSION")),
    };
    registration
        .validate()
        .context("cannot register with these settings")?;

    interposition::ensure_bpffs(&config.interposition.bpffs)?;
    let attachment = Attachment {
        pin_dir: config.pin_dir(),
        uplink: uplink.name.clone(),
        uplink_index: uplink.index,
        cgroup: cgroup.clone(),
        max_flows: config.interposition.max_flows,
    };
    let mut datapath = match Datapath::start(&attachment) {
        Ok(d) => d,
        Err(e) => {
            let _ = interposition::remove_instance(&attachment.pin_dir);
            return Err(e);
        }
    };
    let events = datapath.take_events().expect("events are taken once");
    let mut agent = Agent {
        config,
        handle,
        uplink,
        real_ip,
        advertised,
        datapath,
        peers: BTreeMap::new(),
        inherited: BTreeMap::new(),
        retained_routes: BTreeSet::new(),
        broker: None,
        flows_opened: BTreeMap::new(),
        refusals_logged: 0,
        refusals_unlogged: 0,
    };
    let result = match agent.configure().await {
        Ok(()) => {
            info!(
                name = agent.config.name,
                virtual_ip = %agent.config.virtual_ip,
                real_ip = %agent.real_ip,
                uplink = agent.uplink.name,
                cgroup = %cgroup.display(),
                pins = %agent.datapath.pin_dir().display(),
                "agent ready"
            );
            agent.serve(registration, events).await
        }
        Err(e) => Err(e),
    };
    let teardown = agent.teardown().await;
    result.and(teardown)
}

/// Removes what an instance set up, without running it (after a crash, or
/// to clean a host by hand).
pub async fn cleanup(config: &Config) -> anyhow::Result<()> {
    let handle = virtualization::connect()?;
    let uplink = virtualization::uplink(&handle, &config.interposition.uplink)
        .await
        .ok();
    virtualization::deconfigure(&handle, uplink.map(|u| u.index), config.virtual_ip).await?;
    interposition::remove_instance(&config.pin_dir())?;
    let _ = std::fs::remove_file(config.control_socket());
    Ok(())
}

impl Agent {
    async fn configure(&mut self) -> anyhow::Result<()> {
        self.datapath
            .maps
            .set_identity(self.config.virtual_ip, self.real_ip)?;
        // A previous agent of this instance may have left paths and routes
        // (it crashed, or was upgraded): established flows keep using them
        // until the broker says who is still a member.
        let now = Instant::now();
        for (vip, _) in self.datapath.maps.peers() {
            self.inherited.insert(vip, now);
        }
        self.retained_routes
            .extend(virtualization::peer_routes(&self.handle).await?);
        if !self.inherited.is_empty() {
            info!(
                paths = self.inherited.len(),
                "kept the paths of the previous agent until the broker confirms them"
            );
        }
        virtualization::configure(&self.handle, &self.uplink, self.config.virtual_ip).await
    }

    async fn serve(
        &mut self,
        registration: Registration,
        mut events: interposition::EventStream,
    ) -> anyhow::Result<()> {
        let (member_tx, mut member_rx) = mpsc::channel(256);
        let leave = CancellationToken::new();
        let mut brokers: JoinHandle<()> = tokio::spawn(broker::run(
            self.config.broker_addresses(),
            registration,
            member_tx,
            leave.clone(),
        ));
        let (query_tx, mut query_rx) = mpsc::channel::<Query>(16);
        let socket = self.config.control_socket();
        let mut control = tokio::spawn(control::serve(socket, query_tx));
        let mut gc = interval(self.config.gc_interval());
        let mut refresh = interval(NEXT_HOP_REFRESH);
        let timeouts = Timeouts {
            idle: Duration::from_secs(self.config.flows.idle_timeout_secs),
            closed: Duration::from_secs(self.config.flows.closed_timeout_secs),
            icmp: Duration::from_secs(self.config.flows.icmp_timeout_secs),
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;

        let result = loop {
            tokio::select! {
                Some(update) = member_rx.recv() => self.on_membership(update).await,
                batch = events.next_batch() => match batch {
                    Ok(batch) => batch.into_iter().for_each(|e| self.on_event(e)),
                    Err(e) => break Err(e).context("cannot read kernel events"),
                },
                Some((request, reply)) = query_rx.recv() => {
                    let Request::Status = request;
                    let _ = reply.send(self.status());
                }
                _ = gc.tick() => {
                    let (removed, active) = self.datapath.maps.collect_garbage(&timeouts);
                    if removed > 0 {
                        debug!(removed, "expired flow entries removed");
                    }
                    self.expire_members(&active).await;
                    if self.refusals_unlogged > 0 {
                        warn!("{} more connect() refusals not logged one by one", self.refusals_unlogged);
                    }
                    self.refusals_logged = 0;
                    self.refusals_unlogged = 0;
                }
                _ = refresh.tick() => self.refresh_next_hops().await,
                r = &mut control => break match r {
                    Ok(Err(e)) => Err(e),
                    _ => Err(anyhow::anyhow!("control socket stopped")),
                },
                _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); break Ok(()) }
                _ = term.recv() => { info!("SIGTERM: stopping"); break Ok(()) }
            }
        };
        // Members may forget this one at once, rather than wait for it.
        leave.cancel();
        if tokio::time::timeout(Duration::from_secs(2), &mut brokers)
            .await
            .is_err()
        {
            brokers.abort();
        }
        control.abort();
        result
    }

    async fn on_membership(&mut self, update: Membership) {
        match update {
            Membership::Connected { broker, members } => {
                self.broker = Some(broker);
                let present: BTreeSet<Ipv4Addr> = members.iter().map(|m| m.virtual_ip).collect();
                let now = Instant::now();
                for (vip, peer) in self.peers.iter_mut() {
                    if !present.contains(vip) && peer.absent_since.is_none() {
                        peer.absent_since = Some(now);
                    }
                }
                for m in members {
                    self.learn(m).await;
                }
            }
            Membership::Joined(m) => self.learn(m).await,
            Membership::Left {
                name,
                virtual_ip,
                clean: true,
            } => {
                info!(name, %virtual_ip, "member left");
                self.forget(virtual_ip);
            }
            // Lost, not gone: an agent restarting or a member cut from the
            // broker but not from us. Flows keep working for a grace period.
            Membership::Left {
                name,
                virtual_ip,
                clean: false,
            } => {
                info!(name, %virtual_ip, "member lost its broker session; keeping its path for {ABSENCE_GRACE:?}");
                if let Some(p) = self.peers.get_mut(&virtual_ip) {
                    p.absent_since.get_or_insert_with(Instant::now);
                }
            }
            Membership::Disconnected { .. } => self.broker = None,
        }
    }

    /// A member is known: install the best path to it, route first (a flow
    /// must never be masqueraded before the kernel knows its next hop).
    async fn learn(&mut self, member: Member) {
        let vip = member.virtual_ip;
        if vip == self.config.virtual_ip {
            return;
        }
        if let Err(e) = member.validate() {
            warn!(
                name = member.name,
                "ignoring a member the broker relayed: {e}"
            );
            return;
        }
        self.inherited.remove(&vip);
        self.retained_routes.remove(&vip);
        let path = connectivity::choose(&member, &self.uplink.networks);
        let (old_path, old_via) = self
            .peers
            .get(&vip)
            .map_or((None, None), |p| (p.path, p.via));
        let via = match path {
            Some(p) if Some(p) == old_path && old_via.is_some() => old_via,
            Some(p) => match self.install(&member, p).await {
                Ok(via) => Some(via),
                Err(e) => {
                    warn!(name = member.name, "no path to member: {e:#}");
                    self.uninstall(vip).await;
                    None
                }
            },
            None => {
                warn!(name = member.name, "no usable address for member");
                self.uninstall(vip).await;
                None
            }
        };
        let path = path.filter(|_| via.is_some());
        self.peers.insert(
            vip,
            Peer {
                member,
                path,
                via,
                absent_since: None,
            },
        );
    }

    async fn install(&mut self, member: &Member, p: PeerPath) -> anyhow::Result<Ipv4Addr> {
        let (via, oif) = virtualization::next_hop(&self.handle, p.real).await?;
        if oif != self.uplink.index {
            bail!(
                "{} is routed through another interface than the uplink {};                  PVC only masquerades on the uplink",
                p.real,
                self.uplink.name
            );
        }
        virtualization::set_peer_route(
            &self.handle,
            member.virtual_ip,
            via,
            self.uplink.index,
            self.config.virtual_ip,
        )
        .await?;
        self.datapath
            .maps
            .set_peer(member.virtual_ip, p.real, p.technique)?;
        info!(name = member.name, virtual_ip = %member.virtual_ip, real = %p.real, %via,
              technique = p.technique.name(), "path to member installed");
        Ok(via)
    }

    async fn uninstall(&mut self, vip: Ipv4Addr) {
        if let Err(e) = self.datapath.maps.remove_peer(vip) {
            warn!("{e:#}");
        }
        if let Err(e) = virtualization::remove_peer_route(&self.handle, vip).await {
            warn!("{e:#}");
        }
    }

    /// A member left: new flows to it are refused at once. Its route stays
    /// while established flows use it (a broker outage must not cut them).
    fn forget(&mut self, vip: Ipv4Addr) {
        if self.peers.remove(&vip).is_some_and(|p| p.via.is_some()) {
            self.retained_routes.insert(vip);
        }
        if let Err(e) = self.datapath.maps.remove_peer(vip) {
            warn!("{e:#}");
        }
    }

    /// Ends grace periods and removes routes no flow uses any more.
    async fn expire_members(&mut self, active: &BTreeSet<Ipv4Addr>) {
        let absent: Vec<Ipv4Addr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.absent_since.is_some_and(|t| t.elapsed() > ABSENCE_GRACE))
            .map(|(vip, _)| *vip)
            .collect();
        for vip in absent {
            info!(%vip, "member no longer listed by the broker");
            self.forget(vip);
        }
        let inherited: Vec<Ipv4Addr> = self
            .inherited
            .iter()
            .filter(|(_, t)| t.elapsed() > ABSENCE_GRACE)
            .map(|(vip, _)| *vip)
            .collect();
        for vip in inherited {
            self.inherited.remove(&vip);
            self.forget(vip);
            self.retained_routes.insert(vip);
        }
        let unused: Vec<Ipv4Addr> = self
            .retained_routes
            .iter()
            .filter(|vip| {
                !active.contains(vip)
                    && !self.peers.contains_key(vip)
                    && !self.inherited.contains_key(vip)
            })
            .copied()
            .collect();
        for vip in unused {
            self.retained_routes.remove(&vip);
            if let Err(e) = virtualization::remove_peer_route(&self.handle, vip).await {
                warn!("{e:#}");
            }
        }
    }

    /// Follows changes of the host's routing (a new gateway, a moved LAN).
    async fn refresh_next_hops(&mut self) {
        let current: Vec<(Member, PeerPath, Option<Ipv4Addr>)> = self
            .peers
            .values()
            .filter_map(|p| p.path.map(|path| (p.member.clone(), path, p.via)))
            .collect();
        for (member, path, via) in current {
            let now = virtualization::next_hop(&self.handle, path.real)
                .await
                .ok()
                .map(|(v, _)| v);
            if now != via {
                info!(name = member.name, "next hop changed ({via:?} -> {now:?})");
                if let Some(p) = self.peers.get_mut(&member.virtual_ip) {
                    p.via = None;
                }
                self.learn(member).await;
            }
        }
    }

    fn on_event(&mut self, event: FlowEvent) {
        match event {
            FlowEvent::Opened {
                proto,
                outbound,
                local,
                remote,
                technique,
            } => {
                let technique = technique.map_or("unknown", |t| t.name());
                *self.flows_opened.entry(technique.to_string()).or_default() += 1;
                debug!(proto, outbound, %local, %remote, technique, "flow opened");
            }
            FlowEvent::Refused { pid, remote, .. } => {
                if self.refusals_logged < 20 {
                    self.refusals_logged += 1;
                    warn!(pid, %remote, "refused connect(): no member has virtual address {}", remote.ip());
                } else {
                    self.refusals_unlogged += 1;
                }
            }
        }
    }

    fn status(&self) -> Status {
        Status {
            instance: self.config.instance.clone(),
            cluster: self.config.cluster.clone(),
            name: self.config.name.clone(),
            virtual_ip: self.config.virtual_ip,
            uplink: self.uplink.name.clone(),
            real_ip: self.real_ip,
            advertised: self.advertised.clone(),
            broker: self.broker.clone(),
            peers: self
                .peers
                .values()
                .map(|p| PeerStatus {
                    name: p.member.name.clone(),
                    virtual_ip: p.member.virtual_ip,
                    addresses: p.member.addresses.clone(),
                    path: p.path.map(|p| (p.real, p.technique.name().to_string())),
                })
                .collect(),
            flows: self.datapath.maps.flows(),
            flows_opened: self.flows_opened.clone(),
            drops: self
                .datapath
                .maps
                .drops()
                .into_iter()
                .map(|(r, n)| (r.name().to_string(), n))
                .collect(),
            traffic: self.datapath.maps.counters(),
            programs: self
                .datapath
                .program_stats()
                .into_iter()
                .map(|(name, ns, count)| (name, (ns, count)))
                .collect(),
        }
    }

    /// Undoes everything, in reverse order: host configuration (so nothing
    /// is routed to 240/4 any more), then the data path and the socket.
    async fn teardown(self) -> anyhow::Result<()> {
        let Agent {
            config,
            handle,
            uplink,
            datapath,
            ..
        } = self;
        let net = virtualization::deconfigure(&handle, Some(uplink.index), config.virtual_ip).await;
        let pins = datapath.remove();
        let _ = std::fs::remove_file(config.control_socket());
        net.and(pins)?;
        info!("agent stopped; virtual address, route and eBPF programs removed");
        Ok(())
    }
}
