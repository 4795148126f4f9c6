//! The coordinator (paper §4, Fig. 2): runs the peer's workflow. It sets up
//! interposition and virtualization, keeps the broker session, checks what
//! the broker relays against the master's signatures, authenticates each
//! peer before its path is used (`paths`), compiles the policies into the
//! kernel, and undoes everything on a clean stop.

pub mod broker;
mod claim;
mod paths;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use pvc_common::{PEER_MEMBER, PEER_READY, PeerPath as KernelPath, Technique};
use pvc_proto::{
    BrokerMessage, ErrorCode, MemberInfo, MembershipRecord, SignedPolicy, SignedRecord,
    SignedRevocations, unix_now,
};
use rtnetlink::Handle;
use tokio::{
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, interval},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use self::{
    broker::{BrokerEvent, Identity, Relay},
    paths::Peer,
};
use crate::{
    config::Config,
    connectivity,
    control::{self, PeerStatus, Query, Request, Status},
    interposition::{
        self, Attachment, Datapath, FlowEvent, Timeouts,
        inject::{Injector, Syn},
    },
    security::{
        challenge::Session,
        keys::KeyPair,
        membership::{Member, Trust},
        policy::{self, Compiled, LocalPolicy, PolicyEntry, Subject},
    },
    virtualization::{self, Uplink},
};

/// How long a member whose broker session was lost (or who is missing from a
/// new broker's list) keeps its path: a crashed agent restarts, and after a
/// broker failover the new broker's list fills up as agents re-register.
const ABSENCE_GRACE: Duration = Duration::from_secs(20);
/// How often next hops are checked against the host's routing table.
const NEXT_HOP_REFRESH: Duration = Duration::from_secs(30);
/// How often exchanges and sessions are checked for timeouts and expiry.
const SECURITY_TICK: Duration = Duration::from_millis(500);
/// How often events the kernel writes without waking the agent (new flows)
/// are read; the ring holds thousands, so none is lost between reads.
const QUIET_EVENTS_TICK: Duration = Duration::from_millis(250);

struct Agent {
    config: Config,
    handle: Handle,
    uplink: Uplink,
    real_ip: Ipv4Addr,
    advertised: Vec<Ipv4Addr>,
    datapath: Datapath,
    key: Arc<KeyPair>,
    trust: Trust,
    /// This host's own record, once a broker handed it over and it verified.
    own: Option<Member>,
    local_policy: LocalPolicy,
    compiled: Compiled,
    installed_policy: BTreeSet<PolicyEntry>,
    peers: BTreeMap<Ipv4Addr, Peer>,
    /// Paths found in the kernel at start (left by a previous agent): kept
    /// until the broker confirms the member or the grace period ends.
    inherited: BTreeMap<Ipv4Addr, (Instant, KernelPath)>,
    /// Routes of members that left, kept while flows still use them.
    retained_routes: BTreeSet<Ipv4Addr>,
    broker: Option<String>,
    relays: mpsc::Sender<Relay>,
    injector: Injector,
    /// Peers with flows in the masquerading map, as of the last GC pass.
    active: BTreeSet<Ipv4Addr>,
    flows_opened: BTreeMap<String, u64>,
    /// What the agent did with packets the kernel handed it (`pvc status`).
    counters: BTreeMap<&'static str, u64>,
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

/// What an agent learns about its host before it touches anything of it.
struct HostSetup {
    cgroup: PathBuf,
    key: Arc<KeyPair>,
    local_policy: LocalPolicy,
    handle: Handle,
    uplink: Uplink,
    real_ip: Ipv4Addr,
    advertised: Vec<Ipv4Addr>,
    injector: Injector,
}

impl HostSetup {
    /// Checks the configuration against the host; changes nothing but the
    /// host key (created on the first start) and bpffs (mounted if absent).
    async fn prepare(config: &Config) -> anyhow::Result<Self> {
        let cgroup = config
            .interposition
            .cgroup
            .clone()
            .unwrap_or_else(default_cgroup);
        check_cgroup(&cgroup)?;
        let key = Arc::new(KeyPair::load_or_create(&config.key_file)?);
        let local_policy = config.policy.parse()?;
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
        pvc_proto::validate_addresses(&advertised)
            .context("cannot register with these addresses")?;
        let injector = Injector::new().context("cannot open a raw socket (needs CAP_NET_RAW)")?;
        interposition::ensure_bpffs(&config.interposition.bpffs)?;
        Ok(Self {
            cgroup,
            key,
            local_policy,
            handle,
            uplink,
            real_ip,
            advertised,
            injector,
        })
    }
}

/// The agent's channels to its tasks: the broker sessions, the control
/// socket, and the signals that stop it.
struct Tasks {
    broker_rx: mpsc::Receiver<BrokerEvent>,
    relays: mpsc::Sender<Relay>,
    brokers: JoinHandle<()>,
    leave: CancellationToken,
    query_rx: mpsc::Receiver<Query>,
    control: JoinHandle<anyhow::Result<()>>,
    term: tokio::signal::unix::Signal,
}

impl Tasks {
    fn start(config: &Config, identity: Identity) -> anyhow::Result<Self> {
        let (event_tx, broker_rx) = mpsc::channel(256);
        let (relays, relay_rx) = mpsc::channel(256);
        let leave = CancellationToken::new();
        let brokers = tokio::spawn(broker::run(
            config.broker_addresses(),
            identity,
            event_tx,
            relay_rx,
            leave.clone(),
        ));
        let (query_tx, query_rx) = mpsc::channel::<Query>(16);
        let control = tokio::spawn(control::serve(config.control_socket(), query_tx));
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        Ok(Self {
            broker_rx,
            relays,
            brokers,
            leave,
            query_rx,
            control,
            term,
        })
    }

