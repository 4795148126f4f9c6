//! Connectivity (paper §4.4): how this host reaches a member. One file per
//! technique; `choose` picks the best that applies to the pair. The choice is
//! a candidate: the authenticated exchange with the member confirms the path
//! before anything is installed.

pub mod direct;
pub mod discovery;
pub mod upnp;

use std::net::Ipv4Addr;

use pvc_common::Technique;

use crate::{security::membership::Member, virtualization::LocalNet};

/// A path to a member: the real address its flows are masqueraded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Path {
    pub real: Ipv4Addr,
    pub technique: Technique,
}

/// The best path to `member` from a host on `local` networks, if any.
pub fn choose(member: &Member, local: &[LocalNet]) -> Option<Path> {
    direct::path(member, local)
}
