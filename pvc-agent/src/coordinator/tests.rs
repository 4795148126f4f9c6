//! The coordinator's rules, tested on the pure core: two (or three) cores
//! with real keys and master-signed records talk through a simulated broker;
//! effects are checked, installs succeed unless a test says otherwise.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use pvc_common::{PEER_MEMBER, PeerPath};
use pvc_proto::{
    MemberInfo, MembershipRecord, Revocations, Signed, SignedRecord, handshake::Handshake, unix_now,
};

use super::core::{Core, Effect, FAILURE_MEMORY, Identity, Limits, RENEW_AHEAD};
use super::members::Welcome;
use crate::{
    security::{keys::KeyPair, membership::Trust, policy::LocalPolicy},
    virtualization::LocalNet,
};

const LIFETIME: Duration = Duration::from_secs(600);
const HANDSHAKE: Duration = Duration::from_secs(5);

struct Host {
    key: Arc<KeyPair>,
    vip: Ipv4Addr,
    real: Ipv4Addr,
    record: SignedRecord,
}

/// A master and its admitted hosts a, b, c (240.0.0.1.. on 198.18.0.1..).
struct Cluster {
    master: KeyPair,
    hosts: Vec<Host>,
}

impl Cluster {
    fn new(n: u8) -> Self {
        let master = KeyPair::generate().unwrap();
        let cluster = Trust::new(master.public).cluster;
        let hosts = (1..=n)
            .map(|i| {
                let key = Arc::new(KeyPair::generate().unwrap());
                let vip = Ipv4Addr::new(240, 0, 0, i);
                let record = MembershipRecord {
                    cluster,
                    serial: i as u64,
                    name: format!("host-{i}"),
                    virtual_ip: vip,
                    host_key: key.public,
                    groups: vec![],
                    not_before: 0,
                    not_after: unix_now() + 3600,
                };
                Host {
                    record: Signed::sign(&record, &master.pair),
                    key,
                    vip,
                    real: Ipv4Addr::new(198, 18, 0, i),
                }
            })
            .collect();
        Self { master, hosts }
    }

    fn info(&self, i: usize) -> MemberInfo {
        MemberInfo {
            record: self.hosts[i].record.clone(),
            addresses: vec![self.hosts[i].real],
            observed: None,
            site: Default::default(),
        }
    }

    /// Host `i`'s core, welcomed by a broker listing the other hosts.
    fn core(&self, i: usize, now: Instant) -> Core {
        let h = &self.hosts[i];
        let mut core = Core::new(
            Identity {
                name: format!("host-{}", i + 1),
                virtual_ip: h.vip,
                key: h.key.clone(),
                real_ip: h.real,
                advertised: vec![h.real],
                networks: vec![LocalNet {
                    address: h.real,
                    prefix: 24,
                }],
            },
            Limits::new(HANDSHAKE, LIFETIME),
            Trust::new(self.master.public),
            LocalPolicy::default(),
        );
        let others: Vec<MemberInfo> = (0..self.hosts.len())
            .filter(|j| *j != i)
            .map(|j| self.info(j))
            .collect();
        let own = Trust::new(self.master.public)
            .record(&h.record, unix_now())
            .unwrap();
        core.welcome(
            Welcome {
                broker: "broker".into(),
                observed: std::net::SocketAddrV4::new(h.real, 7101),
                own: Some(own),
                revocations: None,
                policy: None,
                members: &others,
            },
            now,
            unix_now(),
        );
        core
    }
}

fn syn(n: u8) -> Vec<u8> {
    vec![0x45, 0, 0, 40, n]
}

fn sends(effects: &[Effect]) -> Vec<(Ipv4Addr, Handshake)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { to, message, .. } => Some((*to, message.clone())),
            _ => None,
        })
        .collect()
}

