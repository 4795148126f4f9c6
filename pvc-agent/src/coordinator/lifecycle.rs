//! The agent's life: claim the instance, check the host, wait for a
//! broker's word on this host's membership, attach the data path, serve,
//! and undo everything on a clean stop.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use pvc_proto::{ErrorCode, MembershipRecord, SignedRecord, unix_now};
use rtnetlink::Handle;
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{
    agent::Agent,
    broker::{self, BrokerEvent, Identity as Registration, Outgoing},
    claim,
    core::{Core, Identity, Limits},
    metrics::{CoreMetrics, Metrics},
    status,
};
use crate::{
    config::Config,
    control::{self, Query, Request, Status},
    interposition::{self, Attachment, Datapath, inject::Injector},
    security::{keys::KeyPair, membership::Trust, policy::LocalPolicy},
    virtualization::{self, Uplink},
};

pub fn default_cgroup() -> PathBuf {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "/sys/fs/cgroup".into()
    } else {
        "/sys/fs/cgroup/unified".into()
    }
}

fn check_cgroup(path: &Path) -> anyhow::Result<()> {
    if !path.join("cgroup.procs").exists() || path.join("tasks").exists() {
        bail!(
            "{} is not a cgroup v2 folder; set interposition.cgroup to one (for example {})",
            path.display(),
            default_cgroup().display()
        );
    }
    Ok(())
}

/// What an agent learns about its host before it touches anything of it.
struct HostSetup {
    cgroup: PathBuf,
    key: Arc<KeyPair>,
    local_policy: LocalPolicy,
    handle: Handle,
    uplink: Uplink,
    real_ip: Ipv4Addr,
    advertised: Vec<Ipv4Addr>,
    injector: Injector,
}

impl HostSetup {
    /// Checks the configuration against the host; changes nothing but the
    /// host key (created on the first start) and bpffs (mounted if absent).
    async fn prepare(config: &Config) -> anyhow::Result<Self> {
        let cgroup = config
            .interposition
            .cgroup
            .clone()
            .unwrap_or_else(default_cgroup);
        check_cgroup(&cgroup)?;
        let key = Arc::new(KeyPair::load_or_create(&config.key_file)?);
        let local_policy = config.policy.parse()?;
        let handle = virtualization::connect()?;
        let uplink = virtualization::resolve_uplink(&handle, &config.interposition.uplink).await?;
        let real_ip = uplink
            .networks
            .first()
            .map(|n| n.address)
            .with_context(|| {
                format!(
                    "uplink {} has no IPv4 address: configure one first",
                    uplink.name
                )
            })?;
        let advertised = if config.advertise.is_empty() {
            uplink.networks.iter().map(|n| n.address).collect()
        } else {
            config.advertise.clone()
        };
        pvc_proto::validate_addresses(&advertised)
            .context("cannot register with these addresses")?;
        let injector = Injector::new().context("cannot open a raw socket (needs CAP_NET_RAW)")?;
        interposition::ensure_bpffs(&config.interposition.bpffs)?;
        Ok(Self {
            cgroup,
            key,
            local_policy,
            handle,
            uplink,
            real_ip,
            advertised,
            injector,
        })
    }
}

/// The agent's channels to its tasks: the broker sessions, the control
/// socket, and the signals that stop it.
pub(super) struct Tasks {
    pub broker_rx: mpsc::Receiver<BrokerEvent>,
    pub outgoing: mpsc::Sender<Outgoing>,
    brokers: JoinHandle<()>,
    leave: CancellationToken,
    pub query_rx: mpsc::Receiver<Query>,
    pub control: JoinHandle<anyhow::Result<()>>,
    /// A new broker list for the sessions (a reload).
    pub reconfigure_brokers: mpsc::Sender<Vec<String>>,
    metrics: Option<JoinHandle<()>>,
    scrape: Scrape,
    /// Held while the kernel counts program statistics for us.
    _program_stats: Option<std::os::fd::OwnedFd>,
    pub term: tokio::signal::unix::Signal,
    pub hangup: tokio::signal::unix::Signal,
}

/// What a scrape needs: the agent's status, on request, as metrics.
#[derive(Clone)]
struct Scrape {
    query: mpsc::Sender<Query>,
    metrics: Arc<Metrics>,
    brokers: Arc<std::sync::Mutex<Vec<String>>>,
    stats_held: bool,
}

