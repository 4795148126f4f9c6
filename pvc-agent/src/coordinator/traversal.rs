//! Traversals of single flows (Traversing-TCP, hole punching, connection
//! reversal; `connectivity`): the client's agent holds the application's
//! SYN and sends it, through a broker, to the server's agent, which
//! installs the flow's entries, injects the SYN into its own stack and, to
//! punch, catches its stack's answer and sends its sequence number out as a
//! SYN first. Every message is authenticated with the pair's control key:
//! a broker can neither forge a request to inject a SYN nor redirect a
//! flow. All of it is core state: events in, effects out.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use pvc_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, FLOW_AWAIT_SYN, FLOW_AWAIT_SYNACK, FLOW_HOLD_SYNACK,
    FlowKey, IPPROTO_TCP, Masquerade, SOCKET_ACCEPTED, SOCKET_HOLD_ANSWER, SocketKey, SocketPeer,
    Technique,
};
use pvc_proto::Nat;
use pvc_proto::handshake::{Handshake, Punched, Traverse};
use tracing::{debug, info, warn};

use super::core::{Core, Effect};
use crate::{
    connectivity::punch,
    interposition::inject::{Syn, SynAck},
    security::challenge::{self, control_mac, control_mac_valid},
};

/// How long a flow's traversal may take before its SYN is refused.
/// (A direct path takes one broker round trip; the relay must still fit
/// in the application's patience.)
pub const TRAVERSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// A flow's traversal, on either side.
pub(super) struct Flow {
    pub peer: Ipv4Addr,
    pub technique: Technique,
    pub since: Instant,
    pub side: Side,
    /// The client's SYN went out on the opened way; the flow ends when our
    /// kernel sees the answer (`traversed`), or fails at the timeout.
    pub completing: bool,
}

pub(super) enum Side {
    /// We opened it: the application's SYN waits here. `wire_port`: the
    /// flow's port on our uplink (the application's, or the PVC port when
    /// the member reaches us through our UPnP forward). `port_kept`: the
    /// member's endpoint on the wire has the application's port (known
    /// when the way is open).
    Client {
        syn: Vec<u8>,
        sport: u16,
        wire_port: u16,
        port_kept: bool,
    },
    /// The member opened it: our stack's answer will come to us (punch).
    Server {
        client: SocketAddrV4,
        vport: u16,
        cport: u16,
    },
}

/// A member's SYN for a flow it opens with a traversal, for our stack: at
/// the socket (`at_socket`, under the wire's tuple from `client` to our
/// `real` address) when this host translates there and a listener takes
/// the real address, else masqueraded per packet (`InstallFlow` of `key`,
/// `to`, `twin_flags`, and the SYN as it came).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedFlow {
    pub syn: Vec<u8>,
    pub client: SocketAddrV4,
    pub real: Ipv4Addr,
    pub at_socket: SocketPeer,
    pub key: FlowKey,
    pub to: Masquerade,
    pub twin_flags: u8,
}

impl ServedFlow {
    /// Its key in the socket-flows map: the tuple on the wire.
    pub fn socket_key(&self) -> SocketKey {
        SocketKey {
            peer: self.client.ip().octets(),
            peer_port: self.client.port(),
            local_port: Syn::parse(&self.syn).map_or(0, |s| s.dport),
        }
    }

    /// The member's SYN as it will come on the wire (from its endpoint
    /// there to our real address), which our stack then takes for the
    /// same connection request: its checksum is left for the injector.
    pub fn wire_syn(&self) -> Vec<u8> {
        let mut p = readdressed(&self.syn, *self.client.ip(), self.real);
        let ihl = (p[0] & 0x0f) as usize * 4;
        p[ihl..ihl + 2].copy_from_slice(&self.client.port().to_be_bytes());
        p
    }
}

/// The entry of a flow as this host's egress sees it, rewritten to the
/// given wire tuple.
fn entry(peer: Ipv4Addr, technique: Technique, from: SocketAddrV4, to: SocketAddrV4) -> Masquerade {
    Masquerade {
        last_seen_ns: crate::interposition::monotonic_ns(),
        saddr: from.ip().octets(),
        daddr: to.ip().octets(),
        sport: from.port(),
        dport: to.port(),
        peer: peer.octets(),
        technique: technique as u8,
        ..Default::default()
    }
}

