//! The coordinator's state as a pure core: what this agent knows of the
//! cluster (members, their paths, exchanges in progress, held packets,
//! routes kept for flows) and the rules that change it. Every method takes
//! an event and the time, and returns the effects the agent must carry out
//! (`Effect`): kernel entries, routes, packets to re-send or refuse,
//! messages for the broker. No I/O happens here, so every rule can be
//! tested without root, namespaces or a broker (see `tests`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use pvc_common::{PeerPath as KernelPath, Technique};
use pvc_proto::handshake::{ExchangeId, Handshake};
use tracing::warn;

use crate::{
    connectivity,
    security::{
        challenge::{Confirmed, Initiator, Me, Responder, Session},
        keys::KeyPair,
        membership::{Member, Trust},
        policy::{self, Compiled, LocalPolicy, Subject},
    },
    virtualization::LocalNet,
};

/// Time limits of the coordinator's rules.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long an exchange may take before the flows waiting for it are refused.
    pub handshake_timeout: Duration,
    /// An authenticated path is proven again after this long.
    pub session_lifetime: Duration,
    /// How long a member whose broker session was lost (or who is missing
    /// from a new broker's list) keeps its path: a crashed agent restarts,
    /// and after a broker failover the new list fills as agents register.
    pub absence_grace: Duration,
}

impl Limits {
    pub fn new(handshake_timeout: Duration, session_lifetime: Duration) -> Self {
        Self {
            handshake_timeout,
            session_lifetime,
            absence_grace: Duration::from_secs(20),
        }
    }
}

/// After a failed exchange, SYNs to that peer are refused at once for this long.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(2);
/// A session with flows is proven again this long before it expires.
pub const RENEW_AHEAD: Duration = Duration::from_secs(60);
/// Packets kept per peer while its path is being authenticated: a burst of
/// connects to a new member (a job starting on every node) completes as one
/// when its SYNs are all re-sent, not after TCP's 1 s retransmit. At most
/// 120 bytes each.
pub const MAX_HELD: usize = 2048;

/// What the agent must do for the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Writes a member's entry in the kernel's peer map.
    SetPeer(Ipv4Addr, KernelPath),
    /// Removes it: new flows to the member are refused at once.
    RemovePeer(Ipv4Addr),
    /// Installs an authenticated path: the route to the member via the next
    /// hop of its real address, then its kernel entry; then sends `then`
    /// (the responder's Done: the initiator's first SYN can never arrive
    /// before our path). The agent reports the outcome with
    /// `Core::installed` or `Core::install_failed`.
    Install {
        session: Session,
        path: connectivity::Path,
        then: Option<(Option<String>, Handshake)>,
    },
    /// Puts a flow's entries in the masquerading map, both directions (the
    /// reverse one with `twin_flags`): a traversal's ports, which tc
    /// cannot guess.
    InstallFlow {
        key: pvc_common::FlowKey,
        to: pvc_common::Masquerade,
        twin_flags: u8,
    },
    /// Puts a member's SYN for a flow it opens with a traversal into our
    /// stack, with what the flow needs (`ServedFlow`).
    ServeTraversal(Box<super::traversal::ServedFlow>),
    /// Makes sure the member's route goes via the next hop of `real` (a path
    /// taken over from the previous agent).
    Route { vip: Ipv4Addr, real: Ipv4Addr },
    /// Makes the member's address local: flows to it go through the relay.
    RelayRoute(Ipv4Addr),
    /// Joins a relayed flow a member opened (`coordinator::relay`).
    AcceptRelay(super::relay::RelayAccept),
    /// Sends a packet the agent made (a punch SYN), as it is.
    SendPacket(Vec<u8>),
    /// Removes the route of a member no flow uses any more.
    RemoveRoute(Ipv4Addr),
    /// Puts a held packet back on its way (its path now exists).
    Resend(Vec<u8>),
    /// Answers a held SYN with a RST: its connect() fails with ECONNREFUSED.
    Refuse(Vec<u8>),
    /// A handshake message for a member, through `via`, a broker both
    /// are connected to.
    Send {
        to: Ipv4Addr,
        via: Option<String>,
        message: Handshake,
    },
    /// Removes every flow entry with the member (revocation, expiry).
    CloseFlows(Ipv4Addr),
    /// Ends this host's connections with the member at once (the
    /// applications see ECONNABORTED): it moved to another address, which
    /// their wire tuples cannot follow.
    EndConnections(Ipv4Addr),
    /// The compiled policy changed: the kernel's policy map and settings.
    Policy(Compiled),
}