impl Tasks {
    fn start(
        config: &Config,
        registration: Registration,
        core_metrics: &CoreMetrics,
    ) -> anyhow::Result<Self> {
        let (event_tx, broker_rx) = mpsc::channel(256);
        let (outgoing, outgoing_rx) = mpsc::channel(256);
        let (reconfigure_brokers, reconfigure_rx) = mpsc::channel(4);
        let leave = CancellationToken::new();
        let brokers = tokio::spawn(broker::run(
            config.broker_addresses(),
            registration,
            event_tx,
            outgoing_rx,
            reconfigure_rx,
            leave.clone(),
        ));
        let (query_tx, query_rx) = mpsc::channel::<Query>(16);
        let program_stats = if config.metrics.program_stats {
            let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).context(
                "metrics.program_stats: the kernel refused to count program statistics \
                 (BPF_ENABLE_STATS needs Linux >= 5.8 and CAP_SYS_ADMIN)",
            )?;
            info!("the kernel counts eBPF program runs and run time while the agent runs");
            Some(fd)
        } else {
            None
        };
        let scrape = Scrape {
            query: query_tx.clone(),
            metrics: Arc::new(Metrics::new(core_metrics)),
            brokers: Arc::new(std::sync::Mutex::new(config.broker_addresses())),
            stats_held: program_stats.is_some(),
        };
        let control = tokio::spawn(control::serve(config.control_socket(), query_tx));
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let mut tasks = Self {
            broker_rx,
            outgoing,
            brokers,
            leave,
            query_rx,
            control,
            reconfigure_brokers,
            metrics: None,
            scrape,
            _program_stats: program_stats,
            term,
            hangup,
        };
        tasks.serve_metrics(config.metrics.listen)?;
        Ok(tasks)
    }

    /// Tells the broker this member leaves (members may forget it at once,
    /// rather than wait for it), then ends the tasks.
    async fn stop(mut self) {
        self.leave.cancel();
        if tokio::time::timeout(Duration::from_secs(2), &mut self.brokers)
            .await
            .is_err()
        {
            self.brokers.abort();
        }
        self.control.abort();
        if let Some(m) = self.metrics {
            m.abort();
        }
    }

    /// Serves the metrics on `listen` (none: stops serving them), in place
    /// of the endpoint served so far.
    pub fn serve_metrics(&mut self, listen: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
        let listener = listen
            .map(|addr| pvc_proto::metrics::bind(addr, "metrics.listen").map(|l| (addr, l)))
            .transpose()?;
        if let Some(old) = self.metrics.take() {
            old.abort();
        }
        if let Some((addr, listener)) = listener {
            info!(%addr, "serving Prometheus metrics at /metrics");
            let render = scrape(self.scrape.clone());
            self.metrics = Some(tokio::spawn(pvc_proto::metrics::serve(listener, render)));
        }
        Ok(())
    }

    /// The brokers the metrics report sessions with.
    pub fn set_metrics_brokers(&self, brokers: Vec<String>) {
        *self.scrape.brokers.lock().unwrap() = brokers;
    }
}

/// One scrape: the agent's status at this moment, as metrics.
fn scrape(
    s: Scrape,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>
+ Clone
+ Send
+ Sync
+ 'static {
    move || {
        let s = s.clone();
        Box::pin(async move {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if s.query.send((Request::Status, tx)).await.is_err() {
                return "# the agent is stopping\n".into();
            }
            match rx.await {
                Ok(status) => {
                    let stats = s.stats_held
                        || std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
                            .is_ok_and(|v| v.trim() == "1");
                    let brokers = s.brokers.lock().unwrap().clone();
                    s.metrics.render(&status, &brokers, stats)
                }
                Err(_) => "# the agent is stopping\n".into(),
            }
        })
    }
}

/// What ended the wait for a broker's word on this host's membership.
enum Admission {
    /// A broker vouched for this host: its welcome, to be acted on.
    Admitted(Box<BrokerEvent>),
    /// SIGINT or SIGTERM.
    Stopped,
}

