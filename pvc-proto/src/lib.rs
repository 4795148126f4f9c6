//! PVC's wire protocol between agents and brokers.
//!
//! Every frame is `"PVC" | version: u8 | length: u32 (big endian) | body`,
//! where the body is a postcard-encoded message. The fixed header lets either
//! end reject a stranger (an HTTP client, an old agent) with a clear error
//! before reading anything else, and caps what a peer can make us buffer.
//!
//! Decoding never panics: malformed, oversized or foreign frames are errors
//! (fuzzed in `fuzz/`).

use std::{marker::PhantomData, net::Ipv4Addr};

use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder};

mod registration;

pub use registration::{InvalidRegistration, valid_name};

pub const MAGIC: [u8; 3] = *b"PVC";
/// Bumped on any incompatible change of the messages below.
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 8;
/// Largest body either end accepts. Longer member lists are sent in several
/// frames (`member_chunks`).
pub const MAX_BODY: usize = 64 * 1024;
/// Default TCP port of a broker.
pub const DEFAULT_BROKER_PORT: u16 = 7100;

/// What an agent tells a broker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum AgentMessage {
    /// First message of a session: who this agent is.
    Register(Registration),
    /// Liveness; the broker answers `Pong` with the same nonce.
    Ping { nonce: u64 },
    /// The agent is stopping for good: members may forget it at once.
    Leave,
}

/// What a broker tells an agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum BrokerMessage {
    /// Registration accepted. `members` are the other members present now
    /// (possibly continued by `Members` frames when `more` is set).
    Welcome {
        broker: String,
        members: Vec<Member>,
        more: bool,
    },
    /// Continuation of the member list of `Welcome`.
    Members {
        members: Vec<Member>,
        more: bool,
    },
    /// A member registered (or re-registered with new addresses).
    Joined(Member),
    /// A member's session ended. `clean`: the member said `Leave`; otherwise
    /// the session was lost (crash, network trouble) and the member may be back.
    Left {
        name: String,
        virtual_ip: Ipv4Addr,
        clean: bool,
    },
    Pong {
        nonce: u64,
    },
    /// The broker refuses something; it closes the session after sending this.
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// A member of the cluster as the broker knows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub virtual_ip: Ipv4Addr,
    /// Real IPv4 addresses the member can be reached at, preferred first.
    pub addresses: Vec<Ipv4Addr>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub cluster: String,
    pub member: Member,
    /// Free text for logs, e.g. "pvc-agent 0.1.0".
    pub software: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    MalformedFrame,
    UnsupportedVersion,
    FrameTooLarge,
    /// The first message was not `Register`, or `Register` came twice.
    NotRegistered,
    InvalidRegistration,
    /// The virtual address or name belongs to another live member.
    Conflict,
    /// A newer session of the same member replaced this one.
    Replaced,
    /// Nothing received for too long.
    Timeout,
    /// The agent does not read fast enough.
    TooSlow,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("not a PVC frame (first bytes {0:02x?}); is this really a PVC broker or agent?")]
    BadMagic([u8; 3]),
    #[error("peer speaks protocol version {found}, this build speaks version {VERSION}")]
    UnsupportedVersion { found: u8 },
    #[error("frame body of {len} bytes exceeds the limit of {MAX_BODY} bytes")]
    TooLarge { len: usize },
    #[error("malformed message: {0}")]
    Malformed(postcard::Error),
    #[error("cannot encode message: {0}")]
    Encode(postcard::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The code a broker reports before closing a session on this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            Self::TooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

/// A framed codec that reads `In` and writes `Out`.
pub struct Codec<In, Out> {
    _messages: PhantomData<fn(Out) -> In>,
}

impl<In, Out> Default for Codec<In, Out> {
    fn default() -> Self {
        Self {
            _messages: PhantomData,
        }
    }
}

/// The agent's side of a broker session.
pub type AgentCodec = Codec<BrokerMessage, AgentMessage>;
/// The broker's side of an agent session.
pub type BrokerCodec = Codec<AgentMessage, BrokerMessage>;

impl<In: DeserializeOwned, Out> Decoder for Codec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        if src.len() < HEADER_LEN {
            // Judge a stranger by its first bytes without waiting for more.
            let n = src.len().min(MAGIC.len());
            if src[..n] != MAGIC[..n] {
                let mut seen = [0u8; 3];
                seen[..n].copy_from_slice(&src[..n]);
                return Err(FrameError::BadMagic(seen));
            }
            return Ok(None);
        }
        let (header, _) = src.split_at(HEADER_LEN);
        if header[..3] != MAGIC {
            return Err(FrameError::BadMagic([header[0], header[1], header[2]]));
        }
        if header[3] != VERSION {
            return Err(FrameError::UnsupportedVersion { found: header[3] });
        }
        let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if len > MAX_BODY {
            return Err(FrameError::TooLarge { len });
        }
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let body = src.split_to(len);
        let (message, rest) =
            postcard::take_from_bytes::<In>(&body).map_err(FrameError::Malformed)?;
        if !rest.is_empty() {
            return Err(FrameError::Malformed(
                postcard::Error::DeserializeBadEncoding,
            ));
        }
        Ok(Some(message))
    }
}

impl<In, Out: Serialize> Encoder<Out> for Codec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let body = postcard::to_stdvec(&item).map_err(FrameError::Encode)?;
        if body.len() > MAX_BODY {
            return Err(FrameError::TooLarge { len: body.len() });
        }
        dst.reserve(HEADER_LEN + body.len());
        dst.put_slice(&MAGIC);
        dst.put_u8(VERSION);
        dst.put_u32(body.len() as u32);
        dst.put_slice(&body);
        Ok(())
    }
}

/// Splits a member list into chunks that each fit in a frame.
pub fn member_chunks(members: &[Member]) -> Vec<Vec<Member>> {
    // A valid member encodes to at most 1 + 63 + 4 + 1 + 16 * 4 = 133 bytes
    // (see `Member::validate`): 400 take 53 KiB, under `MAX_BODY`.
    const PER_FRAME: usize = 400;
    if members.is_empty() {
        return vec![Vec::new()];
    }
    members.chunks(PER_FRAME).map(<[Member]>::to_vec).collect()
}

#[cfg(test)]
mod tests;
