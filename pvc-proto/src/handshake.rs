//! The mutual challenge-response between two agents (paper §4.3's M / L
//! exchange), carried by brokers in `Relay` payloads. The logic lives in the
//! agent (`security::challenge`); these are the messages.
//!
//! ```text
//! initiator A                                   responder B
//!   Init { nonce_a, eph_a, A, B, key_a, paths } ->
//!                <- Reply { nonce_b, eph_b, key_b, sig_b(transcript) }
//!   Confirm { sig_a(transcript) }               ->
//!                <- Done { mac(transcript) }     (B installed its path)
//! ```
//!
//! The transcript covers both identities, both fresh nonces, both
//! ephemeral keys and the real endpoints of the path, so a recorded
//! exchange proves nothing about another peer, another path or another time.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{ClusterId, PublicKey};

/// Names one exchange; chosen at random by the initiator.
pub type ExchangeId = [u8; 16];

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Handshake {
    Init(Init),
    Reply(Reply),
    Confirm(Confirm),
    Done(Done),
    /// Not authenticated: a hint that the other side gave up, with why.
    Refused {
        id: ExchangeId,
        reason: String,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Init {
    pub id: ExchangeId,
    pub cluster: ClusterId,
    pub initiator: Ipv4Addr,
    pub responder: Ipv4Addr,
    pub initiator_key: PublicKey,
    /// The real addresses the path will use: the initiator's, and the
    /// responder's as the initiator will send to it.
    pub initiator_real: Ipv4Addr,
    pub responder_real: Ipv4Addr,
    pub nonce: [u8; 32],
    /// X25519 public key for this exchange only.
    pub ephemeral: [u8; 32],
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub id: ExchangeId,
    pub responder_key: PublicKey,
    pub nonce: [u8; 32],
    pub ephemeral: [u8; 32],
    /// The responder's host-key signature over the transcript.
    pub signature: Vec<u8>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Confirm {
    pub id: ExchangeId,
    /// The initiator's host-key signature over the transcript.
    pub signature: Vec<u8>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Done {
    pub id: ExchangeId,
    /// HMAC-SHA256 over the transcript with a key only the two ends derive.
    pub mac: [u8; 32],
}

impl Handshake {
    pub fn id(&self) -> ExchangeId {
        match self {
            Self::Init(m) => m.id,
            Self::Reply(m) => m.id,
            Self::Confirm(m) => m.id,
            Self::Done(m) => m.id,
            Self::Refused { id, .. } => *id,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("handshake messages encode")
    }

    /// Decodes a relayed payload; trailing bytes are an error.
    pub fn decode(payload: &[u8]) -> Option<Self> {
        match postcard::take_from_bytes(payload) {
            Ok((h, [])) => Some(h),
            _ => None,
        }
    }
}
