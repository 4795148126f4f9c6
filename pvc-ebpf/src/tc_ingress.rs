//! tc ingress on the uplink: packets of PVC flows arrive with real addresses
//! and are rewritten to virtual ones before the IP stack sees them, so that a
//! server's accept() returns the client's virtual address and a server bound
//! to its virtual address receives them.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK},
    macros::classifier,
    programs::TcContext,
};
use pvc_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, DropReason, EVENT_INBOUND_REFUSED, Event, FLOW_AWAIT_SYN,
    FLOW_AWAIT_SYNACK, FlowKey, IPPROTO_ICMP, IPPROTO_TCP, PATH_PER_FLOW, PATH_SOCKET, PEER_READY,
    POLICY_INBOUND, PeerPath, ReplayKey, ReplayValue, SOCKET_ACCEPTED, SOCKET_AWAIT_ANSWER,
    SOCKET_HOLD_ANSWER, Settings, SocketPeer, TAG_PUNCH, TCP_RST, TRAFFIC_INGRESS, Technique,
    is_virtual,
};

use crate::{
    flow,
    maps::{
        MASQUERADING, REPLAY, SOCKET_FLOWS, allowed, count_traffic, emit, peer, settings,
        tc_verdict,
    },
    nat,
    packet::{
        ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_TIME_EXCEEDED, Ipv4, Parsed, TCP_SYN, Tag, Tcp,
        parse_icmp, parse_ipv4, parse_quoted, parse_tcp, plain_real_tcp, read_tag,
    },
    sockets::{self, Use},
};

#[classifier]
// The macro wraps this function in the program's entry point; left to
// itself LLVM keeps a body this large out of line, and every packet pays a
// call and a return (a return thunk on CPUs with return-stack mitigations).
#[inline(always)]
pub fn pvc_ingress(ctx: TcContext) -> i32 {
    tc_verdict(ingress(&ctx))
}

const PASS: Result<i32, DropReason> = Ok(TC_ACT_OK as i32);

#[inline(always)]
fn ingress(ctx: &TcContext) -> Result<i32, DropReason> {
    // Most packets first, in a few instructions on few cache lines of
    // code (the stack evicts the programs' code between two packets): a
    // TCP segment between real addresses without SYN or RST whose
    // masquerading hint is not live has no entry (flows carried at the
    // socket, connections that are not PVC's) and passes, as the full
    // checks below would let it (`ingress_tcp`).
    if let Some(f) = plain_real_tcp(ctx)
        && f.tcp.flags & (TCP_SYN | TCP_RST) == 0
        && !flow::hinted(&FlowKey::new(
            f.ip.saddr,
            f.ip.daddr,
            u16::from_be_bytes(f.tcp.sport),
            u16::from_be_bytes(f.tcp.dport),
            IPPROTO_TCP,
            DIRECTION_INGRESS,
        ))
    {
        return PASS;
    }
    let ip = match parse_ipv4(ctx) {
        Parsed::Ipv4(ip) => ip,
        // Not ours to judge: the stack handles (and drops) what it cannot parse.
        Parsed::NotIpv4 | Parsed::Malformed => return PASS,
    };
    if is_virtual(ip.saddr) || is_virtual(ip.daddr) {
        // Virtual addresses exist only inside hosts; on the wire they are
        // spoofed (or leaked by a host without PVC's egress program).
        return Err(DropReason::VirtualAddressOnWire);
    }
    if ip.fragment {
        return PASS;
    }
    match ip.proto {
        IPPROTO_TCP => ingress_tcp(ctx, &ip),
        IPPROTO_ICMP if settings().is_some() => ingress_icmp(ctx, &ip),
        _ => PASS,
    }
}

