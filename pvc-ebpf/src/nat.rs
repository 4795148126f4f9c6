//! Masquerading: header rewrites with incremental checksum updates.
//!
//! Checksums follow the kernel's own NAT: `l4_csum_replace` with
//! `BPF_F_PSEUDO_HDR` for addresses (valid for CHECKSUM_PARTIAL skbs from
//! veth/TSO as well as for fully checksummed ones), plain replaces for bytes
//! inside the L4 header.

use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, helpers::bpf_skb_change_tail, programs::TcContext};
use pvc_common::{DropReason, IPPROTO_TCP, Masquerade, TAG_EXID, TAG_KIND, TAG_LEN};

use crate::{
    maps::{IN_PLACE, count_traffic},
    packet::{
        ETH_HLEN, IP_CSUM_OFF, IP_OFF, IP_TOT_LEN_OFF, IPV4_MAX_HLEN, IPV4_MIN_HLEN, Ipv4, Ipv4Hdr,
        Quoted, TCP_CSUM, TCP_DOFF, TCP_MAX_HLEN, Tcp, TcpHdr, ptr_at,
    },
};

/// `l4_csum_replace`'s flags carry the size of the field that changed (the
/// low bits, BPF_F_HDR_FIELD_MASK): 2 for a 16-bit value, 4 for 32 bits; 0
/// when `to` is a precomputed difference rather than a new value.
const CSUM_FIELD_16: u64 = 2;
const CSUM_FIELD_32: u64 = 4;

/// One's-complement sum with end-around carry, as the kernel's `csum_add`.
#[inline(always)]
fn csum_add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum + carry as u32
}

