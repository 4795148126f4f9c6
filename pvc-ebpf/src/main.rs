//! PVC's kernel data path (paper §4.1, the interposition module).
//!
//! - `sock_addr`: cgroup hooks that see every connect() to 240.0.0.0/4 and
//!   refuse, with a real errno, those that no member can answer.
//! - `tc_egress` / `tc_ingress`: the masquerading programs on the uplink. They
//!   rewrite virtual addresses to real ones and back, per flow, from the
//!   masquerading map the agent fills, so that sockets on both ends see only
//!   virtual addresses while the wire carries real ones. No encapsulation, no
//!   copy to userspace.
//! - `tc_masquerade`: the rewrite of a packet masqueraded per packet, in
//!   place, tail-called by both.
//! - `sk_lookup`: connections to members reached through the relay go to
//!   the agent's relay listener.
#![no_std]
#![no_main]

mod flow;
mod maps;
mod nat;
mod packet;
mod sk_lookup;
mod sock_addr;
mod sock_ops;
mod sockets;
mod tc_egress;
mod tc_ingress;
mod tc_masquerade;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
