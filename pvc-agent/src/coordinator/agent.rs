//! The agent: carries out what the core decides (kernel entries, routes,
//! packets, broker messages) and feeds it what happens (broker messages,
//! kernel events, time).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use pvc_common::DropReason;
use pvc_proto::{BrokerMessage, unix_now};
use rtnetlink::Handle;
use tokio::{sync::mpsc, time::interval};
use tracing::{debug, info, warn};

use super::{
    broker::{BrokerEvent, Outgoing},
    core::{Core, Effect},
    lifecycle::{Tasks, verify_own_record},
    members::Welcome,
};
use crate::{
    config::Config,
    control::Request,
    interposition::{
        self, Datapath, FlowEvent, Timeouts,
        inject::{Injector, Syn, SynAck},
    },
    security::policy::PolicyEntry,
    virtualization::{self, Uplink},
};

/// How often the host's default route and uplink address are checked
/// (`uplink = "auto"`).
const NETWORK_CHECK: Duration = Duration::from_secs(1);
/// How often next hops are checked against the host's routing table.
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(30);
/// How often exchanges and sessions are checked for timeouts and expiry.
const SECURITY_TICK: Duration = Duration::from_millis(500);
/// How often events the kernel writes without waking the agent (new flows)
/// are read; the ring holds thousands, so none is lost between reads.
const QUIET_EVENTS_TICK: Duration = Duration::from_millis(250);
/// Refusals logged one by one per GC pass; the rest are counted.
const REFUSALS_LOGGED: u32 = 20;
/// How often the brokers are asked again what reaches this host.
pub(super) const REPROBE: Duration = Duration::from_secs(300);
/// A probe a broker has not answered in this long is asked of another.
pub(super) const PROBE_PATIENCE: Duration = Duration::from_secs(3);

pub(super) struct Agent {
    pub config: Config,
    pub core: Core,
    pub handle: Handle,
    pub uplink: Uplink,
    pub datapath: Datapath,
    pub outgoing: mpsc::Sender<Outgoing>,
    pub injector: Injector,
    /// The next hop each member's route uses now.
    pub vias: BTreeMap<Ipv4Addr, Ipv4Addr>,
    pub installed_policy: BTreeSet<PolicyEntry>,
    pub flows_opened: BTreeMap<String, u64>,
    /// What the agent did with refused SYNs (`pvc status`).
    pub counters: BTreeMap<&'static str, u64>,
    pub refusals_logged: u32,
    pub refusals_unlogged: u64,
    /// The last refusal a broker answered, for `pvc status`.
    pub broker_refusal: Option<String>,
    /// What this host knows of its network.
    pub discovery: crate::connectivity::discovery::Discovery,
    /// When the brokers were last asked to probe this host.
    pub probed_at: Option<Instant>,
    /// ...and which one.
    pub probed_via: Option<String>,
    /// The UPnP gateway's forward of the PVC port, if one was granted.
    pub upnp: Option<crate::connectivity::upnp::Mapping>,
    /// Flows carried by a broker's relay.
    pub relaying: super::relay::Relaying,
    /// Where the configuration is read again on SIGHUP.
    pub config_path: std::path::PathBuf,
    /// Whether the service manager was told the agent is ready.
    pub ready_told: bool,
    /// This host's own membership as the kernel knows it (`STANDING_*`).
    pub standing: u8,
    /// The virtual DNS, when enabled.
    pub dns: Option<virtualization::dns::Dns>,
}

impl Agent {
    /// Carries out effects, in order; outcomes that the core must know
    /// (an installed or failed path) may bring more.
    pub async fn apply(&mut self, effects: Vec<Effect>) {
        let mut queue: std::collections::VecDeque<Effect> = effects.into();
        while let Some(effect) = queue.pop_front() {
            queue.extend(self.apply_one(effect).await);
        }
    }

