//! Flow entries of the masquerading map: lookup with bookkeeping, and
//! creation of both directions at once.

use aya_ebpf::{bindings::BPF_RB_FORCE_WAKEUP, helpers::bpf_skb_load_bytes, programs::TcContext};
use pvc_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, DropReason, EVENT_ANSWER_HELD, EVENT_FLOW_CREATED,
    EVENT_PACKET_HELD, EVENT_PACKET_REFUSED, EVENT_PUNCH, Event, FlowKey, HELD_BYTES,
    HINT_LIFETIME_SLOT, HeldPacket, IPPROTO_TCP, Masquerade, MasqueradingPorts, PATH_PER_FLOW,
    PATH_SOCKET, PeerPath, SOCKET_AWAIT_ANSWER, SOCKET_AWAIT_PATH, Settings, SocketKey, SocketPeer,
    hint_until, siphash24_16, tag_message,
};

use crate::{
    maps::{
        EVENTS, MASQUERADING, MASQUERADING_HINTS, MASQUERADING_PORTS, SOCKET_FLOWS, emit_quietly,
        now_ns,
    },
    packet::{IP_OFF, Ipv4, Tcp},
    sockets::{self, Use},
};

/// The key of a TCP packet's flow at this hook, as its header has it.
#[inline(always)]
pub fn tcp_key(ip: &Ipv4, tcp: &Tcp, direction: u8) -> FlowKey {
    FlowKey::new(
        ip.saddr,
        ip.daddr,
        tcp.sport,
        tcp.dport,
        IPPROTO_TCP,
        direction,
    )
}

/// The key under which a TCP packet's answer arrives at ingress, on the
/// wire as this packet leaves.
#[inline(always)]
pub fn reply_key(ip: &Ipv4, tcp: &Tcp) -> FlowKey {
    FlowKey::new(
        ip.daddr,
        ip.saddr,
        tcp.dport,
        tcp.sport,
        IPPROTO_TCP,
        DIRECTION_INGRESS,
    )
}

/// The socket-flows key of a packet this host sends, as it leaves.
#[inline(always)]
pub fn sent_socket_key(ip: &Ipv4, tcp: &Tcp) -> SocketKey {
    SocketKey {
        peer: ip.daddr,
        peer_port: tcp.dport,
        local_port: tcp.sport,
    }
}

/// The socket-flows key of a packet from a member, as it came on the wire.
#[inline(always)]
pub fn received_socket_key(ip: &Ipv4, tcp: &Tcp) -> SocketKey {
    SocketKey {
        peer: ip.saddr,
        peer_port: tcp.sport,
        local_port: tcp.dport,
    }
}

/// Looks up a flow and records that a packet (with these TCP flags) used it.
#[inline(always)]
pub fn touch(key: &FlowKey, tcp_flags: u8) -> Option<Masquerade> {
    let p = MASQUERADING.get_ptr_mut(key)?;
    let now = now_ns();
    // Entries are shared between CPUs: write only when something changes,
    // so that a bulk transfer does not bounce the cache line on every packet.
    // SAFETY: `p` points to a live value of the map (the lookup succeeded
    // and the program runs under RCU); concurrent writers only store the
    // same kind of value (a time, OR-ed flags), so a race loses an update,
    // never memory safety.
    unsafe {
        if now.wrapping_sub((*p).last_seen_ns) > 1_000_000_000 {
            (*p).last_seen_ns = now;
        }
        if (*p).tcp_flags | tcp_flags != (*p).tcp_flags {
            (*p).tcp_flags |= tcp_flags;
        }
        Some(*p)
    }
}

/// Whether an ingress TCP packet may have a masquerading entry: its
/// hint is live. A slot never hinted (zero) answers from its own cache
/// line: most packets that get here belong to flows carried at the socket
/// or to connections between real addresses, and every line more is a
/// miss the stack's work between two packets brings back.
#[inline(always)]
pub fn hinted(key: &FlowKey) -> bool {
    match MASQUERADING_HINTS.get(key.hint_slot()) {
        Some(&until) => until != 0 && until > now_ns(),
        None => true,
    }
}

