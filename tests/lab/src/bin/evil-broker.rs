//! A malicious broker for the security tests: a man in the middle in front
//! of a real broker. It speaks the real protocol (pvc-proto's codecs) and
//! tampers with what it relays, the way a compromised broker could:
//!
//! - `forge`: adds a member record it made up (signed by a key that is not
//!   the master's) to every member list;
//! - `swap-key`: replaces the host key inside the record of `--target` with
//!   its own (the master's signature no longer matches);
//! - `substitute`: hands out the genuine record of `--with` in place of the
//!   record of `--target` (with the target's addresses), and delivers the
//!   handshakes meant for `--with` to `--target`;
//! - `impersonate`: answers the handshakes meant for `--target` itself,
//!   claiming the target's key but signing with its own;
//! - `replay`: records the answer of the first exchange between two members
//!   and plays it back, once, in place of the answer of the next one;
//! - `third-endpoint`: tells everyone that `--target` sits at `--at` (a
//!   third host's real address) and sees it there;
//! - `inject`: keeps asking `--target`'s agent to open traversals and
//!   relayed flows: for a non-member (240.0.0.9), and for `--with` with
//!   requests whose MACs it cannot make;
//! - `misroute-relay`: pairs no relay connection with the other agent's:
//!   it answers each one itself, as the other end.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use futures::{SinkExt as _, StreamExt as _};
use pvc_proto::{
    AgentCodec, AgentMessage, BrokerCodec, BrokerMessage, MemberInfo, MembershipRecord, PublicKey,
    SignedRecord, handshake::Handshake, records::sign,
};
use ring::{rand::SystemRandom, signature::Ed25519KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Forge,
    SwapKey,
    Substitute,
    Impersonate,
    Replay,
    ThirdEndpoint,
    Inject,
    MisrouteRelay,
}

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    upstream: SocketAddr,
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long)]
    target: Option<Ipv4Addr>,
    #[arg(long)]
    with: Option<Ipv4Addr>,
    /// third-endpoint: the address to claim for the target.
    #[arg(long)]
    at: Option<Ipv4Addr>,
}

struct Evil {
    mode: Mode,
    target: Option<Ipv4Addr>,
    with: Option<Ipv4Addr>,
    at: Option<Ipv4Addr>,
    key: Ed25519KeyPair,
    /// Genuine records seen, by virtual address.
    records: Mutex<HashMap<Ipv4Addr, MemberInfo>>,
    replies: Mutex<HashMap<(Ipv4Addr, Ipv4Addr), Recorded>>,
}

/// replay: the first Reply seen from one member to another, and whether it
/// was played back already.
type Recorded = (Vec<u8>, bool);

fn keypair() -> Ed25519KeyPair {
    let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
}

fn record_of(info: &MemberInfo) -> Option<MembershipRecord> {
    postcard::from_bytes(&info.record.body).ok()
}

impl Evil {
    /// A record for "mallory" at 240.0.0.9, signed by the evil broker's key.
    fn forged(&self, like: &MembershipRecord) -> MemberInfo {
        let r = MembershipRecord {
            serial: 999,
            name: "mallory".into(),
            virtual_ip: Ipv4Addr::new(240, 0, 0, 9),
            host_key: PublicKey::of(&self.key),
            ..like.clone()
        };
        MemberInfo {
            // Well formed, signed, but not by the master.
            record: SignedRecord::sign(&r, &self.key),
            addresses: vec![Ipv4Addr::new(198, 18, 0, 9)],
            observed: None,
            site: Default::default(),
        }
    }

