//! `pvc-broker`: the brokering service. Run it on a host every member can
//! reach (a public address, or the LAN for a single-site cluster).

use std::net::SocketAddr;

use anyhow::Context as _;
use broker::{Broker, Limits};
use clap::Parser;
use tokio::net::TcpListener;
use tracing::{info, warn};

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
    /// Where Prometheus metrics are served (`GET /metrics`); "" serves none.
    #[arg(long, default_value_t = format!("127.0.0.1:{DEFAULT_METRICS_PORT}"))]
    metrics_listen: String,
}

/// Loopback: the metrics name clusters and their load; expose them on purpose.
const DEFAULT_METRICS_PORT: u16 = 9598;

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
    raise_file_limit();
    // Everything is opened before the broker says it is ready: a state file
    // it cannot use ends it here, with nothing announced.
    let name = args.name.clone().unwrap_or_else(|| args.listen.to_string());
    let broker = match &args.state {
        Some(path) => Broker::with_store(name.clone(), Limits::default(), path)?,
        None => Broker::new(name.clone(), Limits::default()),
    };
    let listener = TcpListener::bind(args.listen).await.with_context(|| {
        format!(
            "cannot listen on {} (in use, or not an address of this host?)",
            args.listen
        )
    })?;
    let metrics = if args.metrics_listen.is_empty() {
        None
    } else {
        let addr: SocketAddr = args.metrics_listen.parse().with_context(|| {
            format!(
                "--metrics-listen {:?}: not an address:port (or \"\" for no metrics)",
                args.metrics_listen
            )
        })?;
        let listener = pvc_proto::metrics::bind(addr, "--metrics-listen")?;
        let b = broker.clone();
        info!(%addr, "serving Prometheus metrics at /metrics");
        Some(tokio::spawn(pvc_proto::metrics::serve(
            listener,
            move || {
                let b = b.clone();
                async move { b.render_metrics() }
            },
        )))
    };
    info!(listen = %args.listen, name, "broker ready");
    tokio::select! {
        r = broker.serve(listener) => r.context("accepting agents failed")?,
        _ = shutdown() => info!("broker stopping"),
    }
    if let Some(m) = metrics {
        m.abort();
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

/// One file descriptor per connected agent: take the whole hard limit, so
/// that a broker started by hand serves as many agents as one under systemd.
fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur >= limit.rlim_max
    {
        return;
    }
    let soft = limit.rlim_cur;
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        warn!("cannot raise the open file limit: the broker serves at most about {soft} agents");
        return;
    }
    info!(max_agents = limit.rlim_max, "open file limit raised");
}
