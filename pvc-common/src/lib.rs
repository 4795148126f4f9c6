//! Plain data that crosses the kernel boundary: map keys and values, counters
//! and events shared by the eBPF programs (`pvc-ebpf`) and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so that the kernel, the
//! agent and `bpftool` (through BTF) agree on the layout. Addresses are kept as
//! `[u8; 4]` in network order (bpftool prints them as `[240,0,0,2]`), ports in
//! host order (bpftool prints them as plain numbers).
#![no_std]

/// The virtual network, 240.0.0.0/4 (class E): the first octet's high nibble.
const VIRTUAL_NET_FIRST_OCTET: u8 = 0xf0;

#[inline(always)]
pub fn is_virtual(addr: [u8; 4]) -> bool {
    addr[0] & 0xf0 == VIRTUAL_NET_FIRST_OCTET
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;

/// TCP flags the agent looks at in `Masquerade::tcp_flags`.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

/// Which side of the host a masquerading entry translates.
pub const DIRECTION_EGRESS: u8 = 0;
pub const DIRECTION_INGRESS: u8 = 1;

/// Key of the masquerading map: a flow's tuple as seen at one hook.
///
/// Egress keys hold virtual addresses (what the local socket uses); ingress
/// keys hold real addresses (what is on the wire). For ICMP echo the
/// identifier plays the local port: requests are keyed (id, 0) on egress,
/// replies (0, id) on ingress.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub direction: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    #[inline(always)]
    pub const fn new(
        saddr: [u8; 4],
        daddr: [u8; 4],
        sport: u16,
        dport: u16,
        proto: u8,
        direction: u8,
    ) -> Self {
        Self {
            saddr,
            daddr,
            sport,
            dport,
            proto,
            direction,
            _pad: [0; 2],
        }
    }

    /// The key under which the other direction of the same flow is stored,
    /// given this entry's rewritten tuple.
    #[inline(always)]
    pub fn twin(&self, m: &Masquerade) -> FlowKey {
        FlowKey::new(
            m.daddr,
            m.saddr,
            m.dport,
            m.sport,
            self.proto,
            self.direction ^ 1,
        )
    }
}

/// Value of the masquerading map: the tuple a packet matching the key is
/// rewritten to, and bookkeeping for garbage collection.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Masquerade {
    /// CLOCK_MONOTONIC (coarse) nanoseconds of the last packet.
    pub last_seen_ns: u64,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    /// Virtual address of the peer this flow belongs to.
    pub peer: [u8; 4],
    /// A `Technique` value: which connectivity technique carries the flow.
    pub technique: u8,
    /// OR of the TCP flags seen on this direction (FIN/RST tell the GC a
    /// flow is closing).
    pub tcp_flags: u8,
    pub _pad: [u8; 6],
}

/// Connectivity technique that carries a peer path (paper §4.4).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Technique {
    /// The peer's real address is reachable as is (same LAN, public host, or
    /// a UPnP mapping).
    Direct = 1,
}

impl Technique {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Direct),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
        }
    }
}

/// Value of the peer map (key: the peer's virtual address, `[u8; 4]`): how
/// this host reaches the member. Flows to a virtual address are masqueraded
/// only while its entry exists.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerPath {
    /// The peer's real address on the wire.
    pub real: [u8; 4],
    pub technique: u8,
    pub _pad: [u8; 3],
}

/// Single entry of the settings array: who this host is.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// This host's virtual address.
    pub virtual_addr: [u8; 4],
    /// This host's real address on the uplink (source of masqueraded packets).
    pub real_addr: [u8; 4],
    /// 1 once the agent has filled the entry; programs pass everything before.
    pub ready: u32,
}

/// Indexes of the per-CPU drop/refusal counters. Every packet the data path
/// drops and every connect() it refuses is counted under exactly one reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A packet to a virtual address that no member holds.
    UnknownPeer = 0,
    /// A protocol the data path does not masquerade yet (UDP, ...).
    UnsupportedProtocol = 1,
    /// A packet on the wire with a virtual source or destination (spoofed or leaked).
    VirtualAddressOnWire = 2,
    /// A packet from a virtual source to a real destination.
    VirtualSourceToRealDestination = 3,
    /// A packet with a virtual source that is not this host's virtual address.
    ForeignVirtualSource = 4,
    /// The real path to the peer has no route.
    NoRoute = 5,
    /// A SYN whose TCP options leave no room for the PVC flow tag.
    SynOptionsFull = 6,
    /// Truncated or malformed headers on a virtual flow.
    Malformed = 7,
    /// A tagged SYN from a real address that does not belong to the member it names.
    TagMismatch = 8,
    /// An IP fragment of a virtual flow (cannot be masqueraded without its L4 header).
    Fragment = 9,
    /// A kernel helper failed while rewriting a packet.
    RewriteFailed = 10,
    /// The masquerading map is full and could not take a new flow.
    FlowTableFull = 11,
    /// connect() to a virtual address that no member holds (refused with EHOSTUNREACH).
    ConnectNoMember = 12,
    /// A SYN carrying data (TCP Fast Open) on a virtual flow; the client's
    /// stack retransmits a plain SYN.
    SynWithPayload = 13,
}

