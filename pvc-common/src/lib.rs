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

/// The maps the programs share with the agent, by the names the eBPF
/// object gives them (`#[btf_map(name = ...)]` in pvc-ebpf must match; a
/// test parses the object). Every one is pinned under
/// `/sys/fs/bpf/pvc/<instance>/` and taken over by a restarted agent.
pub mod maps {
    pub const MASQUERADING: &str = "masquerading";
    pub const PEERS: &str = "peers";
    pub const SETTINGS: &str = "settings";
    pub const POLICY: &str = "policy";
    pub const DROPS: &str = "drops";
    pub const TRAFFIC: &str = "traffic";
    pub const EVENTS: &str = "events";
    pub const REPLAY: &str = "replay";
    pub const CLOCK: &str = "clock";
    pub const SOCKET_FLOWS: &str = "socket_flows";
    pub const SOCKET_CONNECTS: &str = "socket_connects";
    pub const MASQUERADING_HINTS: &str = "masquerading_hints";
    pub const MASQUERADING_PORTS: &str = "masquerading_ports";
    pub const ALL: [&str; 13] = [
        MASQUERADING,
        PEERS,
        SETTINGS,
        POLICY,
        DROPS,
        TRAFFIC,
        EVENTS,
        REPLAY,
        CLOCK,
        SOCKET_FLOWS,
        SOCKET_CONNECTS,
        MASQUERADING_HINTS,
        MASQUERADING_PORTS,
    ];
    /// The agent's relay listener, for the sk_lookup program: a socket
    /// lives only as long as its agent, so this map is not pinned.
    pub const RELAY_LISTENER: &str = "relay_listener";
    /// The in-place masquerading program, for tc's tail call. Not pinned:
    /// the kernel empties it when its agent goes, and tc then rewrites with
    /// helpers (a stopped agent's programs never call a newer agent's,
    /// whose control-block layout may differ).
    pub const IN_PLACE: &str = "in_place";
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

    /// The masquerading hint's slot of an ingress TCP key: a hash of the
    /// tuple's remote address, remote port and local port. An ingress
    /// packet looks its flow up only while this slot's hint is live: a
    /// flow translated at the socket (nothing to rewrite) then costs no
    /// hash lookup.
    #[inline(always)]
    pub fn hint_slot(&self) -> u32 {
        let ports = ((self.sport as u32) << 16) | self.dport as u32;
        let mixed = (u32::from_ne_bytes(self.saddr) ^ ports).wrapping_mul(0x9e37_79b1);
        mixed >> 16
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

/// Where a flow masqueraded per packet takes its source port on the wire
/// when its member's path lets sockets carry flows (`PATH_SOCKET`). Its own
/// port came from the kernel's ephemeral range for the member's *virtual*
/// address; the kernel may hand the same port to a connect() translated at
/// the socket to the member's *real* address, whose wire tuple would then
/// be this flow's. Outside that range, the kernel never picks it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MasqueradingPorts {
    /// The kernel's ephemeral range (`ip_local_port_range`), inclusive.
    pub ephemeral_first: u16,
    pub ephemeral_last: u16,
    /// The ports used instead: `first .. first + count`; `count` 0 keeps
    /// every flow's own port.
    pub first: u16,
    pub count: u16,
}

/// How many ports a flow's SYN tries before it is refused.
pub const MASQUERADING_PORT_TRIES: u32 = 8;

impl MasqueradingPorts {
    /// Whether a flow from `sport` takes another port on the wire.
    #[inline(always)]
    pub fn moves(&self, sport: u16) -> bool {
        self.count != 0 && sport >= self.ephemeral_first && sport <= self.ephemeral_last
    }

