//! Typed access to the pinned maps.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use anyhow::{Context as _, anyhow};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
};
use pvc_common::{
    DIRECTION_INGRESS, DropReason, FlowKey, HINT_LIFETIME_SLOT, IPPROTO_TCP, Masquerade,
    MasqueradingPorts, PeerPath, PolicyKey, Settings, SocketKey, SocketPeer, TRAFFIC_EGRESS,
    TRAFFIC_INGRESS, Traffic, hint_until,
};
use serde::{Deserialize, Serialize};

use pvc_common::maps as names;

use super::{events::EventStream, pins};
use crate::security::policy::{Compiled, PolicyEntry};

pub struct Maps {
    pub(super) masquerading: HashMap<MapData, FlowKey, Masquerade>,
    peers: HashMap<MapData, [u8; 4], PeerPath>,
    settings: Array<MapData, Settings>,
    policy: LpmTrie<MapData, PolicyKey, u8>,
    drops: PerCpuArray<MapData, u64>,
    traffic: PerCpuArray<MapData, Traffic>,
    relay_listener: aya::maps::SockMap<MapData>,
    clock: Array<MapData, u64>,
    pub(super) socket_flows: HashMap<MapData, SocketKey, SocketPeer>,
    pub(super) hints: Array<MapData, u64>,
    ports: Array<MapData, MasqueradingPorts>,
    /// Socket flows whose socket the last garbage collection did not find.
    pub(super) socket_unseen: std::collections::HashSet<SocketKey>,
    /// Entries the masquerading map holds at most (two per flow).
    pub capacity: u32,
    /// The cgroup whose processes use the virtual network.
    pub cgroup: pins::CgroupScope,
    /// Whether this host is still a member (`STANDING_*`).
    standing: u8,
}

