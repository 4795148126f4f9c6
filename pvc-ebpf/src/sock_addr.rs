//! cgroup sock_addr hooks: every connect() of a process in the agent's
//! cgroup passes here before the kernel sends anything, and so do the
//! addresses getpeername(), accept() and getsockname() return.
//!
//! Translation at the socket (paths marked `PATH_SOCKET`): connect() to a
//! member's virtual address goes to its real address instead, so that no
//! packet of the flow needs a rewrite; getpeername()/accept() and
//! getsockname() still show the virtual addresses, from the socket-flows
//! map.

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{bpf_get_current_pid_tgid, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use pvc_common::{
    DropReason, EVENT_CONNECT_REFUSED, Event, IPPROTO_TCP, POLICY_OUTBOUND, PeerPath,
    SOCKET_CONNECTED, STANDING_EXPIRED, STANDING_REVOKED, SocketKey, SocketPeer, is_virtual,
};

use crate::maps::{SOCKET_CONNECTS, SOCKET_FLOWS, allowed, count_drop, emit, peer, settings};

const EPERM: i32 = 1;
const EHOSTUNREACH: i32 = 113;
const EKEYEXPIRED: i32 = 127;
const EKEYREVOKED: i32 = 128;

/// Refuses at once, with a real errno, a connect() that cannot succeed:
/// EKEYREVOKED / EKEYEXPIRED when this host is no longer a member,
/// EHOSTUNREACH to a virtual address no member holds, EPERM when the policy
/// forbids the flow. Without this the SYN would be dropped on egress and the
/// application would wait for TCP's timeouts.
#[cgroup_sock_addr(connect4)]
pub fn pvc_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context's bpf_sock_addr, valid for the whole run.
    let sa = unsafe { &*ctx.sock_addr };
    let daddr = sa.user_ip4.to_ne_bytes();
    if !is_virtual(daddr) {
        return 1;
    }
    let Some(s) = settings() else {
        return 1;
    };
    if daddr == s.virtual_addr {
        return 1;
    }
    let dport = u16::from_be(sa.user_port as u16);
    let path = peer(daddr);
    let (reason, errno) = if s.standing == STANDING_REVOKED {
        (DropReason::NotAMember, EKEYREVOKED)
    } else if s.standing == STANDING_EXPIRED {
        (DropReason::NotAMember, EKEYEXPIRED)
    } else if path.is_none() {
        (DropReason::ConnectNoMember, EHOSTUNREACH)
    } else if sa.protocol == IPPROTO_TCP as u32 && !allowed(&s, POLICY_OUTBOUND, daddr, dport) {
        (DropReason::PolicyOutbound, EPERM)
    } else {
        if let Some(path) = path
            && sa.protocol == IPPROTO_TCP as u32
        {
            translate(&ctx, &path, daddr, dport);
        }
        return 1;
    };
    count_drop(reason);
    emit(&Event {
        kind: EVENT_CONNECT_REFUSED,
        proto: sa.protocol as u8,
        reason: reason as u32,
        saddr: s.virtual_addr,
        daddr,
        dport,
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        ..Default::default()
    });
    // SAFETY: sets the errno connect() returns when the hook rejects.
    unsafe { bpf_set_retval(-errno) };
    0
}

/// Sends a connect() to the member's real address when its path allows it
/// (also a direct path still to be authenticated: tc egress holds the SYN
/// for it) and the socket is not bound to a virtual address (its packets
/// would leave with it). Otherwise, or when the connect cannot be recorded,
/// the flow is masqueraded per packet, as before.
#[inline(always)]
fn translate(ctx: &SockAddrContext, path: &PeerPath, vpeer: [u8; 4], vport: u16) {
    if !path.connects_at_socket_now() {
        return;
    }
    // SAFETY: the context's bpf_sock_addr, valid for the whole run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(sk) = sock(ctx) else {
        return;
    };
    if is_virtual(sk.src_ip4) {
        return;
    }
    let connect = SocketPeer {
        vpeer,
        vport,
        technique: path.technique,
        side: SOCKET_CONNECTED,
        ..Default::default()
    };
    // SAFETY: the helper takes this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr as *mut _) };
    if SOCKET_CONNECTS.insert(&cookie, &connect, 0).is_err() {
        return;
    }
    let wire_port = if path.port != 0 { path.port } else { vport };
    sa.user_ip4 = u32::from_ne_bytes(path.real);
    sa.user_port = wire_port.to_be() as u32;
}

/// The tuple of the socket behind a sock_addr hook (ports in host order).
struct SockTuple {
    src_ip4: [u8; 4],
    src_port: u16,
    dst_ip4: [u8; 4],
    dst_port: u16,
}

#[inline(always)]
fn sock(ctx: &SockAddrContext) -> Option<SockTuple> {
    // SAFETY: the context's bpf_sock_addr; its socket pointer, when the
    // kernel sets it, is valid for the whole run. Field by field: the
    // verifier allows reads of these fields, not of the whole struct.
    unsafe {
        let sk: *const bpf_sock = (*ctx.sock_addr).__bindgen_anon_1.sk;
        if sk.is_null() {
            return None;
        }
        Some(SockTuple {
            src_ip4: (*sk).src_ip4.to_ne_bytes(),
            src_port: (*sk).src_port as u16,
            dst_ip4: (*sk).dst_ip4.to_ne_bytes(),
            dst_port: u16::from_be((*sk).dst_port),
        })
    }
}

/// The entry of a socket-level flow, by its wire tuple.
#[inline(always)]
fn socket_flow(peer: [u8; 4], peer_port: u16, local_port: u16) -> Option<SocketPeer> {
    let key = SocketKey {
        peer,
        peer_port,
        local_port,
    };
    // SAFETY: a copy of the value, read under RCU.
    unsafe { SOCKET_FLOWS.get(&key) }.copied()
}

/// getpeername(), and accept()'s address: a socket-level flow's peer is
/// shown as the member's virtual address and port.
#[cgroup_sock_addr(getpeername4)]
pub fn pvc_getpeername4(ctx: SockAddrContext) -> i32 {
    let Some(sk) = sock(&ctx) else {
        return 1;
    };
    // SAFETY: the context's bpf_sock_addr, valid for the whole run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let peer = sa.user_ip4.to_ne_bytes();
    let peer_port = u16::from_be(sa.user_port as u16);
    if let Some(f) = socket_flow(peer, peer_port, sk.src_port) {
        sa.user_ip4 = u32::from_ne_bytes(f.vpeer);
        sa.user_port = f.vport.to_be() as u32;
    }
    1
}

/// getsockname(): a socket-level flow's local address is this host's
/// virtual address, and its port the one the application knows (the same
/// as on the wire, but for a flow a UPnP forward brought).
#[cgroup_sock_addr(getsockname4)]
pub fn pvc_getsockname4(ctx: SockAddrContext) -> i32 {
    let Some(sk) = sock(&ctx) else {
        return 1;
    };
    let (peer, peer_port) = (sk.dst_ip4, sk.dst_port);
    // SAFETY: the context's bpf_sock_addr, valid for the whole run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let local_port = u16::from_be(sa.user_port as u16);
    if let Some(f) = socket_flow(peer, peer_port, local_port)
        && let Some(s) = settings()
    {
        sa.user_ip4 = u32::from_ne_bytes(s.virtual_addr);
        sa.user_port = f.local_vport(local_port).to_be() as u32;
    }
    1
}
