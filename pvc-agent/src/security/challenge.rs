//! The mutual challenge-response (paper §4.3), done with signatures over
//! fresh nonces: each side proves it holds the host key its master-signed
//! record names, over a transcript that binds both identities, both nonces,
//! both ephemeral X25519 keys and the path's real endpoints. An X25519
//! exchange inside it gives the two ends a key nobody else has (the broker
//! relays everything), used to authenticate the SYNs of their flows.
//!
//! Pure logic: the coordinator carries the messages and keeps the state.

use std::net::Ipv4Addr;

use pvc_proto::{
    ClusterId, PublicKey,
    handshake::{Confirm, Done, ExchangeId, Handshake, Init, Reply},
    records::sign,
};
use ring::{
    agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519},
    digest, hkdf, hmac,
    rand::{SecureRandom as _, SystemRandom},
};

use super::{keys::KeyPair, membership::Member};

const TRANSCRIPT_DOMAIN: &[u8] = b"pvc-handshake-v1\0";
const RESPONDER_DOMAIN: &[u8] = b"pvc-handshake-responder-v1\0";
const INITIATOR_DOMAIN: &[u8] = b"pvc-handshake-initiator-v1\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    #[error("the exchange is for cluster {0}, not ours")]
    WrongCluster(ClusterId),
    #[error("the exchange is addressed to {0}, not to this host")]
    NotForUs(Ipv4Addr),
    #[error("the key in the exchange is not the one the master admitted for {0}")]
    KeyMismatch(Ipv4Addr),
    #[error("{0} is not an address of this host")]
    NotOurAddress(Ipv4Addr),
    #[error("the peer's signature over the exchange does not verify")]
    BadSignature,
    #[error("the peer's confirmation does not verify")]
    BadMac,
    #[error("key agreement failed")]
    Crypto,
}

/// What the two ends share once both proved who they are.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    pub peer: Ipv4Addr,
    pub peer_real: Ipv4Addr,
    pub local_real: Ipv4Addr,
    /// Key of the MACs in the tags of their SYNs.
    pub tag_key: [u8; 16],
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Session({} at {} from {})",
            self.peer, self.peer_real, self.local_real
        )
    }
}

pub(crate) fn random<const N: usize>() -> Result<[u8; N], ChallengeError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| ChallengeError::Crypto)?;
    Ok(b)
}

fn ephemeral() -> Result<(EphemeralPrivateKey, [u8; 32]), ChallengeError> {
    let private = EphemeralPrivateKey::generate(&X25519, &SystemRandom::new())
        .map_err(|_| ChallengeError::Crypto)?;
    let public = private
        .compute_public_key()
        .map_err(|_| ChallengeError::Crypto)?;
    let mut p = [0u8; 32];
    p.copy_from_slice(public.as_ref());
    Ok((private, p))
}

fn transcript(
    init: &Init,
    responder_key: &PublicKey,
    nonce: &[u8; 32],
    ephemeral: &[u8; 32],
) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(TRANSCRIPT_DOMAIN);
    ctx.update(&postcard::to_stdvec(init).expect("Init encodes"));
    ctx.update(&responder_key.0);
    ctx.update(nonce);
    ctx.update(ephemeral);
    let mut t = [0u8; 32];
    t.copy_from_slice(ctx.finish().as_ref());
    t
}

struct Len<const N: usize>;

impl<const N: usize> hkdf::KeyType for Len<N> {
    fn len(&self) -> usize {
        N
    }
}

