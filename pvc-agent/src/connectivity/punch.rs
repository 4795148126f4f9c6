//! TCP hole punching (paper §4.4.2), per flow: the member is behind a NAT
//! that keeps ports, or a stateful firewall, so nothing unasked reaches it.
//! Our SYN is held; a broker carries a copy to the member's agent, which
//! injects it into its own stack and catches the SYN/ACK its stack answers
//! (tc holds it). It sends that answer's sequence number out as a SYN, from
//! the flow's port to our public endpoint ("the punch"): its NAT or
//! firewall now expects us. Then our SYN goes; its NAT takes it for the
//! other half of a simultaneous open, its stack answers again, with the same
//! sequence number its NAT already saw, and the connection completes. Our
//! kernel never lets a punch SYN reach a socket; it tells our agent where it
//! came from (a symmetric NAT's port, for `reversal`).
//!
//! It needs our public port to be predictable (the member's punch goes to
//! it): we have no NAT, or one that keeps ports.

use std::net::{Ipv4Addr, SocketAddrV4};

use pvc_common::{TAG_EXID, TAG_KIND, TAG_LEN, TAG_PUNCH, Technique, siphash24_16, tag_message};
use pvc_proto::{Inbound, Nat};

use super::{Pair, Path};

pub fn path(pair: &Pair<'_>) -> Option<Path> {
    if pair.peer.inbound != Inbound::Filtered
        || !matches!(pair.peer.nat, Nat::None | Nat::Preserving)
        || !pair.our_ports_kept()
    {
        return None;
    }
    Some(Path {
        real: pair.peer_public()?,
        local: pair.public_local(),
        technique: Technique::Punch,
        port: 0,
    })
}

/// What the punch SYN says about the flow it opens.
pub struct Punch {
    /// From the flow's port on this host's uplink...
    pub from: SocketAddrV4,
    /// ...to the client's public endpoint.
    pub to: SocketAddrV4,
    /// Our virtual address, the client's, and the client's port of the flow.
    pub vsrc: Ipv4Addr,
    pub vdst: Ipv4Addr,
    pub vport: u16,
    /// The pair's SYN-tag key.
    pub tag_key: [u8; 16],
}

const TCP_SYN: u8 = 0x02;

/// The punch SYN for `answer`, the SYN/ACK this host's stack sent (as tc
/// held it): its sequence number, window and TCP options (so that the NATs
/// on the way track the connection as the stack will run it), the PVC tag
/// marked as a punch, addressed as `p` says. `None` if `answer` is not a
/// SYN/ACK or has no room for the tag.
pub fn syn(answer: &[u8], p: &Punch) -> Option<Vec<u8>> {
    let ihl = (*answer.first()? & 0x0f) as usize * 4;
    if answer[0] >> 4 != 4 || ihl < 20 || answer.len() < ihl + 20 || answer[9] != 6 {
        return None;
    }
    let tcp = &answer[ihl..];
    let hlen = (tcp[12] >> 4) as usize * 4;
    if tcp[13] & 0x12 != 0x12 || hlen < 20 || tcp.len() < hlen {
        return None;
    }
    // The answer's options, minus a PVC tag if it had one.
    let mut options: Vec<u8> = tcp[20..hlen].to_vec();
    if let Some(i) = find_option(&options, TAG_KIND) {
        options.truncate(i);
    }
    while !options.len().is_multiple_of(4) {
        options.push(1); // NOP
    }
    if 20 + options.len() + TAG_LEN as usize > 60 {
        return None;
    }
    let seq = [tcp[4], tcp[5], tcp[6], tcp[7]];
    let mac = siphash24_16(
        &p.tag_key,
        &tag_message(p.vsrc.octets(), p.vdst.octets(), p.vport, TAG_PUNCH, seq),
    )
    .to_le_bytes();
    let v = p.vsrc.octets();
    let port = p.vport.to_be_bytes();
    options.extend_from_slice(&[
        TAG_KIND,
        TAG_LEN,
        TAG_EXID[0],
        TAG_EXID[1],
        v[0],
        v[1],
        v[2],
        v[3],
        port[0],
        port[1],
        TAG_PUNCH,
        0,
    ]);
    options.extend_from_slice(&mac);
    let tcp_len = 20 + options.len();
    let mut out = vec![0u8; 20 + tcp_len];
    out[0] = 0x45;
    let total = out.len() as u16;
    out[2..4].copy_from_slice(&total.to_be_bytes());
    out[6] = 0x40; // DF
    out[8] = 64;
    out[9] = 6;
    out[12..16].copy_from_slice(&p.from.ip().octets());
    out[16..20].copy_from_slice(&p.to.ip().octets());
    let t = &mut out[20..];
    t[0..2].copy_from_slice(&p.from.port().to_be_bytes());
    t[2..4].copy_from_slice(&p.to.port().to_be_bytes());
    t[4..8].copy_from_slice(&seq);
    t[12] = ((tcp_len / 4) as u8) << 4;
    t[13] = TCP_SYN;
    t[14..16].copy_from_slice(&tcp[14..16]); // window
    t[20..].copy_from_slice(&options);
    let csum = crate::interposition::inject::tcp_checksum(*p.from.ip(), *p.to.ip(), &out[20..]);
    out[36..38].copy_from_slice(&csum.to_be_bytes());
    Some(out)
}