    async fn apply_one(&mut self, effect: Effect) -> Vec<Effect> {
        match effect {
            Effect::SetPeer(vip, path) => {
                let path = self.translated(path);
                if let Err(e) = self.datapath.maps.set_peer(vip, path) {
                    warn!("{e:#}");
                }
            }
            Effect::RemovePeer(vip) => {
                if let Err(e) = self.datapath.maps.remove_peer(vip) {
                    warn!("{e:#}");
                }
            }
            Effect::Install {
                session,
                path,
                then,
            } => {
                let vip = session.peer;
                let result = async {
                    if path.technique == pvc_common::Technique::Relay {
                        self.vias.remove(&vip);
                        virtualization::set_relay_route(&self.handle, vip, self.config.virtual_ip)
                            .await?;
                    } else {
                        self.route(vip, session.peer_real).await?;
                    }
                    let entry = self.translated(super::core::kernel_path(&session, &path, false));
                    self.datapath.maps.set_peer(vip, entry)
                }
                .await;
                return match result {
                    Ok(()) => {
                        if let Some((via, message)) = then {
                            self.send(vip, via, &message);
                        }
                        self.core.installed(session, Instant::now())
                    }
                    Err(e) => self
                        .core
                        .install_failed(vip, &format!("{e:#}"), Instant::now()),
                };
            }
            Effect::Route { vip, real } => {
                if let Err(e) = self.route(vip, real).await {
                    warn!(%vip, "cannot route to the member: {e:#}");
                }
            }
            Effect::RelayRoute(vip) => {
                self.vias.remove(&vip);
                if let Err(e) =
                    virtualization::set_relay_route(&self.handle, vip, self.config.virtual_ip).await
                {
                    warn!(%vip, "cannot route the member through the relay: {e:#}");
                }
            }
            Effect::AcceptRelay(a) => self.accept_relay(a),
            Effect::RemoveRoute(vip) => {
                self.vias.remove(&vip);
                if let Err(e) = virtualization::remove_peer_route(&self.handle, vip).await {
                    warn!("{e:#}");
                }
            }
            Effect::InstallFlow {
                key,
                to,
                twin_flags,
            } => {
                if self.datapath.maps.wire_tuple_taken(&key, &to) {
                    // Its SYN then meets the running flow's socket on
                    // egress and is refused (ECONNREFUSED).
                    warn!(
                        peer = %Ipv4Addr::from(to.peer),
                        "a traversal's flow would take the ports on the wire of a flow that runs: not installed"
                    );
                } else if let Err(e) = self.datapath.maps.install_flow(key, to, twin_flags) {
                    warn!("{e:#}");
                }
            }
            Effect::ServeTraversal(flow) => self.serve_traversal(*flow),
            Effect::SendPacket(packet) => {
                if let Err(e) = self.injector.send_packet(&packet) {
                    warn!("cannot send a packet of a traversal: {e}");
                }
            }
            Effect::Resend(packet) => {
                if let Err(e) = self.injector.resend(&packet) {
                    warn!("cannot re-send a held packet: {e}");
                }
            }
            Effect::Refuse(packet) => {
                if let Some(syn) = Syn::parse(&packet) {
                    debug!(src = %syn.saddr, port = syn.sport, "refusing a held SYN");
                }
                let _ = self.injector.refuse(&packet);
            }
            Effect::Send { to, via, message } => self.send(to, via, &message),
            Effect::EndConnections(vip) => {
                end_connections(&["dst", &vip.to_string()]);
                self.end_socket_flows(|p| Ipv4Addr::from(p.vpeer) == vip);
            }
            Effect::CloseFlows(vip) => {
                let n = self.datapath.maps.close_flows_with(vip);
                if n > 0 {
                    info!(%vip, entries = n, "cut the member's established flows");
                }
                // Flows translated at the socket have no entry to cut:
                // their sockets end.
                self.end_socket_flows(|p| Ipv4Addr::from(p.vpeer) == vip);
            }
            Effect::Policy(compiled) => {
                // Entries first, then the switch that makes the kernel consult them.
                let result = self
                    .datapath
                    .maps
                    .set_policy(&mut self.installed_policy, &compiled.entries)
                    .and_then(|()| {
                        self.datapath.maps.set_identity(
                            self.config.virtual_ip,
                            self.core.identity().real_ip,
                            &compiled,
                        )
                    });
                if let Err(e) = result {
                    warn!("cannot update the policy in the kernel: {e:#}");
                }
            }
        }
        Vec::new()
    }

