//! Header rewriting, packet by packet: crafted frames go through the real tc
//! programs with BPF_PROG_TEST_RUN, and every checksum of what comes out is
//! recomputed from scratch. These load eBPF programs: run as root.

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, ProgramArray},
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use etherparse::{PacketBuilder, TcpOptionElement};
use pvc_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, DropReason, FlowKey, IPPROTO_TCP, Masquerade,
    MasqueradingPorts, PATH_SOCKET, PEER_MEMBER, POLICY_INBOUND, POLICY_OUTBOUND, PeerPath,
    Technique, siphash24_16, tag_message,
};

use super::{
    EGRESS, INGRESS, MASQUERADE, OBJECT,
    events::{EventStream, FlowEvent},
    maps::Maps,
};
use crate::security::policy::{Compiled, PolicyEntry};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

// This host is A; B is a member on the LAN.
const A_V: [u8; 4] = [240, 0, 0, 1];
const A_R: [u8; 4] = [198, 18, 0, 1];
const B_V: [u8; 4] = [240, 0, 0, 2];
const B_R: [u8; 4] = [198, 18, 0, 2];
const C_V: [u8; 4] = [240, 0, 0, 3];

struct Host {
    ebpf: Ebpf,
    maps: Maps,
    events: EventStream,
    /// Holds the tail call's array (with `pvc_masquerade`, as the agent
    /// has it, or empty, as when the agent is gone) while the host lives.
    _in_place: ProgramArray<MapData>,
}

/// Where a tc program leaves the control block of its skb: `__sk_buff`'s
/// `cb[3]`, the last word `masquerade_tcp` fills for `pvc_masquerade`,
/// which clears it once it has rewritten the packet.
const CB3: std::ops::Range<usize> = 60..64;

/// The tag key the exchange between A and B would have given them.
const KEY: [u8; 16] = *b"sixteen byte key";

fn ready(real: [u8; 4]) -> PeerPath {
    PeerPath::ready(real, Technique::Direct as u8, 0, 0, KEY)
}

fn require_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests load eBPF programs into the kernel: run them as root"
    );
}

impl Host {
    fn new() -> Self {
        Self::with_in_place(true)
    }

    /// `in_place`: whether `pvc_masquerade` is in its array (the agent
    /// puts it there), or the programs rewrite with helpers.
    fn with_in_place(in_place: bool) -> Self {
        require_root();
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .expect("the eBPF object loads (root, BTF, Linux >= 6.6)");
        for name in [MASQUERADE, EGRESS, INGRESS] {
            let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load().expect("the verifier accepts the tc program");
        }
        let mut array: ProgramArray<MapData> = ebpf
            .take_map(pvc_common::maps::IN_PLACE)
            .unwrap()
            .try_into()
            .unwrap();
        if in_place {
            let p: &SchedClassifier = ebpf.program(MASQUERADE).unwrap().try_into().unwrap();
            array.set(0, p.fd().unwrap(), 0).unwrap();
        }
        let (mut maps, events) = Maps::take(&mut ebpf, 2 * 65536, Default::default()).unwrap();
        maps.set_identity(A_V.into(), A_R.into(), &Compiled::default())
            .unwrap();
        maps.set_peer(B_V.into(), ready(B_R)).unwrap();
        Self {
            ebpf,
            maps,
            events,
            _in_place: array,
        }
    }

    /// Runs a program on a frame; returns its verdict and the frame after it.
    fn run(&self, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        let (verdict, out, _) = self.run_with_cb(program, frame);
        (verdict, out)
    }

    /// `run`, and the skb's `cb[3]` after it.
    fn run_with_cb(&self, program: &str, frame: &[u8]) -> (u32, Vec<u8>, u32) {
        let p: &SchedClassifier = self.ebpf.program(program).unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 64];
        // `struct __sk_buff`, and room to spare.
        let mut ctx = vec![0u8; 256];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_out: Some(&mut ctx),
                repeat: 1,
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        let cb3 = u32::from_ne_bytes(ctx[CB3].try_into().unwrap());
        (r.return_value, out, cb3)
    }

    fn drops(&self, reason: DropReason) -> u64 {
        self.maps
            .drops()
            .into_iter()
            .find(|(r, _)| *r == reason)
            .unwrap()
            .1
    }

    fn entry(&self, key: &FlowKey) -> Option<Masquerade> {
        self.maps.masquerading.get(key, 0).ok()
    }
}

fn tcp_frame(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240);
    let b = if syn {
        b.syn()
            .options(&[
                TcpOptionElement::MaximumSegmentSize(1460),
                TcpOptionElement::SelectiveAcknowledgementPermitted,
                TcpOptionElement::Timestamp(1, 0),
                TcpOptionElement::Noop,
                TcpOptionElement::WindowScale(7),
            ])
            .unwrap()
    } else {
        b.ack(5000)
    };
    let mut frame = Vec::new();
    b.write(&mut frame, payload).unwrap();
    frame
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// A frame as the wire sees it, with all its checksums verified.
#[derive(Debug)]
struct Checked {
    saddr: [u8; 4],
    daddr: [u8; 4],
    proto: u8,
    l4: Vec<u8>,
}

impl Checked {
    fn tcp_ports(&self) -> (u16, u16) {
        (
            u16::from_be_bytes([self.l4[0], self.l4[1]]),
            u16::from_be_bytes([self.l4[2], self.l4[3]]),
        )
    }

    fn tcp_options(&self) -> &[u8] {
        let hlen = (self.l4[12] >> 4) as usize * 4;
        &self.l4[20..hlen]
    }
}

