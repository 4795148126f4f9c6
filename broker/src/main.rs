//! `pvc-broker`: the brokering service. Run it on a host every member can
//! reach (a public address, or the LAN for a single-site cluster).

use std::net::SocketAddr;

use anyhow::Context as _;
use broker::{Broker, Limits};
use clap::Parser;
use tokio::net::TcpListener;
use tracing::info;

#[derive(Parser)]
#[command(name = "pvc-broker", version, about = "PVC brokering service")]
struct Args {
    /// Address and port to accept agents on.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], pvc_proto::DEFAULT_BROKER_PORT)))]
    listen: SocketAddr,
    /// Name this broker reports to agents (default: the listen address).
    #[arg(long)]
    name: Option<String>,
    /// File where published records, revocations and policies are kept
    /// across restarts (default: memory only).
    #[arg(long)]
    state: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("pvc-broker: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PVC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await.with_context(|| {
        format!(
            "cannot listen on {} (in use, or not an address of this host?)",
            args.listen
        )
    })?;
    let name = args.name.clone().unwrap_or_else(|| args.listen.to_string());
    info!(listen = %args.listen, name, "broker ready");
    let broker = match &args.state {
        Some(path) => Broker::with_store(name, Limits::default(), path)?,
        None => Broker::new(name, Limits::default()),
    };
    tokio::select! {
        r = broker.serve(listener) => r.context("accepting agents failed")?,
        _ = shutdown() => info!("broker stopping"),
    }
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
