//! The agent's configuration: one TOML file, `/etc/pvc/agent.toml` by
//! default. `deploy/agent.toml` documents every option.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use pvc_proto::{DEFAULT_BROKER_PORT, PublicKey, valid_name, valid_virtual_address};
use serde::{Deserialize, Deserializer};

use crate::security::policy::LocalPolicyConfig;

pub const DEFAULT_PATH: &str = "/etc/pvc/agent.toml";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Names what this agent sets up on the host: pins under
    /// `/sys/fs/bpf/pvc/<instance>/`, control socket `<run_dir>/<instance>.sock`.
    #[serde(default = "default_instance")]
    pub instance: String,
    /// The cluster master's public key (`pvc master init` prints it). It
    /// names the cluster and is the only key whose signatures admit members.
    #[serde(deserialize_with = "public_key")]
    pub master_key: PublicKey,
    /// This host's private key; created on first start (mode 0600).
    #[serde(default = "default_key_file")]
    pub key_file: PathBuf,
    /// This member's name (a DNS label), as the master admitted it.
    pub name: String,
    /// This member's virtual address, as the master admitted it.
    pub virtual_ip: Ipv4Addr,
    /// Brokers as "host" or "host:port", tried in order.
    pub brokers: Vec<String>,
    /// Real addresses to advertise; default: the uplink's IPv4 addresses.
    #[serde(default)]
    pub advertise: Vec<Ipv4Addr>,
    pub interposition: Interposition,
    #[serde(default)]
    pub flows: Flows,
    #[serde(default)]
    pub policy: LocalPolicyConfig,
    #[serde(default)]
    pub security: Security,
    #[serde(default)]
    pub connectivity: Connectivity,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
    pub dns: DnsConfig,
    /// What to log: a tracing filter ("info", "debug", "pvc_agent=debug").
    /// `PVC_LOG` in the environment wins over it.
    #[serde(default = "default_log")]
    pub log: String,
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Where the agent keeps what must outlive it (the record of its UPnP
    /// forward, removed by the next start after a crash).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
}

/// The virtual DNS: member names as `NAME.DOMAIN`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    #[serde(default = "default_true")]
    pub enable: bool,
    /// The domain member names live in.
    #[serde(default = "default_domain")]
    pub domain: String,
    /// How the host's resolver reaches it.
    #[serde(default)]
    pub resolver: DnsResolver,
    /// The hosts file the names are kept in, without systemd-resolved.
    #[serde(default = "default_hosts_file")]
    pub hosts_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsResolver {
    /// systemd-resolved where it runs, else the hosts file.
    #[default]
    Auto,
    Resolved,
    Hosts,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            enable: true,
            domain: default_domain(),
            resolver: DnsResolver::Auto,
            hosts_file: default_hosts_file(),
        }
    }
}

fn default_domain() -> String {
    "pvc".into()
}
fn default_hosts_file() -> PathBuf {
    "/etc/hosts".into()
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Where `GET /metrics` is served; "" serves nothing.
    #[serde(
        default = "default_metrics_listen",
        deserialize_with = "optional_address"
    )]
    pub listen: Option<std::net::SocketAddr>,
    /// Have the kernel count each eBPF program's runs and run time while the
    /// agent runs (BPF_ENABLE_STATS). Costs two clock reads per program run
    /// (tens of ns per packet): for measuring, not for always.
    #[serde(default)]
    pub program_stats: bool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
            program_stats: false,
        }
    }
}

/// Loopback: metrics say who talks to whom; expose them on purpose.
pub const DEFAULT_METRICS_PORT: u16 = 9597;
fn default_metrics_listen() -> Option<std::net::SocketAddr> {
    Some(std::net::SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        DEFAULT_METRICS_PORT,
    )))
}

fn optional_address<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<std::net::SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "{s:?} is not an address:port (e.g. \"127.0.0.1:{DEFAULT_METRICS_PORT}\"), or \"\" for no metrics"
        ))
    })
}

/// How this agent reaches members behind NATs and firewalls.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Connectivity {
    /// The agent's PVC port: its broker sessions leave from it (so that the
    /// brokers see the NAT's mapping of it), brokers' probes come to it,
    /// and a UPnP gateway forwards it.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Look for a UPnP gateway on the LAN and ask it to forward the port.
    #[serde(default = "default_true")]
    pub upnp: bool,
    /// The forward's lease, seconds; renewed at half of it.
    #[serde(default = "default_upnp_lease")]
    pub upnp_lease_secs: u32,
}

impl Default for Connectivity {
    fn default() -> Self {
        Self {
            port: default_port(),
            upnp: true,
            upnp_lease_secs: default_upnp_lease(),
        }
    }
}

