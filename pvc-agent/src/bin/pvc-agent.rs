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

#[tokio::main]
async fn main() {
    pvc_agent::init_logging();
    let args = Args::parse();
    let result = match Config::load(&args.config) {
        Ok(config) if args.cleanup => coordinator::cleanup(&config).await,
        Ok(config) => match pvc_agent::set_log_filter(&config.log) {
            Ok(()) => coordinator::run(config, &args.config).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        eprintln!("pvc-agent: {e:#}");
        std::process::exit(1);
    }
}