/// Keeps the hint of an ingress TCP tuple live for a hint's lifetime from
/// now: before its entry is created, and as its packets come.
#[inline(always)]
pub fn hint(key: &FlowKey) {
    let Some(&lifetime) = MASQUERADING_HINTS.get(HINT_LIFETIME_SLOT) else {
        return;
    };
    let until = hint_until(now_ns(), lifetime);
    if let Some(p) = MASQUERADING_HINTS.get_ptr_mut(key.hint_slot()) {
        // SAFETY: a slot of an array map, live for the program's run; a
        // racing writer stores a time as well. Written at most once a
        // second, so that a busy flow does not dirty the line per packet
        // (the agent's lifetime has room for the lag).
        unsafe {
            if until.saturating_sub(*p) > 1_000_000_000 {
                *p = until;
            }
        }
    }
}

/// A flow's entry as it is, without bookkeeping.
#[inline(always)]
pub fn peek(key: &FlowKey) -> Option<Masquerade> {
    // SAFETY: a copy of the value, read under RCU.
    unsafe { MASQUERADING.get(key) }.copied()
}

/// Installs both directions of a flow: `key` (as seen at this hook) is
/// rewritten to `to`, and the reverse direction, keyed by `to` reversed, back
/// to `key` reversed. The twin goes in first so that a reply can never beat
/// its entry.
#[inline(always)]
pub fn open(key: &FlowKey, to: &Masquerade, announce: bool) -> Result<(), DropReason> {
    let (twin_key, twin) = to.reverse(key);
    if key.proto == IPPROTO_TCP {
        // The hint first: no packet of the flow may find it lapsed.
        hint(if key.direction == DIRECTION_INGRESS {
            key
        } else {
            &twin_key
        });
    }
    MASQUERADING
        .insert(&twin_key, &twin, 0)
        .map_err(|_| DropReason::FlowTableFull)?;
    if MASQUERADING.insert(key, to, 0).is_err() {
        // Half a flow would only hold a slot: give it back.
        let _ = MASQUERADING.remove(&twin_key);
        return Err(DropReason::FlowTableFull);
    }
    if announce {
        let v = if key.direction == DIRECTION_EGRESS {
            key
        } else {
            &twin_key
        };
        announce_flow(v, key.direction, to.technique);
    }
    Ok(())
}

/// Records a flow translated at the socket (its wire tuple `key`, whom it
/// is with on the virtual network `peer`) and announces it once: a
/// retransmitted SYN finds its entry. `direction`: the side that opened
/// it. Err when the map is full.
#[inline(always)]
pub fn open_at_socket(
    key: &SocketKey,
    peer: &SocketPeer,
    local_vip: [u8; 4],
    direction: u8,
) -> Result<(), ()> {
    // SAFETY: a copy of the value, read under RCU.
    let existing = unsafe { SOCKET_FLOWS.get(key) }.copied();
    if existing
        .is_some_and(|e| e.vpeer == peer.vpeer && e.vport == peer.vport && e.side == peer.side)
    {
        // The flow's SYN again: its entry stands, flags included (an
        // update would replace the element, and could undo tc ingress
        // clearing a flag at the same time). The application's SYN again
        // once the path it waited for came up (before the agent sent the
        // held one) lets the flow go on.
        if existing.is_some_and(|e| e.flags & SOCKET_AWAIT_PATH != 0)
            && peer.flags & SOCKET_AWAIT_PATH == 0
        {
            path_authenticated(key, peer.flags, local_vip);
        }
        return Ok(());
    }
    let fresh = existing.is_none();
    SOCKET_FLOWS.insert(key, peer, 0).map_err(|_| ())?;
    // A traversal's flow exists once the member answers (tc ingress); a
    // flow that waits for its path once the path is there.
    if fresh && peer.flags & (SOCKET_AWAIT_ANSWER | SOCKET_AWAIT_PATH) == 0 {
        announce_at_socket(key, peer, local_vip, direction);
    }
    Ok(())
}

/// A flow whose SYN waited for its path (`SOCKET_AWAIT_PATH`) goes on:
/// its entry takes `flags`, and the flow is announced unless a traversal
/// is still to come. Nothing for any other flow.
#[inline(always)]
pub fn path_authenticated(key: &SocketKey, flags: u16, local_vip: [u8; 4]) {
    let Some(p) = SOCKET_FLOWS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a live value of the map, under RCU; the copy is taken after
    // the write, and a racing writer stores flags of the same flow.
    let f = unsafe {
        if (*p).flags & SOCKET_AWAIT_PATH == 0 {
            return;
        }
        (*p).flags = flags;
        *p
    };
    if flags & SOCKET_AWAIT_ANSWER == 0 {
        announce_at_socket(key, &f, local_vip, DIRECTION_EGRESS);
    }
}

