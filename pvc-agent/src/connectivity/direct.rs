//! Direct: the member's own address is public and open (a public host), or
//! nothing is known of its site yet (members that reach each other's real
//! addresses, as on a routed network): SYNs go to its address as they are.

use pvc_common::Technique;
use pvc_proto::{Inbound, Nat};

use super::{Pair, Path};

pub fn path(pair: &Pair<'_>) -> Option<Path> {
    let open = pair.peer.inbound == Inbound::Open && pair.peer.nat == Nat::None;
    let unknown = pair.peer.inbound == Inbound::Unknown && pair.peer.upnp.is_none();
    if !open && !unknown {
        return None;
    }
    Some(Path {
        real: pair.peer_public()?,
        local: pair.public_local(),
        technique: Technique::Direct,
        port: 0,
    })
}