    /// Routes `vip` via the next hop of `real`, which must be on the uplink.
    async fn route(&mut self, vip: Ipv4Addr, real: Ipv4Addr) -> anyhow::Result<()> {
        let (via, oif) = virtualization::next_hop(&self.handle, real).await?;
        if oif != self.uplink.index {
            anyhow::bail!("{real} is routed through another interface than the uplink");
        }
        virtualization::set_peer_route(
            &self.handle,
            vip,
            via,
            self.uplink.index,
            self.config.virtual_ip,
        )
        .await?;
        self.vias.insert(vip, via);
        Ok(())
    }

    fn send(&self, to: Ipv4Addr, via: Option<String>, message: &pvc_proto::handshake::Handshake) {
        let msg = pvc_proto::AgentMessage::Relay {
            to,
            payload: message.encode(),
        };
        if self
            .outgoing
            .try_send(Outgoing { broker: via, msg })
            .is_err()
        {
            warn!(%to, "cannot queue a handshake message for the broker");
        }
    }

    pub async fn on_broker(&mut self, event: BrokerEvent) -> anyhow::Result<()> {
        let now = Instant::now();
        let effects = match event {
            BrokerEvent::Connected {
                broker,
                observed,
                you,
                revocations,
                policy,
                members,
            } => {
                self.broker_refusal = None;
                let own = verify_own_record(
                    &self.core.trust,
                    &self.core.identity().key,
                    &self.config,
                    &you,
                )?;
                let welcome = Welcome {
                    broker: broker.clone(),
                    observed,
                    own,
                    revocations: revocations.as_ref(),
                    policy: policy.as_ref(),
                    members: &members,
                };
                let effects = self.core.welcome(welcome, now, unix_now());
                self.site_after_welcome(&broker).await;
                effects
            }
            BrokerEvent::Message { broker, msg } => match msg {
                BrokerMessage::Joined(m) => self.core.joined(&broker, &m, now, unix_now()),
                BrokerMessage::Left { virtual_ip, clean } => {
                    self.core.left(&broker, virtual_ip, clean, now)
                }
                BrokerMessage::Relayed { from, payload } => {
                    self.core.relayed(from, Some(&broker), &payload, now)
                }
                BrokerMessage::Undeliverable { to } => self.core.undeliverable(to, now),
                BrokerMessage::Revocations(r) => self.core.revocations(&r),
                BrokerMessage::Policy(p) => self.core.global_policy(&p),
                BrokerMessage::ProbeResult { nonce, reached } => {
                    self.probe_result(nonce, reached).await;
                    Vec::new()
                }
                other => {
                    debug!(?other, "ignoring a broker message");
                    Vec::new()
                }
            },
            BrokerEvent::Disconnected {
                broker,
                reason,
                refusal,
            } => {
                if refusal.is_some() {
                    self.broker_refusal = Some(reason);
                }
                self.core.disconnected(&broker, now);
                Vec::new()
            }
        };
        self.apply(effects).await;
        Ok(())
    }

