//! The brokering service (paper §4, Fig. 2): agents keep a TCP session with a
//! broker, register with their host key, learn about the other members of
//! their cluster as they come and go, and exchange handshake messages
//! through it. The cluster's master publishes its signed documents here.
//!
//! A broker is trusted with availability only. It checks the master's
//! signatures so that it serves nothing a member would reject, but members
//! check them again: a broker that lies can drop or delay, never admit.
//! It never sees data-path traffic of a direct path, so killing it does not
//! break established flows.

pub mod metrics;
mod relay;
mod store;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{SinkExt as _, StreamExt as _};
use pvc_proto::{
    AgentMessage, BrokerCodec, BrokerMessage, ClusterId, ErrorCode, GlobalPolicy, MAX_RELAY,
    MemberInfo, MembershipRecord, PublicKey, Publication, Registration, Revocations, SignedPolicy,
    SignedRecord, SignedRevocations, member_chunks, supersedes, unix_now,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::{Instant, timeout},
};
use tokio_util::codec::Framed;
use tracing::{info, warn};

pub use store::Store;

/// Timeouts of a session.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Time an agent has to send `Register` (or a master `Publish`) after connecting.
    pub register_timeout: Duration,
    /// A session that sends nothing (agents ping every `PING_INTERVAL`)
    /// for this long is closed.
    pub idle_timeout: Duration,
    /// Messages queued for one agent before it counts as too slow and is dropped.
    pub queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            register_timeout: Duration::from_secs(10),
            idle_timeout: pvc_proto::AGENT_IDLE_TIMEOUT,
            queue: 4096,
        }
    }
}

/// A session's write buffer keeps the capacity of the largest frame it sent
/// (a welcome with a whole cluster's records): give it back once sent, so
/// that a broker's memory follows its number of agents, not their history.
fn release_large_buffer(framed: &mut Framed<TcpStream, BrokerCodec>) {
    const KEEP: usize = 16 * 1024;
    if framed.write_buffer().capacity() > KEEP && framed.write_buffer().is_empty() {
        *framed.write_buffer_mut() = tokio_util::bytes::BytesMut::new();
    }
}

/// What the broker holds for one cluster.
pub(crate) struct Cluster {
    pub(crate) master_key: PublicKey,
    /// The newest record of each host key.
    pub(crate) records: HashMap<PublicKey, (MembershipRecord, SignedRecord)>,
    pub(crate) revocations: Option<(Revocations, SignedRevocations)>,
    pub(crate) policy: Option<(GlobalPolicy, SignedPolicy)>,
    /// Live sessions by virtual address.
    sessions: HashMap<Ipv4Addr, Session>,
}

struct Session {
    id: u64,
    host_key: PublicKey,
    info: MemberInfo,
    tx: mpsc::Sender<BrokerMessage>,
}

impl Cluster {
    fn new(master_key: PublicKey) -> Self {
        Self {
            master_key,
            records: HashMap::new(),
            revocations: None,
            policy: None,
            sessions: HashMap::new(),
        }
    }

    fn revoked(&self) -> &[u64] {
        self.revocations.as_ref().map_or(&[], |(r, _)| &r.serials)
    }

    /// The record admitting `key` now, if any.
    fn admission(&self, key: &PublicKey) -> Result<&(MembershipRecord, SignedRecord), String> {
        let entry = self.records.get(key).ok_or_else(|| {
            "no record for this host key: the cluster's administrator must admit it \
             (`pvc master admit`)"
                .to_string()
        })?;
        entry
            .0
            .check(unix_now(), self.revoked())
            .map_err(|e| e.to_string())?;
        Ok(entry)
    }

    /// Sends to every session but `except`; sessions that cannot keep up are dropped.
    fn broadcast(&mut self, msg: &BrokerMessage, except: Option<u64>) {
        let slow: Vec<Ipv4Addr> = self
            .sessions
            .iter()
            .filter(|(_, s)| Some(s.id) != except && s.tx.try_send(msg.clone()).is_err())
            .map(|(vip, _)| *vip)
            .collect();
        drop_slow(self, slow);
    }
}

#[derive(Default)]
struct State {
    clusters: HashMap<ClusterId, Cluster>,
}

