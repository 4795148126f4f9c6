//! Flow entries of the masquerading map: lookup with bookkeeping, and
//! creation of both directions at once.

use pvc_common::{
    DIRECTION_EGRESS, DropReason, EVENT_FLOW_CREATED, Event, FlowKey, Masquerade, PeerPath,
};

use crate::maps::{MASQUERADING, emit, now_ns};

/// Looks up a flow and records that a packet (with these TCP flags) used it.
#[inline(always)]
pub fn touch(key: &FlowKey, tcp_flags: u8) -> Option<Masquerade> {
    let p = MASQUERADING.get_ptr_mut(key)?;
    let now = now_ns();
    // Entries are shared between CPUs: write only when something changes,
    // so that a bulk transfer does not bounce the cache line on every packet.
    unsafe {
        if now.wrapping_sub((*p).last_seen_ns) > 1_000_000_000 {
            (*p).last_seen_ns = now;
        }
        if (*p).tcp_flags | tcp_flags != (*p).tcp_flags {
            (*p).tcp_flags |= tcp_flags;
        }
        Some(*p)
    }
}

/// Installs both directions of a flow: `key` (as seen at this hook) is
/// rewritten to `to`, and the reverse direction, keyed by `to` reversed, back
/// to `key` reversed. The twin goes in first so that a reply can never beat
/// its entry.
#[inline(always)]
pub fn open(key: &FlowKey, to: &Masquerade, announce: bool) -> Result<(), DropReason> {
    let twin_key = key.twin(to);
    let twin = Masquerade {
        last_seen_ns: to.last_seen_ns,
        saddr: key.daddr,
        daddr: key.saddr,
        sport: key.dport,
        dport: key.sport,
        peer: to.peer,
        technique: to.technique,
        tcp_flags: 0,
        _pad: [0; 6],
    };
    MASQUERADING
        .insert(&twin_key, &twin, 0)
        .map_err(|_| DropReason::FlowTableFull)?;
    MASQUERADING
        .insert(key, to, 0)
        .map_err(|_| DropReason::FlowTableFull)?;
    if announce {
        // Report the flow by its virtual tuple, local side first: that is
        // the egress key, whichever side opened the flow.
        let v = if key.direction == DIRECTION_EGRESS {
            key
        } else {
            &twin_key
        };
        emit(&Event {
            kind: EVENT_FLOW_CREATED,
            proto: key.proto,
            direction: key.direction,
            technique: to.technique,
            saddr: v.saddr,
            daddr: v.daddr,
            sport: v.sport,
            dport: v.dport,
            ..Default::default()
        });
    }
    Ok(())
}

/// Removes a flow's entries, both directions, if there are any.
#[inline(always)]
pub fn close(key: &FlowKey) {
    if let Some(m) = MASQUERADING.get_ptr(key) {
        let twin = key.twin(unsafe { &*m });
        let _ = MASQUERADING.remove(&twin);
        let _ = MASQUERADING.remove(key);
    }
}

/// The masquerading value for a new flow towards/from `peer`.
#[inline(always)]
pub fn entry(
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: u16,
    dport: u16,
    peer: [u8; 4],
    path: &PeerPath,
) -> Masquerade {
    Masquerade {
        last_seen_ns: now_ns(),
        saddr,
        daddr,
        sport,
        dport,
        peer,
        technique: path.technique,
        tcp_flags: 0,
        _pad: [0; 6],
    }
}
