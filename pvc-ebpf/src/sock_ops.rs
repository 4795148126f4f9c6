//! sock_ops: the lifetime of flows translated at the socket. Their entries
//! go when their socket closes, so that the socket-flows map holds live
//! flows only (and a later connection on the same tuple starts clean).

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use pvc_common::SocketKey;

use crate::maps::{SOCKET_CONNECTS, SOCKET_FLOWS};

const AF_INET: u32 = 2;

#[sock_ops]
pub fn pvc_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.family() != AF_INET {
        return 1;
    }
    match ctx.op() {
        // A connect() translated at the socket (its cookie is recorded),
        // or a member's flow accepted at the socket: told when it closes.
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            if SOCKET_CONNECTS.get_ptr(&cookie(&ctx)).is_some() {
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if SOCKET_FLOWS.get_ptr(&key(&ctx)).is_some() {
                let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
            }
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let _ = SOCKET_FLOWS.remove(&key(&ctx));
            let _ = SOCKET_CONNECTS.remove(&cookie(&ctx));
        }
        _ => {}
    }
    1
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the helper takes this program's context.
    unsafe { bpf_get_socket_cookie(ctx.ops as *mut _) }
}

/// The socket's tuple on the wire, as the socket-flows map keys it.
#[inline(always)]
fn key(ctx: &SockOpsContext) -> SocketKey {
    SocketKey {
        peer: ctx.remote_ip4().to_ne_bytes(),
        // The kernel shifts the network-order port into the upper half on
        // little-endian hosts: the whole word in network order is the port.
        // The local port is in host order.
        peer_port: u32::from_be(ctx.remote_port()) as u16,
        local_port: ctx.local_port() as u16,
    }
}
