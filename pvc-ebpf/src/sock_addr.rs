//! cgroup sock_addr hooks: every connect() of a process in the agent's
//! cgroup passes here before the kernel sends anything.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use pvc_common::{
    DropReason, EVENT_CONNECT_REFUSED, Event, IPPROTO_TCP, POLICY_OUTBOUND, STANDING_EXPIRED,
    STANDING_REVOKED, is_virtual,
};

use crate::maps::{allowed, count_drop, emit, peer, settings};

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
    let (reason, errno) = if s.standing == STANDING_REVOKED {
        (DropReason::NotAMember, EKEYREVOKED)
    } else if s.standing == STANDING_EXPIRED {
        (DropReason::NotAMember, EKEYEXPIRED)
    } else if peer(daddr).is_none() {
        (DropReason::ConnectNoMember, EHOSTUNREACH)
    } else if sa.protocol == IPPROTO_TCP as u32 && !allowed(&s, POLICY_OUTBOUND, daddr, dport) {
        (DropReason::PolicyOutbound, EPERM)
    } else {
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
