//! What the cluster's master signs (paper §4.3): membership records, the
//! revocation list and the global policy. Brokers store and relay them;
//! members check every signature themselves against the master public key
//! they were configured with.
//!
//! A signature covers a domain string and the exact bytes of the encoded
//! body, so nothing depends on re-encoding being canonical, and a signature
//! made for one kind of document never verifies as another.

use std::{fmt, marker::PhantomData, net::Ipv4Addr, str::FromStr};

use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use ring::{
    digest,
    signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::registration::{valid_name, valid_virtual_address};

/// An Ed25519 public key.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    pub fn of(pair: &Ed25519KeyPair) -> Self {
        let mut k = [0u8; 32];
        k.copy_from_slice(pair.public_key().as_ref());
        Self(k)
    }

    /// Checks `signature` over `domain || message`.
    pub fn verify(&self, domain: &[u8], message: &[u8], signature: &[u8]) -> bool {
        let mut signed = Vec::with_capacity(domain.len() + message.len());
        signed.extend_from_slice(domain);
        signed.extend_from_slice(message);
        UnparsedPublicKey::new(&ED25519, &self.0)
            .verify(&signed, signature)
            .is_ok()
    }
}

/// Signs `domain || message`.
pub fn sign(key: &Ed25519KeyPair, domain: &[u8], message: &[u8]) -> Vec<u8> {
    let mut signed = Vec::with_capacity(domain.len() + message.len());
    signed.extend_from_slice(domain);
    signed.extend_from_slice(message);
    key.sign(&signed).as_ref().to_vec()
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bytes = B64
            .decode(s.trim())
            .map_err(|e| format!("not base64 ({e}): {s:?}"))?;
        let k: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
            format!("an Ed25519 public key has 32 bytes, this one {}", b.len())
        })?;
        let key = Self(k);
        if !key.is_valid_point() {
            return Err(format!(
                "{s:?} is not a usable Ed25519 public key (not a point of the curve, or a weak key \
                 of small order such as all zeros): copy the key `pvc key` prints on the host"
            ));
        }
        Ok(key)
    }
}

impl PublicKey {
    /// Whether the key is a point of the curve of large prime order: an
    /// all-zero or small-order key would be "valid" for forged signatures
    /// under lax verifiers and names no host.
    pub fn is_valid_point(&self) -> bool {
        curve25519_dalek::edwards::CompressedEdwardsY(self.0)
            .decompress()
            .is_some_and(|p| !p.is_small_order() && p.is_torsion_free())
    }
}

/// A cluster is named by its master key: the first 16 bytes of
/// SHA-256("pvc-cluster-id-v1" || master public key). Anyone can check that
/// a document for a cluster was signed by that cluster's master.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ClusterId(pub [u8; 16]);

impl ClusterId {
    pub fn of(master: &PublicKey) -> Self {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"pvc-cluster-id-v1");
        ctx.update(&master.0);
        let mut id = [0u8; 16];
        id.copy_from_slice(&ctx.finish().as_ref()[..16]);
        Self(id)
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterId({self})")
    }
}

/// The master's statement that a host key is a member of the cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MembershipRecord {
    pub cluster: ClusterId,
    /// Unique per record; revocations name serials.
    pub serial: u64,
    pub name: String,
    pub virtual_ip: Ipv4Addr,
    pub host_key: PublicKey,
    /// Groups the global and local policies can refer to.
    pub groups: Vec<String>,
    /// Validity, in seconds since the Unix epoch.
    pub not_before: u64,
    pub not_after: u64,
}

/// The master's list of withdrawn records. A higher version replaces a lower one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Revocations {
    pub cluster: ClusterId,
    pub version: u64,
    pub issued_at: u64,
    pub serials: Vec<u64>,
}

/// The cluster's global policy (paper §4.3): which flows the cluster allows.
/// With no rule at all, everything is allowed.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct GlobalPolicy {
    pub cluster: ClusterId,
    pub version: u64,
    pub issued_at: u64,
    pub rules: Vec<PolicyRule>,
}

/// The master's documents that replace older ones of their kind: a
/// revocation list or a global policy by its version, a host's record by
/// its serial.
pub trait Versioned {
    fn version(&self) -> u64;
}