fn resent(effects: &[Effect]) -> Vec<Vec<u8>> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Resend(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn refused(effects: &[Effect]) -> Vec<Vec<u8>> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Refuse(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

fn kernel_entry(effects: &[Effect], vip: Ipv4Addr) -> Option<PeerPath> {
    effects.iter().rev().find_map(|e| match e {
        Effect::SetPeer(v, p) if *v == vip => Some(*p),
        _ => None,
    })
}

/// Cores talking through a broker that delivers everything; installs
/// succeed. Returns every effect each core produced, by core.
fn run(
    cores: &mut [&mut Core],
    first: Vec<(usize, Vec<Effect>)>,
    now: Instant,
) -> Vec<Vec<Effect>> {
    let mut log: Vec<Vec<Effect>> = vec![Vec::new(); cores.len()];
    let mut queue: std::collections::VecDeque<(usize, Effect)> = first
        .into_iter()
        .flat_map(|(i, es)| es.into_iter().map(move |e| (i, e)))
        .collect();
    let index = |cores: &[&mut Core], vip: Ipv4Addr| {
        cores
            .iter()
            .position(|c| c.identity().virtual_ip == vip)
            .expect("a core for every address")
    };
    while let Some((i, effect)) = queue.pop_front() {
        log[i].push(effect.clone());
        match effect {
            Effect::Send { to, message, .. } => {
                let from = cores[i].identity().virtual_ip;
                let j = index(cores, to);
                for e in cores[j].relayed(from, None, &message.encode(), now) {
                    queue.push_back((j, e));
                }
            }
            Effect::Install { session, then, .. } => {
                if let Some((via, message)) = then {
                    queue.push_back((
                        i,
                        Effect::Send {
                            to: session.peer,
                            via,
                            message,
                        },
                    ));
                }
                for e in cores[i].installed(session, now) {
                    queue.push_back((i, e));
                }
            }
            _ => {}
        }
    }
    log
}

fn installs(effects: &[Effect]) -> Vec<crate::security::challenge::Session> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Install { session, .. } => Some(session.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_held_syn_starts_an_exchange_and_goes_out_once_both_installed_the_path() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let (mut a, mut b) = (c.core(0, t), c.core(1, t));
    let first = a.held(c.hosts[1].vip, Some(syn(1)), t);
    assert!(matches!(sends(&first)[..], [(to, Handshake::Init(_))] if to == c.hosts[1].vip));
    let log = run(&mut [&mut a, &mut b], vec![(0, first)], t);
    // The responder installs before its Done goes out; the initiator installs
    // on Done, then re-sends the SYN. Both hold the same tag key.
    let (sa, sb) = (installs(&log[0]), installs(&log[1]));
    assert_eq!((sa.len(), sb.len()), (1, 1));
    assert_eq!(sa[0].tag_key, sb[0].tag_key);
    assert_eq!(sa[0].peer_real, c.hosts[1].real);
    assert_eq!(resent(&log[0]), vec![syn(1)]);
    // Later packets to b need no exchange.
    let again = a.held(c.hosts[1].vip, Some(syn(2)), t);
    assert_eq!(resent(&again), vec![syn(2)]);
    assert!(sends(&again).is_empty());
}

#[test]
fn glare_the_lower_address_initiates_and_both_sides_get_their_syns_out() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let (mut a, mut b) = (c.core(0, t), c.core(1, t));
    let from_a = a.held(c.hosts[1].vip, Some(syn(1)), t);
    let from_b = b.held(c.hosts[0].vip, Some(syn(2)), t);
    // Both Inits cross: a (240.0.0.1, lower) ignores b's, b answers a's.
    let log = run(&mut [&mut a, &mut b], vec![(0, from_a), (1, from_b)], t);
    let replies_by_a = sends(&log[0])
        .into_iter()
        .filter(|(_, m)| matches!(m, Handshake::Reply(_)))
        .count();
    assert_eq!(replies_by_a, 0, "the lower address does not respond");
    assert_eq!(installs(&log[0]).len(), 1);
    assert_eq!(installs(&log[1]).len(), 1);
    assert_eq!(resent(&log[0]), vec![syn(1)]);
    assert_eq!(resent(&log[1]), vec![syn(2)]);
}

#[test]
fn a_refused_exchange_refuses_the_held_syns_and_new_ones_for_a_moment() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let mut a = c.core(0, t);
    let b = c.hosts[1].vip;
    let init = sends(&a.held(b, Some(syn(1)), t)).remove(0).1;
    assert!(
        a.held(b, Some(syn(2)), t).is_empty(),
        "held, no second exchange"
    );
    let refusal = Handshake::Refused {
        id: init.id(),
        reason: "no".into(),
    };
    let out = a.relayed(b, None, &refusal.encode(), t);
    assert_eq!(refused(&out), vec![syn(1), syn(2)]);
    // Within the failure memory: refused at once, no exchange.
    let soon = a.held(b, Some(syn(3)), t + FAILURE_MEMORY / 2);
    assert_eq!(refused(&soon), vec![syn(3)]);
    assert!(sends(&soon).is_empty());
    // After it: a new exchange.
    let later = a.held(b, Some(syn(4)), t + FAILURE_MEMORY * 2);
    assert!(matches!(sends(&later)[..], [(_, Handshake::Init(_))]));
}

#[test]
fn an_exchange_without_answer_times_out_and_refuses_what_waited() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let mut a = c.core(0, t);
    a.held(c.hosts[1].vip, Some(syn(1)), t);
    assert!(refused(&a.check_sessions(t + HANDSHAKE / 2)).is_empty());
    assert_eq!(
        refused(&a.check_sessions(t + HANDSHAKE + Duration::from_secs(1))),
        vec![syn(1)]
    );
}

#[test]
fn an_undeliverable_exchange_fails_at_once() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let mut a = c.core(0, t);
    a.held(c.hosts[1].vip, Some(syn(1)), t);
    assert_eq!(refused(&a.undeliverable(c.hosts[1].vip, t)), vec![syn(1)]);
}