pub(super) enum Exchange {
    Initiating(Initiator),
    Confirming(Confirmed),
    Responding(Responder),
}

pub(super) struct Established {
    pub session: Session,
    pub since: Instant,
    /// A traversal to the member completed in this session: connect()s
    /// may go to its endpoint on the wire when the technique keeps its
    /// port (`PATH_SOCKET_TRAVERSAL`).
    pub traversed: bool,
}

impl Established {
    /// The kernel's entry for this session over `path`.
    pub fn kernel_path(&self, path: &connectivity::Path) -> KernelPath {
        kernel_path(&self.session, path, self.traversed)
    }
}

/// Requests remembered per member (`Core::first_time`): far more than run
/// at once (a traversal takes a second at most).
const REMEMBERED_REQUESTS: usize = 4096;

pub(super) struct Peer {
    pub member: Member,
    /// What the brokers say of it (its site, where they see it).
    pub info: pvc_proto::SiteInfo,
    /// The path connectivity proposes (the exchange binds its addresses).
    pub path: Option<connectivity::Path>,
    /// The brokers it has a session with now.
    pub present_on: BTreeSet<String>,
    /// Since when no broker lists it.
    pub absent_since: Option<Instant>,
    pub session: Option<Established>,
    pub exchange: Option<(ExchangeId, Exchange, Instant)>,
    pub held: Vec<Vec<u8>>,
    pub failed_at: Option<Instant>,
    /// The broker its last message came through: it reaches the member
    /// now, where another one listing it may have lost it without knowing.
    pub last_via: Option<String>,
    /// The pair went to the relay although its sites promised a direct
    /// path (a traversal did not complete, or the member chose the relay):
    /// since when. Direct is tried again later, once no flow is relayed.
    pub relay_since: Option<Instant>,
    /// When a refused tag last made us authenticate the path again.
    pub reauthenticated_at: Option<Instant>,
    /// When the authentication under way (or the last one) started.
    pub auth_started: Option<Instant>,
    /// Its latest traversal and relay requests served, by id: a broker
    /// may deliver a copy again, which must not be served twice.
    pub requests: std::collections::VecDeque<[u8; 16]>,
}

impl Peer {
    pub fn new(member: Member, path: Option<connectivity::Path>) -> Self {
        Self {
            member,
            info: Default::default(),
            path,
            present_on: BTreeSet::new(),
            absent_since: None,
            session: None,
            exchange: None,
            held: Vec::new(),
            failed_at: None,
            last_via: None,
            relay_since: None,
            reauthenticated_at: None,
            auth_started: None,
            requests: std::collections::VecDeque::new(),
        }
    }

    /// The technique its path uses (or will use).
    pub fn technique(&self) -> Technique {
        self.path.map_or(Technique::Direct, |h| h.technique)
    }
}

/// The kernel's entry for an authenticated path; `traversed`: a traversal
/// over it has worked (`Established::traversed`).
pub(super) fn kernel_path(
    session: &Session,
    path: &connectivity::Path,
    traversed: bool,
) -> KernelPath {
    let mut flags = path_flags(path.technique);
    if traversed && path.technique.keeps_server_port() {
        flags |= pvc_common::PATH_SOCKET_TRAVERSAL;
    }
    KernelPath::ready(
        session.peer_real.octets(),
        path.technique as u8,
        path.port,
        flags,
        session.tag_key,
    )
}

