//! PVC's peer daemon, as modules named after the paper's peer (Fig. 2):
//! the coordinator runs the workflow through interposition (eBPF),
//! virtualization (addresses, routes), security (keys, membership,
//! challenge-response, policy) and connectivity (techniques).

pub mod broker_client;
pub mod config;
pub mod connectivity;
pub mod control;
pub mod coordinator;
pub mod interposition;
pub mod security;
pub mod virtualization;

/// Logs go to stderr; `PVC_LOG` takes a tracing filter (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PVC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
