//! tc egress on the uplink: packets leaving with a virtual destination are
//! masqueraded to the peer's real address, or dropped with a reason. Nothing
//! with a virtual address leaves the host.
//!
//! The frame already carries the right MAC addresses: the agent routes each
//! member's virtual address via the next hop of its real address, so the
//! kernel's neighbour resolution did the L2 work (no FIB lookup per packet,
//! and no need for the host to forward).

use aya_ebpf::{
    bindings::TC_ACT_OK, helpers::bpf_get_socket_cookie, macros::classifier, programs::TcContext,
};
use pvc_common::{
    DIRECTION_EGRESS, DropReason, FLOW_HOLD_SYNACK, FlowKey, IPPROTO_ICMP, IPPROTO_TCP,
    MASQUERADING_PORT_TRIES, PATH_PER_FLOW, PEER_READY, POLICY_OUTBOUND, SOCKET_AWAIT_ANSWER,
    SOCKET_AWAIT_PATH, SOCKET_CONNECTED, SOCKET_HOLD_ANSWER, Settings, SocketPeer, TRAFFIC_EGRESS,
    is_virtual,
};

use crate::{
    flow,
    maps::{
        MASQUERADING, SOCKET_CONNECTS, SOCKET_FLOWS, allowed, count_traffic, peer, settings,
        tc_verdict,
    },
    nat,
    packet::{
        ARP_REQUEST, ARP_SENDER_IP_OFF, ICMP_ECHO, Ipv4, Parsed, TCP_SYN, Tcp, parse_arp,
        parse_icmp, parse_ipv4, parse_tcp, plain_real_tcp, read_tag,
    },
    sockets::{self, Use},
};

#[classifier]
// The macro wraps this function in the program's entry point; left to
// itself LLVM keeps a body this large out of line, and every packet pays a
// call and a return (a return thunk on CPUs with return-stack mitigations).
#[inline(always)]
pub fn pvc_egress(ctx: TcContext) -> i32 {
    tc_verdict(egress(&ctx))
}

#[inline(always)]
fn egress(ctx: &TcContext) -> Result<i32, DropReason> {
    // Most packets first, in a few instructions on few cache lines of
    // code (the stack evicts the programs' code between two packets): a
    // TCP segment between real addresses without SYN (flows carried at the
    // socket, connections that are not PVC's) passes, as the full checks
    // below would let it (`egress_real_tcp`).
    if plain_real_tcp(ctx).is_some_and(|f| f.tcp.flags & TCP_SYN == 0) {
        return Ok(TC_ACT_OK as i32);
    }
    let ip = match parse_ipv4(ctx) {
        Parsed::NotIpv4 => return egress_arp(ctx),
        Parsed::Malformed => return Err(DropReason::Malformed),
        Parsed::Ipv4(ip) => ip,
    };
    if !is_virtual(ip.daddr) {
        if is_virtual(ip.saddr) {
            return Err(DropReason::VirtualSourceToRealDestination);
        }
        if ip.proto == IPPROTO_TCP && !ip.fragment {
            return egress_real_tcp(ctx, &ip);
        }
        // Real traffic: the fast path for everything that is not PVC's.
        return Ok(TC_ACT_OK as i32);
    }
    // Parsed once, for the established flows' fast path and the full checks.
    let tcp = if ip.proto == IPPROTO_TCP && !ip.fragment {
        parse_tcp(ctx, &ip)
    } else {
        None
    };
    if let Some(tcp) = &tcp
        && let Some(verdict) = egress_established(ctx, &ip, tcp)
    {
        return verdict;
    }
    let s = settings().ok_or(DropReason::AgentNotReady)?;
    if ip.saddr != s.virtual_addr {
        return Err(DropReason::ForeignVirtualSource);
    }
    if ip.fragment {
        return Err(DropReason::Fragment);
    }
    match ip.proto {
        IPPROTO_TCP => egress_tcp(ctx, &ip, tcp.ok_or(DropReason::Malformed)?, &s),
        IPPROTO_ICMP => egress_icmp(ctx, &ip, &s),
        _ => Err(DropReason::UnsupportedProtocol),
    }
}

