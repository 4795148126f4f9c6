//! Paths to peers: no masquerading entry is installed for a member before
//! the two agents proved, to each other, that each holds the key the master
//! admitted (`security::challenge`), over the path's real endpoints.
//!
//! The first SYN to a member without such a path is held by tc egress and
//! handed here; the exchange runs through the broker; once both sides have
//! installed the path the SYN is re-sent, so the application's connect()
//! completes as soon as the path exists. Later flows need no agent at all.

use std::{net::Ipv4Addr, time::Duration};

use pvc_common::{PEER_READY, PeerPath as KernelPath, Technique};
use pvc_proto::handshake::Handshake;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Agent, broker::Relay};
use crate::{
    connectivity::Path,
    interposition::inject::Syn,
    security::{
        challenge::{self, Confirmed, Initiator, Me, Responder, Session},
        membership::Member,
    },
    virtualization,
};

/// Packets kept per peer while its path is being authenticated: a burst of
/// connects to a new member (a job starting on every node) completes as one
/// when its SYNs are all re-sent, not after TCP's 1 s retransmit. At most
/// 120 bytes each.
const MAX_HELD: usize = 2048;
/// After a failed exchange, SYNs to that peer are refused at once for this long.
const FAILURE_MEMORY: Duration = Duration::from_secs(2);
/// A session with flows is proven again this long before it expires.
const RENEW_AHEAD: Duration = Duration::from_secs(60);

pub(super) enum Exchange {
    Initiating(Initiator),
    Confirming(Confirmed, pvc_proto::handshake::ExchangeId),
    Responding(Responder),
}

impl Exchange {
    fn id(&self) -> pvc_proto::handshake::ExchangeId {
        match self {
            Self::Initiating(i) => i.id,
            Self::Confirming(_, id) => *id,
            Self::Responding(r) => r.id,
        }
    }
}

pub(super) struct Established {
    pub session: Session,
    pub via: Ipv4Addr,
    pub since: Instant,
}

pub(super) struct Peer {
    pub member: Member,
    /// The path connectivity proposes (confirmed by the exchange).
    pub hint: Option<Path>,
    pub absent_since: Option<Instant>,
    pub session: Option<Established>,
    pub exchange: Option<(Exchange, Instant)>,
    pub held: Vec<Vec<u8>>,
    pub failed_at: Option<Instant>,
    /// When a refused tag last made us authenticate the path again.
    pub reauthenticated_at: Option<Instant>,
}

impl Peer {
    pub fn new(member: Member, hint: Option<Path>) -> Self {
        Self {
            member,
            hint,
            absent_since: None,
            session: None,
            exchange: None,
            held: Vec::new(),
            failed_at: None,
            reauthenticated_at: None,
        }
    }

    /// Takes a session proven by the previous agent of this instance.
    pub fn adopt(&mut self, session: Session, via: Ipv4Addr) {
        self.session = Some(Established {
            session,
            via,
            since: Instant::now(),
        });
    }

    /// Forgets the proof (a record or path changed): the next SYN starts a
    /// new exchange. Established flows keep their entries.
    pub fn end_session(&mut self) {
        self.session = None;
        self.exchange = None;
    }
}