pub struct Broker {
    name: String,
    limits: Limits,
    state: Mutex<State>,
    store: Option<Store>,
    next_id: AtomicU64,
    relays: relay::Relays,
    metrics: metrics::BrokerMetrics,
}

impl Broker {
    pub fn new(name: impl Into<String>, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            limits,
            state: Mutex::default(),
            store: None,
            next_id: AtomicU64::new(1),
            relays: relay::Relays::default(),
            metrics: Default::default(),
        })
    }

    /// A broker that keeps what masters publish in `path` across restarts.
    pub fn with_store(
        name: impl Into<String>,
        limits: Limits,
        path: &Path,
    ) -> anyhow::Result<Arc<Self>> {
        let store = Store::open(path)?;
        let mut state = State::default();
        for (id, cluster) in store.load()? {
            state.clusters.insert(id, cluster);
        }
        info!(clusters = state.clusters.len(), path = %path.display(), "loaded published documents");
        Ok(Arc::new(Self {
            name: name.into(),
            limits,
            state: Mutex::new(state),
            store: Some(store),
            next_id: AtomicU64::new(1),
            relays: relay::Relays::default(),
            metrics: Default::default(),
        }))
    }

    /// Accepts agents. A failed accept (out of file descriptors, a
    /// connection reset before it was accepted) costs that connection only:
    /// the agents already connected must not lose their broker.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        let mut warned = None::<Instant>;
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    if warned.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        warn!(
                            "cannot accept an agent: {e}; if this says too many open files, \
                             raise the broker's file limit (LimitNOFILE=)"
                        );
                        warned = Some(Instant::now());
                    }
                    // EMFILE stays until a session ends: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let broker = Arc::clone(&self);
            tokio::spawn(async move { broker.session(stream, peer).await });
        }
    }

    /// Number of live sessions in a cluster (for tests and logs).
    pub fn members(&self, cluster: &ClusterId) -> usize {
        let state = self.state.lock().unwrap();
        state.clusters.get(cluster).map_or(0, |c| c.sessions.len())
    }

    async fn session(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        // Most frames are small (pings, relays); the buffer grows for the
        // rare large one. 10,000 sessions x 8 KiB default would be 80 MiB.
        let mut framed = Framed::with_capacity(stream, BrokerCodec::default(), 1024);
        let registration = match timeout(self.limits.register_timeout, framed.next()).await {
            Ok(Some(Ok(AgentMessage::Register(r)))) => r,
            Ok(Some(Ok(AgentMessage::Publish(p)))) => {
                self.master_session(&mut framed, peer, p).await;
                return;
            }
            Ok(Some(Ok(AgentMessage::RelayJoin { token }))) => {
                let parts = framed.into_parts();
                self.relays.join(token, parts.io, parts.read_buf).await;
                return;
            }
            Ok(Some(Ok(other))) => {
                let msg = format!(
                    "expected Register, Publish or RelayJoin first, got {}",
                    kind(&other)
                );
                self.refuse(&mut framed, peer, ErrorCode::NotRegistered, msg)
                    .await;
                return;
            }
            Ok(Some(Err(e))) => {
                self.refuse(&mut framed, peer, e.code(), e.to_string())
                    .await;
                return;
            }
            Ok(None) => return,
            Err(_) => {
                let msg = "no Register within the time limit".into();
                self.refuse(&mut framed, peer, ErrorCode::Timeout, msg)
                    .await;
                return;
            }
        };
        if let Err(e) = registration.validate(unix_now()) {
            self.refuse(
                &mut framed,
                peer,
                ErrorCode::InvalidRegistration,
                e.to_string(),
            )
            .await;
            return;
        }
        let (tx, rx) = mpsc::channel(self.limits.queue);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let observed = match peer {
            SocketAddr::V4(v4) => v4,
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(ip) => std::net::SocketAddrV4::new(ip, v6.port()),
                None => {
                    let msg = "agents connect over IPv4".into();
                    self.refuse(&mut framed, peer, ErrorCode::InvalidRegistration, msg)
                        .await;
                    return;
                }
            },
        };
        let welcome = match self.admit(&registration, id, observed, tx.clone()) {
            Ok(w) => w,
            Err((code, message)) => {
                self.refuse(&mut framed, peer, code, message).await;
                return;
            }
        };
        let cluster = registration.cluster;
        let me = welcome.you_vip;
        info!(%peer, %cluster, name = welcome.you_name, virtual_ip = %me,
              addresses = ?registration.addresses, software = registration.software, "member registered");

        let (reason, clean) = self
            .converse(&mut framed, observed, &cluster, me, welcome, (tx, rx))
            .await;
        if self.leave(&cluster, me, id, clean) {
            info!(%peer, %cluster, virtual_ip = %me, reason, "member left");
        }
    }

    /// Sends the welcome, then relays membership changes and messages, and
    /// answers pings until the session ends. Returns why it ended, and
    /// whether the agent said it was leaving.
    async fn converse(
        &self,
        framed: &mut Framed<TcpStream, BrokerCodec>,
        observed: std::net::SocketAddrV4,
        cluster: &ClusterId,
        me: Ipv4Addr,
        welcome: Welcome,
        (tx, mut rx): (mpsc::Sender<BrokerMessage>, mpsc::Receiver<BrokerMessage>),
    ) -> (&'static str, bool) {
        let peer = SocketAddr::V4(observed);
        let chunks = member_chunks(&welcome.others);
        let last = chunks.len() - 1;
        let mut first = Some((welcome.you, welcome.revocations, welcome.policy));
        for (i, members) in chunks.into_iter().enumerate() {
            let more = i < last;
            let msg = match first.take() {
                Some((you, revocations, policy)) => BrokerMessage::Welcome {
                    broker: self.name.clone(),
                    observed,
                    you,
                    revocations,
                    policy,
                    members,
                    more,
                },
                None => BrokerMessage::Members { members, more },
            };
            if framed.send(msg).await.is_err() {
                return ("write failed", false);
            }
        }
        release_large_buffer(framed);

        let mut deadline = Instant::now() + self.limits.idle_timeout;
        loop {
            tokio::select! {
                frame = framed.next() => {
                    deadline = Instant::now() + self.limits.idle_timeout;
                    match frame {
                        Some(Ok(AgentMessage::Ping { nonce })) => {
                            if framed.send(BrokerMessage::Pong { nonce }).await.is_err() {
                                return ("write failed", false);
                            }
                        }
                        Some(Ok(AgentMessage::Relay { to, payload })) => {
                            if let Some(answer) = self.relay(cluster, me, to, payload)
                                && framed.send(answer).await.is_err()
                            {
                                return ("write failed", false);
                            }
                        }
                        Some(Ok(AgentMessage::Leave)) => return ("agent left", true),
                        Some(Ok(AgentMessage::Site(site))) => self.site(cluster, me, site),
                        Some(Ok(AgentMessage::Probe { port, nonce })) => {
                            tokio::spawn(probe(*observed.ip(), port, nonce, tx.clone()));
                        }
                        Some(Ok(AgentMessage::RelayOffer { token, to })) => {
                            if let Err(why) = self.offer_relay(cluster, me, to, token) {
                                warn!(%peer, virtual_ip = %me, %to, "relay offer refused: {why}");
                            }
                        }
                        Some(Ok(other)) => {
                            let msg = format!("{} is not allowed in a registered session", kind(&other));
                            self.refuse(framed, peer, ErrorCode::NotRegistered, msg).await;
                            return ("protocol violation", false);
                        }
                        Some(Err(e)) => {
                            self.refuse(framed, peer, e.code(), e.to_string()).await;
                            return ("bad frame", false);
                        }
                        None => return ("agent closed the session", false),
                    }
                }
                out = rx.recv() => match out {
                    Some(BrokerMessage::Error { code, message }) => {
                        let _ = framed.send(BrokerMessage::Error { code, message }).await;
                        return ("closed by the broker", false);
                    }
                    Some(msg) => {
                        if framed.send(msg).await.is_err() {
                            return ("write failed", false);
                        }
                        release_large_buffer(framed);
                    }
                    None => return ("agent too slow", false),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    self.refuse(framed, peer, ErrorCode::Timeout, "no ping for too long".into()).await;
                    return ("idle timeout", false);
                }
            }
        }
    }

    /// Registers a session and tells the cluster.
    fn admit(
        &self,
        r: &Registration,
        id: u64,
        observed: std::net::SocketAddrV4,
        tx: mpsc::Sender<BrokerMessage>,
    ) -> Result<Welcome, (ErrorCode, String)> {
        let mut state = self.state.lock().unwrap();
        if !state.clusters.contains_key(&r.cluster) {
            return Err(unknown_cluster(&state, &r.cluster));
        }
        let cluster = state.clusters.get_mut(&r.cluster).expect("checked");
        let (record, signed) = cluster
            .admission(&r.host_key)
            .map_err(|e| (ErrorCode::NotAdmitted, e))?
            .clone();
        let vip = record.virtual_ip;
        if let Some(old) = cluster.sessions.get(&vip) {
            // The same member again (agent restart, broker reconnect), or a
            // newer admission of the address: the newer session wins.
            let _ = old.tx.try_send(BrokerMessage::Error {
                code: ErrorCode::Replaced,
                message: "a newer session registered for this virtual address".into(),
            });
        }
        let info = MemberInfo {
            record: signed.clone(),
            addresses: r.addresses.clone(),
            observed: Some(observed),
            site: Default::default(),
        };
        let others = cluster
            .sessions
            .values()
            .filter(|s| s.info.record.body != signed.body)
            .map(|s| s.info.clone())
            .collect();
        cluster.sessions.insert(
            vip,
            Session {
                id,
                host_key: r.host_key,
                info: info.clone(),
                tx,
            },
        );
        cluster.broadcast(&BrokerMessage::Joined(info), Some(id));
        Ok(Welcome {
            you: signed,
            you_vip: vip,
            you_name: record.name,
            revocations: cluster.revocations.as_ref().map(|(_, s)| s.clone()),
            policy: cluster.policy.as_ref().map(|(_, s)| s.clone()),
            others,
        })
    }

    /// Forwards a payload to another member of the cluster. Returns the
    /// answer for the sender when it cannot be delivered.
    fn relay(
        &self,
        cluster: &ClusterId,
        from: Ipv4Addr,
        to: Ipv4Addr,
        payload: Vec<u8>,
    ) -> Option<BrokerMessage> {
        if payload.len() > MAX_RELAY {
            return Some(BrokerMessage::Undeliverable { to });
        }
        let mut state = self.state.lock().unwrap();
        let target = state.clusters.get_mut(cluster)?.sessions.get(&to);
        let delivered = target.is_some_and(|s| {
            s.tx.try_send(BrokerMessage::Relayed { from, payload })
                .is_ok()
        });
        let outcome = if delivered {
            "delivered"
        } else {
            "undeliverable"
        };
        self.metrics.messages.with_label_values(&[outcome]).inc();
        (!delivered).then_some(BrokerMessage::Undeliverable { to })
    }

    /// A member tells what it found out about its network: the others learn
    /// it with the member.
    /// A member offers a relay token for a flow with `to`, a member with a
    /// session here.
    fn offer_relay(
        &self,
        cluster: &ClusterId,
        me: Ipv4Addr,
        to: Ipv4Addr,
        token: [u8; 16],
    ) -> Result<(), &'static str> {
        let present = {
            let state = self.state.lock().unwrap();
            state
                .clusters
                .get(cluster)
                .is_some_and(|c| c.sessions.contains_key(&to))
        };
        if !present {
            return Err("the other member has no session on this broker");
        }
        self.relays.offer(*cluster, me, token)
    }

    fn site(&self, cluster: &ClusterId, vip: Ipv4Addr, site: pvc_proto::SiteInfo) {
        let mut state = self.state.lock().unwrap();
        let Some(cluster) = state.clusters.get_mut(cluster) else {
            return;
        };
        let Some(session) = cluster.sessions.get_mut(&vip) else {
            return;
        };
        if session.info.site == site {
            return;
        }
        session.info.site = site;
        let (id, info) = (session.id, session.info.clone());
        cluster.broadcast(&BrokerMessage::Joined(info), Some(id));
    }

    /// Removes a session if it is still the current one for its address.
    fn leave(&self, cluster_id: &ClusterId, vip: Ipv4Addr, id: u64, clean: bool) -> bool {
        let mut state = self.state.lock().unwrap();
        let Some(cluster) = state.clusters.get_mut(cluster_id) else {
            return false;
        };
        if cluster.sessions.get(&vip).is_none_or(|s| s.id != id) {
            return false;
        }
        cluster.sessions.remove(&vip);
        cluster.broadcast(
            &BrokerMessage::Left {
                virtual_ip: vip,
                clean,
            },
            None,
        );
        true
    }

    /// A master's session: publications, each answered, until it closes.
    async fn master_session(
        &self,
        framed: &mut Framed<TcpStream, BrokerCodec>,
        peer: SocketAddr,
        first: Publication,
    ) {
        let mut next = Some(first);
        while let Some(p) = next.take() {
            match self.publish(p) {
                Ok((cluster, records)) => {
                    info!(%peer, %cluster, records, "master published");
                    if framed
                        .send(BrokerMessage::Published { records })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Err(message) => {
                    self.refuse(framed, peer, ErrorCode::BadPublication, message)
                        .await;
                    return;
                }
            }
            next = match timeout(self.limits.register_timeout, framed.next()).await {
                Ok(Some(Ok(AgentMessage::Publish(p)))) => Some(p),
                Ok(Some(Ok(other))) => {
                    let msg = format!("a master session only publishes, got {}", kind(&other));
                    self.refuse(framed, peer, ErrorCode::NotRegistered, msg)
                        .await;
                    None
                }
                Ok(Some(Err(e))) => {
                    self.refuse(framed, peer, e.code(), e.to_string()).await;
                    None
                }
                _ => None,
            };
        }
    }

    /// Checks and stores a publication; pushes revocations and policy to the
    /// cluster's members, and closes the sessions of revoked members.
    fn publish(&self, p: Publication) -> Result<(ClusterId, u32), String> {
        let id = ClusterId::of(&p.master_key);
        let mut records = Vec::new();
        for s in &p.records {
            let r = s
                .verify(&p.master_key)
                .map_err(|e| format!("record: {e}"))?;
            records.push((r, s.clone()));
        }
        let revocations = match &p.revocations {
            Some(s) => Some((
                s.verify(&p.master_key)
                    .map_err(|e| format!("revocations: {e}"))?,
                s.clone(),
            )),
            None => None,
        };
        let policy = match &p.policy {
            Some(s) => Some((
                s.verify(&p.master_key)
                    .map_err(|e| format!("policy: {e}"))?,
                s.clone(),
            )),
            None => None,
        };

        let mut state = self.state.lock().unwrap();
        let cluster = state
            .clusters
            .entry(id)
            .or_insert_with(|| Cluster::new(p.master_key));
        for (r, s) in records {
            if supersedes(&r, cluster.records.get(&r.host_key).map(|(old, _)| old)) {
                cluster.records.insert(r.host_key, (r, s));
            }
        }
        if let Some((r, s)) = revocations
            && supersedes(&r, cluster.revocations.as_ref().map(|(old, _)| old))
        {
            cluster.revocations = Some((r, s.clone()));
            cluster.broadcast(&BrokerMessage::Revocations(s), None);
            let revoked: Vec<Ipv4Addr> = cluster
                .sessions
                .iter()
                .filter(|(_, sess)| cluster.admission(&sess.host_key).is_err())
                .map(|(vip, _)| *vip)
                .collect();
            for vip in revoked {
                if let Some(sess) = cluster.sessions.get(&vip) {
                    let _ = sess.tx.try_send(BrokerMessage::Error {
                        code: ErrorCode::NotAdmitted,
                        message: "this member's record was revoked".into(),
                    });
                }
            }
        }
        if let Some((g, s)) = policy
            && supersedes(&g, cluster.policy.as_ref().map(|(old, _)| old))
        {
            cluster.policy = Some((g, s.clone()));
            cluster.broadcast(&BrokerMessage::Policy(s), None);
        }
        let count = cluster.records.len() as u32;
        if let Some(store) = &self.store
            && let Err(e) = store.save(&id, cluster)
        {
            warn!(%id, "cannot persist the publication: {e:#}");
        }
        Ok((id, count))
    }
}