fn check(frame: &[u8]) -> Checked {
    assert_eq!(&frame[12..14], &[0x08, 0x00], "IPv4 frame");
    let ip = &frame[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    assert_eq!(tot, ip.len(), "IP total length matches the frame");
    assert_eq!(fold(sum16(&ip[..ihl])), 0xffff, "IP header checksum");
    let saddr = [ip[12], ip[13], ip[14], ip[15]];
    let daddr = [ip[16], ip[17], ip[18], ip[19]];
    let l4 = ip[ihl..tot].to_vec();
    match ip[9] {
        6 | 17 => {
            let pseudo = sum16(&saddr) + sum16(&daddr) + ip[9] as u32 + l4.len() as u32;
            assert_eq!(fold(pseudo + sum16(&l4)), 0xffff, "L4 checksum");
        }
        1 => assert_eq!(fold(sum16(&l4)), 0xffff, "ICMP checksum"),
        _ => {}
    }
    Checked {
        saddr,
        daddr,
        proto: ip[9],
        l4,
    }
}

#[tokio::test]
async fn outbound_syn_is_masqueraded_tagged_and_opens_both_directions() {
    let host = Host::new();
    let (verdict, out) = host.run(EGRESS, &tcp_frame(A_V, B_V, 40000, 80, true, &[]));
    assert_eq!(verdict, TC_ACT_OK);
    let p = check(&out);
    assert_eq!((p.saddr, p.daddr), (A_R, B_R));
    assert_eq!(p.tcp_ports(), (40000, 80));
    // The original 20 bytes of options, then the tag: our virtual address,
    // the virtual destination port, flags, and the MAC of what no NAT on
    // the way changes, with the pair's key.
    let opts = p.tcp_options();
    assert_eq!(opts.len(), 40);
    assert_eq!(
        &opts[20..32],
        &[253, 20, b'P', b'V', 240, 0, 0, 1, 0, 80, 0, 0]
    );
    let mac = siphash24_16(&KEY, &tag_message(A_V, B_V, 80, 0, 1000u32.to_be_bytes()));
    assert_eq!(&opts[32..], &mac.to_le_bytes());

    let egress = host
        .entry(&FlowKey::new(A_V, B_V, 40000, 80, 6, DIRECTION_EGRESS))
        .expect("egress entry");
    assert_eq!((egress.saddr, egress.daddr, egress.peer), (A_R, B_R, B_V));
    assert_eq!(egress.technique, Technique::Direct as u8);
    let ingress = host
        .entry(&FlowKey::new(B_R, A_R, 80, 40000, 6, DIRECTION_INGRESS))
        .expect("reply entry");
    assert_eq!((ingress.saddr, ingress.daddr), (B_V, A_V));
}

#[tokio::test]
async fn data_and_replies_keep_valid_checksums_both_ways() {
    let host = Host::new();
    host.run(EGRESS, &tcp_frame(A_V, B_V, 40001, 22, true, &[]));
    let payload: Vec<u8> = (0..1400u32).map(|i| (i * 7) as u8).collect();
    // Odd length: the checksum's last byte is padded.
    for len in [0, 1, 1399, 1400] {
        let (verdict, out) = host.run(
            EGRESS,
            &tcp_frame(A_V, B_V, 40001, 22, false, &payload[..len]),
        );
        assert_eq!(verdict, TC_ACT_OK);
        let p = check(&out);
        assert_eq!((p.saddr, p.daddr), (A_R, B_R));
        assert_eq!(p.l4.len(), 20 + len, "data packets do not grow");

        let (verdict, out) = host.run(
            INGRESS,
            &tcp_frame(B_R, A_R, 22, 40001, false, &payload[..len]),
        );
        assert_eq!(verdict, TC_ACT_OK);
        let p = check(&out);
        assert_eq!((p.saddr, p.daddr), (B_V, A_V));
    }
    assert!(host.maps.counters().egress_packets >= 5);
}

#[tokio::test]
async fn flows_are_stamped_with_the_agents_clock_or_the_kernels_before_it() {
    let mut host = Host::new();
    host.run(EGRESS, &tcp_frame(A_V, B_V, 40002, 22, true, &[]));
    let key = FlowKey::new(
        A_V,
        B_V,
        40002,
        22,
        pvc_common::IPPROTO_TCP,
        DIRECTION_EGRESS,
    );
    // Before the agent's first tick: the kernel's CLOCK_MONOTONIC.
    let first = host.entry(&key).unwrap().last_seen_ns;
    let now = super::flows::monotonic_ns();
    assert!(first <= now && now - first < 5_000_000_000, "{first} {now}");
    // The agent's clock, read by the next packet instead of the kernel's.
    let agents = now + 10_000_000_000;
    host.maps.set_clock(agents).unwrap();
    let (verdict, _) = host.run(EGRESS, &tcp_frame(A_V, B_V, 40002, 22, false, b"x"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(host.entry(&key).unwrap().last_seen_ns, agents);
    // Within a second of the last stamp, a packet writes nothing.
    host.maps.set_clock(agents + 500_000_000).unwrap();
    host.run(EGRESS, &tcp_frame(A_V, B_V, 40002, 22, false, b"x"));
    assert_eq!(host.entry(&key).unwrap().last_seen_ns, agents);
}

#[tokio::test]
async fn inbound_tagged_syn_from_a_member_opens_a_flow() {
    let host = Host::new();
    // What B's egress sends: a SYN from B's real address carrying B's tag.
    let b = Host::new_as_b();
    let (_, tagged) = b.run(EGRESS, &tcp_frame(B_V, A_V, 50000, 8080, true, &[]));
    let (verdict, out) = host.run(INGRESS, &tagged);
    assert_eq!(verdict, TC_ACT_OK);
    let p = check(&out);
    assert_eq!((p.saddr, p.daddr), (B_V, A_V));
    assert!(
        host.entry(&FlowKey::new(B_R, A_R, 50000, 8080, 6, DIRECTION_INGRESS))
            .is_some()
    );
    let reply = host
        .entry(&FlowKey::new(A_V, B_V, 8080, 50000, 6, DIRECTION_EGRESS))
        .expect("the server's replies have an entry");
    assert_eq!((reply.saddr, reply.daddr), (A_R, B_R));

    // The server's SYN/ACK then goes out masqueraded, without a tag.
    let (verdict, out) = host.run(EGRESS, &tcp_frame(A_V, B_V, 8080, 50000, false, &[]));
    assert_eq!(verdict, TC_ACT_OK);
    let p = check(&out);
    assert_eq!((p.saddr, p.daddr), (A_R, B_R));
    assert_eq!(p.tcp_options().len(), 0);
}

impl Host {
    /// The other end: host B, whose peer is A.
    fn new_as_b() -> Self {
        let mut h = Self::new();
        h.maps
            .set_identity(B_V.into(), B_R.into(), &Compiled::default())
            .unwrap();
        h.maps.remove_peer(B_V.into()).unwrap();
        h.maps.set_peer(A_V.into(), ready(A_R)).unwrap();
        h
    }
}

#[tokio::test]
async fn a_tag_from_the_wrong_address_is_dropped_and_untagged_syns_pass() {
    let host = Host::new();
    let b = Host::new_as_b();
    let (_, tagged) = b.run(EGRESS, &tcp_frame(B_V, A_V, 50001, 80, true, &[]));
    // Same tag, another source address: someone else claims to be B.
    let mut forged = tagged.clone();
    forged[14 + 12..14 + 16].copy_from_slice(&[198, 18, 0, 66]);
    let (verdict, _) = host.run(INGRESS, &forged);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::TagMismatch), 1);

    // A member's ordinary connection to our real address is left alone.
    let plain = tcp_frame(B_R, A_R, 50002, 22, true, &[]);
    let (verdict, out) = host.run(INGRESS, &plain);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, plain);
    assert!(
        host.entry(&FlowKey::new(B_R, A_R, 50002, 22, 6, DIRECTION_INGRESS))
            .is_none()
    );
}