/// Runs the agent until SIGINT/SIGTERM, then removes everything it set up.
///
/// The instance is claimed before anything else. A fresh agent attaches its
/// data path only once a broker has handed over this host's record and it
/// checks against the master key: an agent that cannot join its cluster
/// (not admitted, another cluster's key) leaves the host as it was. An agent
/// that finds its predecessor's pins (a crash, an upgrade) takes them over at
/// once, so established flows never wait for a broker.
/// Why the agent stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// SIGINT or SIGTERM: everything undone.
    Stopped,
    /// The host moved to another uplink or address (`uplink = "auto"`):
    /// everything undone, to start over on the new one.
    NetworkMoved,
}

pub async fn run(config: Config, config_path: &Path) -> anyhow::Result<Ending> {
    let _claim = claim::Claim::take(&config)?;
    let host = HostSetup::prepare(&config).await?;
    // Before any broker session: a broker's probe must find them open.
    let probes = super::site::ProbeSockets::open(host.real_ip, config.connectivity.port)?;
    let trust = Trust::new(config.master_key);
    let registration = Registration {
        cluster: trust.cluster,
        key: Arc::clone(&host.key),
        addresses: host.advertised.clone(),
        software: format!("pvc-agent {}", env!("CARGO_PKG_VERSION")),
        port: Some(config.connectivity.port),
    };
    let core_metrics = CoreMetrics::default();
    let mut tasks = Tasks::start(&config, registration, &core_metrics)?;
    let welcome = if interposition::has_pins(&config.pin_dir()) {
        info!(pins = %config.pin_dir().display(), "taking over the data path a previous agent left");
        None
    } else {
        match wait_for_admission(&config, &host, &trust, &mut tasks).await {
            Ok(Admission::Admitted(welcome)) => Some(*welcome),
            Ok(Admission::Stopped) => {
                tasks.stop().await;
                let _ = std::fs::remove_file(config.control_socket());
                return Ok(Ending::Stopped);
            }
            Err(e) => {
                tasks.stop().await;
                let _ = std::fs::remove_file(config.control_socket());
                return Err(e);
            }
        }
    };

    let attachment = Attachment {
        pin_dir: config.pin_dir(),
        uplink: host.uplink.name.clone(),
        uplink_index: host.uplink.index,
        cgroup: host.cgroup.clone(),
        max_flows: config.interposition.max_flows,
        hint_lifetime: interposition::hint_lifetime(
            &config.flows.timeouts(),
            Duration::from_secs(config.flows.gc_interval_secs),
        ),
    };
    let mut datapath = match Datapath::start(&attachment) {
        Ok(d) => d,
        Err(e) => {
            let _ = interposition::remove_instance(&attachment.pin_dir);
            tasks.stop().await;
            let _ = std::fs::remove_file(config.control_socket());
            return Err(e);
        }
    };
    let relay_listener = match crate::connectivity::relay::listen()
        .and_then(|l| datapath.maps.set_relay_listener(&l).map(|()| l))
    {
        Ok(l) => l,
        Err(e) => {
            let _ = datapath.remove();
            tasks.stop().await;
            let _ = std::fs::remove_file(config.control_socket());
            return Err(e);
        }
    };
    let events = datapath.take_events().expect("events are taken once");
    let cgroup = host.cgroup.clone();
    let mut core = Core::new(
        Identity {
            name: config.name.clone(),
            virtual_ip: config.virtual_ip,
            key: host.key,
            real_ip: host.real_ip,
            advertised: host.advertised,
            networks: host.uplink.networks.clone(),
        },
        Limits::new(
            Duration::from_millis(config.security.handshake_timeout_ms),
            Duration::from_secs(config.security.session_lifetime_secs),
        ),
        trust,
        host.local_policy,
    );
    core.metrics = core_metrics;
    let config_port = config.connectivity.port;
    let local_addrs: Vec<Ipv4Addr> = host.uplink.networks.iter().map(|n| n.address).collect();
    let mut agent = Agent {
        config,
        core,
        handle: host.handle,
        uplink: host.uplink,
        datapath,
        outgoing: tasks.outgoing.clone(),
        injector: host.injector,
        vias: BTreeMap::new(),
        installed_policy: BTreeSet::new(),
        flows_opened: BTreeMap::new(),
        counters: BTreeMap::new(),
        refusals_logged: 0,
        refusals_unlogged: 0,
        broker_refusal: None,
        discovery: crate::connectivity::discovery::Discovery::new(config_port, local_addrs),
        probed_at: None,
        probed_via: None,
        upnp: None,
        relaying: super::relay::Relaying::new(relay_listener),
        config_path: config_path.to_path_buf(),
        ready_told: false,
        standing: pvc_common::STANDING_MEMBER,
        dns: None,
    };
    let mut ending = Ending::Stopped;
    let mut result = configure(&mut agent, welcome.is_none()).await;
    if result.is_ok() {
        let me = agent.core.identity();
        info!(
            name = me.name,
            virtual_ip = %me.virtual_ip,
            real_ip = %me.real_ip,
            uplink = agent.uplink.name,
            cluster = %agent.core.trust.cluster,
            host_key = %me.key.public,
            cgroup = %cgroup.display(),
            pins = %agent.datapath.pin_dir().display(),
            "agent ready"
        );
        if let Some(welcome) = welcome {
            result = agent.on_broker(welcome).await;
        }
    }
    if result.is_ok() {
        let (upnp_tx, upnp_rx) = mpsc::channel(1);
        super::site::start_upnp(
            agent.core.identity().real_ip,
            agent.config.connectivity.port,
            agent.config.instance.clone(),
            agent.config.upnp_record(),
            agent.config.connectivity.upnp,
            Duration::from_secs(agent.config.connectivity.upnp_lease_secs.into()),
            upnp_tx,
        );
        match agent.serve(events, &mut tasks, probes, upnp_rx).await {
            Ok(e) => ending = e,
            Err(e) => result = Err(e),
        }
    }
    tasks.stop().await;
    let teardown = agent.teardown().await;
    result.and(teardown).map(|()| ending)
}

