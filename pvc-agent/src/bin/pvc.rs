//! `pvc`: the command-line tool. On a member: status, peers, flows, keys.
//! On the administrator's machine: the cluster's master (`pvc master ...`).

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Args as ClapArgs, Parser, Subcommand};
use pvc_agent::{
    control::{self, Request, Status},
    security::{
        keys::{self, KeyPair},
        master::{self, Master, PolicyFile},
    },
};
use pvc_proto::PublicKey;

#[derive(Parser)]
#[command(name = "pvc", version, about = "Private Virtual Cluster")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(ClapArgs)]
struct AgentSocket {
    /// Agent instance to talk to.
    #[arg(long, default_value = "default")]
    instance: String,
    /// Control socket (default: /run/pvc/<instance>.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// This host's membership, broker and counters.
    Status(AgentSocket),
    /// Known members: whether their path is authenticated, and where to.
    Peers(AgentSocket),
    /// Flows in the masquerading map.
    Flows(AgentSocket),
    /// Reaches a member by name or virtual address: authenticates the path
    /// if needed, then times TCP round trips (SYN to SYN/ACK or RST) to it.
    Ping {
        /// The member's name or virtual address.
        member: String,
        /// Round trips to time after the first connection.
        #[arg(long, default_value_t = 3)]
        count: u32,
        /// The member's port to knock at (a closed port answers too; its
        /// inbound policy must let it through). Default: its PVC port.
        #[arg(long, default_value_t = pvc_proto::DEFAULT_AGENT_PORT)]
        port: u16,
        #[command(flatten)]
        socket: AgentSocket,
    },
    /// Creates this host's key pair (mode 0600) and prints its public key.
    Keygen {
        #[arg(long, default_value = keys::DEFAULT_KEY_FILE)]
        key: PathBuf,
    },
    /// Prints the public key of a host key pair (what `pvc master admit` takes).
    Key {
        #[arg(long, default_value = keys::DEFAULT_KEY_FILE)]
        key: PathBuf,
    },
    /// The cluster's master: admission, revocation, global policy.
    #[command(subcommand)]
    Master(MasterCommand),
}

#[derive(ClapArgs)]
struct MasterDir {
    /// Where the master key and the registry live.
    #[arg(long, default_value = master::DEFAULT_DIR)]
    dir: PathBuf,
}

#[derive(ClapArgs)]
struct Brokers {
    /// Brokers to publish to ("host:port"); repeat for several.
    #[arg(long = "broker")]
    brokers: Vec<String>,
}

#[derive(Subcommand)]
enum MasterCommand {
    /// Creates the cluster: the master key pair and an empty registry.
    Init {
        #[command(flatten)]
        dir: MasterDir,
    },
    /// Prints the master public key (for members' `master_key`) and the cluster id.
    Show {
        #[command(flatten)]
        dir: MasterDir,
    },
    /// Admits a host: signs its membership record and publishes it.
    Admit {
        #[command(flatten)]
        dir: MasterDir,
        #[arg(long)]
        name: String,
        #[arg(long)]
        virtual_ip: Ipv4Addr,
        /// The host's public key (`pvc key` on the host).
        #[arg(long)]
        host_key: PublicKey,
        /// Groups, comma separated, that policies can name.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// How long the record is valid.
        #[arg(long, default_value_t = 365)]
        valid_days: u64,
        /// Validity in seconds instead of days (short-lived records, tests).
        #[arg(long)]
        valid_secs: Option<u64>,
        #[command(flatten)]
        brokers: Brokers,
    },
    /// Revokes a member: publishes a new signed revocation list.
    Revoke {
        #[command(flatten)]
        dir: MasterDir,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        brokers: Brokers,
    },
    /// Signs and publishes a global policy from a TOML file of [[rule]]s.
    Policy {
        #[command(flatten)]
        dir: MasterDir,
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        brokers: Brokers,
    },
    /// Publishes everything again (a new or restarted broker).
    Publish {
        #[command(flatten)]
        dir: MasterDir,
        #[command(flatten)]
        brokers: Brokers,
    },
    /// Lists admitted hosts.
    List {
        #[command(flatten)]
        dir: MasterDir,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // Like every Unix tool: a closed pipe (`pvc flows | head -1`) ends the
    // output quietly, instead of a failed write.
    // SAFETY: restores the default disposition, before any thread starts
    // writing.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    if let Err(e) = run(Args::parse()).await {
        eprintln!("pvc: {e:#}");
        std::process::exit(1);
    }
}

