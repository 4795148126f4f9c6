//! The masquerading map seen from userspace: listing flows and removing
//! those that ended (the kernel creates entries, the agent retires them).

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use pvc_common::{
    DIRECTION_EGRESS, DIRECTION_INGRESS, FLOW_AWAIT_SYN, FLOW_AWAIT_SYNACK, FlowKey, IPPROTO_ICMP,
    IPPROTO_TCP, Masquerade, MasqueradingPorts, SocketKey, SocketPeer, TCP_FIN, TCP_RST, Technique,
};
use serde::{Deserialize, Serialize};

use super::maps::Maps;

/// One direction of a flow, for `pvc status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FlowEntry {
    pub proto: String,
    /// "egress" (virtual -> real) or "ingress" (real -> virtual).
    pub direction: String,
    pub from: String,
    pub to: String,
    pub peer: Ipv4Addr,
    pub technique: String,
    pub idle_secs: u64,
    pub closing: bool,
}

/// When entries expire.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub idle: Duration,
    pub closed: Duration,
    pub icmp: Duration,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_coarse_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn endpoint(addr: [u8; 4], port: u16, proto: u8) -> String {
    if proto == IPPROTO_ICMP {
        format!("{}#{port}", Ipv4Addr::from(addr))
    } else {
        format!("{}:{port}", Ipv4Addr::from(addr))
    }
}

fn proto_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_ICMP => "icmp".into(),
        other => other.to_string(),
    }
}

/// How long an entry may wait for a traversal's handshake (the agents give
/// a traversal 1 s before the relay takes over).
const TRAVERSAL_LEFTOVER: Duration = Duration::from_secs(10);

/// The wire tuples of this network namespace's TCP sockets and connection
/// requests, as socket-flows keys (`/proc/net/tcp`: addresses as the
/// kernel's network-order word in hex, ports in host order).
fn tcp_tuples() -> std::io::Result<std::collections::HashSet<SocketKey>> {
    let text = std::fs::read_to_string("/proc/net/tcp")?;
    Ok(text.lines().skip(1).filter_map(parse_tcp_line).collect())
}

fn parse_tcp_line(line: &str) -> Option<SocketKey> {
    let mut fields = line.split_whitespace().skip(1);
    let endpoint = |f: &str| -> Option<([u8; 4], u16)> {
        let (addr, port) = f.split_once(':')?;
        Some((
            u32::from_str_radix(addr, 16).ok()?.to_ne_bytes(),
            u16::from_str_radix(port, 16).ok()?,
        ))
    };
    let (_, local_port) = endpoint(fields.next()?)?;
    let (peer, peer_port) = endpoint(fields.next()?)?;
    Some(SocketKey {
        peer,
        peer_port,
        local_port,
    })
}

/// Whether a TCP listener of this network namespace takes connections to
/// `addr:port` (bound to it or to the wildcard address, IPv4 or a dual-stack
/// IPv6 one): a member's SYN to that address then reaches it as it is.
/// Asked through sock_diag, which walks the listeners only (reading
/// `/proc/net/tcp` walks the whole host's connection table: milliseconds,
/// on the way of a connection being set up).
pub fn listens_on(addr: Ipv4Addr, port: u16) -> std::io::Result<bool> {
    use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6};
    for family in [AF_INET, AF_INET6] {
        if tcp_listeners(family)?
            .into_iter()
            .any(|(a, p)| p == port && takes(a, addr))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a listener bound to `bound` takes connections to `addr`.
fn takes(bound: std::net::IpAddr, addr: Ipv4Addr) -> bool {
    match bound {
        std::net::IpAddr::V4(b) => b.is_unspecified() || b == addr,
        std::net::IpAddr::V6(b) => b.is_unspecified() || b.to_ipv4_mapped() == Some(addr),
    }
}

/// The local address and port of every TCP listener of this network
/// namespace in `family` (sock_diag dump).
fn tcp_listeners(family: u8) -> std::io::Result<Vec<(std::net::IpAddr, u16)>> {
    use netlink_packet_core::{
        NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    };
    use netlink_packet_sock_diag::{
        SockDiagMessage,
        constants::IPPROTO_TCP,
        inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    };
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

    let socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut request = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN,
            socket_id: if family == netlink_packet_sock_diag::constants::AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        })
        .into(),
    );
    request.finalize();
    let mut buf = vec![0; request.buffer_len()];
    request.serialize(&mut buf);
    socket.send(&buf, 0)?;

    let mut listeners = Vec::new();
    let mut received = vec![0; 32 * 1024];
    loop {
        let size = socket.recv(&mut &mut received[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = <NetlinkMessage<SockDiagMessage>>::deserialize(&received[offset..size])
                .map_err(|e| std::io::Error::other(format!("sock_diag answer: {e}")))?;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                    let id = &r.header.socket_id;
                    listeners.push((id.source_address, id.source_port));
                }
                NetlinkPayload::Done(_) => return Ok(listeners),
                NetlinkPayload::Error(e) => {
                    return Err(std::io::Error::other(format!("sock_diag: {e:?}")));
                }
                _ => {}
            }
            let len = message.header.length as usize;
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}