    /// The `try_`th port for the flow whose egress key is `key`: a hash of
    /// the virtual tuple, so that a retransmitted SYN (and a flow whose
    /// entries expired) finds its port again.
    #[inline(always)]
    pub fn candidate(&self, key: &FlowKey, try_: u32) -> u16 {
        let count = self.count.max(1) as u32;
        let spread = (key.hint_slot() ^ (u32::from_ne_bytes(key.daddr) >> 16))
            .wrapping_add(try_.wrapping_mul(40_503));
        self.first.wrapping_add((spread % count) as u16)
    }
}

/// Slots of the masquerading hints (`HINT_LIFETIME_SLOT` is the last).
pub const HINT_SLOTS: u32 = 65536;
/// The hints' slot that holds how long a hint lasts (ns), written by the
/// agent: longer than any idle TCP entry can live before its removal.
/// 0 (not written yet): hints never lapse (`hint_until`).
pub const HINT_LIFETIME_SLOT: u32 = HINT_SLOTS;

/// Until when a hint given at `now` stays live, for the hints' `lifetime`.
/// Before the agent says how long hints last, a hinted tuple is looked up
/// for good: a tuple's slot is zero until it is hinted, and a packet whose
/// slot is zero needs nothing else (no clock, no lifetime), so the
/// readers cannot tell "not said yet" from a lapse.
#[inline(always)]
pub fn hint_until(now: u64, lifetime: u64) -> u64 {
    if lifetime == 0 {
        u64::MAX
    } else {
        now.saturating_add(lifetime)
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
    /// `FLOW_*` bits the agent sets for flows it opened itself (traversal).
    pub flags: u8,
    // Scalars rather than `[u8; 5]`: zeroing an odd-sized array costs the
    // eBPF programs a call to memset on every new flow.
    pub _pad: u8,
    pub _pad2: u32,
}

/// `Masquerade::flags` (egress): the first SYN/ACK of this flow goes to the
/// agent instead of the wire. A server behind a NAT answers a SYN the agent
/// injected; the agent sends that answer's sequence number out as a SYN
/// first, so that its NAT expects the client (hole punching).
pub const FLOW_HOLD_SYNACK: u8 = 1;
/// `Masquerade::flags` (ingress): until this flow's SYN/ACK arrives, RSTs
/// are dropped: a firewall rejecting the SYN on its way must not reset the
/// connection the agents are completing around it (Traversing-TCP).
pub const FLOW_AWAIT_SYNACK: u8 = 2;
/// Masquerade flag: an entry the agent installed for a traversal, waiting
/// for the client's SYN. Its virtual ports are the agent's (the client's
/// NAT or UPnP forward may have changed the wire's): the SYN keeps them.
pub const FLOW_AWAIT_SYN: u8 = 4;

impl Masquerade {
    /// The entry for the other direction of the flow `key` -> `self`:
    /// keyed by `self` reversed, rewriting back to `key` reversed.
    #[inline(always)]
    pub fn reverse(&self, key: &FlowKey) -> (FlowKey, Masquerade) {
        (
            key.twin(self),
            Masquerade {
                last_seen_ns: self.last_seen_ns,
                saddr: key.daddr,
                daddr: key.saddr,
                sport: key.dport,
                dport: key.sport,
                peer: self.peer,
                technique: self.technique,
                tcp_flags: 0,
                flags: 0,
                _pad: 0,
                _pad2: 0,
            },
        )
    }
}

/// Connectivity technique that carries a path or a flow (paper §4.4).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Technique {
    /// The peer's own address is reachable: a public host.
    Direct = 1,
    /// Both behind the same NAT: the peer's LAN address.
    Lan = 2,
    /// The peer's UPnP gateway forwards its PVC port to it.
    Upnp = 3,
    /// TCP hole punching: the server side's agent opens its NAT or
    /// firewall with a SYN before the client's SYN comes (per flow).
    Punch = 4,
    /// Traversing-TCP: the client's SYN, dropped at the server's firewall,
    /// is carried by a broker and injected into the server's stack (per flow).
    Ttcp = 5,
    /// Connection reversal: the server behind a symmetric NAT sends the
    /// first SYN, and the client learns the port its NAT picked (per flow).
    Reversal = 6,
    /// Through a broker: the only path whose bytes go through userspace.
    Relay = 7,
}

impl Technique {
    pub const ALL: [Technique; 7] = [
        Self::Direct,
        Self::Lan,
        Self::Upnp,
        Self::Punch,
        Self::Ttcp,
        Self::Reversal,
        Self::Relay,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|t| *t as u8 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Lan => "lan",
            Self::Upnp => "upnp",
            Self::Punch => "punch",
            Self::Ttcp => "ttcp",
            Self::Reversal => "reversal",
            Self::Relay => "relay",
        }
    }