impl Core {
    /// An application's SYN to a member every flow to which needs a
    /// traversal: ask the member's agent to open the way.
    pub(super) fn start_flow(
        &mut self,
        peer: Ipv4Addr,
        packet: Vec<u8>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let (Some(syn), Some(p)) = (Syn::parse(&packet), self.peers.get(&peer)) else {
            return;
        };
        // Translated at the socket, the SYN goes to the member's public
        // address already; the member's agent gets it as its application
        // would have sent it to the virtual address.
        let at_socket = at_socket(&syn);
        let (Some(path), Some(session)) = (p.path, p.session.as_ref()) else {
            return;
        };
        if self.flows.values().any(|f| {
            f.peer == peer && matches!(f.side, Side::Client { sport, .. } if sport == syn.sport)
        }) {
            // The application's TCP retransmitted its SYN: the traversal
            // under way carries the first.
            return;
        }
        let id = u64::from_ne_bytes(challenge::random().unwrap_or_default());
        // Where the member's punch must go to reach this flow: our public
        // endpoint for the application's port, or, for a reversal from
        // behind our NAT, our UPnP forward (the PVC port).
        let (client, wire_port) = match self.site.upnp {
            Some(forward)
                if path.technique == Technique::Reversal && self.site.nat != Nat::None =>
            {
                (forward, self.site.port)
            }
            _ => (SocketAddrV4::new(path.local, syn.sport), syn.sport),
        };
        let mut t = Traverse {
            id,
            technique: path.technique as u8,
            syn: if at_socket {
                readdressed(&packet, self.me.virtual_ip, peer)
            } else {
                packet.clone()
            },
            client,
            mac: [0; 32],
        };
        t.mac = control_mac(&session.session.tag_key, &t.signed_part());
        if path.technique == Technique::Ttcp && at_socket {
            // Our SYN goes out first and opens our side (tc drops a RST
            // before the member's answer, `SOCKET_AWAIT_ANSWER`).
            out.push(Effect::Resend(packet.clone()));
        } else if path.technique == Technique::Ttcp {
            // Our SYN goes out first and opens our side; the member's
            // answer comes back on it. Until it does, a RST from the
            // member's firewall is not for our socket.
            let key = FlowKey::new(
                syn.saddr.octets(),
                syn.daddr.octets(),
                syn.sport,
                syn.dport,
                IPPROTO_TCP,
                DIRECTION_EGRESS,
            );
            let to = entry(
                peer,
                path.technique,
                SocketAddrV4::new(self.me.real_ip, syn.sport),
                SocketAddrV4::new(session.session.peer_real, syn.dport),
            );
            out.push(Effect::InstallFlow {
                key,
                to,
                twin_flags: FLOW_AWAIT_SYNACK,
            });
            out.push(Effect::Resend(packet.clone()));
        }
        debug!(%peer, id, technique = path.technique.name(), port = syn.dport, "traversal started");
        self.send(peer, Handshake::Traverse(t), out);
        self.count("traversals_started");
        self.flows.insert(
            id,
            super::traversal::Flow {
                peer,
                technique: path.technique,
                since: now,
                side: Side::Client {
                    syn: packet,
                    sport: syn.sport,
                    wire_port,
                    // Traversing-TCP goes to the member's own port.
                    port_kept: path.technique == Technique::Ttcp,
                },
                // Traversing-TCP: our SYN is out already.
                completing: path.technique == Technique::Ttcp,
            },
        );
    }