#[inline(always)]
fn ingress_tcp(ctx: &TcContext, ip: &Ipv4) -> Result<i32, DropReason> {
    let Some(tcp) = parse_tcp(ctx, ip) else {
        return PASS;
    };
    let key = flow::tcp_key(ip, &tcp, DIRECTION_INGRESS);
    // Only a SYN needs to know who this host is: the packets of an
    // established flow need their entry and nothing else.
    let s = if tcp.is_syn() {
        let Some(s) = settings() else {
            return PASS;
        };
        Some(s)
    } else {
        None
    };
    let m = if let Some(s) = s.filter(|s| ip.daddr == s.real_addr) {
        let s = &s;
        // A connection request decides afresh what the flow is: a member's
        // tagged SYN opens a PVC flow, an untagged one is an ordinary
        // connection between real addresses, even if an earlier PVC flow
        // used the same ports.
        let Some(tag) = read_tag(ctx, ip, &tcp) else {
            return untagged_syn(ctx, &key);
        };
        let refuse = |reason: DropReason| {
            emit(&Event {
                kind: EVENT_INBOUND_REFUSED,
                proto: IPPROTO_TCP,
                direction: DIRECTION_INGRESS,
                reason: reason as u32,
                saddr: tag.vsrc,
                daddr: s.virtual_addr,
                sport: tcp.sport,
                dport: tcp.dport,
                real: ip.saddr,
                ..Default::default()
            });
            Err(reason)
        };
        // The member must have an authenticated path from this real
        // address, and the SYN must carry that path's MAC.
        let Some(path) = peer(tag.vsrc) else {
            return refuse(DropReason::TagMismatch);
        };
        if path.state != PEER_READY || path.real != ip.saddr {
            return refuse(DropReason::TagMismatch);
        }
        if flow::tag_mac(&path, tag.vsrc, s.virtual_addr, tag.vdport, tag.flags, &tcp) != tag.mac {
            return refuse(DropReason::BadTag);
        }
        if replayed(&tag, ip, &tcp) {
            return refuse(DropReason::Replay);
        }
        if tag.flags & TAG_PUNCH != 0 {
            // The member's agent opened its NAT toward us for a flow our
            // agent is completing: the agent learns the port its NAT
            // picked; no socket of ours ever sees this SYN.
            return Err(flow::punch_received(ctx, ip));
        }
        if !allowed(s, POLICY_INBOUND, tag.vsrc, tag.vdport) {
            return refuse(DropReason::PolicyInbound);
        }
        let used = sockets::tcp_use(ctx, ip.daddr, tcp.dport, ip.saddr, tcp.sport);
        if used != Use::Free && socket_flow(ip, &tcp).is_some_and(|f| f.vpeer == tag.vsrc) {
            // The member's SYN again (our answer was lost), or its first
            // one through the hole our agent punched (the agent injected
            // it before): the socket on its tuple is the connection
            // request (or connection) made here at the socket, and the
            // stack answers it.
            punch_completed(ip, &tcp, s.virtual_addr);
            return PASS;
        }
        // A connection between the real addresses may use this tuple: a
        // live one keeps it, a closing one is waited for (the client's TCP
        // retransmits).
        match used {
            Use::Free => {}
            Use::Closing => return Err(DropReason::TupleClosing),
            Use::Live => return refuse(DropReason::FlowCollision),
        }
        let existing = flow::peek(&key);
        if existing.is_none() && accept_at_socket(ctx, s, ip, &tcp, &tag, &path) {
            return PASS;
        }
        let m = match existing {
            // The agent installed this flow for a traversal: the client's
            // port on the wire (a NAT's, a UPnP forward's) may not be its
            // application's, which the agent knows.
            Some(mut m)
                if m.flags & FLOW_AWAIT_SYN != 0
                    && m.saddr == tag.vsrc
                    && m.dport == tag.vdport =>
            {
                m.flags = 0;
                m
            }
            // The port the application listens on is the tag's: a NAT's
            // forward may have brought the SYN to another one.
            _ => flow::entry(
                tag.vsrc,
                s.virtual_addr,
                tcp.sport,
                tag.vdport,
                tag.vsrc,
                &path,
            ),
        };
        // New, or the traversal the agent installed is completing.
        let fresh = existing.is_none_or(|e| e.flags & FLOW_AWAIT_SYN != 0);
        // A full map: the agent answers with a RST on the wire, which the
        // client's ingress turns into ECONNREFUSED for its connect().
        flow::open(&key, &m, fresh).map_err(|r| flow::refuse(ctx, ip, r))?;
        m
    } else {
        if tcp.flags & (TCP_RST | TCP_SYN) != 0 && traversal_at_socket(ip, &tcp)? {
            return PASS;
        }
        // Most packets without an entry (flows translated at the socket,
        // connections between real addresses) stop at the hint.
        if !flow::hinted(&key) {
            return PASS;
        }
        let Some(m) = flow::touch(&key, tcp.flags) else {
            forwarded_to_listener(ctx, ip, &tcp);
            return PASS;
        };
        flow::hint(&key);
        if m.flags & FLOW_AWAIT_SYN != 0 && tcp.flags & TCP_RST != 0 {
            // The client's NAT rejecting our punch SYN: the client's own
            // SYN is still to come.
            return Err(DropReason::TraversalReset);
        }
        if m.flags & FLOW_AWAIT_SYNACK != 0 {
            if tcp.is_syn_ack() {
                flow::clear_flag(&key, FLOW_AWAIT_SYNACK);
                // A traversal the agents carried completed: the flow exists.
                flow::announce_flow(&key.twin(&m), DIRECTION_EGRESS, m.technique);
            } else if tcp.flags & TCP_RST != 0 {
                // A firewall's rejection of the SYN the agents are carrying
                // around it (Traversing-TCP): not for the socket.
                return Err(DropReason::TraversalReset);
            }
        }
        m
    };
    nat::masquerade_tcp(ctx, ip, tcp.sport, tcp.dport, &m, TRAFFIC_INGRESS)?;
    PASS
}