async fn status(s: &AgentSocket) -> anyhow::Result<Status> {
    let socket = s
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/run/pvc/{}.sock", s.instance)));
    control::query(&socket, Request::Status).await
}

async fn publish_to(m: &Master, b: &Brokers) -> anyhow::Result<()> {
    if b.brokers.is_empty() {
        println!("not published: name brokers with --broker (or run `pvc master publish` later)");
        return Ok(());
    }
    master::publish(&m.publications()?, &b.brokers).await?;
    println!("published to {}", b.brokers.join(", "));
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Status(s) => {
            let st = status(&s).await?;
            if s.json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print_status(&st);
            }
        }
        Command::Peers(s) => {
            let st = status(&s).await?;
            if s.json {
                println!("{}", serde_json::to_string_pretty(&st.peers)?);
            } else {
                print_peers(&st);
            }
        }
        Command::Flows(s) => {
            let st = status(&s).await?;
            if s.json {
                println!("{}", serde_json::to_string_pretty(&st.flows)?);
            } else {
                print_flows(&st);
            }
        }
        Command::Ping {
            member,
            count,
            port,
            socket,
        } => ping(&member, count, port, &socket).await?,
        Command::Keygen { key } => {
            let k = KeyPair::create(&key)?;
            println!("{}", k.public);
        }
        Command::Key { key } => println!("{}", KeyPair::load(&key)?.public),
        Command::Master(m) => master_command(m).await?,
    }
    Ok(())
}

async fn master_command(cmd: MasterCommand) -> anyhow::Result<()> {
    match cmd {
        MasterCommand::Init { dir } => {
            std::fs::create_dir_all(&dir.dir)
                .with_context(|| format!("cannot create {}", dir.dir.display()))?;
            let m = Master::init(&dir.dir)?;
            println!("cluster {} created in {}", m.cluster, dir.dir.display());
            println!("master_key = \"{}\"", m.key.public);
        }
        MasterCommand::Show { dir } => {
            let m = Master::open(&dir.dir)?;
            println!("cluster {}", m.cluster);
            println!("master_key = \"{}\"", m.key.public);
        }
        MasterCommand::Admit {
            dir,
            name,
            virtual_ip,
            host_key,
            groups,
            valid_days,
            valid_secs,
            brokers,
        } => {
            let m = Master::open(&dir.dir)?;
            let valid = Duration::from_secs(valid_secs.unwrap_or(valid_days * 86400));
            let signed = m.admit(&name, virtual_ip, host_key, groups, valid)?;
            let r = signed.verify(&m.key.public).expect("just signed");
            println!(
                "admitted {} as {} (serial {}, valid until {})",
                r.name,
                r.virtual_ip,
                r.serial,
                human_date(r.not_after)
            );
            publish_to(&m, &brokers).await?;
        }
        MasterCommand::Revoke { dir, name, brokers } => {
            let m = Master::open(&dir.dir)?;
            let (r, list) = m.revoke(&name)?;
            let version = list.verify(&m.key.public).expect("just signed").version;
            println!(
                "revoked {} ({}, serial {}); revocation list version {version}",
                r.name, r.virtual_ip, r.serial
            );
            publish_to(&m, &brokers).await?;
        }
        MasterCommand::Policy { dir, file, brokers } => {
            let m = Master::open(&dir.dir)?;
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let parsed: PolicyFile = toml::from_str(&text)
                .with_context(|| format!("invalid policy {}", file.display()))?;
            let signed = m.set_policy(parsed.rules()?)?;
            let p = signed.verify(&m.key.public).expect("just signed");
            println!(
                "global policy version {} with {} rules",
                p.version,
                p.rules.len()
            );
            publish_to(&m, &brokers).await?;
        }
        MasterCommand::Publish { dir, brokers } => {
            publish_to(&Master::open(&dir.dir)?, &brokers).await?
        }
        MasterCommand::List { dir } => {
            let m = Master::open(&dir.dir)?;
            println!(
                "{:<6} {:<20} {:<16} {:<10} {:<20} {:<12} HOST KEY",
                "SERIAL", "NAME", "VIRTUAL", "STATE", "VALID UNTIL", "GROUPS"
            );
            for e in m.entries()? {
                let state = if e.revoked {
                    "revoked"
                } else if e.record.not_after < pvc_proto::unix_now() {
                    "expired"
                } else {
                    "admitted"
                };
                println!(
                    "{:<6} {:<20} {:<16} {:<10} {:<20} {:<12} {}",
                    e.record.serial,
                    e.record.name,
                    e.record.virtual_ip,
                    state,
                    human_date(e.record.not_after),
                    e.record.groups.join(","),
                    e.record.host_key
                );
            }
        }
    }
    Ok(())
}