/// Why a registration names a cluster this broker does not hold: nothing
/// published here yet, or (when it serves others) most likely an agent
/// configured with another cluster's master key. Cluster ids are hashes of
/// public keys: naming them gives nothing away.
fn unknown_cluster(state: &State, cluster: &ClusterId) -> (ErrorCode, String) {
    if state.clusters.is_empty() {
        return (
            ErrorCode::UnknownCluster,
            format!(
                "this broker holds nothing for cluster {cluster} (nothing published here yet): \
                 the master must publish to it (`pvc master publish`)"
            ),
        );
    }
    const SHOWN: usize = 4;
    let mut served: Vec<String> = state.clusters.keys().map(|c| c.to_string()).collect();
    served.sort();
    let more = served.len().saturating_sub(SHOWN);
    served.truncate(SHOWN);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    (
        ErrorCode::ForeignCluster,
        format!(
            "this broker serves cluster(s) {}{more}, not cluster {cluster}: the agent's master_key \
             is another cluster's (compare it with `pvc master show`), or this cluster's master \
             has not published here yet (`pvc master publish`)",
            served.join(", ")
        ),
    )
}

/// Reaches back to an agent at the address its session comes from: a TCP
/// connection to `port` (its result goes back to the agent) and a UDP
/// datagram carrying `nonce` (the agent sees it arrive, or not). Together
/// they tell an open host from a stateless SYN filter from a stateful
/// firewall or a NAT, without any privilege on the broker.
async fn probe(ip: Ipv4Addr, port: u16, nonce: u64, tx: mpsc::Sender<BrokerMessage>) {
    const WITHIN: Duration = Duration::from_secs(1);
    let to = std::net::SocketAddrV4::new(ip, port);
    if let Ok(udp) = tokio::net::UdpSocket::bind("0.0.0.0:0").await {
        let mut datagram = pvc_proto::PROBE_MAGIC.to_vec();
        datagram.extend_from_slice(&nonce.to_be_bytes());
        for _ in 0..3 {
            let _ = udp.send_to(&datagram, to).await;
        }
    }
    let reached = matches!(timeout(WITHIN, TcpStream::connect(to)).await, Ok(Ok(_)));
    let _ = tx.send(BrokerMessage::ProbeResult { nonce, reached }).await;
}

