//! Putting held packets back into the stack (raw IPv4 socket): once the
//! path to a member is authenticated the agent re-sends the very SYN the
//! application's connect() emitted (or the ping), so the connection
//! completes without waiting for TCP's retransmit timer; when the path
//! cannot be made, a RST "from the peer" makes that connect() fail at once.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub struct Injector {
    socket: Socket,
}

/// The fields of a held SYN the injector needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Syn {
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
}

impl Syn {
    /// Parses a held packet: an IPv4 header, then a TCP SYN.
    pub fn parse(packet: &[u8]) -> Option<Self> {
        let ihl = (*packet.first()? & 0x0f) as usize * 4;
        if packet[0] >> 4 != 4 || ihl < 20 || packet.len() < ihl + 20 || packet[9] != 6 {
            return None;
        }
        let tcp = &packet[ihl..];
        if tcp[13] & 0x12 != 0x02 {
            return None;
        }
        Some(Self {
            saddr: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
            daddr: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
            sport: u16::from_be_bytes([tcp[0], tcp[1]]),
            dport: u16::from_be_bytes([tcp[2], tcp[3]]),
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        })
    }
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

/// The TCP checksum of `segment` (its checksum field counted as zero).
pub fn tcp_checksum(saddr: Ipv4Addr, daddr: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut s = sum16(&saddr.octets()) + sum16(&daddr.octets()) + 6 + segment.len() as u32;
    s += sum16(segment) - u16::from_be_bytes([segment[16], segment[17]]) as u32;
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// A held SYN ready to go out again: the stack offloaded its checksum (the
/// captured one is only the pseudo-header's), so it is computed here.
pub fn complete_syn(packet: &[u8]) -> Option<Vec<u8>> {
    let syn = Syn::parse(packet)?;
    let ihl = (packet[0] & 0x0f) as usize * 4;
    let tot = (u16::from_be_bytes([packet[2], packet[3]]) as usize).min(packet.len());
    if tot < ihl + 20 {
        // A total length that cuts the TCP header (a member's traversal
        // request carries the SYN as its agent wrote it).
        return None;
    }
    let mut out = packet[..tot].to_vec();
    let csum = tcp_checksum(syn.saddr, syn.daddr, &out[ihl..]);
    out[ihl + 16..ihl + 18].copy_from_slice(&csum.to_be_bytes());
    Some(out)
}

const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A bare RST (with `ack`, a RST|ACK) from `from` to `to`.
fn reset(from: (Ipv4Addr, u16), to: (Ipv4Addr, u16), seq: u32, ack: Option<u32>) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&from.0.octets());
    p[16..20].copy_from_slice(&to.0.octets());
    let t = &mut p[20..];
    t[0..2].copy_from_slice(&from.1.to_be_bytes());
    t[2..4].copy_from_slice(&to.1.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.unwrap_or(0).to_be_bytes());
    t[12] = 5 << 4;
    t[13] = TCP_RST | if ack.is_some() { TCP_ACK } else { 0 };
    let csum = tcp_checksum(from.0, to.0, &p[20..]);
    p[36..38].copy_from_slice(&csum.to_be_bytes());
    p
}

/// A RST|ACK from the SYN's destination to its source, answering it.
pub fn refusal(syn: &Syn) -> Vec<u8> {
    reset(
        (syn.daddr, syn.dport),
        (syn.saddr, syn.sport),
        0,
        Some(syn.seq.wrapping_add(1)),
    )
}

/// A server's SYN/ACK, as the stack sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynAck {
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
}

impl SynAck {
    pub fn parse(packet: &[u8]) -> Option<Self> {
        let ihl = (*packet.first()? & 0x0f) as usize * 4;
        if packet[0] >> 4 != 4 || ihl < 20 || packet.len() < ihl + 20 || packet[9] != 6 {
            return None;
        }
        let tcp = &packet[ihl..];
        if tcp[13] & 0x12 != 0x12 {
            return None;
        }
        let word = |i: usize| u32::from_be_bytes([tcp[i], tcp[i + 1], tcp[i + 2], tcp[i + 3]]);
        Some(Self {
            saddr: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
            daddr: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
            sport: u16::from_be_bytes([tcp[0], tcp[1]]),
            dport: u16::from_be_bytes([tcp[2], tcp[3]]),
            seq: word(4),
            ack: word(8),
        })
    }

    /// Resets that undo the handshake on both ends: to the server, as if
    /// from the client (its half-open connection goes), and to the client,
    /// as if from the server (its connect() fails with ECONNREFUSED).
    pub fn resets(&self) -> [Vec<u8>; 2] {
        let (server, client) = ((self.saddr, self.sport), (self.daddr, self.dport));
        [
            reset(client, server, self.ack, None),
            reset(server, client, self.seq.wrapping_add(1), Some(self.ack)),
        ]
    }
}

impl Injector {
    pub fn new() -> io::Result<Self> {
        // IPPROTO_RAW: the packets carry their own IPv4 header.
        let socket = Socket::new(
            Domain::IPV4,
            Type::RAW,
            Some(Protocol::from(libc::IPPROTO_RAW)),
        )?;
        // tc knows the agent's packets by their mark: a re-sent SYN passed
        // its checks when the application sent it.
        socket.set_mark(pvc_common::AGENT_MARK)?;
        Ok(Self { socket })
    }

