//! PVC's wire protocol between agents, brokers and the cluster's master.
//!
//! Every frame is `"PVC" | version: u8 | length: u32 (big endian) | body`,
//! where the body is a postcard-encoded message. The fixed header lets either
//! end reject a stranger (an HTTP client, an old agent) with a clear error
//! before reading anything else, and caps what a peer can make us buffer.
//!
//! Decoding never panics: malformed, oversized or foreign frames are errors
//! (fuzzed in `fuzz/`).
//!
//! Brokers are not trusted: what they relay about members is master-signed
//! (`records`), and what agents say to each other through them is signed
//! end to end (`handshake`).

use std::{
    marker::PhantomData,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use bytes::{Buf, BufMut, BytesMut};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder};

pub mod dns;
pub mod handshake;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod records;
mod registration;
pub mod relay;

pub use records::{
    ClusterId, GlobalPolicy, MembershipRecord, PolicyRule, PortRange, PublicKey, RecordError,
    Revocations, Selector, Signed, SignedPolicy, SignedRecord, SignedRevocations, Versioned,
    supersedes, unix_now,
};
pub use registration::{
    InvalidRegistration, valid_name, valid_virtual_address, validate_addresses,
};

pub const MAGIC: [u8; 3] = *b"PVC";
/// Bumped on any incompatible change of the messages below.
pub const VERSION: u8 = 3;
pub const HEADER_LEN: usize = 8;
/// Largest body either end accepts. Longer member lists are sent in several
/// frames (`member_chunks`).
pub const MAX_BODY: usize = 64 * 1024;
/// Largest agent-to-agent payload a broker relays.
pub const MAX_RELAY: usize = 4096;
/// Default TCP port of a broker.
pub const DEFAULT_BROKER_PORT: u16 = 7100;
/// Default PVC port of an agent (its broker sessions' local port; probes
/// and UPnP forwards come to it).
pub const DEFAULT_AGENT_PORT: u16 = 7101;

/// What a broker's UDP probe datagram starts with (then the nonce, big endian).
pub const PROBE_MAGIC: &[u8; 8] = b"PVCPROBE";

const PING_MS: u64 = 1000;
/// An agent pings each broker this often; the broker answers `Pong`.
pub const PING_INTERVAL: Duration = Duration::from_millis(PING_MS);
/// An agent gives a broker up after this long without a frame from it
/// (three pings unanswered): a broker whose host is gone, or whose link is
/// cut, is noticed within seconds even if its socket never closes.
pub const BROKER_SILENCE_LIMIT: Duration = Duration::from_millis(3 * PING_MS);
/// A broker closes a session it has heard nothing on for this long (four
/// pings missed): the other members learn soon that this broker no longer
/// reaches the agent, and talk to it through another.
pub const AGENT_IDLE_TIMEOUT: Duration = Duration::from_millis(4 * PING_MS);

/// What an agent (or the master) tells a broker.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum AgentMessage {
    /// First message of an agent's session: who it is, signed with its host key.
    Register(Registration),
    /// Liveness; the broker answers `Pong` with the same nonce.
    Ping { nonce: u64 },
    /// The agent is stopping for good: members may forget it at once.
    Leave,
    /// An opaque message for another member of the cluster (signed end to
    /// end by its sender; see `handshake`).
    Relay { to: Ipv4Addr, payload: Vec<u8> },
    /// First and only message of a master's session: documents to store
    /// and distribute. The broker answers `Published` or `Error`.
    Publish(Publication),
    /// What the agent found out about its network; the broker passes it on
    /// with the member (`MemberInfo::site`).
    Site(SiteInfo),
    /// Asks the broker to reach back to the address it observes for this
    /// session, on `port`: with a TCP connection (answered by
    /// `ProbeResult`) and with a UDP datagram carrying `nonce` (which the
    /// agent sees arrive, or not).
    Probe { port: u16, nonce: u64 },
    /// The agent will join the broker's relay with `token` for a flow with
    /// member `to` (who will join too). Tokens not offered by a member of
    /// a registered session are refused.
    RelayOffer { token: [u8; 16], to: Ipv4Addr },
    /// First and only frame of a relay connection: pair it with the other
    /// connection that joins with the same offered `token`; from then on
    /// the broker copies bytes between them. The agents prove the pair's
    /// key to each other on the connection before any byte of the flow;
    /// the bytes themselves are not encrypted (as on a direct path).
    RelayJoin { token: [u8; 16] },
}