/// The keys the exchange yields: the SYN-tag key and the confirmation key.
fn derive(
    private: EphemeralPrivateKey,
    peer_ephemeral: &[u8; 32],
    transcript: &[u8; 32],
) -> Result<([u8; 16], [u8; 32]), ChallengeError> {
    let peer = UnparsedPublicKey::new(&X25519, peer_ephemeral);
    agreement::agree_ephemeral(private, &peer, |secret| {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, transcript).extract(secret);
        let mut tag = [0u8; 16];
        let mut done = [0u8; 32];
        prk.expand(&[b"pvc syn tag v1"], Len::<16>)
            .and_then(|o| o.fill(&mut tag))?;
        prk.expand(&[b"pvc done v1"], Len::<32>)
            .and_then(|o| o.fill(&mut done))?;
        Ok((tag, done))
    })
    .map_err(|_| ChallengeError::Crypto)?
    .map_err(|_: ring::error::Unspecified| ChallengeError::Crypto)
}

/// Messages the two agents of an authenticated pair exchange about their
/// flows (traversals) carry an HMAC with a key only they have: derived
/// from the pair's SYN-tag key, so that a path a restarted agent took over
/// from the kernel can use it too.
pub fn control_mac(tag_key: &[u8; 16], message: &[u8]) -> [u8; 32] {
    let tag = hmac::sign(&control_key(tag_key), message);
    let mut m = [0u8; 32];
    m.copy_from_slice(tag.as_ref());
    m
}

/// Checks a control MAC in constant time.
pub fn control_mac_valid(tag_key: &[u8; 16], message: &[u8], mac: &[u8; 32]) -> bool {
    hmac::verify(&control_key(tag_key), message, mac).is_ok()
}

fn control_key(tag_key: &[u8; 16]) -> hmac::Key {
    let key = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, tag_key),
        b"pvc control v1",
    );
    hmac::Key::new(hmac::HMAC_SHA256, key.as_ref())
}

/// Checks a Done's MAC in constant time (a comparison that stops at the
/// first differing byte would tell a forger how much of a guess was right).
fn done_mac_valid(key: &[u8; 32], transcript: &[u8; 32], mac: &[u8; 32]) -> bool {
    hmac::verify(&hmac::Key::new(hmac::HMAC_SHA256, key), transcript, mac).is_ok()
}

fn done_mac(key: &[u8; 32], transcript: &[u8; 32]) -> [u8; 32] {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), transcript);
    let mut m = [0u8; 32];
    m.copy_from_slice(tag.as_ref());
    m
}

/// This host, as the exchange needs it.
pub struct Me<'a> {
    pub key: &'a KeyPair,
    pub cluster: ClusterId,
    pub virtual_ip: Ipv4Addr,
}

/// The initiator, waiting for the responder's `Reply`.
pub struct Initiator {
    pub id: ExchangeId,
    init: Init,
    private: EphemeralPrivateKey,
    peer_key: PublicKey,
}

/// The initiator, confirmed, waiting for the responder's `Done`.
pub struct Confirmed {
    session: Session,
    done_key: [u8; 32],
    transcript: [u8; 32],
}

/// The responder, waiting for the initiator's `Confirm`.
pub struct Responder {
    pub id: ExchangeId,
    initiator_key: PublicKey,
    session: Session,
    done_key: [u8; 32],
    transcript: [u8; 32],
}

/// Starts an exchange with `peer`, over the path from `local_real` to `peer_real`.
pub fn initiate(
    me: &Me<'_>,
    peer: &Member,
    local_real: Ipv4Addr,
    peer_real: Ipv4Addr,
) -> Result<(Initiator, Handshake), ChallengeError> {
    let (private, ephemeral) = ephemeral()?;
    let init = Init {
        id: random()?,
        cluster: me.cluster,
        initiator: me.virtual_ip,
        responder: peer.virtual_ip,
        initiator_key: me.key.public,
        initiator_real: local_real,
        responder_real: peer_real,
        nonce: random()?,
        ephemeral,
    };
    let msg = Handshake::Init(init.clone());
    Ok((
        Initiator {
            id: init.id,
            init,
            private,
            peer_key: peer.key,
        },
        msg,
    ))
}

impl Initiator {
    pub fn peer(&self) -> Ipv4Addr {
        self.init.responder
    }

