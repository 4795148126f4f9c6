//! The agent's Prometheus metrics. What the kernel counts (packets, drops,
//! program statistics) and what `pvc status` shows is read at each scrape;
//! what only happens in the agent (handshakes, set-up times) is observed as
//! it happens, by the core.

use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    core::Collector,
};

use pvc_proto::metrics::set_total;

use crate::control::Status;

/// Buckets for authentication and connection set-up: a LAN exchange takes a
/// millisecond, one through a broker across the Internet a few round trips,
/// a fallback to the relay over a second.
const SETUP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// What the core observes: handshakes and first connections.
#[derive(Clone)]
pub struct CoreMetrics {
    handshakes: IntCounterVec,
    handshake_seconds: Histogram,
    setup_seconds: HistogramVec,
}

impl Default for CoreMetrics {
    fn default() -> Self {
        Self {
            handshakes: IntCounterVec::new(
                Opts::new(
                    "pvc_handshakes_total",
                    "Path authentications (challenge-response with a member) by outcome",
                ),
                &["outcome"],
            )
            .expect("valid metric"),
            handshake_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "pvc_handshake_duration_seconds",
                    "Time from the start of a path authentication to its path installed",
                )
                .buckets(SETUP_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            setup_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "pvc_connection_setup_seconds",
                    "Time a connection's SYN waited for the agent (authentication, traversal) \
                     before it went out, by technique",
                )
                .buckets(SETUP_BUCKETS.to_vec()),
                &["technique"],
            )
            .expect("valid metric"),
        }
    }
}

impl CoreMetrics {
    pub fn handshake(&self, succeeded: bool, took: Duration) {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        self.handshakes.with_label_values(&[outcome]).inc();
        if succeeded {
            self.handshake_seconds.observe(took.as_secs_f64());
        }
    }

    pub fn connection_setup(&self, technique: &str, took: Duration) {
        self.setup_seconds
            .with_label_values(&[technique])
            .observe(took.as_secs_f64());
    }

    fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.handshakes.clone()),
            Box::new(self.handshake_seconds.clone()),
            Box::new(self.setup_seconds.clone()),
        ]
    }
}