    /// Whether every flow needs the agents (its SYN goes to them).
    pub fn per_flow(self) -> bool {
        matches!(self, Self::Punch | Self::Ttcp | Self::Reversal)
    }

    /// Whether the server's port on the wire is its application's (a
    /// traversal that the socket can follow): a punch through NATs that
    /// keep ports, Traversing-TCP to a firewalled public host. Not a
    /// reversal, whose server sits behind a NAT that picks ports.
    pub fn keeps_server_port(self) -> bool {
        matches!(self, Self::Punch | Self::Ttcp)
    }
}

/// `PeerPath::state`: a verified member (master-signed record) with no
/// authenticated path yet. connect() is allowed; its SYN is held and handed
/// to the agent, which authenticates the peer first.
pub const PEER_MEMBER: u8 = 1;
/// Both agents proved their identities for this path (challenge-response);
/// flows are masqueraded by the kernel alone.
pub const PEER_READY: u8 = 2;

/// Value of the peer map (key: the peer's virtual address, `[u8; 4]`): what
/// this host knows of the member and how it reaches it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PeerPath {
    /// The peer's address on the wire, both ways (from the authenticated
    /// exchange): its public address, or its LAN address beside us.
    pub real: [u8; 4],
    /// The `Technique` this host's flows to the peer use.
    pub technique: u8,
    /// `PEER_MEMBER` or `PEER_READY`.
    pub state: u8,
    /// The destination port on the wire when it is not the flow's own (the
    /// peer's UPnP forward); 0 otherwise.
    pub port: u16,
    /// `PATH_*` bits.
    pub flags: u8,
    pub _pad: [u8; 7],
    /// SipHash-2-4 key for the tags of SYNs between the two, derived by the
    /// exchange (zero until `PEER_READY`).
    pub tag_key: [u8; 16],
}

/// `PeerPath::flags`: every new flow needs the agents (a traversal per
/// flow): its SYN is handed to the agent, unless the agent sends it.
pub const PATH_PER_FLOW: u8 = 1;
/// `PeerPath::flags`: this host translates flows with the member at the
/// socket (`interposition.translation = "socket"`): a connect() to it goes
/// to its real address when the path is direct (not `PATH_PER_FLOW`), and
/// its SYNs that a listener can take as they are pass unrewritten, whatever
/// path this host's own flows to it take. No packet of such a flow is
/// rewritten.
pub const PATH_SOCKET: u8 = 2;
/// `PeerPath::flags`, with `PATH_SOCKET` on a `PATH_PER_FLOW` path: the
/// member's port on the wire is the application's (hole punching through
/// NATs that keep ports, Traversing-TCP) and a traversal to it has worked
/// in this session. connect4 sends such a flow to the member's public
/// address; tc egress tags its SYN and hands it to the agent, which runs
/// the traversal and sends it.
pub const PATH_SOCKET_TRAVERSAL: u8 = 4;

/// Key of the socket-flows map: a flow translated at the socket, by its
/// tuple on the wire (this host's real address is the same for all):
/// the member's real address and port, and the local port.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SocketKey {
    pub peer: [u8; 4],
    pub peer_port: u16,
    pub local_port: u16,
}

/// Who a socket-level flow's socket is connected to on the virtual
/// network: what getpeername()/accept() show, what its SYN's tag names.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SocketPeer {
    /// The member's virtual address.
    pub vpeer: [u8; 4],
    /// The member's port as the application knows it (connect()'s port).
    pub vport: u16,
    /// The `Technique` of the path the flow uses.
    pub technique: u8,
    /// `SOCKET_CONNECTED` or `SOCKET_ACCEPTED`.
    pub side: u8,
    /// This host's port as the application knows it, for a member's flow
    /// whose SYN tc ingress handed to the listener: a UPnP forward brought
    /// it to this host's forwarded port (the listener took it for its own
    /// port), or the listener is bound to the virtual address. 0 when the
    /// stack delivered the SYN itself (the wire's port is the listener's).
    pub local_vport: u16,
    /// `SOCKET_*` flags.
    pub flags: u16,
}

impl SocketPeer {
    /// This host's port on the virtual network, given the wire's.
    #[inline(always)]
    pub fn local_vport(&self, wire: u16) -> u16 {
        if self.local_vport != 0 {
            self.local_vport
        } else {
            wire
        }
    }
}