/// Where flows masqueraded per packet on paths that sockets also carry
/// take their source port on the wire, from this network namespace's
/// ephemeral range.
pub fn masquerading_ports() -> anyhow::Result<MasqueradingPorts> {
    const RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let text =
        std::fs::read_to_string(RANGE).map_err(|e| anyhow::anyhow!("cannot read {RANGE}: {e}"))?;
    let mut bounds = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(first)), Some(Ok(last))) = (bounds.next(), bounds.next()) else {
        anyhow::bail!("{RANGE} holds {text:?}, not two port numbers");
    };
    let ports = ports_outside(first, last);
    if ports.count == 0 {
        tracing::warn!(
            "the ephemeral port range {first}-{last} leaves no {MIN_MOVED_PORTS} unprivileged \
             ports outside it: with translation at the socket, a connect() may get the wire \
             ports of a flow masqueraded per packet and be refused; narrow \
             net.ipv4.ip_local_port_range"
        );
    }
    Ok(ports)
}

/// The fewest ports worth moving flows to.
const MIN_MOVED_PORTS: u16 = 1024;

/// Ports the kernel never picks for a connect(): above its ephemeral range
/// `first..=last`, else below it but not privileged (a server may trust a
/// source port below 1024 to be root's).
fn ports_outside(first: u16, last: u16) -> MasqueradingPorts {
    let (first, last) = (first.min(last), first.max(last));
    let above = u16::MAX - last;
    let below = first.saturating_sub(1024);
    let (start, count) = if above >= MIN_MOVED_PORTS {
        (last + 1, above)
    } else if below >= MIN_MOVED_PORTS {
        (1024, below)
    } else {
        (0, 0)
    };
    MasqueradingPorts {
        ephemeral_first: first,
        ephemeral_last: last,
        first: start,
        count,
    }
}

/// How long a masquerading hint lasts: longer than any TCP entry can sit
/// idle before the garbage collection removes it (the longest timeout, one
/// collection interval, and room for the once-a-second refresh and clock
/// ticks), so that no live entry's hint ever lapses.
pub fn hint_lifetime(t: &Timeouts, gc_interval: Duration) -> Duration {
    t.idle.max(t.closed).max(TRAVERSAL_LEFTOVER) + gc_interval + Duration::from_secs(5)
}

fn expired(k: &FlowKey, m: &Masquerade, now: u64, t: &Timeouts) -> bool {
    let idle = Duration::from_nanos(now.saturating_sub(m.last_seen_ns));
    let limit = if k.proto == IPPROTO_ICMP {
        t.icmp
    } else if m.flags & (FLOW_AWAIT_SYN | FLOW_AWAIT_SYNACK) != 0 {
        // A traversal the agents installed that never completed (its
        // handshake clears the flag within a round trip): left, it would
        // keep the member looking busy for the idle timeout.
        TRAVERSAL_LEFTOVER
    } else if m.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        t.closed
    } else {
        t.idle
    };
    idle > limit
}

impl Maps {
    pub fn flows(&self) -> Vec<FlowEntry> {
        let now = monotonic_ns();
        self.masquerading
            .iter()
            .filter_map(Result::ok)
            .map(|(k, m)| FlowEntry {
                proto: proto_name(k.proto),
                direction: if k.direction == DIRECTION_EGRESS {
                    "egress"
                } else {
                    "ingress"
                }
                .into(),
                from: format!(
                    "{} -> {}",
                    endpoint(k.saddr, k.sport, k.proto),
                    endpoint(k.daddr, k.dport, k.proto)
                ),
                to: format!(
                    "{} -> {}",
                    endpoint(m.saddr, m.sport, k.proto),
                    endpoint(m.daddr, m.dport, k.proto)
                ),
                peer: Ipv4Addr::from(m.peer),
                technique: Technique::from_u8(m.technique)
                    .map_or("unknown", Technique::name)
                    .into(),
                idle_secs: now.saturating_sub(m.last_seen_ns) / 1_000_000_000,
                closing: m.tcp_flags & (TCP_FIN | TCP_RST) != 0,
            })
            .collect()
    }