/// Every metric the agent serves.
pub struct Metrics {
    registry: Registry,
    packets: IntCounterVec,
    bytes: IntCounterVec,
    flows: IntGaugeVec,
    relayed_flows: IntGauge,
    flow_capacity: IntGauge,
    flows_opened: IntCounterVec,
    drops: IntCounterVec,
    policy_refusals: IntCounterVec,
    peers: IntGaugeVec,
    brokers: IntGaugeVec,
    admitted: IntGauge,
    events: IntCounterVec,
    program_runs: IntCounterVec,
    program_run_ns: IntCounterVec,
    program_stats: IntGauge,
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

impl Metrics {
    pub fn new(core: &CoreMetrics) -> Self {
        let m = Self {
            registry: Registry::new(),
            packets: counter_vec(
                "pvc_masqueraded_packets_total",
                "Packets the tc programs masqueraded, by direction",
                &["direction"],
            ),
            bytes: counter_vec(
                "pvc_masqueraded_bytes_total",
                "Bytes (IP packets, GSO super-packets counted whole) the tc programs masqueraded",
                &["direction"],
            ),
            flows: gauge_vec(
                "pvc_flows",
                "Flows translated at the socket and flows in the masquerading map (counted once, \
                 on the direction this host sends), by technique and state",
                &["technique", "state"],
            ),
            relayed_flows: gauge("pvc_relayed_flows", "Flows carried by a broker's relay now"),
            flow_capacity: gauge(
                "pvc_flow_capacity_entries",
                "Entries the masquerading map holds (two per flow)",
            ),
            flows_opened: counter_vec(
                "pvc_flows_opened_total",
                "Flows opened since the agent started, by technique",
                &["technique"],
            ),
            drops: counter_vec(
                "pvc_drops_total",
                "Packets the data path dropped or refused, by reason (see `pvc status`)",
                &["reason"],
            ),
            policy_refusals: counter_vec(
                "pvc_policy_refusals_total",
                "Flows the policy refused, by direction",
                &["direction"],
            ),
            peers: gauge_vec(
                "pvc_peers",
                "Members known to this agent, by state (member: verified record, no \
                 authenticated path; authenticated) and technique",
                &["state", "technique"],
            ),
            brokers: gauge_vec(
                "pvc_broker_session_up",
                "1 for each configured broker this agent has a session with, else 0",
                &["broker"],
            ),
            admitted: gauge(
                "pvc_admitted",
                "1 once a broker handed over this host's master-signed record",
            ),
            events: counter_vec(
                "pvc_agent_events_total",
                "What the agent did: held SYNs re-sent or refused, traversals, relays...",
                &["event"],
            ),
            program_runs: counter_vec(
                "pvc_program_runs_total",
                "Runs of each eBPF program (counted while program statistics are on)",
                &["program"],
            ),
            program_run_ns: counter_vec(
                "pvc_program_run_time_nanoseconds_total",
                "Time spent in each eBPF program, ns (counted while program statistics are on)",
                &["program"],
            ),
            program_stats: gauge(
                "pvc_program_stats_enabled",
                "1 while the kernel counts eBPF program run time (metrics.program_stats)",
            ),
        };
        let own: Vec<Box<dyn Collector>> = vec![
            Box::new(m.packets.clone()),
            Box::new(m.bytes.clone()),
            Box::new(m.flows.clone()),
            Box::new(m.relayed_flows.clone()),
            Box::new(m.flow_capacity.clone()),
            Box::new(m.flows_opened.clone()),
            Box::new(m.drops.clone()),
            Box::new(m.policy_refusals.clone()),
            Box::new(m.peers.clone()),
            Box::new(m.brokers.clone()),
            Box::new(m.admitted.clone()),
            Box::new(m.events.clone()),
            Box::new(m.program_runs.clone()),
            Box::new(m.program_run_ns.clone()),
            Box::new(m.program_stats.clone()),
        ];
        for c in own.into_iter().chain(core.collectors()) {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }

    /// The page for one scrape, from the agent's status at this moment.
    pub fn render(&self, s: &Status, brokers: &[String], program_stats: bool) -> String {
        let t = &s.traffic;
        for (direction, packets, bytes) in [
            ("egress", t.egress_packets, t.egress_bytes),
            ("ingress", t.ingress_packets, t.ingress_bytes),
        ] {
            set_total(&self.packets.with_label_values(&[direction]), packets);
            set_total(&self.bytes.with_label_values(&[direction]), bytes);
        }
        self.flows.reset();
        for f in s
            .flows
            .iter()
            .filter(|f| f.direction == "egress" || f.direction == "socket")
        {
            let state = if f.closing { "closing" } else { "open" };
            self.flows
                .with_label_values(&[f.technique.as_str(), state])
                .inc();
        }
        self.relayed_flows.set(s.relayed.len() as i64);
        self.flow_capacity.set(i64::from(s.flow_capacity));
        for (technique, n) in &s.flows_opened {
            set_total(&self.flows_opened.with_label_values(&[technique]), *n);
        }
        for (reason, n) in &s.drops {
            set_total(&self.drops.with_label_values(&[reason]), *n);
        }
        for (direction, reason) in [
            ("outbound", "policy_outbound"),
            ("inbound", "policy_inbound"),
        ] {
            let n = s.drops.get(reason).copied().unwrap_or(0);
            set_total(&self.policy_refusals.with_label_values(&[direction]), n);
        }
        self.peers.reset();
        for p in &s.peers {
            let state = if p.authenticated {
                "authenticated"
            } else {
                "member"
            };
            let technique = p.technique.as_deref().unwrap_or("none");
            self.peers.with_label_values(&[state, technique]).inc();
        }
        for b in brokers {
            let up = s.brokers.iter().any(|s| &s.broker == b);
            self.brokers.with_label_values(&[b]).set(i64::from(up));
        }
        self.admitted.set(i64::from(s.admitted));
        for (event, n) in &s.agent_counters {
            set_total(&self.events.with_label_values(&[event]), *n);
        }
        for (program, (ns, runs)) in &s.programs {
            set_total(&self.program_run_ns.with_label_values(&[program]), *ns);
            set_total(&self.program_runs.with_label_values(&[program]), *runs);
        }
        self.program_stats.set(i64::from(program_stats));
        pvc_proto::metrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_renders_with_conventional_names() {
        let core = CoreMetrics::default();
        core.handshake(true, Duration::from_millis(3));
        core.connection_setup("lan", Duration::from_millis(4));
        let m = Metrics::new(&core);
        let mut s = Status::default();
        s.drops.insert("policy_inbound".into(), 4);
        s.traffic.egress_packets = 7;
        let page = m.render(&s, &["b:7100".into()], false);
        for line in [
            "pvc_masqueraded_packets_total{direction=\"egress\"} 7",
            "pvc_policy_refusals_total{direction=\"inbound\"} 4",
            "pvc_drops_total{reason=\"policy_inbound\"} 4",
            "pvc_handshakes_total{outcome=\"succeeded\"} 1",
            "pvc_handshake_duration_seconds_count 1",
            "pvc_connection_setup_seconds_count{technique=\"lan\"} 1",
            "pvc_broker_session_up{broker=\"b:7100\"} 0",
        ] {
            assert!(page.contains(line), "{line} missing from:\n{page}");
        }
    }
}