#[test]
fn a_failed_install_refuses_what_waited() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let mut a = c.core(0, t);
    a.held(c.hosts[1].vip, Some(syn(1)), t);
    assert_eq!(
        refused(&a.install_failed(c.hosts[1].vip, "no route", t)),
        vec![syn(1)]
    );
}

/// a and b with an authenticated path, established at `t`.
fn paired(c: &Cluster, t: Instant) -> (Core, Core) {
    let (mut a, mut b) = (c.core(0, t), c.core(1, t));
    let first = a.held(c.hosts[1].vip, Some(syn(1)), t);
    run(&mut [&mut a, &mut b], vec![(0, first)], t);
    (a, b)
}

#[test]
fn a_session_in_use_is_proven_again_before_it_expires_and_an_idle_one_lapses() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let vb = c.hosts[1].vip;
    let (mut a, _) = paired(&c, t);
    let before_renewal = t + LIFETIME - RENEW_AHEAD - Duration::from_secs(1);
    let in_window = t + LIFETIME - RENEW_AHEAD + Duration::from_secs(1);

    a.set_active(BTreeSet::from([vb]));
    assert!(sends(&a.check_sessions(before_renewal)).is_empty());
    let renewal = a.check_sessions(in_window);
    assert!(matches!(sends(&renewal)[..], [(to, Handshake::Init(_))] if to == vb));
    // While it is proven again, flows go on: held packets are re-sent.
    assert_eq!(resent(&a.held(vb, Some(syn(9)), in_window)), vec![syn(9)]);

    let (mut idle, _) = paired(&c, t);
    idle.set_active(BTreeSet::new());
    assert!(sends(&idle.check_sessions(in_window)).is_empty());
    let lapsed = idle.check_sessions(t + LIFETIME + Duration::from_secs(1));
    let entry = kernel_entry(&lapsed, vb).expect("the kernel entry goes back to member");
    assert_eq!(entry.state, PEER_MEMBER);
}

#[test]
fn a_path_left_by_the_previous_agent_is_taken_over_and_dropped_if_never_confirmed() {
    let c = Cluster::new(3);
    let t = Instant::now();
    let (vb, vc) = (c.hosts[1].vip, c.hosts[2].vip);
    let mut a = Core::new(
        Identity {
            name: "host-1".into(),
            virtual_ip: c.hosts[0].vip,
            key: c.hosts[0].key.clone(),
            real_ip: c.hosts[0].real,
            advertised: vec![c.hosts[0].real],
            networks: vec![],
        },
        Limits::new(HANDSHAKE, LIFETIME),
        Trust::new(c.master.public),
        LocalPolicy::default(),
    );
    let ready = |real: Ipv4Addr| PeerPath::ready(real.octets(), 1, 0, 0, [7; 16]);
    a.inherit(
        vec![(vb, ready(c.hosts[1].real)), (vc, ready(c.hosts[2].real))],
        vec![vb, vc],
        t,
    );
    // The broker confirms b: its session is adopted, no exchange needed.
    let out = a.joined("broker", &c.info(1), t, unix_now());
    assert!(
        kernel_entry(&out, vb)
            .is_none_or(|p| p.state == pvc_common::PEER_READY && p.tag_key == [7; 16]),
        "the READY entry stays"
    );
    assert!(out.contains(&Effect::Route {
        vip: vb,
        real: c.hosts[1].real
    }));
    assert_eq!(resent(&a.held(vb, Some(syn(1)), t)), vec![syn(1)]);
    assert_eq!(a.routed_sessions(), vec![(vb, c.hosts[1].real)]);
    // c is never confirmed: after the grace period its entry goes, and its
    // route once no flow uses it.
    let grace = Limits::new(HANDSHAKE, LIFETIME).absence_grace;
    assert!(a.expire(t + grace / 2, unix_now()).is_empty());
    a.set_active(BTreeSet::from([vc]));
    let out = a.expire(t + grace + Duration::from_secs(1), unix_now());
    assert!(out.contains(&Effect::RemovePeer(vc)));
    assert!(
        !out.contains(&Effect::RemoveRoute(vc)),
        "flows still use it"
    );
    a.set_active(BTreeSet::new());
    let out = a.expire(t + grace * 2, unix_now());
    assert!(out.contains(&Effect::RemoveRoute(vc)));
    assert!(!out.contains(&Effect::RemoveRoute(vb)));
}

#[test]
fn a_lost_member_keeps_its_path_for_the_grace_period_and_a_leaving_one_goes_at_once() {
    let c = Cluster::new(3);
    let t = Instant::now();
    let (vb, vc) = (c.hosts[1].vip, c.hosts[2].vip);
    let (mut a, _) = paired(&c, t);
    let grace = Limits::new(HANDSHAKE, LIFETIME).absence_grace;
    assert!(a.left("broker", vb, false, t).is_empty());
    assert!(a.expire(t + grace / 2, unix_now()).is_empty());
    // Back before the grace period ends: nothing changes.
    a.joined("broker", &c.info(1), t + grace / 2, unix_now());
    assert!(a.expire(t + grace * 2, unix_now()).is_empty());
    a.left("broker", vb, false, t + grace * 2);
    let out = a.expire(t + grace * 4, unix_now());
    assert!(out.contains(&Effect::RemovePeer(vb)));
    assert!(
        !out.contains(&Effect::CloseFlows(vb)),
        "a lost member's flows are not cut"
    );

    let out = a.left("broker", vc, true, t);
    assert!(out.contains(&Effect::RemovePeer(vc)));
}

