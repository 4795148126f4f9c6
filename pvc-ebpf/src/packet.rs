//! Header parsing for tc programs. Reads use direct packet access; every write
//! goes through helpers (`bpf_skb_store_bytes`, `l3/l4_csum_replace`) so that
//! the verifier does not add its unclone prologue to every packet of the host.

use core::mem::size_of;

use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: [u8; 2] = [0x08, 0x00];
pub const ETH_P_ARP: [u8; 2] = [0x08, 0x06];
pub const ARP_REQUEST: u16 = 1;
/// Offset of the sender protocol address in an Ethernet/IPv4 ARP frame.
pub const ARP_SENDER_IP_OFF: usize = ETH_HLEN + 14;
pub const IP_OFF: usize = ETH_HLEN;
/// An IPv4 header without options.
pub const IPV4_MIN_HLEN: usize = 20;
/// `ver_ihl` of an IPv4 header without options.
pub const IPV4_VER_IHL_PLAIN: u8 = 0x45;
/// The fragment offset and "more fragments" bits of `frag_off`.
pub const IP_FRAGMENT_MASK: u16 = 0x3fff;
/// A TCP header without options.
pub const TCP_MIN_HLEN: usize = 20;
/// The largest TCP header (data offset 15 words).
pub const TCP_MAX_HLEN: usize = 60;
/// The largest IPv4 header (IHL 15 words).
pub const IPV4_MAX_HLEN: usize = 60;
pub const IP_TOT_LEN_OFF: usize = IP_OFF + 2;
pub const IP_CSUM_OFF: usize = IP_OFF + 10;

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
/// Offset of the checksum in the TCP header.
pub const TCP_CSUM: usize = 16;
/// Offset of the data-offset byte in the TCP header.
pub const TCP_DOFF: usize = 12;

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_HLEN: usize = 8;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub ver_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

#[repr(C)]
pub struct TcpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub doff: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg: [u8; 2],
}

#[repr(C)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: [u8; 2],
    /// Echo identifier (echo request/reply), unused for errors.
    pub id: [u8; 2],
    pub seq: [u8; 2],
}

/// Ethernet/IPv4 ARP (RFC 826).
#[repr(C)]
pub struct ArpHdr {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub op: [u8; 2],
    pub sender_mac: [u8; 6],
    pub sender_ip: [u8; 4],
    pub target_mac: [u8; 6],
    pub target_ip: [u8; 4],
}

pub struct Arp {
    pub op: u16,
    pub sender_ip: [u8; 4],
}

#[inline(always)]
pub fn parse_arp(ctx: &TcContext) -> Option<Arp> {
    // SAFETY (every `&*ptr_at` below): `ptr_at` checked that the header
    // lies within [data, data_end), and headers are read before any helper
    // could move the packet.
    let eth = unsafe { &*ptr_at::<EthHdr>(ctx, 0)? };
    if eth.proto != ETH_P_ARP {
        return None;
    }
    // SAFETY: bounds checked by `ptr_at`.
    let arp = unsafe { &*ptr_at::<ArpHdr>(ctx, ETH_HLEN)? };
    if arp.ptype != ETH_P_IP || arp.plen != 4 || arp.hlen != 6 {
        return None;
    }
    Some(Arp {
        op: u16::from_be_bytes(arp.op),
        sender_ip: arp.sender_ip,
    })
}

/// Bytes of headers the programs need linear: Ethernet, a full IPv4 header,
/// and an ICMP error's inner IPv4 header and first L4 bytes (the largest case).
const MAX_HEADERS: u32 = (ETH_HLEN + IPV4_MAX_HLEN + ICMP_HLEN + IPV4_MAX_HLEN + 8) as u32;

#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// An Ethernet frame's IPv4 header without options and the TCP header
/// after it, as they sit in the packet.
#[repr(C)]
pub struct PlainTcpFrame {
    pub eth: EthHdr,
    pub ip: Ipv4Hdr,
    pub tcp: TcpHdr,
}