    /// Checks the responder's proof; answers with ours.
    pub fn on_reply(
        self,
        me: &Me<'_>,
        reply: &Reply,
    ) -> Result<(Confirmed, Handshake), ChallengeError> {
        if reply.responder_key != self.peer_key {
            return Err(ChallengeError::KeyMismatch(self.init.responder));
        }
        let t = transcript(
            &self.init,
            &reply.responder_key,
            &reply.nonce,
            &reply.ephemeral,
        );
        if !self.peer_key.verify(RESPONDER_DOMAIN, &t, &reply.signature) {
            return Err(ChallengeError::BadSignature);
        }
        let (tag_key, done_key) = derive(self.private, &reply.ephemeral, &t)?;
        let confirm = Handshake::Confirm(Confirm {
            id: self.id,
            signature: sign(&me.key.pair, INITIATOR_DOMAIN, &t),
        });
        let session = Session {
            peer: self.init.responder,
            peer_real: self.init.responder_real,
            local_real: self.init.initiator_real,
            tag_key,
        };
        Ok((
            Confirmed {
                session,
                done_key,
                transcript: t,
            },
            confirm,
        ))
    }
}

impl Confirmed {
    /// The responder installed its side: ours can go in.
    pub fn on_done(self, done: &Done) -> Result<Session, ChallengeError> {
        if !done_mac_valid(&self.done_key, &self.transcript, &done.mac) {
            return Err(ChallengeError::BadMac);
        }
        Ok(self.session)
    }
}

/// Answers an `Init` from `peer` (the verified member it claims to be).
/// `ours`: this host's real addresses, one of which the path must use.
pub fn respond(
    me: &Me<'_>,
    init: &Init,
    peer: &Member,
    ours: &[Ipv4Addr],
) -> Result<(Responder, Handshake), ChallengeError> {
    if init.cluster != me.cluster {
        return Err(ChallengeError::WrongCluster(init.cluster));
    }
    if init.responder != me.virtual_ip {
        return Err(ChallengeError::NotForUs(init.responder));
    }
    if init.initiator != peer.virtual_ip || init.initiator_key != peer.key {
        return Err(ChallengeError::KeyMismatch(init.initiator));
    }
    if !ours.contains(&init.responder_real) {
        return Err(ChallengeError::NotOurAddress(init.responder_real));
    }
    let (private, ephemeral) = ephemeral()?;
    let nonce = random()?;
    let t = transcript(init, &me.key.public, &nonce, &ephemeral);
    let (tag_key, done_key) = derive(private, &init.ephemeral, &t)?;
    let reply = Handshake::Reply(Reply {
        id: init.id,
        responder_key: me.key.public,
        nonce,
        ephemeral,
        signature: sign(&me.key.pair, RESPONDER_DOMAIN, &t),
    });
    let session = Session {
        peer: init.initiator,
        peer_real: init.initiator_real,
        local_real: init.responder_real,
        tag_key,
    };
    Ok((
        Responder {
            id: init.id,
            initiator_key: init.initiator_key,
            session,
            done_key,
            transcript: t,
        },
        reply,
    ))
}

impl Responder {
    pub fn peer(&self) -> Ipv4Addr {
        self.session.peer
    }