    /// Tells the broker this member leaves (members may forget it at once,
    /// rather than wait for it), then ends the tasks.
    async fn stop(mut self) {
        self.leave.cancel();
        if tokio::time::timeout(Duration::from_secs(2), &mut self.brokers)
            .await
            .is_err()
        {
            self.brokers.abort();
        }
        self.control.abort();
    }
}

/// What ended the wait for a broker's word on this host's membership.
enum Admission {
    /// A broker vouched for this host: its welcome, to be acted on.
    Admitted(BrokerEvent),
    /// SIGINT or SIGTERM.
    Stopped,
}

/// Runs the agent until SIGINT/SIGTERM, then removes everything it set up.
///
/// The instance is claimed before anything else. A fresh agent attaches its
/// data path only once a broker has handed over this host's record and it
/// checks against the master key: an agent that cannot join its cluster
/// (not admitted, another cluster's key) leaves the host as it was. An agent
/// that finds its predecessor's pins (a crash, an upgrade) takes them over at
/// once, so established flows never wait for a broker.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let _claim = claim::Claim::take(&config)?;
    let host = HostSetup::prepare(&config).await?;
    let trust = Trust::new(config.master_key);
    let identity = Identity {
        cluster: trust.cluster,
        key: Arc::clone(&host.key),
        addresses: host.advertised.clone(),
        software: format!("pvc-agent {}", env!("CARGO_PKG_VERSION")),
    };
    let mut tasks = Tasks::start(&config, identity)?;
    let welcome = if interposition::has_pins(&config.pin_dir()) {
        info!(pins = %config.pin_dir().display(), "taking over the data path a previous agent left");
        None
    } else {
        match wait_for_admission(&config, &host, &trust, &mut tasks).await {
            Ok(Admission::Admitted(welcome)) => Some(welcome),
            Ok(Admission::Stopped) => {
                tasks.stop().await;
                let _ = std::fs::remove_file(config.control_socket());
                return Ok(());
            }
            Err(e) => {
                tasks.stop().await;
                let _ = std::fs::remove_file(config.control_socket());
                return Err(e);
            }
        }
    };

