//! Paths to peers: no masquerading entry is installed for a member before
//! the two agents proved, to each other, that each holds the key the master
//! admitted (`security::challenge`), over the path's real endpoints.
//!
//! The first SYN to a member without such a path is held by tc egress and
//! handed here; the exchange runs through the broker; once both sides have
//! installed the path the SYN is re-sent, so the application's connect()
//! completes as soon as the path exists. Later flows need no agent (on a
//! path whose every flow needs a traversal, the agents open each one).

use std::{net::Ipv4Addr, time::Instant};

use pvc_proto::handshake::Handshake;
use tracing::{debug, info, warn};

use super::core::{Core, Effect, Established, Exchange, FAILURE_MEMORY, MAX_HELD, RENEW_AHEAD};
use crate::security::challenge::{self, Session};

impl Core {
    /// A packet held by tc egress (a SYN, a ping) for a member without an
    /// authenticated path: authenticate it, then re-send the packet.
    pub fn held(&mut self, peer: Ipv4Addr, packet: Option<Vec<u8>>, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(p) = self.peers.get_mut(&peer) else {
            debug!(%peer, "held packet for an unknown member: dropped");
            return out;
        };
        if p.session.is_some() {
            let per_flow = p.technique().per_flow();
            if let Some(packet) = packet {
                if awaits_path_at_socket(&packet) {
                    // A first flow translated at the socket, and the path
                    // came up between its SYN and this event: tc egress
                    // tags it on its way, or refuses it if the path no
                    // longer takes it at the socket.
                    out.push(Effect::Resend(packet));
                    self.count("held_resent");
                } else if per_flow {
                    // A flow to a member behind a NAT or firewall: the
                    // agents open the way for this one.
                    self.start_flow(peer, packet, now, &mut out);
                } else if at_socket(&packet) {
                    // Translated at the socket for a traversal the path no
                    // longer takes (it moved to the relay, say): sent as
                    // it is, it would bypass the path. Its connect() fails
                    // at once; the next one takes the path as it is.
                    out.push(Effect::Refuse(packet));
                    self.count("held_refused");
                } else {
                    // The path came up (or the member's address became
                    // local, for the relay) between the packet and this event.
                    out.push(Effect::Resend(packet));
                    self.count("held_resent");
                }
            }
            return out;
        }
        if p.failed_at
            .is_some_and(|t| now.saturating_duration_since(t) < FAILURE_MEMORY)
        {
            if let Some(packet) = packet {
                out.push(Effect::Refuse(packet));
                self.count("held_refused");
            }
            return out;
        }
        let start = p.exchange.is_none();
        let mut overflow = false;
        if let Some(packet) = packet {
            if p.held.len() < MAX_HELD {
                p.held.push(packet);
            } else {
                // TCP retransmits it after a second.
                overflow = true;
            }
        }
        if overflow {
            self.count("held_overflow");
        }
        if start {
            self.initiate(peer, now, &mut out);
        }
        out
    }

    /// A member's SYN was refused for its tag: one of the two ends holds a
    /// key the other does not (an agent restarted). A new exchange gives both
    /// the same key; the member's retransmitted SYN then passes. Only for a
    /// known member at the real address we know for it, and not more often
    /// than failures are remembered.
    pub fn tag_refused(&mut self, claimed: Ipv4Addr, real: Ipv4Addr, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(p) = self.peers.get_mut(&claimed) else {
            return out;
        };
        let expected = p
            .session
            .as_ref()
            .map(|s| s.session.peer_real)
            .or(p.path.map(|h| h.real));
        if expected != Some(real)
            || p.exchange.is_some()
            || p.reauthenticated_at
                .is_some_and(|t| now.saturating_duration_since(t) < FAILURE_MEMORY)
        {
            return out;
        }
        info!(name = p.member.name, %claimed, "the member's SYN carried a tag we cannot check: authenticating the path again");
        p.reauthenticated_at = Some(now);
        self.initiate(claimed, now, &mut out);
        out
    }