    pub async fn on_event(&mut self, event: FlowEvent) {
        let now = Instant::now();
        match event {
            FlowEvent::Opened {
                proto,
                outbound,
                local,
                remote,
                technique,
            } => {
                if outbound && technique.is_some_and(|t| t.per_flow()) {
                    let effects = self
                        .core
                        .traversed(*remote.ip(), local.port(), Instant::now());
                    self.apply(effects).await;
                }
                let technique = technique.map_or("unknown", |t| t.name());
                *self.flows_opened.entry(technique.to_string()).or_default() += 1;
                debug!(proto, outbound, %local, %remote, technique, "flow opened");
            }
            FlowEvent::Refused {
                pid,
                remote,
                reason,
                ..
            } => {
                let why = reason.map_or("refused", DropReason::explain);
                self.log_refusal(format_args!(
                    "refused connect() of pid {pid} to {remote}: {why}"
                ));
            }
            FlowEvent::InboundRefused {
                claimed,
                real,
                local_port,
                reason,
            } => {
                if matches!(reason, Some(DropReason::TagMismatch | DropReason::BadTag)) {
                    let effects = self.core.tag_refused(claimed, real, now);
                    self.apply(effects).await;
                }
                let why = match reason {
                    Some(DropReason::TagMismatch) | None => {
                        format!("{claimed} has no authenticated path from {real}")
                    }
                    Some(r) => r.explain().to_string(),
                };
                self.log_refusal(format_args!("refused a flow to port {local_port} claiming to be {claimed}, from {real}: {why}"));
            }
            FlowEvent::Held { peer, packet } => {
                let effects = self.core.held(peer, packet, now);
                self.apply(effects).await;
            }
            FlowEvent::PacketRefused { reason, packet } => self.on_refused_packet(reason, packet),
            FlowEvent::Punch { packet } => {
                let effects = self.core.punch_arrived(&packet);
                self.apply(effects).await;
            }
            FlowEvent::AnswerHeld { packet } => {
                let effects = self.core.answer_held(&packet, now);
                self.apply(effects).await;
            }
        }
    }

    /// A SYN tc refused: answered with a RST (the connect() behind it
    /// fails at once), and explained.
    fn on_refused_packet(&mut self, reason: Option<DropReason>, packet: Option<Vec<u8>>) {
        let Some(packet) = packet else { return };
        let flow = match (Syn::parse(&packet), SynAck::parse(&packet)) {
            (Some(s), _) => format!("{}:{} -> {}:{}", s.saddr, s.sport, s.daddr, s.dport),
            (None, Some(a)) => format!("{}:{} -> {}:{}", a.daddr, a.dport, a.saddr, a.sport),
            (None, None) => return,
        };
        match self.injector.refuse(&packet) {
            Ok(()) => *self.counters.entry("refused_syns_answered").or_default() += 1,
            Err(e) => warn!("cannot answer a refused SYN: {e}"),
        }
        match reason {
            Some(DropReason::FlowTableFull) => {
                let max_flows = self.config.interposition.max_flows;
                self.log_refusal(format_args!(
                    "refused the new flow {flow}: the masquerading map is full ({max_flows} flows); \
                     established flows are kept. Raise interposition.max_flows"
                ))
            }
            Some(DropReason::OutsideCgroup) => {
                let cgroup = self.config.interposition.cgroup.as_ref().map_or_else(
                    || "the configured one".to_string(),
                    |c| c.display().to_string(),
                );
                self.log_refusal(format_args!(
                    "refused the flow {flow}: the process on this host that would open or \
                     accept it is outside the cgroup PVC serves ({cgroup})"
                ))
            }
            _ => self.log_refusal(format_args!(
                "refused the new connection {flow}: another live connection between the same two \
                 hosts uses its real ports on the wire (a PVC flow and a connection between real \
                 addresses picked the same ports); the established one is kept, a retry picks \
                 other ports"
            )),
        }
    }

    fn log_refusal(&mut self, what: std::fmt::Arguments<'_>) {
        if self.refusals_logged < REFUSALS_LOGGED {
            self.refusals_logged += 1;
            warn!("{what}");
        } else {
            self.refusals_unlogged += 1;
        }
    }