/// The kernel's flags for a path of this technique, authenticated or not.
fn path_flags(technique: Technique) -> u8 {
    if technique.per_flow() || technique == Technique::Relay {
        pvc_common::PATH_PER_FLOW
    } else {
        0
    }
}

/// Who this agent is.
pub struct Identity {
    pub name: String,
    pub virtual_ip: Ipv4Addr,
    pub key: Arc<KeyPair>,
    /// The uplink's address (source of masqueraded packets).
    pub real_ip: Ipv4Addr,
    /// Real addresses registered with the broker.
    pub advertised: Vec<Ipv4Addr>,
    /// The uplink's networks (a member on one of them is a LAN neighbour).
    pub networks: Vec<LocalNet>,
}

/// The coordinator's state.
pub struct Core {
    pub(super) me: Identity,
    pub(super) limits: Limits,
    pub trust: Trust,
    /// This host's own record, once a broker handed it over and it verified.
    pub own: Option<Member>,
    pub(super) local_policy: LocalPolicy,
    pub(super) compiled: Option<Compiled>,
    pub(super) peers: BTreeMap<Ipv4Addr, Peer>,
    /// Exchanges in progress, by id: a message finds its peer in one lookup.
    pub(super) exchanges: HashMap<ExchangeId, Ipv4Addr>,
    /// Paths found in the kernel at start (left by a previous agent): kept
    /// until the broker confirms the member or the grace period ends.
    pub(super) inherited: BTreeMap<Ipv4Addr, (Instant, KernelPath)>,
    /// Members with a route: those with a path, and those gone whose flows
    /// still use theirs.
    pub(super) routed: BTreeSet<Ipv4Addr>,
    /// Peers with flows in the masquerading map, as of the last GC pass.
    pub(super) active: BTreeSet<Ipv4Addr>,
    /// Members with relayed flows running (the agent's relay tasks).
    pub(super) relayed: BTreeSet<Ipv4Addr>,
    /// The brokers this agent has a session with, and where each sees it.
    pub brokers: BTreeMap<String, std::net::SocketAddrV4>,
    /// What the core did with held packets, for `pvc status`.
    pub(super) counters: BTreeMap<&'static str, u64>,
    /// What this host knows of its own network.
    pub(super) site: pvc_proto::SiteInfo,
    /// Traversals of single flows under way, by id.
    pub(super) flows: HashMap<u64, super::traversal::Flow>,
    /// Handshakes and connection set-up times, for the metrics.
    pub metrics: super::metrics::CoreMetrics,
}

