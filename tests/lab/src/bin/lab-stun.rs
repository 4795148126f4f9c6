//! `lab-stun`: a minimal STUN server (RFC 5389 Binding over UDP) for the
//! test lab's simulated Internet. miniupnpd on a lab NAT box learns its
//! external address with it (its WAN address is in a range miniupnpd
//! treats as reserved, so it needs STUN to agree to forward ports).
//! CHANGE-REQUEST is ignored: every answer comes from the one address.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddrV4,
}

const BINDING_REQUEST: [u8; 2] = [0x00, 0x01];
const BINDING_RESPONSE: u16 = 0x0101;
const MAGIC_COOKIE: u32 = 0x2112_a442;
const XOR_MAPPED_ADDRESS: u16 = 0x0020;
const FAMILY_IPV4: u8 = 0x01;
const HEADER: usize = 20;

/// The answer to a Binding request from `from`, if `request` is one.
fn answer(request: &[u8], from: SocketAddrV4) -> Option<Vec<u8>> {
    if request.len() < HEADER
        || request[0..2] != BINDING_REQUEST
        || request[4..8] != MAGIC_COOKIE.to_be_bytes()
    {
        return None;
    }
    let mut out = Vec::with_capacity(HEADER + 12);
    out.extend_from_slice(&BINDING_RESPONSE.to_be_bytes());
    out.extend_from_slice(&12u16.to_be_bytes());
    // Magic cookie and transaction id, as asked.
    out.extend_from_slice(&request[4..HEADER]);
    out.extend_from_slice(&XOR_MAPPED_ADDRESS.to_be_bytes());
    out.extend_from_slice(&8u16.to_be_bytes());
    out.push(0);
    out.push(FAMILY_IPV4);
    out.extend_from_slice(&(from.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    out.extend_from_slice(&(u32::from(*from.ip()) ^ MAGIC_COOKIE).to_be_bytes());
    Some(out)
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let socket = UdpSocket::bind(args.listen)?;
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        let SocketAddr::V4(from) = from else { continue };
        if let Some(reply) = answer(&buf[..n], from) {
            socket.send_to(&reply, from)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_request_gets_the_xor_mapped_address() {
        let mut req = vec![0x00, 0x01, 0, 0];
        req.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        req.extend_from_slice(&[7; 12]);
        let from: SocketAddrV4 = "198.19.20.2:5000".parse().unwrap();
        let r = answer(&req, from).unwrap();
        assert_eq!(&r[0..2], &[0x01, 0x01]);
        assert_eq!(&r[8..20], &[7; 12]);
        let port = u16::from_be_bytes([r[26], r[27]]) ^ 0x2112;
        let ip = u32::from_be_bytes([r[28], r[29], r[30], r[31]]) ^ MAGIC_COOKIE;
        assert_eq!(SocketAddrV4::new(ip.into(), port), from);
        assert_eq!(answer(&[1, 2, 3], from), None);
    }
}
