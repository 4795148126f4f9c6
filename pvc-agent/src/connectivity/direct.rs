//! Direct: the member's real address is reachable as it is (same LAN, a
//! public host, or a port the member opened with UPnP).

use pvc_common::Technique;

use super::Path;
use crate::{security::membership::Member, virtualization::LocalNet};

/// Prefers an address on one of our own networks (a LAN neighbour answers
/// without a router), then the member's own preference order.
pub fn path(member: &Member, local: &[LocalNet]) -> Option<Path> {
    let on_link = member
        .addresses
        .iter()
        .find(|a| local.iter().any(|n| n.contains(**a)));
    on_link.or(member.addresses.first()).map(|real| Path {
        real: *real,
        technique: Technique::Direct,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn an_address_on_our_lan_wins_over_the_first_one() {
        let member = Member {
            name: "b".into(),
            virtual_ip: Ipv4Addr::new(240, 0, 0, 2),
            key: pvc_proto::PublicKey([2; 32]),
            groups: vec![],
            serial: 2,
            not_after: u64::MAX,
            addresses: vec![Ipv4Addr::new(198, 19, 4, 2), Ipv4Addr::new(198, 18, 0, 2)],
        };
        let lan = [LocalNet {
            address: Ipv4Addr::new(198, 18, 0, 1),
            prefix: 24,
        }];
        assert_eq!(
            path(&member, &lan).unwrap().real,
            Ipv4Addr::new(198, 18, 0, 2)
        );
        let elsewhere = [LocalNet {
            address: Ipv4Addr::new(198, 18, 7, 1),
            prefix: 24,
        }];
        assert_eq!(
            path(&member, &elsewhere).unwrap().real,
            Ipv4Addr::new(198, 19, 4, 2)
        );
        let none = Member {
            addresses: vec![],
            ..member
        };
        assert_eq!(path(&none, &lan), None);
    }
}
