//! What `pvc status` shows: the agent's identity and state, its members and
//! their paths, the flows in the kernel and the counters.

use std::net::Ipv4Addr;

use pvc_proto::PublicKey;

use super::agent::Agent;
use crate::{
    config::Config,
    control::{self, PeerStatus, Status},
    security::membership::Trust,
};

/// A status with what every agent knows, running or not.
pub(super) fn base(
    state: &str,
    config: &Config,
    host_key: &PublicKey,
    trust: &Trust,
    uplink: &str,
    real_ip: Ipv4Addr,
    advertised: &[Ipv4Addr],
) -> Status {
    Status {
        state: state.into(),
        instance: config.instance.clone(),
        cluster: trust.cluster.to_string(),
        host_key: host_key.to_string(),
        name: config.name.clone(),
        virtual_ip: config.virtual_ip,
        uplink: uplink.to_string(),
        real_ip,
        advertised: advertised.to_vec(),
        revocations_version: trust.revocations.version,
        policy_version: trust.policy.version,
        flow_capacity: config.interposition.max_flows.saturating_mul(2),
        ..Status::default()
    }
}

impl Agent {
    pub fn status(&self) -> Status {
        let core = &self.core;
        let me = core.identity();
        let mut s = base(
            control::STATE_RUNNING,
            &self.config,
            &me.key.public,
            &core.trust,
            &self.uplink.name,
            me.real_ip,
            &me.advertised,
        );
        s.broker = core.brokers.keys().next().cloned();
        s.brokers = core
            .brokers
            .iter()
            .map(|(b, observed)| control::BrokerStatus {
                broker: b.clone(),
                observed: *observed,
            })
            .collect();
        s.broker_refusal = self.broker_refusal.clone();
        s.site = self.discovery.site;
        s.takeover = self.datapath.reused;
        s.admitted = core.own.is_some();
        s.standing = super::service::standing_name(self.standing).into();
        s.peers = core
            .peers
            .values()
            .map(|p| PeerStatus {
                name: p.member.name.clone(),
                virtual_ip: p.member.virtual_ip,
                addresses: p.member.addresses.clone(),
                groups: p.member.groups.clone(),
                authenticated: p.session.is_some(),
                path: p
                    .session
                    .as_ref()
                    .map(|s| (s.session.peer_real, p.technique().name().to_string())),
                technique: p.path.map(|path| path.technique.name().to_string()),
                session_age_secs: p.session.as_ref().map(|s| s.since.elapsed().as_secs()),
            })
            .collect();
        s.flows = self.datapath.maps.flows();
        s.flows.extend(self.datapath.maps.socket_flow_entries());
        s.relayed = self.relaying.flows.values().cloned().collect();
        s.flow_capacity = self.datapath.maps.capacity;
        s.flows_opened = self.flows_opened.clone();
        s.agent_counters = core
            .counters()
            .chain(self.counters.iter().map(|(k, v)| (*k, *v)))
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        s.drops = self
            .datapath
            .maps
            .drops()
            .into_iter()
            .map(|(r, n)| (r.name().to_string(), n))
            .collect();
        s.traffic = self.datapath.maps.counters();
        s.programs = self
            .datapath
            .program_stats()
            .into_iter()
            .map(|(name, ns, count)| (name, (ns, count)))
            .collect();
        s
    }
}