/// The kernel's `csum_fold`: 32-bit partial sum to a 16-bit checksum.
#[inline(always)]
fn csum_fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// One's-complement difference between two address pairs (what
/// `bpf_csum_diff` returns), computed in place: every helper call costs a
/// call and a return, and returns are expensive on CPUs that need
/// return-stack mitigations.
#[inline(always)]
fn addrs_diff(from: &[u8; 8], to: &[u8; 8]) -> u32 {
    let word = |b: &[u8; 8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut d = csum_add(!word(from, 0), !word(from, 4));
    d = csum_add(d, word(to, 0));
    csum_add(d, word(to, 4))
}

/// The IPv4 header checksum after a change of `diff` (RFC 1624, as the
/// kernel's `csum_replace_by_diff`).
#[inline(always)]
fn ip_check_after(check: [u8; 2], diff: u32) -> [u8; 2] {
    let old = u16::from_ne_bytes(check) as u32;
    csum_fold(csum_add(diff, !old)).to_ne_bytes()
}

#[inline(always)]
fn pair(a: [u8; 4], b: [u8; 4]) -> [u8; 8] {
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

/// The IPv4 checksum and both addresses, as they sit in the header: one
/// store rewrites all three.
#[inline(always)]
fn check_and_addrs(check: [u8; 2], addrs: &[u8; 8]) -> [u8; 10] {
    [
        check[0], check[1], addrs[0], addrs[1], addrs[2], addrs[3], addrs[4], addrs[5], addrs[6],
        addrs[7],
    ]
}

/// Rewrites the IPv4 addresses (and the TCP ports when they differ) to the
/// entry's tuple. ICMP echo keeps its identifier: ICMP has no pseudo-header,
/// so only the IP checksum changes.
///
/// Two helper calls per packet: the TCP checksum goes through
/// `l4_csum_replace`, which knows how the skb's checksum is kept
/// (CHECKSUM_PARTIAL from TSO, or complete); the IP checksum, computed
/// here, is stored with the addresses. Direct packet writes would cost more:
/// the verifier would unclone every (cloned, TCP) skb first.
#[inline(always)]
pub fn masquerade(
    ctx: &TcContext,
    ip: &Ipv4,
    sport: u16,
    dport: u16,
    to: &Masquerade,
) -> Result<(), DropReason> {
    let from_addrs = pair(ip.saddr, ip.daddr);
    let to_addrs = pair(to.saddr, to.daddr);
    let err = |_| DropReason::RewriteFailed;
    let diff = (from_addrs != to_addrs).then(|| addrs_diff(&from_addrs, &to_addrs));
    let ports = (ip.proto == IPPROTO_TCP)
        .then(|| (ports_word(sport, dport), ports_word(to.sport, to.dport)));
    if let Some((from_ports, to_ports)) = ports {
        tcp_checksum(ctx, ip.l4_off, diff, from_ports, to_ports)?;
    }
    if let Some(diff) = diff {
        let check = ip_check_after(ip.check, diff);
        ctx.store(IP_CSUM_OFF, &check_and_addrs(check, &to_addrs), 0)
            .map_err(err)?;
    }
    if let Some((from_ports, to_ports)) = ports
        && from_ports != to_ports
    {
        ctx.store(ip.l4_off, &to_ports, 0).map_err(err)?;
    }
    Ok(())
}

/// Updates the TCP checksum at `l4_off` for addresses that changed by
/// `addrs_diff` (None: kept) and ports that go from `from_ports` to
/// `to_ports`, through `l4_csum_replace`, which knows how the skb keeps its
/// checksum (CHECKSUM_PARTIAL from TSO, or complete). Before the stores:
/// the helper may move the packet.
#[inline(always)]
fn tcp_checksum(
    ctx: &TcContext,
    l4_off: usize,
    addrs_diff: Option<u32>,
    from_ports: u32,
    to_ports: u32,
) -> Result<(), DropReason> {
    let err = |_| DropReason::RewriteFailed;
    if let Some(diff) = addrs_diff {
        ctx.l4_csum_replace(l4_off + TCP_CSUM, 0, diff as u64, BPF_F_PSEUDO_HDR as u64)
            .map_err(err)?;
    }
    if from_ports != to_ports {
        ctx.l4_csum_replace(
            l4_off + TCP_CSUM,
            from_ports as u64,
            to_ports as u64,
            CSUM_FIELD_32,
        )
        .map_err(err)?;
    }
    Ok(())
}

/// Marks the skb control block `masquerade_tcp` filled for
/// `pvc_masquerade`: the high half of its last word.
const IN_PLACE_MARK: u32 = 0x5056_0000;

/// Masquerades a TCP packet to `to` and counts it under `traffic`: in
/// place, by `pvc_masquerade`, which this tail-calls and which ends the
/// program's run; with helpers (`masquerade`) when that program is not
/// there (its agent went away, and the kernel emptied `IN_PLACE`).
#[inline(always)]
pub fn masquerade_tcp(
    ctx: &TcContext,
    ip: &Ipv4,
    sport: u16,
    dport: u16,
    to: &Masquerade,
    traffic: u32,
) -> Result<(), DropReason> {
    let skb = ctx.skb.skb;
    // SAFETY: the control block of this program's own skb, scratch space
    // for tc programs; the tail call ends this run when it succeeds.
    unsafe {
        (*skb).cb[0] = u32::from_ne_bytes(to.saddr);
        (*skb).cb[1] = u32::from_ne_bytes(to.daddr);
        (*skb).cb[2] = ports_word(to.sport, to.dport);
        (*skb).cb[3] = IN_PLACE_MARK | (traffic << 8) | ip.l4_off as u32;
        IN_PLACE.tail_call(ctx, 0);
    }
    masquerade(ctx, ip, sport, dport, to)?;
    count_traffic(traffic, ctx.len());
    Ok(())
}

/// `pvc_masquerade`'s work: the rewrite `masquerade_tcp` left in the
/// control block, the addresses and ports stored directly into the
/// packet, the TCP checksum through `l4_csum_replace` (which knows how the
/// skb keeps its checksum), the IP checksum computed here.
#[inline(always)]
pub fn rewrite_in_place(ctx: &TcContext) -> Result<(), DropReason> {
    let skb = ctx.skb.skb;
    // SAFETY: the control block of this program's own skb.
    let (saddr, daddr, to_ports, meta) =
        unsafe { ((*skb).cb[0], (*skb).cb[1], (*skb).cb[2], (*skb).cb[3]) };
    if meta & 0xffff_0000 != IN_PLACE_MARK {
        return Err(DropReason::RewriteFailed);
    }
    let l4_off = (meta & 0xff) as usize;
    let traffic = (meta >> 8) & 0xff;
    if !(IP_OFF + IPV4_MIN_HLEN..=IP_OFF + IPV4_MAX_HLEN).contains(&l4_off) {
        return Err(DropReason::Malformed);
    }
    let (from_addrs, check, from_ports) = {
        let ip = ptr_at::<Ipv4Hdr>(ctx, IP_OFF).ok_or(DropReason::Malformed)?;
        let tcp = ptr_at::<TcpHdr>(ctx, l4_off).ok_or(DropReason::Malformed)?;
        // SAFETY: bounds checked by `ptr_at`; read before any helper.
        unsafe {
            (
                pair((*ip).saddr, (*ip).daddr),
                (*ip).check,
                u32::from_ne_bytes([
                    (*tcp).sport[0],
                    (*tcp).sport[1],
                    (*tcp).dport[0],
                    (*tcp).dport[1],
                ]),
            )
        }
    };
    let to_addrs = pair(saddr.to_ne_bytes(), daddr.to_ne_bytes());
    let diff = addrs_diff(&from_addrs, &to_addrs);
    tcp_checksum(
        ctx,
        l4_off,
        (from_addrs != to_addrs).then_some(diff),
        from_ports,
        to_ports,
    )?;
    let ip = ptr_at::<Ipv4Hdr>(ctx, IP_OFF).ok_or(DropReason::Malformed)? as *mut Ipv4Hdr;
    let tcp = ptr_at::<TcpHdr>(ctx, l4_off).ok_or(DropReason::Malformed)? as *mut TcpHdr;
    // SAFETY: bounds checked by `ptr_at` after the last helper; the
    // verifier made the packet writable before this program ran.
    unsafe {
        if from_addrs != to_addrs {
            (*ip).check = ip_check_after(check, diff);
            (*ip).saddr = saddr.to_ne_bytes();
            (*ip).daddr = daddr.to_ne_bytes();
        }
        if from_ports != to_ports {
            let p = to_ports.to_ne_bytes();
            (*tcp).sport = [p[0], p[1]];
            (*tcp).dport = [p[2], p[3]];
        }
        // Done: no later program of the hook reads this rewrite as its own.
        (*skb).cb[3] = 0;
    }
    count_traffic(traffic, ctx.len());
    Ok(())
}

#[inline(always)]
fn ports_word(sport: u16, dport: u16) -> u32 {
    let s = sport.to_be_bytes();
    let d = dport.to_be_bytes();
    u32::from_ne_bytes([s[0], s[1], d[0], d[1]])
}

/// Appends the PVC flow tag (sender's virtual address and MAC) as the last
/// TCP option of a SYN, so that the receiver can tell this flow from a real
/// connection between the same two hosts, and knows who opened it.
///
/// Must run before `masquerade` (it works on the unrewritten header), which
/// then takes the header as it returns it.
#[inline(always)]
pub fn append_tag(
    ctx: &TcContext,
    ip: &Ipv4,
    tcp: &Tcp,
    vsrc: [u8; 4],
    vdport: u16,
    mac: [u8; 8],
) -> Result<Ipv4, DropReason> {
    let tag_len = TAG_LEN as usize;
    if tcp.hlen + tag_len > TCP_MAX_HLEN {
        return Err(DropReason::SynOptionsFull);
    }
    let tcp_len = (ip.tot_len as usize).saturating_sub(ip.ihl);
    if tcp_len != tcp.hlen {
        // A SYN with data (TCP Fast Open): dropped, the client's stack
        // retransmits a plain SYN.
        return Err(DropReason::SynWithPayload);
    }
    let new_tcp_len = tcp.hlen + tag_len;
    let new_tot_len = ip.ihl + new_tcp_len;
    let err = |_| DropReason::RewriteFailed;
    // SAFETY: grows this program's skb; every pointer into the packet is
    // taken again after it (the rest of this function uses helpers only).
    if unsafe { bpf_skb_change_tail(ctx.skb.skb as *mut _, (ETH_HLEN + new_tot_len) as u32, 0) }
        != 0
    {
        return Err(DropReason::RewriteFailed);
    }

    let csum = ip.l4_off + TCP_CSUM;
    // IP total length, and the TCP length in the pseudo-header.
    let old_tot = (ip.tot_len).to_be();
    let new_tot = (new_tot_len as u16).to_be();
    let check = ip_check_after(
        ip.check,
        csum_add(!(old_tot as u32) & 0xffff, new_tot as u32),
    );
    ctx.store(IP_TOT_LEN_OFF, &new_tot, 0).map_err(err)?;
    ctx.store(IP_CSUM_OFF, &check, 0).map_err(err)?;
    let old_len = (tcp_len as u16).to_be();
    let new_len = (new_tcp_len as u16).to_be();
    ctx.l4_csum_replace(
        csum,
        old_len as u64,
        new_len as u64,
        BPF_F_PSEUDO_HDR as u64 | CSUM_FIELD_16,
    )
    .map_err(err)?;

    // Data offset: the header grows by the tag.
    let low_bits = tcp.doff_byte & 0x0f;
    let old_word = u16::from_ne_bytes([tcp.doff_byte, tcp.flags]);
    let new_word = u16::from_ne_bytes([(((new_tcp_len / 4) as u8) << 4) | low_bits, tcp.flags]);
    ctx.store(ip.l4_off + TCP_DOFF, &new_word, 0).map_err(err)?;

    // The tag itself: added to the checksum as five new 32-bit words.
    let p = vdport.to_be_bytes();
    let tag: [u8; TAG_LEN as usize] = [
        TAG_KIND,
        TAG_LEN,
        TAG_EXID[0],
        TAG_EXID[1],
        vsrc[0],
        vsrc[1],
        vsrc[2],
        vsrc[3],
        p[0],
        p[1],
        0,
        0,
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5],
        mac[6],
        mac[7],
    ];
    // One checksum update for what changed inside the TCP header: the data
    // offset word, and the tag as new 32-bit words (not part of the
    // pseudo-header, so a CHECKSUM_PARTIAL skb leaves them to the checksum
    // offload, as it should).
    let mut diff = csum_add(!(old_word as u32) & 0xffff, new_word as u32);
    for i in 0..TAG_LEN as usize / 4 {
        let w = u32::from_ne_bytes([tag[4 * i], tag[4 * i + 1], tag[4 * i + 2], tag[4 * i + 3]]);
        diff = csum_add(diff, w);
    }
    ctx.l4_csum_replace(csum, 0, diff as u64, 0).map_err(err)?;
    ctx.store(ip.l4_off + tcp.hlen, &tag, 0).map_err(err)?;
    Ok(Ipv4 {
        tot_len: new_tot_len as u16,
        check,
        ..*ip
    })
}

/// Rewrites the packet quoted by an ICMP error (the one this host sent, as it
/// was on the wire) back to its virtual tuple, so that the kernel finds the
/// socket and applies, e.g., a path MTU update. `inner` is the quoted
/// packet's new source and destination.
///
/// The quoted IP header's checksum is updated with its addresses, which
/// leaves the one's-complement sum of that header, and so the ICMP checksum,
/// unchanged.
#[inline(always)]
pub fn masquerade_quoted(
    ctx: &TcContext,
    q: &Quoted,
    inner_saddr: [u8; 4],
    inner_daddr: [u8; 4],
) -> Result<(), DropReason> {
    let from = pair(q.saddr, q.daddr);
    let to = pair(inner_saddr, inner_daddr);
    let check = ip_check_after(q.check, addrs_diff(&from, &to));
    ctx.store(q.ip_off + 10, &check_and_addrs(check, &to), 0)
        .map_err(|_| DropReason::RewriteFailed)?;
    Ok(())
}