/// What a broker tells an agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum BrokerMessage {
    /// Registration accepted. `you` is this agent's own record, `members` the
    /// other members present now (continued by `Members` frames while `more`).
    Welcome {
        broker: String,
        /// The agent's address and port as this broker sees them (after
        /// any NAT on the way).
        observed: SocketAddrV4,
        you: SignedRecord,
        revocations: Option<SignedRevocations>,
        policy: Option<SignedPolicy>,
        members: Vec<MemberInfo>,
        more: bool,
    },
    /// Continuation of the member list of `Welcome`.
    Members {
        members: Vec<MemberInfo>,
        more: bool,
    },
    /// A member registered (or re-registered with new addresses).
    Joined(MemberInfo),
    /// A member's session ended. `clean`: the member said `Leave`; otherwise
    /// the session was lost (crash, network trouble) and the member may be back.
    Left {
        virtual_ip: Ipv4Addr,
        clean: bool,
    },
    /// A payload another member sent with `Relay`. `from` is what the broker
    /// says; only the payload's own signatures can be believed.
    Relayed {
        from: Ipv4Addr,
        payload: Vec<u8>,
    },
    /// A `Relay` could not be delivered: `to` is not connected here (or the
    /// payload was too large).
    Undeliverable {
        to: Ipv4Addr,
    },
    /// The master published a new revocation list.
    Revocations(SignedRevocations),
    /// The master published a new global policy.
    Policy(SignedPolicy),
    /// Answer to `Publish`: how many records the broker now holds for the cluster.
    Published {
        records: u32,
    },
    Pong {
        nonce: u64,
    },
    /// Whether the broker's TCP connection to the observed address reached
    /// the agent (`Probe`).
    ProbeResult {
        nonce: u64,
        reached: bool,
    },
    /// The broker refuses something; it closes the session after sending this.
    Error {
        code: ErrorCode,
        message: String,
    },
}

/// A member as a broker presents it: the master's record, the real
/// addresses the member registered with, where the broker sees its session
/// come from, and what it found out about its network. All but the record
/// are hints for choosing a path: the handshake binds the one used.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub record: SignedRecord,
    pub addresses: Vec<Ipv4Addr>,
    pub observed: Option<SocketAddrV4>,
    pub site: SiteInfo,
}

/// Whether, and how, a NAT translates a member's connections.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Nat {
    #[default]
    Unknown,
    /// The member's own address is the one the brokers see.
    None,
    /// A NAT keeps the member's port, the same for every destination: the
    /// public port of a flow can be predicted.
    Preserving,
    /// A NAT picks ports (per destination, or at random): they cannot be
    /// predicted (a symmetric NAT).
    Random,
}

/// What reaches a member from the Internet, unasked.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Inbound {
    #[default]
    Unknown,
    /// A new TCP connection from a broker reached it (a public host, or a
    /// port forwarded by UPnP).
    Open,
    /// TCP connection requests are dropped, other packets pass: a
    /// stateless firewall (Traversing-TCP works).
    SynFiltered,
    /// Nothing unasked passes: a stateful firewall, or a NAT.
    Filtered,
}

/// What an agent found out about its network.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SiteInfo {
    /// The agent's PVC port: its broker sessions leave from it, probes and
    /// UPnP mappings come to it.
    pub port: u16,
    /// The public address the brokers see (its own address when no NAT).
    pub public: Option<Ipv4Addr>,
    pub nat: Nat,
    pub inbound: Inbound,
    /// The public endpoint a UPnP gateway forwards to the agent's port.
    pub upnp: Option<SocketAddrV4>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub cluster: ClusterId,
    pub host_key: PublicKey,
    /// Real IPv4 addresses the member can be reached at, preferred first.
    pub addresses: Vec<Ipv4Addr>,
    /// Free text for logs, e.g. "pvc-agent 0.1.0".
    pub software: String,
    /// Seconds since the Unix epoch; the broker accepts a few minutes of skew.
    pub timestamp: u64,
    /// The host key's signature over the fields above (`Registration::signed_part`).
    pub proof: Vec<u8>,
}

/// Documents a master publishes. The broker checks every signature against
/// `master_key` and that the cluster is the one `master_key` names.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    pub master_key: PublicKey,
    pub records: Vec<SignedRecord>,
    pub revocations: Option<SignedRevocations>,
    pub policy: Option<SignedPolicy>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    MalformedFrame,
    UnsupportedVersion,
    FrameTooLarge,
    /// The first message was not `Register`/`Publish`, or came twice.
    NotRegistered,
    InvalidRegistration,
    /// No valid (admitted, unexpired, unrevoked) record for this host key.
    NotAdmitted,
    /// The broker holds nothing for this cluster: the master must publish.
    UnknownCluster,
    /// A publication whose signatures or cluster do not check.
    BadPublication,
    /// A newer session of the same member replaced this one.
    Replaced,
    /// Nothing received for too long.
    Timeout,
    /// The broker serves other clusters, not the one the agent names: the
    /// agent's master key is probably another cluster's.
    ForeignCluster,
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

/// Splits a member list into chunks that each fit in a frame (with room
/// for the rest of a `Welcome`).
pub fn member_chunks(members: &[MemberInfo]) -> Vec<Vec<MemberInfo>> {
    const BUDGET: usize = MAX_BODY / 2;
    let mut chunks = vec![Vec::new()];
    let mut size = 0;
    for m in members {
        let n = postcard::experimental::serialized_size(m).unwrap_or(MAX_BODY);
        if size + n > BUDGET && !chunks.last().unwrap().is_empty() {
            chunks.push(Vec::new());
            size = 0;
        }
        size += n;
        chunks.last_mut().unwrap().push(m.clone());
    }
    chunks
}

#[cfg(test)]
mod tests;