#[tokio::test]
async fn nothing_virtual_reaches_the_wire_unmasqueraded() {
    let host = Host::new();
    // No member holds C's address.
    let (verdict, _) = host.run(EGRESS, &tcp_frame(A_V, C_V, 40002, 80, true, &[]));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::UnknownPeer), 1);

    // UDP is not masqueraded yet: dropped, not leaked.
    let mut udp = Vec::new();
    PacketBuilder::ethernet2([2; 6], [3; 6])
        .ipv4(A_V, B_V, 64)
        .udp(5000, 53)
        .write(&mut udp, b"query")
        .unwrap();
    let (verdict, _) = host.run(EGRESS, &udp);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::UnsupportedProtocol), 1);

    // A virtual source towards a real destination.
    let (verdict, _) = host.run(EGRESS, &tcp_frame(A_V, B_R, 40003, 80, true, &[]));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::VirtualSourceToRealDestination), 1);

    // Another host's virtual address as source (forwarded traffic).
    let (verdict, _) = host.run(EGRESS, &tcp_frame(C_V, B_V, 40004, 80, true, &[]));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::ForeignVirtualSource), 1);

    // Real traffic is untouched.
    let real = tcp_frame(A_R, B_R, 40005, 80, true, &[]);
    let (verdict, out) = host.run(EGRESS, &real);
    assert_eq!((verdict, out), (TC_ACT_OK, real));
}

#[tokio::test]
async fn virtual_addresses_arriving_from_the_wire_are_dropped() {
    let host = Host::new();
    let (verdict, _) = host.run(INGRESS, &tcp_frame(B_V, A_V, 40000, 80, true, &[]));
    assert_eq!(verdict, TC_ACT_SHOT);
    let (verdict, _) = host.run(INGRESS, &tcp_frame(B_R, A_V, 40000, 80, false, &[]));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::VirtualAddressOnWire), 2);
}

#[tokio::test]
async fn syns_without_room_for_the_tag_or_with_data_are_dropped() {
    let host = Host::new();
    let full = {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2([2; 6], [3; 6])
            .ipv4(A_V, B_V, 64)
            .tcp(40010, 80, 1, 1000)
            .syn()
            .options_raw(&[1u8; 40])
            .unwrap()
            .write(&mut frame, &[])
            .unwrap();
        frame
    };
    let (verdict, _) = host.run(EGRESS, &full);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::SynOptionsFull), 1);

    let (verdict, _) = host.run(EGRESS, &tcp_frame(A_V, B_V, 40011, 80, true, b"fast open"));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::SynWithPayload), 1);
}

#[tokio::test]
async fn ping_requests_and_replies_are_masqueraded() {
    let host = Host::new();
    let mut req = Vec::new();
    PacketBuilder::ethernet2([2; 6], [3; 6])
        .ipv4(A_V, B_V, 64)
        .icmpv4_echo_request(0x1234, 1)
        .write(&mut req, &[0xab; 56])
        .unwrap();
    let (verdict, out) = host.run(EGRESS, &req);
    assert_eq!(verdict, TC_ACT_OK);
    let p = check(&out);
    assert_eq!((p.saddr, p.daddr, p.proto), (A_R, B_R, 1));

    let mut reply = Vec::new();
    PacketBuilder::ethernet2([3; 6], [2; 6])
        .ipv4(B_R, A_R, 64)
        .icmpv4_echo_reply(0x1234, 1)
        .write(&mut reply, &[0xab; 56])
        .unwrap();
    let (verdict, out) = host.run(INGRESS, &reply);
    assert_eq!(verdict, TC_ACT_OK);
    let p = check(&out);
    assert_eq!((p.saddr, p.daddr), (B_V, A_V));

    // A reply nobody asked for (another identifier) stays as it is.
    let mut stray = Vec::new();
    PacketBuilder::ethernet2([3; 6], [2; 6])
        .ipv4(B_R, A_R, 64)
        .icmpv4_echo_reply(0x9999, 1)
        .write(&mut stray, &[0; 8])
        .unwrap();
    let (verdict, out) = host.run(INGRESS, &stray);
    assert_eq!((verdict, out), (TC_ACT_OK, stray));
}

