//! The brokering service (paper §4, Fig. 2): agents keep a TCP session with a
//! broker, register who they are and where they can be reached, and learn
//! about the other members of their cluster as they come and go.
//!
//! A broker is not trusted with anything but availability: it relays what
//! members say about themselves. It never sees data-path traffic of a direct
//! path, so killing it does not break established flows.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{SinkExt as _, StreamExt as _};
use pvc_proto::{
    AgentMessage, BrokerCodec, BrokerMessage, ErrorCode, Member, Registration, member_chunks,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::{Instant, timeout},
};
use tokio_util::codec::Framed;
use tracing::{info, warn};

/// Timeouts of a session.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Time an agent has to send `Register` after connecting.
    pub register_timeout: Duration,
    /// A session that sends nothing (agents ping every 10 s) for this long is closed.
    pub idle_timeout: Duration,
    /// Messages queued for one agent before it counts as too slow and is dropped.
    pub queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            register_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(35),
            queue: 4096,
        }
    }
}

#[derive(Default)]
struct Cluster {
    /// Live sessions by virtual address.
    sessions: HashMap<Ipv4Addr, Session>,
}

struct Session {
    id: u64,
    member: Member,
    tx: mpsc::Sender<BrokerMessage>,
}

#[derive(Default)]
struct State {
    clusters: HashMap<String, Cluster>,
}

pub struct Broker {
    name: String,
    limits: Limits,
    state: Mutex<State>,
    next_id: AtomicU64,
}