    /// A member asks us to open the way for one of its flows.
    pub(super) fn traverse(
        &mut self,
        from: Ipv4Addr,
        t: Traverse,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let technique = Technique::from_u8(t.technique).filter(|t| t.per_flow());
        let Some(session) = self
            .peers
            .get(&from)
            .and_then(|p| p.session.as_ref())
            .map(|s| s.session.clone())
        else {
            // Only an authenticated member may have a SYN injected here.
            warn!(%from, "refused a traversal request from a member without an authenticated path");
            self.count("traversals_refused");
            return;
        };
        let syn = Syn::parse(&t.syn);
        let valid = control_mac_valid(&session.tag_key, &t.signed_part(), &t.mac)
            && technique.is_some()
            // (The client's port on the wire may differ from its
            // application's: a reversal through its UPnP forward.)
            && syn.is_some_and(|s| s.saddr == from && s.daddr == self.me.virtual_ip);
        let (Some(technique), Some(syn), true) = (technique, syn, valid) else {
            warn!(%from, "refused a traversal request that does not check (forged or altered)");
            self.count("traversals_refused");
            return;
        };
        // Server-side flows share the table with ours, keyed by the
        // client's id: one in use is not taken over.
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&t.id.to_le_bytes());
        if self.flows.contains_key(&t.id) || !self.first_time(from, id) {
            warn!(%from, id = t.id, "refused a traversal request whose id was seen already (a replay?)");
            self.count("traversals_refused");
            return;
        }
        if !self.allows_inbound(from, syn.dport) {
            info!(%from, port = syn.dport, "refused a traversal: the policy does not allow it");
            self.count("traversals_refused");
            return;
        }
        // The flow as our ingress will see it: from the client's public
        // endpoint to our uplink, for the application's port.
        let key = FlowKey::new(
            t.client.ip().octets(),
            self.me.real_ip.octets(),
            t.client.port(),
            syn.dport,
            IPPROTO_TCP,
            DIRECTION_INGRESS,
        );
        let punching = technique != Technique::Ttcp;
        let mut to = entry(
            from,
            technique,
            SocketAddrV4::new(from, syn.sport),
            SocketAddrV4::new(self.me.virtual_ip, syn.dport),
        );
        to.peer = from.octets();
        if punching {
            // The client's SYN, when it comes, keeps this entry (and its
            // virtual port); until then a RST is our punch's rejection.
            to.flags = FLOW_AWAIT_SYN;
        }
        // Into our own stack: the application's listener answers it. At
        // the socket when the agent can (the SYN with the wire's tuple),
        // else masqueraded per packet.
        out.push(Effect::ServeTraversal(Box::new(ServedFlow {
            syn: t.syn,
            client: t.client,
            real: self.me.real_ip,
            at_socket: SocketPeer {
                vpeer: from.octets(),
                vport: syn.sport,
                technique: technique as u8,
                side: SOCKET_ACCEPTED,
                local_vport: 0,
                flags: if punching { SOCKET_HOLD_ANSWER } else { 0 },
            },
            key,
            to,
            twin_flags: if punching { FLOW_HOLD_SYNACK } else { 0 },
        })));
        self.count("traversals_served");
        debug!(%from, id = t.id, technique = technique.name(), port = syn.dport, "injected a member's SYN");
        if punching {
            self.flows.insert(
                t.id,
                Flow {
                    peer: from,
                    technique,
                    since: now,
                    side: Side::Server {
                        client: t.client,
                        vport: syn.dport,
                        cport: syn.sport,
                    },
                    completing: false,
                },
            );
        }
    }

    /// Our stack answered a SYN we injected for a flow we punch: its
    /// sequence number goes out first, as a SYN to the client.
    pub fn answer_held(&mut self, packet: &[u8], now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        let Some(answer) = SynAck::parse(packet) else {
            return out;
        };
        // The answer to the member's virtual address (masqueraded per
        // packet) or to its endpoint on the wire (served at the socket).
        let to = SocketAddrV4::new(answer.daddr, answer.dport);
        let found = self.flows.iter().find_map(|(id, f)| match f.side {
            Side::Server {
                client,
                vport,
                cport,
            } if vport == answer.sport
                && (to == SocketAddrV4::new(f.peer, cport) || to == client) =>
            {
                Some((*id, client, cport))
            }
            _ => None,
        });
        let Some((id, client, cport)) = found else {
            return out;
        };
        let flow = self.flows.remove(&id).expect("found");
        let Some(session) = self
            .peers
            .get(&flow.peer)
            .and_then(|p| p.session.as_ref())
            .map(|s| s.session.clone())
        else {
            return out;
        };
        // The answer stays held (and its retransmissions too) until the
        // client's SYN arrives: its NAT would find a SYN/ACK after our
        // punch SYN invalid, and could let it out untranslated. Our
        // ingress then rewrites the entries, and our stack answers the
        // client's SYN at once, as a retransmission.
        let punch = punch::Punch {
            from: SocketAddrV4::new(self.me.real_ip, answer.sport),
            to: client,
            vsrc: self.me.virtual_ip,
            vdst: flow.peer,
            vport: cport,
            tag_key: session.tag_key,
        };
        match punch::syn(packet, &punch) {
            Some(syn) => out.push(Effect::SendPacket(syn)),
            None => warn!("cannot build a punch SYN from our answer"),
        }
        let public = self.site.public.unwrap_or(self.me.real_ip);
        let mut p = Punched {
            id,
            server: SocketAddrV4::new(public, answer.sport),
            mac: [0; 32],
        };
        p.mac = control_mac(&session.tag_key, &p.signed_part());
        self.send(flow.peer, Handshake::Punched(p), &mut out);
        debug!(peer = %flow.peer, id, elapsed = ?now.saturating_duration_since(flow.since), "punched");
        out
    }

    /// The member's agent opened the way: our SYN may go.
    pub(super) fn punched(
        &mut self,
        from: Ipv4Addr,
        p: Punched,
        _now: Instant,
        out: &mut Vec<Effect>,
    ) {
        let Some(key) = self
            .peers
            .get(&from)
            .and_then(|peer| peer.session.as_ref())
            .map(|s| s.session.tag_key)
        else {
            return;
        };
        if !control_mac_valid(&key, &p.signed_part(), &p.mac) {
            warn!(%from, "ignored a punch notice that does not check");
            return;
        }
        if !matches!(self.flows.get(&p.id), Some(f) if f.peer == from && !f.completing) {
            // Already on its way (the punch SYN told us first), or over.
            return;
        }
        self.complete_flow(p.id, p.server, out);
    }

    /// A member's punch SYN reached our kernel, which handed it over: it
    /// came from where the member's NAT put the flow.
    pub fn punch_arrived(&mut self, packet: &[u8]) -> Vec<Effect> {
        let mut out = Vec::new();
        // As on the wire: the member's public endpoint to ours, and the tag
        // naming the member (which our kernel checked) and our flow's port.
        if packet.len() < 24 || packet[9] != 6 {
            return out;
        }
        let ihl = (packet[0] & 0x0f) as usize * 4;
        if packet.len() < ihl + 4 {
            return out;
        }
        let src = SocketAddrV4::new(
            Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
            u16::from_be_bytes([packet[ihl], packet[ihl + 1]]),
        );
        let Some((vsrc, vport)) = tag_source(packet, ihl) else {
            return out;
        };
        let found = self.flows.iter().find_map(|(id, f)| match f.side {
            Side::Client { sport, .. } if f.peer == vsrc && sport == vport => {
                Some((*id, f.completing))
            }
            _ => None,
        });
        match found {
            Some((id, false)) => {
                self.count("punches_received");
                self.complete_flow(id, src, &mut out);
            }
            // The member's notice came first.
            Some((_, true)) => {}
            None => self.count("punches_unexpected"),
        }
        out
    }

    /// The client's last step: the flow's entries toward `server` (where
    /// the member's NAT expects us), then the application's SYN.
    fn complete_flow(&mut self, id: u64, server: SocketAddrV4, out: &mut Vec<Effect>) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let Side::Client {
            syn: ref packet,
            sport,
            wire_port,
            ref mut port_kept,
        } = flow.side
        else {
            return;
        };
        let Some(syn) = Syn::parse(packet) else {
            return;
        };
        *port_kept = server.port() == syn.dport;
        flow.completing = true;
        let (peer, technique, packet) = (flow.peer, flow.technique, packet.clone());
        if at_socket(&syn) {
            // connect() sent it to the member's public address at the
            // application's port: only there can it go.
            if server == SocketAddrV4::new(syn.daddr, syn.dport) {
                out.push(Effect::Resend(packet));
                self.count("traversals_completed");
            } else {
                warn!(%peer, %server, "the member's NAT put a flow at another port than the application's: refused (connect() again)");
                self.flows.remove(&id);
                out.push(Effect::Refuse(packet));
                self.count("traversals_failed");
                self.traversal_failed_at_socket(peer, out);
            }
            return;
        }
        let key = FlowKey::new(
            syn.saddr.octets(),
            syn.daddr.octets(),
            sport,
            syn.dport,
            IPPROTO_TCP,
            DIRECTION_EGRESS,
        );
        let to = entry(
            peer,
            technique,
            SocketAddrV4::new(self.me.real_ip, wire_port),
            server,
        );
        // Our kernel reports the flow when the member's SYN/ACK arrives
        // (`traversed`); RSTs before it are not for the socket.
        out.push(Effect::InstallFlow {
            key,
            to,
            twin_flags: FLOW_AWAIT_SYNACK,
        });
        out.push(Effect::Resend(packet));
        self.count("traversals_completed");
    }

    /// Our kernel saw the member's SYN/ACK for a flow we opened with a
    /// traversal: it is done (Traversing-TCP has no other sign of it).
    /// The first in a session lets connect() go to the member's endpoint
    /// on the wire, when the technique keeps the member's port.
    pub fn traversed(&mut self, peer: Ipv4Addr, sport: u16, now: Instant) -> Vec<Effect> {
        let metrics = &self.metrics;
        let mut port_kept = false;
        self.flows.retain(|_, f| {
            let done =
                f.peer == peer && matches!(f.side, Side::Client { sport: s, .. } if s == sport);
            if done {
                metrics
                    .connection_setup(f.technique.name(), now.saturating_duration_since(f.since));
                port_kept |= matches!(
                    f.side,
                    Side::Client {
                        port_kept: true,
                        ..
                    }
                );
            }
            !done
        });
        let mut out = Vec::new();
        if let Some(p) = self.peers.get_mut(&peer)
            && let (Some(path), Some(s)) = (p.path, p.session.as_mut())
            && path.technique.keeps_server_port()
            && port_kept
            && !s.traversed
        {
            s.traversed = true;
            debug!(%peer, technique = path.technique.name(), "a traversal worked: connect()s go to the member's public address from now on");
            out.push(Effect::SetPeer(peer, s.kernel_path(&path)));
        }
        out
    }

    /// A traversal translated at the socket failed: connect()s go to the
    /// virtual address again (masqueraded per packet, free to fall back
    /// to the relay) until one works again.
    fn traversal_failed_at_socket(&mut self, peer: Ipv4Addr, out: &mut Vec<Effect>) {
        // (Also when this agent did not set it: a path taken over from
        // the previous agent keeps the kernel's flags.)
        if let Some(p) = self.peers.get_mut(&peer)
            && let (Some(path), Some(s)) = (p.path, p.session.as_mut())
        {
            s.traversed = false;
            out.push(Effect::SetPeer(peer, s.kernel_path(&path)));
        }
    }

    /// Traversals that did not complete in time: their SYNs are refused
    /// (the connect() fails at once rather than hang).
    pub(super) fn expire_flows(&mut self, now: Instant, out: &mut Vec<Effect>) {
        let stale: Vec<u64> = self
            .flows
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.since) > TRAVERSAL_TIMEOUT)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            let flow = self.flows.remove(&id).expect("listed");
            if let Side::Client { syn, .. } = flow.side {
                self.count("traversals_failed");
                let at_socket = Syn::parse(&syn).is_some_and(|s| at_socket(&s));
                if at_socket || self.active.contains(&flow.peer) {
                    // Flows on the direct path run: moving the pair to the
                    // relay would break them. A SYN sent to the member's
                    // public address (translated at the socket) cannot take
                    // the relay either; the next connect() goes to the
                    // virtual address, masqueraded per packet.
                    warn!(peer = %flow.peer, technique = flow.technique.name(), "a flow's traversal did not complete within {TRAVERSAL_TIMEOUT:?}: refused");
                    out.push(Effect::Refuse(syn));
                    if at_socket {
                        self.traversal_failed_at_socket(flow.peer, out);
                    }
                } else {
                    warn!(peer = %flow.peer, technique = flow.technique.name(), "a flow's traversal did not complete within {TRAVERSAL_TIMEOUT:?}: the member is reached through the relay from now on");
                    self.use_relay(flow.peer, out);
                    // Now to a local address: the relay takes it.
                    out.push(Effect::Resend(syn));
                }
            }
        }
    }
}

