//! LAN: the member's address is on one of our networks (two members behind
//! the same NAT, or a cluster on one LAN): no router, no NAT in between.

use pvc_common::Technique;

use super::{Pair, Path};

pub fn path(pair: &Pair<'_>) -> Option<Path> {
    let real = *pair
        .member
        .addresses
        .iter()
        .find(|a| pair.networks.iter().any(|n| n.contains(**a)))?;
    let local = pair
        .networks
        .iter()
        .find(|n| n.contains(real))
        .map_or(pair.real_ip, |n| n.address);
    Some(Path {
        real,
        local,
        technique: Technique::Lan,
        port: 0,
    })
}