#[tokio::test]
async fn icmp_errors_about_a_flow_are_mapped_back_to_virtual() {
    let host = Host::new();
    host.run(EGRESS, &tcp_frame(A_V, B_V, 40020, 443, true, &[]));
    // What went on the wire, quoted by a router's "fragmentation needed".
    let (_, sent) = host.run(EGRESS, &tcp_frame(A_V, B_V, 40020, 443, false, &[7; 100]));
    let quoted = &sent[14..14 + 20 + 8];
    let router = [198, 18, 0, 254];
    let mut err = Vec::new();
    PacketBuilder::ethernet2([4; 6], [2; 6])
        .ipv4(router, A_R, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut err, quoted)
        .unwrap();
    let (verdict, out) = host.run(INGRESS, &err);
    assert_eq!(verdict, TC_ACT_OK);
    let p = check(&out);
    assert_eq!(
        (p.saddr, p.daddr),
        (router, A_V),
        "outer destination becomes virtual"
    );
    let inner = &p.l4[8..];
    assert_eq!(
        fold(sum16(&inner[..20])),
        0xffff,
        "quoted IP header checksum"
    );
    assert_eq!(&inner[12..16], &A_V, "quoted source");
    assert_eq!(&inner[16..20], &B_V, "quoted destination");
    assert_eq!(
        &inner[20..24],
        &[0x9c, 0x54, 0x01, 0xbb],
        "quoted ports unchanged"
    );
}

/// An egress entry to B's real address that also translates the ports,
/// as a NAT traversal's would.
fn to_b_on_ports(sport: u16, dport: u16) -> Masquerade {
    Masquerade {
        saddr: A_R,
        daddr: B_R,
        sport,
        dport,
        peer: B_V,
        technique: Technique::Direct as u8,
        ..Default::default()
    }
}

#[tokio::test]
async fn entries_that_translate_ports_keep_checksums_valid() {
    // Not used by direct paths (ports are kept), but the rewrite supports it
    // for NAT traversal: an entry is installed by hand here.
    let mut host = Host::new();
    let k = FlowKey::new(A_V, B_V, 40030, 80, 6, DIRECTION_EGRESS);
    host.maps
        .masquerading
        .insert(k, to_b_on_ports(61000, 8080), 0)
        .unwrap();
    for len in [0, 33] {
        let (verdict, out) = host.run(
            EGRESS,
            &tcp_frame(A_V, B_V, 40030, 80, false, &vec![1; len]),
        );
        assert_eq!(verdict, TC_ACT_OK);
        let p = check(&out);
        assert_eq!(p.tcp_ports(), (61000, 8080));
    }
}

#[tokio::test]
async fn packets_masqueraded_per_packet_are_rewritten_in_place_and_with_helpers_alike() {
    // One flow that keeps its ports, one whose ports change on the wire.
    let moved = to_b_on_ports(61001, 8081);
    let (mut in_place, mut helpers) = (Host::with_in_place(true), Host::with_in_place(false));
    let mut outputs = Vec::new();
    for (host, tail_called) in [(&mut in_place, true), (&mut helpers, false)] {
        let mut host_out = Vec::new();
        let k = FlowKey::new(A_V, B_V, 40031, 81, 6, DIRECTION_EGRESS);
        host.maps.masquerading.insert(k, moved, 0).unwrap();
        host.run(EGRESS, &tcp_frame(A_V, B_V, 40002, 22, true, &[]));
        for len in [0, 1, 1399] {
            let payload = vec![0x5a; len];
            for (program, frame) in [
                (EGRESS, tcp_frame(A_V, B_V, 40002, 22, false, &payload)),
                (INGRESS, tcp_frame(B_R, A_R, 22, 40002, false, &payload)),
                (EGRESS, tcp_frame(A_V, B_V, 40031, 81, false, &payload)),
            ] {
                let (verdict, out, cb3) = host.run_with_cb(program, &frame);
                assert_eq!(verdict, TC_ACT_OK, "{program}, {len} bytes");
                check(&out);
                // The in-place program clears the control block it was
                // handed: the tail call was taken, or (without the
                // program) the helpers rewrote the packet.
                assert_eq!(
                    cb3 == 0,
                    tail_called,
                    "{program}, {len} bytes: cb[3] {cb3:#x}"
                );
                host_out.push(out);
            }
        }
        outputs.push(host_out);
    }
    assert_eq!(outputs[0], outputs[1], "the same packets either way");
    let p = check(&outputs[0][2]);
    assert_eq!((p.saddr, p.daddr, p.tcp_ports()), (A_R, B_R, (61001, 8081)));
    let p = check(&outputs[0][1]);
    assert_eq!((p.saddr, p.daddr, p.tcp_ports()), (B_V, A_V, (22, 40002)));
    assert_eq!(in_place.maps.counters(), helpers.maps.counters());
}