/// ARP for a member's next hop is triggered by a packet from our virtual
/// address, and Linux then uses that address as the ARP sender. On the wire
/// it becomes our real address; ARP replies about a virtual address (asked by
/// a stranger) do not leave.
#[inline(always)]
fn egress_arp(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(arp) = parse_arp(ctx) else {
        return Ok(TC_ACT_OK as i32);
    };
    if !is_virtual(arp.sender_ip) {
        return Ok(TC_ACT_OK as i32);
    }
    if arp.op != ARP_REQUEST {
        return Err(DropReason::VirtualAddressOnWire);
    }
    let s = settings().ok_or(DropReason::VirtualAddressOnWire)?;
    ctx.store(ARP_SENDER_IP_OFF, &s.real_addr, 0)
        .map_err(|_| DropReason::RewriteFailed)?;
    Ok(TC_ACT_OK as i32)
}

/// A connection between real addresses. Its SYN may reuse the wire tuple
/// of a PVC flow that ended (the kernel picks ports per destination, and
/// PVC's destinations are virtual): that flow's leftover entry would turn
/// the SYN/ACK into a packet for the virtual socket. The SYN retires it. If
/// the PVC flow still runs, the new connection is refused instead (or waits
/// for a closing one): an established flow is never broken by a new one.
#[inline(always)]
fn egress_real_tcp(ctx: &TcContext, ip: &Ipv4) -> Result<i32, DropReason> {
    let Some(tcp) = parse_tcp(ctx, ip) else {
        return Ok(TC_ACT_OK as i32);
    };
    // The agent's punch SYNs go out on a flow's own tuple, on purpose.
    if sockets::from_agent(ctx) {
        if tcp.is_syn() {
            return sent_again_at_socket(ctx, ip, &tcp);
        }
        return Ok(TC_ACT_OK as i32);
    }
    if tcp.is_syn_ack() {
        return socket_answer(ctx, ip, &tcp);
    }
    if !tcp.is_syn() {
        return Ok(TC_ACT_OK as i32);
    }
    let reply = flow::reply_key(ip, &tcp);
    // SAFETY: a copy of the value, read under RCU.
    if let Some(m) = (unsafe { MASQUERADING.get(&reply) }).copied() {
        // The PVC flow's socket, by its virtual tuple (the entry's rewrite).
        let pvc = sockets::tcp_use(ctx, m.daddr, m.dport, m.saddr, m.sport);
        flow::may_take(ctx, ip, pvc)?;
        flow::close(&reply);
    }
    socket_syn(ctx, ip, &tcp)
}

/// The answer to a member's SYN that ingress let through to a listener
/// as it is (translated at the socket): a listener outside the cgroup PVC
/// serves is not on the virtual network, and its answer becomes a refusal,
/// as for flows masqueraded per packet.
#[inline(always)]
fn socket_answer(ctx: &TcContext, ip: &Ipv4, tcp: &Tcp) -> Result<i32, DropReason> {
    let key = flow::sent_socket_key(ip, tcp);
    // SAFETY: a copy of the value, read under RCU.
    let Some(entry) = (unsafe { SOCKET_FLOWS.get(&key) }).copied() else {
        return Ok(TC_ACT_OK as i32);
    };
    let Some(s) = settings() else {
        return Ok(TC_ACT_OK as i32);
    };
    if entry.flags & SOCKET_HOLD_ANSWER != 0 {
        // Hole punching, served at the socket: the agent sends this
        // answer's sequence number out as a SYN first, and the stack
        // answers again when the member's SYN comes through the hole.
        return Err(flow::hold_answer(ctx, ip));
    }
    if entry.local_vport != 0 && !sockets::has_socket(ctx) {
        // A SYN cookie (a SYN flood, a full queue) for a SYN that came
        // through this host's UPnP forward: no state is kept, and the
        // member's ACK would go to whatever listens on the forwarded port.
        // Its hint sends that ACK to ingress's lookup, which hands it to
        // the listener again (`forwarded_to_listener`).
        flow::hint(&flow::reply_key(ip, tcp));
    }
    // A SYN cookie's answer: its listener is the one ingress handed the
    // SYN to, when it did.
    let listener_port = entry.local_vport(tcp.sport);
    if sockets::answer_in_cgroup(ctx, &s, ip.saddr, listener_port, ip.daddr, tcp.dport) {
        return Ok(TC_ACT_OK as i32);
    }
    let _ = SOCKET_FLOWS.remove(&key);
    Err(flow::refuse(ctx, ip, DropReason::OutsideCgroup))
}