/// Masqueraded traffic since the maps were created.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub egress_packets: u64,
    pub egress_bytes: u64,
    pub ingress_packets: u64,
    pub ingress_bytes: u64,
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Maps {
    pub(super) fn take(
        ebpf: &mut Ebpf,
        capacity: u32,
        cgroup: pins::CgroupScope,
    ) -> anyhow::Result<(Self, EventStream)> {
        let maps = Self {
            masquerading: take(ebpf, names::MASQUERADING)?,
            peers: take(ebpf, names::PEERS)?,
            settings: take(ebpf, names::SETTINGS)?,
            policy: take(ebpf, names::POLICY)?,
            drops: take(ebpf, names::DROPS)?,
            traffic: take(ebpf, names::TRAFFIC)?,
            relay_listener: take(ebpf, names::RELAY_LISTENER)?,
            clock: take(ebpf, names::CLOCK)?,
            socket_flows: take(ebpf, names::SOCKET_FLOWS)?,
            hints: take(ebpf, names::MASQUERADING_HINTS)?,
            ports: take(ebpf, names::MASQUERADING_PORTS)?,
            socket_unseen: Default::default(),
            capacity,
            cgroup,
            standing: pvc_common::STANDING_MEMBER,
        };
        let events: RingBuf<MapData> = take(ebpf, names::EVENTS)?;
        Ok((maps, EventStream::new(events)?))
    }

    /// Tells the programs the time (`monotonic_ns`), which they stamp on
    /// the flows they see: the agent keeps it current (every 250 ms) so
    /// that no packet pays for a clock read.
    pub fn tick_clock(&mut self) -> anyhow::Result<()> {
        self.set_clock(super::flows::monotonic_ns())
    }

    pub(super) fn set_clock(&mut self, ns: u64) -> anyhow::Result<()> {
        self.clock
            .set(0, ns, 0)
            .context("cannot write the clock map")
    }

    /// The agent's relay listener, where sk_lookup sends connections to
    /// members reached through the relay.
    pub fn set_relay_listener(
        &mut self,
        listener: &impl std::os::fd::AsRawFd,
    ) -> anyhow::Result<()> {
        self.relay_listener
            .set(0, listener, 0)
            .context("cannot put the relay listener in its sockmap")
    }

    /// Tells the programs who this host is, and which directions the policy
    /// restricts; until then they let everything pass.
    pub fn set_identity(
        &mut self,
        virtual_ip: Ipv4Addr,
        real: Ipv4Addr,
        policy: &Compiled,
    ) -> anyhow::Result<()> {
        let s = Settings {
            virtual_addr: virtual_ip.octets(),
            real_addr: real.octets(),
            ready: 1,
            policy_out: policy.restrict_out as u8,
            policy_in: policy.restrict_in as u8,
            standing: self.standing,
            cgroup_level: self.cgroup.level,
            cgroup_id: self.cgroup.id,
        };
        self.settings
            .set(0, s, 0)
            .context("cannot write the settings map")
    }

    /// This host's virtual and real addresses, as the programs know them.
    pub fn addresses(&self) -> ([u8; 4], [u8; 4]) {
        self.settings
            .get(&0, 0)
            .map_or(([0; 4], [0; 4]), |s| (s.virtual_addr, s.real_addr))
    }

    /// Whether this host is still a member (`STANDING_*`), for connect().
    pub fn set_standing(&mut self, standing: u8) -> anyhow::Result<()> {
        self.standing = standing;
        let mut s = self
            .settings
            .get(&0, 0)
            .context("cannot read the settings map")?;
        s.standing = standing;
        self.settings
            .set(0, s, 0)
            .context("cannot write the settings map")
    }

    /// Where flows masqueraded per packet on paths that sockets also carry
    /// take their source port on the wire.
    pub fn set_masquerading_ports(&mut self, ports: MasqueradingPorts) -> anyhow::Result<()> {
        self.ports
            .set(0, ports, 0)
            .context("cannot write the masquerading ports")
    }

    /// How long the masquerading hints last (`hint_lifetime`).
    pub fn set_hint_lifetime(&mut self, lifetime: std::time::Duration) -> anyhow::Result<()> {
        self.hints
            .set(HINT_LIFETIME_SLOT, lifetime.as_nanos() as u64, 0)
            .context("cannot write the masquerading hints' lifetime")
    }

    /// Makes the hint of an ingress TCP entry live for a lifetime from now,
    /// before the entry goes in (the programs skip the lookup of a packet
    /// whose hint has lapsed).
    pub fn hint(&mut self, key: &FlowKey) -> anyhow::Result<()> {
        if key.proto != IPPROTO_TCP || key.direction != DIRECTION_INGRESS {
            return Ok(());
        }
        let lifetime = self.hints.get(&HINT_LIFETIME_SLOT, 0).unwrap_or(0);
        let until = hint_until(super::flows::monotonic_ns(), lifetime);
        let slot = key.hint_slot();
        if self.hints.get(&slot, 0).unwrap_or(0) < until {
            self.hints
                .set(slot, until, 0)
                .context("cannot write a masquerading hint")?;
        }
        Ok(())
    }

    /// Hints for every ingress TCP entry there is (entries a previous
    /// agent's programs created may have none).
    pub fn hint_existing(&mut self) {
        let keys: Vec<FlowKey> = self.masquerading.keys().filter_map(Result::ok).collect();
        for k in keys {
            if let Err(e) = self.hint(&k) {
                tracing::warn!("{e:#}");
            }
        }
    }

    /// Puts a flow's entries in, both directions: the reverse one (with
    /// `twin_flags`) first, so that an answer can never beat it.
    pub fn install_flow(
        &mut self,
        key: FlowKey,
        to: Masquerade,
        twin_flags: u8,
    ) -> anyhow::Result<()> {
        let (twin_key, mut twin) = to.reverse(&key);
        twin.flags = twin_flags;
        self.hint(&key)?;
        self.hint(&twin_key)?;
        self.masquerading
            .insert(twin_key, twin, 0)
            .context("cannot install a flow (is the masquerading map full?)")?;
        self.masquerading
            .insert(key, to, 0)
            .context("cannot install a flow (is the masquerading map full?)")
    }

    /// Records a flow our stack serves at the socket, by its wire tuple,
    /// before its SYN goes in (a traversal's server side).
    pub fn open_at_socket(&mut self, key: SocketKey, peer: SocketPeer) -> anyhow::Result<()> {
        self.socket_flows
            .insert(key, peer, 0)
            .context("cannot record a flow served at the socket (is socket_flows full?)")
    }

    /// Whether the programs know who this host is (the settings were written).
    pub fn settings_ready(&self) -> bool {
        self.settings.get(&0, 0).is_ok_and(|s| s.ready == 1)
    }

    pub fn set_peer(&mut self, virtual_ip: Ipv4Addr, path: PeerPath) -> anyhow::Result<()> {
        self.peers
            .insert(virtual_ip.octets(), path, 0)
            .with_context(|| format!("cannot install the path to {virtual_ip}"))
    }

    pub fn remove_peer(&mut self, virtual_ip: Ipv4Addr) -> anyhow::Result<()> {
        match self.peers.remove(&virtual_ip.octets()) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("cannot remove the path to {virtual_ip}")),
        }
    }

    /// Peers installed in the kernel (virtual address, path).
    pub fn peers(&self) -> Vec<(Ipv4Addr, PeerPath)> {
        self.peers
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Ipv4Addr::from(k), v))
            .collect()
    }

    fn policy_key(e: &PolicyEntry) -> Key<PolicyKey> {
        Key::new(
            e.prefix_len,
            PolicyKey {
                direction: e.direction,
                peer: e.peer.octets(),
                port: e.port.to_be_bytes(),
                _pad: 0,
            },
        )
    }

    /// Makes the kernel's policy map hold exactly `wanted`: adds before it
    /// removes, so that no allowed flow is refused while it changes.
    pub fn set_policy(
        &mut self,
        installed: &mut BTreeSet<PolicyEntry>,
        wanted: &BTreeSet<PolicyEntry>,
    ) -> anyhow::Result<()> {
        for e in wanted.difference(installed) {
            self.policy
                .insert(&Self::policy_key(e), 1, 0)
                .context("cannot write the policy map")?;
        }
        for e in installed.difference(wanted) {
            let _ = self.policy.remove(&Self::policy_key(e));
        }
        *installed = wanted.clone();
        Ok(())
    }

    /// The policy entries in the kernel now (left by a previous agent when
    /// the map was taken over).
    pub fn policy_entries(&self) -> BTreeSet<PolicyEntry> {
        self.policy
            .keys()
            .filter_map(Result::ok)
            .map(|k| PolicyEntry {
                direction: k.data().direction,
                peer: Ipv4Addr::from(k.data().peer),
                port: u16::from_be_bytes(k.data().port),
                prefix_len: k.prefix_len(),
            })
            .collect()
    }

    /// Drop and refusal counts by reason, summed over CPUs.
    pub fn drops(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.sum(&self.drops, *r as u32)))
            .collect()
    }

    pub fn counters(&self) -> Counters {
        let sum = |direction: u32| {
            self.traffic
                .get(&direction, 0)
                .map(|per_cpu| {
                    per_cpu.iter().fold(Traffic::default(), |a, t| Traffic {
                        packets: a.packets + t.packets,
                        bytes: a.bytes + t.bytes,
                    })
                })
                .unwrap_or_default()
        };
        let (egress, ingress) = (sum(TRAFFIC_EGRESS), sum(TRAFFIC_INGRESS));
        Counters {
            egress_packets: egress.packets,
            egress_bytes: egress.bytes,
            ingress_packets: ingress.packets,
            ingress_bytes: ingress.bytes,
        }
    }

    fn sum(&self, map: &PerCpuArray<MapData, u64>, index: u32) -> u64 {
        map.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}
