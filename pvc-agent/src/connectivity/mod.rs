//! Connectivity (paper §4.4): how this host reaches a member. One file per
//! technique, each knowing when it applies to a pair of sites; `choose`
//! tries them in order of cost and takes the first that applies. The choice
//! is a candidate: the authenticated exchange with the member binds the
//! addresses it uses before anything is installed, and the agents fall
//! back when a traversal does not complete in time.
//!
//! | technique  | when                                                   | per flow |
//! |------------|--------------------------------------------------------|----------|
//! | `lan`      | the member's address is on one of our networks         | no       |
//! | `direct`   | its own address is public and open (or nothing known)  | no       |
//! | `upnp`     | its gateway forwards its PVC port                      | no       |
//! | `ttcp`     | public behind a SYN-dropping firewall; our ports kept  | yes      |
//! | `punch`    | behind a port-keeping NAT or a stateful firewall       | yes      |
//! | `reversal` | behind a symmetric NAT, and we are open                | yes      |
//! | `relay`    | nothing direct works                                   | broker   |

pub mod direct;
pub mod discovery;
pub mod lan;
pub mod punch;
pub mod relay;
pub mod reversal;
pub mod ttcp;
pub mod upnp;

use std::net::Ipv4Addr;

use pvc_common::Technique;
use pvc_proto::{Nat, SiteInfo};

use crate::{security::membership::Member, virtualization::LocalNet};

/// A path to a member, as this host's flows to it use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Path {
    /// The member's address on the wire, both ways: its public address, or
    /// its LAN address beside us.
    pub real: Ipv4Addr,
    /// Our address as the member sees it on the wire.
    pub local: Ipv4Addr,
    pub technique: Technique,
    /// The wire destination port when not the flow's own (a UPnP forward).
    pub port: u16,
}

/// What both ends know of their sites.
pub struct Pair<'a> {
    /// Our networks (the uplink's), and our address on the uplink.
    pub networks: &'a [LocalNet],
    pub real_ip: Ipv4Addr,
    pub me: &'a SiteInfo,
    pub member: &'a Member,
    pub peer: &'a SiteInfo,
}

impl Pair<'_> {
    /// Our address as a member beyond our LAN sees it.
    fn public_local(&self) -> Ipv4Addr {
        self.me.public.unwrap_or(self.real_ip)
    }

    /// The member's public address: what the brokers see, else its first
    /// registered address.
    fn peer_public(&self) -> Option<Ipv4Addr> {
        self.peer.public.or(self.member.addresses.first().copied())
    }

    /// Whether the port of a flow of ours can be predicted on the wire.
    fn our_ports_kept(&self) -> bool {
        matches!(self.me.nat, Nat::None | Nat::Preserving | Nat::Unknown)
    }
}

/// The best path to the member, if any applies.
pub fn choose(pair: &Pair<'_>) -> Option<Path> {
    lan::path(pair)
        .or_else(|| direct::path(pair))
        .or_else(|| upnp::path(pair))
        .or_else(|| ttcp::path(pair))
        .or_else(|| punch::path(pair))
        .or_else(|| reversal::path(pair))
        .or_else(|| relay::path(pair))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddrV4;

    use pvc_proto::Inbound;

    use super::*;

    const MY_LAN: Ipv4Addr = Ipv4Addr::new(198, 18, 10, 2);
    const THEIR_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 19, 24, 2);

    fn member(addresses: Vec<Ipv4Addr>) -> Member {
        Member {
            name: "s".into(),
            virtual_ip: Ipv4Addr::new(240, 0, 0, 2),
            key: pvc_proto::PublicKey([2; 32]),
            groups: vec![],
            serial: 2,
            not_after: u64::MAX,
            addresses,
        }
    }

    fn site(nat: Nat, inbound: Inbound) -> SiteInfo {
        SiteInfo {
            port: 7101,
            public: Some(THEIR_PUBLIC),
            nat,
            inbound,
            upnp: None,
        }
    }

    fn choose_for(me: SiteInfo, peer: SiteInfo, addresses: Vec<Ipv4Addr>) -> Option<Technique> {
        let networks = [LocalNet {
            address: MY_LAN,
            prefix: 24,
        }];
        let m = member(addresses);
        choose(&Pair {
            networks: &networks,
            real_ip: MY_LAN,
            me: &me,
            member: &m,
            peer: &peer,
        })
        .map(|p| p.technique)
    }

    #[test]
    fn the_matrix_of_sites_picks_the_cheapest_technique_that_works() {
        use Technique::*;
        let public = |inbound| SiteInfo {
            public: Some(MY_LAN),
            ..site(Nat::None, inbound)
        };
        let (open, fwl, fws) = (
            public(Inbound::Open),
            public(Inbound::SynFiltered),
            public(Inbound::Filtered),
        );
        let cone = site(Nat::Preserving, Inbound::Filtered);
        let sym = site(Nat::Random, Inbound::Filtered);
        let upnp = SiteInfo {
            upnp: Some(SocketAddrV4::new(THEIR_PUBLIC, 7101)),
            inbound: Inbound::Open,
            ..cone
        };
        let far = vec![Ipv4Addr::new(198, 19, 120, 2)];
        let peer = |s: SiteInfo| SiteInfo {
            public: Some(THEIR_PUBLIC),
            ..s
        };
        for (me, them, want) in [
            (open, open, Direct),
            (open, fwl, Ttcp),
            (open, fws, Punch),
            (open, cone, Punch),
            (open, upnp, Upnp),
            (open, sym, Reversal),
            (fwl, sym, Relay),
            (cone, fwl, Ttcp),
            (cone, sym, Relay),
            (sym, open, Direct),
            (sym, fwl, Relay),
            (sym, cone, Relay),
            (sym, upnp, Upnp),
            (sym, sym, Relay),
            (upnp, cone, Punch),
            (upnp, sym, Reversal),
        ] {
            assert_eq!(
                choose_for(me, peer(them), far.clone()),
                Some(want),
                "{me:?} -> {them:?}"
            );
        }
        // Behind the same NAT: the LAN, whatever the NAT.
        let neighbour = vec![THEIR_PUBLIC, Ipv4Addr::new(198, 18, 10, 3)];
        assert_eq!(choose_for(cone, peer(cone), neighbour), Some(Lan));
        // Nothing known of either site (a LAN, or discovery not done yet):
        // the member's address as it registered.
        assert_eq!(
            choose_for(SiteInfo::default(), SiteInfo::default(), far),
            Some(Direct)
        );
    }
}
