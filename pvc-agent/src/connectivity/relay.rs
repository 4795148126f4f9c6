//! Relay: through a broker, when nothing direct works (both sides behind
//! NATs whose ports cannot be predicted, or a traversal that did not
//! complete). The only path whose bytes go through userspace.

use pvc_common::Technique;

use super::{Pair, Path};

pub fn path(pair: &Pair<'_>) -> Option<Path> {
    Some(Path {
        real: pair.peer_public()?,
        local: pair.public_local(),
        technique: Technique::Relay,
        port: 0,
    })
}