    let attachment = Attachment {
        pin_dir: config.pin_dir(),
        uplink: host.uplink.name.clone(),
        uplink_index: host.uplink.index,
        cgroup: host.cgroup.clone(),
        max_flows: config.interposition.max_flows,
    };
    let mut datapath = match Datapath::start(&attachment) {
        Ok(d) => d,
        Err(e) => {
            let _ = interposition::remove_instance(&attachment.pin_dir);
            tasks.stop().await;
            let _ = std::fs::remove_file(config.control_socket());
            return Err(e);
        }
    };
    let events = datapath.take_events().expect("events are taken once");
    let cgroup = host.cgroup.clone();
    let mut agent = Agent {
        config,
        handle: host.handle,
        uplink: host.uplink,
        real_ip: host.real_ip,
        advertised: host.advertised,
        datapath,
        key: host.key,
        trust,
        own: None,
        local_policy: host.local_policy,
        compiled: Compiled::default(),
        installed_policy: BTreeSet::new(),
        peers: BTreeMap::new(),
        inherited: BTreeMap::new(),
        retained_routes: BTreeSet::new(),
        broker: None,
        relays: tasks.relays.clone(),
        injector: host.injector,
        active: BTreeSet::new(),
        flows_opened: BTreeMap::new(),
        counters: BTreeMap::new(),
        refusals_logged: 0,
        refusals_unlogged: 0,
    };
    let mut result = agent.configure().await;
    if result.is_ok() {
        info!(
            name = agent.config.name,
            virtual_ip = %agent.config.virtual_ip,
            real_ip = %agent.real_ip,
            uplink = agent.uplink.name,
            cluster = %agent.trust.cluster,
            host_key = %agent.key.public,
            cgroup = %cgroup.display(),
            pins = %agent.datapath.pin_dir().display(),
            "agent ready"
        );
        if let Some(welcome) = welcome {
            result = agent.on_broker(welcome).await;
        }
    }
    if result.is_ok() {
        result = agent.serve(events, &mut tasks).await;
    }
    tasks.stop().await;
    let teardown = agent.teardown().await;
    result.and(teardown)
}

/// Waits until a broker hands over this host's record and it checks, while
/// answering `pvc status` and signals. Fails when the record names another
/// host or address than the configuration, and when every broker serves
/// other clusters only (the master key is another cluster's).
async fn wait_for_admission(
    config: &Config,
    host: &HostSetup,
    trust: &Trust,
    tasks: &mut Tasks,
) -> anyhow::Result<Admission> {
    info!(
        name = config.name,
        cluster = %trust.cluster,
        host_key = %host.key.public,
        "waiting for a broker to confirm this host's membership before attaching the data path"
    );
    let brokers: BTreeSet<String> = config.broker_addresses().into_iter().collect();
    let mut foreign = BTreeMap::new();
    loop {
        tokio::select! {
            Some(event) = tasks.broker_rx.recv() => match event {
                BrokerEvent::Connected { ref you, .. } => {
                    if verify_own_record(trust, &host.key, config, you)?.is_some() {
                        return Ok(Admission::Admitted(event));
                    }
                }
                BrokerEvent::Disconnected { broker, reason, refusal } => {
                    if refusal == Some(ErrorCode::ForeignCluster) {
                        foreign.insert(broker, reason);
                    } else {
                        foreign.remove(&broker);
                    }
                    if foreign.len() == brokers.len() {
                        let said: Vec<String> = foreign
                            .iter()
                            .map(|(b, r)| format!("{b}: {r}"))
                            .collect();
                        bail!(
                            "wrong cluster: no broker serves cluster {} (the cluster of master_key \
                             in this agent's configuration), and every broker serves other clusters. \
                             master_key is probably another cluster's key: compare it with \
                             `pvc master show` on the cluster's master; if it is right, the master \
                             has not published to these brokers yet (`pvc master publish`). \
                             Nothing was attached. The brokers said: {}",
                            trust.cluster,
                            said.join("; ")
                        );
                    }
                }
                BrokerEvent::Message(_) => {}
            },
            Some((request, reply)) = tasks.query_rx.recv() => {
                let Request::Status = request;
                let _ = reply.send(waiting_status(config, host, trust));
            }
            r = &mut tasks.control => return Err(match r {
                Ok(Err(e)) => e,
                _ => anyhow::anyhow!("control socket stopped"),
            }),
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); return Ok(Admission::Stopped) }
            _ = tasks.term.recv() => { info!("SIGTERM: stopping"); return Ok(Admission::Stopped) }
        }
    }
}

