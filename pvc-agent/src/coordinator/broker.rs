//! The agent's session with the brokering service: register, receive the
//! member list and its changes, keep the session alive, and move to the next
//! broker when one fails.

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use futures::{SinkExt as _, StreamExt as _};
use pvc_proto::{AgentCodec, AgentMessage, BrokerMessage, Member, Registration};
use tokio::{
    net::TcpStream,
    sync::mpsc,
    time::{Instant, interval, timeout},
};
use tokio_util::{codec::Framed, sync::CancellationToken};
use tracing::{info, warn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
const SILENCE_LIMIT: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// A session is up; `members` is the complete list of the others.
    Connected {
        broker: String,
        members: Vec<Member>,
    },
    Joined(Member),
    /// A member's session ended; `clean` if it said it was leaving for good.
    Left {
        name: String,
        virtual_ip: std::net::Ipv4Addr,
        clean: bool,
    },
    /// The session ended; members stay as they were until the next snapshot.
    Disconnected {
        broker: String,
        reason: String,
    },
}

/// Runs sessions, trying the brokers in turn, until `stop` is cancelled:
/// then tells the broker this member leaves for good.
pub async fn run(
    brokers: Vec<String>,
    registration: Registration,
    tx: mpsc::Sender<Membership>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(250);
    for broker in brokers.iter().cycle() {
        let started = Instant::now();
        let reason = match session(broker, &registration, &tx, &stop).await {
            Ok(()) => return, // leaving, or the coordinator is gone
            Err(e) => format!("{e:#}"),
        };
        warn!(
            broker,
            "broker session ended: {reason}; trying the next broker"
        );
        if tx
            .send(Membership::Disconnected {
                broker: broker.clone(),
                reason,
            })
            .await
            .is_err()
        {
            return;
        }
        if started.elapsed() > SILENCE_LIMIT {
            backoff = Duration::from_millis(250);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

async fn session(
    broker: &str,
    registration: &Registration,
    tx: &mpsc::Sender<Membership>,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let stream = timeout(CONNECT_TIMEOUT, TcpStream::connect(broker))
        .await
        .map_err(|_| anyhow!("no answer within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("cannot connect to broker {broker}"))?;
    stream.set_nodelay(true)?;
    let mut framed = Framed::new(stream, AgentCodec::default());
    framed
        .send(AgentMessage::Register(registration.clone()))
        .await?;

    let mut members = Vec::new();
    let name = timeout(WELCOME_TIMEOUT, async {
        let mut name = None;
        loop {
            match framed.next().await {
                Some(Ok(BrokerMessage::Welcome {
                    broker,
                    members: m,
                    more,
                })) => {
                    name = Some(broker);
                    members.extend(m);
                    if !more {
                        break;
                    }
                }
                Some(Ok(BrokerMessage::Members { members: m, more })) if name.is_some() => {
                    members.extend(m);
                    if !more {
                        break;
                    }
                }
                Some(Ok(BrokerMessage::Error { code, message })) => {
                    bail!("broker refused the registration ({code:?}): {message}")
                }
                Some(Ok(other)) => bail!("unexpected message before Welcome: {other:?}"),
                Some(Err(e)) => return Err(e).context("bad frame from broker"),
                None => bail!("broker closed the connection"),
            }
        }
        Ok(name.unwrap_or_default())
    })
    .await
    .map_err(|_| anyhow!("no Welcome within {WELCOME_TIMEOUT:?}"))??;
    info!(
        broker,
        name,
        members = members.len(),
        "registered with broker"
    );
    if tx
        .send(Membership::Connected {
            broker: broker.to_string(),
            members,
        })
        .await
        .is_err()
    {
        return Ok(());
    }

    let mut ping = interval(PING_INTERVAL);
    let mut last_heard = Instant::now();
    let mut nonce = 0u64;
    loop {
        tokio::select! {
            frame = framed.next() => {
                last_heard = Instant::now();
                let update = match frame {
                    Some(Ok(BrokerMessage::Joined(m))) => Membership::Joined(m),
                    Some(Ok(BrokerMessage::Left { name, virtual_ip, clean })) => Membership::Left { name, virtual_ip, clean },
                    Some(Ok(BrokerMessage::Pong { .. })) => continue,
                    Some(Ok(BrokerMessage::Error { code, message })) => bail!("broker closed the session ({code:?}): {message}"),
                    Some(Ok(other)) => bail!("unexpected message: {other:?}"),
                    Some(Err(e)) => return Err(e).context("bad frame from broker"),
                    None => bail!("broker closed the connection"),
                };
                if tx.send(update).await.is_err() {
                    return Ok(());
                }
            }
            _ = stop.cancelled() => {
                framed.send(AgentMessage::Leave).await.context("cannot tell the broker")?;
                info!(broker, "told the broker this member leaves");
                return Ok(());
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > SILENCE_LIMIT {
                    bail!("broker silent for {:?}", last_heard.elapsed());
                }
                nonce += 1;
                framed.send(AgentMessage::Ping { nonce }).await.context("cannot write to broker")?;
            }
        }
    }
}