/// A member's verified SYN that this host's listener can take as it is:
/// this host translates at the socket (whatever technique its own flows
/// to the member take: the member's SYN came straight), and a listener of
/// the port the member asked for takes it: one that accepts the real
/// address, or one bound to the virtual address, which is handed the SYN
/// (also when a UPnP forward brought the SYN to another port). Whether the
/// listener serves the virtual network is checked on its answer (egress).
/// Records who the flow is from, for accept() and getpeername(); false
/// leaves the flow to the per-packet path.
#[inline(always)]
fn accept_at_socket(
    ctx: &TcContext,
    s: &Settings,
    ip: &Ipv4,
    tcp: &Tcp,
    tag: &Tag,
    path: &PeerPath,
) -> bool {
    if path.flags & PATH_SOCKET == 0 {
        return false;
    }
    let as_it_is = tag.vdport == tcp.dport
        && sockets::listening(ctx, ip.daddr, tcp.dport, ip.saddr, tcp.sport);
    // Else the listener of the tag's port is handed the SYN: a NAT's
    // forward brought it to another port (this host's UPnP forward), or
    // the listener is bound to the virtual address, which no packet on the
    // wire names. Its child socket keeps the wire's tuple, and no one but
    // a member whose tag was verified reaches it this way. Should the
    // entry below not fit, the per-packet rewrite gives the packet the
    // listener's address and port, so the assignment holds either way.
    if !as_it_is && !hand_to_listener(ctx, s, ip, tag.vdport, tcp.sport) {
        return false;
    }
    let key = flow::received_socket_key(ip, tcp);
    // The SYN came straight: over our path's own technique when that is a
    // direct one, else (our flows to the member need a traversal, its
    // flows to us do not) straight to our address.
    let technique = if path.flags & PATH_PER_FLOW != 0 {
        Technique::Direct as u8
    } else {
        path.technique
    };
    let from = SocketPeer {
        vpeer: tag.vsrc,
        vport: tcp.sport,
        technique,
        side: SOCKET_ACCEPTED,
        // Set for a SYN handed to its listener: a SYN cookie's ACK is
        // handed to it as well (`forwarded_to_listener`).
        local_vport: if as_it_is { 0 } else { tag.vdport },
        flags: 0,
    };
    flow::open_at_socket(&key, &from, s.virtual_addr, DIRECTION_INGRESS).is_ok()
}