/// Takes over what a previous agent of this instance left (its paths,
/// member routes and policy: established flows keep using them, and the
/// policy holds, until the broker says who is still a member), installs the
/// policy on a fresh data path, and puts the virtual address and routes on
/// the host.
async fn configure(agent: &mut Agent, takeover: bool) -> anyhow::Result<()> {
    let paths = agent.datapath.maps.peers();
    let routes = virtualization::peer_routes(&agent.handle).await?;
    if !paths.is_empty() {
        info!(
            paths = paths.len(),
            "kept the paths of the previous agent until the broker confirms them"
        );
    }
    agent.core.inherit(paths, routes, Instant::now());
    agent.installed_policy = agent.datapath.maps.policy_entries();
    if !takeover || !agent.datapath.maps.settings_ready() {
        // Without the members' records (names, groups) the policy compiles
        // to nothing but its restrictions: a previous agent's policy, which
        // knew them, stays until the broker's list arrives.
        let policy = agent.core.policy();
        agent.apply(policy).await;
    }
    virtualization::configure(&agent.handle, &agent.uplink, agent.config.virtual_ip).await?;
    // On the virtual address, which exists from here on.
    if agent.config.dns.enable {
        agent.dns = Some(
            virtualization::dns::Dns::start(
                &agent.config.dns,
                agent.config.virtual_ip,
                &agent.config.instance,
                &agent.handle,
            )
            .await?,
        );
        agent.sync_dns();
    }
    Ok(())
}