/// Reports a flow translated at the socket by its virtual tuple.
#[inline(always)]
pub fn announce_at_socket(key: &SocketKey, peer: &SocketPeer, local_vip: [u8; 4], direction: u8) {
    let virtual_tuple = FlowKey::new(
        local_vip,
        peer.vpeer,
        peer.local_vport(key.local_port),
        peer.vport,
        IPPROTO_TCP,
        DIRECTION_EGRESS,
    );
    announce_flow(&virtual_tuple, direction, peer.technique);
}

/// Reports a flow by its virtual tuple, local side first (the egress key,
/// whichever side opened the flow); `direction`: the side that opened it.
#[inline(always)]
pub fn announce_flow(egress: &FlowKey, direction: u8, technique: u8) {
    emit_quietly(&Event {
        kind: EVENT_FLOW_CREATED,
        proto: egress.proto,
        direction,
        technique,
        saddr: egress.saddr,
        daddr: egress.daddr,
        sport: egress.sport,
        dport: egress.dport,
        ..Default::default()
    });
}

/// Removes a flow's entries, both directions, if there are any.
#[inline(always)]
pub fn close(key: &FlowKey) {
    if let Some(m) = MASQUERADING.get_ptr(key) {
        // SAFETY: a value the lookup just returned, read under RCU.
        let twin = key.twin(unsafe { &*m });
        let _ = MASQUERADING.remove(&twin);
        let _ = MASQUERADING.remove(key);
    }
}

/// The egress value of this host's TCP flow from `sport` to the member at
/// `peer`, as its path says: to its real address, and to the path's wire
/// port when it has one (a UPnP forward), else the flow's own `dport`.
#[inline(always)]
pub fn outbound(
    s: &Settings,
    path: &PeerPath,
    peer: [u8; 4],
    sport: u16,
    dport: u16,
) -> Masquerade {
    let wire_port = if path.port != 0 { path.port } else { dport };
    entry(s.real_addr, path.real, sport, wire_port, peer, path)
}

/// Whether this host's flow from `sport` over `path`, masqueraded per
/// packet, takes another source port on the wire: when sockets carry the
/// path's other flows, the kernel may give one of them this flow's port
/// (`MasqueradingPorts`).
#[inline(always)]
pub fn moved_ports(path: &PeerPath, sport: u16) -> Option<MasqueradingPorts> {
    if path.flags & (PATH_SOCKET | PATH_PER_FLOW) != PATH_SOCKET {
        return None;
    }
    MASQUERADING_PORTS
        .get(0)
        .copied()
        .filter(|ports| ports.moves(sport))
}

/// `m` (the egress entry of the flow `key`) with the first of `tries`
/// candidate source ports whose wire tuple is free: no other flow's entry,
/// no connection between the real addresses. None when all are taken.
#[inline(always)]
pub fn on_moved_port(
    ctx: &TcContext,
    key: &FlowKey,
    m: Masquerade,
    ports: &MasqueradingPorts,
    tries: u32,
) -> Option<Masquerade> {
    for i in 0..tries {
        let port = ports.candidate(key, i);
        let twin = FlowKey::new(
            m.daddr,
            m.saddr,
            m.dport,
            port,
            IPPROTO_TCP,
            DIRECTION_INGRESS,
        );
        // This very flow's (a retransmitted SYN) is not another's.
        if peek(&twin).is_some_and(|t| {
            t.saddr != key.daddr
                || t.daddr != key.saddr
                || t.sport != key.dport
                || t.dport != key.sport
        }) {
            continue;
        }
        if sockets::tcp_use(ctx, m.saddr, port, m.daddr, m.dport) != Use::Free {
            continue;
        }
        return Some(Masquerade { sport: port, ..m });
    }
    None
}

/// The masquerading value for a new flow towards/from `peer`.
#[inline(always)]
pub fn entry(
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: u16,
    dport: u16,
    peer: [u8; 4],
    path: &PeerPath,
) -> Masquerade {
    Masquerade {
        last_seen_ns: now_ns(),
        saddr,
        daddr,
        sport,
        dport,
        peer,
        technique: path.technique,
        tcp_flags: 0,
        flags: 0,
        _pad: 0,
        _pad2: 0,
    }
}

/// Clears `flag` of a flow's entry (a traversal step is done).
#[inline(always)]
pub fn clear_flag(key: &FlowKey, flag: u8) {
    if let Some(p) = MASQUERADING.get_ptr_mut(key) {
        // SAFETY: a live value of the map, under RCU; a racing writer stores
        // the same kind of value.
        unsafe { (*p).flags &= !flag };
    }
}