#[tokio::test]
async fn non_ip_frames_pass_untouched() {
    let host = Host::new();
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[0; 28]);
    for prog in [EGRESS, INGRESS] {
        let (verdict, out) = host.run(prog, &arp);
        assert_eq!((verdict, &out), (TC_ACT_OK, &arp));
    }
    // A truncated TCP header with a virtual destination cannot be
    // masqueraded: egress drops it rather than let it out.
    let mut short = tcp_frame(A_V, B_V, 1, 2, false, &[]);
    short.truncate(14 + 20 + 4);
    let (verdict, _) = host.run(EGRESS, &short);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::Malformed), 1);
}

fn arp(op: u16, sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&sender_ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target_ip);
    f
}

#[tokio::test]
async fn arp_never_carries_a_virtual_address_to_the_wire() {
    let host = Host::new();
    // Resolving B's next hop for a packet from 240.0.0.1: Linux asks "tell
    // 240.0.0.1"; the wire sees our real address instead.
    let (verdict, out) = host.run(EGRESS, &arp(1, A_V, B_R));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, arp(1, A_R, B_R));
    // A stranger asked for our virtual address: no answer leaves.
    let (verdict, _) = host.run(EGRESS, &arp(2, A_V, [198, 18, 0, 77]));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::VirtualAddressOnWire), 1);
    // Ordinary ARP is untouched.
    let plain = arp(1, A_R, B_R);
    assert_eq!(host.run(EGRESS, &plain), (TC_ACT_OK, plain));
}

#[tokio::test]
async fn a_real_connection_reusing_the_ports_of_an_ended_flow_is_left_alone() {
    let host = Host::new();
    let b = Host::new_as_b();
    let (_, tagged) = b.run(EGRESS, &tcp_frame(B_V, A_V, 50100, 22, true, &[]));
    assert_eq!(host.run(INGRESS, &tagged).0, TC_ACT_OK);
    let k = FlowKey::new(B_R, A_R, 50100, 22, 6, DIRECTION_INGRESS);
    assert!(host.entry(&k).is_some());
    // Later, B connects to our real address from the same port, without PVC.
    let plain = tcp_frame(B_R, A_R, 50100, 22, true, &[]);
    let (verdict, out) = host.run(INGRESS, &plain);
    assert_eq!((verdict, out), (TC_ACT_OK, plain));
    assert!(host.entry(&k).is_none(), "the old flow's entry is gone");
    assert!(
        host.entry(&FlowKey::new(A_V, B_V, 22, 50100, 6, DIRECTION_EGRESS))
            .is_none(),
        "and its twin"
    );
    // Its packets are not masqueraded either.
    let data = tcp_frame(B_R, A_R, 50100, 22, false, b"ssh");
    assert_eq!(host.run(INGRESS, &data), (TC_ACT_OK, data));
}

#[tokio::test]
async fn a_syn_to_a_member_without_an_authenticated_path_is_held_for_the_agent() {
    let mut host = Host::new();
    let member_only = PeerPath {
        state: PEER_MEMBER,
        tag_key: [0; 16],
        ..ready(B_R)
    };
    host.maps.set_peer(B_V.into(), member_only).unwrap();
    let syn = tcp_frame(A_V, B_V, 40100, 22, true, &[]);
    let (verdict, _) = host.run(EGRESS, &syn);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::AwaitingPath), 1);
    assert!(
        host.entry(&FlowKey::new(A_V, B_V, 40100, 22, 6, DIRECTION_EGRESS))
            .is_none(),
        "nothing installed"
    );
    // The agent gets the SYN as the stack sent it, from its IP header on.
    let batch = tokio::time::timeout(std::time::Duration::from_secs(2), host.events.next_batch())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        batch,
        vec![FlowEvent::Held {
            peer: B_V.into(),
            packet: Some(syn[14..].to_vec())
        }]
    );
    // Packets of a flow that has no entry are not masqueraded either.
    let (verdict, _) = host.run(EGRESS, &tcp_frame(A_V, B_V, 40100, 22, false, b"x"));
    assert_eq!(verdict, TC_ACT_SHOT);
}

#[tokio::test]
async fn forged_or_replayed_tags_are_refused() {
    let host = Host::new();
    let b = Host::new_as_b();
    let (_, tagged) = b.run(EGRESS, &tcp_frame(B_V, A_V, 50200, 22, true, &[]));
    let tag_at = tagged.len() - 8;

    // One bit of the MAC changed.
    let mut forged = tagged.clone();
    forged[tag_at] ^= 1;
    assert_eq!(host.run(INGRESS, &forged).0, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::BadTag), 1);

    // The genuine SYN passes, and so does its retransmission.
    assert_eq!(host.run(INGRESS, &tagged).0, TC_ACT_OK);
    assert_eq!(host.run(INGRESS, &tagged).0, TC_ACT_OK);
    // The same tag on another connection (other source port): the MAC
    // covers only what NATs leave alone, so it verifies, but a recorded
    // SYN does not open flows it was not made for.
    let mut replayed = tagged.clone();
    replayed[14 + 20] = 0x01;
    assert_eq!(host.run(INGRESS, &replayed).0, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::Replay), 1);

    // A member whose path is not authenticated cannot open flows, even
    // with a well-formed tag.
    let mut unauth = Host::new();
    unauth
        .maps
        .set_peer(
            B_V.into(),
            PeerPath {
                state: PEER_MEMBER,
                ..ready(B_R)
            },
        )
        .unwrap();
    assert_eq!(unauth.run(INGRESS, &tagged).0, TC_ACT_SHOT);
    assert_eq!(unauth.drops(DropReason::TagMismatch), 1);
    // Another session's key: the MAC does not verify.
    let mut other_key = Host::new();
    other_key
        .maps
        .set_peer(
            B_V.into(),
            PeerPath {
                tag_key: [9; 16],
                ..ready(B_R)
            },
        )
        .unwrap();
    assert_eq!(other_key.run(INGRESS, &tagged).0, TC_ACT_SHOT);
    assert_eq!(other_key.drops(DropReason::BadTag), 1);

    // The refusals were reported.
    let batch = tokio::time::timeout(std::time::Duration::from_secs(2), async {
        let mut host = host;
        host.events.next_batch().await
    })
    .await
    .unwrap()
    .unwrap();
    assert!(
        batch.iter().any(|e| matches!(
            e,
            FlowEvent::InboundRefused {
                reason: Some(DropReason::BadTag),
                local_port: 22,
                ..
            }
        )),
        "{batch:?}"
    );
}