#[test]
fn a_revoked_member_is_forgotten_and_its_flows_are_cut() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let vb = c.hosts[1].vip;
    let (mut a, _) = paired(&c, t);
    let list = Revocations {
        cluster: a.trust.cluster,
        version: 1,
        issued_at: unix_now(),
        serials: vec![2],
    };
    let out = a.revocations(&Signed::sign(&list, &c.master.pair));
    assert!(out.contains(&Effect::RemovePeer(vb)));
    assert!(out.contains(&Effect::CloseFlows(vb)));
    assert!(a.routed_sessions().is_empty());
    // A broker that relays the revoked record again is not believed.
    assert!(a.joined("broker", &c.info(1), t, unix_now()).is_empty());
}

#[test]
fn a_changed_record_is_authenticated_again() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let vb = c.hosts[1].vip;
    let (mut a, _) = paired(&c, t);
    let mut moved = c.info(1);
    moved.addresses = vec![Ipv4Addr::new(198, 18, 0, 99)];
    let out = a.joined("broker", &moved, t, unix_now());
    let entry = kernel_entry(&out, vb).unwrap();
    assert_eq!((entry.state, entry.real), (PEER_MEMBER, [198, 18, 0, 99]));
    // Connections over its old address cannot follow it: they end.
    assert!(out.contains(&Effect::EndConnections(vb)), "{out:?}");
    assert!(a.routed_sessions().is_empty());
    assert!(matches!(
        sends(&a.held(vb, Some(syn(1)), t))[..],
        [(_, Handshake::Init(_))]
    ));
}

#[test]
fn messages_of_unknown_exchanges_and_strangers_change_nothing() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let (mut a, mut b) = (c.core(0, t), c.core(1, t));
    let init = sends(&a.held(c.hosts[1].vip, Some(syn(1)), t)).remove(0).1;
    let reply = sends(&b.relayed(c.hosts[0].vip, None, &init.encode(), t))
        .remove(0)
        .1;
    // The reply, as if from a third address: the exchange is found by its
    // id, so it proceeds; a garbled payload is ignored.
    assert!(a.relayed(c.hosts[1].vip, None, b"garbage", t).is_empty());
    // An exchange claiming to come from an address no member holds.
    let stranger = Ipv4Addr::new(240, 0, 0, 77);
    let Handshake::Init(mut from_stranger) = init.clone() else {
        unreachable!()
    };
    from_stranger.initiator = stranger;
    let out = b.relayed(stranger, None, &Handshake::Init(from_stranger).encode(), t);
    assert!(matches!(sends(&out)[..], [(to, Handshake::Refused { .. })] if to == stranger));
    assert!(installs(&out).is_empty());
    let Handshake::Reply(mut forged) = reply.clone() else {
        unreachable!()
    };
    forged.id = [9; 16];
    assert!(
        a.relayed(c.hosts[1].vip, None, &Handshake::Reply(forged).encode(), t)
            .is_empty()
    );
    // The real reply still completes the exchange.
    let out = a.relayed(c.hosts[1].vip, None, &reply.encode(), t);
    assert!(matches!(sends(&out)[..], [(_, Handshake::Confirm(_))]));
}

#[test]
fn a_burst_of_held_packets_is_kept_up_to_the_limit() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let (mut a, mut b) = (c.core(0, t), c.core(1, t));
    let vb = c.hosts[1].vip;
    let mut first = a.held(vb, Some(syn(0)), t);
    for i in 1..super::core::MAX_HELD + 10 {
        first.extend(a.held(vb, Some(vec![0x45, (i >> 8) as u8, i as u8]), t));
    }
    let overflow = a.counters().find(|(k, _)| *k == "held_overflow").unwrap().1;
    assert_eq!(overflow, 10);
    let log = run(&mut [&mut a, &mut b], vec![(0, first)], t);
    assert_eq!(resent(&log[0]).len(), super::core::MAX_HELD);
}

