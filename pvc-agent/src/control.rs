//! The agent's control socket: `pvc status` and friends ask over a Unix
//! socket, one JSON request line, one JSON answer line.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::warn;

use crate::interposition::{Counters, FlowEntry};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Status,
}

/// `Status::state` of an agent waiting for a broker to confirm its
/// membership: nothing is attached to the host yet.
pub const STATE_WAITING: &str = "waiting for admission";
/// `Status::state` of an agent whose data path is attached.
pub const STATE_RUNNING: &str = "running";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// `STATE_WAITING` or `STATE_RUNNING`.
    pub state: String,
    pub instance: String,
    /// The cluster id (derived from the master key).
    pub cluster: String,
    pub host_key: String,
    pub name: String,
    pub virtual_ip: Ipv4Addr,
    pub uplink: String,
    pub real_ip: Ipv4Addr,
    pub advertised: Vec<Ipv4Addr>,
    /// A broker this agent is registered with, if any.
    pub broker: Option<String>,
    /// Every broker this agent is registered with, and where each sees it.
    pub brokers: Vec<BrokerStatus>,
    /// What this host found out about its network: public address, NAT,
    /// what reaches it unasked, its UPnP forward.
    pub site: pvc_proto::SiteInfo,
    /// The last refusal a broker answered (its code and message), if the
    /// last session attempt was refused.
    pub broker_refusal: Option<String>,
    /// Whether this agent took over the data path a previous agent of the
    /// instance left pinned (a crash, an upgrade).
    pub takeover: bool,
    /// Whether a broker handed over this host's record and it verified.
    pub admitted: bool,
    /// "member", or "revoked" / "expired" (connect() to members fails with
    /// EKEYREVOKED / EKEYEXPIRED).
    #[serde(default)]
    pub standing: String,
    pub revocations_version: u64,
    pub policy_version: u64,
    pub peers: Vec<PeerStatus>,
    pub flows: Vec<FlowEntry>,
    /// Flows carried by a broker's relay (no masquerading entries).
    #[serde(default)]
    pub relayed: Vec<crate::coordinator::relay::RelayedFlow>,
    /// Entries the masquerading map can hold (two per flow; `flows` lists
    /// those in use). New flows are refused when it is full.
    pub flow_capacity: u32,
    /// What the agent did with packets the kernel handed it: held SYNs
    /// re-sent or refused once their path was decided, held SYNs dropped
    /// because too many waited, refused SYNs answered with a RST.
    pub agent_counters: BTreeMap<String, u64>,
    /// Flows opened since the agent started, by technique.
    pub flows_opened: BTreeMap<String, u64>,
    pub drops: BTreeMap<String, u64>,
    pub traffic: Counters,
    /// Per program: run time (ns) and run count, when `kernel.bpf_stats_enabled` is set.
    pub programs: BTreeMap<String, (u64, u64)>,
}

/// What an agent knows before it knows anything: no address, no member,
/// nothing counted.
impl Default for Status {
    fn default() -> Self {
        let none = Ipv4Addr::UNSPECIFIED;
        Self {
            state: STATE_WAITING.into(),
            instance: String::new(),
            cluster: String::new(),
            host_key: String::new(),
            name: String::new(),
            virtual_ip: none,
            uplink: String::new(),
            real_ip: none,
            advertised: Vec::new(),
            broker: None,
            brokers: Vec::new(),
            site: Default::default(),
            broker_refusal: None,
            takeover: false,
            admitted: false,
            standing: "member".into(),
            revocations_version: 0,
            policy_version: 0,
            peers: Vec::new(),
            flows: Vec::new(),
            relayed: Vec::new(),
            flow_capacity: 0,
            agent_counters: BTreeMap::new(),
            flows_opened: BTreeMap::new(),
            drops: BTreeMap::new(),
            traffic: Default::default(),
            programs: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BrokerStatus {
    pub broker: String,
    /// This host's address and port as the broker sees its session.
    pub observed: std::net::SocketAddrV4,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerStatus {
    pub name: String,
    pub virtual_ip: Ipv4Addr,
    pub addresses: Vec<Ipv4Addr>,
    pub groups: Vec<String>,
    /// Whether the path was authenticated (challenge-response done).
    pub authenticated: bool,
    /// The real address flows are masqueraded to, and how (once authenticated).
    pub path: Option<(Ipv4Addr, String)>,
    /// How this host reaches the member, from what both know of their
    /// sites (before the first flow authenticates the path too).
    pub technique: Option<String>,
    pub session_age_secs: Option<u64>,
}

pub type Query = (Request, oneshot::Sender<Status>);

/// Serves the control socket until the agent stops. Replaces a stale socket
/// file left by a crashed agent.
pub async fn serve(path: PathBuf, tx: mpsc::Sender<Query>) -> anyhow::Result<()> {
    let listener = bind(&path)?;
    loop {
        let (stream, _) = listener.accept().await?;
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, tx).await {
                warn!("control request failed: {e:#}");
            }
        });
    }
}

fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another agent answers on {}: stop it, or give this one another `instance`",
                path.display()
            );
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot create the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

async fn answer(stream: UnixStream, tx: mpsc::Sender<Query>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // One request line, at most 4 KiB.
    BufReader::new(read.take(4096)).read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Request>(line.trim()) {
        Ok(request) => {
            let (reply_tx, reply_rx) = oneshot::channel();
            tx.send((request, reply_tx))
                .await
                .context("agent is stopping")?;
            serde_json::to_string(&reply_rx.await.context("agent is stopping")?)?
        }
        Err(e) => {
            serde_json::to_string(&serde_json::json!({ "error": format!("bad request: {e}") }))?
        }
    };
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"\n").await?;
    Ok(())
}

/// Client side, for the `pvc` command.
pub async fn query(path: &Path, request: Request) -> anyhow::Result<Status> {
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "no agent answers on {} (is pvc-agent running? see --instance)",
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    write
        .write_all(serde_json::to_string(&request)?.as_bytes())
        .await?;
    write.write_all(b"\n").await?;
    let mut line = String::new();
    BufReader::new(read).read_line(&mut line).await?;
    serde_json::from_str(&line).with_context(|| format!("unexpected answer from the agent: {line}"))
}