#[tokio::test]
async fn policy_is_enforced_on_syns_in_both_directions() {
    let mut host = Host::new();
    // Inbound from B: only port 22; outbound to B: only 8000-8003.
    let entry = |direction, port, bits| PolicyEntry {
        direction,
        peer: B_V.into(),
        port,
        prefix_len: pvc_common::POLICY_FULL_PREFIX - 16 + bits,
    };
    let compiled = Compiled {
        restrict_out: true,
        restrict_in: true,
        entries: [
            entry(POLICY_INBOUND, 22, 16),
            entry(POLICY_OUTBOUND, 8000, 14),
        ]
        .into_iter()
        .collect(),
    };
    let mut installed = Default::default();
    host.maps
        .set_policy(&mut installed, &compiled.entries)
        .unwrap();
    host.maps
        .set_identity(A_V.into(), A_R.into(), &compiled)
        .unwrap();

    assert_eq!(
        host.run(EGRESS, &tcp_frame(A_V, B_V, 40300, 8003, true, &[]))
            .0,
        TC_ACT_OK
    );
    assert_eq!(
        host.run(EGRESS, &tcp_frame(A_V, B_V, 40301, 8004, true, &[]))
            .0,
        TC_ACT_SHOT
    );
    assert_eq!(
        host.run(EGRESS, &tcp_frame(A_V, B_V, 40302, 22, true, &[]))
            .0,
        TC_ACT_SHOT
    );
    assert_eq!(host.drops(DropReason::PolicyOutbound), 2);

    let b = Host::new_as_b();
    let (_, ssh) = b.run(EGRESS, &tcp_frame(B_V, A_V, 50300, 22, true, &[]));
    let (_, web) = b.run(EGRESS, &tcp_frame(B_V, A_V, 50301, 80, true, &[]));
    assert_eq!(host.run(INGRESS, &ssh).0, TC_ACT_OK);
    assert_eq!(host.run(INGRESS, &web).0, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::PolicyInbound), 1);

    // Removing the restriction lets everything through again.
    host.maps
        .set_policy(&mut installed, &Default::default())
        .unwrap();
    host.maps
        .set_identity(A_V.into(), A_R.into(), &Compiled::default())
        .unwrap();
    assert_eq!(host.run(INGRESS, &web).0, TC_ACT_OK);
}

/// A punch SYN tells our agent which port the member's NAT opened: a copy
/// sent from another port (the MAC covers what NATs leave alone) must not
/// redirect the flow.
#[tokio::test]
async fn a_replayed_punch_syn_is_refused() {
    let host = Host::new();
    // B's stack answered A's SYN; B's agent sends that answer out as a punch.
    let answer = tcp_frame(B_R, A_R, 8080, 40000, false, &[]);
    let mut answer = answer[14..].to_vec();
    answer[33] |= 0x02; // SYN/ACK
    let punch = crate::connectivity::punch::syn(
        &answer,
        &crate::connectivity::punch::Punch {
            from: std::net::SocketAddrV4::new(B_R.into(), 8080),
            to: std::net::SocketAddrV4::new(A_R.into(), 40000),
            vsrc: B_V.into(),
            vdst: A_V.into(),
            vport: 40000,
            tag_key: KEY,
        },
    )
    .expect("a punch SYN");
    let frame = |packet: &[u8]| {
        let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        f.extend_from_slice(packet);
        f
    };
    assert_eq!(host.run(INGRESS, &frame(&punch)).0, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::Punch), 1);
    // A retransmission is still the member's punch.
    assert_eq!(host.run(INGRESS, &frame(&punch)).0, TC_ACT_SHOT);
    assert_eq!(host.drops(DropReason::Punch), 2);
    let mut replayed = punch.clone();
    replayed[20..22].copy_from_slice(&9999u16.to_be_bytes());
    assert_eq!(host.run(INGRESS, &frame(&replayed)).0, TC_ACT_SHOT);
    assert_eq!(
        host.drops(DropReason::Punch),
        2,
        "the copy reached the agent"
    );
    assert_eq!(host.drops(DropReason::Replay), 1);
}

/// An entry that expired under a live flow is rebuilt from the member's
/// path, but a path through a UPnP forward names the forward's port, which
/// is only right for flows we opened: the reply of a flow the member opened
/// must not go there.
#[tokio::test]
async fn an_expired_flow_is_not_rebuilt_towards_a_forwarded_port() {
    let mut host = Host::new();
    host.maps
        .set_peer(
            B_V.into(),
            PeerPath::ready(B_R, Technique::Upnp as u8, 7777, 0, KEY),
        )
        .unwrap();
    // Our server's reply, no entry left: sent to port 7777 it would reach
    // another flow of the member, or none.
    let (verdict, out) = host.run(EGRESS, &tcp_frame(A_V, B_V, 8080, 50000, false, &[]));
    if verdict == TC_ACT_OK {
        assert_eq!(
            check(&out).tcp_ports(),
            (8080, 50000),
            "rebuilt to the forward"
        );
    }
    assert_eq!(verdict, TC_ACT_SHOT);
}

