//! What this agent believes about the cluster: only what the master signed,
//! checked here against the master key from the configuration. A broker
//! relays records; it cannot make this agent accept one the master did not
//! sign, revive a revoked one, or roll a list back to an older version.

use std::net::Ipv4Addr;

use pvc_proto::{
    ClusterId, GlobalPolicy, MemberInfo, MembershipRecord, PublicKey, RecordError, Revocations,
    SignedPolicy, SignedRecord, SignedRevocations, supersedes, validate_addresses,
};

/// A member whose record this agent verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub virtual_ip: Ipv4Addr,
    pub key: PublicKey,
    pub groups: Vec<String>,
    pub serial: u64,
    pub not_after: u64,
    /// Real addresses it registered with: a hint from the broker; the
    /// authenticated exchange decides the path.
    pub addresses: Vec<Ipv4Addr>,
}

impl Member {
    pub fn from_record(r: MembershipRecord, addresses: Vec<Ipv4Addr>) -> Self {
        Self {
            name: r.name,
            virtual_ip: r.virtual_ip,
            key: r.host_key,
            groups: r.groups,
            serial: r.serial,
            not_after: r.not_after,
            addresses,
        }
    }
}

pub struct Trust {
    pub master: PublicKey,
    pub cluster: ClusterId,
    /// The newest verified list (version 0: none yet).
    pub revocations: Revocations,
    /// The newest verified global policy (version 0: none yet, all allowed).
    pub policy: GlobalPolicy,
}

impl Trust {
    pub fn new(master: PublicKey) -> Self {
        let cluster = ClusterId::of(&master);
        Self {
            master,
            cluster,
            revocations: Revocations {
                cluster,
                ..Default::default()
            },
            policy: GlobalPolicy {
                cluster,
                ..Default::default()
            },
        }
    }

    /// A record, if the master signed it for this cluster and it admits its
    /// host at `now`.
    pub fn record(&self, signed: &SignedRecord, now: u64) -> Result<MembershipRecord, RecordError> {
        let r = signed.verify(&self.master)?;
        r.check(now, &self.revocations.serials)?;
        Ok(r)
    }

    pub fn member(&self, info: &MemberInfo, now: u64) -> Result<Member, RecordError> {
        let r = self.record(&info.record, now)?;
        let serial = r.serial;
        validate_addresses(&info.addresses).map_err(|e| RecordError::Invalid {
            serial,
            what: e.to_string(),
        })?;
        Ok(Member::from_record(r, info.addresses.clone()))
    }

    pub fn is_revoked(&self, serial: u64) -> bool {
        self.revocations.serials.contains(&serial)
    }

    /// Takes a newer revocation list. Ok(true) if it changed anything.
    pub fn update_revocations(&mut self, signed: &SignedRevocations) -> Result<bool, RecordError> {
        let r = signed.verify(&self.master)?;
        if !supersedes(&r, Some(&self.revocations)) {
            return Ok(false);
        }
        self.revocations = r;
        Ok(true)
    }

    /// Takes a newer global policy. Ok(true) if it changed anything.
    pub fn update_policy(&mut self, signed: &SignedPolicy) -> Result<bool, RecordError> {
        let p = signed.verify(&self.master)?;
        if !supersedes(&p, Some(&self.policy)) {
            return Ok(false);
        }
        self.policy = p;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use pvc_proto::{Signed, unix_now};
    use ring::{rand::SystemRandom, signature::Ed25519KeyPair};

    use super::*;

    fn keypair() -> Ed25519KeyPair {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    }

    #[test]
    fn only_the_masters_newer_lists_are_taken() {
        let master = keypair();
        let mut t = Trust::new(PublicKey::of(&master));
        let cluster = t.cluster;
        let rev = |v: u64, serials: Vec<u64>| Revocations {
            cluster,
            version: v,
            issued_at: 0,
            serials,
        };
        assert_eq!(
            t.update_revocations(&Signed::sign(&rev(2, vec![5]), &master)),
            Ok(true)
        );
        assert!(t.is_revoked(5));
        // An older list (a broker replaying it) changes nothing.
        assert_eq!(
            t.update_revocations(&Signed::sign(&rev(1, vec![]), &master)),
            Ok(false)
        );
        assert!(t.is_revoked(5));
        // A list from another master is refused.
        let forged = Signed::sign(&rev(3, vec![]), &keypair());
        assert_eq!(
            t.update_revocations(&forged),
            Err(RecordError::BadSignature)
        );
        assert!(t.is_revoked(5));
    }

    #[test]
    fn members_need_a_valid_record_and_addresses() {
        let master = keypair();
        let t = Trust::new(PublicKey::of(&master));
        let host = keypair();
        let record = MembershipRecord {
            cluster: t.cluster,
            serial: 1,
            name: "b".into(),
            virtual_ip: Ipv4Addr::new(240, 0, 0, 2),
            host_key: PublicKey::of(&host),
            groups: vec![],
            not_before: 0,
            not_after: unix_now() + 60,
        };
        let info = MemberInfo {
            record: Signed::sign(&record, &master),
            addresses: vec![Ipv4Addr::new(198, 18, 0, 2)],
            observed: None,
            site: Default::default(),
        };
        let m = t.member(&info, unix_now()).unwrap();
        assert_eq!((m.name.as_str(), m.key), ("b", PublicKey::of(&host)));
        let bad = MemberInfo {
            addresses: vec![Ipv4Addr::new(240, 0, 0, 9)],
            ..info.clone()
        };
        assert!(matches!(
            t.member(&bad, unix_now()),
            Err(RecordError::Invalid { .. })
        ));
        assert!(matches!(
            t.member(&info, unix_now() + 120),
            Err(RecordError::Expired { .. })
        ));
    }
}