/// The broker hands this host its own record: it must be the master's,
/// for this host key, with the name and address configured here. `None`
/// when this broker's word cannot be believed (logged); an error when the
/// master admitted this host under another name or address.
fn verify_own_record(
    trust: &Trust,
    key: &KeyPair,
    config: &Config,
    you: &SignedRecord,
) -> anyhow::Result<Option<MembershipRecord>> {
    let r = match trust.record(you, unix_now()) {
        Ok(r) => r,
        Err(e) => {
            error!(
                "the broker gave this host a record that does not check ({e}); ignoring this broker's word for it"
            );
            return Ok(None);
        }
    };
    if r.host_key != key.public {
        error!(
            "the broker gave this host another host's record ({}); ignoring it",
            r.name
        );
        return Ok(None);
    }
    if r.name != config.name || r.virtual_ip != config.virtual_ip {
        bail!(
            "the master admitted this host as {} ({}), but the configuration says {} ({}): fix name and virtual_ip",
            r.name,
            r.virtual_ip,
            config.name,
            config.virtual_ip
        );
    }
    Ok(Some(r))
}

fn waiting_status(config: &Config, host: &HostSetup, trust: &Trust) -> Status {
    Status {
        state: control::STATE_WAITING.into(),
        instance: config.instance.clone(),
        cluster: trust.cluster.to_string(),
        host_key: host.key.public.to_string(),
        name: config.name.clone(),
        virtual_ip: config.virtual_ip,
        uplink: host.uplink.name.clone(),
        real_ip: host.real_ip,
        advertised: host.advertised.clone(),
        broker: None,
        admitted: false,
        revocations_version: trust.revocations.version,
        policy_version: trust.policy.version,
        peers: Vec::new(),
        flows: Vec::new(),
        flow_capacity: config.interposition.max_flows.saturating_mul(2),
        flows_opened: BTreeMap::new(),
        agent_counters: BTreeMap::new(),
        drops: BTreeMap::new(),
        traffic: Default::default(),
        programs: BTreeMap::new(),
    }
}