impl Broker {
    pub fn new(name: impl Into<String>, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            limits,
            state: Mutex::default(),
            next_id: AtomicU64::new(1),
        })
    }

    /// Accepts agents until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, peer) = listener.accept().await?;
            let broker = Arc::clone(&self);
            tokio::spawn(async move { broker.session(stream, peer).await });
        }
    }

    /// Number of live sessions in a cluster (for tests and logs).
    pub fn members(&self, cluster: &str) -> usize {
        let state = self.state.lock().unwrap();
        state.clusters.get(cluster).map_or(0, |c| c.sessions.len())
    }

    async fn session(self: Arc<Self>, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let mut framed = Framed::new(stream, BrokerCodec::default());
        let registration = match timeout(self.limits.register_timeout, framed.next()).await {
            Ok(Some(Ok(AgentMessage::Register(r)))) => r,
            Ok(Some(Ok(other))) => {
                refuse(
                    &mut framed,
                    peer,
                    ErrorCode::NotRegistered,
                    format!("expected Register first, got {other:?}"),
                )
                .await;
                return;
            }
            Ok(Some(Err(e))) => {
                refuse(&mut framed, peer, e.code(), e.to_string()).await;
                return;
            }
            Ok(None) => return,
            Err(_) => {
                refuse(
                    &mut framed,
                    peer,
                    ErrorCode::Timeout,
                    "no Register within the time limit".into(),
                )
                .await;
                return;
            }
        };
        if let Err(e) = registration.validate() {
            refuse(
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
        let others = match self.admit(&registration, id, tx) {
            Ok(others) => others,
            Err(message) => {
                refuse(&mut framed, peer, ErrorCode::Conflict, message).await;
                return;
            }
        };
        let Registration {
            cluster,
            member,
            software,
        } = registration;
        info!(%peer, cluster, name = member.name, virtual_ip = %member.virtual_ip,
              addresses = ?member.addresses, software, "member registered");

        let (reason, clean) = self.converse(&mut framed, peer, others, rx).await;
        if self.leave(&cluster, &member, id, clean) {
            info!(%peer, cluster, name = member.name, virtual_ip = %member.virtual_ip, reason, "member left");
        }
    }

    /// Sends the member list, then relays membership changes and answers
    /// pings until the session ends. Returns why it ended, and whether the
    /// agent said it was leaving.
    async fn converse(
        &self,
        framed: &mut Framed<TcpStream, BrokerCodec>,
        peer: SocketAddr,
        others: Vec<Member>,
        mut rx: mpsc::Receiver<BrokerMessage>,
    ) -> (&'static str, bool) {
        let chunks = member_chunks(&others);
        let last = chunks.len() - 1;
        for (i, members) in chunks.into_iter().enumerate() {
            let more = i < last;
            let msg = if i == 0 {
                BrokerMessage::Welcome {
                    broker: self.name.clone(),
                    members,
                    more,
                }
            } else {
                BrokerMessage::Members { members, more }
            };
            if framed.send(msg).await.is_err() {
                return ("write failed", false);
            }
        }

        let mut deadline = Instant::now() + self.limits.idle_timeout;
        loop {
            tokio::select! {
                frame = framed.next() => match frame {
                    Some(Ok(AgentMessage::Ping { nonce })) => {
                        deadline = Instant::now() + self.limits.idle_timeout;
                        if framed.send(BrokerMessage::Pong { nonce }).await.is_err() {
                            return ("write failed", false);
                        }
                    }
                    Some(Ok(AgentMessage::Register(_))) => {
                        refuse(framed, peer, ErrorCode::NotRegistered, "Register sent twice in one session".into()).await;
                        return ("protocol violation", false);
                    }
                    Some(Err(e)) => {
                        refuse(framed, peer, e.code(), e.to_string()).await;
                        return ("bad frame", false);
                    }
                    Some(Ok(AgentMessage::Leave)) => return ("agent left", true),
                    None => return ("agent closed the session", false),
                },
                out = rx.recv() => match out {
                    Some(BrokerMessage::Error { code, message }) => {
                        let _ = framed.send(BrokerMessage::Error { code, message }).await;
                        return ("closed by the broker", false);
                    }
                    Some(msg) => {
                        if framed.send(msg).await.is_err() {
                            return ("write failed", false);
                        }
                    }
                    None => return ("agent too slow", false),
                },
                _ = tokio::time::sleep_until(deadline) => {
                    refuse(framed, peer, ErrorCode::Timeout, "no ping for too long".into()).await;
                    return ("idle timeout", false);
                }
            }
        }
    }

    /// Registers a session and tells the cluster. Returns the other members.
    fn admit(
        &self,
        r: &Registration,
        id: u64,
        tx: mpsc::Sender<BrokerMessage>,
    ) -> Result<Vec<Member>, String> {
        let mut state = self.state.lock().unwrap();
        let cluster = state.clusters.entry(r.cluster.clone()).or_default();
        let vip = r.member.virtual_ip;
        if let Some(other) = cluster
            .sessions
            .values()
            .find(|s| s.member.name == r.member.name && s.member.virtual_ip != vip)
        {
            return Err(format!(
                "name {:?} is registered with virtual address {} (this agent says {vip})",
                r.member.name, other.member.virtual_ip
            ));
        }
        if let Some(old) = cluster.sessions.get(&vip) {
            if old.member.name != r.member.name {
                return Err(format!(
                    "virtual address {vip} is registered by member {:?} (this agent is {:?})",
                    old.member.name, r.member.name
                ));
            }
            // The same member again (agent restart, broker reconnect): the
            // newer session wins, the older one is told and closed.
            let _ = old.tx.try_send(BrokerMessage::Error {
                code: ErrorCode::Replaced,
                message: "a newer session of this member registered".into(),
            });
        }
        cluster.sessions.insert(
            vip,
            Session {
                id,
                member: r.member.clone(),
                tx,
            },
        );
        let mut slow = Vec::new();
        let mut others = Vec::new();
        for s in cluster.sessions.values().filter(|s| s.id != id) {
            others.push(s.member.clone());
            if s.tx
                .try_send(BrokerMessage::Joined(r.member.clone()))
                .is_err()
            {
                slow.push(s.member.virtual_ip);
            }
        }
        drop_slow(cluster, slow);
        Ok(others)
    }

    /// Removes a session if it is still the current one for its address.
    fn leave(&self, cluster_name: &str, member: &Member, id: u64, clean: bool) -> bool {
        let mut state = self.state.lock().unwrap();
        let Some(cluster) = state.clusters.get_mut(cluster_name) else {
            return false;
        };
        if cluster
            .sessions
            .get(&member.virtual_ip)
            .is_none_or(|s| s.id != id)
        {
            return false;
        }
        cluster.sessions.remove(&member.virtual_ip);
        let mut slow = Vec::new();
        for s in cluster.sessions.values() {
            let msg = BrokerMessage::Left {
                name: member.name.clone(),
                virtual_ip: member.virtual_ip,
                clean,
            };
            if s.tx.try_send(msg).is_err() {
                slow.push(s.member.virtual_ip);
            }
        }
        drop_slow(cluster, slow);
        if cluster.sessions.is_empty() {
            state.clusters.remove(cluster_name);
        }
        true
    }
}

/// Agents whose queue is full are disconnected rather than buffered without
/// bound (dropping a session's sender ends its loop); they reconnect and get
/// a fresh member list. The others are told they left, which may in turn
/// find more slow agents.
fn drop_slow(cluster: &mut Cluster, mut slow: Vec<Ipv4Addr>) {
    while let Some(vip) = slow.pop() {
        let Some(gone) = cluster.sessions.remove(&vip) else {
            continue;
        };
        warn!(name = gone.member.name, virtual_ip = %vip, "agent does not keep up; closing its session");
        for s in cluster.sessions.values() {
            let msg = BrokerMessage::Left {
                name: gone.member.name.clone(),
                virtual_ip: vip,
                clean: false,
            };
            if s.tx.try_send(msg).is_err() {
                slow.push(s.member.virtual_ip);
            }
        }
    }
}

async fn refuse(
    framed: &mut Framed<TcpStream, BrokerCodec>,
    peer: SocketAddr,
    code: ErrorCode,
    message: String,
) {
    warn!(%peer, ?code, "closing session: {message}");
    let _ = timeout(
        Duration::from_secs(2),
        framed.send(BrokerMessage::Error { code, message }),
    )
    .await;
}
