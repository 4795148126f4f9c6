//! The agent's session with the brokering service: register with the host
//! key, receive the members and the master's documents, carry handshake
//! messages, keep the session alive, and move to the next broker when one
//! fails. Nothing received here is trusted: the coordinator verifies it.

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use futures::{SinkExt as _, StreamExt as _};
use pvc_proto::{
    AgentMessage, BROKER_SILENCE_LIMIT, BrokerMessage, ClusterId, ErrorCode, MemberInfo,
    PING_INTERVAL, Registration, SignedPolicy, SignedRecord, SignedRevocations,
};
use tokio::{
    sync::mpsc,
    time::{Instant, interval, timeout},
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    broker_client::{self, Refused},
    security::keys::KeyPair,
};

const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What the session reports to the coordinator.
#[derive(Debug, Clone)]
pub enum BrokerEvent {
    /// A session is up: this host's record, the master's current lists,
    /// and the complete list of the other members present.
    Connected {
        broker: String,
        you: SignedRecord,
        revocations: Option<SignedRevocations>,
        policy: Option<SignedPolicy>,
        members: Vec<MemberInfo>,
    },
    /// What the broker said next: membership changes, relayed handshakes,
    /// new lists (never Welcome, Pong or Error, which the session handles).
    Message(BrokerMessage),
    /// The session ended; members stay as they were until the next snapshot.
    /// `refusal` is the broker's error code when it refused this agent.
    Disconnected {
        broker: String,
        reason: String,
        refusal: Option<ErrorCode>,
    },
}

/// A payload for another member.
#[derive(Debug, Clone)]
pub struct Relay {
    pub to: Ipv4Addr,
    pub payload: Vec<u8>,
}

/// Who this agent registers as.
pub struct Identity {
    pub cluster: ClusterId,
    pub key: Arc<KeyPair>,
    pub addresses: Vec<Ipv4Addr>,
    pub software: String,
}

/// Runs sessions, trying the brokers in turn, until `stop` is cancelled:
/// then tells the broker this member leaves for good.
pub async fn run(
    brokers: Vec<String>,
    me: Identity,
    events: mpsc::Sender<BrokerEvent>,
    mut relays: mpsc::Receiver<Relay>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(250);
    for broker in brokers.iter().cycle() {
        let started = Instant::now();
        let (reason, refusal) = match session(broker, &me, &events, &mut relays, &stop).await {
            Ok(()) => return, // leaving, or the coordinator is gone
            Err(e) => (
                format!("{e:#}"),
                e.downcast_ref::<Refused>().map(|r| r.code),
            ),
        };
        warn!(
            broker,
            "broker session ended: {reason}; trying the next broker"
        );
        if events
            .send(BrokerEvent::Disconnected {
                broker: broker.clone(),
                reason,
                refusal,
            })
            .await
            .is_err()
        {
            return;
        }
        if started.elapsed() > BROKER_SILENCE_LIMIT {
            backoff = Duration::from_millis(250);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn refused(code: ErrorCode, message: &str, me: &Identity) -> anyhow::Error {
    if code == ErrorCode::NotAdmitted {
        error!(
            "the broker says this host is not admitted ({message}); the administrator admits it with \
             `pvc master admit --host-key {}`",
            me.key.public
        );
    }
    Refused {
        code,
        message: message.to_string(),
    }
    .into()
}

async fn session(
    broker: &str,
    me: &Identity,
    events: &mpsc::Sender<BrokerEvent>,
    relays: &mut mpsc::Receiver<Relay>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut framed = broker_client::connect(broker, None).await?;
    let registration = Registration::new(
        me.cluster,
        &me.key.pair,
        me.addresses.clone(),
        me.software.clone(),
    );
    framed.send(AgentMessage::Register(registration)).await?;

    let welcome = timeout(WELCOME_TIMEOUT, async {
        let mut welcome = None;
        loop {
            match framed.next().await {
                Some(Ok(BrokerMessage::Welcome {
                    broker: name,
                    you,
                    revocations,
                    policy,
                    members,
                    more,
                })) => {
                    welcome = Some((name, you, revocations, policy, members));
                    if !more {
                        break;
                    }
                }
                Some(Ok(BrokerMessage::Members { members, more })) if welcome.is_some() => {
                    welcome.as_mut().expect("checked").4.extend(members);
                    if !more {
                        break;
                    }
                }
                Some(Ok(BrokerMessage::Error { code, message })) => {
                    return Err(refused(code, &message, me));
                }
                Some(Ok(other)) => bail!("unexpected message before Welcome: {other:?}"),
                Some(Err(e)) => return Err(e).context("bad frame from broker"),
                None => bail!("broker closed the connection"),
            }
        }
        Ok(welcome.expect("loop exits with a welcome"))
    })
    .await
    .map_err(|_| anyhow!("no Welcome within {WELCOME_TIMEOUT:?}"))??;
    let (name, you, revocations, policy, members) = welcome;
    info!(
        broker,
        name,
        members = members.len(),
        "registered with broker"
    );
    let connected = BrokerEvent::Connected {
        broker: broker.to_string(),
        you,
        revocations,
        policy,
        members,
    };
    if events.send(connected).await.is_err() {
        return Ok(());
    }

    let mut ping = interval(PING_INTERVAL);
    let mut last_heard = Instant::now();
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            frame = framed.next() => {
                last_heard = Instant::now();
                let event = match frame {
                    Some(Ok(BrokerMessage::Pong { .. })) => continue,
                    Some(Ok(BrokerMessage::Error { code, message })) => bail!("broker closed the session ({code:?}): {message}"),
                    Some(Ok(m @ (BrokerMessage::Welcome { .. } | BrokerMessage::Members { .. } | BrokerMessage::Published { .. }))) => {
                        bail!("unexpected message: {m:?}")
                    }
                    Some(Ok(m)) => BrokerEvent::Message(m),
                    Some(Err(e)) => return Err(e).context("bad frame from broker"),
                    None => bail!("broker closed the connection"),
                };
                if events.send(event).await.is_err() {
                    return Ok(());
                }
            }
            Some(r) = relays.recv() => {
                framed.send(AgentMessage::Relay { to: r.to, payload: r.payload }).await.context("cannot write to broker")?;
            }
            _ = stop.cancelled() => {
                framed.send(AgentMessage::Leave).await.context("cannot tell the broker")?;
                info!(broker, "told the broker this member leaves");
                return Ok(());
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > BROKER_SILENCE_LIMIT {
                    bail!("broker silent for {:?}", last_heard.elapsed());
                }
                nonce += 1;
                framed.send(AgentMessage::Ping { nonce }).await.context("cannot write to broker")?;
            }
        }
    }
}