/// The MAC of a SYN's tag: only the two ends of an authenticated path hold
/// `tag_key`. Computed over what no NAT changes (`tag_message`).
#[inline(always)]
pub fn tag_mac(
    path: &PeerPath,
    vsrc: [u8; 4],
    vdst: [u8; 4],
    vdport: u16,
    flags: u8,
    tcp: &Tcp,
) -> [u8; 8] {
    siphash24_16(
        &path.tag_key,
        &tag_message(vsrc, vdst, vdport, flags, tcp.seq),
    )
    .to_le_bytes()
}

/// A traversal's punch SYN from a member: the agent learns from it where
/// the member's NAT put the flow.
#[inline(always)]
pub fn punch_received(ctx: &TcContext, ip: &Ipv4) -> DropReason {
    to_agent(ctx, ip, ip.daddr, EVENT_PUNCH, DropReason::Punch);
    DropReason::Punch
}

/// A server's answer the agent sends out as a punch SYN first.
#[inline(always)]
pub fn hold_answer(ctx: &TcContext, ip: &Ipv4) -> DropReason {
    to_agent(ctx, ip, ip.daddr, EVENT_ANSWER_HELD, DropReason::HeldAnswer);
    DropReason::HeldAnswer
}

/// Hands a packet to the agent, which authenticates the peer and then
/// re-sends it when it got all of it. A full ring buffer loses it: TCP
/// retransmits the SYN, ping sends the next request.
#[inline(always)]
pub fn hold(ctx: &TcContext, ip: &Ipv4) {
    to_agent(
        ctx,
        ip,
        ip.daddr,
        EVENT_PACKET_HELD,
        DropReason::AwaitingPath,
    );
}

/// Hands the SYN of a flow with the member at `vpeer` to the agent, which
/// authenticates the path or runs the flow's traversal and then sends it
/// (translated at the socket: it goes to the member's real address
/// already).
#[inline(always)]
pub fn hold_at_socket(ctx: &TcContext, ip: &Ipv4, vpeer: [u8; 4]) {
    to_agent(ctx, ip, vpeer, EVENT_PACKET_HELD, DropReason::AwaitingPath);
}

/// Drops a connection request the data path cannot carry and has the agent
/// answer it with a RST, so that the connect() behind it fails at once with
/// ECONNREFUSED instead of retransmitting into the same refusal. Returns the
/// reason, for the caller to count.
#[inline(always)]
pub fn refuse(ctx: &TcContext, ip: &Ipv4, reason: DropReason) -> DropReason {
    to_agent(ctx, ip, ip.daddr, EVENT_PACKET_REFUSED, reason);
    reason
}

/// Whether this host's SYN may take a 4-tuple on the wire that `used`
/// describes: a live connection keeps it (the SYN is refused with a RST); a
/// closing one is waited for (the SYN is dropped and TCP retransmits it).
#[inline(always)]
pub fn may_take(ctx: &TcContext, ip: &Ipv4, used: Use) -> Result<(), DropReason> {
    match used {
        Use::Free => Ok(()),
        Use::Closing => Err(DropReason::TupleClosing),
        Use::Live => Err(refuse(ctx, ip, DropReason::FlowCollision)),
    }
}

/// `peer`: the member the packet is for, by the address the agent knows
/// it by (the packet's destination, unless translated at the socket).
#[inline(always)]
fn to_agent(ctx: &TcContext, ip: &Ipv4, peer: [u8; 4], kind: u8, reason: DropReason) {
    let Some(mut entry) = EVENTS.reserve_untyped::<HeldPacket>(0) else {
        return;
    };
    // Bounded on both sides in one value, so that the verifier sees a
    // non-empty copy that fits the record.
    let len = (ip.tot_len as u32).clamp(20, HELD_BYTES as u32);
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points to a reserved, writable ring-buffer record of
    // HeldPacket's size, and the copy is bounded by `packet`'s length.
    let copied = unsafe {
        (*ev).kind = kind;
        (*ev).complete = (ip.tot_len as usize <= HELD_BYTES) as u8;
        (*ev).len = len as u16;
        (*ev).daddr = peer;
        (*ev).reason = reason as u32;
        (*ev)._pad = 0;
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            IP_OFF as u32,
            (*ev).packet.as_mut_ptr() as *mut _,
            len,
        ) == 0
    };
    if copied {
        entry.submit(BPF_RB_FORCE_WAKEUP as u64);
    } else {
        entry.discard(0);
    }
}
