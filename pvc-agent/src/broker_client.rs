//! Talking to a broker: one client for the agent's sessions and for the
//! master's publications. Connects with a time limit, frames the protocol,
//! and turns a broker's refusal into a typed error naming its code.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, anyhow};
use futures::{SinkExt as _, StreamExt as _};
use pvc_proto::{AgentCodec, AgentMessage, BrokerMessage, ErrorCode};
use tokio::{
    net::{TcpSocket, TcpStream},
    time::timeout,
};
use tokio_util::codec::Framed;

/// A framed connection to a broker.
pub type Link = Framed<TcpStream, AgentCodec>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A broker refused what it was asked, with its reason.
#[derive(Debug, thiserror::Error)]
#[error("broker refused ({code:?}): {message}")]
pub struct Refused {
    pub code: ErrorCode,
    pub message: String,
}

/// Connects to `broker` ("host:port"). With `local_port`, from that port:
/// an agent's sessions to every broker share one, so that the brokers
/// observe the same mapping if a NAT preserves it.
pub async fn connect(broker: &str, local_port: Option<u16>) -> anyhow::Result<Link> {
    let addr: SocketAddr = tokio::net::lookup_host(broker)
        .await
        .with_context(|| format!("cannot resolve broker {broker}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| anyhow!("broker {broker} has no IPv4 address"))?;
    match connect_from(broker, addr, local_port).await {
        // The same 4-tuple is still in TIME_WAIT (a restarted agent): any
        // port will do until it expires.
        Err(e) if local_port.is_some() && is_addr_unavailable(&e) => {
            connect_from(broker, addr, None).await
        }
        other => other,
    }
}

fn is_addr_unavailable(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::AddrNotAvailable | std::io::ErrorKind::AddrInUse
            )
        })
}

async fn connect_from(
    broker: &str,
    addr: SocketAddr,
    local_port: Option<u16>,
) -> anyhow::Result<Link> {
    let socket = TcpSocket::new_v4()?;
    if let Some(port) = local_port {
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket
            .bind(SocketAddr::from(([0, 0, 0, 0], port)))
            .with_context(|| format!("cannot bind local port {port} for the broker session"))?;
    }
    let stream = timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| anyhow!("broker {broker} does not answer within {CONNECT_TIMEOUT:?}"))?
        .with_context(|| format!("cannot connect to broker {broker}"))?;
    stream.set_nodelay(true)?;
    Ok(Framed::new(stream, AgentCodec::default()))
}

/// Sends `msg` and waits, at most `within`, for the broker's next frame.
pub async fn request(
    link: &mut Link,
    msg: AgentMessage,
    within: Duration,
) -> anyhow::Result<BrokerMessage> {
    link.send(msg).await.context("cannot write to the broker")?;
    match timeout(within, link.next()).await {
        Ok(Some(Ok(BrokerMessage::Error { code, message }))) => {
            Err(Refused { code, message }.into())
        }
        Ok(Some(Ok(m))) => Ok(m),
        Ok(Some(Err(e))) => Err(e).context("bad frame from the broker"),
        Ok(None) => Err(anyhow!("the broker closed the connection")),
        Err(_) => Err(anyhow!("no answer from the broker within {within:?}")),
    }
}
