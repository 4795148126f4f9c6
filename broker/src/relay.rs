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
        let first = loop {
            let notified = self.offered.notified();
            {
                let mut tickets = self.tickets.lock().unwrap();
                if let Some(t) = tickets.get_mut(&token) {
                    match t.waiting.take() {
                        None => {
                            t.waiting = Some((stream, leftover));
                            return;
                        }
                        Some(first) => {
                            tickets.remove(&token);
                            break first;
                        }
                    }
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                debug!("a relay join with a token nobody offered: closed");
                return;
            }
        };
        self.active.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = splice_pair(first, (stream, leftover)).await {
            debug!("relay ended: {e}");
        }
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.completed.fetch_add(1, Ordering::Relaxed);
    }
}

async fn splice_pair(
    (mut a, a_rest): (TcpStream, BytesMut),
    (mut b, b_rest): (TcpStream, BytesMut),
) -> std::io::Result<()> {
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
    Ok(())
}
