//! `pvc-agent`: the PVC peer daemon.

use std::path::PathBuf;

use clap::Parser;
use pvc_agent::{config::Config, coordinator};

#[derive(Parser)]
#[command(name = "pvc-agent", version, about = "PVC peer daemon")]
struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = pvc_agent::config::DEFAULT_PATH)]
    config: PathBuf,
    /// Remove what this instance set up (after a crash) and exit.
    #[arg(long)]
    cleanup: bool,
}

/// Runs this program again in place (same process id, for systemd and
/// whoever watches it), to set up on the host's new network from scratch.
/// Returns only if that fails.
fn start_over() -> anyhow::Error {
    use std::os::unix::process::CommandExt as _;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return anyhow::anyhow!("cannot start over: {e}"),
    };
    let e = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .exec();
    anyhow::anyhow!("cannot start over: {e}")
}

#[tokio::main]
async fn main() {
    pvc_agent::init_logging();
    let args = Args::parse();
    let result = match Config::load(&args.config) {
        Ok(config) if args.cleanup => coordinator::cleanup(&config).await,
        Ok(config) => match pvc_agent::set_log_filter(&config.log) {
            Ok(()) => match coordinator::run(config, &args.config).await {
                Ok(coordinator::Ending::Stopped) => Ok(()),
                Ok(coordinator::Ending::NetworkMoved) => Err(start_over()),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        eprintln!("pvc-agent: {e:#}");
        std::process::exit(1);
    }
}