    /// Flows translated at the socket, as `pvc flows` shows them: one
    /// line per flow, direction "socket", from its virtual tuple to its
    /// tuple on the wire (what `ss` shows).
    pub fn socket_flow_entries(&self) -> Vec<FlowEntry> {
        let (virtual_addr, real_addr) = self.addresses();
        self.socket_flows()
            .into_iter()
            .map(|(k, p)| FlowEntry {
                proto: "tcp".into(),
                direction: "socket".into(),
                from: format!(
                    "{} -> {}",
                    endpoint(virtual_addr, p.local_vport(k.local_port), IPPROTO_TCP),
                    endpoint(p.vpeer, p.vport, IPPROTO_TCP)
                ),
                to: format!(
                    "{} -> {}",
                    endpoint(real_addr, k.local_port, IPPROTO_TCP),
                    endpoint(k.peer, k.peer_port, IPPROTO_TCP)
                ),
                peer: Ipv4Addr::from(p.vpeer),
                technique: Technique::from_u8(p.technique)
                    .map_or("unknown", Technique::name)
                    .into(),
                idle_secs: 0,
                closing: false,
            })
            .collect()
    }

    /// Removes the entries of flows translated at the socket whose socket
    /// is gone, missing from two passes in a row (the entry comes with the
    /// SYN, just before its connection request). sock_ops removes an entry
    /// when its socket closes; this catches a member's connection request
    /// that never completed (no socket ever closes for it). Returns the
    /// number removed.
    pub fn collect_socket_garbage(&mut self) -> usize {
        let flows = self.socket_flows();
        if flows.is_empty() {
            self.socket_unseen.clear();
            return 0;
        }
        let live = match tcp_tuples() {
            Ok(live) => live,
            Err(e) => {
                tracing::warn!("cannot read this host's TCP sockets (/proc/net/tcp): {e}");
                return 0;
            }
        };
        let mut missing = std::collections::HashSet::new();
        let mut removed = 0;
        for (k, _) in flows {
            if live.contains(&k) {
                continue;
            }
            if self.socket_unseen.contains(&k) {
                removed += self.socket_flows.remove(&k).is_ok() as usize;
            } else {
                missing.insert(k);
            }
        }
        self.socket_unseen = missing;
        removed
    }

    /// Whether a flow that runs holds the wire tuple of the flow `key`
    /// rewritten to `to` (as an agent-installed traversal would): one
    /// carried at the socket, or one masqueraded per packet that has not
    /// closed. A traversal's new flow must not take it: its entries would
    /// turn the running flow's packets into its own.
    pub fn wire_tuple_taken(&self, key: &FlowKey, to: &Masquerade) -> bool {
        let ingress = if key.direction == DIRECTION_INGRESS {
            *key
        } else {
            to.reverse(key).0
        };
        let wire = SocketKey {
            peer: ingress.saddr,
            peer_port: ingress.sport,
            local_port: ingress.dport,
        };
        self.socket_flows.get(&wire, 0).is_ok()
            || self
                .masquerading
                .get(&ingress, 0)
                .is_ok_and(|m| m.tcp_flags & (TCP_FIN | TCP_RST) == 0)
    }

    /// The socket-flows map: flows translated at the socket, by wire tuple.
    pub fn socket_flows(&self) -> Vec<(SocketKey, SocketPeer)> {
        self.socket_flows.iter().filter_map(Result::ok).collect()
    }

    /// Entries in the masquerading map now (two per flow).
    pub fn flow_entries(&self) -> usize {
        self.masquerading.keys().filter(Result::is_ok).count()
    }