pub const DROP_REASON_COUNT: u32 = 14;

impl DropReason {
    pub const ALL: [DropReason; DROP_REASON_COUNT as usize] = [
        Self::UnknownPeer,
        Self::UnsupportedProtocol,
        Self::VirtualAddressOnWire,
        Self::VirtualSourceToRealDestination,
        Self::ForeignVirtualSource,
        Self::NoRoute,
        Self::SynOptionsFull,
        Self::Malformed,
        Self::TagMismatch,
        Self::Fragment,
        Self::RewriteFailed,
        Self::FlowTableFull,
        Self::ConnectNoMember,
        Self::SynWithPayload,
    ];

    /// Stable name used in logs, metrics labels and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Self::UnknownPeer => "unknown_peer",
            Self::UnsupportedProtocol => "unsupported_protocol",
            Self::VirtualAddressOnWire => "virtual_address_on_wire",
            Self::VirtualSourceToRealDestination => "virtual_source_to_real_destination",
            Self::ForeignVirtualSource => "foreign_virtual_source",
            Self::NoRoute => "no_route",
            Self::SynOptionsFull => "syn_options_full",
            Self::Malformed => "malformed",
            Self::TagMismatch => "tag_mismatch",
            Self::Fragment => "fragment",
            Self::RewriteFailed => "rewrite_failed",
            Self::FlowTableFull => "flow_table_full",
            Self::ConnectNoMember => "connect_no_member",
            Self::SynWithPayload => "syn_with_payload",
        }
    }
}

/// Indexes of the per-CPU traffic counters (masqueraded packets and bytes).
pub const COUNTER_EGRESS_PACKETS: u32 = 0;
pub const COUNTER_EGRESS_BYTES: u32 = 1;
pub const COUNTER_INGRESS_PACKETS: u32 = 2;
pub const COUNTER_INGRESS_BYTES: u32 = 3;
pub const COUNTER_COUNT: u32 = 4;

/// The TCP option that marks the SYN of a PVC flow on the wire (RFC 6994
/// shared experimental option, kind 253, with our experiment identifier),
/// carrying the sender's virtual address. Without it the receiver could not
/// tell a virtual flow from a real connection between the same two hosts.
pub const TAG_KIND: u8 = 253;
pub const TAG_LEN: u8 = 8;
pub const TAG_EXID: [u8; 2] = *b"PV";

/// Event kinds sent to the agent through the ring buffer.
pub const EVENT_FLOW_CREATED: u8 = 1;
pub const EVENT_CONNECT_REFUSED: u8 = 2;

/// A control-plane event (one per new flow or refusal, never per packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Event {
    pub kind: u8,
    pub proto: u8,
    /// `DIRECTION_*` for flows: who opened it (egress = this host).
    pub direction: u8,
    pub technique: u8,
    /// `DropReason` for refusals.
    pub reason: u32,
    /// Virtual tuple (local side first for outbound flows, remote first for inbound).
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    /// Process that called connect() (refusals only; 0 otherwise).
    pub pid: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Masquerade {}
    unsafe impl aya::Pod for PeerPath {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Event {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        // The kernel hashes keys byte for byte: implicit padding would make
        // equal keys differ. Sizes are the sum of the declared fields.
        assert_eq!(size_of::<FlowKey>(), 4 + 4 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<Masquerade>(), 8 + 4 + 4 + 2 + 2 + 4 + 1 + 1 + 6);
        assert_eq!(size_of::<PeerPath>(), 8);
        assert_eq!(size_of::<Settings>(), 12);
        assert_eq!(size_of::<Event>(), 4 + 4 + 4 + 4 + 2 + 2 + 4);
    }

    #[test]
    fn virtual_range_is_class_e() {
        assert!(is_virtual([240, 0, 0, 1]));
        assert!(is_virtual([255, 255, 255, 254]));
        assert!(!is_virtual([239, 255, 255, 255]));
        assert!(!is_virtual([198, 18, 0, 1]));
    }

    #[test]
    fn twin_key_reverses_the_rewritten_tuple() {
        let egress = FlowKey::new(
            [240, 0, 0, 1],
            [240, 0, 0, 2],
            40000,
            80,
            IPPROTO_TCP,
            DIRECTION_EGRESS,
        );
        let m = Masquerade {
            saddr: [198, 18, 0, 1],
            daddr: [198, 18, 0, 2],
            sport: 40000,
            dport: 80,
            ..Default::default()
        };
        let twin = egress.twin(&m);
        assert_eq!(twin.saddr, [198, 18, 0, 2]);
        assert_eq!(twin.daddr, [198, 18, 0, 1]);
        assert_eq!((twin.sport, twin.dport), (80, 40000));
        assert_eq!(twin.direction, DIRECTION_INGRESS);
    }

    #[test]
    fn drop_reasons_are_indexed_densely() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