impl Core {
    pub fn new(me: Identity, limits: Limits, trust: Trust, local_policy: LocalPolicy) -> Self {
        Self {
            me,
            limits,
            trust,
            own: None,
            local_policy,
            compiled: None,
            peers: BTreeMap::new(),
            exchanges: HashMap::new(),
            inherited: BTreeMap::new(),
            routed: BTreeSet::new(),
            active: BTreeSet::new(),
            relayed: BTreeSet::new(),
            brokers: BTreeMap::new(),
            counters: BTreeMap::new(),
            site: Default::default(),
            flows: HashMap::new(),
            metrics: Default::default(),
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.me
    }

    /// What this host found out about its network (NAT, filtering, UPnP):
    /// the paths to every member are chosen again.
    pub fn set_site(&mut self, site: pvc_proto::SiteInfo) -> Vec<Effect> {
        self.site = site;
        let mut out = Vec::new();
        let vips: Vec<Ipv4Addr> = self.peers.keys().copied().collect();
        for vip in vips {
            self.choose_path(vip, &mut out);
        }
        out
    }

    /// Whether the policy lets `peer` open a flow to our `port` (a flow the
    /// kernel does not see open: one the agent injects).
    pub(super) fn allows_inbound(&self, peer: Ipv4Addr, port: u16) -> bool {
        self.compiled
            .as_ref()
            .is_none_or(|c| policy::allows(c, pvc_common::POLICY_INBOUND, peer, port))
    }

    /// This host's addresses a member may send to: its own, the public one
    /// the brokers see, its UPnP gateway's.
    pub(super) fn our_addresses(&self) -> Vec<Ipv4Addr> {
        let mut ours = self.me.advertised.clone();
        ours.push(self.me.real_ip);
        ours.extend(self.site.public);
        ours.extend(self.site.upnp.map(|u| *u.ip()));
        ours
    }

    /// The path to member `vip` from what both sites know; when it changes,
    /// the kernel's entry follows. A path whose addresses stay those the
    /// exchange bound keeps its session (only the technique or port
    /// changed); otherwise the path is authenticated again.
    pub(super) fn choose_path(&mut self, vip: Ipv4Addr, out: &mut Vec<Effect>) {
        let Some(p) = self.peers.get(&vip) else {
            return;
        };
        let mut path = connectivity::choose(&connectivity::Pair {
            networks: &self.me.networks,
            real_ip: self.me.real_ip,
            me: &self.site,
            member: &p.member,
            peer: &p.info,
        });
        let their_choice_is_relay = || {
            // Relay is a property of the pair (the member's address is made
            // local on each side): if the member can reach us only through
            // it, we use it too, or its replies to our direct flows would
            // stay on its host.
            self.own.as_ref().is_some_and(|own| {
                let us = Member {
                    addresses: self.me.advertised.clone(),
                    ..own.clone()
                };
                connectivity::choose(&connectivity::Pair {
                    networks: &[],
                    real_ip: p
                        .member
                        .addresses
                        .first()
                        .copied()
                        .unwrap_or(Ipv4Addr::UNSPECIFIED),
                    me: &p.info,
                    member: &us,
                    peer: &self.site,
                })
                .is_some_and(|c| c.technique == Technique::Relay)
            })
        };
        if let Some(path) = path.as_mut()
            && path.technique != Technique::Lan
            && (p.relay_since.is_some() || their_choice_is_relay())
        {
            path.technique = Technique::Relay;
        }
        if path == p.path {
            return;
        }
        let p = self.peers.get_mut(&vip).expect("looked up");
        let was_relay = p.technique() == Technique::Relay;
        p.path = path;
        if let Some(s) = p.session.as_mut() {
            // Whether traversals work is for the new path to show.
            s.traversed = false;
        }
        match (&p.session, path) {
            (Some(s), Some(path)) if path.real == s.session.peer_real => {
                tracing::info!(name = p.member.name, %vip, technique = path.technique.name(), "path to member changed technique");
                // The route follows: local for the relay, via the uplink
                // otherwise.
                let relay = path.technique == Technique::Relay;
                if relay && !was_relay {
                    out.push(Effect::RelayRoute(vip));
                } else if was_relay && !relay {
                    out.push(Effect::Route {
                        vip,
                        real: s.session.peer_real,
                    });
                }
                out.push(Effect::SetPeer(vip, s.kernel_path(&path)));
            }
            (Some(s), new) => {
                tracing::info!(name = p.member.name, %vip, "member's path moved; it will be authenticated again");
                if new.is_some_and(|n| n.real != s.session.peer_real) {
                    out.push(Effect::EndConnections(vip));
                }
                p.session = None;
                if let Some((id, _, _)) = p.exchange.take() {
                    self.exchanges.remove(&id);
                }
                self.publish_member(vip, out);
            }
            (None, _) => self.publish_member(vip, out),
        }
    }

    /// What a previous agent of this instance left in the kernel: its peer
    /// entries and its member routes. Established flows keep using them
    /// until the broker says who is still a member.
    pub fn inherit(
        &mut self,
        paths: Vec<(Ipv4Addr, KernelPath)>,
        routes: Vec<Ipv4Addr>,
        now: Instant,
    ) {
        for (vip, path) in paths {
            self.inherited.insert(vip, (now, path));
        }
        self.routed.extend(routes);
    }

    /// Peers with flows in the masquerading map (from the agent's GC pass).
    pub fn set_active(&mut self, active: BTreeSet<Ipv4Addr>) {
        self.active = active;
    }

    /// Members with relayed flows (from the agent's relay tasks).
    pub fn set_relayed(&mut self, relayed: BTreeSet<Ipv4Addr>) {
        self.relayed = relayed;
    }

    pub(super) fn count(&mut self, what: &'static str) {
        *self.counters.entry(what).or_default() += 1;
    }

    pub fn counters(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.counters.iter().map(|(k, v)| (*k, *v))
    }

    pub(super) fn me(&self) -> Me<'_> {
        Me {
            key: &self.me.key,
            cluster: self.trust.cluster,
            virtual_ip: self.me.virtual_ip,
        }
    }