/// The SYN of a connect() that connect4 translated at the socket: it goes
/// to the member's real address as it is, with the tag that tells the
/// member who opens the flow. Its wire tuple is recorded for getpeername()
/// and getsockname(). Any other SYN between real addresses passes.
#[inline(always)]
fn socket_syn(ctx: &TcContext, ip: &Ipv4, tcp: &Tcp) -> Result<i32, DropReason> {
    // SAFETY: the helper takes this program's skb.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    // SAFETY: a copy of the value, read under RCU.
    let Some(c) = (unsafe { SOCKET_CONNECTS.get(&cookie) }).copied() else {
        return Ok(TC_ACT_OK as i32);
    };
    let s = settings().ok_or(DropReason::AgentNotReady)?;
    // The member's path may have moved, ended or taken a technique the
    // socket cannot follow (a traversal that moves the member's port)
    // since connect(): this SYN (a retransmission) is refused, so that
    // connect() fails at once and the application's next one takes the
    // path as it is now, instead of retransmitting into a path that no
    // longer exists.
    let Some(path) = peer(c.vpeer).filter(|p| p.real == ip.daddr && p.connects_at_socket_now())
    else {
        return Err(flow::refuse(ctx, ip, DropReason::UnknownPeer));
    };
    let authenticated = path.state == PEER_READY;
    let traversal = path.flags & PATH_PER_FLOW != 0;
    let flags = if !authenticated {
        SOCKET_AWAIT_PATH
    } else if traversal {
        SOCKET_AWAIT_ANSWER
    } else {
        0
    };
    let c = SocketPeer { flags, ..c };
    let key = flow::sent_socket_key(ip, tcp);
    if flow::open_at_socket(&key, &c, s.virtual_addr, DIRECTION_EGRESS).is_err() {
        return Err(flow::refuse(ctx, ip, DropReason::FlowTableFull));
    }
    if !authenticated {
        // The member's first flow: the agents authenticate the path, then
        // the agent sends this SYN again, and it is tagged on its way
        // (`sent_again_at_socket`).
        flow::hold_at_socket(ctx, ip, c.vpeer);
        return Err(DropReason::AwaitingPath);
    }
    let mac = flow::tag_mac(&path, s.virtual_addr, c.vpeer, c.vport, 0, tcp);
    let tagged = nat::append_tag(ctx, ip, tcp, s.virtual_addr, c.vport, mac)?;
    if traversal {
        // The member's NAT or firewall lets it in only once the agents
        // opened the way: the agent sends this very SYN then.
        flow::hold_at_socket(ctx, &tagged, c.vpeer);
        return Err(DropReason::AwaitingPath);
    }
    Ok(TC_ACT_OK as i32)
}

/// A SYN the agent sends on a flow's tuple between real addresses. One
/// that waited for the member's path (`SOCKET_AWAIT_PATH`, sent untagged)
/// is tagged now, as the application's SYN would have been, if the path
/// that came up still takes the flow at the socket; else it is refused,
/// and the application's next connect() takes the path as it is. The
/// agent's other SYNs (punches, SYNs a traversal carries) carry their tag
/// already and pass as they are.
#[inline(always)]
fn sent_again_at_socket(ctx: &TcContext, ip: &Ipv4, tcp: &Tcp) -> Result<i32, DropReason> {
    let key = flow::sent_socket_key(ip, tcp);
    // SAFETY: a copy of the value, read under RCU.
    let Some(f) = (unsafe { SOCKET_FLOWS.get(&key) }).copied() else {
        return Ok(TC_ACT_OK as i32);
    };
    // Also once the flag is cleared: the application's retransmitted SYN
    // may have been held twice, and an untagged SYN on the tuple would
    // tell the member the flow is a connection between real addresses.
    if f.side != SOCKET_CONNECTED || read_tag(ctx, ip, tcp).is_some() {
        return Ok(TC_ACT_OK as i32);
    }
    let s = settings().ok_or(DropReason::AgentNotReady)?;
    let Some(path) = peer(f.vpeer).filter(|p| {
        p.state == PEER_READY
            && p.real == ip.daddr
            && p.connects_at_socket()
            && p.flags & PATH_PER_FLOW == 0
    }) else {
        let _ = SOCKET_FLOWS.remove(&key);
        return Err(flow::refuse(ctx, ip, DropReason::UnknownPeer));
    };
    flow::path_authenticated(&key, 0, s.virtual_addr);
    let mac = flow::tag_mac(&path, s.virtual_addr, f.vpeer, f.vport, 0, tcp);
    nat::append_tag(ctx, ip, tcp, s.virtual_addr, f.vport, mac)?;
    Ok(TC_ACT_OK as i32)
}