#[tokio::test]
async fn ingress_looks_a_flow_up_while_its_hint_is_live_and_skips_the_lookup_once_it_lapsed() {
    let mut host = Host::new();
    host.maps
        .set_hint_lifetime(std::time::Duration::from_secs(100))
        .unwrap();
    // The egress SYN opens the flow, and its reply direction's hint first.
    host.run(EGRESS, &tcp_frame(A_V, B_V, 40009, 22, true, &[]));
    let reply = FlowKey::new(B_R, A_R, 22, 40009, 6, DIRECTION_INGRESS);
    let slot = reply.hint_slot();
    let until = host.maps.hints.get(&slot, 0).unwrap();
    let now = super::flows::monotonic_ns();
    assert!(
        until > now + 90_000_000_000 && until <= now + 100_000_000_000,
        "{until} {now}"
    );
    let data = tcp_frame(B_R, A_R, 22, 40009, false, b"x");
    let (verdict, out) = host.run(INGRESS, &data);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(check(&out).daddr, A_V, "rewritten while the hint is live");

    // A lapsed hint: the packet passes as it is, without the lookup (its
    // entry's time is left alone).
    host.maps.hints.set(slot, now - 1, 0).unwrap();
    host.maps.set_clock(now + 5_000_000_000).unwrap();
    let (verdict, out) = host.run(INGRESS, &data);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(check(&out).daddr, A_R, "passed as it is");
    assert!(host.entry(&reply).unwrap().last_seen_ns < now + 5_000_000_000);

    // A restarted agent hints every entry it takes over.
    host.maps.hint_existing();
    let (_, out) = host.run(INGRESS, &data);
    assert_eq!(check(&out).daddr, A_V);
    // Packets keep it live: renewed a lifetime from the clock they read.
    host.maps.set_clock(now + 50_000_000_000).unwrap();
    host.run(INGRESS, &data);
    assert_eq!(
        host.maps.hints.get(&slot, 0).unwrap(),
        now + 150_000_000_000
    );
    // A slot never hinted is all a packet reads: it passes as it is.
    host.maps.hints.set(slot, 0, 0).unwrap();
    let (_, out) = host.run(INGRESS, &data);
    assert_eq!(check(&out).daddr, A_R, "never hinted: no lookup");
    // Before the agent says how long hints last, a hint never lapses.
    host.maps
        .set_hint_lifetime(std::time::Duration::ZERO)
        .unwrap();
    host.maps.hint(&reply).unwrap();
    host.maps.set_clock(now + 1_000_000_000_000_000).unwrap();
    let (_, out) = host.run(INGRESS, &data);
    assert_eq!(check(&out).daddr, A_V, "a hint without a lifetime holds");
    assert_eq!(host.maps.hints.get(&slot, 0).unwrap(), u64::MAX);
}