fn print_status(s: &Status) {
    println!("{} ({}) in cluster {}", s.name, s.virtual_ip, s.cluster);
    println!(
        "  host key {}{}",
        s.host_key,
        if s.admitted {
            ""
        } else {
            " (no verified record yet)"
        }
    );
    println!(
        "  uplink {} {}, advertised {:?}",
        s.uplink, s.real_ip, s.advertised
    );
    if s.brokers.is_empty() {
        println!("  brokers: none connected");
    }
    for b in &s.brokers {
        println!(
            "  broker {}: connected, sees this host as {}",
            b.broker, b.observed
        );
    }
    let site = &s.site;
    println!(
        "  site: public address {}, NAT {:?}, inbound {:?}, UPnP {}",
        site.public.map_or("unknown".to_string(), |p| p.to_string()),
        site.nat,
        site.inbound,
        site.upnp
            .map_or("none".to_string(), |u| format!("forwards {u}"))
    );
    let authenticated = s.peers.iter().filter(|p| p.authenticated).count();
    println!(
        "  {} members known, {authenticated} with an authenticated path; {} flow entries",
        s.peers.len(),
        s.flows.len()
    );
    println!(
        "  revocation list v{}, global policy v{}",
        s.revocations_version, s.policy_version
    );
    let t = &s.traffic;
    println!(
        "  masqueraded: out {} packets / {} bytes, in {} packets / {} bytes",
        t.egress_packets, t.egress_bytes, t.ingress_packets, t.ingress_bytes
    );
    for (technique, n) in &s.flows_opened {
        println!("  flows opened via {technique}: {n}");
    }
    for (reason, n) in s.drops.iter().filter(|(_, n)| **n > 0) {
        println!("  dropped/refused ({reason}): {n}");
    }
}

fn print_peers(s: &Status) {
    println!(
        "{:<20} {:<16} {:<16} {:<22} GROUPS",
        "NAME", "VIRTUAL", "REAL", "PATH"
    );
    for p in &s.peers {
        // An authenticated path, or the technique the first flow will try.
        let (real, path) = match (&p.path, &p.technique) {
            (Some((r, t)), _) => (r.to_string(), t.clone()),
            (None, Some(t)) => ("-".to_string(), format!("{t} (not yet)")),
            (None, None) => ("-".to_string(), "none".to_string()),
        };
        println!(
            "{:<20} {:<16} {:<16} {:<22} {}",
            p.name,
            p.virtual_ip,
            real,
            path,
            p.groups.join(",")
        );
    }
}

