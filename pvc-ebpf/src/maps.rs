//! The maps shared with the agent. BTF-defined, so that `bpftool map dump`
//! shows field names. The agent pins them under `/sys/fs/bpf/pvc/<instance>/`.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    btf_maps::{
        Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf, SockMap,
        lpm_trie::Key,
    },
    helpers::bpf_ktime_get_coarse_ns,
    macros::btf_map,
};
use pvc_common::{
    DROP_REASON_COUNT, DropReason, Event, FlowKey, HINT_SLOTS, Masquerade, MasqueradingPorts,
    POLICY_FULL_PREFIX, POLICY_INBOUND, PeerPath, PolicyKey, ReplayKey, ReplayValue, Settings,
    SocketKey, SocketPeer, TRAFFIC_DIRECTIONS, Traffic,
};

/// The masquerading map (paper §4.1.3's "masquerading rules"): one entry per
/// flow and direction. The agent may resize it at load time (`max_flows`).
///
/// A plain hash, not an LRU: an LRU map makes room for a new flow by
/// evicting the entries of an established one, which then breaks without a
/// trace. Here a full map refuses the new flow (counted, answered with a
/// RST) and only the agent removes entries, once their flow has ended.
#[btf_map(name = "masquerading")]
pub static MASQUERADING: HashMap<FlowKey, Masquerade, 65536> = HashMap::new();

/// Members this host has a path to, by virtual address.
///
/// Not preallocated: the agent replaces entries (a new session, another
/// path), and in a preallocated hash the replaced element goes straight back
/// to the free list, where the next update may overwrite it while a program
/// still reads it. Here it is freed after an RCU grace period, so a program
/// that copied the value out (`peer`) holds one consistent version.
#[btf_map(name = "peers")]
pub static PEERS: HashMap<[u8; 4], PeerPath, 16384, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

#[btf_map(name = "settings")]
pub static SETTINGS: Array<Settings, 1> = Array::new();

/// The effective policy (local and global, compiled by the agent): allowed
/// (direction, member, port prefix). Consulted only for a direction the
/// settings mark as restricted.
#[btf_map(name = "policy")]
pub static POLICY: LpmTrie<PolicyKey, u8, 65536> = LpmTrie::new();

/// Drops and refusals by `DropReason`.
#[btf_map(name = "drops")]
pub static DROPS: PerCpuArray<u64, { DROP_REASON_COUNT as usize }> = PerCpuArray::new();

/// Masqueraded packets and bytes, by direction (`TRAFFIC_*`).
#[btf_map(name = "traffic")]
pub static TRAFFIC: PerCpuArray<Traffic, { TRAFFIC_DIRECTIONS as usize }> = PerCpuArray::new();

/// Tagged SYNs accepted lately, by sender and sequence number, with where
/// they came from: the same SYN again from another address is a replay
/// (`ReplayKey`). An LRU: old entries go first, and a SYN that old is
/// long answered.
#[btf_map(name = "replay")]
pub static REPLAY: LruHashMap<ReplayKey, ReplayValue, 65536> = LruHashMap::new();

/// Flows translated at the socket, by their tuple on the wire: who the
/// socket is connected to on the virtual network (getpeername, accept,
/// getsockname). Entries come with the flow's SYN (tc: the tag is sent or
/// verified) and go with its socket (sock_ops, at close). A plain hash, as
/// the masquerading map: a live flow's entry is never evicted.
#[btf_map(name = "socket_flows")]
pub static SOCKET_FLOWS: HashMap<SocketKey, SocketPeer, 65536> = HashMap::new();

/// connect()s translated at the socket, by socket cookie, until their SYN
/// is tagged on egress. An LRU: a connect() that never sent its SYN leaves
/// nothing behind for long.
#[btf_map(name = "socket_connects")]
pub static SOCKET_CONNECTS: LruHashMap<u64, SocketPeer, 65536> = LruHashMap::new();

/// Masquerading hints: slot `FlowKey::hint_slot` of an ingress TCP tuple
/// holds the time (the `clock`'s) until which a packet with that tuple may
/// have a masquerading entry; slot `HINT_LIFETIME_SLOT` how long a hint
/// lasts. Set before an entry is created and renewed by its packets, so a
/// live entry's slot is always live; a packet whose slot has lapsed (a flow
/// translated at the socket, a connection between real addresses) passes
/// without the hash lookup.
#[btf_map(name = "masquerading_hints")]
pub static MASQUERADING_HINTS: Array<u64, { HINT_SLOTS as usize + 1 }> = Array::new();

/// Where flows masqueraded per packet on a path that lets sockets carry
/// flows take their source port on the wire (`MasqueradingPorts`), at
/// index 0; written by the agent before the programs attach.
#[btf_map(name = "masquerading_ports")]
pub static MASQUERADING_PORTS: Array<MasqueradingPorts, 1> = Array::new();