    fn initiate(&mut self, peer: Ipv4Addr, now: Instant, out: &mut Vec<Effect>) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        let Some(path) = p.path else {
            warn!(name = p.member.name, "no address to reach the member at");
            return;
        };
        // The exchange binds the addresses the path uses on the wire: ours
        // as the member sees it, and its own.
        match challenge::initiate(&self.me(), &p.member, path.local, path.real) {
            Ok((initiator, init)) => {
                debug!(name = p.member.name, %peer, "authenticating the path to the member");
                let id = initiator.id;
                self.send(peer, init, out);
                self.set_exchange(peer, Some((id, Exchange::Initiating(initiator))), now);
            }
            Err(e) => warn!(%peer, "cannot start an exchange: {e}"),
        }
    }

    /// A handshake message relayed by the broker. Its claims are checked
    /// against the master-signed record of the member it says it is from.
    /// `via`: the broker it came through (a relayed flow joins there).
    pub fn relayed(
        &mut self,
        from: Ipv4Addr,
        via: Option<&str>,
        payload: &[u8],
        now: Instant,
    ) -> Vec<Effect> {
        let mut out = Vec::new();
        if let (Some(via), Some(p)) = (via, self.peers.get_mut(&from)) {
            p.last_via = Some(via.to_string());
        }
        let Some(msg) = Handshake::decode(payload) else {
            warn!(%from, "ignoring a relayed message that does not decode");
            return out;
        };
        match msg {
            Handshake::Init(init) => self.on_init(init, now, &mut out),
            Handshake::Reply(reply) => {
                let Some((peer, Exchange::Initiating(initiator))) = self.take_exchange(&reply.id)
                else {
                    return out;
                };
                match initiator.on_reply(&self.me(), &reply) {
                    Ok((confirmed, confirm)) => {
                        self.send(peer, confirm, &mut out);
                        self.set_exchange(
                            peer,
                            Some((reply.id, Exchange::Confirming(confirmed))),
                            now,
                        );
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        self.send(
                            peer,
                            Handshake::Refused {
                                id: reply.id,
                                reason: reason.clone(),
                            },
                            &mut out,
                        );
                        self.fail(peer, &reason, now, &mut out);
                    }
                }
            }
            Handshake::Confirm(confirm) => {
                let Some((peer, Exchange::Responding(responder))) = self.take_exchange(&confirm.id)
                else {
                    return out;
                };
                match responder.on_confirm(&confirm) {
                    // Installed before Done goes out: the initiator's first
                    // SYN can never arrive before our path.
                    Ok((session, done)) => self.install(session, Some(done), &mut out),
                    Err(e) => {
                        let reason = e.to_string();
                        self.send(
                            peer,
                            Handshake::Refused {
                                id: confirm.id,
                                reason: reason.clone(),
                            },
                            &mut out,
                        );
                        self.fail(peer, &reason, now, &mut out);
                    }
                }
            }
            Handshake::Done(done) => {
                let Some((peer, Exchange::Confirming(confirmed))) = self.take_exchange(&done.id)
                else {
                    return out;
                };
                match confirmed.on_done(&done) {
                    Ok(session) => self.install(session, None, &mut out),
                    Err(e) => self.fail(peer, &e.to_string(), now, &mut out),
                }
            }
            Handshake::Refused { id, reason } => {
                if let Some((peer, _)) = self.take_exchange(&id) {
                    self.fail(peer, &format!("the peer refused: {reason}"), now, &mut out);
                }
            }
            Handshake::Traverse(t) => self.traverse(from, t, now, &mut out),
            Handshake::Punched(p) => self.punched(from, p, now, &mut out),
            Handshake::RelayFlow(r) => self.relay_in(from, via, r, &mut out),
        }
        out
    }

    fn on_init(&mut self, init: pvc_proto::handshake::Init, now: Instant, out: &mut Vec<Effect>) {
        let claimed = init.initiator;
        let Some(p) = self.peers.get(&claimed) else {
            warn!(%claimed, "refusing an exchange from an address no verified member holds");
            self.send(
                claimed,
                Handshake::Refused {
                    id: init.id,
                    reason: "you are not a member I know".into(),
                },
                out,
            );
            return;
        };
        if let Some((_, Exchange::Initiating(_) | Exchange::Confirming(_), _)) = &p.exchange
            && self.me.virtual_ip < claimed
        {
            // Glare: both started at once. The lower address initiates; the
            // other side answers ours and drops its own.
            return;
        }
        let ours = self.our_addresses();
        match challenge::respond(&self.me(), &init, &p.member, &ours) {
            Ok((responder, reply)) => {
                self.send(claimed, reply, out);
                self.set_exchange(
                    claimed,
                    Some((init.id, Exchange::Responding(responder))),
                    now,
                );
            }
            Err(e) => {
                warn!(name = p.member.name, %claimed, "refusing an exchange: {e}");
                self.send(
                    claimed,
                    Handshake::Refused {
                        id: init.id,
                        reason: e.to_string(),
                    },
                    out,
                );
            }
        }
    }

    /// The broker could not deliver to `to`: its exchange fails.
    pub fn undeliverable(&mut self, to: Ipv4Addr, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        self.fail(
            to,
            "the broker cannot reach that member (it is not connected)",
            now,
            &mut out,
        );
        out
    }

    fn install(&mut self, session: Session, then: Option<Handshake>, out: &mut Vec<Effect>) {
        let path = self
            .peers
            .get(&session.peer)
            .and_then(|p| p.path)
            .unwrap_or(crate::connectivity::Path {
                real: session.peer_real,
                local: session.local_real,
                technique: pvc_common::Technique::Direct,
                port: 0,
            });
        // The Done goes through a broker the peer is on, like every message.
        let then = then.map(|h| {
            let mut routed = Vec::new();
            self.send(session.peer, h, &mut routed);
            match routed.pop() {
                Some(Effect::Send { via, message, .. }) => (via, message),
                _ => unreachable!("send pushes one Send"),
            }
        });
        out.push(Effect::Install {
            session,
            path,
            then,
        });
    }

    /// The agent installed the path `session` proved: the packets that
    /// waited for it go out again.
    pub fn installed(&mut self, session: Session, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        let vip = session.peer;
        self.routed.insert(vip);
        let Some(p) = self.peers.get_mut(&vip) else {
            return out;
        };
        info!(name = p.member.name, virtual_ip = %vip, real = %session.peer_real,
              technique = p.technique().name(), "path to member authenticated and installed");
        // A session renewed over the same path keeps what its traversals
        // showed (the member's NAT keeps its port), and with it connect()s
        // at the socket: the installed kernel path does not carry it yet.
        let traversed = p
            .session
            .as_ref()
            .is_some_and(|s| s.traversed && s.session.peer_real == session.peer_real);
        let renewed = Established {
            session,
            since: now,
            traversed,
        };
        if traversed && let Some(path) = p.path {
            out.push(Effect::SetPeer(vip, renewed.kernel_path(&path)));
        }
        p.session = Some(renewed);
        p.failed_at = None;
        if let Some(started) = p.auth_started.take() {
            let took = now.saturating_duration_since(started);
            self.metrics.handshake(true, took);
            if !p.held.is_empty() && !p.technique().per_flow() {
                // The held SYNs go out now (traversals report their own).
                self.metrics.connection_setup(p.technique().name(), took);
            }
        }
        if p.relay_since.is_some() && !self.relayed.contains(&vip) {
            // A new exchange (an agent restarted, a session renewed) with
            // no relayed flow running: both ends try the direct technique
            // their sites allow again, and fall back again if it fails.
            p.relay_since = None;
            self.choose_path(vip, &mut out);
        }
        let Some(p) = self.peers.get_mut(&vip) else {
            return out;
        };
        let per_flow = p.technique().per_flow();
        let held = std::mem::take(&mut p.held);
        for packet in held {
            if per_flow && awaits_path_at_socket(&packet) {
                // The path became one every flow needs the agents for:
                // the application's next connect() takes it, from the
                // virtual address.
                self.count("held_refused");
                out.push(Effect::Refuse(packet));
            } else if per_flow {
                // Every flow to this member needs a traversal: now it can
                // start. (Relayed ones go again, now to a local address.)
                self.start_flow(vip, packet, now, &mut out);
            } else {
                self.count("held_resent");
                out.push(Effect::Resend(packet));
            }
        }
        out
    }

    /// The agent could not install a path (no route to its real address...).
    pub fn install_failed(&mut self, vip: Ipv4Addr, why: &str, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        self.fail(vip, why, now, &mut out);
        out
    }

    /// An exchange failed: the SYNs that waited for it are refused at once
    /// (their connect() fails with ECONNREFUSED), and so are new ones for a
    /// moment.
    fn fail(&mut self, peer: Ipv4Addr, why: &str, now: Instant, out: &mut Vec<Effect>) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let had_exchange = p.exchange.is_some();
        if let Some((id, _, _)) = p.exchange.take() {
            self.exchanges.remove(&id);
        }
        if let Some(started) = p.auth_started.take() {
            self.metrics
                .handshake(false, now.saturating_duration_since(started));
        }
        if had_exchange || !p.held.is_empty() {
            warn!(name = p.member.name, %peer, "could not authenticate the path to the member: {why}");
            p.failed_at = Some(now);
            Self::refuse_held(&mut p.held, &mut self.counters, out);
        }
    }

    /// Times out exchanges; proves again sessions that are about to expire
    /// while flows use them, and lets idle ones lapse.
    pub fn check_sessions(&mut self, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        self.expire_flows(now, &mut out);
        let timeout = self.limits.handshake_timeout;
        let lifetime = self.limits.session_lifetime;
        let stale: Vec<Ipv4Addr> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.exchange
                    .as_ref()
                    .is_some_and(|(_, _, t)| now.saturating_duration_since(*t) > timeout)
            })
            .map(|(vip, _)| *vip)
            .collect();
        for vip in stale {
            self.fail(vip, &format!("no answer within {timeout:?}"), now, &mut out);
        }
        let mut renew = Vec::new();
        let mut lapse = Vec::new();
        for (vip, p) in &self.peers {
            let Some(s) = &p.session else {
                continue;
            };
            let age = now.saturating_duration_since(s.since);
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
            self.initiate(vip, now, &mut out);
        }
        for vip in lapse {
            if let Some(p) = self.peers.get_mut(&vip) {
                debug!(name = p.member.name, "authenticated path expired");
                p.session = None;
            }
            self.publish_member(vip, &mut out);
        }
        out
    }
}

/// Whether a held packet was translated at the socket (it goes to the
/// member's real address, not its virtual one).
fn at_socket(packet: &[u8]) -> bool {
    packet
        .get(16..20)
        .and_then(|d| <[u8; 4]>::try_from(d).ok())
        .is_some_and(|d| !pvc_common::is_virtual(d))
}

/// Whether a held SYN is a first flow translated at the socket that waits
/// for its path (`SOCKET_AWAIT_PATH`): to the member's real address and
/// without a tag (tc egress tags the SYNs of traversals before it holds
/// them, and tags this one when the agent sends it again).
fn awaits_path_at_socket(packet: &[u8]) -> bool {
    at_socket(packet) && !super::traversal::tagged(packet)
}