fn default_port() -> u16 {
    pvc_proto::DEFAULT_AGENT_PORT
}
fn default_upnp_lease() -> u32 {
    600
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Security {
    /// An authenticated path is proven again after this many seconds (and
    /// whenever a record or path changes).
    #[serde(default = "default_session_lifetime")]
    pub session_lifetime_secs: u64,
    /// How long an exchange with a peer may take before the flows waiting
    /// for it are refused.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_ms: u64,
}

impl Default for Security {
    fn default() -> Self {
        Self {
            session_lifetime_secs: default_session_lifetime(),
            handshake_timeout_ms: default_handshake_timeout(),
        }
    }
}

fn default_session_lifetime() -> u64 {
    3600
}
fn default_handshake_timeout() -> u64 {
    5000
}
fn default_key_file() -> PathBuf {
    crate::security::keys::DEFAULT_KEY_FILE.into()
}

fn public_key<'de, D: Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interposition {
    /// The interface that carries real traffic to the other members;
    /// "auto": the interface of the IPv4 default route, followed when it
    /// changes.
    #[serde(default = "default_uplink")]
    pub uplink: String,
    /// cgroup v2 folder whose processes (and descendants) use the virtual
    /// network. Default: the root of the cgroup v2 hierarchy.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Capacity of the masquerading map (flows x 2 directions).
    #[serde(default = "default_max_flows")]
    pub max_flows: u32,
    /// Where flows over direct paths (LAN, public, UPnP) are translated:
    /// per packet by tc (every path type), or at the socket (connect() goes
    /// to the member's real address; no packet is rewritten).
    #[serde(default)]
    pub translation: Translation,
    #[serde(default = "default_bpffs")]
    pub bpffs: PathBuf,
}

/// `interposition.translation`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Translation {
    /// tc rewrites every packet of every flow (sockets and `ss` show
    /// virtual addresses everywhere).
    Packet,
    /// Flows over direct paths are translated at the socket: connect4 sends
    /// them to the member's real address, getpeername/getsockname show
    /// virtual ones, tc tags and checks their SYNs only. Flows of client
    /// sockets bound to the virtual address, the first flow to a member
    /// beyond the LAN and flows over traversals or the relay stay per
    /// packet. Per packet, an established flow costs ~4x an
    /// empty tc program; at the socket, ~1.4x. The default.
    #[default]
    Socket,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flows {
    /// An idle flow's entries are removed after this many seconds.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// A TCP flow that saw FIN or RST is removed after this many idle seconds.
    #[serde(default = "default_closed")]
    pub closed_timeout_secs: u64,
    /// ICMP echo entries are removed after this many idle seconds.
    #[serde(default = "default_icmp")]
    pub icmp_timeout_secs: u64,
    #[serde(default = "default_gc_interval")]
    pub gc_interval_secs: u64,
}

impl Flows {
    pub fn timeouts(&self) -> crate::interposition::Timeouts {
        crate::interposition::Timeouts {
            idle: Duration::from_secs(self.idle_timeout_secs),
            closed: Duration::from_secs(self.closed_timeout_secs),
            icmp: Duration::from_secs(self.icmp_timeout_secs),
        }
    }
}

impl Default for Flows {
    fn default() -> Self {
        Self {
            idle_timeout_secs: default_idle(),
            closed_timeout_secs: default_closed(),
            icmp_timeout_secs: default_icmp(),
            gc_interval_secs: default_gc_interval(),
        }
    }
}