    /// Checks the initiator's proof. The caller installs the session, then
    /// sends the returned `Done`.
    pub fn on_confirm(self, confirm: &Confirm) -> Result<(Session, Handshake), ChallengeError> {
        if !self
            .initiator_key
            .verify(INITIATOR_DOMAIN, &self.transcript, &confirm.signature)
        {
            return Err(ChallengeError::BadSignature);
        }
        let done = Handshake::Done(Done {
            id: self.id,
            mac: done_mac(&self.done_key, &self.transcript),
        });
        Ok((self.session, done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Host {
        key: KeyPair,
        member: Member,
    }

    fn host(last: u8) -> Host {
        let dir = std::env::temp_dir().join(format!(
            "pvc-challenge-{}-{last}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let key = KeyPair::create(&dir.join("k")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let member = Member {
            name: format!("h{last}"),
            virtual_ip: Ipv4Addr::new(240, 0, 0, last),
            key: key.public,
            groups: vec![],
            serial: last as u64,
            not_after: u64::MAX,
            addresses: vec![Ipv4Addr::new(198, 18, 0, last)],
        };
        Host { key, member }
    }

    const CLUSTER: ClusterId = ClusterId([7; 16]);

    fn me(h: &Host) -> Me<'_> {
        Me {
            key: &h.key,
            cluster: CLUSTER,
            virtual_ip: h.member.virtual_ip,
        }
    }

    fn real(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, last)
    }

    fn as_init(h: &Handshake) -> &Init {
        match h {
            Handshake::Init(i) => i,
            other => panic!("{other:?}"),
        }
    }

    fn as_reply(h: &Handshake) -> &Reply {
        match h {
            Handshake::Reply(r) => r,
            other => panic!("{other:?}"),
        }
    }

    fn as_confirm(h: &Handshake) -> &Confirm {
        match h {
            Handshake::Confirm(c) => c,
            other => panic!("{other:?}"),
        }
    }

    fn as_done(h: &Handshake) -> &Done {
        match h {
            Handshake::Done(d) => d,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn both_ends_agree_on_the_path_and_the_key() {
        let (a, b) = (host(1), host(2));
        let (ia, init) = initiate(&me(&a), &b.member, real(1), real(2)).unwrap();
        let (rb, reply) = respond(&me(&b), as_init(&init), &a.member, &[real(2)]).unwrap();
        let (ca, confirm) = ia.on_reply(&me(&a), as_reply(&reply)).unwrap();
        let (sb, done) = rb.on_confirm(as_confirm(&confirm)).unwrap();
        let sa = ca.on_done(as_done(&done)).unwrap();
        assert_eq!(
            (sa.peer, sa.peer_real, sa.local_real),
            (b.member.virtual_ip, real(2), real(1))
        );
        assert_eq!(
            (sb.peer, sb.peer_real, sb.local_real),
            (a.member.virtual_ip, real(1), real(2))
        );
        assert_eq!(sa.tag_key, sb.tag_key);
        // Fresh nonces and ephemeral keys: a second exchange has another key.
        let (ia, init) = initiate(&me(&a), &b.member, real(1), real(2)).unwrap();
        let (_, reply) = respond(&me(&b), as_init(&init), &a.member, &[real(2)]).unwrap();
        let (ca, _) = ia.on_reply(&me(&a), as_reply(&reply)).unwrap();
        assert_ne!(ca.session.tag_key, sa.tag_key);
    }

    #[test]
    fn an_impostor_without_the_admitted_key_fails_both_ways() {
        let (a, b, mallory) = (host(1), host(2), host(9));
        // Mallory claims to be a, with its own key: b sees the key is not a's.
        let mut claimed = mallory.member.clone();
        claimed.virtual_ip = a.member.virtual_ip;
        let (_, init) = initiate(
            &Me {
                key: &mallory.key,
                cluster: CLUSTER,
                virtual_ip: a.member.virtual_ip,
            },
            &b.member,
            real(9),
            real(2),
        )
        .unwrap();
        assert_eq!(
            respond(&me(&b), as_init(&init), &a.member, &[real(2)]).err(),
            Some(ChallengeError::KeyMismatch(a.member.virtual_ip))
        );

        // Mallory answers an Init meant for b: a rejects its key, then its signature.
        let (ia, init) = initiate(&me(&a), &b.member, real(1), real(2)).unwrap();
        let as_b = Me {
            key: &mallory.key,
            cluster: CLUSTER,
            virtual_ip: b.member.virtual_ip,
        };
        let (_, reply) = respond(&as_b, as_init(&init), &a.member, &[real(2)]).unwrap();
        assert_eq!(
            ia.on_reply(&me(&a), as_reply(&reply)).err(),
            Some(ChallengeError::KeyMismatch(b.member.virtual_ip))
        );
        let (ia, _) = initiate(&me(&a), &b.member, real(1), real(2)).unwrap();
        let mut forged = as_reply(&reply).clone();
        forged.responder_key = b.key.public;
        assert_eq!(
            ia.on_reply(&me(&a), &forged).err(),
            Some(ChallengeError::BadSignature)
        );
    }

    #[test]
    fn recorded_messages_do_not_replay_into_another_exchange() {
        let (a, b) = (host(1), host(2));
        // A complete, recorded exchange.
        let (ia, init1) = initiate(&me(&a), &b.member, real(1), real(2)).unwrap();
        let (rb, reply1) = respond(&me(&b), as_init(&init1), &a.member, &[real(2)]).unwrap();
        let (_, confirm1) = ia.on_reply(&me(&a), as_reply(&reply1)).unwrap();
        rb.on_confirm(as_confirm(&confirm1)).unwrap();

        // The old Reply to a new Init of a: its nonce is not in the transcript.
        let (ia2, init2) = initiate(&me(&a), &b.member, real(1), real(2)).unwrap();
        let mut old = as_reply(&reply1).clone();
        old.id = ia2.id;
        assert_eq!(
            ia2.on_reply(&me(&a), &old).err(),
            Some(ChallengeError::BadSignature)
        );

        // The old Init replayed to b gets a fresh Reply; the old Confirm
        // does not answer it.
        let (rb2, _) = respond(&me(&b), as_init(&init1), &a.member, &[real(2)]).unwrap();
        assert_eq!(
            rb2.on_confirm(as_confirm(&confirm1)).err(),
            Some(ChallengeError::BadSignature)
        );

        // The same Init for another path (the broker rewrote an address) is
        // another transcript.
        let mut moved = as_init(&init2).clone();
        moved.initiator_real = real(66);
        let (_, reply3) = respond(&me(&b), &moved, &a.member, &[real(2)]).unwrap();
        let (ia3, _) = initiate(&me(&a), &b.member, real(1), real(2)).unwrap();
        let mut r = as_reply(&reply3).clone();
        r.id = ia3.id;
        assert_eq!(
            ia3.on_reply(&me(&a), &r).err(),
            Some(ChallengeError::BadSignature)
        );
    }

    #[test]
    fn the_responder_checks_cluster_addressee_and_its_own_address() {
        let (a, b) = (host(1), host(2));
        let (_, init) = initiate(&me(&a), &b.member, real(1), real(2)).unwrap();
        let mut i = as_init(&init).clone();
        i.cluster = ClusterId([1; 16]);
        assert!(matches!(
            respond(&me(&b), &i, &a.member, &[real(2)]),
            Err(ChallengeError::WrongCluster(_))
        ));
        let c = host(3);
        assert!(matches!(
            respond(&me(&c), as_init(&init), &a.member, &[real(3)]),
            Err(ChallengeError::NotForUs(_))
        ));
        assert!(matches!(
            respond(&me(&b), as_init(&init), &a.member, &[real(7)]),
            Err(ChallengeError::NotOurAddress(_))
        ));
    }

    #[test]
    fn a_forged_done_is_refused() {
        let (a, b) = (host(1), host(2));
        let (ia, init) = initiate(&me(&a), &b.member, real(1), real(2)).unwrap();
        let (_, reply) = respond(&me(&b), as_init(&init), &a.member, &[real(2)]).unwrap();
        let (ca, _) = ia.on_reply(&me(&a), as_reply(&reply)).unwrap();
        assert_eq!(
            ca.on_done(&Done {
                id: [0; 16],
                mac: [0; 32]
            })
            .err(),
            Some(ChallengeError::BadMac)
        );
    }
}
