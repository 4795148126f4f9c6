//! Control-plane events from the kernel (new flows, refused connects,
//! held packets), read from the ring buffer: woken for those the agent acts
//! on, on a timer for those it only counts.

use std::net::{Ipv4Addr, SocketAddrV4};

use aya::maps::{MapData, RingBuf};
use pvc_common::{
    DIRECTION_EGRESS, DropReason, EVENT_ANSWER_HELD, EVENT_CONNECT_REFUSED, EVENT_FLOW_CREATED,
    EVENT_INBOUND_REFUSED, EVENT_PACKET_HELD, EVENT_PACKET_REFUSED, EVENT_PUNCH, Event, HeldPacket,
    Technique,
};
use tokio::io::{Interest, unix::AsyncFd};

pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowEvent {
    /// A flow got its masquerading entries. `local`/`remote` are virtual.
    Opened {
        proto: u8,
        outbound: bool,
        local: SocketAddrV4,
        remote: SocketAddrV4,
        technique: Option<Technique>,
    },
    /// A connect() was refused in the kernel.
    Refused {
        pid: u32,
        proto: u8,
        remote: SocketAddrV4,
        reason: Option<DropReason>,
    },
    /// An inbound SYN was refused in the kernel. `claimed` is the virtual
    /// address its tag named, `real` where it came from.
    InboundRefused {
        claimed: Ipv4Addr,
        real: Ipv4Addr,
        local_port: u16,
        reason: Option<DropReason>,
    },
    /// The first packet to a member without an authenticated path, held for
    /// the agent; `packet` is the whole IPv4 packet when it fit the record.
    Held {
        peer: Ipv4Addr,
        packet: Option<Vec<u8>>,
    },
    /// A SYN tc refused (the flow table is full, or its wire tuple is in
    /// use): the agent answers it with a RST.
    PacketRefused {
        reason: Option<DropReason>,
        packet: Option<Vec<u8>>,
    },
    /// A member's punch SYN, as it arrived on the wire.
    Punch { packet: Vec<u8> },
    /// Our stack's answer to a SYN the agent injected for a flow it punches.
    AnswerHeld { packet: Vec<u8> },
}

impl FlowEvent {
    /// Decodes an event; `None` for bytes no known program writes.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if let Some(
            &kind @ (EVENT_PACKET_HELD | EVENT_PACKET_REFUSED | EVENT_PUNCH | EVENT_ANSWER_HELD),
        ) = bytes.first()
        {
            if bytes.len() < size_of::<HeldPacket>() {
                return None;
            }
            // SAFETY: HeldPacket is plain old data and `bytes` holds at least one.
            let e: HeldPacket = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            let len = (e.len as usize).min(e.packet.len());
            let packet = (e.complete == 1).then(|| e.packet[..len].to_vec());
            return match kind {
                EVENT_PACKET_HELD => Some(Self::Held {
                    peer: Ipv4Addr::from(e.daddr),
                    packet,
                }),
                EVENT_PACKET_REFUSED => Some(Self::PacketRefused {
                    reason: DropReason::ALL.get(e.reason as usize).copied(),
                    packet,
                }),
                EVENT_PUNCH => packet.map(|packet| Self::Punch { packet }),
                _ => packet.map(|packet| Self::AnswerHeld { packet }),
            };
        }
        if bytes.len() < size_of::<Event>() {
            return None;
        }
        // SAFETY: Event is plain old data and `bytes` holds at least one.
        let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let ep = |a: [u8; 4], p: u16| SocketAddrV4::new(Ipv4Addr::from(a), p);
        match e.kind {
            EVENT_FLOW_CREATED => Some(Self::Opened {
                proto: e.proto,
                outbound: e.direction == DIRECTION_EGRESS,
                local: ep(e.saddr, e.sport),
                remote: ep(e.daddr, e.dport),
                technique: Technique::from_u8(e.technique),
            }),
            EVENT_CONNECT_REFUSED => Some(Self::Refused {
                pid: e.pid,
                proto: e.proto,
                remote: ep(e.daddr, e.dport),
                reason: DropReason::ALL.get(e.reason as usize).copied(),
            }),
            EVENT_INBOUND_REFUSED => Some(Self::InboundRefused {
                claimed: Ipv4Addr::from(e.saddr),
                real: Ipv4Addr::from(e.real),
                local_port: e.dport,
                reason: DropReason::ALL.get(e.reason as usize).copied(),
            }),
            _ => None,
        }
    }
}