/// A packet of an established flow (no SYN flag) with its entry: all it
/// needs is the rewrite. No settings, no socket or policy check: they were
/// made when the flow opened, and its entry exists only for this host's own
/// virtual address (entries are keyed by the packet's source). `None`
/// sends everything else through the full checks.
#[inline(always)]
fn egress_established(ctx: &TcContext, ip: &Ipv4, tcp: &Tcp) -> Option<Result<i32, DropReason>> {
    if tcp.flags & TCP_SYN != 0 {
        return None;
    }
    let m = flow::touch(&flow::tcp_key(ip, tcp, DIRECTION_EGRESS), tcp.flags)?;
    Some(
        nat::masquerade_tcp(ctx, ip, tcp.sport, tcp.dport, &m, TRAFFIC_EGRESS)
            .map(|()| TC_ACT_OK as i32),
    )
}

#[inline(always)]
fn egress_tcp(ctx: &TcContext, ip: &Ipv4, tcp: Tcp, s: &Settings) -> Result<i32, DropReason> {
    let key = flow::tcp_key(ip, &tcp, DIRECTION_EGRESS);
    // The agent's own packets (held SYNs re-sent, answers it injected)
    // passed these checks when an application sent them.
    let agent = sockets::from_agent(ctx);
    if tcp.is_syn_ack()
        && !agent
        && !sockets::answer_in_cgroup(ctx, s, ip.saddr, tcp.sport, ip.daddr, tcp.dport)
    {
        // A server outside the cgroup PVC serves is not on the virtual
        // network: its answer to a member's SYN becomes a refusal (the agent
        // resets both ends), so the member's connect() fails at once.
        return Err(flow::refuse(ctx, ip, DropReason::OutsideCgroup));
    }
    let (m, ip) = if tcp.is_syn() {
        if !agent && !sockets::sender_in_cgroup(ctx, s) {
            // connect4 only hooks the cgroup: outside it, connect() reaches
            // here, and its SYN is answered at once rather than dropped.
            return Err(flow::refuse(ctx, ip, DropReason::OutsideCgroup));
        }
        let path = peer(ip.daddr).ok_or(DropReason::UnknownPeer)?;
        let per_flow = path.flags & PATH_PER_FLOW != 0;
        if path.state != PEER_READY || (per_flow && !agent) {
            // A member we have not authenticated yet, or one every flow
            // needs the agents for (a traversal): the agent does it, then
            // sends this very SYN, so connect() does not wait for TCP's
            // retransmit timer.
            flow::hold(ctx, ip);
            return Err(DropReason::AwaitingPath);
        }
        if !allowed(s, POLICY_OUTBOUND, ip.daddr, tcp.dport) {
            // Processes outside the hooked cgroup reach here without connect4.
            return Err(DropReason::PolicyOutbound);
        }
        let prepared = if per_flow { flow::peek(&key) } else { None };
        let m = match prepared {
            // A traversal: the agent put in the flow's entries, with the
            // ports the NATs on the way use.
            Some(m) => m,
            None => {
                // A connection request always gets fresh entries in both
                // directions: whatever an earlier flow with this tuple left
                // is replaced.
                let m = flow::outbound(s, &path, ip.daddr, tcp.sport, tcp.dport);
                let m = match flow::moved_ports(&path, tcp.sport) {
                    Some(ports) => {
                        flow::on_moved_port(ctx, &key, m, &ports, MASQUERADING_PORT_TRIES)
                            .ok_or_else(|| flow::refuse(ctx, ip, DropReason::FlowCollision))?
                    }
                    None => {
                        // A connection between the real addresses may use
                        // this tuple.
                        let real = sockets::tcp_use(ctx, m.saddr, m.sport, m.daddr, m.dport);
                        flow::may_take(ctx, ip, real)?;
                        m
                    }
                };
                let fresh = MASQUERADING.get_ptr(&key).is_none();
                flow::open(&key, &m, fresh).map_err(|r| flow::refuse(ctx, ip, r))?;
                m
            }
        };
        let mac = flow::tag_mac(&path, s.virtual_addr, ip.daddr, tcp.dport, 0, &tcp);
        // The tag changes the header's length and checksum.
        let tagged = nat::append_tag(ctx, ip, &tcp, s.virtual_addr, tcp.dport, mac)?;
        (m, tagged)
    } else {
        let m = match flow::touch(&key, tcp.flags) {
            Some(m) => m,
            None => {
                // An entry expired under a live flow: the peer's path says
                // how to reach it, the kernel needs no agent. Not when its
                // ports are not the flow's own: a traversed flow's are gone
                // with its entry, and a UPnP forward's port is only right
                // for flows we opened, which a reply cannot tell apart.
                let path = peer(ip.daddr)
                    .filter(|p| {
                        p.state == PEER_READY && p.flags & PATH_PER_FLOW == 0 && p.port == 0
                    })
                    .ok_or(DropReason::UnknownPeer)?;
                let m = flow::outbound(s, &path, ip.daddr, tcp.sport, tcp.dport);
                // Its port on the wire, if it moved, was most likely the
                // first candidate (the member's entries expired alike).
                let m = match flow::moved_ports(&path, tcp.sport) {
                    Some(ports) => flow::on_moved_port(ctx, &key, m, &ports, 1),
                    // Not over a connection between the real addresses
                    // that took the tuple meanwhile: its packets would
                    // become ours.
                    None => (sockets::tcp_use(ctx, m.saddr, m.sport, m.daddr, m.dport)
                        == Use::Free)
                        .then_some(m),
                }
                .ok_or(DropReason::FlowCollision)?;
                flow::open(&key, &m, false)?;
                m
            }
        };
        if m.flags & FLOW_HOLD_SYNACK != 0 && tcp.is_syn_ack() {
            // Hole punching: the agent sends this answer's sequence number
            // out as a SYN first (its NAT must see our side open first).
            return Err(flow::hold_answer(ctx, ip));
        }
        (m, *ip)
    };
    nat::masquerade_tcp(ctx, &ip, tcp.sport, tcp.dport, &m, TRAFFIC_EGRESS)?;
    Ok(TC_ACT_OK as i32)
}

