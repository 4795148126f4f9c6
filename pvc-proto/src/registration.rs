//! The rules a registration must follow, shared by the agent (to reject a bad
//! config before it reaches a broker) and the broker (to reject bad input).

use std::net::Ipv4Addr;

use crate::{Member, Registration};

pub const MAX_NAME: usize = 63;
pub const MAX_ADDRESSES: usize = 16;
pub const MAX_SOFTWARE: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRegistration {
    #[error(
        "{what} {value:?} is not a valid name: use 1 to 63 characters among a-z, 0-9 and '-', \
         not starting or ending with '-'"
    )]
    Name { what: &'static str, value: String },
    #[error(
        "virtual address {0} is outside 240.0.0.0/4 or reserved (240.0.0.0 and \
         255.255.255.255 are not assignable)"
    )]
    VirtualAddress(Ipv4Addr),
    #[error("no real address to advertise: a member must be reachable somewhere")]
    NoAddress,
    #[error("too many real addresses ({0}, at most {MAX_ADDRESSES})")]
    TooManyAddresses(usize),
    #[error(
        "real address {0} cannot be advertised (virtual, loopback, multicast, broadcast or \
         unspecified)"
    )]
    RealAddress(Ipv4Addr),
    #[error("software string longer than {MAX_SOFTWARE} bytes")]
    Software,
}

/// A DNS label: the member's name is also its host name in the virtual zone.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub fn valid_virtual_address(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] & 0xf0 == 0xf0 && a != Ipv4Addr::new(240, 0, 0, 0) && a != Ipv4Addr::BROADCAST
}

fn valid_real_address(a: Ipv4Addr) -> bool {
    !(a.octets()[0] & 0xf0 == 0xf0
        || a.is_loopback()
        || a.is_multicast()
        || a.is_broadcast()
        || a.is_unspecified())
}

impl Member {
    pub fn validate(&self) -> Result<(), InvalidRegistration> {
        if !valid_name(&self.name) {
            return Err(InvalidRegistration::Name {
                what: "member name",
                value: self.name.clone(),
            });
        }
        if !valid_virtual_address(self.virtual_ip) {
            return Err(InvalidRegistration::VirtualAddress(self.virtual_ip));
        }
        if self.addresses.is_empty() {
            return Err(InvalidRegistration::NoAddress);
        }
        if self.addresses.len() > MAX_ADDRESSES {
            return Err(InvalidRegistration::TooManyAddresses(self.addresses.len()));
        }
        if let Some(a) = self.addresses.iter().find(|a| !valid_real_address(**a)) {
            return Err(InvalidRegistration::RealAddress(*a));
        }
        Ok(())
    }
}

impl Registration {
    pub fn validate(&self) -> Result<(), InvalidRegistration> {
        if !valid_name(&self.cluster) {
            return Err(InvalidRegistration::Name {
                what: "cluster name",
                value: self.cluster.clone(),
            });
        }
        if self.software.len() > MAX_SOFTWARE {
            return Err(InvalidRegistration::Software);
        }
        self.member.validate()
    }
}
