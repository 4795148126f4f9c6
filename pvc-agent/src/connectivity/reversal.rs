//! Connection reversal: the member is behind a symmetric NAT (its ports
//! cannot be predicted), and we are open, or forwarded by a UPnP gateway.
//! Its agent injects our SYN into its stack and sends the answer's
//! sequence number out as a SYN to us first (`punch`): its NAT picks some
//! port, and our kernel, seeing that punch SYN arrive, tells our agent
//! which; our SYN then goes to that port (from our forwarded PVC port,
//! through a UPnP gateway, whose NAT takes it for the punch's answer).

use pvc_common::Technique;
use pvc_proto::{Inbound, Nat};

use super::{Pair, Path};

pub fn path(pair: &Pair<'_>) -> Option<Path> {
    let open = pair.me.inbound == Inbound::Open && pair.me.nat == Nat::None;
    if pair.peer.nat != Nat::Random || !(open || pair.me.upnp.is_some()) {
        return None;
    }
    Some(Path {
        real: pair.peer_public()?,
        local: pair.public_local(),
        technique: Technique::Reversal,
        port: 0,
    })
}