/// Removes what an instance set up, without running it (after a crash, or
/// to clean a host by hand). Refuses while an agent runs the instance.
pub async fn cleanup(config: &Config) -> anyhow::Result<()> {
    let _claim = claim::Claim::take(config)?;
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
        self.recompile_policy()?;
        // A previous agent of this instance may have left paths and routes
        // (it crashed, or was upgraded): established flows keep using them
        // until the broker says who is still a member.
        let now = Instant::now();
        for (vip, path) in self.datapath.maps.peers() {
            self.inherited.insert(vip, (now, path));
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
        mut events: interposition::EventStream,
        tasks: &mut Tasks,
    ) -> anyhow::Result<()> {
        let mut gc = interval(self.config.gc_interval());
        let mut refresh = interval(NEXT_HOP_REFRESH);
        let mut security = interval(SECURITY_TICK);
        let mut quiet_events = interval(QUIET_EVENTS_TICK);
        let timeouts = Timeouts {
            idle: Duration::from_secs(self.config.flows.idle_timeout_secs),
            closed: Duration::from_secs(self.config.flows.closed_timeout_secs),
            icmp: Duration::from_secs(self.config.flows.icmp_timeout_secs),
        };

        loop {
            tokio::select! {
                Some(event) = tasks.broker_rx.recv() => self.on_broker(event).await?,
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
                    for e in events.drain() {
                        self.on_event(e).await;
                    }
                }
                _ = gc.tick() => {
                    let (removed, active) = self.datapath.maps.collect_garbage(&timeouts);
                    if removed > 0 {
                        debug!(removed, "expired flow entries removed");
                    }
                    self.active = active;
                    self.warn_if_flow_table_fills();
                    self.expire_members().await;
                    if self.refusals_unlogged > 0 {
                        warn!("{} more refusals not logged one by one", self.refusals_unlogged);
                    }
                    self.refusals_logged = 0;
                    self.refusals_unlogged = 0;
                }
                _ = security.tick() => self.check_exchanges_and_sessions().await,
                _ = refresh.tick() => self.refresh_next_hops().await,
                r = &mut tasks.control => return match r {
                    Ok(Err(e)) => Err(e),
                    _ => Err(anyhow::anyhow!("control socket stopped")),
                },
                _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); return Ok(()) }
                _ = tasks.term.recv() => { info!("SIGTERM: stopping"); return Ok(()) }
            }
        }
    }

    async fn on_broker(&mut self, event: BrokerEvent) -> anyhow::Result<()> {
        match event {
            BrokerEvent::Connected {
                broker,
                you,
                revocations,
                policy,
                members,
            } => {
                if let Some(r) = revocations {
                    self.take_revocations(&r).await;
                }
                if let Some(p) = policy {
                    self.take_policy(&p);
                }
                self.check_own_record(&you)?;
                self.broker = Some(broker);
                let now = unix_now();
                let present: BTreeSet<Ipv4Addr> = members
                    .iter()
                    .filter_map(|m| self.trust.member(m, now).ok())
                    .map(|m| m.virtual_ip)
                    .collect();
                let now_i = Instant::now();
                for (vip, peer) in self.peers.iter_mut() {
                    if !present.contains(vip) && peer.absent_since.is_none() {
                        peer.absent_since = Some(now_i);
                    }
                }
                for m in &members {
                    self.learn(m).await;
                }
            }
            BrokerEvent::Message(msg) => match msg {
                BrokerMessage::Joined(m) => self.learn(&m).await,
                BrokerMessage::Left {
                    virtual_ip,
                    clean: true,
                } => {
                    info!(%virtual_ip, "member left");
                    self.forget(virtual_ip, false).await;
                }
                // Lost, not gone: an agent restarting or a member cut from the
                // broker but not from us. Flows keep working for a grace period.
                BrokerMessage::Left {
                    virtual_ip,
                    clean: false,
                } => {
                    info!(%virtual_ip, "member lost its broker session; keeping its path for {ABSENCE_GRACE:?}");
                    if let Some(p) = self.peers.get_mut(&virtual_ip) {
                        p.absent_since.get_or_insert_with(Instant::now);
                    }
                }
                BrokerMessage::Relayed { from, payload } => self.on_relayed(from, &payload).await,
                BrokerMessage::Undeliverable { to } => {
                    self.fail_exchange(
                        to,
                        "the broker cannot reach that member (it is not connected)",
                    )
                    .await;
                }
                BrokerMessage::Revocations(r) => self.take_revocations(&r).await,
                BrokerMessage::Policy(p) => self.take_policy(&p),
                other => debug!(?other, "ignoring a broker message"),
            },
            BrokerEvent::Disconnected { .. } => self.broker = None,
        }
        Ok(())
    }

    /// The broker hands this host its own record (see `verify_own_record`).
    fn check_own_record(&mut self, you: &SignedRecord) -> anyhow::Result<()> {
        let Some(r) = verify_own_record(&self.trust, &self.key, &self.config, you)? else {
            return Ok(());
        };
        if self.own.as_ref().is_none_or(|o| o.serial != r.serial) {
            info!(serial = r.serial, groups = ?r.groups, not_after = r.not_after, "this host's membership record verified");
        }
        self.own = Some(Member::from_record(r, self.advertised.clone()));
        self.recompile_policy_or_warn();
        Ok(())
    }

    /// A member the broker relays: believed only if the master signed it.
    async fn learn(&mut self, info: &MemberInfo) {
        let member = match self.trust.member(info, unix_now()) {
            Ok(m) => m,
            Err(e) => {
                warn!("ignoring a member the broker relayed: {e}");
                return;
            }
        };
        let vip = member.virtual_ip;
        if vip == self.config.virtual_ip {
            return;
        }
        let inherited = self.inherited.remove(&vip).map(|(_, path)| path);
        let hint = connectivity::choose(&member, &self.uplink.networks);
        let changed = match self.peers.get_mut(&vip) {
            Some(p) => {
                p.absent_since = None;
                let record_changed = p.member.key != member.key || p.member.serial != member.serial;
                let path_changed = p.hint != hint;
                p.member = member.clone();
                p.hint = hint;
                if record_changed || path_changed {
                    // Proven for another key or path: prove it again.
                    info!(name = member.name, %vip, "member's record or path changed; its path will be authenticated again");
                    p.end_session();
                }
                record_changed || path_changed
            }
            None => {
                let mut peer = Peer::new(member.clone(), hint);
                // The previous agent of this instance authenticated this
                // member: its session (real address, tag key) is in the
                // pinned map, and the member still uses it.
                if let Some(path) = inherited.filter(|p| p.state == PEER_READY) {
                    let real = Ipv4Addr::from(path.real);
                    if let Ok((via, _)) = virtualization::next_hop(&self.handle, real).await {
                        info!(name = member.name, %vip, %real, "took over the authenticated path of the previous agent");
                        peer.adopt(
                            Session {
                                peer: vip,
                                peer_real: real,
                                local_real: self.real_ip,
                                tag_key: path.tag_key,
                            },
                            via,
                        );
                    }
                }
                let adopted = peer.session.is_some();
                self.peers.insert(vip, peer);
                !adopted
            }
        };
        if changed {
            self.publish_member(vip);
            self.recompile_policy_or_warn();
        }
    }

    /// Tells the kernel about a member without an authenticated path: its
    /// connects are allowed, their SYNs held for the agent.
    fn publish_member(&mut self, vip: Ipv4Addr) {
        let Some(p) = self.peers.get(&vip) else {
            return;
        };
        if p.session.is_some() {
            return;
        }
        let path = KernelPath {
            real: p.hint.map_or([0; 4], |h| h.real.octets()),
            technique: p.hint.map_or(Technique::Direct, |h| h.technique) as u8,
            state: PEER_MEMBER,
            _pad: [0; 2],
            tag_key: [0; 16],
        };
        if let Err(e) = self.datapath.maps.set_peer(vip, path) {
            warn!("{e:#}");
        }
    }

    /// A member left, was revoked or expired: new flows to it are refused at
    /// once. With `cut`, its established flows end too; otherwise its route
    /// stays while they last (a broker outage must not cut them).
    async fn forget(&mut self, vip: Ipv4Addr, cut: bool) {
        if let Some(mut p) = self.peers.remove(&vip) {
            self.refuse_held(&mut p).await;
            if p.session.is_some() {
                self.retained_routes.insert(vip);
            }
        }
        if let Err(e) = self.datapath.maps.remove_peer(vip) {
            warn!("{e:#}");
        }
        if cut {
            let n = self.datapath.maps.close_flows_with(vip);
            if n > 0 {
                info!(%vip, entries = n, "cut the member's established flows");
            }
        }
        self.recompile_policy_or_warn();
    }

    async fn take_revocations(&mut self, signed: &SignedRevocations) {
        match self.trust.update_revocations(signed) {
            Ok(true) => {
                let list = &self.trust.revocations;
                info!(
                    version = list.version,
                    revoked = list.serials.len(),
                    "revocation list updated"
                );
                if self
                    .own
                    .as_ref()
                    .is_some_and(|o| self.trust.is_revoked(o.serial))
                {
                    error!(
                        "the master revoked this host's own membership: no member will accept it any more"
                    );
                }
                let revoked: Vec<(Ipv4Addr, String)> = self
                    .peers
                    .values()
                    .filter(|p| self.trust.is_revoked(p.member.serial))
                    .map(|p| (p.member.virtual_ip, p.member.name.clone()))
                    .collect();
                for (vip, name) in revoked {
                    warn!(name, %vip, "member revoked by the master: refusing its flows and cutting established ones");
                    self.forget(vip, true).await;
                }
            }
            Ok(false) => {}
            Err(e) => warn!("ignoring a revocation list the broker relayed: {e}"),
        }
    }

    fn take_policy(&mut self, signed: &SignedPolicy) {
        match self.trust.update_policy(signed) {
            Ok(true) => {
                info!(
                    version = self.trust.policy.version,
                    rules = self.trust.policy.rules.len(),
                    "global policy updated"
                );
                self.recompile_policy_or_warn();
            }
            Ok(false) => {}
            Err(e) => warn!("ignoring a global policy the broker relayed: {e}"),
        }
    }

    /// Compiles local and global policy for every known member into the
    /// kernel, then updates the settings (which directions are restricted).
    fn recompile_policy(&mut self) -> anyhow::Result<()> {
        let members: Vec<Member> = self.peers.values().map(|p| p.member.clone()).collect();
        let groups = self
            .own
            .as_ref()
            .map(|o| o.groups.clone())
            .unwrap_or_default();
        let me = Subject {
            name: &self.config.name,
            groups: &groups,
        };
        let compiled = policy::compile(&self.local_policy, &self.trust.policy, &me, &members);
        // Entries first, then the switch that makes the kernel consult them.
        self.datapath
            .maps
            .set_policy(&mut self.installed_policy, &compiled.entries)?;
        self.datapath
            .maps
            .set_identity(self.config.virtual_ip, self.real_ip, &compiled)?;
        self.compiled = compiled;
        Ok(())
    }

    fn recompile_policy_or_warn(&mut self) {
        if let Err(e) = self.recompile_policy() {
            warn!("cannot update the policy in the kernel: {e:#}");
        }
    }

    /// Ends grace periods, expired records, and routes no flow uses any more.
    async fn expire_members(&mut self) {
        let now = unix_now();
        let gone: Vec<(Ipv4Addr, bool)> = self
            .peers
            .iter()
            .filter_map(|(vip, p)| {
                if p.member.not_after < now {
                    warn!(name = p.member.name, %vip, "member's record expired");
                    Some((*vip, true))
                } else if p.absent_since.is_some_and(|t| t.elapsed() > ABSENCE_GRACE) {
                    info!(name = p.member.name, %vip, "member no longer listed by the broker");
                    Some((*vip, false))
                } else {
                    None
                }
            })
            .collect();
        for (vip, cut) in gone {
            self.forget(vip, cut).await;
        }
        let inherited: Vec<Ipv4Addr> = self
            .inherited
            .iter()
            .filter(|(_, (t, _))| t.elapsed() > ABSENCE_GRACE)
            .map(|(vip, _)| *vip)
            .collect();
        for vip in inherited {
            self.inherited.remove(&vip);
            self.forget(vip, false).await;
            self.retained_routes.insert(vip);
        }
        let unused: Vec<Ipv4Addr> = self
            .retained_routes
            .iter()
            .filter(|vip| {
                !self.active.contains(vip)
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

    async fn on_event(&mut self, event: FlowEvent) {
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
            FlowEvent::Refused {
                pid,
                remote,
                reason,
                ..
            } => {
                let why = match reason {
                    Some(pvc_common::DropReason::PolicyOutbound) => {
                        "the policy does not allow this flow"
                    }
                    _ => "no member has this virtual address",
                };
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
                if matches!(
                    reason,
                    Some(pvc_common::DropReason::TagMismatch | pvc_common::DropReason::BadTag)
                ) {
                    self.reauthenticate(claimed, real);
                }
                let why = match reason {
                    Some(pvc_common::DropReason::PolicyInbound) => {
                        "the policy does not allow it".to_string()
                    }
                    Some(pvc_common::DropReason::BadTag) => {
                        "its tag's MAC is wrong (forged, or from an old session)".to_string()
                    }
                    _ => format!("{claimed} has no authenticated path from {real}"),
                };
                self.log_refusal(format_args!("refused a flow to port {local_port} claiming to be {claimed}, from {real}: {why}"));
            }
            FlowEvent::Held { peer, packet } => self.on_held_packet(peer, packet).await,
            FlowEvent::PacketRefused { reason, packet } => self.on_refused_packet(reason, packet),
        }
    }

    /// A SYN tc refused: answered with a RST (the connect() behind it
    /// fails at once), and explained.
    fn on_refused_packet(
        &mut self,
        reason: Option<pvc_common::DropReason>,
        packet: Option<Vec<u8>>,
    ) {
        let Some(packet) = packet else { return };
        let Some(syn) = Syn::parse(&packet) else {
            return;
        };
        match self.injector.refuse(&packet) {
            Ok(()) => self.count("refused_syns_answered"),
            Err(e) => warn!("cannot answer a refused SYN: {e}"),
        }
        let flow = format!("{}:{} -> {}:{}", syn.saddr, syn.sport, syn.daddr, syn.dport);
        match reason {
            Some(pvc_common::DropReason::FlowTableFull) => {
                let max_flows = self.config.interposition.max_flows;
                self.log_refusal(format_args!(
                    "refused the new flow {flow}: the masquerading map is full ({max_flows} flows); \
                     established flows are kept. Raise interposition.max_flows"
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

    pub(super) fn count(&mut self, what: &'static str) {
        *self.counters.entry(what).or_default() += 1;
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

    fn log_refusal(&mut self, what: std::fmt::Arguments<'_>) {
        if self.refusals_logged < 20 {
            self.refusals_logged += 1;
            warn!("{what}");
        } else {
            self.refusals_unlogged += 1;
        }
    }

    fn status(&self) -> Status {
        Status {
            state: control::STATE_RUNNING.into(),
            instance: self.config.instance.clone(),
            cluster: self.trust.cluster.to_string(),
            host_key: self.key.public.to_string(),
            name: self.config.name.clone(),
            virtual_ip: self.config.virtual_ip,
            uplink: self.uplink.name.clone(),
            real_ip: self.real_ip,
            advertised: self.advertised.clone(),
            broker: self.broker.clone(),
            admitted: self.own.is_some(),
            peers: self
                .peers
                .values()
                .map(|p| PeerStatus {
                    name: p.member.name.clone(),
                    virtual_ip: p.member.virtual_ip,
                    addresses: p.member.addresses.clone(),
                    groups: p.member.groups.clone(),
                    authenticated: p.session.is_some(),
                    path: p.session.as_ref().map(|s| {
                        (
                            s.session.peer_real,
                            p.hint
                                .map_or(Technique::Direct, |h| h.technique)
                                .name()
                                .to_string(),
                        )
                    }),
                    session_age_secs: p.session.as_ref().map(|s| s.since.elapsed().as_secs()),
                })
                .collect(),
            flows: self.datapath.maps.flows(),
            flow_capacity: self.datapath.maps.capacity,
            flows_opened: self.flows_opened.clone(),
            agent_counters: self
                .counters
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
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
            revocations_version: self.trust.revocations.version,
            policy_version: self.trust.policy.version,
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
        info!("agent stopped; virtual address, routes and eBPF programs removed");
        Ok(())
    }
}