impl Versioned for Revocations {
    fn version(&self) -> u64 {
        self.version
    }
}

impl Versioned for GlobalPolicy {
    fn version(&self) -> u64 {
        self.version
    }
}

impl Versioned for MembershipRecord {
    fn version(&self) -> u64 {
        self.serial
    }
}

/// Whether `candidate` replaces `current`: only a newer document does, so a
/// broker replaying an old one rolls nothing back.
pub fn supersedes<T: Versioned>(candidate: &T, current: Option<&T>) -> bool {
    current.is_none_or(|c| candidate.version() > c.version())
}

/// Members matching `from` may open flows to members matching `to`, on `ports`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PolicyRule {
    pub from: Vec<Selector>,
    pub to: Vec<Selector>,
    pub ports: Vec<PortRange>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    Any,
    Group(String),
    Host(String),
}

impl Selector {
    pub fn matches(&self, name: &str, groups: &[String]) -> bool {
        match self {
            Self::Any => true,
            Self::Group(g) => groups.iter().any(|x| x == g),
            Self::Host(h) => h == name,
        }
    }
}

impl FromStr for Selector {
    type Err = String;

    /// "*", "group:NAME" or a member name.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (sel, name) = if s == "*" {
            return Ok(Self::Any);
        } else if let Some(g) = s.strip_prefix("group:") {
            (Self::Group(g.to_string()), g)
        } else {
            (Self::Host(s.to_string()), s)
        };
        if !valid_name(name) {
            return Err(format!(
                "{s:?}: expected \"*\", \"group:NAME\" or a member name"
            ));
        }
        Ok(sel)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Group(g) => write!(f, "group:{g}"),
            Self::Host(h) => f.write_str(h),
        }
    }
}

/// An inclusive range of TCP ports.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange {
        first: 0,
        last: u16::MAX,
    };

    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

impl FromStr for PortRange {
    type Err = String;

    /// "22", "8000-8100" or "*".
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "*" {
            return Ok(Self::ALL);
        }
        let parse = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("{s:?}: not a port or port range"))
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(s)?, parse(s)?),
        };
        if first > last {
            return Err(format!("{s:?}: the range is empty"));
        }
        Ok(Self { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.first, self.last) {
            (0, u16::MAX) => f.write_str("*"),
            (a, b) if a == b => write!(f, "{a}"),
            (a, b) => write!(f, "{a}-{b}"),
        }
    }
}

/// A document the master signs.
pub trait Signable: Serialize + DeserializeOwned {
    /// Domain separation: a signature for one kind never verifies as another.
    const DOMAIN: &'static [u8];
    fn cluster(&self) -> ClusterId;
}

impl Signable for MembershipRecord {
    const DOMAIN: &'static [u8] = b"pvc-membership-record-v1\0";
    fn cluster(&self) -> ClusterId {
        self.cluster
    }
}

impl Signable for Revocations {
    const DOMAIN: &'static [u8] = b"pvc-revocations-v1\0";
    fn cluster(&self) -> ClusterId {
        self.cluster
    }
}

impl Signable for GlobalPolicy {
    const DOMAIN: &'static [u8] = b"pvc-global-policy-v1\0";
    fn cluster(&self) -> ClusterId {
        self.cluster
    }
}

/// A signed document: the encoded body and the master's signature over it.
#[derive(Serialize, Deserialize)]
pub struct Signed<T> {
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
    #[serde(skip)]
    _kind: PhantomData<T>,
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Self {
            body: self.body.clone(),
            signature: self.signature.clone(),
            _kind: PhantomData,
        }
    }
}

impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.body == other.body && self.signature == other.signature
    }
}

impl<T> Eq for Signed<T> {}

impl<T> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signed({} bytes)", self.body.len())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("the master's signature does not verify (forged or altered)")]
    BadSignature,
    #[error("the signed document does not decode")]
    Malformed,
    #[error("the document is for cluster {found}, not {expected}")]
    WrongCluster {
        expected: ClusterId,
        found: ClusterId,
    },
    #[error("record {serial} is not valid yet (from {not_before})")]
    NotYetValid { serial: u64, not_before: u64 },
    #[error("record {serial} expired at {not_after}")]
    Expired { serial: u64, not_after: u64 },
    #[error("record {serial} was revoked")]
    Revoked { serial: u64 },
    #[error("record {serial} is invalid: {what}")]
    Invalid { serial: u64, what: String },
}

