//! Traversing-TCP (paper §4.4.3, Fig. 3): the member is public behind a
//! firewall that drops connection requests but lets the rest pass. Our SYN
//! goes out (opening our own NAT or firewall) and is dropped at its
//! firewall; a broker carries a copy to the member's agent, which injects it
//! into its own stack; the member's SYN/ACK goes out through its firewall
//! like any answer, and our side completes the handshake. A RST the
//! firewall may send as a rejection is kept from our socket.
//!
//! It needs the member's firewall to be stateless (its probe: a TCP
//! connection is dropped, a UDP datagram passes) and no NAT on its side (a
//! NAT would find the SYN/ACK invalid and let it out untranslated), and our
//! public port to be predictable (the member injects the SYN as coming from
//! it).

use pvc_common::Technique;
use pvc_proto::{Inbound, Nat};

use super::{Pair, Path};

pub fn path(pair: &Pair<'_>) -> Option<Path> {
    if pair.peer.inbound != Inbound::SynFiltered
        || pair.peer.nat != Nat::None
        || !pair.our_ports_kept()
    {
        return None;
    }
    Some(Path {
        real: pair.peer_public()?,
        local: pair.public_local(),
        technique: Technique::Ttcp,
        port: 0,
    })
}