struct Welcome {
    you: SignedRecord,
    you_vip: Ipv4Addr,
    you_name: String,
    revocations: Option<SignedRevocations>,
    policy: Option<SignedPolicy>,
    others: Vec<MemberInfo>,
}

fn kind(m: &AgentMessage) -> &'static str {
    match m {
        AgentMessage::Register(_) => "Register",
        AgentMessage::Ping { .. } => "Ping",
        AgentMessage::Leave => "Leave",
        AgentMessage::Relay { .. } => "Relay",
        AgentMessage::Publish(_) => "Publish",
        AgentMessage::Site(_) => "Site",
        AgentMessage::Probe { .. } => "Probe",
        AgentMessage::RelayOffer { .. } => "RelayOffer",
        AgentMessage::RelayJoin { .. } => "RelayJoin",
    }
}

/// Agents whose queue is full are disconnected rather than buffered without
/// bound (dropping a session's sender ends its loop); they reconnect and get
/// a fresh member list. The others are told they left, which may in turn
/// find more slow agents.
fn drop_slow(cluster: &mut Cluster, mut slow: Vec<Ipv4Addr>) {
    while let Some(vip) = slow.pop() {
        if cluster.sessions.remove(&vip).is_none() {
            continue;
        }
        warn!(virtual_ip = %vip, "agent does not keep up; closing its session");
        let msg = BrokerMessage::Left {
            virtual_ip: vip,
            clean: false,
        };
        for (other, s) in &cluster.sessions {
            if s.tx.try_send(msg.clone()).is_err() {
                slow.push(*other);
            }
        }
    }
}

impl Broker {
    async fn refuse(
        &self,
        framed: &mut Framed<TcpStream, BrokerCodec>,
        peer: SocketAddr,
        code: ErrorCode,
        message: String,
    ) {
        self.metrics
            .refusals
            .with_label_values(&[&metrics::reason(code)])
            .inc();
        warn!(%peer, ?code, "closing session: {message}");
        let _ = timeout(
            Duration::from_secs(2),
            framed.send(BrokerMessage::Error { code, message }),
        )
        .await;
    }
}