    /// Compiles local and global policy for every known member; an effect
    /// only when the result changed.
    pub(super) fn recompile_policy(&mut self, out: &mut Vec<Effect>) {
        let members: Vec<Member> = self.peers.values().map(|p| p.member.clone()).collect();
        let groups = self
            .own
            .as_ref()
            .map(|o| o.groups.clone())
            .unwrap_or_default();
        let me = Subject {
            name: &self.me.name,
            groups: &groups,
        };
        let compiled = policy::compile(&self.local_policy, &self.trust.policy, &me, &members);
        if self.compiled.as_ref() != Some(&compiled) {
            self.compiled = Some(compiled.clone());
            out.push(Effect::Policy(compiled));
        }
    }

    /// The policy as compiled now (the agent installs it at start).
    pub fn policy(&mut self) -> Vec<Effect> {
        let mut out = Vec::new();
        self.recompile_policy(&mut out);
        out
    }

    /// Members with an authenticated path routed via the uplink: (virtual,
    /// real) address.
    pub fn routed_sessions(&self) -> Vec<(Ipv4Addr, Ipv4Addr)> {
        self.peers
            .iter()
            // A relayed member's route is local: no next hop to follow.
            .filter(|(_, p)| p.technique() != Technique::Relay)
            .filter_map(|(vip, p)| p.session.as_ref().map(|s| (*vip, s.session.peer_real)))
            .collect()
    }

    /// Tells the kernel about a member without an authenticated path: its
    /// connects are allowed, their SYNs held for the agent. The path the
    /// agents will authenticate comes with it: a direct one lets the first
    /// flow go at the socket from connect() on.
    pub(super) fn publish_member(&self, vip: Ipv4Addr, out: &mut Vec<Effect>) {
        let Some(p) = self.peers.get(&vip) else {
            return;
        };
        if p.session.is_some() {
            return;
        }
        let path = match p.path {
            Some(h) => KernelPath::member(
                h.real.octets(),
                h.technique as u8,
                h.port,
                path_flags(h.technique),
            ),
            None => KernelPath::member([0; 4], p.technique() as u8, 0, 0),
        };
        out.push(Effect::SetPeer(vip, path));
    }

    /// Sets (or clears) a peer's exchange, keeping the index by id.
    pub(super) fn set_exchange(
        &mut self,
        vip: Ipv4Addr,
        exchange: Option<(ExchangeId, Exchange)>,
        now: Instant,
    ) {
        let Some(p) = self.peers.get_mut(&vip) else {
            return;
        };
        if let Some((old, _, _)) = p.exchange.take() {
            self.exchanges.remove(&old);
        }
        if let Some((id, e)) = exchange {
            self.exchanges.insert(id, vip);
            p.exchange = Some((id, e, now));
            p.auth_started.get_or_insert(now);
        }
    }

    /// Takes the exchange `id` out of its peer, if it is in progress.
    pub(super) fn take_exchange(&mut self, id: &ExchangeId) -> Option<(Ipv4Addr, Exchange)> {
        let vip = self.exchanges.remove(id)?;
        let p = self.peers.get_mut(&vip)?;
        match p.exchange.take() {
            Some((eid, e, _)) if eid == *id => Some((vip, e)),
            other => {
                p.exchange = other;
                None
            }
        }
    }