/// Packets the kernel hands the agent come from the wire (a punch SYN) or
/// from local stacks: whatever their bytes, the parsers and the core take
/// them without panicking. Mutations of well-formed packets (and random
/// ones), deterministic, many thousands.
#[test]
fn packets_from_the_kernel_never_panic_the_core() {
    use crate::{
        connectivity::punch,
        interposition::inject::{Syn, SynAck},
    };
    let c = Cluster::new(2);
    let t = Instant::now();
    let mut a = c.core(0, t);
    let vb = c.hosts[1].vip;
    // A SYN with options and a PVC tag, as a punch arrives, and a SYN/ACK.
    let mut syn = vec![1u8; 20 + 60];
    syn[0] = 0x45;
    syn[2..4].copy_from_slice(&80u16.to_be_bytes());
    syn[9] = 6;
    syn[12..16].copy_from_slice(&[198, 18, 0, 2]);
    syn[16..20].copy_from_slice(&[198, 18, 0, 1]);
    syn[32] = 0xf0;
    syn[33] = 0x02;
    // MSS, NOPs, then the tag in the last 20 bytes of options.
    syn[40..44].copy_from_slice(&[2, 4, 5, 180]);
    syn[60..64].copy_from_slice(&[253, 20, b'P', b'V']);
    syn[64..68].copy_from_slice(&vb.octets());
    let mut answer = syn.clone();
    answer[33] = 0x12;
    let p = punch::Punch {
        from: "198.18.0.1:80".parse().unwrap(),
        to: "198.18.0.2:4000".parse().unwrap(),
        vsrc: c.hosts[0].vip,
        vdst: vb,
        vport: 4000,
        tag_key: [1; 16],
    };
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for i in 0..20_000 {
        let mut packet = match i % 3 {
            0 => syn.clone(),
            1 => answer.clone(),
            _ => (0..next() % 80).map(|_| next() as u8).collect(),
        };
        for _ in 0..(next() % 4) {
            if packet.is_empty() {
                break;
            }
            let at = next() as usize % packet.len();
            packet[at] = next() as u8;
        }
        packet.truncate(next() as usize % 96);
        let _ = Syn::parse(&packet);
        let _ = SynAck::parse(&packet);
        let _ = punch::syn(&packet, &p);
        let _ = a.punch_arrived(&packet);
        let _ = a.answer_held(&packet, t);
        let _ = a.held(vb, Some(packet), t);
    }
}

/// A member's traversal request, as its agent would make it for a flow from
/// its port 50000 to our port 22.
fn traverse_request(c: &Cluster, core: &Core, id: u64) -> pvc_proto::handshake::Traverse {
    let (va, vb) = (c.hosts[0].vip, c.hosts[1].vip);
    let mut syn = vec![0u8; 40];
    syn[0] = 0x45;
    syn[2..4].copy_from_slice(&40u16.to_be_bytes());
    syn[8] = 64;
    syn[9] = 6;
    syn[12..16].copy_from_slice(&vb.octets());
    syn[16..20].copy_from_slice(&va.octets());
    syn[20..22].copy_from_slice(&50000u16.to_be_bytes());
    syn[22..24].copy_from_slice(&22u16.to_be_bytes());
    syn[32] = 0x50;
    syn[33] = 0x02;
    let key = core.peers[&vb].session.as_ref().unwrap().session.tag_key;
    let mut t = pvc_proto::handshake::Traverse {
        id,
        technique: pvc_common::Technique::Punch as u8,
        syn,
        client: std::net::SocketAddrV4::new(c.hosts[1].real, 50000),
        mac: [0; 32],
    };
    t.mac = crate::security::challenge::control_mac(&key, &t.signed_part());
    t
}

#[test]
fn a_traversal_request_is_served_once_and_never_over_a_flow_of_ours() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let (mut a, _b) = paired(&c, t);
    let vb = c.hosts[1].vip;
    let mut out = Vec::new();
    a.traverse(vb, traverse_request(&c, &a, 8), t, &mut out);
    assert!(!out.is_empty(), "a fresh request is served");
    // The broker delivers the same request again: refused.
    let mut again = Vec::new();
    a.traverse(vb, traverse_request(&c, &a, 8), t, &mut again);
    assert!(again.is_empty(), "{again:?}");
    // An id one of our own traversals uses: refused, ours untouched.
    a.flows.insert(
        9,
        super::traversal::Flow {
            peer: vb,
            technique: pvc_common::Technique::Punch,
            since: t,
            side: super::traversal::Side::Client {
                syn: syn(9),
                sport: 40000,
                wire_port: 40000,
                port_kept: false,
            },
            completing: false,
        },
    );
    let mut clash = Vec::new();
    a.traverse(vb, traverse_request(&c, &a, 9), t, &mut clash);
    assert!(clash.is_empty(), "{clash:?}");
    assert!(matches!(
        a.flows[&9].side,
        super::traversal::Side::Client { sport: 40000, .. }
    ));
    assert_eq!(a.counters["traversals_refused"], 2);
}