/// Waits until a broker hands over this host's record and it checks, while
/// answering `pvc status` and signals. Fails when the record names another
/// host or address than the configuration, and when every broker serves
/// other clusters only (the master key is another cluster's).
async fn wait_for_admission(
    config: &Config,
    host: &HostSetup,
    trust: &Trust,
    tasks: &mut Tasks,
) -> anyhow::Result<Admission> {
    info!(
        name = config.name,
        cluster = %trust.cluster,
        host_key = %host.key.public,
        "waiting for a broker to confirm this host's membership before attaching the data path"
    );
    let brokers: BTreeSet<String> = config.broker_addresses().into_iter().collect();
    let mut foreign = BTreeMap::new();
    let mut last_refusal = None;
    super::service::notify(&[sd_notify::NotifyState::Status(
        "waiting for a broker to confirm this host's membership (nothing attached yet)",
    )]);
    let watchdog_period = super::service::watchdog_period();
    let mut watchdog = tokio::time::interval(watchdog_period.unwrap_or(Duration::from_secs(3600)));
    loop {
        tokio::select! {
            _ = watchdog.tick(), if watchdog_period.is_some() => {
                super::service::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            _ = tasks.hangup.recv() => {
                warn!("SIGHUP while waiting for admission: ignored (nothing runs yet); send it again once the agent runs");
            }
            Some(event) = tasks.broker_rx.recv() => match event {
                BrokerEvent::Connected { ref you, .. } => {
                    if verify_own_record(trust, &host.key, config, you)?.is_some() {
                        return Ok(Admission::Admitted(Box::new(event)));
                    }
                }
                BrokerEvent::Disconnected { broker, reason, refusal } => {
                    if refusal.is_some() {
                        last_refusal = Some(reason.clone());
                    }
                    if refusal == Some(ErrorCode::ForeignCluster) {
                        foreign.insert(broker, reason);
                    } else {
                        foreign.remove(&broker);
                    }
                    if foreign.len() == brokers.len() {
                        let said: Vec<String> = foreign
                            .iter()
                            .map(|(b, r)| format!("{b}: {r}"))
                            .collect();
                        bail!(
                            "wrong cluster: no broker serves cluster {} (the cluster of master_key \
                             in this agent's configuration), and every broker serves other clusters. \
                             master_key is probably another cluster's key: compare it with \
                             `pvc master show` on the cluster's master; if it is right, the master \
                             has not published to these brokers yet (`pvc master publish`). \
                             Nothing was attached. The brokers said: {}",
                            trust.cluster,
                            said.join("; ")
                        );
                    }
                }
                BrokerEvent::Message { .. } => {}
            },
            Some((request, reply)) = tasks.query_rx.recv() => {
                let Request::Status = request;
                let mut status = waiting_status(config, host, trust);
                status.broker_refusal = last_refusal.clone();
                let _ = reply.send(status);
            }
            r = &mut tasks.control => return Err(match r {
                Ok(Err(e)) => e,
                _ => anyhow::anyhow!("control socket stopped"),
            }),
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: stopping"); return Ok(Admission::Stopped) }
            _ = tasks.term.recv() => { info!("SIGTERM: stopping"); return Ok(Admission::Stopped) }
        }
    }
}

/// The broker hands this host its own record: it must be the master's,
/// for this host key, with the name and address configured here. `None`
/// when this broker's word cannot be believed (logged); an error when the
/// master admitted this host under another name or address.
pub(super) fn verify_own_record(
    trust: &Trust,
    key: &KeyPair,
    config: &Config,
    you: &SignedRecord,
) -> anyhow::Result<Option<MembershipRecord>> {
    let r = match trust.record(you, unix_now()) {
        Ok(r) => r,
        Err(e) => {
            error!(
                "the broker gave this host a record that does not check ({e}); ignoring this broker's word for it"
            );
            return Ok(None);
        }
    };
    if r.host_key != key.public {
        error!(
            "the broker gave this host another host's record ({}); ignoring it",
            r.name
        );
        return Ok(None);
    }
    if r.name != config.name || r.virtual_ip != config.virtual_ip {
        bail!(
            "the master admitted this host as {} ({}), but the configuration says {} ({}): fix name and virtual_ip",
            r.name,
            r.virtual_ip,
            config.name,
            config.virtual_ip
        );
    }
    Ok(Some(r))
}

fn waiting_status(config: &Config, host: &HostSetup, trust: &Trust) -> Status {
    status::base(
        control::STATE_WAITING,
        config,
        &host.key.public,
        trust,
        &host.uplink.name,
        host.real_ip,
        &host.advertised,
    )
}

/// Removes what an instance set up, without running it (after a crash, or
/// to clean a host by hand). Refuses while an agent runs the instance.
pub async fn cleanup(config: &Config) -> anyhow::Result<()> {
    let _claim = claim::Claim::take(config)?;
    let handle = virtualization::connect()?;
    let uplink = virtualization::resolve_uplink(&handle, &config.interposition.uplink)
        .await
        .ok();
    virtualization::dns::cleanup(&config.dns, &config.instance, &handle).await;
    virtualization::deconfigure(&handle, uplink.map(|u| u.index), config.virtual_ip).await?;
    interposition::remove_instance(&config.pin_dir())?;
    let _ = std::fs::remove_file(config.control_socket());
    Ok(())
}
