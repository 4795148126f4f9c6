//! The agent as a systemd service (`Type=notify`): it says it is ready once
//! its data path is attached and a broker session is up, keeps a STATUS=
//! line current, pings the watchdog from its event loop, and reloads its
//! configuration on SIGHUP (`ExecReload`) without touching established
//! flows. Outside systemd (no NOTIFY_SOCKET) all of this is silent.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{error, info, warn};

use super::{agent::Agent, lifecycle::Tasks};
use crate::config::Config;

/// Tells the service manager, if one started us.
pub(super) fn notify(states: &[NotifyState]) {
    // Not started by systemd, or it went away: nobody to tell.
    let _ = sd_notify::notify(false, states);
}

/// How often to ping the watchdog: half the period the unit asks for
/// (`WatchdogSec=`), or never.
pub(super) fn watchdog_period() -> Option<Duration> {
    // As libsystemd reads them: WATCHDOG_PID, when set, must name us.
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// What a standing means, for logs and `pvc status`.
pub(super) fn standing_name(standing: u8) -> &'static str {
    match standing {
        pvc_common::STANDING_REVOKED => "revoked",
        pvc_common::STANDING_EXPIRED => "expired",
        _ => "member",
    }
}

impl Agent {
    /// Follows this host's own membership: revoked or expired, connect()
    /// to members fails at once (EKEYREVOKED / EKEYEXPIRED) instead of
    /// waiting for members that refuse it; admitted again, it works again.
    pub(super) fn check_standing(&mut self) {
        let standing = self.core.standing(pvc_proto::unix_now());
        if standing == self.standing {
            return;
        }
        self.standing = standing;
        if let Err(e) = self.datapath.maps.set_standing(standing) {
            warn!("cannot tell the kernel this host's standing: {e:#}");
        }
        match standing {
            pvc_common::STANDING_REVOKED => error!(
                "the master revoked this host's membership: connections to members now fail \
                 with EKEYREVOKED; the cluster's administrator can admit it again (`pvc master admit`)"
            ),
            pvc_common::STANDING_EXPIRED => error!(
                "this host's membership expired: connections to members now fail with \
                 EKEYEXPIRED; the cluster's administrator can admit it again (`pvc master admit`)"
            ),
            _ => info!("this host is a member again: connections to members work"),
        }
        self.tell_service_manager();
    }

    /// The one-line state `systemctl status` shows; READY=1 the first time
    /// a broker session is up (the data path is attached by then).
    pub(super) fn tell_service_manager(&mut self) {
        let peers = self.core.peers.len();
        let authenticated = self
            .core
            .peers
            .values()
            .filter(|p| p.session.is_some())
            .count();
        let line = if self.standing != pvc_common::STANDING_MEMBER {
            format!(
                "membership {}: connections to members are refused",
                standing_name(self.standing)
            )
        } else {
            format!(
                "{} members known, {authenticated} with an authenticated path; brokers {}/{}",
                peers,
                self.core.brokers.len(),
                self.config.brokers.len()
            )
        };
        if !self.ready_told && !self.core.brokers.is_empty() {
            self.ready_told = true;
            notify(&[NotifyState::Ready, NotifyState::Status(&line)]);
            info!("ready: data path attached and a broker session up");
        } else {
            notify(&[NotifyState::Status(&line)]);
        }
    }

    /// SIGHUP: reads the configuration again. The local policy, the
    /// brokers, the log filter and the metrics address apply at once; what
    /// the data path or the host's identity is built from needs a restart
    /// (said in the log, the running value stays). A configuration that
    /// does not load changes nothing.
    pub(super) async fn reload(&mut self, tasks: &mut Tasks) {
        notify(&[NotifyState::Reloading]);
        info!(config = %self.config_path.display(), "SIGHUP: reloading the configuration");
        match Config::load(&self.config_path) {
            Ok(new) => self.apply_config(new, tasks).await,
            Err(e) => error!("the configuration was not reloaded, the running one stays: {e:#}"),
        }
        notify(&[NotifyState::Ready]);
        self.tell_service_manager();
    }

    async fn apply_config(&mut self, new: Config, tasks: &mut Tasks) {
        let old = &self.config;
        let fixed = [
            ("instance", old.instance != new.instance),
            ("master_key", old.master_key != new.master_key),
            ("key_file", old.key_file != new.key_file),
            ("name", old.name != new.name),
            ("virtual_ip", old.virtual_ip != new.virtual_ip),
            ("advertise", old.advertise != new.advertise),
            ("interposition", old.interposition != new.interposition),
            ("flows", old.flows != new.flows),
            ("security", old.security != new.security),
            ("connectivity", old.connectivity != new.connectivity),
            ("run_dir", old.run_dir != new.run_dir),
            ("state_dir", old.state_dir != new.state_dir),
            (
                "metrics.program_stats",
                old.metrics.program_stats != new.metrics.program_stats,
            ),
        ];
        for (what, changed) in fixed {
            if changed {
                warn!(
                    "{what} changed: it applies when the agent restarts; the running value stays"
                );
            }
        }
        if new.policy != self.config.policy {
            // Validated by the load: parsing cannot fail here.
            match new.policy.parse() {
                Ok(local) => {
                    self.core.local_policy = local;
                    let mut effects = Vec::new();
                    self.core.recompile_policy(&mut effects);
                    self.apply(effects).await;
                    self.config.policy = new.policy.clone();
                    info!("local policy reloaded: new flows follow it, established ones go on");
                }
                Err(e) => error!("the local policy was not reloaded: {e:#}"),
            }
        }
        if new.brokers != self.config.brokers {
            let list = new.broker_addresses();
            if tasks.reconfigure_brokers.send(list.clone()).await.is_ok() {
                tasks.set_metrics_brokers(list.clone());
                info!(brokers = ?list, "brokers reloaded");
                self.config.brokers = new.brokers;
            }
        }
        if new.log != self.config.log {
            match crate::set_log_filter(&new.log) {
                Ok(()) => {
                    info!(log = new.log, "log filter reloaded");
                    self.config.log = new.log;
                }
                Err(e) => error!("the log filter was not reloaded: {e:#}"),
            }
        }
        if new.metrics.listen != self.config.metrics.listen {
            match tasks.serve_metrics(new.metrics.listen) {
                Ok(()) => {
                    info!(listen = ?new.metrics.listen, "metrics address reloaded");
                    self.config.metrics.listen = new.metrics.listen;
                }
                Err(e) => error!("the metrics address was not reloaded: {e:#}"),
            }
        }
    }
}
