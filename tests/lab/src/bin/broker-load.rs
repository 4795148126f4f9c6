//! Load for one broker: many simulated agents speaking the real protocol.
//! Each cluster gets a master that publishes its members' records; every
//! agent registers with its own host key, then pings once a second and
//! relays a small message to another member of its cluster once a second,
//! while reading everything the broker sends it. Prints a JSON report.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures::{SinkExt as _, StreamExt as _};
use pvc_lab::Usage;
use pvc_proto::{
    AgentCodec, AgentMessage, BrokerMessage, ClusterId, MembershipRecord, PublicKey, Publication,
    Registration, SignedRecord, unix_now,
};
use ring::{rand::SystemRandom, signature::Ed25519KeyPair};
use tokio::{net::TcpStream, sync::Semaphore};
use tokio_util::codec::Framed;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    broker: SocketAddr,
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    #[arg(long, default_value_t = 100)]
    clusters: usize,
    /// Seconds of steady state after every agent registered.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The broker's process, to report its CPU time and memory.
    #[arg(long)]
    broker_pid: u32,
}

fn keypair() -> Ed25519KeyPair {
    let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
}

#[derive(Default)]
struct Counters {
    registered: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
}

struct Agent {
    cluster: ClusterId,
    key: Ed25519KeyPair,
    vip: Ipv4Addr,
    peer: Ipv4Addr,
}

async fn publish(
    broker: SocketAddr,
    master: &Ed25519KeyPair,
    records: Vec<SignedRecord>,
) -> anyhow::Result<()> {
    let mut f = Framed::new(TcpStream::connect(broker).await?, AgentCodec::default());
    for chunk in records.chunks(100) {
        let p = Publication {
            master_key: PublicKey::of(master),
            records: chunk.to_vec(),
            revocations: None,
            policy: None,
        };
        f.send(AgentMessage::Publish(p)).await?;
        match f.next().await {
            Some(Ok(BrokerMessage::Published { .. })) => {}
            other => bail!("publication refused: {other:?}"),
        }
    }
    Ok(())
}

async fn agent(
    a: Agent,
    broker: SocketAddr,
    until: Arc<tokio::sync::Notify>,
    c: Arc<Counters>,
    gate: Arc<Semaphore>,
) -> anyhow::Result<()> {
    let permit = gate.acquire().await?;
    let mut f = Framed::new(TcpStream::connect(broker).await?, AgentCodec::default());
    f.send(AgentMessage::Register(Registration::new(
        a.cluster,
        &a.key,
        vec![Ipv4Addr::new(198, 18, 9, 9)],
        "load".into(),
    )))
    .await?;
    loop {
        match f.next().await {
            Some(Ok(
                BrokerMessage::Welcome { more: false, .. }
                | BrokerMessage::Members { more: false, .. },
            )) => break,
            Some(Ok(BrokerMessage::Welcome { .. } | BrokerMessage::Members { .. })) => {}
            other => bail!("registration failed: {other:?}"),
        }
    }
    c.registered.fetch_add(1, Ordering::Relaxed);
    drop(permit);
    let stop = until.notified();
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut nonce = 0;
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            m = f.next() => match m {
                Some(Ok(_)) => { c.received.fetch_add(1, Ordering::Relaxed); }
                other => bail!("session ended: {other:?}"),
            },
            _ = tick.tick() => {
                nonce += 1;
                f.send(AgentMessage::Ping { nonce }).await?;
                f.send(AgentMessage::Relay { to: a.peer, payload: vec![0x5a; 200] }).await?;
                c.sent.fetch_add(2, Ordering::Relaxed);
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    raise_file_limit()?;
    let idle = Usage::of(args.broker_pid);
    let per_cluster = args.agents.div_ceil(args.clusters);
    let mut agents = Vec::with_capacity(args.agents);
    let prepare = Instant::now();
    for c in 0..args.clusters {
        let master = keypair();
        let cluster = ClusterId::of(&PublicKey::of(&master));
        let mut records = Vec::new();
        for i in 0..per_cluster.min(args.agents - agents.len()) {
            let key = keypair();
            let vip = Ipv4Addr::from(0xf000_0000u32 + ((c as u32) << 12) + i as u32 + 1);
            let peer = Ipv4Addr::from(
                0xf000_0000u32 + ((c as u32) << 12) + ((i + 1) % per_cluster) as u32 + 1,
            );
            records.push(SignedRecord::sign(
                &MembershipRecord {
                    cluster,
                    serial: i as u64 + 1,
                    name: format!("n{i}"),
                    virtual_ip: vip,
                    host_key: PublicKey::of(&key),
                    groups: vec![],
                    not_before: 0,
                    not_after: unix_now() + 3600,
                },
                &master,
            ));
            agents.push(Agent {
                cluster,
                key,
                vip,
                peer,
            });
        }
        publish(args.broker, &master, records)
            .await
            .context("publish")?;
    }
    let prepared = prepare.elapsed();

    let counters = Arc::new(Counters::default());
    let until = Arc::new(tokio::sync::Notify::new());
    // At most 256 registrations in flight, like agents starting in waves.
    let gate = Arc::new(Semaphore::new(256));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for a in agents {
        let (c, u, g) = (Arc::clone(&counters), Arc::clone(&until), Arc::clone(&gate));
        let vip = a.vip;
        tasks.push(tokio::spawn(async move {
            if let Err(e) = agent(a, args.broker, u, Arc::clone(&c), g).await {
                c.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("agent {vip}: {e:#}");
            }
        }));
    }
    while counters.registered.load(Ordering::Relaxed) + counters.errors.load(Ordering::Relaxed)
        < args.agents as u64
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if start.elapsed() > Duration::from_secs(300) {
            bail!("registrations did not complete in 300 s");
        }
    }
    let registered_in = start.elapsed();
    let loaded = Usage::of(args.broker_pid);
    let (sent0, received0) = (
        counters.sent.load(Ordering::Relaxed),
        counters.received.load(Ordering::Relaxed),
    );
    let steady = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let elapsed = steady.elapsed().as_secs_f64();
    let steady_usage = Usage::of(args.broker_pid);
    let sent = counters.sent.load(Ordering::Relaxed) - sent0;
    let received = counters.received.load(Ordering::Relaxed) - received0;
    println!(
        "{}",
        serde_json::json!({
            "agents": args.agents,
            "clusters": args.clusters,
            "registered": counters.registered.load(Ordering::Relaxed),
            "errors": counters.errors.load(Ordering::Relaxed),
            "prepare_secs": prepared.as_secs_f64(),
            "register_secs": registered_in.as_secs_f64(),
            "steady_secs": elapsed,
            "sent_per_sec": sent as f64 / elapsed,
            "received_per_sec": received as f64 / elapsed,
            "broker_rss_idle_kib": idle.rss_kib,
            "broker_rss_loaded_kib": steady_usage.rss_kib,
            "broker_peak_rss_kib": steady_usage.peak_rss_kib,
            "broker_cpu_register_secs": (loaded.cpu - idle.cpu).as_secs_f64(),
            "broker_cpu_steady_secs": (steady_usage.cpu - loaded.cpu).as_secs_f64(),
        })
    );
    until.notify_waiters();
    std::process::exit(0);
}

/// Every simulated agent holds one socket.
fn raise_file_limit() -> anyhow::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}
