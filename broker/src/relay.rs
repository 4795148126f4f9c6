//! The relay (paper §4.4's last resort): two agents' connections, paired by
//! a token that one of them offered in its registered session, for a flow
//! with the other. The broker moves bytes between them with splice(2), and
//! that is all it can do: the agents authenticate each other on the
//! connection before any byte of the flow passes (`pvc-agent`'s
//! `connectivity::relay`), so a broker that pairs the wrong connections
//! connects nobody.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::BytesMut;
use pvc_proto::ClusterId;
use tokio::{io::AsyncWriteExt as _, net::TcpStream, sync::Notify, time::Instant};
use tracing::{debug, warn};

/// An offer not joined by both sides within this time is dropped.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(10);
/// A join may arrive before its offer (two connections): it waits this long.
const OFFER_WAIT: Duration = Duration::from_secs(2);
/// Offers open at once, over all clusters, and per member.
const MAX_TICKETS: usize = 8192;
const MAX_TICKETS_PER_MEMBER: usize = 512;

struct Ticket {
    cluster: ClusterId,
    from: Ipv4Addr,
    expires: Instant,
    /// The first connection to join, waiting for the second, with what it
    /// sent after its join frame.
    waiting: Option<(TcpStream, BytesMut)>,
}

#[derive(Default)]
pub struct Relays {
    tickets: Mutex<HashMap<[u8; 16], Ticket>>,
    offered: Notify,
    pub active: AtomicU64,
    pub completed: AtomicU64,
    /// Bytes moved by relayed flows that ended, both directions.
    pub bytes: AtomicU64,
}

impl Relays {
    /// A member's offer: the token may be joined twice, soon.
    pub fn offer(
        &self,
        cluster: ClusterId,
        from: Ipv4Addr,
        token: [u8; 16],
    ) -> Result<(), &'static str> {
        let mut tickets = self.tickets.lock().unwrap();
        let now = Instant::now();
        tickets.retain(|_, t| t.expires > now);
        if tickets.len() >= MAX_TICKETS {
            return Err("too many relays being set up on this broker");
        }
        if tickets
            .values()
            .filter(|t| t.cluster == cluster && t.from == from)
            .count()
            >= MAX_TICKETS_PER_MEMBER
        {
            return Err("too many relays being set up by this member");
        }
        if tickets.contains_key(&token) {
            return Err("relay token already offered");
        }
        tickets.insert(
            token,
            Ticket {
                cluster,
                from,
                expires: now + TICKET_LIFETIME,
                waiting: None,
            },
        );
        drop(tickets);
        self.offered.notify_waiters();
        Ok(())
    }

    /// A connection joins with `token`: parked if first, spliced to the
    /// first if second, closed if the token was never offered.
    pub async fn join(&self, token: [u8; 16], stream: TcpStream, leftover: BytesMut) {
        let deadline = Instant::now() + OFFER_WAIT;
        let mut stream = Some((stream, leftover));
        let first = loop {
            let notified = self.offered.notified();
            let parked = {
                let mut tickets = self.tickets.lock().unwrap();
                match tickets.get_mut(&token) {
                    Some(t) => match t.waiting.take() {
                        None => {
                            t.waiting = stream.take();
                            Some(t.expires)
                        }
                        Some(first) => {
                            tickets.remove(&token);
                            break first;
                        }
                    },
                    None => None,
                }
            };
            if let Some(expires) = parked {
                self.close_unjoined(token, expires).await;
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                debug!("a relay join with a token nobody offered: closed");
                return;
            }
        };
        let Some(second) = stream else { return };
        self.active.fetch_add(1, Ordering::Relaxed);
        match splice_pair(first, second).await {
            Ok(moved) => {
                self.bytes.fetch_add(moved, Ordering::Relaxed);
            }
            Err(e) => debug!("relay ended: {e}"),
        }
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.completed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Relays {
    /// A parked connection whose other side never joined is closed when its
    /// offer expires (not at the next offer, which may never come).
    async fn close_unjoined(&self, token: [u8; 16], expires: Instant) {
        tokio::time::sleep_until(expires).await;
        let mut tickets = self.tickets.lock().unwrap();
        if tickets.get(&token).is_some_and(|t| t.waiting.is_some()) {
            tickets.remove(&token);
            debug!("a relay's other side never joined: closed");
        }
    }
}

async fn splice_pair(
    (mut a, a_rest): (TcpStream, BytesMut),
    (mut b, b_rest): (TcpStream, BytesMut),
) -> std::io::Result<u64> {
    // What each side sent right after its join frame was read with it.
    if !a_rest.is_empty() {
        b.write_all(&a_rest).await?;
    }
    if !b_rest.is_empty() {
        a.write_all(&b_rest).await?;
    }
    let (ab, ba) = pvc_proto::relay::splice_both(&a, &b)
        .await
        .inspect_err(|e| {
            warn!("a relayed flow broke: {e}");
        })?;
    debug!(ab, ba, "relayed flow closed");
    Ok((a_rest.len() + b_rest.len()) as u64 + ab + ba)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{io::AsyncReadExt as _, net::TcpListener};

    #[tokio::test(start_paused = true)]
    async fn a_half_joined_relay_is_closed_when_its_offer_expires() {
        let relays = std::sync::Arc::new(Relays::default());
        let cluster = ClusterId([7; 16]);
        relays
            .offer(cluster, Ipv4Addr::new(240, 0, 0, 1), [1; 16])
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut agent = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (parked, _) = listener.accept().await.unwrap();
        let r = relays.clone();
        tokio::spawn(async move { r.join([1; 16], parked, BytesMut::new()).await });
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(TICKET_LIFETIME * 3, agent.read(&mut buf))
            .await
            .expect("the parked connection is closed when its offer expires");
        assert_eq!(read.unwrap(), 0);
        assert!(relays.tickets.lock().unwrap().is_empty());
    }
}