    fn tamper_members(&self, members: &mut [MemberInfo]) {
        for m in members.iter() {
            if let Some(r) = record_of(m) {
                self.records.lock().unwrap().insert(r.virtual_ip, m.clone());
            }
        }
        match self.mode {
            // Added to each Welcome (see `to_agent`).
            Mode::Forge => {}
            Mode::SwapKey => {
                for m in members.iter_mut() {
                    if let Some(mut r) = record_of(m).filter(|r| Some(r.virtual_ip) == self.target)
                    {
                        r.host_key = PublicKey::of(&self.key);
                        m.record.body = postcard::to_stdvec(&r).unwrap();
                    }
                }
            }
            Mode::Substitute => {
                let with = self
                    .with
                    .and_then(|w| self.records.lock().unwrap().get(&w).cloned());
                for m in members.iter_mut() {
                    if record_of(m).is_some_and(|r| Some(r.virtual_ip) == self.target)
                        && let Some(w) = &with
                    {
                        m.record = w.record.clone();
                    }
                }
            }
            Mode::ThirdEndpoint => {
                for m in members.iter_mut() {
                    if record_of(m).is_some_and(|r| Some(r.virtual_ip) == self.target)
                        && let Some(at) = self.at
                    {
                        m.addresses = vec![at];
                        m.observed = Some(std::net::SocketAddrV4::new(at, 7101));
                        m.site.public = Some(at);
                    }
                }
            }
            Mode::Impersonate | Mode::Replay | Mode::Inject | Mode::MisrouteRelay => {}
        }
    }

    /// What goes down to an agent.
    fn to_agent(&self, me: Option<Ipv4Addr>, msg: &mut BrokerMessage) {
        match msg {
            BrokerMessage::Welcome { members, you, .. } => {
                self.tamper_members(members);
                if self.mode == Mode::Forge
                    && let Ok(template) = postcard::from_bytes::<MembershipRecord>(&you.body)
                {
                    members.push(self.forged(&template));
                }
            }
            BrokerMessage::Members { members, .. } => self.tamper_members(members),
            BrokerMessage::Joined(m) => {
                let mut v = vec![m.clone()];
                self.tamper_members(&mut v);
                *m = v.remove(0);
            }
            BrokerMessage::Relayed { from, payload } if self.mode == Mode::Replay => {
                let Some(to) = me else { return };
                if let Some(Handshake::Reply(reply)) = Handshake::decode(payload) {
                    let mut replies = self.replies.lock().unwrap();
                    match replies.get_mut(&(*from, to)) {
                        None => {
                            replies.insert((*from, to), (payload.clone(), false));
                        }
                        Some((old, played)) if !*played => {
                            // The recorded answer of the first exchange, dressed
                            // up as the answer of this one.
                            if let Some(Handshake::Reply(mut r)) = Handshake::decode(old) {
                                r.id = reply.id;
                                *payload = Handshake::Reply(r).encode();
                                *played = true;
                                eprintln!("evil-broker: replayed an old Reply from {from} to {to}");
                            }
                        }
                        Some(_) => {}
                    }
                }
            }
            _ => {}
        }
    }

    /// Where a relayed message goes: substitute sends `--with`'s handshakes
    /// (their first message) to `--target`.
    fn route(&self, to: Ipv4Addr, payload: &[u8]) -> Ipv4Addr {
        if self.mode == Mode::Substitute
            && Some(to) == self.with
            && let (Some(t), Some(Handshake::Init(_))) = (self.target, Handshake::decode(payload))
        {
            eprintln!("evil-broker: sent a handshake meant for {to} to {t}");
            return t;
        }
        to
    }

    /// An answer the evil broker makes up instead of relaying, if any.
    fn intercept(&self, to: Ipv4Addr, payload: &[u8]) -> Option<BrokerMessage> {
        if self.mode != Mode::Impersonate || Some(to) != self.target {
            return None;
        }
        let Some(Handshake::Init(init)) = Handshake::decode(payload) else {
            return None;
        };
        // Claims the target's genuine key, signs with its own.
        let target_key = self
            .records
            .lock()
            .unwrap()
            .get(&to)
            .and_then(record_of)
            .map(|r| r.host_key)?;
        let reply = pvc_proto::handshake::Reply {
            id: init.id,
            responder_key: target_key,
            nonce: [7; 32],
            ephemeral: [9; 32],
            signature: sign(&self.key, b"pvc-handshake-responder-v1\0", &[0; 32]),
        };
        eprintln!("evil-broker: answered a handshake meant for {to}");
        Some(BrokerMessage::Relayed {
            from: to,
            payload: Handshake::Reply(reply).encode(),
        })
    }
}

