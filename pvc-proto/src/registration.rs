//! Registration with a broker: its rules, shared by the agent (to reject a
//! bad setup before it reaches a broker) and the broker (to reject bad
//! input), and the host key's proof that the agent holds the key it claims.

use std::net::Ipv4Addr;

use pvc_common::is_virtual;

use ring::signature::Ed25519KeyPair;

use crate::{
    ClusterId, PublicKey, Registration,
    records::{sign, unix_now},
};

pub const MAX_NAME: usize = 63;
pub const MAX_ADDRESSES: usize = 16;
pub const MAX_SOFTWARE: usize = 64;
/// How far a registration's timestamp may be from the broker's clock.
pub const MAX_SKEW_SECS: u64 = 300;
const PROOF_DOMAIN: &[u8] = b"pvc-registration-v1\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRegistration {
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
    #[error("the registration is not signed by the host key it names")]
    BadProof,
    #[error("the registration's clock is {0} s away from the broker's (check NTP)")]
    Clock(u64),
}

/// A DNS label: a member's name is also its host name in the virtual zone.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

pub fn valid_virtual_address(a: Ipv4Addr) -> bool {
    is_virtual(a.octets()) && a != Ipv4Addr::new(240, 0, 0, 0) && a != Ipv4Addr::BROADCAST
}

fn valid_real_address(a: Ipv4Addr) -> bool {
    !(is_virtual(a.octets())
        || a.is_loopback()
        || a.is_multicast()
        || a.is_broadcast()
        || a.is_unspecified())
}

/// Checks a list of real addresses a member advertises.
pub fn validate_addresses(addresses: &[Ipv4Addr]) -> Result<(), InvalidRegistration> {
    if addresses.is_empty() {
        return Err(InvalidRegistration::NoAddress);
    }
    if addresses.len() > MAX_ADDRESSES {
        return Err(InvalidRegistration::TooManyAddresses(addresses.len()));
    }
    if let Some(a) = addresses.iter().find(|a| !valid_real_address(**a)) {
        return Err(InvalidRegistration::RealAddress(*a));
    }
    Ok(())
}

impl Registration {
    /// A registration signed with the host key, stamped now.
    pub fn new(
        cluster: ClusterId,
        host: &Ed25519KeyPair,
        addresses: Vec<Ipv4Addr>,
        software: String,
    ) -> Self {
        let mut r = Registration {
            cluster,
            host_key: PublicKey::of(host),
            addresses,
            software,
            timestamp: unix_now(),
            proof: Vec::new(),
        };
        r.proof = sign(host, PROOF_DOMAIN, &r.signed_part());
        r
    }

    fn signed_part(&self) -> Vec<u8> {
        postcard::to_stdvec(&(
            &self.cluster,
            &self.host_key,
            &self.addresses,
            &self.software,
            self.timestamp,
        ))
        .expect("registration encodes")
    }

    pub fn validate(&self, now: u64) -> Result<(), InvalidRegistration> {
        validate_addresses(&self.addresses)?;
        if self.software.len() > MAX_SOFTWARE {
            return Err(InvalidRegistration::Software);
        }
        if !self
            .host_key
            .verify(PROOF_DOMAIN, &self.signed_part(), &self.proof)
        {
            return Err(InvalidRegistration::BadProof);
        }
        let skew = now.abs_diff(self.timestamp);
        if skew > MAX_SKEW_SECS {
            return Err(InvalidRegistration::Clock(skew));
        }
        Ok(())
    }
}
