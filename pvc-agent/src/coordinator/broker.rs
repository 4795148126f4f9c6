//! The agent's sessions with the brokering service: one with every
//! configured broker at once, all from the agent's PVC port (so that the
//! brokers observe the same NAT mapping, and members that list their
//! brokers in different orders, or lose one of them, still share one).
//! Each session registers with the host key, receives the members and the
//! master's documents, carries messages for other members, and is kept
//! alive by pings; a broker that stops answering is given up within
//! `BROKER_SILENCE_LIMIT` and tried again. Nothing received here is
//! trusted: the coordinator verifies it.

use std::{collections::BTreeMap, net::Ipv4Addr, net::SocketAddrV4, sync::Arc, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use futures::{SinkExt as _, StreamExt as _};
use pvc_proto::{
    AgentMessage, BROKER_SILENCE_LIMIT, BrokerMessage, ClusterId, ErrorCode, MemberInfo,
    PING_INTERVAL, Registration, SignedPolicy, SignedRecord, SignedRevocations,
};
use tokio::{
    sync::mpsc,
    task::JoinSet,
    time::{Instant, interval, timeout},
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    broker_client::{self, Refused},
    security::keys::KeyPair,
};

const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What a session reports to the coordinator.
#[derive(Debug, Clone)]
pub enum BrokerEvent {
    /// A session is up: where the broker sees it come from, this host's
    /// record, the master's current lists, and the complete list of the
    /// other members present at this broker.
    Connected {
        broker: String,
        observed: SocketAddrV4,
        you: SignedRecord,
        revocations: Option<SignedRevocations>,
        policy: Option<SignedPolicy>,
        members: Vec<MemberInfo>,
    },
    /// What a broker said next: membership changes, relayed messages, new
    /// lists, probe results (never Welcome, Pong or Error, which the session
    /// handles).
    Message { broker: String, msg: BrokerMessage },
    /// A session ended; `refusal` is the broker's error code when it
    /// refused this agent.
    Disconnected {
        broker: String,
        reason: String,
        refusal: Option<ErrorCode>,
    },
}

/// A message for one broker, or (`broker: None`) for every broker.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub broker: Option<String>,
    pub msg: AgentMessage,
}

/// Who this agent registers as.
pub struct Identity {
    pub cluster: ClusterId,
    pub key: Arc<KeyPair>,
    pub addresses: Vec<Ipv4Addr>,
    pub software: String,
    /// The local port every session leaves from (the agent's PVC port).
    pub port: Option<u16>,
}

/// Runs one session per broker until `stop` is cancelled: then every
/// broker is told that this member leaves for good. A new list on
/// `reconfigure` (a reload) ends the sessions with brokers no longer listed
/// (each is told this member leaves it) and starts the new ones; the others
/// carry on untouched.
pub async fn run(
    brokers: Vec<String>,
    me: Identity,
    events: mpsc::Sender<BrokerEvent>,
    mut outgoing: mpsc::Receiver<Outgoing>,
    mut reconfigure: mpsc::Receiver<Vec<String>>,
    stop: CancellationToken,
) {
    let me = Arc::new(me);
    let mut lanes = BTreeMap::new();
    let mut tasks = JoinSet::new();
    let mut start = |broker: String, lanes: &mut BTreeMap<_, _>| {
        let (tx, rx) = mpsc::channel(256);
        let own = stop.child_token();
        lanes.insert(broker.clone(), (tx, own.clone()));
        tasks.spawn(sessions(broker, Arc::clone(&me), events.clone(), rx, own));
    };
    for broker in brokers {
        start(broker, &mut lanes);
    }
    loop {
        tokio::select! {
            out = outgoing.recv() => match out {
                Some(Outgoing { broker: Some(b), msg }) => {
                    if let Some((lane, _)) = lanes.get(&b) {
                        let _ = lane.try_send(msg);
                    }
                }
                Some(Outgoing { broker: None, msg }) => {
                    for (lane, _) in lanes.values() {
                        let _ = lane.try_send(msg.clone());
                    }
                }
                None => break,
            },
            Some(list) = reconfigure.recv() => {
                lanes.retain(|b, (_, own)| {
                    let keep = list.contains(b);
                    if !keep {
                        info!(broker = %b, "no longer configured: leaving it");
                        own.cancel();
                    }
                    keep
                });
                for b in list {
                    if !lanes.contains_key(&b) {
                        info!(broker = %b, "newly configured: connecting");
                        start(b, &mut lanes);
                    }
                }
            }
            _ = stop.cancelled() => break,
        }
    }
    // Every session says Leave, or gives up trying.
    while tasks.join_next().await.is_some() {}
}

/// Sessions with one broker, one after the other, until `stop`.
async fn sessions(
    broker: String,
    me: Arc<Identity>,
    events: mpsc::Sender<BrokerEvent>,
    mut outgoing: mpsc::Receiver<AgentMessage>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let (reason, refusal) = match session(&broker, &me, &events, &mut outgoing, &stop).await {
            Ok(()) => {
                // Leaving: the agent stops (nobody reads this any more), or
                // this broker is no longer configured (the coordinator
                // forgets the session).
                let _ = events.try_send(BrokerEvent::Disconnected {
                    broker: broker.clone(),
                    reason: "left: no longer configured, or the agent stops".into(),
                    refusal: None,
                });
                return;
            }
            Err(e) => (
                format!("{e:#}"),
                e.downcast_ref::<Refused>().map(|r| r.code),
            ),
        };
        warn!(broker, "broker session ended: {reason}; trying it again");
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
            backoff = Duration::from_millis(100);
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
    outgoing: &mut mpsc::Receiver<AgentMessage>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut framed = tokio::select! {
        link = broker_client::connect(broker, me.port) => link?,
        _ = stop.cancelled() => return Ok(()),
    };
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
                    observed,
                    you,
                    revocations,
                    policy,
                    members,
                    more,
                })) => {
                    welcome = Some((name, observed, you, revocations, policy, members));
                    if !more {
                        break;
                    }
                }
                Some(Ok(BrokerMessage::Members { members, more })) if welcome.is_some() => {
                    welcome.as_mut().expect("checked").5.extend(members);
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
    let (name, observed, you, revocations, policy, members) = welcome;
    info!(
        broker,
        name,
        %observed,
        members = members.len(),
        "registered with broker"
    );
    let connected = BrokerEvent::Connected {
        broker: broker.to_string(),
        observed,
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
                let msg = match frame {
                    Some(Ok(BrokerMessage::Pong { .. })) => continue,
                    Some(Ok(BrokerMessage::Error { code, message })) => bail!("broker closed the session ({code:?}): {message}"),
                    Some(Ok(m @ (BrokerMessage::Welcome { .. } | BrokerMessage::Members { .. } | BrokerMessage::Published { .. }))) => {
                        bail!("unexpected message: {m:?}")
                    }
                    Some(Ok(m)) => m,
                    Some(Err(e)) => return Err(e).context("bad frame from broker"),
                    None => bail!("broker closed the connection"),
                };
                if events.send(BrokerEvent::Message { broker: broker.to_string(), msg }).await.is_err() {
                    return Ok(());
                }
            }
            Some(msg) = outgoing.recv() => {
                framed.send(msg).await.context("cannot write to broker")?;
            }
            _ = stop.cancelled() => {
                // Bounded: a broker that stopped reading must not hold the stop.
                let _ = timeout(Duration::from_secs(1), framed.send(AgentMessage::Leave)).await;
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
