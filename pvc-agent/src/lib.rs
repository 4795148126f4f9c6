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

type LogFilter =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// The running filter, for a reload (SIGHUP) to change.
static LOG_FILTER: std::sync::OnceLock<LogFilter> = std::sync::OnceLock::new();

/// Logs go to stderr; `PVC_LOG` takes a tracing filter (default `info`,
/// or the configuration's `log`, which a reload changes).
pub fn init_logging() {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter = log_override()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    let _ = LOG_FILTER.set(handle);
}

/// `PVC_LOG`, when set to something.
fn log_override() -> Option<String> {
    std::env::var("PVC_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// Applies the configuration's log filter, unless `PVC_LOG` set one.
pub fn set_log_filter(directives: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if log_override().is_some() {
        return Ok(());
    }
    let filter = tracing_subscriber::EnvFilter::try_new(directives).with_context(|| {
        format!("log {directives:?} is not a log filter (e.g. \"info\", \"pvc_agent=debug\")")
    })?;
    if let Some(handle) = LOG_FILTER.get() {
        handle
            .reload(filter)
            .context("cannot change the log filter")?;
    }
    Ok(())
}