impl EventStream {
    pub(super) fn new(ring: RingBuf<MapData>) -> std::io::Result<Self> {
        // SAFETY: the ring buffer owns its map fd for as long as it lives,
        // and the AsyncFd owns the ring buffer.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self { ring })
    }

    /// Waits until the kernel wakes the agent for an event, and returns
    /// every event in the ring then.
    pub async fn next_batch(&mut self) -> std::io::Result<Vec<FlowEvent>> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let batch = read_all(guard.get_inner_mut());
            guard.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }

    /// The events in the ring now, without waiting: those the kernel writes
    /// without waking the agent (new flows) are read this way.
    pub fn drain(&mut self) -> Vec<FlowEvent> {
        read_all(self.ring.get_mut())
    }
}

fn read_all(ring: &mut RingBuf<MapData>) -> Vec<FlowEvent> {
    let mut batch = Vec::new();
    while let Some(item) = ring.next() {
        if let Some(e) = FlowEvent::parse(&item) {
            batch.push(e);
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_bytes(e: &HeldPacket) -> Vec<u8> {
        // SAFETY: HeldPacket is repr(C) plain data.
        unsafe {
            std::slice::from_raw_parts(
                (e as *const HeldPacket).cast::<u8>(),
                size_of::<HeldPacket>(),
            )
        }
        .to_vec()
    }

    fn bytes(e: &Event) -> Vec<u8> {
        // SAFETY: Event is repr(C) plain data without padding.
        unsafe { std::slice::from_raw_parts((e as *const Event).cast::<u8>(), size_of::<Event>()) }
            .to_vec()
    }

    #[test]
    fn refusals_and_flows_decode() {
        let e = Event {
            kind: EVENT_CONNECT_REFUSED,
            proto: 6,
            reason: DropReason::ConnectNoMember as u32,
            daddr: [240, 0, 0, 9],
            dport: 80,
            pid: 42,
            ..Default::default()
        };
        assert_eq!(
            FlowEvent::parse(&bytes(&e)),
            Some(FlowEvent::Refused {
                pid: 42,
                proto: 6,
                remote: "240.0.0.9:80".parse().unwrap(),
                reason: Some(DropReason::ConnectNoMember),
            })
        );
        let e = Event {
            kind: EVENT_FLOW_CREATED,
            proto: 6,
            direction: DIRECTION_EGRESS,
            technique: Technique::Direct as u8,
            saddr: [240, 0, 0, 1],
            daddr: [240, 0, 0, 2],
            sport: 40000,
            dport: 22,
            ..Default::default()
        };
        assert!(matches!(
            FlowEvent::parse(&bytes(&e)),
            Some(FlowEvent::Opened {
                outbound: true,
                technique: Some(Technique::Direct),
                ..
            })
        ));
    }

    #[test]
    fn held_syns_carry_their_packet() {
        let mut e = HeldPacket {
            kind: EVENT_PACKET_HELD,
            complete: 1,
            len: 3,
            daddr: [240, 0, 0, 2],
            reason: DropReason::AwaitingPath as u32,
            _pad: 0,
            packet: [0; pvc_common::HELD_BYTES],
        };
        e.packet[..3].copy_from_slice(&[0x45, 1, 2]);
        let bytes = &held_bytes(&e);
        assert_eq!(
            FlowEvent::parse(bytes),
            Some(FlowEvent::Held {
                peer: Ipv4Addr::new(240, 0, 0, 2),
                packet: Some(vec![0x45, 1, 2])
            })
        );
        assert_eq!(FlowEvent::parse(&bytes[..10]), None);

        e.kind = EVENT_PACKET_REFUSED;
        e.reason = DropReason::FlowTableFull as u32;
        let bytes = &held_bytes(&e);
        assert_eq!(
            FlowEvent::parse(bytes),
            Some(FlowEvent::PacketRefused {
                reason: Some(DropReason::FlowTableFull),
                packet: Some(vec![0x45, 1, 2])
            })
        );
    }

    #[test]
    fn short_or_unknown_records_are_ignored() {
        assert_eq!(FlowEvent::parse(&[1, 2, 3]), None);
        let e = Event {
            kind: 99,
            ..Default::default()
        };
        assert_eq!(FlowEvent::parse(&bytes(&e)), None);
    }
}