fn print_flows(s: &Status) {
    println!(
        "{:<5} {:<8} {:<9} {:<46} {:<46}   IDLE",
        "PROTO", "DIR", "TECHNIQUE", "MATCH", "REWRITE"
    );
    for f in &s.flows {
        // A flow translated at the socket: its virtual tuple, then the one
        // its socket has on the wire; the kernel keeps no idle time for it.
        let idle = if f.direction == "socket" {
            "-".to_string()
        } else {
            format!("{}s", f.idle_secs)
        };
        println!(
            "{:<5} {:<8} {:<9} {:<46} {:<46} {:>6}{}",
            f.proto,
            f.direction,
            f.technique,
            f.from,
            f.to,
            idle,
            if f.closing { " closing" } else { "" }
        );
    }
    for r in &s.relayed {
        println!(
            "{:<5} {:<8} {:<9} {:<46} {:<46}",
            "tcp",
            if r.outbound { "out" } else { "in" },
            "relay",
            format!("{} -> {}", r.local, r.remote),
            format!("via broker {}", r.broker),
        );
    }
}

/// A Unix time as people read it: "2027-11-30 14:05 UTC".
fn human_date(unix: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix.min(i64::MAX as u64) as i64) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute()
        ),
        Err(_) => format!("{unix} (Unix time)"),
    }
}

/// One TCP connection attempt to `to`: how long until the member's kernel
/// answered (a SYN/ACK, or a RST from a closed port).
async fn knock(to: std::net::SocketAddr) -> anyhow::Result<Duration> {
    let started = std::time::Instant::now();
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(to)).await {
        Ok(Ok(_)) => Ok(started.elapsed()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(started.elapsed()),
        Ok(Err(e)) => Err(e).with_context(|| format!("cannot reach {to}")),
        Err(_) => anyhow::bail!(
            "no answer from {to} within 5 s (the member's inbound policy may drop this port: \
             try --port)"
        ),
    }
}

async fn ping(member: &str, count: u32, port: u16, s: &AgentSocket) -> anyhow::Result<()> {
    let before = status(s).await?;
    let find = |st: &Status| {
        st.peers
            .iter()
            .find(|p| p.name == member || p.virtual_ip.to_string() == member)
            .cloned()
    };
    let peer = find(&before).ok_or_else(|| {
        anyhow::anyhow!("no member named {member} is known to this agent (`pvc peers` lists them)")
    })?;
    let to = std::net::SocketAddr::from((peer.virtual_ip, port));
    let first = knock(to).await?;
    let mut rtts = Vec::new();
    for _ in 0..count {
        rtts.push(knock(to).await?);
    }
    rtts.sort();
    let median = rtts.get(rtts.len() / 2).copied().unwrap_or(first);
    let after = find(&status(s).await?).unwrap_or(peer.clone());
    let (real, technique) = after
        .path
        .clone()
        .unwrap_or((Ipv4Addr::UNSPECIFIED, "none".into()));
    // The first connection paid for what the path needed first.
    let setup = (!peer.authenticated).then(|| first.saturating_sub(median));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if s.json {
        let v = serde_json::json!({
            "name": after.name,
            "virtual_ip": after.virtual_ip,
            "real": real,
            "technique": technique,
            "authenticated_now": !peer.authenticated,
            "first_connection_ms": ms(first),
            "setup_ms": setup.map(ms),
            "round_trips_ms": rtts.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{} ({}): path via {technique} to {real}",
        after.name, after.virtual_ip
    );
    match setup {
        Some(d) => println!(
            "  authenticated now: first connection {:.2} ms, of which set-up {:.2} ms",
            ms(first),
            ms(d)
        ),
        None => println!(
            "  path already authenticated: first connection {:.2} ms",
            ms(first)
        ),
    }
    if let (Some(min), Some(max)) = (rtts.first(), rtts.last()) {
        println!(
            "  tcp round trip to port {port}: min {:.3} ms, median {:.3} ms, max {:.3} ms ({} connections)",
            ms(*min),
            ms(median),
            ms(*max),
            rtts.len()
        );
    }
    Ok(())
}