#[test]
fn a_relayed_flow_request_is_served_once() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let (mut a, _b) = paired(&c, t);
    let (va, vb) = (c.hosts[0].vip, c.hosts[1].vip);
    let key = a.peers[&vb].session.as_ref().unwrap().session.tag_key;
    let mut r = pvc_proto::handshake::RelayFlow {
        token: [5; 16],
        client: vb,
        server: va,
        client_port: 50000,
        port: 22,
        mac: [0; 32],
    };
    r.mac = crate::security::challenge::control_mac(&key, &r.signed_part());
    let accepts = |out: &[Effect]| {
        out.iter()
            .filter(|e| matches!(e, Effect::AcceptRelay(_)))
            .count()
    };
    let mut out = Vec::new();
    a.relay_in(vb, Some("broker"), r.clone(), &mut out);
    assert_eq!(accepts(&out), 1, "{out:?}");
    // The broker delivers it again: nothing more joins the relay.
    let mut again = Vec::new();
    a.relay_in(vb, Some("broker"), r, &mut again);
    assert_eq!(accepts(&again), 0, "{again:?}");
    assert_eq!(a.counters["relays_refused"], 1);
}

/// A SYN/ACK from `from` to `to`, as a stack sends it (no options).
fn answer(from: std::net::SocketAddrV4, to: std::net::SocketAddrV4) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&from.ip().octets());
    p[16..20].copy_from_slice(&to.ip().octets());
    p[20..22].copy_from_slice(&from.port().to_be_bytes());
    p[22..24].copy_from_slice(&to.port().to_be_bytes());
    p[24..28].copy_from_slice(&77u32.to_be_bytes());
    p[32] = 0x50;
    p[33] = 0x12;
    p
}

/// The server's side of a traversal: the member's SYN goes into our stack
/// with the tuple it will have on the wire (or as it came, per packet),
/// and our stack's answer in either form is punched out to the member's
/// endpoint, naming the member's own port.
#[test]
fn a_served_traversal_is_punched_with_the_answer_of_either_form() {
    use std::net::SocketAddrV4;
    let c = Cluster::new(2);
    let t = Instant::now();
    let (mut a, _b) = paired(&c, t);
    let (va, vb) = (c.hosts[0].vip, c.hosts[1].vip);
    let (ra, rb) = (c.hosts[0].real, c.hosts[1].real);
    let served = |out: &[Effect]| {
        out.iter()
            .find_map(|e| match e {
                Effect::ServeTraversal(f) => Some(f.clone()),
                _ => None,
            })
            .expect("served")
    };
    let mut out = Vec::new();
    a.traverse(vb, traverse_request(&c, &a, 8), t, &mut out);
    let flow = served(&out);
    let wire = crate::interposition::inject::Syn::parse(&flow.wire_syn()).unwrap();
    assert_eq!(
        (wire.saddr, wire.sport, wire.daddr, wire.dport),
        (rb, 50000, ra, 22)
    );
    let virtual_syn = crate::interposition::inject::Syn::parse(&flow.syn).unwrap();
    assert_eq!((virtual_syn.saddr, virtual_syn.daddr), (vb, va));
    assert_eq!(
        flow.socket_key(),
        pvc_common::SocketKey {
            peer: rb.octets(),
            peer_port: 50000,
            local_port: 22
        }
    );
    assert_eq!(flow.at_socket.vpeer, vb.octets());
    assert_eq!(flow.at_socket.vport, 50000);
    assert_eq!(flow.at_socket.flags, pvc_common::SOCKET_HOLD_ANSWER);

    let punches = |effects: &[Effect]| {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::SendPacket(p) => Some(p.clone()),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    // At the socket: our real address to the member's wire endpoint.
    let wire_answer = answer(SocketAddrV4::new(ra, 22), SocketAddrV4::new(rb, 50000));
    let p = punches(&a.answer_held(&wire_answer, t));
    assert_eq!(p.len(), 1, "one punch");
    assert_eq!(&p[0][16..20], &rb.octets(), "to the member's endpoint");
    assert_eq!(u16::from_be_bytes([p[0][22], p[0][23]]), 50000);
    // Its retransmission finds no traversal left to punch.
    assert!(punches(&a.answer_held(&wire_answer, t)).is_empty());

    // Per packet: our virtual address to the member's.
    let mut out = Vec::new();
    a.traverse(vb, traverse_request(&c, &a, 9), t, &mut out);
    let virtual_answer = answer(SocketAddrV4::new(va, 22), SocketAddrV4::new(vb, 50000));
    assert_eq!(punches(&a.answer_held(&virtual_answer, t)).len(), 1);
}

/// A SYN of a traversal translated at the socket, as tc hands it over:
/// from our real address and `sport` to the member's public address and
/// `dport`, with its PVC tag (tc tags it before it holds it).
fn wire_syn(c: &Cluster, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = untagged_wire_syn(c, sport, dport);
    p[2..4].copy_from_slice(&60u16.to_be_bytes());
    p[32] = 0xa0;
    let mut tag = vec![pvc_common::TAG_KIND, pvc_common::TAG_LEN];
    tag.extend_from_slice(&pvc_common::TAG_EXID);
    tag.extend_from_slice(&c.hosts[0].vip.octets());
    tag.extend_from_slice(&dport.to_be_bytes());
    tag.resize(pvc_common::TAG_LEN as usize, 0);
    p.extend_from_slice(&tag);
    p
}

/// A SYN translated at the socket that tc holds untagged: the first flow
/// to a member whose path is still to be authenticated.
fn untagged_wire_syn(c: &Cluster, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&c.hosts[0].real.octets());
    p[16..20].copy_from_slice(&c.hosts[1].real.octets());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&dport.to_be_bytes());
    p[32] = 0x50;
    p[33] = 0x02;
    p
}