    /// Warns while the masquerading map is nearly full: at capacity, new
    /// flows are refused.
    fn warn_if_flow_table_fills(&self) {
        let capacity = self.datapath.maps.capacity as usize;
        let used = self.datapath.maps.flow_entries();
        if used * 10 >= capacity * 9 {
            warn!(
                used,
                capacity,
                "the masquerading map is {}% full; new flows are refused when it is full: raise \
                 interposition.max_flows (now {})",
                used * 100 / capacity.max(1),
                self.config.interposition.max_flows
            );
        }
    }

    /// Follows changes of the host's routing (a new gateway, a moved LAN).
    async fn refresh_next_hops(&mut self) {
        for (vip, real) in self.core.routed_sessions() {
            match virtualization::next_hop(&self.handle, real).await {
                Ok((now, oif)) if self.vias.get(&vip) != Some(&now) && oif == self.uplink.index => {
                    info!(%vip, "next hop of {real} is now {now}");
                    if let Err(e) = self.route(vip, real).await {
                        warn!(%vip, "cannot update the route: {e:#}");
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(%vip, "cannot check the route to {real}: {e:#}"),
            }
        }
    }

    /// The GC pass: ended flows out of the map, expired members out of the
    /// core, the refusal log's budget renewed.
    async fn collect_garbage(&mut self, timeouts: &Timeouts) {
        let (removed, active) = self.datapath.maps.collect_garbage(timeouts);
        if removed > 0 {
            debug!(removed, "expired flow entries removed");
        }
        let removed = self.datapath.maps.collect_socket_garbage();
        if removed > 0 {
            debug!(
                removed,
                "entries of socket-level flows without a socket removed"
            );
        }
        self.core.set_active(active);
        self.warn_if_flow_table_fills();
        let effects = self.core.expire(Instant::now(), unix_now());
        self.apply(effects).await;
        if self.refusals_unlogged > 0 {
            warn!(
                "{} more refusals not logged one by one",
                self.refusals_unlogged
            );
        }
        self.refusals_logged = 0;
        self.refusals_unlogged = 0;
    }

    /// Runs until SIGINT/SIGTERM or a fatal error.
    pub async fn serve(
        &mut self,
        mut events: interposition::EventStream,
        tasks: &mut Tasks,
        probes: super::site::ProbeSockets,
        mut upnp_rx: mpsc::Receiver<anyhow::Result<crate::connectivity::upnp::Mapping>>,
    ) -> anyhow::Result<super::Ending> {
        let mut gc = interval(self.config.gc_interval());
        let mut network = interval(NETWORK_CHECK);
        let lease = Duration::from_secs(self.config.connectivity.upnp_lease_secs.into());
        let mut upnp_renewal = interval(lease / 2);
        let mut probe_check = interval(crate::connectivity::discovery::DATAGRAM_GRACE / 2);
        let mut datagram = [0u8; 64];
        let mut refresh = interval(NEXT_HOP_REFRESH);
        let mut security = interval(SECURITY_TICK);
        let mut quiet_events = interval(QUIET_EVENTS_TICK);
        let watchdog_period = super::service::watchdog_period();
        let mut watchdog = interval(watchdog_period.unwrap_or(Duration::from_secs(3600)));
        self.tell_service_manager();
        let timeouts = self.config.flows.timeouts();

        loop {
            tokio::select! {
                Some(event) = tasks.broker_rx.recv() => {
                    self.on_broker(event).await?;
                    self.check_standing();
                    self.sync_dns();
                    self.tell_service_manager();
                }
                batch = events.next_batch() => {
                    for e in batch.context("cannot read kernel events")? {
                        self.on_event(e).await;
                    }
                }
                Some((request, reply)) = tasks.query_rx.recv() => {
                    let Request::Status = request;
                    // The status counts every flow opened so far.
                    for e in events.drain() {
                        self.on_event(e).await;
                    }
                    let _ = reply.send(self.status());
                }
                _ = quiet_events.tick() => {
                    if let Err(e) = self.datapath.maps.tick_clock() {
                        warn!("{e:#}: flows may look idle to the clean-up pass");
                    }
                    for e in events.drain() {
                        self.on_event(e).await;
                    }
                }
                _ = gc.tick() => {
                    // Members whose record expired go here.
                    self.collect_garbage(&timeouts).await;
                    self.sync_dns();
                    self.tell_service_manager();
                }
                _ = watchdog.tick(), if watchdog_period.is_some() => {
                    super::service::notify(&[sd_notify::NotifyState::Watchdog]);
                }
                _ = tasks.hangup.recv() => self.reload(tasks).await,
                _ = security.tick() => {
                    let effects = self.core.check_sessions(Instant::now());
                    self.apply(effects).await;
                    self.check_standing();
                }
                _ = refresh.tick() => self.refresh_next_hops().await,
                Ok((n, _)) = probes.udp.recv_from(&mut datagram) => {
                    self.probe_datagram(&datagram[..n]).await;
                }
                // A broker's TCP probe: reaching us was the point.
                Ok(_) = probes.tcp.accept() => {}
                Some(result) = upnp_rx.recv() => self.upnp_done(result).await,
                Ok((app, _)) = self.relaying.listener.accept() => self.relay_accepted(app).await,
                Some((id, result)) = self.relaying.done_rx.recv() => self.relay_done(id, result),
                _ = upnp_renewal.tick() => self.renew_upnp().await,
                _ = probe_check.tick() => self.check_probe().await,
                r = &mut tasks.control => return match r {
                    Ok(Err(e)) => Err(e),
                    _ => Err(anyhow::anyhow!("control socket stopped")),
                },
                _ = network.tick(), if self.config.interposition.uplink == virtualization::AUTO_UPLINK => {
                    if let Some(why) = self.network_moved().await {
                        warn!("{why}: starting over on the host's new network; flows over the old one end");
                        end_virtual_connections(self.config.virtual_ip);
                        self.end_socket_flows(|_| true);
                        return Ok(super::Ending::NetworkMoved);
                    }
                }
                _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); return Ok(super::Ending::Stopped) }
                _ = tasks.term.recv() => { info!("SIGTERM: stopping"); return Ok(super::Ending::Stopped) }
            }
        }
    }