impl<T: Signable> Signed<T> {
    pub fn sign(value: &T, master: &Ed25519KeyPair) -> Self {
        let body = postcard::to_stdvec(value).expect("documents encode");
        let signature = sign(master, T::DOMAIN, &body);
        Self {
            body,
            signature,
            _kind: PhantomData,
        }
    }

    /// The document, if `master` signed it for `master`'s cluster.
    pub fn verify(&self, master: &PublicKey) -> Result<T, RecordError> {
        if !master.verify(T::DOMAIN, &self.body, &self.signature) {
            return Err(RecordError::BadSignature);
        }
        let value: T = postcard::from_bytes(&self.body).map_err(|_| RecordError::Malformed)?;
        let expected = ClusterId::of(master);
        if value.cluster() != expected {
            return Err(RecordError::WrongCluster {
                expected,
                found: value.cluster(),
            });
        }
        Ok(value)
    }
}

pub type SignedRecord = Signed<MembershipRecord>;
pub type SignedRevocations = Signed<Revocations>;
pub type SignedPolicy = Signed<GlobalPolicy>;

impl MembershipRecord {
    /// Whether the record admits its host at `now`, given the revocations.
    pub fn check(&self, now: u64, revoked: &[u64]) -> Result<(), RecordError> {
        let serial = self.serial;
        if !valid_name(&self.name) {
            return Err(RecordError::Invalid {
                serial,
                what: format!("name {:?}", self.name),
            });
        }
        if !valid_virtual_address(self.virtual_ip) {
            return Err(RecordError::Invalid {
                serial,
                what: format!("virtual address {}", self.virtual_ip),
            });
        }
        if now < self.not_before {
            return Err(RecordError::NotYetValid {
                serial,
                not_before: self.not_before,
            });
        }
        if now > self.not_after {
            return Err(RecordError::Expired {
                serial,
                not_after: self.not_after,
            });
        }
        if revoked.contains(&serial) {
            return Err(RecordError::Revoked { serial });
        }
        Ok(())
    }
}