/// ICMP echo requests (ping) to a member: keyed by the echo identifier. The
/// peer answers the real address; ingress maps the reply back.
#[inline(always)]
fn egress_icmp(ctx: &TcContext, ip: &Ipv4, s: &Settings) -> Result<i32, DropReason> {
    let icmp = parse_icmp(ctx, ip).ok_or(DropReason::Malformed)?;
    if icmp.kind != ICMP_ECHO {
        return Err(DropReason::UnsupportedProtocol);
    }
    if !sockets::sender_in_cgroup(ctx, s) {
        return Err(DropReason::OutsideCgroup);
    }
    let key = FlowKey::new(
        ip.saddr,
        ip.daddr,
        icmp.id,
        0,
        IPPROTO_ICMP,
        DIRECTION_EGRESS,
    );
    let m = match flow::touch(&key, 0) {
        Some(m) => m,
        None => {
            let path = peer(ip.daddr).ok_or(DropReason::UnknownPeer)?;
            if path.state != PEER_READY {
                // Pinging a member first is also a reason to authenticate it.
                flow::hold(ctx, ip);
                return Err(DropReason::AwaitingPath);
            }
            let m = flow::entry(s.real_addr, path.real, icmp.id, 0, ip.daddr, &path);
            flow::open(&key, &m, false)?;
            m
        }
    };
    nat::masquerade(ctx, ip, icmp.id, 0, &m)?;
    count_traffic(TRAFFIC_EGRESS, ctx.len());
    Ok(TC_ACT_OK as i32)
}