/// A packet without an entry whose hint is live: normally a flow that
/// ended or a hint's hash shared with a live flow. When it belongs to a
/// flow a UPnP forward brought and its listener answered with a SYN cookie
/// (egress made the hint live), there is no socket for its tuple yet: the
/// member's ACK goes to the listener of the port the member asked for, as
/// its SYN did, so that the cookie is checked where it was made.
#[inline(always)]
fn forwarded_to_listener(ctx: &TcContext, ip: &Ipv4, tcp: &Tcp) {
    let Some(f) = socket_flow(ip, tcp) else {
        return;
    };
    // Once the cookie made a connection, its packets find it.
    if f.local_vport == 0
        || sockets::tcp_use(ctx, ip.daddr, tcp.dport, ip.saddr, tcp.sport) != Use::Free
    {
        return;
    }
    if let Some(s) = settings() {
        hand_to_listener(ctx, &s, ip, f.local_vport, tcp.sport);
    }
}

/// Hands a member's packet to this host's listener of `port`: one that
/// takes the real address, else one bound to the virtual address.
#[inline(always)]
fn hand_to_listener(ctx: &TcContext, s: &Settings, ip: &Ipv4, port: u16, rport: u16) -> bool {
    sockets::assign_listener(ctx, ip.daddr, port, ip.saddr, rport)
        || sockets::assign_listener(ctx, s.virtual_addr, port, ip.saddr, rport)
}

/// A RST or SYN/ACK of a traversal's flow carried at the socket, before
/// the traversal is done: on the server's side (punching) a RST is the
/// member's NAT rejecting our punch, the member's own SYN still to come; on
/// the client's side a RST is a firewall rejecting the SYN the agents carry
/// around it, and the member's SYN/ACK completes the traversal (announced:
/// the agent stops waiting for it). Err drops the packet; Ok(true): the
/// packet goes up as it is.
#[inline(always)]
fn traversal_at_socket(ip: &Ipv4, tcp: &Tcp) -> Result<bool, DropReason> {
    let key = flow::received_socket_key(ip, tcp);
    let Some(p) = SOCKET_FLOWS.get_ptr_mut(&key) else {
        return Ok(false);
    };
    // SAFETY: a live value of the map, under RCU; the programs only clear
    // its flags once it is in (a SYN sent again leaves it as it is), and
    // a racing writer clears the same bit.
    let f = unsafe { &mut *p };
    if f.flags & (SOCKET_HOLD_ANSWER | SOCKET_AWAIT_ANSWER) == 0 {
        return Ok(false);
    }
    if tcp.flags & TCP_RST != 0 {
        return Err(DropReason::TraversalReset);
    }
    if f.flags & SOCKET_AWAIT_ANSWER != 0 && tcp.is_syn_ack() {
        f.flags &= !SOCKET_AWAIT_ANSWER;
        if let Some(s) = settings() {
            flow::announce_at_socket(&key, f, s.virtual_addr, DIRECTION_EGRESS);
        }
        return Ok(true);
    }
    Ok(false)
}

/// A member's SYN came through the hole our agent punched for a flow our
/// stack serves at the socket: the stack's answer (a retransmission of
/// the one the punch carried) may leave now, and the flow exists.
#[inline(always)]
fn punch_completed(ip: &Ipv4, tcp: &Tcp, local_vip: [u8; 4]) {
    let key = flow::received_socket_key(ip, tcp);
    let Some(p) = SOCKET_FLOWS.get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: a live value of the map, under RCU; the agent wrote it
    // before injecting the SYN, and only this program clears the flag.
    let f = unsafe { &mut *p };
    if f.flags & SOCKET_HOLD_ANSWER == 0 {
        return;
    }
    f.flags &= !SOCKET_HOLD_ANSWER;
    flow::announce_at_socket(&key, f, local_vip, DIRECTION_INGRESS);
}

/// The flow taken at the socket that a packet from a member belongs to,
/// by its tuple on the wire.
#[inline(always)]
fn socket_flow(ip: &Ipv4, tcp: &Tcp) -> Option<SocketPeer> {
    let key = flow::received_socket_key(ip, tcp);
    // SAFETY: a copy of the value, read under RCU.
    unsafe { SOCKET_FLOWS.get(&key) }.copied()
}