/// `SocketPeer::side`: this host's application connected.
pub const SOCKET_CONNECTED: u8 = 0;
/// `SocketPeer::side`: the member connected to a listener of this host.
pub const SOCKET_ACCEPTED: u8 = 1;

/// `SocketPeer::flags`: a traversal's server side, punching. The agent
/// injected the member's SYN as it will come on the wire; tc egress hands
/// the stack's answer to the agent (which sends its sequence number out as
/// the punch SYN) and tc ingress drops a RST on the tuple (the member's NAT
/// rejecting the punch), until the member's own SYN arrives and clears the
/// flag.
pub const SOCKET_HOLD_ANSWER: u16 = 1;
/// `SocketPeer::flags`: a traversal's client side, its SYN handed to the
/// agents. tc ingress announces the flow at the member's SYN/ACK (the
/// traversal is done) and drops a RST before it (a firewall rejecting
/// the SYN that the agents are carrying around it).
pub const SOCKET_AWAIT_ANSWER: u16 = 2;
/// `SocketPeer::flags`: the first flow to a member whose path is still to
/// be authenticated, translated at the socket from connect() on: tc egress
/// hands its SYN to the agent untagged, and tags it when the agent sends
/// it again over the authenticated path; the flow is announced then.
pub const SOCKET_AWAIT_PATH: u16 = 4;

impl PeerPath {
    /// Whether a connect() to the member goes straight to its endpoint on
    /// the wire (translation at the socket): over a direct path, or a
    /// traversal that keeps the member's port (`PATH_SOCKET_TRAVERSAL`).
    #[inline(always)]
    pub fn connects_at_socket(&self) -> bool {
        self.flags & PATH_SOCKET != 0
            && (self.flags & PATH_PER_FLOW == 0 || self.flags & PATH_SOCKET_TRAVERSAL != 0)
    }

    /// Whether connect4 sends a connect() to the member straight to its
    /// endpoint on the wire now: over an authenticated path that connects
    /// at the socket, or over a LAN path still to be authenticated (the
    /// member's first flow: its SYN waits for the agents at tc egress,
    /// `SOCKET_AWAIT_PATH`). Beyond the LAN the technique the agents pick
    /// first can change while they learn their sites (a firewall found
    /// filtering: a traversal per flow), and a connect() sent to the wire
    /// cannot follow it; the first flow there stays at the virtual
    /// address, free to take a traversal or the relay.
    #[inline(always)]
    pub fn connects_at_socket_now(&self) -> bool {
        self.connects_at_socket()
            && match self.state {
                PEER_READY => true,
                PEER_MEMBER => {
                    self.technique == Technique::Lan as u8
                        && self.flags & PATH_PER_FLOW == 0
                        && self.real != [0; 4]
                }
                _ => false,
            }
    }

    /// A verified member without an authenticated path yet, and the path
    /// the agents will authenticate (`port`, `flags` as for `ready`).
    pub const fn member(real: [u8; 4], technique: u8, port: u16, flags: u8) -> Self {
        Self {
            real,
            technique,
            state: PEER_MEMBER,
            port,
            flags,
            _pad: [0; 7],
            tag_key: [0; 16],
        }
    }

    /// A path both agents authenticated, with the key of its SYN tags.
    pub const fn ready(
        real: [u8; 4],
        technique: u8,
        port: u16,
        flags: u8,
        tag_key: [u8; 16],
    ) -> Self {
        Self {
            real,
            technique,
            state: PEER_READY,
            port,
            flags,
            _pad: [0; 7],
            tag_key,
        }
    }
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
    pub ready: u8,
    /// 1 when a policy restricts outbound flows (else every member is allowed).
    pub policy_out: u8,
    /// 1 when a policy restricts inbound flows.
    pub policy_in: u8,
    /// `STANDING_*`: whether this host is still a member. Revoked or
    /// expired, connect() to members fails at once with an errno that says
    /// so (members refuse it anyway).
    pub standing: u8,
    /// The depth of `cgroup_id` in the cgroup v2 hierarchy.
    pub cgroup_level: u32,
    /// The cgroup v2 whose processes (and their descendants) use the
    /// virtual network (`interposition.cgroup`); 0 for the whole host.
    /// Outside it, a flow to a virtual address is refused, and so is a flow
    /// from a member to a server outside it.
    pub cgroup_id: u64,
}