    /// Whether the host moved: the default route on another interface, or
    /// the uplink without the address this agent registered with. `None`
    /// while the network is not usable (no default route, no address yet:
    /// a DHCP renewal, a resume): the agent waits for the new one.
    async fn network_moved(&self) -> Option<String> {
        let now = virtualization::resolve_uplink(&self.handle, &self.config.interposition.uplink)
            .await
            .ok()?;
        let first = now.networks.first()?.address;
        let real = self.core.identity().real_ip;
        if now.index != self.uplink.index {
            Some(format!(
                "the default route moved from {} to {} ({first})",
                self.uplink.name, now.name
            ))
        } else if !now.networks.iter().any(|n| n.address == real) {
            Some(format!("{} has {first} instead of {real}", now.name))
        } else {
            None
        }
    }

    /// The virtual DNS answers with the members known now.
    pub fn sync_dns(&mut self) {
        if let Some(dns) = self.dns.as_mut() {
            dns.set_names(self.core.member_names());
        }
    }

    /// Undoes everything, in reverse order: host configuration (so nothing
    /// is routed to 240/4 any more), then the data path and the socket.
    pub async fn teardown(self) -> anyhow::Result<()> {
        let Agent {
            config,
            handle,
            uplink,
            datapath,
            upnp,
            dns,
            ..
        } = self;
        if let Some(dns) = dns {
            dns.stop(&handle).await;
        }
        if let Some(m) = upnp {
            // Bounded: a gateway that stopped answering must not hold the stop.
            let _ = tokio::time::timeout(Duration::from_secs(3), m.remove()).await;
        }
        let net = virtualization::deconfigure(&handle, Some(uplink.index), config.virtual_ip).await;
        let pins = datapath.remove();
        let _ = std::fs::remove_file(config.control_socket());
        net.and(pins)?;
        info!("agent stopped; virtual address, routes and eBPF programs removed");
        Ok(())
    }
}

