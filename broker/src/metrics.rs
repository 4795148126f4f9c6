//! The broker's Prometheus metrics: sessions and clusters (read from its
//! state at each scrape), messages it passed between members, the relay's
//! flows and bytes, and the sessions it refused, by reason.

use std::sync::atomic::Ordering;

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry, core::Collector};
use pvc_proto::{ErrorCode, metrics::set_total};

use crate::Broker;

pub struct BrokerMetrics {
    registry: Registry,
    pub(crate) refusals: IntCounterVec,
    pub(crate) messages: IntCounterVec,
    sessions: IntGauge,
    clusters: IntGauge,
    relayed_flows: IntGauge,
    relayed_flows_total: IntCounter,
    relayed_bytes: IntCounter,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        let m = Self {
            registry: Registry::new(),
            refusals: IntCounterVec::new(
                Opts::new(
                    "pvc_broker_refusals_total",
                    "Sessions the broker refused or closed for a fault, by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            messages: IntCounterVec::new(
                Opts::new(
                    "pvc_broker_messages_total",
                    "Handshake messages members sent each other through the broker, by outcome",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            sessions: IntGauge::new("pvc_broker_sessions", "Members with a session now")
                .expect("valid metric"),
            clusters: IntGauge::new(
                "pvc_broker_clusters",
                "Clusters whose master published to this broker",
            )
            .expect("valid metric"),
            relayed_flows: IntGauge::new("pvc_broker_relayed_flows", "Relayed flows running now")
                .expect("valid metric"),
            relayed_flows_total: IntCounter::new(
                "pvc_broker_relayed_flows_total",
                "Relayed flows that ended",
            )
            .expect("valid metric"),
            relayed_bytes: IntCounter::new(
                "pvc_broker_relayed_bytes_total",
                "Bytes the relay moved between members (both directions)",
            )
            .expect("valid metric"),
        };
        let all: Vec<Box<dyn Collector>> = vec![
            Box::new(m.refusals.clone()),
            Box::new(m.messages.clone()),
            Box::new(m.sessions.clone()),
            Box::new(m.clusters.clone()),
            Box::new(m.relayed_flows.clone()),
            Box::new(m.relayed_flows_total.clone()),
            Box::new(m.relayed_bytes.clone()),
        ];
        for c in all {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }
}

/// An error code as a label: `NotRegistered` -> `not_registered`.
pub(crate) fn reason(code: ErrorCode) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

impl Broker {
    /// The page for one scrape.
    pub fn render_metrics(&self) -> String {
        let m = &self.metrics;
        {
            let state = self.state.lock().unwrap();
            m.clusters.set(state.clusters.len() as i64);
            m.sessions.set(
                state
                    .clusters
                    .values()
                    .map(|c| c.sessions.len())
                    .sum::<usize>() as i64,
            );
        }
        m.relayed_flows
            .set(self.relays.active.load(Ordering::Relaxed) as i64);
        set_total(
            &m.relayed_flows_total,
            self.relays.completed.load(Ordering::Relaxed),
        );
        set_total(&m.relayed_bytes, self.relays.bytes.load(Ordering::Relaxed));
        pvc_proto::metrics::encode(&m.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_reasons_are_snake_case() {
        assert_eq!(reason(ErrorCode::NotRegistered), "not_registered");
        assert_eq!(reason(ErrorCode::Timeout), "timeout");
    }
}
