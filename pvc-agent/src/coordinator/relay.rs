//! The coordinator's side of the relay (`connectivity::relay`): which
//! flows go through a broker, the authenticated request that makes the
//! member's agent join, and the member's checks (session, MAC, policy).
//! Pure state, like the rest of `Core`: the agent moves the bytes.

use std::net::{Ipv4Addr, SocketAddrV4};

use pvc_common::Technique;
use pvc_proto::handshake::{Handshake, RelayFlow};
use tracing::{info, warn};

use super::core::{Core, Effect};
use crate::{
    connectivity::{self, relay::Token},
    security::challenge::{self, control_mac, control_mac_valid},
};

/// A relayed flow this host opens: join `broker` with `token`, after
/// sending `effects` (the offer goes first, then the member's request).
pub struct RelayPlan {
    pub token: Token,
    pub broker: String,
    pub key: [u8; 16],
    pub effects: Vec<Effect>,
}

/// A relayed flow a member opens to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayAccept {
    pub token: Token,
    pub broker: String,
    pub key: [u8; 16],
    pub client: SocketAddrV4,
    pub server: SocketAddrV4,
}

impl Core {
    /// An application connected to `server`:`port`, a member reached
    /// through the relay, from `client_port` (the kernel already checked
    /// the outbound policy in connect()).
    pub fn relay_out(
        &mut self,
        server: Ipv4Addr,
        port: u16,
        client_port: u16,
    ) -> Option<RelayPlan> {
        let p = self.peers.get(&server)?;
        let key = p.session.as_ref()?.session.tag_key;
        if p.technique() != Technique::Relay {
            return None;
        }
        let broker = self.broker_for(server)?;
        let token: Token = challenge::random().unwrap_or_default();
        let mut r = RelayFlow {
            token,
            client: self.me.virtual_ip,
            server,
            client_port,
            port,
            mac: [0; 32],
        };
        r.mac = control_mac(&key, &r.signed_part());
        self.count("relays_opened");
        Some(RelayPlan {
            token,
            broker: broker.clone(),
            key,
            effects: vec![Effect::Send {
                to: server,
                via: Some(broker),
                message: Handshake::RelayFlow(r),
            }],
        })
    }

    /// A member asks us to join a relayed flow it opened.
    pub(super) fn relay_in(
        &mut self,
        from: Ipv4Addr,
        via: Option<&str>,
        r: RelayFlow,
        out: &mut Vec<Effect>,
    ) {
        let me = self.me.virtual_ip;
        let Some(p) = self.peers.get(&from) else {
            self.count("relays_refused");
            return;
        };
        let Some(session) = p.session.as_ref().map(|s| s.session.clone()) else {
            warn!(%from, "refused a relayed flow from a member without an authenticated path");
            self.count("relays_refused");
            return;
        };
        if r.client != from
            || r.server != me
            || !control_mac_valid(&session.tag_key, &r.signed_part(), &r.mac)
        {
            warn!(%from, "refused a relayed flow whose request does not check (forged or altered)");
            self.count("relays_refused");
            return;
        }
        if !self.first_time(from, r.token) {
            warn!(%from, "refused a relayed flow whose request was served already (a replay?)");
            self.count("relays_refused");
            return;
        }
        let Some(p) = self.peers.get(&from) else {
            return;
        };
        let Some(broker) = via else {
            return;
        };
        if !self.allows_inbound(from, r.port) {
            info!(%from, port = r.port, "refused a relayed flow: the policy does not allow it");
            self.count("relays_refused");
            return;
        }
        if p.technique() != Technique::Relay {
            // Relay is a property of the pair: the member's address
            // becomes local here, which flows of ours on another path would
            // not survive.
            if self.active.contains(&from) {
                warn!(%from, "refused a relayed flow: flows to the member use another path");
                self.count("relays_refused");
                return;
            }
            let name = p.member.name.clone();
            info!(name, virtual_ip = %from, "member uses the relay to reach us: so do we");
            self.use_relay(from, out);
        }
        self.count("relays_served");
        out.push(Effect::AcceptRelay(RelayAccept {
            token: r.token,
            broker: broker.to_string(),
            key: session.tag_key,
            client: SocketAddrV4::new(from, r.client_port),
            server: SocketAddrV4::new(me, r.port),
        }));
    }

