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

use std::net::{Ipv4Addr, SocketAddrV4};

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
    /// A traversal of one flow, from the client's agent to the server's
    /// (authenticated with the pair's control key, see `Traverse`).
    Traverse(Traverse),
    /// The server's agent punched its NAT for the flow `id`.
    Punched(Punched),
    /// A flow through the broker's relay (`RelayFlow`).
    RelayFlow(RelayFlow),
}

/// One flow's traversal (`Technique` Ttcp, Punch or Reversal): the client's
/// held SYN, as its stack sent it (virtual addresses), for the server's
/// agent to inject into its own stack, and the client's public endpoint
/// the SYN will come from. `mac`: HMAC-SHA256 with the pair's control key
/// (derived from the exchange) over everything else, so that a broker can
/// neither forge nor alter a request to inject a SYN.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Traverse {
    pub id: u64,
    pub technique: u8,
    pub syn: Vec<u8>,
    pub client: SocketAddrV4,
    pub mac: [u8; 32],
}

/// The server's NAT or firewall is open for flow `id`: the client's SYN may
/// go to `server`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Punched {
    pub id: u64,
    pub server: SocketAddrV4,
    pub mac: [u8; 32],
}

/// A flow carried by a broker's relay: the client's agent joined the
/// broker's relay with `token` and asks the server's agent to join too and
/// connect, locally, from the client's virtual address and `client_port`
/// to `port`. The MAC (the pair's control key) covers both virtual
/// addresses, so a broker can neither forge a request nor turn one back to
/// its sender.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RelayFlow {
    pub token: [u8; 16],
    pub client: Ipv4Addr,
    pub server: Ipv4Addr,
    pub client_port: u16,
    pub port: u16,
    pub mac: [u8; 32],
}

impl RelayFlow {
    /// The bytes the MAC covers.
    pub fn signed_part(&self) -> Vec<u8> {
        postcard::to_stdvec(&(
            b"relay",
            self.token,
            self.client,
            self.server,
            self.client_port,
            self.port,
        ))
        .expect("encodes")
    }
}

impl Traverse {
    /// The bytes the MAC covers.
    pub fn signed_part(&self) -> Vec<u8> {
        postcard::to_stdvec(&(b"traverse", self.id, self.technique, &self.syn, self.client))
            .expect("encodes")
    }
}

impl Punched {
    /// The bytes the MAC covers.
    pub fn signed_part(&self) -> Vec<u8> {
        postcard::to_stdvec(&(b"punched", self.id, self.server)).expect("encodes")
    }
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

/// Traversal messages have a flow id, not an exchange's.
fn exchange_id_of(flow: u64) -> ExchangeId {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&flow.to_be_bytes());
    id
}

impl Handshake {
    pub fn id(&self) -> ExchangeId {
        match self {
            Self::Init(m) => m.id,
            Self::Reply(m) => m.id,
            Self::Confirm(m) => m.id,
            Self::Done(m) => m.id,
            Self::Refused { id, .. } => *id,
            Self::Traverse(m) => exchange_id_of(m.id),
            Self::Punched(m) => exchange_id_of(m.id),
            Self::RelayFlow(m) => exchange_id_of(u64::from_le_bytes(
                m.token[..8].try_into().expect("8 bytes"),
            )),
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
