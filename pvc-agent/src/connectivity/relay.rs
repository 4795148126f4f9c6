//! Relay (paper §4.4's last resort): through a broker, when nothing direct
//! works (both sides behind NATs whose ports cannot be predicted, or a
//! traversal that did not complete). The only path whose bytes pass
//! through userspace, and there only through splice(2).
//!
//! The member's virtual address is made local on this host, so an
//! application's connection to it arrives on `lo`, where the sk_lookup
//! program hands it to the agent's relay listener: the accepted socket
//! has the address and port the application asked for. The agent joins
//! the broker's relay with a fresh token and asks the member's agent
//! (MAC'd with the pair's control key) to join too and to connect,
//! locally, from our virtual address and port to the server's: the server
//! accepts a connection from the client's virtual address.
//!
//! Before any byte of the flow passes, the two agents prove to each other
//! on the relayed connection that they hold the pair's key for this token
//! (a broker that pairs the wrong connections connects nobody), and the
//! server's agent says whether its local connect succeeded, so that a
//! refused connection is refused (reset) at the client too. After that the
//! bytes are as exposed to the broker as a direct path's are to the
//! routers on the way: applications that need confidentiality use TLS or
//! ssh, over PVC as over any network.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, bail};
use futures::SinkExt as _;
use pvc_common::Technique;
use pvc_proto::AgentMessage;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket, TcpStream},
    time::timeout,
};

use super::{Pair, Path};
use crate::{
    broker_client,
    security::challenge::{control_mac, control_mac_valid},
};

pub type Token = [u8; 16];

pub fn path(pair: &Pair<'_>) -> Option<Path> {
    Some(Path {
        real: pair.peer_public()?,
        local: pair.public_local(),
        technique: Technique::Relay,
        port: 0,
    })
}

/// How long the other agent has to join and answer.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
const HELLO_LEN: usize = 32;
const CONNECTED: u8 = 0;
const REFUSED: u8 = 1;

/// The listener sk_lookup hands relayed connections to. Its own address
/// does not matter (loopback, any port): the program assigns the
/// connections to it whatever their destination.
pub fn listen() -> anyhow::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    socket
        .listen(1024)
        .context("cannot open the relay listener")
}

fn hello_message(token: &Token, server: bool) -> Vec<u8> {
    let mut m = b"pvc relay hello".to_vec();
    m.extend_from_slice(token);
    m.push(server as u8);
    m
}

fn hello(key: &[u8; 16], token: &Token, server: bool) -> [u8; HELLO_LEN] {
    control_mac(key, &hello_message(token, server))
}

fn hello_valid(key: &[u8; 16], token: &Token, server: bool, got: &[u8]) -> bool {
    got.try_into()
        .is_ok_and(|mac| control_mac_valid(key, &hello_message(token, server), mac))
}

/// A connection to `broker`'s relay, joined with `token`.
async fn join(broker: &str, token: Token) -> anyhow::Result<TcpStream> {
    let mut link = broker_client::connect(broker, None).await?;
    link.send(AgentMessage::RelayJoin { token })
        .await
        .context("cannot join the broker's relay")?;
    let parts = link.into_parts();
    // Nothing was read yet: a broker sends nothing before it pairs us.
    if !parts.read_buf.is_empty() {
        bail!("the broker sent bytes on a relay connection before pairing it");
    }
    Ok(parts.io)
}

/// Resets `s` on close: the application sees ECONNRESET, not an end of stream.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
}

/// The client's side: `app` is the application's connection the listener
/// accepted. Returns the bytes moved (to the server, from it).
pub async fn client(
    app: TcpStream,
    broker: &str,
    token: Token,
    key: [u8; 16],
) -> anyhow::Result<(u64, u64)> {
    let setup = async {
        let mut relayed = join(broker, token).await?;
        relayed.write_all(&hello(&key, &token, false)).await?;
        let mut answer = [0u8; HELLO_LEN + 1];
        relayed
            .read_exact(&mut answer)
            .await
            .context("the member's agent did not answer on the relay")?;
        if !hello_valid(&key, &token, true, &answer[..HELLO_LEN]) {
            bail!("the other end of the relay does not hold the pair's key: not the member");
        }
        if answer[HELLO_LEN] != CONNECTED {
            bail!("the member refused the connection (nothing listens on that port)");
        }
        Ok::<_, anyhow::Error>(relayed)
    };
    let _ = app.set_nodelay(true);
    let relayed = match timeout(JOIN_TIMEOUT, setup).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            reset(app);
            return Err(e);
        }
        Err(_) => {
            reset(app);
            bail!("the member's agent did not join the relay within {JOIN_TIMEOUT:?}");
        }
    };
    pvc_proto::relay::splice_both(&app, &relayed)
        .await
        .context("relayed flow broke")
}

/// The server's side: join, check the client's agent, connect locally from
/// `client` (a local address now) to `server`, tell the result, then move
/// the bytes.
pub async fn server(
    broker: &str,
    token: Token,
    key: [u8; 16],
    client: SocketAddrV4,
    server: SocketAddrV4,
) -> anyhow::Result<(u64, u64)> {
    let setup = async {
        let mut relayed = join(broker, token).await?;
        let mut their = [0u8; HELLO_LEN];
        relayed
            .read_exact(&mut their)
            .await
            .context("the member's agent did not say hello on the relay")?;
        if !hello_valid(&key, &token, false, &their) {
            bail!("the other end of the relay does not hold the pair's key: not the member");
        }
        Ok::<_, anyhow::Error>(relayed)
    };
    let mut relayed = timeout(JOIN_TIMEOUT, setup)
        .await
        .map_err(|_| anyhow::anyhow!("the member's agent did not join the relay in time"))??;
    let mut answer = hello(&key, &token, true).to_vec();
    let local = match connect_as(client, server).await {
        Ok(s) => {
            answer.push(CONNECTED);
            s
        }
        Err(e) => {
            answer.push(REFUSED);
            let _ = relayed.write_all(&answer).await;
            return Err(e)
                .with_context(|| format!("cannot connect to {server} for the relayed flow"));
        }
    };
    relayed.write_all(&answer).await?;
    pvc_proto::relay::splice_both(&relayed, &local)
        .await
        .context("relayed flow broke")
}

/// A connection to `server` from `client`, the member's virtual address
/// (local while the pair uses the relay).
async fn connect_as(client: SocketAddrV4, server: SocketAddrV4) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    // The same client port again soon after a flow ended (TIME_WAIT).
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::V4(client))?;
    let s = timeout(JOIN_TIMEOUT, socket.connect(SocketAddr::V4(server)))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    s.set_nodelay(true)?;
    Ok(s)
}