/// Whether a held SYN was translated at the socket (it goes to the
/// member's public address, not its virtual one).
fn at_socket(syn: &Syn) -> bool {
    !pvc_common::is_virtual(syn.daddr.octets())
}

/// `packet` (an IPv4 SYN) from `saddr` to `daddr` instead; its TCP checksum
/// is left for the injector, which computes it whole.
fn readdressed(packet: &[u8], saddr: Ipv4Addr, daddr: Ipv4Addr) -> Vec<u8> {
    let mut p = packet.to_vec();
    p[12..16].copy_from_slice(&saddr.octets());
    p[16..20].copy_from_slice(&daddr.octets());
    p
}

/// Whether a held IPv4 SYN carries a PVC tag (as its last option).
pub(super) fn tagged(packet: &[u8]) -> bool {
    packet
        .first()
        .is_some_and(|b| tag_source(packet, (b & 0x0f) as usize * 4).is_some())
}

/// The virtual source and port a punch SYN's PVC tag names (the tag is
/// its last option; a punch names the client's port of the flow).
fn tag_source(packet: &[u8], ihl: usize) -> Option<(Ipv4Addr, u16)> {
    let tcp = packet.get(ihl..)?;
    let hlen = (*tcp.get(12)? >> 4) as usize * 4;
    let len = pvc_common::TAG_LEN as usize;
    let tag = tcp.get(hlen.checked_sub(len)?..hlen)?;
    (tag[0] == pvc_common::TAG_KIND).then(|| {
        (
            Ipv4Addr::new(tag[4], tag[5], tag[6], tag[7]),
            u16::from_be_bytes([tag[8], tag[9]]),
        )
    })
}