/// Whether a tagged SYN was already accepted from another address: the
/// MAC covers what NATs do not change, so a copy sent from behind the same
/// NAT would verify; the first to arrive keeps its sequence number.
#[inline(always)]
fn replayed(tag: &Tag, ip: &Ipv4, tcp: &Tcp) -> bool {
    let key = ReplayKey {
        vsrc: tag.vsrc,
        seq: tcp.seq,
        vdport: tag.vdport,
        _pad: 0,
    };
    let from = ReplayValue {
        saddr: ip.saddr,
        sport: tcp.sport,
        _pad: 0,
    };
    // Claimed first: two copies on two CPUs cannot both see it unclaimed.
    if REPLAY.insert(&key, &from, BPF_NOEXIST as u64).is_ok() {
        return false;
    }
    // SAFETY: a copy of the value, read under RCU.
    match unsafe { REPLAY.get(&key) }.copied() {
        // A retransmission of the same SYN.
        Some(seen) => seen != from,
        // Evicted meanwhile (or no room): nothing to compare with.
        None => false,
    }
}

/// An untagged SYN: a connection between real addresses. An entry left by an
/// ended PVC flow on the same tuple is retired; while that PVC flow still
/// runs, the SYN is dropped rather than let the new connection take its
/// packets (the sender's own egress refuses it first when it runs PVC).
#[inline(always)]
fn untagged_syn(ctx: &TcContext, key: &FlowKey) -> Result<i32, DropReason> {
    // SAFETY: a copy of the value, read under RCU.
    let Some(m) = (unsafe { MASQUERADING.get(key) }).copied() else {
        return PASS;
    };
    match sockets::tcp_use(ctx, m.daddr, m.dport, m.saddr, m.sport) {
        Use::Free => {
            flow::close(key);
            PASS
        }
        // The sender's TCP retransmits; by then the flow may have ended.
        Use::Closing => Err(DropReason::TupleClosing),
        Use::Live => Err(DropReason::FlowCollision),
    }
}

#[inline(always)]
fn ingress_icmp(ctx: &TcContext, ip: &Ipv4) -> Result<i32, DropReason> {
    let Some(icmp) = parse_icmp(ctx, ip) else {
        return PASS;
    };
    match icmp.kind {
        ICMP_ECHO_REPLY => {
            // The echo identifier plays the local port: the request went out
            // keyed (id, 0), its reply comes back keyed (0, id).
            let key = FlowKey::new(
                ip.saddr,
                ip.daddr,
                0,
                icmp.id,
                IPPROTO_ICMP,
                DIRECTION_INGRESS,
            );
            let Some(m) = flow::touch(&key, 0) else {
                return PASS;
            };
            nat::masquerade(ctx, ip, 0, icmp.id, &m)?;
            count_traffic(TRAFFIC_INGRESS, ctx.len());
            PASS
        }
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED => ingress_icmp_error(ctx, ip),
        _ => PASS,
    }
}

/// An ICMP error about a packet of a PVC flow (e.g. "fragmentation needed"
/// from a router): the quoted packet and the outer destination become
/// virtual again, otherwise the kernel finds no socket and path MTU
/// discovery breaks.
#[inline(always)]
fn ingress_icmp_error(ctx: &TcContext, ip: &Ipv4) -> Result<i32, DropReason> {
    let Some(q) = parse_quoted(ctx, ip) else {
        return PASS;
    };
    if q.proto != IPPROTO_TCP || q.saddr != ip.daddr {
        return PASS;
    }
    // The quoted packet went out as (us -> peer); its reply direction is
    // keyed by the reverse tuple, and that entry maps back to virtual.
    let reply = FlowKey::new(
        q.daddr,
        q.saddr,
        q.dport,
        q.sport,
        IPPROTO_TCP,
        DIRECTION_INGRESS,
    );
    let Some(m) = flow::touch(&reply, 0) else {
        return PASS;
    };
    // Quoted: (local virtual -> peer virtual); outer: to our virtual address,
    // from the peer's virtual address when the peer itself reports it.
    nat::masquerade_quoted(ctx, &q, m.daddr, m.saddr)?;
    let outer_src = if ip.saddr == q.daddr {
        m.saddr
    } else {
        ip.saddr
    };
    let outer = pvc_common::Masquerade {
        saddr: outer_src,
        daddr: m.daddr,
        ..m
    };
    nat::masquerade(ctx, ip, 0, 0, &outer)?;
    count_traffic(TRAFFIC_INGRESS, ctx.len());
    PASS
}
