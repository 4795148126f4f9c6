//! Connection reversal: the member is behind a symmetric NAT (its ports
//! cannot be predicted), and we are open. Its agent injects our SYN into its
//! stack and sends the answer's sequence number out as a SYN to us first
//! (`punch`): its NAT picks some port, and our kernel, seeing that punch
//! SYN arrive, tells our agent which; our SYN then goes to that port.

use pvc_common::Technique;
use pvc_proto::{Inbound, Nat};

use super::{Pair, Path};

pub fn path(pair: &Pair<'_>) -> Option<Path> {
    if pair.peer.nat != Nat::Random || pair.me.inbound != Inbound::Open || pair.me.nat != Nat::None
    {
        return None;
    }
    Some(Path {
        real: pair.peer_public()?,
        local: pair.public_local(),
        technique: Technique::Reversal,
        port: 0,
    })
}