/// inject: requests to open the way into `target` that no member made: a
/// traversal and a relayed flow "from" a non-member, and from `with` with
/// MACs the broker cannot compute.
fn injections(target: Ipv4Addr, with: Option<Ipv4Addr>) -> Vec<BrokerMessage> {
    use pvc_proto::handshake::{RelayFlow, Traverse};
    let stranger = Ipv4Addr::new(240, 0, 0, 9);
    let mut out = Vec::new();
    for from in [Some(stranger), with].into_iter().flatten() {
        // A SYN from `from` to the target's port 22, as a stack sends it.
        let mut syn = vec![0u8; 40];
        syn[0] = 0x45;
        syn[2..4].copy_from_slice(&40u16.to_be_bytes());
        syn[8] = 64;
        syn[9] = 6;
        syn[12..16].copy_from_slice(&from.octets());
        syn[16..20].copy_from_slice(&target.octets());
        syn[20..22].copy_from_slice(&40000u16.to_be_bytes());
        syn[22..24].copy_from_slice(&22u16.to_be_bytes());
        syn[32] = 0x50;
        syn[33] = 0x02;
        let traverse = Traverse {
            id: 1,
            technique: 4, // hole punching
            syn,
            client: std::net::SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 66), 40000),
            mac: [0; 32],
        };
        let relay = RelayFlow {
            token: [3; 16],
            client: from,
            server: target,
            client_port: 40001,
            port: 22,
            mac: [0; 32],
        };
        for h in [Handshake::Traverse(traverse), Handshake::RelayFlow(relay)] {
            out.push(BrokerMessage::Relayed {
                from,
                payload: h.encode(),
            });
        }
    }
    out
}

async fn session(evil: Arc<Evil>, client: TcpStream, upstream: SocketAddr) -> anyhow::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    let mut down = Framed::new(client, BrokerCodec::default());
    let mut up = Framed::new(server, AgentCodec::default());
    let mut me: Option<Ipv4Addr> = None;
    if evil.mode == Mode::MisrouteRelay {
        match down.next().await {
            Some(Ok(AgentMessage::RelayJoin { .. })) => {
                // Plays the other agent: a hello and "connected".
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut stream = down.into_inner();
                stream.write_all(&[0x5a; 32]).await?;
                stream.write_all(&[0]).await?;
                eprintln!("evil-broker: answered a relay connection itself");
                let mut sink = [0u8; 4096];
                while stream.read(&mut sink).await? > 0 {}
                return Ok(());
            }
            Some(Ok(first)) => up.send(first).await?,
            _ => return Ok(()),
        }
    }
    let mut inject = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = inject.tick(), if evil.mode == Mode::Inject && me.is_some() && me == evil.target => {
                for msg in injections(me.unwrap(), evil.with) {
                    down.send(msg).await?;
                }
            }
            from_agent = down.next() => match from_agent {
                Some(Ok(mut msg)) => {
                    if let AgentMessage::Relay { to, payload } = &mut msg {
                        if let Some(answer) = evil.intercept(*to, payload) {
                            down.send(answer).await?;
                            continue;
                        }
                        *to = evil.route(*to, payload);
                    }
                    up.send(msg).await?;
                }
                _ => return Ok(()),
            },
            from_broker = up.next() => match from_broker {
                Some(Ok(mut msg)) => {
                    if let BrokerMessage::Welcome { you, .. } = &msg {
                        me = postcard::from_bytes::<MembershipRecord>(&you.body).ok().map(|r| r.virtual_ip);
                    }
                    evil.to_agent(me, &mut msg);
                    down.send(msg).await?;
                }
                _ => return Ok(()),
            },
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await.context("listen")?;
    let evil = Arc::new(Evil {
        mode: args.mode,
        target: args.target,
        with: args.with,
        at: args.at,
        key: keypair(),
        records: Mutex::default(),
        replies: Mutex::default(),
    });
    eprintln!(
        "evil-broker: {:?} on {} in front of {}",
        args.mode, args.listen, args.upstream
    );
    loop {
        let (client, _) = listener.accept().await?;
        let evil = Arc::clone(&evil);
        tokio::spawn(async move {
            if let Err(e) = session(evil, client, args.upstream).await {
                eprintln!("evil-broker: session ended: {e:#}");
            }
        });
    }
}
