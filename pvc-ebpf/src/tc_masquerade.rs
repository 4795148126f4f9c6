//! tc, tail-called by `pvc_egress` and `pvc_ingress`: the rewrite of a
//! packet of a flow masqueraded per packet, written into the packet
//! directly.
//!
//! A program that writes packets directly has the verifier make every
//! cloned packet writable at its entry, with a helper call; TCP's packets
//! are clones (the sender keeps the original for retransmission), so in
//! the masquerading programs themselves every packet would pay that call,
//! flows carried at the socket included. Here only packets that are
//! rewritten pay it, in place of the store helper's call and work.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

use crate::{maps::tc_verdict, nat};

#[classifier]
#[inline(always)]
pub fn pvc_masquerade(ctx: TcContext) -> i32 {
    tc_verdict(nat::rewrite_in_place(&ctx).map(|()| TC_ACT_OK as i32))
}
