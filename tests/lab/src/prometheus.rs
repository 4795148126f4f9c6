//! Debian's Prometheus beside the lab's broker, scraping every agent's and
//! the broker's metrics each second, and queries to it through its HTTP API.

use std::time::Duration;

use anyhow::Context as _;
use serde_json::Value;

use crate::{AGENT_METRICS_PORT, BROKER_IP, BROKER_METRICS_PORT, Lab, wait_until};

/// Where the lab's Prometheus answers (in the broker's namespace).
pub const PROMETHEUS: &str = "127.0.0.1:9090";

impl Lab {
    /// Starts Prometheus on every host's metrics (their configuration's
    /// `[metrics] listen` on the host's address, the lab's default) and the
    /// broker's; returns once every target is up.
    pub fn start_prometheus(&mut self) -> anyhow::Result<()> {
        let agents: Vec<String> = self
            .hosts
            .iter()
            .map(|h| format!("\"{}:{AGENT_METRICS_PORT}\"", h.real))
            .collect();
        let config = self.dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pvc-agent\n    \
                 static_configs:\n      - targets: [{}]\n  - job_name: pvc-broker\n    \
                 static_configs:\n      - targets: [\"{BROKER_IP}:{BROKER_METRICS_PORT}\"]\n",
                agents.join(", ")
            ),
        )?;
        let tsdb = self.dir.join("tsdb");
        self.spawn_beside_broker(
            "prometheus",
            &[
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", tsdb.display()),
                &format!("--web.listen-address={PROMETHEUS}"),
            ],
        )?;
        let targets = self.hosts.len() + 1;
        wait_until(
            Duration::from_secs(30),
            &format!("Prometheus scraping {targets} targets"),
            || {
                let up = self.prometheus_query("up == 1", None).ok()?;
                (up["data"]["result"].as_array()?.len() == targets).then_some(())
            },
        )
        .with_context(|| format!("{:?}", self.prometheus_query("up", None)))
    }

    /// A PromQL query (at Unix time `at`, or now): Prometheus' JSON answer.
    pub fn prometheus_query(&self, expr: &str, at: Option<f64>) -> anyhow::Result<Value> {
        let mut p = self.in_broker_netns("curl");
        p.cmd.args([
            "-sS",
            "--max-time",
            "5",
            "-G",
            &format!("http://{PROMETHEUS}/api/v1/query"),
            "--data-urlencode",
            &format!("query={expr}"),
        ]);
        if let Some(at) = at {
            p.cmd.args(["--data-urlencode", &format!("time={at:.3}")]);
        }
        let out = p.ok().context("querying the lab's Prometheus")?;
        serde_json::from_str(&out).with_context(|| format!("Prometheus answered: {out}"))
    }
}

/// The series of a query's answer.
pub fn series(v: &Value) -> &[Value] {
    v["data"]["result"].as_array().map_or(&[], Vec::as_slice)
}

/// A series' value.
pub fn value(series: &Value) -> Option<f64> {
    series["value"][1].as_str()?.parse().ok()
}