/// Offset of the first option of `kind` in a TCP option list.
fn find_option(options: &[u8], kind: u8) -> Option<usize> {
    let mut i = 0;
    while i < options.len() {
        match options[i] {
            0 => return None,
            1 => i += 1,
            k => {
                if k == kind {
                    return Some(i);
                }
                let len = *options.get(i + 1)? as usize;
                if len < 2 {
                    return None;
                }
                i += len;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_punch_syn_keeps_the_answers_sequence_and_options_and_carries_a_verifiable_tag() {
        let mut answer = Vec::new();
        etherparse::PacketBuilder::ipv4([240, 0, 0, 2], [240, 0, 0, 1], 64)
            .tcp(8080, 40000, 0x0a0b0c0d, 64240)
            .syn()
            .ack(0x01020305)
            .options(&[
                etherparse::TcpOptionElement::MaximumSegmentSize(1460),
                etherparse::TcpOptionElement::WindowScale(7),
            ])
            .unwrap()
            .write(&mut answer, &[])
            .unwrap();
        let p = Punch {
            from: "198.18.10.2:8080".parse().unwrap(),
            to: "198.19.20.2:40000".parse().unwrap(),
            vsrc: Ipv4Addr::new(240, 0, 0, 2),
            vdst: Ipv4Addr::new(240, 0, 0, 1),
            vport: 40000,
            tag_key: [9; 16],
        };
        let out = syn(&answer, &p).unwrap();
        let back = etherparse::SlicedPacket::from_ip(&out).unwrap();
        let Some(etherparse::TransportSlice::Tcp(t)) = back.transport else {
            panic!("not TCP")
        };
        assert!(t.syn() && !t.ack());
        assert_eq!(t.sequence_number(), 0x0a0b0c0d);
        assert_eq!((t.source_port(), t.destination_port()), (8080, 40000));
        let opts = t.options();
        assert!(opts.starts_with(&[2, 4, 0x05, 0xb4]), "MSS kept: {opts:?}");
        let tag = &opts[opts.len() - TAG_LEN as usize..];
        assert_eq!(&tag[..4], &[TAG_KIND, TAG_LEN, b'P', b'V']);
        assert_eq!(&tag[4..8], &[240, 0, 0, 2]);
        assert_eq!(u16::from_be_bytes([tag[8], tag[9]]), 40000);
        assert_eq!(tag[10], TAG_PUNCH);
        let mac = siphash24_16(
            &[9; 16],
            &tag_message(
                [240, 0, 0, 2],
                [240, 0, 0, 1],
                40000,
                TAG_PUNCH,
                [10, 11, 12, 13],
            ),
        )
        .to_le_bytes();
        assert_eq!(&tag[12..], &mac);
        let csum = crate::interposition::inject::tcp_checksum(
            Ipv4Addr::new(198, 18, 10, 2),
            Ipv4Addr::new(198, 19, 20, 2),
            &out[20..],
        );
        assert_eq!(u16::from_be_bytes([out[36], out[37]]), csum);
        // Not a SYN/ACK: no punch.
        let mut plain = answer.clone();
        plain[20 + 13] = 0x02;
        assert!(syn(&plain, &p).is_none());
    }
}
