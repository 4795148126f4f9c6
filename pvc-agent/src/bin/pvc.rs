//! `pvc`: the command-line tool for a host running `pvc-agent`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use pvc_agent::control::{self, Request, Status};

#[derive(Parser)]
#[command(name = "pvc", version, about = "Private Virtual Cluster")]
struct Args {
    /// Agent instance to talk to.
    #[arg(long, global = true, default_value = "default")]
    instance: String,
    /// Control socket (default: /run/pvc/<instance>.sock).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// This host's membership, broker and counters.
    Status,
    /// Known members and the path to each.
    Peers,
    /// Flows in the masquerading map.
    Flows,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("pvc: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let socket = args
        .socket
        .unwrap_or_else(|| PathBuf::from(format!("/run/pvc/{}.sock", args.instance)));
    let status = control::query(&socket, Request::Status).await?;
    if args.json {
        let value = match args.command {
            Command::Status => serde_json::to_value(&status)?,
            Command::Peers => serde_json::to_value(&status.peers)?,
            Command::Flows => serde_json::to_value(&status.flows)?,
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    match args.command {
        Command::Status => print_status(&status),
        Command::Peers => print_peers(&status),
        Command::Flows => print_flows(&status),
    }
    Ok(())
}

fn print_status(s: &Status) {
    println!("{} ({}) in cluster {}", s.name, s.virtual_ip, s.cluster);
    println!(
        "  uplink {} {}, advertised {:?}",
        s.uplink, s.real_ip, s.advertised
    );
    match &s.broker {
        Some(b) => println!("  broker {b}: connected"),
        None => println!("  broker: not connected"),
    }
    println!("  {} peers, {} flow entries", s.peers.len(), s.flows.len());
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
    println!("{:<20} {:<16} {:<16} TECHNIQUE", "NAME", "VIRTUAL", "REAL");
    for p in &s.peers {
        let (real, technique) = p
            .path
            .as_ref()
            .map_or(("-".to_string(), "none".to_string()), |(r, t)| {
                (r.to_string(), t.clone())
            });
        println!(
            "{:<20} {:<16} {:<16} {}",
            p.name, p.virtual_ip, real, technique
        );
    }
}

fn print_flows(s: &Status) {
    println!(
        "{:<5} {:<8} {:<46} {:<46}   IDLE",
        "PROTO", "DIR", "MATCH", "REWRITE"
    );
    for f in &s.flows {
        println!(
            "{:<5} {:<8} {:<46} {:<46} {:>5}s{}",
            f.proto,
            f.direction,
            f.from,
            f.to,
            f.idle_secs,
            if f.closing { " closing" } else { "" }
        );
    }
}