impl Agent {
    /// A member's kernel path, marked for translation at the socket when
    /// the configuration asks for it (the programs translate a flow there
    /// only when its tuple on the wire is one a socket can have).
    fn translated(&self, mut path: pvc_common::PeerPath) -> pvc_common::PeerPath {
        if self.config.interposition.translation == crate::config::Translation::Socket {
            path.flags |= pvc_common::PATH_SOCKET;
        }
        path
    }

    /// A member's SYN for a flow it opens with a traversal, into our stack:
    /// at the socket when we translate there and a listener takes our real
    /// address (nothing of the flow is rewritten here then), else with the
    /// flow's entries, masqueraded per packet.
    fn serve_traversal(&mut self, flow: super::traversal::ServedFlow) {
        if self.datapath.maps.wire_tuple_taken(&flow.key, &flow.to) {
            // The member's traversal times out and its connect() fails.
            warn!(peer = %Ipv4Addr::from(flow.at_socket.vpeer), client = %flow.client, "refused to serve a traversal whose ports on the wire a flow that runs holds");
            return;
        }
        let key = flow.socket_key();
        let listener = || {
            interposition::listens_on(flow.real, key.local_port).unwrap_or_else(|e| {
                warn!("cannot list this host's TCP listeners (sock_diag): {e}");
                false
            })
        };
        if self.config.interposition.translation == crate::config::Translation::Socket && listener()
        {
            match self.datapath.maps.open_at_socket(key, flow.at_socket) {
                Ok(()) => {
                    if let Err(e) = self.injector.resend(&flow.wire_syn()) {
                        warn!("cannot inject a member's SYN: {e}");
                    }
                    return;
                }
                Err(e) => warn!("{e:#}: the flow is masqueraded per packet"),
            }
        }
        if let Err(e) = self
            .datapath
            .maps
            .install_flow(flow.key, flow.to, flow.twin_flags)
        {
            warn!("{e:#}");
        }
        if let Err(e) = self.injector.resend(&flow.syn) {
            warn!("cannot inject a member's SYN: {e}");
        }
    }

    /// Ends the flows translated at the socket that `which` selects, by
    /// their tuples on the wire (their sockets show real addresses to `ss`).
    fn end_socket_flows(&self, which: impl Fn(&pvc_common::SocketPeer) -> bool) {
        for (k, _) in self
            .datapath
            .maps
            .socket_flows()
            .into_iter()
            .filter(|(_, p)| which(p))
        {
            let dst = format!("{}:{}", Ipv4Addr::from(k.peer), k.peer_port);
            let sport = format!(":{}", k.local_port);
            end_connections(&["dst", &dst, "sport", "=", &sport]);
        }
    }
}

/// Ends this host's connections over the virtual network at once (their
/// applications see ECONNABORTED): their wire tuples used an address the
/// host no longer has.
fn end_virtual_connections(virtual_ip: Ipv4Addr) {
    end_connections(&["src", &virtual_ip.to_string()]);
}

/// Ends the TCP connections `filter` (an `ss` filter) selects, through the
/// kernel's socket destruction (`ss -K`).
fn end_connections(filter: &[&str]) {
    match std::process::Command::new("ss")
        .args(["-K", "-t", "-n"])
        .args(filter)
        .output()
    {
        Ok(o) if o.status.success() => {
            let ended = String::from_utf8_lossy(&o.stdout)
                .lines()
                .count()
                .saturating_sub(1);
            if ended > 0 {
                info!(ended, filter = filter.join(" "), "connections ended");
            }
        }
        Ok(o) => warn!(
            "cannot end connections ({}): {}",
            filter.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => warn!("cannot run ss to end connections: {e}"),
    }
}