/// `Settings::standing`: admitted (or not known otherwise).
pub const STANDING_MEMBER: u8 = 0;
/// `Settings::standing`: the master revoked this host (EKEYREVOKED).
pub const STANDING_REVOKED: u8 = 1;
/// `Settings::standing`: this host's record expired (EKEYEXPIRED).
pub const STANDING_EXPIRED: u8 = 2;

/// `skb->mark` of the packets the agent itself puts on the wire (held SYNs
/// re-sent, answers, probes): tc knows them from an application's, whatever
/// cgroup the agent runs in.
pub const AGENT_MARK: u32 = 0x5056_4301;

pub const POLICY_OUTBOUND: u8 = 0;
pub const POLICY_INBOUND: u8 = 1;

/// Key data of the policy LPM trie: an allowed (direction, member, port
/// prefix). Bytes are in matching order, most significant first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PolicyKey {
    pub direction: u8,
    pub peer: [u8; 4],
    /// Big endian, so that a port range is a set of prefixes.
    pub port: [u8; 2],
    pub _pad: u8,
}

/// Prefix length of a full (direction, member, port) key.
pub const POLICY_FULL_PREFIX: u32 = 8 + 32 + 16;

/// Defines `DropReason` from one table: each reason's index, its stable
/// name (logs, metrics labels, the CLI) and what it means for an operator,
/// side by side.
macro_rules! drop_reasons {
    ($($(#[$doc:meta])* $variant:ident = $index:literal, $name:literal, $explain:literal;)*) => {
        /// Indexes of the per-CPU drop/refusal counters. Every packet the data
        /// path drops and every connect() it refuses is counted under exactly
        /// one reason.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum DropReason {
            $($(#[$doc])* $variant = $index,)*
        }

        impl DropReason {
            pub const ALL: [DropReason; DROP_REASON_COUNT as usize] = [$(Self::$variant,)*];

            /// Stable name used in logs, metrics labels and the CLI.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }

            /// What the drop means, for a log line or an operator.
            pub fn explain(self) -> &'static str {
                match self {
                    $(Self::$variant => $explain,)*
                }
            }
        }
    };
}

drop_reasons! {
    /// A packet to a virtual address that no member holds.
    UnknownPeer = 0, "unknown_peer", "no member has this virtual address";
    /// A protocol the data path does not masquerade yet (UDP, ...).
    UnsupportedProtocol = 1, "unsupported_protocol",
        "PVC carries TCP and ping only (UDP is not masqueraded yet)";
    /// A packet on the wire with a virtual source or destination (spoofed or leaked).
    VirtualAddressOnWire = 2, "virtual_address_on_wire",
        "a virtual address on the wire (spoofed, or leaked by a host without PVC)";
    /// A packet from a virtual source to a real destination.
    VirtualSourceToRealDestination = 3, "virtual_source_to_real_destination",
        "a packet from the virtual address to a real one (bound to the virtual address?)";
    /// A packet with a virtual source that is not this host's virtual address.
    ForeignVirtualSource = 4, "foreign_virtual_source",
        "a virtual source address that is not this host's";
    /// A SYN held until the path to its member is authenticated: copied to
    /// the agent, which re-sends it once the path exists.
    AwaitingPath = 5, "awaiting_path",
        "held while the agents authenticate the path (re-sent then)";
    /// A SYN whose TCP options leave no room for the PVC flow tag.
    SynOptionsFull = 6, "syn_options_full", "the SYN's TCP options leave no room for PVC's tag";
    /// Truncated or malformed headers on a virtual flow.
    Malformed = 7, "malformed", "truncated or malformed headers";
    /// A tagged SYN naming a member that has no authenticated path from
    /// this real address.
    TagMismatch = 8, "tag_mismatch",
        "the member it names has no authenticated path from that real address";
    /// An IP fragment of a virtual flow (cannot be masqueraded without its L4 header).
    Fragment = 9, "fragment", "an IP fragment of a virtual flow (not masqueraded)";
    /// A kernel helper failed while rewriting a packet.
    RewriteFailed = 10, "rewrite_failed", "a kernel helper failed to rewrite the packet";
    /// The masquerading map is full and could not take a new flow.
    FlowTableFull = 11, "flow_table_full",
        "the masquerading map is full (raise interposition.max_flows)";
    /// connect() to a virtual address that no member holds (refused with EHOSTUNREACH).
    ConnectNoMember = 12, "connect_no_member", "no member has this virtual address";
    /// A SYN carrying data (TCP Fast Open) on a virtual flow; the client's
    /// stack retransmits a plain SYN.
    SynWithPayload = 13, "syn_with_payload",
        "a SYN carrying data (TCP Fast Open); a plain SYN follows";
    /// A tagged SYN whose MAC does not verify: forged, altered or from an
    /// old session.
    BadTag = 14, "bad_tag", "its tag's MAC is wrong (forged, or from an old session)";
    /// An outbound flow the policy does not allow (connect() fails with EPERM).
    PolicyOutbound = 15, "policy_outbound", "the policy does not allow this flow";
    /// An inbound flow the policy does not allow (its SYN is dropped).
    PolicyInbound = 16, "policy_inbound", "the policy does not allow it";
    /// A new flow whose real 4-tuple on the wire is in use by another live
    /// connection between the same two hosts (a PVC flow and a connection
    /// between real addresses that picked the same ports): the new one is
    /// refused, the established one keeps working.
    FlowCollision = 17, "flow_collision",
        "its real 4-tuple is in use by another live connection between the two hosts";
    /// A SYN whose real 4-tuple is still used by a connection in its last
    /// packets (its FIN is out): dropped, TCP retransmits it once that
    /// connection has ended.
    TupleClosing = 18, "tuple_closing",
        "its real 4-tuple is still used by a closing connection (TCP retries it)";
    /// A packet to a member before the agent told the programs who this
    /// host is (starting up): dropped, TCP retransmits.
    AgentNotReady = 19, "agent_not_ready", "the agent has not finished setting up the data path";
    /// A flow to a virtual address from a process outside the cgroup PVC
    /// serves, or from a member to a server outside it: refused with a RST.
    OutsideCgroup = 20, "outside_cgroup",
        "the process is outside the cgroup PVC serves (interposition.cgroup)";
    /// A traversal's punch SYN from a member's agent: handed to the agent,
    /// never to a socket.
    Punch = 21, "punch", "a traversal's punch SYN (handed to the agent)";
    /// A RST from a member's firewall while the agents complete the
    /// connection around it (Traversing-TCP): kept from the socket.
    TraversalReset = 22, "traversal_reset",
        "a firewall's RST during Traversing-TCP (kept from the socket)";
    /// A tagged SYN whose sequence number was already accepted from another
    /// address: a replay.
    Replay = 23, "replay", "a tagged SYN replayed from another address";
    /// A SYN/ACK the agent needs before the wire (hole punching).
    HeldAnswer = 24, "held_answer", "a server's SYN/ACK handed to the agent (hole punching)";
    /// connect() to a member from a host whose membership was revoked or
    /// expired (refused with EKEYREVOKED or EKEYEXPIRED).
    NotAMember = 25, "not_a_member",
        "this host's membership was revoked or has expired: ask the cluster's administrator";
}

pub const DROP_REASON_COUNT: u32 = 26;

/// Masqueraded packets and bytes in one direction, per CPU. Both in one
/// value: a packet's accounting touches one cache line, not two.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

/// Indexes of the traffic counters.
pub const TRAFFIC_EGRESS: u32 = 0;
pub const TRAFFIC_INGRESS: u32 = 1;
pub const TRAFFIC_DIRECTIONS: u32 = 2;

/// The TCP option that marks the SYN of a PVC flow on the wire (RFC 6994
/// shared experimental option, kind 253, with our experiment identifier):
/// `[253, 20, 'P', 'V', vsrc(4), vdport(2), flags, 0, mac(8)]`: the
/// sender's virtual address, the flow's virtual destination port (a NAT's
/// forward may have changed the one on the wire), flags, then a MAC.
/// Without it the receiver could not tell a virtual flow from a real
/// connection between the same two hosts.
///
/// The MAC is SipHash-2-4, keyed with the pair's `tag_key`, over what no
/// NAT changes: both virtual addresses, the virtual port, the flags and the
/// sequence number (`tag_message`). Addresses and ports on the wire do
/// change behind NATs; the receiver checks the source address against the
/// path the two agents authenticated, and refuses a SYN whose sequence
/// number it already accepted from another address (`replay`): a copy sent
/// from behind the same NAT opens nothing.
pub const TAG_KIND: u8 = 253;
pub const TAG_LEN: u8 = 20;
pub const TAG_EXID: [u8; 2] = *b"PV";
/// Tag flag: a traversal's punch SYN, from the server's agent: it opened
/// the server's NAT or firewall; the receiving kernel hands it to its agent
/// (which learns the port the NAT picked) and never to a socket.
pub const TAG_PUNCH: u8 = 1;

/// The 16 bytes a SYN tag's MAC covers.
#[inline(always)]
pub fn tag_message(vsrc: [u8; 4], vdst: [u8; 4], vdport: u16, flags: u8, seq: [u8; 4]) -> [u8; 16] {
    let p = vdport.to_be_bytes();
    [
        vsrc[0], vsrc[1], vsrc[2], vsrc[3], vdst[0], vdst[1], vdst[2], vdst[3], p[0], p[1], flags,
        0, seq[0], seq[1], seq[2], seq[3],
    ]
}

/// Key of the replay map: a tagged SYN by what its MAC covers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ReplayKey {
    pub vsrc: [u8; 4],
    pub seq: [u8; 4],
    pub vdport: u16,
    pub _pad: u16,
}

/// Value of the replay map: where that SYN came from on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ReplayValue {
    pub saddr: [u8; 4],
    pub sport: u16,
    pub _pad: u16,
}

