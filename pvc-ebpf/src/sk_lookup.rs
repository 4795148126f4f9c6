//! sk_lookup: a connection to a member reached through the relay goes to
//! the agent. The agent makes such a member's virtual address a local one
//! (a route of type local, with our virtual address as source), so the
//! application's SYN arrives on `lo`; here its socket lookup picks the
//! agent's relay listener, whose accepted socket keeps the address and
//! port the application asked for. Everything else is looked up as usual.

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use pvc_common::{IPPROTO_TCP, PEER_READY, Technique, is_virtual};

use crate::maps::{RELAY_LISTENER, peer};

const AF_INET: u32 = 2;
const SK_PASS: u32 = 1;

#[sk_lookup]
pub fn pvc_relay_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context's bpf_sk_lookup, valid for the whole run.
    let l = unsafe { &*ctx.lookup };
    if l.family != AF_INET || l.protocol != IPPROTO_TCP as u32 {
        return SK_PASS;
    }
    let daddr = l.local_ip4.to_ne_bytes();
    if !is_virtual(daddr) {
        return SK_PASS;
    }
    if let Some(p) = peer(daddr)
        && p.state == PEER_READY
        && p.technique == Technique::Relay as u8
    {
        // No listener (the agent is gone): the usual lookup finds no socket
        // and the stack answers with a RST, so connect() fails at once.
        let _ = RELAY_LISTENER.redirect_sk_lookup(&ctx, 0, 0);
    }
    SK_PASS
}