/// The client's side of a traversal translated at the socket: the member's
/// agent gets the SYN as if sent to the virtual address; our SYN goes as it
/// is once the member's NAT expects it at the application's port, and is
/// refused if the member's NAT put the flow elsewhere or the traversal
/// times out (it cannot take the relay). The first traversal that works
/// lets connect() go to the member's endpoint from then on.
#[test]
fn a_traversal_translated_at_the_socket_sends_its_syn_as_it_is_or_refuses_it() {
    use std::net::SocketAddrV4;
    let c = Cluster::new(2);
    let t = Instant::now();
    let (mut a, _b) = paired(&c, t);
    let (va, vb) = (c.hosts[0].vip, c.hosts[1].vip);
    let (ra, rb) = (c.hosts[0].real, c.hosts[1].real);
    let path = crate::connectivity::Path {
        real: rb,
        local: ra,
        technique: pvc_common::Technique::Punch,
        port: 0,
    };
    a.peers.get_mut(&vb).unwrap().path = Some(path);
    let key = a.peers[&vb].session.as_ref().unwrap().session.tag_key;
    let traverse = |effects: &[Effect]| {
        sends(effects)
            .into_iter()
            .find_map(|(_, m)| match m {
                Handshake::Traverse(t) => Some(t),
                _ => None,
            })
            .expect("a traversal request")
    };
    let punched = |a: &mut Core, id: u64, server: SocketAddrV4| {
        let mut p = pvc_proto::handshake::Punched {
            id,
            server,
            mac: [0; 32],
        };
        p.mac = crate::security::challenge::control_mac(&key, &p.signed_part());
        let mut out = Vec::new();
        a.punched(vb, p, t, &mut out);
        out
    };

    let syn = wire_syn(&c, 40000, 22);
    let request = traverse(&a.held(vb, Some(syn.clone()), t));
    let virtual_syn = crate::interposition::inject::Syn::parse(&request.syn).unwrap();
    assert_eq!(
        (
            virtual_syn.saddr,
            virtual_syn.sport,
            virtual_syn.daddr,
            virtual_syn.dport
        ),
        (va, 40000, vb, 22)
    );
    assert_eq!(request.client, SocketAddrV4::new(ra, 40000));
    let out = punched(&mut a, request.id, SocketAddrV4::new(rb, 22));
    assert_eq!(resent(&out), vec![syn], "{out:?}");
    assert!(
        !out.iter().any(|e| matches!(e, Effect::InstallFlow { .. })),
        "{out:?}"
    );
    let first = kernel_entry(&a.traversed(vb, 40000, t), vb).expect("the path is rewritten");
    assert_ne!(first.flags & pvc_common::PATH_SOCKET_TRAVERSAL, 0);
    assert!(a.traversed(vb, 40000, t).is_empty(), "once per session");

    // The member's NAT put the flow at another port: refused, and
    // connect()s go to the virtual address again (per packet).
    let moved = wire_syn(&c, 40001, 22);
    let request = traverse(&a.held(vb, Some(moved.clone()), t));
    let out = punched(&mut a, request.id, SocketAddrV4::new(rb, 2222));
    assert_eq!(refused(&out), vec![moved]);
    assert!(resent(&out).is_empty());
    let entry = kernel_entry(&out, vb).expect("the path is rewritten");
    assert_eq!(entry.flags & pvc_common::PATH_SOCKET_TRAVERSAL, 0);

    // A traversal per packet through such a NAT works, but says nothing
    // for the socket.
    let mut virtual_syn = wire_syn(&c, 40003, 22);
    virtual_syn[12..16].copy_from_slice(&va.octets());
    virtual_syn[16..20].copy_from_slice(&vb.octets());
    let request = traverse(&a.held(vb, Some(virtual_syn), t));
    let out = punched(&mut a, request.id, SocketAddrV4::new(rb, 2222));
    assert!(out.iter().any(|e| matches!(e, Effect::InstallFlow { .. })));
    assert!(a.traversed(vb, 40003, t).is_empty(), "not at the socket");

    // No answer in time: refused, not re-sent towards the relay.
    a.peers
        .get_mut(&vb)
        .unwrap()
        .session
        .as_mut()
        .unwrap()
        .traversed = true;
    let late = wire_syn(&c, 40002, 22);
    let _ = traverse(&a.held(vb, Some(late.clone()), t));
    let mut out = Vec::new();
    a.set_active(BTreeSet::from([vb]));
    a.expire_flows(
        t + super::traversal::TRAVERSAL_TIMEOUT + Duration::from_millis(10),
        &mut out,
    );
    assert_eq!(refused(&out), vec![late]);
    assert!(resent(&out).is_empty());
    let entry = kernel_entry(&out, vb).expect("the path is rewritten");
    assert_eq!(entry.flags & pvc_common::PATH_SOCKET_TRAVERSAL, 0);

    // The path no longer takes a traversal (the pair moved to the relay)
    // when the agent gets such a SYN: refused, not sent past the path.
    a.peers.get_mut(&vb).unwrap().path = Some(crate::connectivity::Path {
        technique: pvc_common::Technique::Relay,
        ..path
    });
    let stray = wire_syn(&c, 40004, 22);
    let out = a.held(vb, Some(stray.clone()), t);
    assert_eq!(refused(&out), vec![stray]);
    assert!(resent(&out).is_empty());
}