/// SipHash-2-4 of a 16-byte message (the kernel's and the agent's tests'
/// shared implementation; no allocation, no loops the verifier dislikes).
#[inline(always)]
pub fn siphash24_16(key: &[u8; 16], msg: &[u8; 16]) -> u64 {
    #[inline(always)]
    fn le(b: &[u8], i: usize) -> u64 {
        u64::from_le_bytes([
            b[i],
            b[i + 1],
            b[i + 2],
            b[i + 3],
            b[i + 4],
            b[i + 5],
            b[i + 6],
            b[i + 7],
        ])
    }
    #[inline(always)]
    fn round(v: &mut [u64; 4]) {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }
    let (k0, k1) = (le(key, 0), le(key, 8));
    let mut v = [
        k0 ^ 0x736f6d6570736575,
        k1 ^ 0x646f72616e646f6d,
        k0 ^ 0x6c7967656e657261,
        k1 ^ 0x7465646279746573,
    ];
    for m in [le(msg, 0), le(msg, 8), 16u64 << 56] {
        v[3] ^= m;
        round(&mut v);
        round(&mut v);
        v[0] ^= m;
    }
    v[2] ^= 0xff;
    round(&mut v);
    round(&mut v);
    round(&mut v);
    round(&mut v);
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// Event kinds sent to the agent through the ring buffer.
pub const EVENT_FLOW_CREATED: u8 = 1;
/// A connect() refused by the cgroup hook (no member, or policy).
pub const EVENT_CONNECT_REFUSED: u8 = 2;
/// An inbound SYN refused by tc ingress (policy, bad or unknown tag).
pub const EVENT_INBOUND_REFUSED: u8 = 3;
/// A packet held for the agent (`HeldPacket`).
pub const EVENT_PACKET_HELD: u8 = 4;
/// A punch SYN from a member (`HeldPacket`, as it arrived on the wire).
pub const EVENT_PUNCH: u8 = 6;
/// A server's SYN/ACK of a flow the agent is punching (`HeldPacket`).
pub const EVENT_ANSWER_HELD: u8 = 7;
/// A connection request refused by tc (`HeldPacket` with its reason): the
/// agent answers it with a RST, so that connect() fails at once with
/// ECONNREFUSED instead of retransmitting into a drop.
pub const EVENT_PACKET_REFUSED: u8 = 5;

/// Bytes of a held packet the agent gets: enough for a SYN's IPv4 and TCP
/// headers with options, or a small ping.
pub const HELD_BYTES: usize = 120;

/// A packet handed to the agent: the first packet of a flow to a member
/// without an authenticated path (`EVENT_PACKET_HELD`: a SYN or a ping, as
/// the local stack sent it, with virtual addresses; the agent authenticates
/// the peer and, if it got the whole packet, re-sends it), or a SYN tc
/// refused (`EVENT_PACKET_REFUSED`: the agent answers it with a RST).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldPacket {
    pub kind: u8,
    /// 1 when `packet` holds the whole IPv4 packet (it can be re-sent).
    pub complete: u8,
    /// Bytes of `packet` copied from the IPv4 header on.
    pub len: u16,
    pub daddr: [u8; 4],
    /// The `DropReason` the packet was held or refused for.
    pub reason: u32,
    pub _pad: u32,
    pub packet: [u8; HELD_BYTES],
}

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
    /// Virtual tuple (local side first for outbound flows and connect()
    /// refusals; for inbound refusals the remote member first).
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    /// Process that called connect() (connect() refusals only; 0 otherwise).
    pub pid: u32,
    /// For inbound refusals: the real address the SYN came from.
    pub real: [u8; 4],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Masquerade {}
    unsafe impl aya::Pod for PeerPath {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for HeldPacket {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for Traffic {}
    unsafe impl aya::Pod for ReplayKey {}
    unsafe impl aya::Pod for SocketKey {}
    unsafe impl aya::Pod for SocketPeer {}
    unsafe impl aya::Pod for ReplayValue {}
    unsafe impl aya::Pod for MasqueradingPorts {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    /// connect4 sends a member's first flow to the wire only on the LAN:
    /// elsewhere the first technique can still change.
    #[test]
    fn a_members_first_flow_goes_to_the_wire_only_on_the_lan() {
        let at = |state: u8, technique: Technique, flags: u8| PeerPath {
            state,
            flags: flags | PATH_SOCKET,
            ..PeerPath::member([198, 18, 0, 2], technique as u8, 0, 0)
        };
        assert!(at(PEER_MEMBER, Technique::Lan, 0).connects_at_socket_now());
        assert!(!at(PEER_MEMBER, Technique::Direct, 0).connects_at_socket_now());
        assert!(!at(PEER_MEMBER, Technique::Upnp, 0).connects_at_socket_now());
        assert!(!at(PEER_MEMBER, Technique::Lan, PATH_PER_FLOW).connects_at_socket_now());
        let unknown = PeerPath {
            real: [0; 4],
            ..at(PEER_MEMBER, Technique::Lan, 0)
        };
        assert!(!unknown.connects_at_socket_now());
        assert!(at(PEER_READY, Technique::Direct, 0).connects_at_socket_now());
        assert!(!at(PEER_READY, Technique::Punch, PATH_PER_FLOW).connects_at_socket_now());
        let packet = PeerPath {
            flags: 0,
            ..at(PEER_MEMBER, Technique::Lan, 0)
        };
        assert!(!packet.connects_at_socket_now(), "translation per packet");
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        // The kernel hashes keys byte for byte: implicit padding would make
        // equal keys differ. Sizes are the sum of the declared fields.
        assert_eq!(size_of::<FlowKey>(), 4 + 4 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<Masquerade>(), 8 + 4 + 4 + 2 + 2 + 4 + 1 + 1 + 6);
        assert_eq!(size_of::<PeerPath>(), 16 + 16);
        assert_eq!(size_of::<Settings>(), 12 + 4 + 8);
        assert_eq!(size_of::<PolicyKey>(), 8);
        assert_eq!(size_of::<HeldPacket>(), 16 + HELD_BYTES);
        assert_eq!(size_of::<Event>(), 4 + 4 + 4 + 4 + 2 + 2 + 4 + 4);
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
    fn siphash_matches_a_reference_implementation() {
        use core::hash::Hasher as _;
        for seed in 0u8..64 {
            let key: [u8; 16] =
                core::array::from_fn(|i| (i as u8).wrapping_mul(31).wrapping_add(seed));
            let msg: [u8; 16] =
                core::array::from_fn(|i| (i as u8).wrapping_mul(seed).wrapping_add(7));
            let mut h = siphasher::sip::SipHasher24::new_with_key(&key);
            h.write(&msg);
            assert_eq!(siphash24_16(&key, &msg), h.finish(), "seed {seed}");
        }
    }

    #[test]
    fn drop_reasons_are_indexed_densely() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