fn default_uplink() -> String {
    crate::virtualization::AUTO_UPLINK.into()
}
fn default_log() -> String {
    "info".into()
}
fn default_instance() -> String {
    "default".into()
}
fn default_run_dir() -> PathBuf {
    "/run/pvc".into()
}
fn default_state_dir() -> PathBuf {
    "/var/lib/pvc".into()
}
fn default_bpffs() -> PathBuf {
    "/sys/fs/bpf".into()
}
fn default_max_flows() -> u32 {
    65536
}
fn default_idle() -> u64 {
    // Like conntrack's established timeout: long-lived idle ssh sessions
    // must survive a night.
    5 * 24 * 3600
}
fn default_closed() -> u64 {
    // Longer than TIME_WAIT (60 s), so the last ACKs still cross.
    120
}
fn default_icmp() -> u64 {
    30
}
fn default_gc_interval() -> u64 {
    // Each pass reads the whole masquerading map with one syscall per entry.
    15
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the agent configuration {}", path.display()))?;
        let config: Config = toml::from_str(&text)
            .with_context(|| format!("invalid agent configuration {}", path.display()))?;
        config
            .validate()
            .with_context(|| format!("invalid agent configuration {}", path.display()))?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if !valid_name(&self.instance) {
            bail!(
                "instance {:?}: use a-z, 0-9 and '-' (it names files)",
                self.instance
            );
        }
        if !valid_name(&self.name) {
            bail!(
                "name {:?} is not a valid name: use a-z, 0-9 and '-', at most 63 characters",
                self.name
            );
        }
        if !valid_virtual_address(self.virtual_ip) {
            bail!(
                "virtual address {} is outside 240.0.0.0/4 or reserved (240.0.0.0 and \
                 255.255.255.255 are not assignable)",
                self.virtual_ip
            );
        }
        self.policy.parse()?;
        tracing_subscriber::EnvFilter::try_new(&self.log).map_err(|e| {
            anyhow::anyhow!(
                "log {:?} is not a log filter (e.g. \"info\", \"pvc_agent=debug\"): {e}",
                self.log
            )
        })?;
        if self.security.session_lifetime_secs < 10 {
            bail!("security.session_lifetime_secs must be at least 10");
        }
        if self.brokers.is_empty() {
            bail!(
                "brokers: name at least one broker, e.g. brokers = [\"broker.example.org:{DEFAULT_BROKER_PORT}\"]"
            );
        }
        if self.interposition.uplink.is_empty() {
            bail!("interposition.uplink: name the interface that carries traffic to other members");
        }
        if self.interposition.max_flows < 64 {
            bail!("interposition.max_flows must be at least 64");
        }
        if self.flows.gc_interval_secs == 0 {
            bail!("flows.gc_interval_secs must be at least 1");
        }
        if self.connectivity.upnp_lease_secs < 2 {
            bail!("connectivity.upnp_lease_secs must be at least 2 (renewed at half of it)");
        }
        let domain = self.dns.domain.trim_matches('.');
        if domain.is_empty()
            || domain.len() > 200
            || !domain
                .split('.')
                .all(|l| pvc_proto::dns::label(l).is_some())
        {
            bail!(
                "dns.domain {:?}: use DNS labels separated by dots, e.g. \"pvc\" or \"cluster.example.org\"",
                self.dns.domain
            );
        }
        if self.connectivity.port == 0 {
            bail!("connectivity.port: name a port (the brokers probe it, UPnP forwards it)");
        }
        Ok(())
    }

    /// Brokers with the default port filled in.
    pub fn broker_addresses(&self) -> Vec<String> {
        self.brokers
            .iter()
            .map(|b| {
                if b.rsplit_once(':')
                    .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                {
                    b.clone()
                } else {
                    format!("{b}:{DEFAULT_BROKER_PORT}")
                }
            })
            .collect()
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.interposition.bpffs.join("pvc").join(&self.instance)
    }

    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join(format!("{}.sock", self.instance))
    }

    /// The record of this instance's UPnP forward.
    pub fn upnp_record(&self) -> PathBuf {
        self.state_dir.join(format!("{}.upnp.json", self.instance))
    }

    pub fn gc_interval(&self) -> Duration {
        Duration::from_secs(self.flows.gc_interval_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
master_key = "OcyHo6wxs9UAk/Rdzkr/CW9qbbdikxmsaYgBcEGcMKs="
name = "alpha"
virtual_ip = "240.0.0.1"
brokers = ["198.18.0.254"]
[interposition]
uplink = "eth0"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c: Config = toml::from_str(MINIMAL).unwrap();
        c.validate().unwrap();
        assert_eq!(c.instance, "default");
        assert_eq!(c.broker_addresses(), vec!["198.18.0.254:7100".to_string()]);
        assert_eq!(c.pin_dir(), PathBuf::from("/sys/fs/bpf/pvc/default"));
        assert_eq!(c.control_socket(), PathBuf::from("/run/pvc/default.sock"));
        assert_eq!(c.interposition.max_flows, 65536);
        assert_eq!(c.interposition.translation, Translation::Socket);
    }

    #[test]
    fn translation_is_socket_or_packet() {
        let with = |t: &str| {
            let text = MINIMAL.replace(
                "[interposition]",
                &format!("[interposition]\ntranslation = \"{t}\""),
            );
            toml::from_str::<Config>(&text).map(|c| c.interposition.translation)
        };
        assert_eq!(with("packet").unwrap(), Translation::Packet);
        assert_eq!(with("socket").unwrap(), Translation::Socket);
        let err = with("sockets").unwrap_err().to_string();
        assert!(err.contains("socket") && err.contains("packet"), "{err}");
    }

    #[test]
    fn the_example_config_is_valid() {
        let text = include_str!("../../deploy/agent.toml");
        let c: Config = toml::from_str(text).unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn mistakes_are_named() {
        let bad = MINIMAL.replace("240.0.0.1", "10.0.0.1");
        let c: Config = toml::from_str(&bad).unwrap();
        let err = format!("{:#}", c.validate().unwrap_err());
        assert!(err.contains("10.0.0.1"), "{err}");

        let bad_key = MINIMAL.replace("OcyHo", "!!");
        let err = toml::from_str::<Config>(&bad_key).unwrap_err().to_string();
        assert!(err.contains("base64"), "{err}");

        let typo = MINIMAL.replace("uplink", "uplnk");
        let err = toml::from_str::<Config>(&typo).unwrap_err().to_string();
        assert!(err.contains("uplnk"), "{err}");

        let no_broker = MINIMAL.replace("[\"198.18.0.254\"]", "[]");
        let c: Config = toml::from_str(&no_broker).unwrap();
        assert!(format!("{:#}", c.validate().unwrap_err()).contains("broker"));
    }
}