impl GlobalPolicy {
    /// Ports the policy allows from `from` to `to` (each: name, groups).
    /// `None`: no rule at all, everything is allowed.
    pub fn allowed(
        &self,
        from: (&str, &[String]),
        to: (&str, &[String]),
    ) -> Option<Vec<PortRange>> {
        if self.rules.is_empty() {
            return None;
        }
        Some(
            self.rules
                .iter()
                .filter(|r| r.from.iter().any(|s| s.matches(from.0, from.1)))
                .filter(|r| r.to.iter().any(|s| s.matches(to.0, to.1)))
                .flat_map(|r| r.ports.iter().copied())
                .collect(),
        )
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use ring::rand::SystemRandom;

    use super::*;

    pub(crate) fn keypair() -> Ed25519KeyPair {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    }

    fn record(cluster: ClusterId, host: &Ed25519KeyPair) -> MembershipRecord {
        MembershipRecord {
            cluster,
            serial: 7,
            name: "alpha".into(),
            virtual_ip: Ipv4Addr::new(240, 0, 0, 1),
            host_key: PublicKey::of(host),
            groups: vec!["compute".into()],
            not_before: 1000,
            not_after: 2000,
        }
    }

    #[test]
    fn records_verify_only_with_their_masters_key_and_cluster() {
        let master = keypair();
        let mk = PublicKey::of(&master);
        let r = record(ClusterId::of(&mk), &keypair());
        let signed = SignedRecord::sign(&r, &master);
        assert_eq!(signed.verify(&mk), Ok(r.clone()));

        let other = PublicKey::of(&keypair());
        assert_eq!(signed.verify(&other), Err(RecordError::BadSignature));

        let mut tampered = signed.clone();
        let last = tampered.body.len() - 1;
        tampered.body[last] ^= 1;
        assert_eq!(tampered.verify(&mk), Err(RecordError::BadSignature));

        // Signed by the right master, but for another cluster.
        let foreign = SignedRecord::sign(&record(ClusterId([9; 16]), &keypair()), &master);
        assert!(matches!(
            foreign.verify(&mk),
            Err(RecordError::WrongCluster { .. })
        ));

        // A record signature is not a revocation list signature.
        let as_revocations: SignedRevocations = Signed {
            body: signed.body.clone(),
            signature: signed.signature.clone(),
            _kind: PhantomData,
        };
        assert_eq!(as_revocations.verify(&mk), Err(RecordError::BadSignature));
    }

    #[test]
    fn validity_and_revocation() {
        let r = record(ClusterId([1; 16]), &keypair());
        assert!(r.check(1500, &[]).is_ok());
        assert!(matches!(
            r.check(999, &[]),
            Err(RecordError::NotYetValid { .. })
        ));
        assert!(matches!(
            r.check(2001, &[]),
            Err(RecordError::Expired { .. })
        ));
        assert_eq!(
            r.check(1500, &[3, 7]),
            Err(RecordError::Revoked { serial: 7 })
        );
    }

    #[test]
    fn keys_and_ids_print_and_parse() {
        let k = PublicKey::of(&keypair());
        assert_eq!(k.to_string().parse::<PublicKey>(), Ok(k));
        assert!("AAAA".parse::<PublicKey>().is_err());
        // 32 bytes, but not a key any host holds: all zeros (a point of
        // order 4), and a y with no point on the curve.
        let zeros = B64.encode([0u8; 32]);
        let err = zeros.parse::<PublicKey>().unwrap_err();
        assert!(err.contains("not a usable Ed25519 public key"), "{err}");
        let mut off_curve = [0u8; 32];
        off_curve[0] = 2;
        assert!(!PublicKey(off_curve).is_valid_point());
        assert!(B64.encode(off_curve).parse::<PublicKey>().is_err());
        assert_eq!(ClusterId([0xab; 16]).to_string(), "ab".repeat(16));
        assert_ne!(ClusterId::of(&k), ClusterId::of(&PublicKey::of(&keypair())));
    }

    #[test]
    fn selectors_and_ports_parse() {
        assert_eq!("*".parse::<Selector>(), Ok(Selector::Any));
        assert_eq!(
            "group:gpu".parse::<Selector>(),
            Ok(Selector::Group("gpu".into()))
        );
        assert_eq!(
            "node-1".parse::<Selector>(),
            Ok(Selector::Host("node-1".into()))
        );
        assert!("group:".parse::<Selector>().is_err());
        assert!("Bad Name".parse::<Selector>().is_err());
        assert_eq!(
            "22".parse::<PortRange>(),
            Ok(PortRange {
                first: 22,
                last: 22
            })
        );
        assert_eq!(
            "8000-8100".parse::<PortRange>(),
            Ok(PortRange {
                first: 8000,
                last: 8100
            })
        );
        assert_eq!("*".parse::<PortRange>(), Ok(PortRange::ALL));
        assert!("90-80".parse::<PortRange>().is_err());
        assert!("ssh".parse::<PortRange>().is_err());
    }

    #[test]
    fn global_policy_lists_allowed_ports() {
        let p = GlobalPolicy {
            rules: vec![
                PolicyRule {
                    from: vec![Selector::Any],
                    to: vec![Selector::Group("web".into())],
                    ports: vec!["443".parse().unwrap()],
                },
                PolicyRule {
                    from: vec![Selector::Host("admin".into())],
                    to: vec![Selector::Any],
                    ports: vec!["22".parse().unwrap()],
                },
            ],
            ..Default::default()
        };
        let web = vec!["web".to_string()];
        assert_eq!(
            p.allowed(("x", &[]), ("w", &web)),
            Some(vec![PortRange {
                first: 443,
                last: 443
            }])
        );
        assert_eq!(
            p.allowed(("admin", &[]), ("db", &[])),
            Some(vec![PortRange {
                first: 22,
                last: 22
            }])
        );
        assert_eq!(p.allowed(("x", &[]), ("db", &[])), Some(vec![]));
        assert_eq!(
            GlobalPolicy::default().allowed(("x", &[]), ("y", &[])),
            None
        );
    }
}