impl Agent {
    fn me(&self) -> Me<'_> {
        Me {
            key: &self.key,
            cluster: self.trust.cluster,
            virtual_ip: self.config.virtual_ip,
        }
    }

    fn send(&self, to: Ipv4Addr, h: &Handshake) {
        if self
            .relays
            .try_send(Relay {
                to,
                payload: h.encode(),
            })
            .is_err()
        {
            warn!(%to, "cannot queue a handshake message for the broker");
        }
    }

    /// A packet held by tc egress (a SYN, a ping): authenticate its member,
    /// then re-send it.
    pub(super) async fn on_held_packet(&mut self, peer: Ipv4Addr, packet: Option<Vec<u8>>) {
        let Some(p) = self.peers.get_mut(&peer) else {
            debug!(%peer, "held packet for an unknown member: dropped");
            return;
        };
        if p.session.is_some() {
            // The path came up between the packet and this event.
            if let Some(packet) = packet {
                self.resend(&packet);
            }
            return;
        }
        if p.failed_at.is_some_and(|t| t.elapsed() < FAILURE_MEMORY) {
            if let Some(packet) = packet {
                let _ = self.injector.refuse(&packet);
                self.count("held_refused");
            }
            return;
        }
        let start = p.exchange.is_none();
        if let Some(packet) = packet {
            if p.held.len() < MAX_HELD {
                p.held.push(packet);
            } else {
                // TCP retransmits it after a second.
                self.count("held_overflow");
            }
        }
        if start {
            self.initiate(peer);
        }
    }

    /// A member's SYN was refused for its tag: one of the two ends holds a
    /// key the other does not (an agent restarted). A new exchange gives both
    /// the same key; the member's retransmitted SYN then passes. Only for a
    /// known member at the real address we know for it, and not more often
    /// than failures are remembered.
    pub(super) fn reauthenticate(&mut self, claimed: Ipv4Addr, real: Ipv4Addr) {
        let Some(p) = self.peers.get_mut(&claimed) else {
            return;
        };
        let expected = p
            .session
            .as_ref()
            .map(|s| s.session.peer_real)
            .or(p.hint.map(|h| h.real));
        if expected != Some(real)
            || p.exchange.is_some()
            || p.reauthenticated_at
                .is_some_and(|t| t.elapsed() < FAILURE_MEMORY)
        {
            return;
        }
        info!(name = p.member.name, %claimed, "the member's SYN carried a tag we cannot check: authenticating the path again");
        p.reauthenticated_at = Some(Instant::now());
        self.initiate(claimed);
    }

    fn initiate(&mut self, peer: Ipv4Addr) {
        let local_real = self.real_ip;
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        let Some(hint) = p.hint else {
            warn!(name = p.member.name, "no address to reach the member at");
            return;
        };
        match challenge::initiate(&self.me(), &p.member, local_real, hint.real) {
            Ok((initiator, init)) => {
                debug!(name = p.member.name, %peer, "authenticating the path to the member");
                self.send(peer, &init);
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.exchange = Some((Exchange::Initiating(initiator), Instant::now()));
                }
            }
            Err(e) => warn!(%peer, "cannot start an exchange: {e}"),
        }
    }

    /// A handshake message relayed by the broker. Its claims are checked
    /// against the master-signed record of the member it says it is from.
    pub(super) async fn on_relayed(&mut self, from: Ipv4Addr, payload: &[u8]) {
        let Some(msg) = Handshake::decode(payload) else {
            warn!(%from, "ignoring a relayed message that does not decode");
            return;
        };
        match msg {
            Handshake::Init(init) => {
                let claimed = init.initiator;
                let Some(p) = self.peers.get(&claimed) else {
                    warn!(%claimed, "refusing an exchange from an address no verified member holds");
                    self.send(
                        from,
                        &Handshake::Refused {
                            id: init.id,
                            reason: "you are not a member I know".into(),
                        },
                    );
                    return;
                };
                if let Some((Exchange::Initiating(_) | Exchange::Confirming(..), _)) = &p.exchange
                    && self.config.virtual_ip < claimed
                {
                    // Both started at once: the lower address initiates.
                    return;
                }
                let mut ours = self.advertised.clone();
                ours.push(self.real_ip);
                match challenge::respond(&self.me(), &init, &p.member, &ours) {
                    Ok((responder, reply)) => {
                        self.send(claimed, &reply);
                        if let Some(p) = self.peers.get_mut(&claimed) {
                            p.exchange = Some((Exchange::Responding(responder), Instant::now()));
                        }
                    }
                    Err(e) => {
                        warn!(name = p.member.name, %claimed, "refusing an exchange: {e}");
                        self.send(
                            claimed,
                            &Handshake::Refused {
                                id: init.id,
                                reason: e.to_string(),
                            },
                        );
                    }
                }
            }
            Handshake::Reply(reply) => {
                let Some(peer) = self.exchange_with(reply.id) else {
                    return;
                };
                let Some((Exchange::Initiating(initiator), _)) =
                    self.peers.get_mut(&peer).and_then(|p| p.exchange.take())
                else {
                    return;
                };
                match initiator.on_reply(&self.me(), &reply) {
                    Ok((confirmed, confirm)) => {
                        self.send(peer, &confirm);
                        if let Some(p) = self.peers.get_mut(&peer) {
                            p.exchange =
                                Some((Exchange::Confirming(confirmed, reply.id), Instant::now()));
                        }
                    }
                    Err(e) => {
                        self.send(
                            peer,
                            &Handshake::Refused {
                                id: reply.id,
                                reason: e.to_string(),
                            },
                        );
                        self.fail_exchange(peer, &e.to_string()).await;
                    }
                }
            }
            Handshake::Confirm(confirm) => {
                let Some(peer) = self.exchange_with(confirm.id) else {
                    return;
                };
                let Some((Exchange::Responding(responder), _)) =
                    self.peers.get_mut(&peer).and_then(|p| p.exchange.take())
                else {
                    return;
                };
                match responder.on_confirm(&confirm) {
                    Ok((session, done)) => {
                        // Installed before Done goes out: the initiator's
                        // first SYN can never arrive before our path.
                        if self.install(session).await {
                            self.send(peer, &done);
                        }
                    }
                    Err(e) => {
                        self.send(
                            peer,
                            &Handshake::Refused {
                                id: confirm.id,
                                reason: e.to_string(),
                            },
                        );
                        self.fail_exchange(peer, &e.to_string()).await;
                    }
                }
            }
            Handshake::Done(done) => {
                let Some(peer) = self.exchange_with(done.id) else {
                    return;
                };
                let Some((Exchange::Confirming(confirmed, _), _)) =
                    self.peers.get_mut(&peer).and_then(|p| p.exchange.take())
                else {
                    return;
                };
                match confirmed.on_done(&done) {
                    Ok(session) => {
                        self.install(session).await;
                    }
                    Err(e) => self.fail_exchange(peer, &e.to_string()).await,
                }
            }
            Handshake::Refused { id, reason } => {
                if let Some(peer) = self.exchange_with(id) {
                    self.fail_exchange(peer, &format!("the peer refused: {reason}"))
                        .await;
                }
            }
        }
    }

    /// The peer an exchange in progress is with.
    fn exchange_with(&self, id: pvc_proto::handshake::ExchangeId) -> Option<Ipv4Addr> {
        self.peers
            .iter()
            .find(|(_, p)| p.exchange.as_ref().is_some_and(|(e, _)| e.id() == id))
            .map(|(vip, _)| *vip)
    }

    /// Installs an authenticated path: the route via the real next hop,
    /// then the kernel entry with the session's tag key; then re-sends the
    /// SYNs that waited for it.
    async fn install(&mut self, session: Session) -> bool {
        let vip = session.peer;
        let technique = self
            .peers
            .get(&vip)
            .and_then(|p| p.hint)
            .map_or(Technique::Direct, |h| h.technique);
        let via = match virtualization::next_hop(&self.handle, session.peer_real).await {
            Ok((via, oif)) if oif == self.uplink.index => via,
            Ok(_) => {
                self.fail_exchange(
                    vip,
                    &format!(
                        "{} is routed through another interface than the uplink",
                        session.peer_real
                    ),
                )
                .await;
                return false;
            }
            Err(e) => {
                self.fail_exchange(vip, &format!("{e:#}")).await;
                return false;
            }
        };
        if let Err(e) = virtualization::set_peer_route(
            &self.handle,
            vip,
            via,
            self.uplink.index,
            self.config.virtual_ip,
        )
        .await
        {
            self.fail_exchange(vip, &format!("{e:#}")).await;
            return false;
        }
        self.retained_routes.remove(&vip);
        let path = KernelPath {
            real: session.peer_real.octets(),
            technique: technique as u8,
            state: PEER_READY,
            _pad: [0; 2],
            tag_key: session.tag_key,
        };
        if let Err(e) = self.datapath.maps.set_peer(vip, path) {
            self.fail_exchange(vip, &format!("{e:#}")).await;
            return false;
        }
        let Some(p) = self.peers.get_mut(&vip) else {
            return false;
        };
        info!(name = p.member.name, virtual_ip = %vip, real = %session.peer_real, %via,
              technique = technique.name(), "path to member authenticated and installed");
        p.session = Some(Established {
            session,
            via,
            since: Instant::now(),
        });
        p.failed_at = None;
        for packet in std::mem::take(&mut p.held) {
            self.resend(&packet);
        }
        true
    }

    fn resend(&mut self, packet: &[u8]) {
        match self.injector.resend(packet) {
            Ok(()) => self.count("held_resent"),
            Err(e) => warn!("cannot re-send a held packet: {e}"),
        }
    }

    /// An exchange failed: the SYNs that waited for it are refused at once
    /// (their connect() fails with ECONNREFUSED), and so are new ones for a
    /// moment.
    pub(super) async fn fail_exchange(&mut self, peer: Ipv4Addr, why: &str) {
        let Some(mut p) = self.peers.remove(&peer) else {
            return;
        };
        if p.exchange.take().is_some() || !p.held.is_empty() {
            warn!(name = p.member.name, %peer, "could not authenticate the path to the member: {why}");
            p.failed_at = Some(Instant::now());
            self.refuse_held(&mut p).await;
        }
        self.peers.insert(peer, p);
    }

    pub(super) async fn refuse_held(&mut self, p: &mut Peer) {
        for packet in std::mem::take(&mut p.held) {
            if let Some(syn) = Syn::parse(&packet) {
                debug!(src = %syn.saddr, port = syn.sport, "refusing a held SYN");
            }
            let _ = self.injector.refuse(&packet);
            self.count("held_refused");
        }
    }

    /// Times out exchanges; proves again sessions that are about to expire
    /// while flows use them, and lets idle ones lapse.
    pub(super) async fn check_exchanges_and_sessions(&mut self) {
        let timeout = Duration::from_millis(self.config.security.handshake_timeout_ms);
        let lifetime = Duration::from_secs(self.config.security.session_lifetime_secs);
        let stale: Vec<Ipv4Addr> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.exchange
                    .as_ref()
                    .is_some_and(|(_, t)| t.elapsed() > timeout)
            })
            .map(|(vip, _)| *vip)
            .collect();
        for vip in stale {
            self.fail_exchange(vip, &format!("no answer within {timeout:?}"))
                .await;
        }
        let mut renew = Vec::new();
        let mut lapse = Vec::new();
        for (vip, p) in &self.peers {
            let Some(s) = &p.session else {
                continue;
            };
            let age = s.since.elapsed();
            if self.active.contains(vip)
                && age + RENEW_AHEAD.min(lifetime / 2) > lifetime
                && p.exchange.is_none()
            {
                renew.push(*vip);
            } else if age > lifetime {
                lapse.push(*vip);
            }
        }
        for vip in renew {
            self.initiate(vip);
        }
        for vip in lapse {
            if let Some(p) = self.peers.get_mut(&vip) {
                debug!(name = p.member.name, "authenticated path expired");
                p.session = None;
            }
            self.publish_member(vip);
        }
    }

    /// Follows changes of the host's routing (a new gateway, a moved LAN).
    pub(super) async fn refresh_next_hops(&mut self) {
        let current: Vec<(Ipv4Addr, Ipv4Addr, Ipv4Addr)> = self
            .peers
            .iter()
            .filter_map(|(vip, p)| {
                p.session
                    .as_ref()
                    .map(|s| (*vip, s.session.peer_real, s.via))
            })
            .collect();
        for (vip, real, via) in current {
            match virtualization::next_hop(&self.handle, real).await {
                Ok((now, oif)) if now != via && oif == self.uplink.index => {
                    info!(%vip, "next hop changed ({via} -> {now})");
                    if virtualization::set_peer_route(
                        &self.handle,
                        vip,
                        now,
                        self.uplink.index,
                        self.config.virtual_ip,
                    )
                    .await
                    .is_ok()
                        && let Some(s) = self.peers.get_mut(&vip).and_then(|p| p.session.as_mut())
                    {
                        s.via = now;
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(%vip, "cannot check the route to {real}: {e:#}"),
            }
        }
    }
}