/// The headers of a TCP segment between two real addresses (not a
/// fragment, no IP options, headers in the linear part), read in one
/// bounds check: what most packets on the uplink are, flows carried at the
/// socket among them. None for anything else, which the full parse sees.
#[inline(always)]
pub fn plain_real_tcp(ctx: &TcContext) -> Option<&PlainTcpFrame> {
    // SAFETY: bounds checked by `ptr_at`; read before any helper.
    let f = unsafe { &*ptr_at::<PlainTcpFrame>(ctx, 0)? };
    let plain = f.eth.proto == ETH_P_IP
        && f.ip.ver_ihl == IPV4_VER_IHL_PLAIN
        && f.ip.proto == pvc_common::IPPROTO_TCP
        && u16::from_be_bytes(f.ip.frag_off) & IP_FRAGMENT_MASK == 0
        && !pvc_common::is_virtual(f.ip.saddr)
        && !pvc_common::is_virtual(f.ip.daddr);
    plain.then_some(f)
}

/// What the programs need to know of an IPv4 packet.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub proto: u8,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    pub ihl: usize,
    pub tot_len: u16,
    /// The header checksum, as it is on the wire.
    pub check: [u8; 2],
    /// A fragment (MF set or a non-zero offset): no L4 header to key on.
    pub fragment: bool,
}

pub enum Parsed {
    /// Not IPv4: the programs let it pass.
    NotIpv4,
    /// IPv4 whose header cannot be read.
    Malformed,
    Ipv4(Ipv4),
}

#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::NotIpv4;
    };
    // SAFETY: bounds checked by `ptr_at`.
    if unsafe { (*eth).proto } != ETH_P_IP {
        return Parsed::NotIpv4;
    }
    let ip = match ptr_at::<Ipv4Hdr>(ctx, IP_OFF) {
        Some(ip) => ip,
        None => {
            // Headers may sit in paged data (GRO'd or fragmented skbs): make
            // the first bytes linear, once, and look again.
            let want = core::cmp::min(ctx.len(), MAX_HEADERS);
            if ctx.pull_data(want).is_err() {
                return Parsed::Malformed;
            }
            match ptr_at::<Ipv4Hdr>(ctx, IP_OFF) {
                Some(ip) => ip,
                None => return Parsed::Malformed,
            }
        }
    };
    // SAFETY: bounds checked by `ptr_at` after the last pull.
    let ip = unsafe { &*ip };
    let ihl = ((ip.ver_ihl & 0x0f) as usize) * 4;
    if ip.ver_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Parsed::Malformed;
    }
    let frag = u16::from_be_bytes(ip.frag_off);
    Parsed::Ipv4(Ipv4 {
        saddr: ip.saddr,
        daddr: ip.daddr,
        proto: ip.proto,
        l4_off: IP_OFF + ihl,
        ihl,
        tot_len: u16::from_be_bytes(ip.tot_len),
        check: ip.check,
        fragment: frag & IP_FRAGMENT_MASK != 0,
    })
}

/// What the programs need of a TCP header.
#[derive(Clone, Copy)]
pub struct Tcp {
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub seq: [u8; 4],
    /// The byte holding the data offset (and the reserved/AE bits, kept as they are).
    pub doff_byte: u8,
    /// Header length in bytes, options included.
    pub hlen: usize,
}

impl Tcp {
    /// A connection request: SYN without ACK.
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// A server's answer to a connection request.
    #[inline(always)]
    pub fn is_syn_ack(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK
    }
}

#[inline(always)]
pub fn parse_tcp(ctx: &TcContext, ip: &Ipv4) -> Option<Tcp> {
    let off = ip.l4_off;
    if off > IP_OFF + IPV4_MAX_HLEN {
        return None;
    }
    let tcp = ptr_at::<TcpHdr>(ctx, off).or_else(|| {
        let want = core::cmp::min(ctx.len(), MAX_HEADERS);
        ctx.pull_data(want).ok()?;
        ptr_at::<TcpHdr>(ctx, off)
    })?;
    // SAFETY: bounds checked by `ptr_at` after the last pull.
    let tcp = unsafe { &*tcp };
    let hlen = ((tcp.doff >> 4) as usize) * 4;
    if hlen < TCP_MIN_HLEN {
        return None;
    }
    Some(Tcp {
        sport: u16::from_be_bytes(tcp.sport),
        dport: u16::from_be_bytes(tcp.dport),
        flags: tcp.flags,
        seq: tcp.seq,
        doff_byte: tcp.doff,
        hlen,
    })
}

