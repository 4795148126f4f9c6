//! This host's own TCP sockets, seen from tc. A PVC flow and a connection
//! between real addresses can pick the same ports: on the wire they would
//! share one 4-tuple, and the newer one would take the older one's packets.
//! Before a SYN opens or retires a flow, the programs ask the kernel whether
//! a socket still uses that tuple.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_CLOSE, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT1, BPF_TCP_FIN_WAIT2,
        BPF_TCP_LAST_ACK, BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT, bpf_sock, bpf_sock_tuple,
        bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::{bpf_sk_assign, bpf_sk_release, bpf_skb_ancestor_cgroup_id, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use pvc_common::{AGENT_MARK, Settings};

/// Whether the agent itself sent this packet (its raw socket's mark).
#[inline(always)]
pub fn from_agent(ctx: &TcContext) -> bool {
    // SAFETY: the context's own skb, for a field read.
    unsafe { (*ctx.skb.skb).mark == AGENT_MARK }
}

/// Whether a packet this host sends belongs to the cgroup PVC serves: its
/// socket's cgroup (a listener's, for a SYN/ACK) is that one or below it.
/// Packets the agent sends itself carry its mark and pass.
#[inline(always)]
pub fn sender_in_cgroup(ctx: &TcContext, s: &Settings) -> bool {
    if s.cgroup_id == 0 {
        return true;
    }
    // SAFETY: the context's own skb, for a helper.
    from_agent(ctx)
        || unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, s.cgroup_level as i32) } == s.cgroup_id
}

/// Whether a packet this host sends has a socket: a SYN/ACK sent with a
/// SYN cookie has none (no state is kept under a SYN flood).
#[inline(always)]
pub fn has_socket(ctx: &TcContext) -> bool {
    // SAFETY: the context's own skb, for a field read.
    !unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk }.is_null()
}

/// Whether a SYN/ACK this host sends answers for the cgroup PVC serves.
/// One sent with a SYN cookie (under a SYN flood, or with a full accept
/// queue) has no socket, and tc cannot read a listener's cgroup: a cookie
/// answering for a listener of `lport` passes (its client's SYN passed the
/// tag and policy checks), whether the listener takes `local` or is bound
/// to the virtual address (tc ingress handed it the SYN).
#[inline(always)]
pub fn answer_in_cgroup(
    ctx: &TcContext,
    s: &Settings,
    local: [u8; 4],
    lport: u16,
    remote: [u8; 4],
    rport: u16,
) -> bool {
    if s.cgroup_id == 0 || from_agent(ctx) {
        return true;
    }
    // SAFETY: the context's own skb, for a helper.
    match unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, s.cgroup_level as i32) } {
        // A request socket on the tuple (no cookie) is not a listener's
        // answer; nothing on the real address may be a listener bound to
        // the virtual one.
        0 => match tcp_state(ctx, local, lport, remote, rport) {
            None => tcp_state(ctx, s.virtual_addr, lport, remote, rport) == Some(BPF_TCP_LISTEN),
            state => state == Some(BPF_TCP_LISTEN),
        },
        id => id == s.cgroup_id,
    }
}

/// Hands this SYN from `remote:rport` to the listener of `local:lport`,
/// whatever port the SYN names: a NAT's forward brought it to another one
/// (UPnP), and the listener's child socket keeps the wire's tuple. False
/// when no listener takes `local:lport` or the kernel declines.
#[inline(always)]
pub fn assign_listener(
    ctx: &TcContext,
    local: [u8; 4],
    lport: u16,
    remote: [u8; 4],
    rport: u16,
) -> bool {
    let sk = lookup(ctx, local, lport, remote, rport);
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null socket from the lookup, released exactly once
    // below; the helper takes its own reference when it keeps it.
    let assigned = unsafe {
        (*sk).state == BPF_TCP_LISTEN && bpf_sk_assign(ctx.skb.skb as *mut _, sk as *mut _, 0) == 0
    };
    // SAFETY: releases the reference the lookup took, once.
    unsafe { bpf_sk_release(sk as *mut _) };
    assigned
}

/// The socket of this host that a packet from `remote:rport` to
/// `local:lport` would reach (a connection's, else a listener's), with a
/// reference the caller releases; null when there is none.
#[inline(always)]
fn lookup(
    ctx: &TcContext,
    local: [u8; 4],
    lport: u16,
    remote: [u8; 4],
    rport: u16,
) -> *mut bpf_sock {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: u32::from_ne_bytes(remote),
                daddr: u32::from_ne_bytes(local),
                sport: rport.to_be(),
                dport: lport.to_be(),
            },
        },
    };
    // SAFETY: the context is this program's skb and the tuple lives on the
    // stack for the call; the size names its IPv4 part only.
    unsafe {
        bpf_skc_lookup_tcp(
            ctx.skb.skb as *mut _,
            &mut tuple,
            size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    }
}

/// What uses a 4-tuple on this host.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Nothing, or a connection that has ended (TIME_WAIT, closed).
    Free,
    /// A connection whose close is under way on this side (its FIN is out):
    /// it still exchanges its last packets, and will be gone soon.
    Closing,
    /// A connection in use.
    Live,
}

/// The state of the socket of this host that a packet from `remote:rport`
/// to `local:lport` would reach: a connection's, else a listener's.
#[inline(always)]
fn tcp_state(
    ctx: &TcContext,
    local: [u8; 4],
    lport: u16,
    remote: [u8; 4],
    rport: u16,
) -> Option<u32> {
    let sk = lookup(ctx, local, lport, remote, rport);
    if sk.is_null() {
        return None;
    }
    // SAFETY: a non-null socket from the lookup, released exactly once below;
    // `state` is readable on every socket kind the lookup returns.
    let state = unsafe { (*sk).state };
    // SAFETY: releases the reference the lookup took, once.
    unsafe { bpf_sk_release(sk as *mut _) };
    Some(state)
}

/// How a TCP connection of this host between `local:lport` and
/// `remote:rport` uses that tuple. A listener is not a connection.
#[inline(always)]
pub fn tcp_use(ctx: &TcContext, local: [u8; 4], lport: u16, remote: [u8; 4], rport: u16) -> Use {
    let Some(state) = tcp_state(ctx, local, lport, remote, rport) else {
        return Use::Free;
    };
    match state {
        // An orphaned FIN_WAIT2 also reads as TIME_WAIT (the kernel keeps it
        // as a time-wait socket): its application is done with it.
        BPF_TCP_LISTEN | BPF_TCP_TIME_WAIT | BPF_TCP_CLOSE => Use::Free,
        BPF_TCP_FIN_WAIT1 | BPF_TCP_FIN_WAIT2 | BPF_TCP_CLOSING | BPF_TCP_LAST_ACK => Use::Closing,
        _ => Use::Live,
    }
}

/// Whether a SYN from `remote:rport` to `local:lport` (as it is on the
/// wire) reaches a listener. tc cannot read a socket's cgroup: whether the
/// listener serves the virtual network is checked on its answer
/// (`answer_in_cgroup`).
#[inline(always)]
pub fn listening(ctx: &TcContext, local: [u8; 4], lport: u16, remote: [u8; 4], rport: u16) -> bool {
    tcp_state(ctx, local, lport, remote, rport) == Some(BPF_TCP_LISTEN)
}