    /// Flows with `vip` go through the relay from now on: its address
    /// becomes local (sk_lookup hands connections to it to the agent).
    pub(super) fn use_relay(&mut self, vip: Ipv4Addr, out: &mut Vec<Effect>) {
        let Some(p) = self.peers.get_mut(&vip) else {
            return;
        };
        let mut path = p.path.unwrap_or(connectivity::Path {
            real: p
                .member
                .addresses
                .first()
                .copied()
                .unwrap_or(Ipv4Addr::UNSPECIFIED),
            local: self.me.real_ip,
            technique: Technique::Relay,
            port: 0,
        });
        path.technique = Technique::Relay;
        p.path = Some(path);
        p.relay_since.get_or_insert_with(std::time::Instant::now);
        out.push(Effect::RelayRoute(vip));
        if let Some(s) = &p.session {
            out.push(Effect::SetPeer(vip, s.kernel_path(&path)));
        }
    }
}

/// A relayed flow the agent is moving.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RelayedFlow {
    pub peer: Ipv4Addr,
    /// This host's end and the member's, as the application sees them.
    pub local: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub outbound: bool,
    pub broker: String,
}

/// The agent's relayed flows, and the channel their tasks end on.
pub(super) struct Relaying {
    pub listener: tokio::net::TcpListener,
    pub flows: std::collections::BTreeMap<u64, RelayedFlow>,
    next: u64,
    pub done_tx: tokio::sync::mpsc::Sender<(u64, anyhow::Result<(u64, u64)>)>,
    pub done_rx: tokio::sync::mpsc::Receiver<(u64, anyhow::Result<(u64, u64)>)>,
}

impl Relaying {
    pub fn new(listener: tokio::net::TcpListener) -> Self {
        let (done_tx, done_rx) = tokio::sync::mpsc::channel(256);
        Self {
            listener,
            flows: Default::default(),
            next: 0,
            done_tx,
            done_rx,
        }
    }

    /// Members with relayed flows running.
    pub fn peers(&self) -> std::collections::BTreeSet<Ipv4Addr> {
        self.flows.values().map(|f| f.peer).collect()
    }

    fn start<F>(&mut self, flow: RelayedFlow, task: F)
    where
        F: std::future::Future<Output = anyhow::Result<(u64, u64)>> + Send + 'static,
    {
        self.next += 1;
        let id = self.next;
        self.flows.insert(id, flow);
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let _ = done.send((id, task.await)).await;
        });
    }
}

impl super::agent::Agent {
    /// sk_lookup handed us an application's connection to a relayed member.
    pub(super) async fn relay_accepted(&mut self, app: tokio::net::TcpStream) {
        let (Ok(std::net::SocketAddr::V4(local)), Ok(std::net::SocketAddr::V4(peer))) =
            (app.local_addr(), app.peer_addr())
        else {
            return;
        };
        // local: the member's address and port the application asked for.
        let Some(plan) = self.core.relay_out(*local.ip(), local.port(), peer.port()) else {
            warn!(member = %local.ip(), "a connection to a member without a relayed path: reset");
            let _ = app.set_zero_linger();
            return;
        };
        // The offer first, on the session the request then takes.
        let _ = self.outgoing.try_send(super::broker::Outgoing {
            broker: Some(plan.broker.clone()),
            msg: pvc_proto::AgentMessage::RelayOffer {
                token: plan.token,
                to: *local.ip(),
            },
        });
        self.apply(plan.effects).await;
        *self.flows_opened.entry("relay".into()).or_default() += 1;
        let flow = RelayedFlow {
            peer: *local.ip(),
            local: peer,
            remote: local,
            outbound: true,
            broker: plan.broker.clone(),
        };
        let (broker, token, key) = (plan.broker, plan.token, plan.key);
        self.relaying.start(flow, async move {
            connectivity::relay::client(app, &broker, token, key).await
        });
        self.core.set_relayed(self.relaying.peers());
    }

    pub(super) fn accept_relay(&mut self, a: RelayAccept) {
        *self.flows_opened.entry("relay".into()).or_default() += 1;
        let flow = RelayedFlow {
            peer: *a.client.ip(),
            local: a.server,
            remote: a.client,
            outbound: false,
            broker: a.broker.clone(),
        };
        self.relaying.start(flow, async move {
            connectivity::relay::server(&a.broker, a.token, a.key, a.client, a.server).await
        });
        self.core.set_relayed(self.relaying.peers());
    }

    pub(super) fn relay_done(&mut self, id: u64, result: anyhow::Result<(u64, u64)>) {
        let Some(flow) = self.relaying.flows.remove(&id) else {
            return;
        };
        self.core.set_relayed(self.relaying.peers());
        match result {
            Ok((sent, received)) => {
                tracing::debug!(peer = %flow.peer, sent, received, "relayed flow ended")
            }
            Err(e) => {
                *self.counters.entry("relays_failed").or_default() += 1;
                info!(peer = %flow.peer, local = %flow.local, remote = %flow.remote, "relayed flow failed: {e:#}");
            }
        }
    }
}