#[derive(Clone, Copy)]
pub struct Icmp {
    pub kind: u8,
    pub id: u16,
}

#[inline(always)]
pub fn parse_icmp(ctx: &TcContext, ip: &Ipv4) -> Option<Icmp> {
    let off = ip.l4_off;
    if off > IP_OFF + IPV4_MAX_HLEN {
        return None;
    }
    // SAFETY: bounds checked by `ptr_at`.
    let icmp = unsafe { &*ptr_at::<IcmpHdr>(ctx, off)? };
    Some(Icmp {
        kind: icmp.kind,
        id: u16::from_be_bytes(icmp.id),
    })
}

/// The packet an ICMP error quotes: its IPv4 header (without options) and
/// its first 8 L4 bytes, which hold the ports.
#[derive(Clone, Copy)]
pub struct Quoted {
    /// Offset of the quoted IPv4 header from the start of the frame.
    pub ip_off: usize,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub proto: u8,
    pub check: [u8; 2],
    pub sport: u16,
    pub dport: u16,
}

#[inline(always)]
pub fn parse_quoted(ctx: &TcContext, ip: &Ipv4) -> Option<Quoted> {
    let off = ip.l4_off + ICMP_HLEN;
    if off > IP_OFF + IPV4_MAX_HLEN + ICMP_HLEN {
        return None;
    }
    // SAFETY: bounds checked by `ptr_at`.
    let inner = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, off)? };
    if inner.ver_ihl != IPV4_VER_IHL_PLAIN {
        // Quoted headers with IP options are not masqueraded: rare, and the
        // kernel then simply finds no socket for the error.
        return None;
    }
    // SAFETY: bounds checked by `ptr_at`.
    let ports = unsafe { &*ptr_at::<[u8; 4]>(ctx, off + IPV4_MIN_HLEN)? };
    Some(Quoted {
        ip_off: off,
        saddr: inner.saddr,
        daddr: inner.daddr,
        proto: inner.proto,
        check: inner.check,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
    })
}

/// The PVC flow tag egress appends as the last TCP option of a SYN.
pub struct Tag {
    /// The sender's virtual address.
    pub vsrc: [u8; 4],
    /// The flow's virtual destination port.
    pub vdport: u16,
    /// `TAG_*` bits.
    pub flags: u8,
    pub mac: [u8; 8],
}

/// Reads the PVC flow tag at the end of a SYN's options, if it is there.
#[inline(always)]
pub fn read_tag(ctx: &TcContext, ip: &Ipv4, tcp: &Tcp) -> Option<Tag> {
    use pvc_common::{TAG_EXID, TAG_KIND, TAG_LEN};
    if tcp.hlen < TCP_MIN_HLEN + TAG_LEN as usize
        || tcp.hlen > TCP_MAX_HLEN
        || ip.l4_off > IP_OFF + IPV4_MAX_HLEN
    {
        return None;
    }
    let off = ip.l4_off + tcp.hlen - TAG_LEN as usize;
    // Only SYNs get here: a helper copy is cheap enough, and keeps the
    // verifier from seeing a variable offset counted backwards.
    let t: [u8; TAG_LEN as usize] = ctx.load(off).ok()?;
    if t[0] != TAG_KIND || t[1] != TAG_LEN || t[2] != TAG_EXID[0] || t[3] != TAG_EXID[1] {
        return None;
    }
    Some(Tag {
        vsrc: [t[4], t[5], t[6], t[7]],
        vdport: u16::from_be_bytes([t[8], t[9]]),
        flags: t[10],
        mac: [t[12], t[13], t[14], t[15], t[16], t[17], t[18], t[19]],
    })
}