/// The first flow to a member over a direct path goes at the socket from
/// connect() on: the kernel's entry for the member names the path the
/// agents will authenticate, the flow's SYN (untagged) waits for the
/// exchange and then goes out again for tc to tag. Over a path that turned
/// out to need the agents for every flow, it is refused, and the next
/// connect() takes the path from the virtual address.
#[test]
fn a_first_flow_at_the_socket_waits_for_the_path_and_goes_out_again_for_tc_to_tag() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let (mut a, mut b) = (c.core(0, t), c.core(1, t));
    let vb = c.hosts[1].vip;
    let mut out = Vec::new();
    a.publish_member(vb, &mut out);
    let entry = kernel_entry(&out, vb).expect("the member's entry");
    assert_eq!(entry.state, pvc_common::PEER_MEMBER);
    assert_eq!(entry.real, c.hosts[1].real.octets());
    assert_eq!(entry.flags & pvc_common::PATH_PER_FLOW, 0);

    let first = untagged_wire_syn(&c, 40000, 22);
    let held = a.held(vb, Some(first.clone()), t);
    assert!(resent(&held).is_empty() && refused(&held).is_empty());
    let log = run(&mut [&mut a, &mut b], vec![(0, held)], t);
    assert_eq!(resent(&log[0]), vec![first]);
    // The path came up between such a SYN and its event: out at once.
    let late = untagged_wire_syn(&c, 40001, 22);
    assert_eq!(resent(&a.held(vb, Some(late.clone()), t)), vec![late]);

    // A member whose path needs a traversal per flow: its kernel entry
    // says so (connect4 leaves its flows at the virtual address), and a
    // SYN that went to the socket meanwhile is refused once the path is up.
    let (mut a, mut b) = (c.core(0, t), c.core(1, t));
    let punch = crate::connectivity::Path {
        real: c.hosts[1].real,
        local: c.hosts[0].real,
        technique: pvc_common::Technique::Punch,
        port: 0,
    };
    a.peers.get_mut(&vb).unwrap().path = Some(punch);
    let mut out = Vec::new();
    a.publish_member(vb, &mut out);
    let entry = kernel_entry(&out, vb).unwrap();
    assert_ne!(entry.flags & pvc_common::PATH_PER_FLOW, 0);
    let stray = untagged_wire_syn(&c, 40002, 22);
    let held = a.held(vb, Some(stray.clone()), t);
    let log = run(&mut [&mut a, &mut b], vec![(0, held)], t);
    assert_eq!(refused(&log[0]), vec![stray]);
    assert!(resent(&log[0]).is_empty());
}

/// A session renewed over the same path keeps connect()s at the socket
/// for a member whose traversals kept its port; one with another address
/// starts over.
#[test]
fn a_renewed_session_keeps_what_its_traversals_showed() {
    let c = Cluster::new(2);
    let t = Instant::now();
    let (mut a, _b) = paired(&c, t);
    let vb = c.hosts[1].vip;
    a.peers.get_mut(&vb).unwrap().path = Some(crate::connectivity::Path {
        real: c.hosts[1].real,
        local: c.hosts[0].real,
        technique: pvc_common::Technique::Punch,
        port: 0,
    });
    let established = a.peers.get_mut(&vb).unwrap().session.as_mut().unwrap();
    established.traversed = true;
    let session = established.session.clone();

    let out = a.installed(session.clone(), t);
    let entry = kernel_entry(&out, vb).expect("the kernel path with the flag");
    assert_ne!(entry.flags & pvc_common::PATH_SOCKET_TRAVERSAL, 0);
    assert!(a.peers[&vb].session.as_ref().unwrap().traversed);

    let moved = crate::security::challenge::Session {
        peer_real: std::net::Ipv4Addr::new(198, 18, 99, 9),
        ..session
    };
    let out = a.installed(moved, t);
    assert!(kernel_entry(&out, vb).is_none(), "{out:?}");
    assert!(!a.peers[&vb].session.as_ref().unwrap().traversed);
}