    /// Removes every flow with `peer`, both directions (revocation, expiry).
    /// Returns the number of entries removed.
    pub fn close_flows_with(&mut self, peer: Ipv4Addr) -> usize {
        let doomed: Vec<FlowKey> = self
            .masquerading
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, m)| Ipv4Addr::from(m.peer) == peer)
            .map(|(k, _)| k)
            .collect();
        doomed
            .iter()
            .filter(|k| self.masquerading.remove(k).is_ok())
            .count()
    }

    /// Removes expired flows, both directions together (a flow is expired
    /// when either direction says so: a RST is seen by one side only).
    /// Returns the number of entries removed and the peers that still have flows.
    pub fn collect_garbage(&mut self, t: &Timeouts) -> (usize, BTreeSet<Ipv4Addr>) {
        let now = monotonic_ns();
        let mut doomed = Vec::new();
        let mut active = BTreeSet::new();
        for (k, m) in self.masquerading.iter().filter_map(Result::ok) {
            if expired(&k, &m, now, t) {
                doomed.push(k);
                doomed.push(k.twin(&m));
            } else {
                active.insert(Ipv4Addr::from(m.peer));
            }
        }
        // Flows translated at the socket keep their members busy as well;
        // their entries go with their sockets (sock_ops).
        for (_, p) in self.socket_flows() {
            active.insert(Ipv4Addr::from(p.vpeer));
        }
        let mut removed = 0;
        for k in doomed {
            if self.masquerading.remove(&k).is_ok() {
                removed += 1;
            }
        }
        (removed, active)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_that_take_the_real_address_are_told_from_the_others() {
        let real = Ipv4Addr::new(198, 18, 0, 1);
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        for bound in ["0.0.0.0", "198.18.0.1", "::", "::ffff:198.18.0.1"] {
            assert!(takes(ip(bound), real), "{bound}");
        }
        for bound in [
            "240.0.0.1",
            "127.0.0.1",
            "::1",
            "::ffff:240.0.0.1",
            "2001:db8::1",
        ] {
            assert!(!takes(ip(bound), real), "{bound}");
        }
    }

    /// A listener this process opens is found; a port without one is not.
    #[test]
    fn sock_diag_finds_this_namespaces_listeners() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = tcp_listeners(netlink_packet_sock_diag::constants::AF_INET).unwrap();
        assert!(
            found.contains(&(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
            "{found:?}"
        );
        drop(l);
        let found = tcp_listeners(netlink_packet_sock_diag::constants::AF_INET).unwrap();
        assert!(
            !found.iter().any(|(a, p)| *p == port && a.is_loopback()),
            "{found:?}"
        );
    }

    #[test]
    fn moved_ports_lie_outside_the_ephemeral_range_and_above_1023() {
        let p = ports_outside(32768, 60999);
        assert_eq!((p.first, p.count), (61000, 4536));
        assert!(!p.moves(61000) && p.moves(32768) && p.moves(60999) && !p.moves(22));
        let key = FlowKey::new([240, 0, 0, 1], [240, 0, 0, 2], 40000, 22, IPPROTO_TCP, 0);
        for i in 0..64 {
            let c = p.candidate(&key, i);
            assert!((61000..=65535).contains(&c), "{c}");
        }
        let p = ports_outside(1024, 65000);
        assert_eq!((p.first, p.count), (0, 0));
        assert!(!p.moves(40000));
        let p = ports_outside(10000, 65535);
        assert_eq!((p.first, p.count), (1024, 8976));
        assert!((1024..10000).contains(&p.candidate(&key, 3)));
    }

    #[test]
    fn proc_net_tcp_lines_give_wire_tuples() {
        let line = "   3: 010012C6:9C40 020012C6:1BBC 01 00000000:00000000 00:00000000 \
                    00000000     0        0 12345 1 0000000000000000 20 4 30 10 -1";
        assert_eq!(
            parse_tcp_line(line),
            Some(SocketKey {
                peer: [198, 18, 0, 2],
                peer_port: 7100,
                local_port: 40000,
            })
        );
        assert_eq!(parse_tcp_line("  sl  local_address rem_address"), None);
        assert_eq!(parse_tcp_line(""), None);
    }

    fn timeouts() -> Timeouts {
        Timeouts {
            idle: Duration::from_secs(100),
            closed: Duration::from_secs(10),
            icmp: Duration::from_secs(5),
        }
    }

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            proto,
            ..Default::default()
        }
    }

    #[test]
    fn expiry_depends_on_protocol_and_tcp_state() {
        let s = 1_000_000_000u64;
        let now = 1000 * s;
        let m = |idle: u64, flags: u8| Masquerade {
            last_seen_ns: now - idle * s,
            tcp_flags: flags,
            ..Default::default()
        };
        let t = timeouts();
        assert!(!expired(&key(IPPROTO_TCP), &m(50, 0), now, &t));
        assert!(expired(&key(IPPROTO_TCP), &m(101, 0), now, &t));
        assert!(!expired(&key(IPPROTO_TCP), &m(9, TCP_FIN), now, &t));
        assert!(expired(&key(IPPROTO_TCP), &m(11, TCP_FIN), now, &t));
        assert!(expired(&key(IPPROTO_TCP), &m(11, TCP_RST), now, &t));
        assert!(expired(&key(IPPROTO_ICMP), &m(6, 0), now, &t));
        // A traversal that never completed goes long before the idle
        // timeout; a completed one (flag cleared) stays.
        let waiting = |idle: u64, flags: u8| Masquerade {
            flags,
            ..m(idle, 0)
        };
        for flag in [FLOW_AWAIT_SYN, FLOW_AWAIT_SYNACK] {
            assert!(!expired(&key(IPPROTO_TCP), &waiting(5, flag), now, &t));
            assert!(expired(&key(IPPROTO_TCP), &waiting(11, flag), now, &t));
        }
        assert!(!expired(&key(IPPROTO_TCP), &waiting(11, 0), now, &t));
        // An entry touched after the agent read the clock is not expired.
        let future = Masquerade {
            last_seen_ns: now + s,
            ..Default::default()
        };
        assert!(!expired(&key(IPPROTO_TCP), &future, now, &t));
    }
}