/// On a path that sockets also carry, a flow masqueraded per packet from
/// an ephemeral port leaves from a port above the kernel's range: the same
/// for all its packets, its replies come back to the application's port,
/// and an entry that expired under it is rebuilt on the same port. A port
/// below the range (bound by the application) and a path that sockets do
/// not carry keep the flow's own port.
#[tokio::test]
async fn per_packet_flows_on_socket_paths_leave_from_ports_the_kernel_does_not_hand_out() {
    let mut host = Host::new();
    host.maps
        .set_masquerading_ports(MasqueradingPorts {
            ephemeral_first: 32768,
            ephemeral_last: 60999,
            first: 61000,
            count: 4536,
        })
        .unwrap();
    let socket_path = PeerPath::ready(B_R, Technique::Lan as u8, 0, PATH_SOCKET, KEY);
    host.maps.set_peer(B_V.into(), socket_path).unwrap();
    let (verdict, out) = host.run(EGRESS, &tcp_frame(A_V, B_V, 40000, 22, true, &[]));
    assert_eq!(verdict, TC_ACT_OK);
    let (sport, dport) = check(&out).tcp_ports();
    assert!((61000..=65535).contains(&sport), "wire port {sport}");
    assert_eq!(dport, 22);
    let (_, out) = host.run(EGRESS, &tcp_frame(A_V, B_V, 40000, 22, false, b"data"));
    assert_eq!(check(&out).tcp_ports(), (sport, 22));
    let (verdict, back) = host.run(INGRESS, &tcp_frame(B_R, A_R, 22, sport, false, b"ok"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(check(&back).tcp_ports(), (22, 40000));

    // Both entries gone under the live flow: rebuilt on the same port.
    let egress = FlowKey::new(A_V, B_V, 40000, 22, IPPROTO_TCP, DIRECTION_EGRESS);
    let ingress = FlowKey::new(B_R, A_R, 22, sport, IPPROTO_TCP, DIRECTION_INGRESS);
    host.maps.masquerading.remove(&egress).unwrap();
    host.maps.masquerading.remove(&ingress).unwrap();
    let (verdict, out) = host.run(EGRESS, &tcp_frame(A_V, B_V, 40000, 22, false, b"more"));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(check(&out).tcp_ports(), (sport, 22));
    assert!(host.entry(&ingress).is_some(), "the reply's entry is back");

    // Bound below the ephemeral range: kept.
    let (_, out) = host.run(EGRESS, &tcp_frame(A_V, B_V, 5000, 22, true, &[]));
    assert_eq!(check(&out).tcp_ports(), (5000, 22));
    // A path that sockets do not carry: kept.
    host.maps.set_peer(B_V.into(), ready(B_R)).unwrap();
    let (_, out) = host.run(EGRESS, &tcp_frame(A_V, B_V, 40001, 22, true, &[]));
    assert_eq!(check(&out).tcp_ports(), (40001, 22));
}

/// A frame from `src:sport` to `dst:dport` with these TCP flags set
/// (`syn`, `ack`, `rst`), no options, no payload.
fn tcp_flags_frame(
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    syn: bool,
    ack: bool,
    rst: bool,
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1000, 64240);
    if syn {
        b = b.syn();
    }
    if ack {
        b = b.ack(5000);
    }
    if rst {
        b = b.rst();
    }
    let mut frame = Vec::new();
    b.write(&mut frame, &[]).unwrap();
    frame
}

/// A traversal's server side served at the socket: until the member's own
/// SYN comes through the hole, the stack's answer goes to the agent (which
/// sends it out as the punch) and a RST on the flow's tuple (the member's
/// NAT rejecting the punch) is dropped; once the flag is clear, both pass
/// as they are. Other tuples are not concerned.
#[tokio::test]
async fn a_punched_flow_served_at_the_socket_holds_its_answer_and_drops_the_punchs_rejection() {
    use pvc_common::{SOCKET_ACCEPTED, SOCKET_HOLD_ANSWER, SocketKey, SocketPeer};
    let mut host = Host::new();
    // B's NAT put the flow at B_R:50000; our listener has port 7000.
    let key = SocketKey {
        peer: B_R,
        peer_port: 50000,
        local_port: 7000,
    };
    let mut served = SocketPeer {
        vpeer: B_V,
        vport: 40000,
        technique: Technique::Punch as u8,
        side: SOCKET_ACCEPTED,
        local_vport: 0,
        flags: SOCKET_HOLD_ANSWER,
    };
    host.maps.open_at_socket(key, served).unwrap();
    let answer = tcp_flags_frame((A_R, 7000), (B_R, 50000), true, true, false);
    let rejection = tcp_flags_frame((B_R, 50000), (A_R, 7000), false, false, true);
    let other = tcp_flags_frame((B_R, 50001), (A_R, 7000), false, false, true);

    let (verdict, _) = host.run(EGRESS, &answer);
    assert_eq!(verdict, TC_ACT_SHOT, "the answer waits for the punch");
    assert_eq!(host.drops(DropReason::HeldAnswer), 1);
    let (verdict, _) = host.run(INGRESS, &rejection);
    assert_eq!(verdict, TC_ACT_SHOT, "the punch's rejection");
    assert_eq!(host.drops(DropReason::TraversalReset), 1);
    let (verdict, out) = host.run(INGRESS, &other);
    assert_eq!((verdict, out), (TC_ACT_OK, other), "another tuple's RST");

    // The member's SYN came (tc ingress clears the flag).
    served.flags = 0;
    host.maps.open_at_socket(key, served).unwrap();
    let (verdict, out) = host.run(EGRESS, &answer);
    assert_eq!((verdict, out), (TC_ACT_OK, answer), "the answer, as it is");
    let (verdict, out) = host.run(INGRESS, &rejection);
    assert_eq!((verdict, out), (TC_ACT_OK, rejection), "a RST of the flow");
    assert_eq!(host.drops(DropReason::HeldAnswer), 1);
    assert_eq!(host.drops(DropReason::TraversalReset), 1);
}

/// A traversal's client side translated at the socket: before the member's
/// SYN/ACK, a RST on the flow's tuple (a firewall rejecting the SYN the
/// agents carry around it) is dropped; the SYN/ACK passes as it is and
/// reports the flow (the agent stops waiting for the traversal); after it,
/// a RST is the flow's own.
#[tokio::test]
async fn a_traversal_at_the_socket_is_reported_at_the_members_answer() {
    use pvc_common::{SOCKET_AWAIT_ANSWER, SOCKET_CONNECTED, SocketKey, SocketPeer};
    let mut host = Host::new();
    // Our socket 198.18.0.1:40000 connected to B's public endpoint B_R:22.
    let key = SocketKey {
        peer: B_R,
        peer_port: 22,
        local_port: 40000,
    };
    host.maps
        .open_at_socket(
            key,
            SocketPeer {
                vpeer: B_V,
                vport: 22,
                technique: Technique::Ttcp as u8,
                side: SOCKET_CONNECTED,
                local_vport: 0,
                flags: SOCKET_AWAIT_ANSWER,
            },
        )
        .unwrap();
    let rejection = tcp_flags_frame((B_R, 22), (A_R, 40000), false, true, true);
    let answer = tcp_flags_frame((B_R, 22), (A_R, 40000), true, true, false);

    let (verdict, _) = host.run(INGRESS, &rejection);
    assert_eq!(verdict, TC_ACT_SHOT, "a firewall's RST before the answer");
    assert_eq!(host.drops(DropReason::TraversalReset), 1);
    let (verdict, out) = host.run(INGRESS, &answer);
    assert_eq!(
        (verdict, out),
        (TC_ACT_OK, answer.clone()),
        "the answer, as it is"
    );
    // Reported without waking the agent, which reads it on its timer.
    assert_eq!(
        host.events.drain(),
        vec![FlowEvent::Opened {
            proto: IPPROTO_TCP,
            outbound: true,
            local: std::net::SocketAddrV4::new(A_V.into(), 40000),
            remote: std::net::SocketAddrV4::new(B_V.into(), 22),
            technique: Some(Technique::Ttcp),
        }]
    );
    let (verdict, out) = host.run(INGRESS, &rejection);
    assert_eq!((verdict, out), (TC_ACT_OK, rejection), "the flow's own RST");
    let (verdict, _) = host.run(INGRESS, &answer);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(host.drops(DropReason::TraversalReset), 1);
}