/// The agent's relay listener (`sk_lookup`), at index 0.
#[btf_map(name = "relay_listener")]
pub static RELAY_LISTENER: SockMap<1> = SockMap::new();

/// `pvc_masquerade` at index 0, for the masquerading programs' tail call
/// (`nat::masquerade_tcp`). Empty while no agent holds it: they then
/// rewrite with helpers.
#[btf_map(name = "in_place")]
pub static IN_PLACE: ProgramArray<1> = ProgramArray::new();

/// Control-plane events: new flows and refusals. Never per packet.
#[btf_map(name = "events")]
pub static EVENTS: RingBuf<Event, { 512 * 1024 }> = RingBuf::new();

/// What this host knows of the member at `vip`, copied out of the map in
/// one read: the fields a packet uses (real address, state, tag key) then
/// come from the same version of the entry, whatever the agent writes
/// meanwhile.
#[inline(always)]
pub fn peer(vip: [u8; 4]) -> Option<PeerPath> {
    // SAFETY: the reference lives only for the copy, under RCU; entries are
    // freed after a grace period (BPF_F_NO_PREALLOC), never reused under us.
    unsafe { PEERS.get(vip) }.copied()
}

#[inline(always)]
pub fn settings() -> Option<Settings> {
    match SETTINGS.get(0) {
        Some(s) if s.ready == 1 => Some(*s),
        _ => None,
    }
}

/// A tc program's verdict: the packet's, or a drop counted by its reason.
#[inline(always)]
pub fn tc_verdict(result: Result<i32, DropReason>) -> i32 {
    result.unwrap_or_else(|reason| {
        count_drop(reason);
        aya_ebpf::bindings::TC_ACT_SHOT as i32
    })
}

#[inline(always)]
pub fn count_drop(reason: DropReason) {
    add(&DROPS, reason as u32, 1);
}

#[inline(always)]
pub fn count_traffic(direction: u32, bytes: u32) {
    if let Some(t) = TRAFFIC.get_ptr_mut(direction) {
        // SAFETY: a per-CPU slot of the map: no other CPU writes it, and
        // the program is not preempted while it runs, so plain adds are exact.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += bytes as u64;
        }
    }
}

#[inline(always)]
fn add<const N: usize>(map: &PerCpuArray<u64, N>, index: u32, n: u64) {
    if let Some(p) = map.get_ptr_mut(index) {
        // SAFETY: as in `count_traffic`, a per-CPU slot only this run writes.
        unsafe { *p += n };
    }
}

/// Emits an event the agent acts on, waking it. Forced: the default wakes
/// the reader only if it had read everything, and quiet events may be
/// waiting unread.
#[inline(always)]
pub fn emit(event: &Event) {
    // A full ring buffer loses the event, never the packet or the connect().
    let _ = EVENTS.output(event, BPF_RB_FORCE_WAKEUP as u64);
}

/// Emits an event the agent only counts, without waking it: a wakeup costs
/// an interrupt (a VM exit in a guest), on the path of every SYN. The agent
/// reads these when woken, on a timer, and before answering `pvc status`.
#[inline(always)]
pub fn emit_quietly(event: &Event) {
    let _ = EVENTS.output(event, BPF_RB_NO_WAKEUP as u64);
}

/// CLOCK_MONOTONIC nanoseconds as the agent last wrote them (every 250
/// ms): what a flow's `last_seen_ns` needs, read from memory instead of a
/// helper call on every packet (a call and a return each cost tens of ns
/// on CPUs with return-stack mitigations).
#[btf_map(name = "clock")]
pub static CLOCK: Array<u64, 1> = Array::new();

#[inline(always)]
pub fn now_ns() -> u64 {
    match CLOCK.get(0) {
        Some(&t) if t != 0 => t,
        // Before the agent's first write: the kernel's own clock.
        // SAFETY: a helper without arguments.
        _ => unsafe { bpf_ktime_get_coarse_ns() },
    }
}

/// Whether the policy allows a flow with `peer` on `port` in `direction`.
#[inline(always)]
pub fn allowed(s: &Settings, direction: u8, peer: [u8; 4], port: u16) -> bool {
    let restricted = if direction == POLICY_INBOUND {
        s.policy_in
    } else {
        s.policy_out
    };
    if restricted == 0 {
        return true;
    }
    let key = Key::new(
        POLICY_FULL_PREFIX,
        PolicyKey {
            direction,
            peer,
            port: port.to_be_bytes(),
            _pad: 0,
        },
    );
    POLICY.get(&key).is_some()
}