    /// Whether a member's traversal or relay request (by `id`) is served for
    /// the first time. Its MAC proves the member made it, not that it is
    /// new: the broker relaying it could deliver it again.
    pub(super) fn first_time(&mut self, from: Ipv4Addr, id: [u8; 16]) -> bool {
        let Some(p) = self.peers.get_mut(&from) else {
            return false;
        };
        if p.requests.contains(&id) {
            return false;
        }
        if p.requests.len() >= REMEMBERED_REQUESTS {
            p.requests.pop_front();
        }
        p.requests.push_back(id);
        true
    }

    /// A message for member `to`, through a broker it is connected to
    /// (any of ours, if none is known: the broker answers Undeliverable).
    pub(super) fn send(&self, to: Ipv4Addr, message: Handshake, out: &mut Vec<Effect>) {
        let via = self
            .broker_for(to)
            .or_else(|| self.brokers.keys().next().cloned());
        out.push(Effect::Send { to, via, message });
    }

    /// A connected broker member `to` is on: the one it last spoke through
    /// first (its answers come back the same way).
    pub(super) fn broker_for(&self, to: Ipv4Addr) -> Option<String> {
        let p = self.peers.get(&to)?;
        p.last_via
            .iter()
            .chain(&p.present_on)
            .find(|b| self.brokers.contains_key(*b))
            .cloned()
    }

    /// Refuses every packet waiting for `p`'s path.
    pub(super) fn refuse_held(
        held: &mut Vec<Vec<u8>>,
        counters: &mut BTreeMap<&'static str, u64>,
        out: &mut Vec<Effect>,
    ) {
        for packet in held.drain(..) {
            *counters.entry("held_refused").or_default() += 1;
            out.push(Effect::Refuse(packet));
        }
    }

    /// A member left, was revoked or expired: new flows to it are refused at
    /// once. With `cut`, its established flows end too; otherwise its route
    /// stays while they last (a broker outage must not cut them).
    pub(super) fn forget(&mut self, vip: Ipv4Addr, cut: bool, out: &mut Vec<Effect>) {
        if let Some(mut p) = self.peers.remove(&vip) {
            if let Some((id, _, _)) = p.exchange.take() {
                self.exchanges.remove(&id);
            }
            Self::refuse_held(&mut p.held, &mut self.counters, out);
        }
        out.push(Effect::RemovePeer(vip));
        if cut {
            out.push(Effect::CloseFlows(vip));
        }
        self.recompile_policy(out);
    }

    /// Ends grace periods, expired records, and routes no flow uses any more.
    pub fn expire(&mut self, now: Instant, unix_now: u64) -> Vec<Effect> {
        let mut out = Vec::new();
        let grace = self.limits.absence_grace;
        let gone: Vec<(Ipv4Addr, bool)> = self
            .peers
            .iter()
            .filter_map(|(vip, p)| {
                if p.member.not_after < unix_now {
                    warn!(name = p.member.name, %vip, "member's record expired");
                    Some((*vip, true))
                } else if p
                    .absent_since
                    .is_some_and(|t| now.saturating_duration_since(t) > grace)
                {
                    tracing::info!(name = p.member.name, %vip, "member no longer listed by any broker");
                    Some((*vip, false))
                } else {
                    None
                }
            })
            .collect();
        for (vip, cut) in gone {
            self.forget(vip, cut, &mut out);
        }
        let inherited: Vec<Ipv4Addr> = self
            .inherited
            .iter()
            .filter(|(_, (t, _))| now.saturating_duration_since(*t) > grace)
            .map(|(vip, _)| *vip)
            .collect();
        for vip in inherited {
            self.inherited.remove(&vip);
            self.forget(vip, false, &mut out);
        }
        let unused: Vec<Ipv4Addr> = self
            .routed
            .iter()
            .filter(|vip| {
                !self.active.contains(vip)
                    && self.peers.get(vip).is_none_or(|p| p.session.is_none())
                    && !self.inherited.contains_key(vip)
            })
            .copied()
            .collect();
        for vip in unused {
            self.routed.remove(&vip);
            out.push(Effect::RemoveRoute(vip));
        }
        out
    }
}