    fn send(&self, packet: &[u8], to: Ipv4Addr) -> io::Result<()> {
        self.socket
            .send_to(packet, &SockAddr::from(SocketAddrV4::new(to, 0)))?;
        Ok(())
    }

    /// Re-sends a held SYN, its checksum computed whole: one to a virtual
    /// address is masqueraded and tagged by tc egress; one to a member's
    /// public address (translated at the socket, tagged) or to this host
    /// (a member's SYN injected into our stack) goes as it is.
    pub fn resend(&self, packet: &[u8]) -> io::Result<()> {
        let complete =
            complete_syn(packet).ok_or_else(|| io::Error::other("not a held TCP SYN"))?;
        let syn = Syn::parse(&complete).expect("parsed above");
        self.send(&complete, syn.daddr)
    }

    /// Puts a packet this agent made (a punch SYN) on its way, as it is.
    pub fn send_packet(&self, packet: &[u8]) -> io::Result<()> {
        if packet.len() < 20 {
            return Err(io::Error::other("not an IPv4 packet"));
        }
        let to = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
        self.send(packet, to)
    }

    /// Makes the connect() behind a held SYN fail with ECONNREFUSED; for a
    /// SYN/ACK tc refused, resets both ends of the handshake.
    pub fn refuse(&self, packet: &[u8]) -> io::Result<()> {
        if let Some(syn) = Syn::parse(packet) {
            return self.send(&refusal(&syn), syn.saddr);
        }
        let answer =
            SynAck::parse(packet).ok_or_else(|| io::Error::other("not a TCP SYN or SYN/ACK"))?;
        let [to_server, to_client] = answer.resets();
        self.send(&to_server, answer.saddr)?;
        self.send(&to_client, answer.daddr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn() -> Vec<u8> {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4([240, 0, 0, 1], [240, 0, 0, 2], 64)
            .tcp(40000, 22, 0x01020304, 64240)
            .syn()
            .write(&mut p, &[])
            .unwrap();
        p
    }

    fn valid(p: &[u8]) -> bool {
        let ihl = (p[0] & 0x0f) as usize * 4;
        let s = Syn::parse(p).map(|s| (s.saddr, s.daddr)).unwrap_or((
            Ipv4Addr::new(p[12], p[13], p[14], p[15]),
            Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        ));
        let seg = &p[ihl..];
        u16::from_be_bytes([seg[16], seg[17]]) == tcp_checksum(s.0, s.1, seg)
    }

    #[test]
    fn a_held_syn_gets_its_full_checksum_back() {
        let mut held = syn();
        // What the stack hands tc with offload on: a partial checksum.
        held[20 + 16] = 0x12;
        held[20 + 17] = 0x34;
        let out = complete_syn(&held).unwrap();
        assert!(valid(&out));
        assert_eq!(out, syn(), "the original SYN, byte for byte");
    }

    #[test]
    fn a_refusal_answers_the_syn() {
        let s = Syn::parse(&syn()).unwrap();
        assert_eq!(
            s,
            Syn {
                saddr: Ipv4Addr::new(240, 0, 0, 1),
                daddr: Ipv4Addr::new(240, 0, 0, 2),
                sport: 40000,
                dport: 22,
                seq: 0x01020304
            }
        );
        let rst = refusal(&s);
        let back = etherparse::SlicedPacket::from_ip(&rst).unwrap();
        match back.transport {
            Some(etherparse::TransportSlice::Tcp(t)) => {
                assert!(t.rst() && t.ack());
                assert_eq!((t.source_port(), t.destination_port()), (22, 40000));
                assert_eq!(t.acknowledgment_number(), 0x01020305);
            }
            other => panic!("{other:?}"),
        }
        let ihl = 20;
        assert_eq!(
            u16::from_be_bytes([rst[ihl + 16], rst[ihl + 17]]),
            tcp_checksum(s.daddr, s.saddr, &rst[ihl..])
        );
        assert_eq!(Syn::parse(&rst), None, "a RST is not a SYN");
    }

    #[test]
    fn a_refused_answer_resets_both_ends() {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4([240, 0, 0, 2], [240, 0, 0, 1], 64)
            .tcp(22, 40000, 0x0a0b0c0d, 64240)
            .syn()
            .ack(0x01020305)
            .write(&mut p, &[])
            .unwrap();
        let answer = SynAck::parse(&p).unwrap();
        assert_eq!(Syn::parse(&p), None, "a SYN/ACK is not a SYN");
        let [to_server, to_client] = answer.resets();
        for (rst, from, to, seq, ack) in [
            (&to_server, 40000, 22, 0x01020305, None),
            (&to_client, 22, 40000, 0x0a0b0c0e, Some(0x01020305)),
        ] {
            let back = etherparse::SlicedPacket::from_ip(rst).unwrap();
            let Some(etherparse::TransportSlice::Tcp(t)) = back.transport else {
                panic!("not TCP")
            };
            assert!(t.rst());
            assert_eq!(t.ack(), ack.is_some());
            assert_eq!((t.source_port(), t.destination_port()), (from, to));
            assert_eq!(t.sequence_number(), seq);
            if let Some(ack) = ack {
                assert_eq!(t.acknowledgment_number(), ack);
            }
            assert!(valid(rst), "checksum");
        }
    }
}
