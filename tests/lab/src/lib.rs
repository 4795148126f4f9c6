//! The test lab: hosts in network namespaces on a simulated LAN, a broker,
//! one real `pvc-agent` per host, and helpers to run unmodified programs
//! inside a host (its network namespace and its cgroup).
//!
//! Safety on a shared machine: nothing touches the root network namespace or
//! the root cgroup; "real" addresses are in 198.18.0.0/15 and virtual ones in
//! 240.0.0.0/4, only inside the lab's namespaces. Dropping a `Lab` (also when
//! a test panics) stops the agents, kills every process it started, and
//! removes its namespaces, cgroups and pins.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};

pub mod cpu;
pub mod grid;
mod internet;
pub mod prometheus;
pub use internet::Site;
use serde_json::Value;

pub const BROKER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const BROKER_PORT: u16 = 7100;
/// Where the lab's agents and brokers serve their metrics (on their own
/// addresses, for a Prometheus in another namespace to scrape).
pub const AGENT_METRICS_PORT: u16 = 9597;
pub const BROKER_METRICS_PORT: u16 = 9598;

static LABS: AtomicU32 = AtomicU32::new(0);

const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Labs alive in this process, and whether the first of them mounted bpffs.
static BPFFS_USERS: Mutex<(usize, bool)> = Mutex::new((0, false));

/// A lab's use of bpffs at /sys/fs/bpf. An agent mounts it when the host has
/// none and leaves it mounted (as a host wants); a lab must leave the host
/// as it found it, so the first lab mounts it and the last one unmounts it.
struct BpffsUse;

impl BpffsUse {
    fn take() -> anyhow::Result<BpffsUse> {
        let mut users = BPFFS_USERS.lock().unwrap_or_else(|e| e.into_inner());
        if users.0 == 0 && !is_bpffs() {
            let path = std::ffi::CString::new(BPFFS)?;
            // SAFETY: valid C strings; no mount data.
            let rc = unsafe {
                libc::mount(
                    c"bpf".as_ptr(),
                    path.as_ptr(),
                    c"bpf".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            ensure!(
                rc == 0,
                "cannot mount bpffs at {BPFFS}: {}",
                std::io::Error::last_os_error()
            );
            users.1 = true;
        }
        users.0 += 1;
        Ok(BpffsUse)
    }
}

impl Drop for BpffsUse {
    fn drop(&mut self) {
        let mut users = BPFFS_USERS.lock().unwrap_or_else(|e| e.into_inner());
        users.0 -= 1;
        if users.0 == 0 && users.1 {
            if let Ok(path) = std::ffi::CString::new(BPFFS) {
                // SAFETY: a valid C string. Detached: a straggling reader
                // must not keep the mount.
                unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
            }
            users.1 = false;
        }
    }
}

fn is_bpffs() -> bool {
    let path = std::ffi::CString::new(BPFFS).expect("no NUL");
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a properly sized buffer.
    unsafe { libc::statfs(path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Where the workspace's binaries are: `PVC_BIN_DIR`, else the target folder
/// of the running executable (target/<profile>/).
/// Where a host's UTS namespace (its hostname) is kept, beside its netns.
fn uts_file(netns: &str) -> PathBuf {
    Path::new("/run/pvc-lab").join(format!("{netns}.uts"))
}

/// A UTS namespace for the host in `netns`, named `hostname`, kept by a
/// bind mount until the lab goes.
fn make_uts(netns: &str, hostname: &str) -> anyhow::Result<()> {
    let file = uts_file(netns);
    fs::create_dir_all(file.parent().expect("a folder"))?;
    File::create(&file)?;
    sh(&[
        "unshare",
        &format!("--uts={}", file.display()),
        "hostname",
        hostname,
    ])?;
    Ok(())
}

pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("PVC_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // Test executables live in target/<profile>/deps, xtask in target/<profile>.
            let exe = std::env::current_exe().expect("current_exe");
            let dir = exe.parent().expect("executable folder");
            if dir.ends_with("deps") {
                dir.parent().expect("target/<profile>").to_path_buf()
            } else {
                dir.to_path_buf()
            }
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build`, or run `cargo xtask test`)",
        path.display()
    );
    path
}

/// The cgroup v2 hierarchy of this machine.
pub fn cgroup2_root() -> PathBuf {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "/sys/fs/cgroup".into()
    } else {
        "/sys/fs/cgroup/unified".into()
    }
}

/// Fails with a clear message when a tool the lab needs is missing.
pub fn require_tools(tools: &[&str]) {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the lab needs root (namespaces, eBPF)"
    );
    for t in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).exists()))
            .unwrap_or(false);
        assert!(found, "{t} is not installed: run ./setup.sh");
    }
}

fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A broker of the lab: where it runs and listens.
struct BrokerNode {
    netns: String,
    addr: Ipv4Addr,
    child: Option<Child>,
}

/// A host of the lab.
pub struct Host {
    pub name: String,
    /// Network namespace name (under /run/netns).
    pub netns: String,
    pub cgroup: PathBuf,
    pub real: Ipv4Addr,
    pub virtual_ip: Ipv4Addr,
    pub instance: String,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub key_file: PathBuf,
    /// The host key's public half (what the master admits).
    pub public_key: String,
    /// The site of the simulated Internet it sits in (`Lab::internet`).
    pub site: Option<usize>,
    /// More environment for its agent (as systemd would give it).
    pub agent_env: Vec<(String, String)>,
    agent: Option<Child>,
}

pub struct Lab {
    pub prefix: String,
    pub dir: PathBuf,
    pub hosts: Vec<Host>,
    /// The cluster master's folder (key and registry) and public key.
    pub master_dir: PathBuf,
    pub master_key: String,
    cgroup_dir: PathBuf,
    lan_ns: String,
    brokers: Vec<BrokerNode>,
    /// The simulated Internet, for labs built by `Lab::internet`.
    internet: Option<internet::Internet>,
    children: Vec<Child>,
    namespaces: Vec<String>,
    /// Dropped after `Lab::drop` has stopped the agents and removed pins.
    _bpffs: BpffsUse,
}

impl Lab {
    /// `n` hosts (a, b, c, ...) on one LAN, 198.18.0.<i+1>/24, virtual
    /// 240.0.0.<i+1>, and a broker namespace at 198.18.0.254. Nothing runs yet.
    pub fn lan(n: usize) -> anyhow::Result<Lab> {
        require_tools(&["ip", "nsenter"]);
        let mut lab = Lab::empty()?;
        // From here on, Drop cleans up whatever was made.
        lab.build(n)?;
        Ok(lab)
    }

    /// A lab with nothing in it yet but its folder and the master.
    fn empty() -> anyhow::Result<Lab> {
        let id = LABS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("pvct{}x{id}", std::process::id());
        let bpffs = BpffsUse::take()?;
        let dir = std::env::temp_dir().join(&prefix);
        fs::create_dir_all(&dir)?;
        let cgroup_dir = cgroup2_root().join(&prefix);
        let mut lab = Lab {
            lan_ns: format!("{prefix}-lan"),
            prefix,
            master_dir: dir.join("master"),
            master_key: String::new(),
            dir,
            hosts: Vec::new(),
            cgroup_dir,
            brokers: Vec::new(),
            internet: None,
            children: Vec::new(),
            namespaces: Vec::new(),
            _bpffs: bpffs,
        };
        fs::create_dir_all(&lab.cgroup_dir)?;
        lab.init_master()?;
        Ok(lab)
    }

    /// The cluster: its master key pair and registry, as an administrator makes them.
    fn init_master(&mut self) -> anyhow::Result<()> {
        let init = Command::new(bin("pvc"))
            .args(["master", "init", "--dir"])
            .arg(&self.master_dir)
            .output()?;
        ensure!(
            init.status.success(),
            "pvc master init: {}",
            String::from_utf8_lossy(&init.stderr)
        );
        self.master_key = String::from_utf8_lossy(&init.stdout)
            .lines()
            .find_map(|l| {
                l.strip_prefix("master_key = \"")?
                    .strip_suffix('"')
                    .map(str::to_string)
            })
            .ok_or_else(|| anyhow!("pvc master init printed no master_key"))?;
        Ok(())
    }

    fn add_ns(&mut self, name: &str) -> anyhow::Result<()> {
        sh(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_string());
        sh(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A veth from the LAN bridge to `ns` (as eth0) with `addr`/24.
    fn plug(&self, ns: &str, port: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
        self.plug_into("br0", ns, port, "eth0", addr)
    }

    /// A veth from `bridge` (in the LAN namespace) to `ns`, named `dev`
    /// there, with `addr`/24.
    fn plug_into(
        &self,
        bridge: &str,
        ns: &str,
        port: &str,
        dev: &str,
        addr: Ipv4Addr,
    ) -> anyhow::Result<()> {
        let lan = self.lan_ns.as_str();
        sh(&[
            "ip", "link", "add", port, "netns", lan, "type", "veth", "peer", "name", dev, "netns",
            ns,
        ])?;
        sh(&["ip", "-n", lan, "link", "set", port, "master", bridge, "up"])?;
        let cidr = format!("{addr}/24");
        sh(&["ip", "-n", ns, "addr", "add", &cidr, "dev", dev])?;
        sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        Ok(())
    }

    fn build(&mut self, n: usize) -> anyhow::Result<()> {
        let lan = self.lan_ns.clone();
        self.add_ns(&lan)?;
        sh(&["ip", "-n", &lan, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &lan, "link", "set", "br0", "up"])?;
        let broker = format!("{}-broker", self.prefix);
        self.add_ns(&broker)?;
        self.plug(&broker, "p-broker", BROKER_IP)?;
        self.brokers.push(BrokerNode {
            netns: broker,
            addr: BROKER_IP,
            child: None,
        });
        for _ in 0..n {
            self.add_host()?;
        }
        Ok(())
    }

    /// Adds a host to the LAN (the next letter): its namespace, cgroup,
    /// key pair and configuration. It is not admitted and runs nothing yet.
    pub fn add_host(&mut self) -> anyhow::Result<String> {
        let i = self.hosts.len();
        let name = Self::host_name(i);
        let netns = format!("{}-{name}", self.prefix);
        self.add_ns(&netns)?;
        let real = Ipv4Addr::new(198, 18, 0, i as u8 + 1);
        self.plug(&netns, &format!("p-{name}"), real)?;
        self.register_host(name, netns, real, None)
    }

    fn host_name(i: usize) -> String {
        assert!(i < 26);
        ((b'a' + i as u8) as char).to_string()
    }

    /// The rest of a host once its namespace is plugged in: cgroup, key
    /// pair, configuration.
    fn register_host(
        &mut self,
        name: String,
        netns: String,
        real: Ipv4Addr,
        site: Option<usize>,
    ) -> anyhow::Result<String> {
        let i = self.hosts.len();
        // Its own hostname, as a separate machine has (Slurm reads it).
        make_uts(&netns, &format!("host-{name}"))?;
        let cgroup = self.cgroup_dir.join(&name);
        fs::create_dir_all(&cgroup)?;
        let instance = format!("{}-{name}", self.prefix);
        let key_file = self.dir.join(format!("{name}.key"));
        let keygen = Command::new(bin("pvc"))
            .args(["keygen", "--key"])
            .arg(&key_file)
            .output()?;
        ensure!(
            keygen.status.success(),
            "pvc keygen: {}",
            String::from_utf8_lossy(&keygen.stderr)
        );
        let public_key = String::from_utf8_lossy(&keygen.stdout).trim().to_string();
        let host = Host {
            virtual_ip: Ipv4Addr::new(240, 0, 0, i as u8 + 1),
            config: self.dir.join(format!("{name}.toml")),
            socket: self.dir.join(format!("{instance}.sock")),
            name,
            netns,
            cgroup,
            real,
            instance,
            key_file,
            public_key,
            site,
            agent_env: Vec::new(),
            agent: None,
        };
        self.hosts.push(host);
        let i = self.hosts.len() - 1;
        self.write_config(i, "")?;
        Ok(self.hosts[i].name.clone())
    }

    /// Every host's agent masquerades all its flows per packet
    /// (`interposition.translation = "packet"`): for tests of that path.
    pub fn translate_per_packet(&self) -> anyhow::Result<()> {
        (0..self.hosts.len()).try_for_each(|i| self.write_config(i, PER_PACKET))
    }

    /// Writes host `i`'s agent configuration, with `extra` TOML appended.
    pub fn write_config(&self, i: usize, extra: &str) -> anyhow::Result<()> {
        let h = &self.hosts[i];
        let text = format!(
            r#"instance = "{instance}"
master_key = "{master_key}"
key_file = "{key_file}"
name = "host-{name}"
virtual_ip = "{vip}"
brokers = [{brokers}]
run_dir = "{dir}"
state_dir = "{dir}"
[interposition]
uplink = "eth0"
cgroup = "{cgroup}"
max_flows = 4096
{translation}{extra}
{metrics}{dns}"#,
            instance = h.instance,
            master_key = self.master_key,
            key_file = h.key_file.display(),
            name = h.name,
            vip = h.virtual_ip,
            dir = self.dir.display(),
            cgroup = h.cgroup.display(),
            brokers = self.broker_list(),
            // PVC_LAB_TRANSLATION runs a lab with another translation
            // (`socket`), unless the test chose one.
            translation = match std::env::var("PVC_LAB_TRANSLATION") {
                Ok(t) if !extra.contains("translation") => format!("translation = \"{t}\"\n"),
                _ => String::new(),
            },
            // On the host's own address (unless the test says otherwise),
            // for a Prometheus in another namespace.
            // The host's own hosts file: never the machine's /etc/hosts.
            dns = if extra.contains("[dns]") {
                String::new()
            } else {
                format!(
                    "[dns]\nresolver = \"hosts\"\nhosts_file = \"{}\"\n",
                    self.hosts_file(&h.name).display()
                )
            },
            metrics = if extra.contains("[metrics]") {
                String::new()
            } else {
                format!("[metrics]\nlisten = \"{}:{AGENT_METRICS_PORT}\"\n", h.real)
            },
        );
        fs::write(&h.config, text)?;
        Ok(())
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    fn index(&self, name: &str) -> usize {
        self.hosts
            .iter()
            .position(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// A command that will run inside a network namespace (and a cgroup).
    pub fn command_in(
        netns: &str,
        cgroup: Option<&Path>,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<Prepared> {
        let ns =
            File::open(format!("/run/netns/{netns}")).with_context(|| format!("netns {netns}"))?;
        // A host's hostname (`make_uts`), for namespaces that have one.
        let uts = File::open(uts_file(netns)).ok();
        let procs = match cgroup {
            Some(c) => Some(
                OpenOptions::new()
                    .write(true)
                    .open(c.join("cgroup.procs"))?,
            ),
            None => None,
        };
        let mut cmd = Command::new(program);
        let ns_fd = ns.as_raw_fd();
        let uts_fd = uts.as_ref().map(|f| f.as_raw_fd());
        let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: only async-signal-safe syscalls between fork and exec; the
        // fds stay open until spawn returns (Prepared owns them).
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = procs_fd
                    && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = uts_fd
                    && libc::setns(fd, libc::CLONE_NEWUTS) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(Prepared {
            cmd,
            _ns: ns,
            _uts: uts,
            _procs: procs,
        })
    }

    /// A command for an application on host `name` (its netns and cgroup).
    pub fn app(&self, name: &str, program: &str) -> Prepared {
        let h = self.host(name);
        Self::command_in(&h.netns, Some(&h.cgroup), program).expect("prepare command")
    }

    /// Runs a command on a host's LAN-side namespace, outside any PVC cgroup.
    pub fn ns(&self, netns: &str, program: &str) -> Prepared {
        Self::command_in(netns, None, program).expect("prepare command")
    }

    pub fn lan_netns(&self) -> &str {
        &self.lan_ns
    }

    /// Starts a long-running program on a host; it is killed with the lab.
    pub fn spawn(&mut self, name: &str, program: &str, args: &[&str]) -> anyhow::Result<Spawned> {
        let p = self.app(name, program);
        self.spawn_prepared(p, name, program, args)
    }

    /// Like `spawn`, but outside the host's cgroup: PVC does not see its sockets.
    pub fn spawn_outside(
        &mut self,
        name: &str,
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<Spawned> {
        let p = self.ns(&self.host(name).netns, program);
        self.spawn_prepared(p, name, program, args)
    }

    fn spawn_prepared(
        &mut self,
        mut p: Prepared,
        name: &str,
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<Spawned> {
        p.cmd.args(args).stdin(Stdio::null());
        let log = self.dir.join(format!(
            "{name}-{}-{}.log",
            program.rsplit('/').next().unwrap_or(program),
            self.children.len()
        ));
        let child = p.spawn_logged(&log)?;
        let pid = child.id();
        self.children.push(child);
        Ok(Spawned { pid, log })
    }

    /// A long-running program in the (first) broker's namespace, which
    /// reaches every host of the lab; killed with the lab.
    pub fn spawn_beside_broker(&mut self, program: &str, args: &[&str]) -> anyhow::Result<Spawned> {
        let p = self.in_broker_netns(program);
        self.spawn_prepared(p, "broker-ns", program, args)
    }

    /// Waits for a spawned program to exit; returns its output.
    pub fn wait(&mut self, s: &Spawned, limit: Duration) -> anyhow::Result<String> {
        let child = self
            .children
            .iter_mut()
            .find(|c| c.id() == s.pid)
            .ok_or_else(|| anyhow!("no such program"))?;
        wait_until(limit, "program to exit", || child.try_wait().ok().flatten())?;
        Ok(fs::read_to_string(&s.log)?)
    }

    /// Starts every broker of the lab that is not running.
    pub fn start_broker(&mut self) -> anyhow::Result<()> {
        for i in 0..self.brokers.len() {
            if self.brokers[i].child.is_none() {
                self.start_broker_at(i)?;
            }
        }
        Ok(())
    }

    /// Starts broker `i` on the standard port, with its own state file.
    pub fn start_broker_at(&mut self, i: usize) -> anyhow::Result<()> {
        self.start_broker_on(i, BROKER_PORT)
    }

    fn broker_file(i: usize, ext: &str) -> String {
        if i == 0 {
            format!("broker.{ext}")
        } else {
            format!("broker{i}.{ext}")
        }
    }

    fn start_broker_on(&mut self, i: usize, port: u16) -> anyhow::Result<()> {
        let b = &self.brokers[i];
        let mut p = Self::command_in(&b.netns, None, bin("pvc-broker"))?;
        // Its state file keeps what the master published across a restart.
        p.cmd
            .args(["--listen", &format!("{}:{port}", b.addr), "--state"])
            .arg(self.dir.join(Self::broker_file(i, "redb")))
            .args([
                "--metrics-listen",
                &format!("{}:{BROKER_METRICS_PORT}", b.addr),
            ]);
        let child = p.spawn_logged(&self.dir.join(Self::broker_file(i, "log")))?;
        self.brokers[i].child = Some(child);
        self.wait_port(&self.brokers[i].netns.clone(), port)
    }

    /// The brokers as the agents' configuration lists them.
    fn broker_list(&self) -> String {
        self.brokers
            .iter()
            .map(|b| format!("\"{}:{BROKER_PORT}\"", b.addr))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Broker `i`'s address and port.
    pub fn broker_addr(&self, i: usize) -> String {
        format!("{}:{BROKER_PORT}", self.brokers[i].addr)
    }

    /// Waits until something listens on TCP `port` in namespace `ns`.
    fn wait_port(&self, ns: &str, port: u16) -> anyhow::Result<()> {
        let suffix = format!(":{port}");
        wait_until(
            Duration::from_secs(10),
            &format!("{ns} listening on {port}"),
            || {
                let out = Self::command_in(ns, None, "ss")
                    .ok()?
                    .cmd
                    .args(["-Hltn"])
                    .output()
                    .ok()?;
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .any(|l| {
                        l.split_whitespace()
                            .nth(3)
                            .is_some_and(|a| a.ends_with(&suffix))
                    })
                    .then_some(())
            },
        )
    }

    /// A malicious broker (the `evil-broker` test double) where agents and
    /// the master expect the broker, in front of a real one.
    pub fn start_evil_broker(&mut self, mode: &[&str]) -> anyhow::Result<()> {
        self.start_evil_broker_at(0, mode)
    }

    /// The same, where the agents expect broker `i`.
    pub fn start_evil_broker_at(&mut self, i: usize, mode: &[&str]) -> anyhow::Result<()> {
        const UPSTREAM: u16 = BROKER_PORT + 1;
        self.start_broker_on(i, UPSTREAM)?;
        let ip = self.brokers[i].addr;
        let mut p = Self::command_in(&self.brokers[i].netns, None, bin("evil-broker"))?;
        p.cmd
            .args(["--listen", &format!("{ip}:{BROKER_PORT}")])
            .args(["--upstream", &format!("{ip}:{UPSTREAM}")])
            .args(mode);
        let child = p.spawn_logged(&self.dir.join("evil-broker.log"))?;
        self.children.push(child);
        self.wait_port(&self.brokers[i].netns.clone(), BROKER_PORT)
    }

    /// Another broker in the broker's namespace, on `port`, with its own
    /// state; killed with the lab. Returns its process id.
    pub fn start_extra_broker(&mut self, port: u16) -> anyhow::Result<u32> {
        let mut p = Self::command_in(&self.brokers[0].netns, None, bin("pvc-broker"))?;
        p.cmd
            .args(["--listen", &format!("{BROKER_IP}:{port}"), "--state"])
            .arg(self.dir.join(format!("broker-{port}.redb")))
            .args(["--metrics-listen", ""]);
        let child = p.spawn_logged(&self.dir.join(format!("broker-{port}.log")))?;
        let pid = child.id();
        self.children.push(child);
        self.wait_port(&self.brokers[0].netns.clone(), port)?;
        Ok(pid)
    }

    /// A command in the broker's namespace (where the lab's brokers run).
    pub fn in_broker_netns(&self, program: impl AsRef<std::ffi::OsStr>) -> Prepared {
        Self::command_in(&self.brokers[0].netns, None, program).expect("prepare command")
    }

    pub fn broker_pid(&self) -> Option<u32> {
        self.brokers[0].child.as_ref().map(Child::id)
    }

    /// A second LAN beside the first, with no PVC on it: each host gets
    /// `eth1` at 198.19.0.<i+1>/24 on bridge `br1`. The same hosts, the
    /// same kind of link, for measuring the bare network against PVC.
    pub fn add_bare_lan(&mut self) -> anyhow::Result<()> {
        let lan = self.lan_ns.clone();
        sh(&["ip", "-n", &lan, "link", "add", "br1", "type", "bridge"])?;
        sh(&["ip", "-n", &lan, "link", "set", "br1", "up"])?;
        for i in 0..self.hosts.len() {
            let h = &self.hosts[i];
            let port = format!("q-{}", h.name);
            self.plug_into("br1", &h.netns, &port, "eth1", Self::bare_ip_of(i))?;
        }
        Ok(())
    }

    /// Another link of host `name` to the LAN (as a laptop's second
    /// interface), with `addr`/24, up.
    pub fn add_lan_link(&mut self, name: &str, dev: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
        let h = self.host(name);
        let port = format!("{}-{dev}", h.name);
        self.plug_into("br0", &h.netns.clone(), &port, dev, addr)
    }

    fn bare_ip_of(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, 0, i as u8 + 1)
    }

    /// Host `name`'s address on the bare LAN (`add_bare_lan`).
    pub fn bare_ip(&self, name: &str) -> Ipv4Addr {
        Self::bare_ip_of(self.index(name))
    }

    pub fn evil_broker_log(&self) -> String {
        fs::read_to_string(self.dir.join("evil-broker.log")).unwrap_or_default()
    }

    /// Kills every broker (SIGKILL).
    pub fn kill_broker(&mut self) {
        for i in 0..self.brokers.len() {
            self.kill_broker_at(i);
        }
    }

    /// Kills broker `i` (SIGKILL): its sessions' sockets close.
    pub fn kill_broker_at(&mut self, i: usize) {
        if let Some(mut b) = self.brokers[i].child.take() {
            let _ = b.kill();
            let _ = b.wait();
        }
    }

    pub fn start_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let i = self.index(name);
        let log = self.dir.join(format!("agent-{name}.log"));
        let h = &self.hosts[i];
        ensure!(h.agent.is_none(), "agent {name} already running");
        let mut p = Self::command_in(&h.netns, Some(&h.cgroup), bin("pvc-agent"))?;
        p.cmd
            .args(["--config"])
            .arg(&h.config)
            .env("PVC_LOG", "info,pvc_agent=debug")
            .envs(h.agent_env.iter().map(|(k, v)| (k, v)));
        let child = p.spawn_logged(&log)?;
        self.hosts[i].agent = Some(child);
        let socket = self.hosts[i].socket.clone();
        wait_until(
            Duration::from_secs(20),
            &format!("agent {name} answering"),
            || {
                if let Some(a) = self.hosts[i].agent.as_mut()
                    && let Ok(Some(status)) = a.try_wait()
                {
                    panic!(
                        "agent {name} exited ({status}):\n{}",
                        fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                status_of(&socket).ok()
            },
        )?;
        Ok(())
    }

    /// The hosts file host `name`'s agent keeps member names in.
    pub fn hosts_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("hosts-{name}"))
    }

    /// Runs `pvc master <args>` as the administrator, publishing to the
    /// lab's broker (from the broker's namespace). Returns its output.
    pub fn master(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut p = Self::command_in(&self.brokers[0].netns, None, bin("pvc"))?;
        p.cmd
            .arg("master")
            .args(args)
            .arg("--dir")
            .arg(&self.master_dir);
        if matches!(
            args.first(),
            Some(&("admit" | "revoke" | "policy" | "publish"))
        ) {
            for b in &self.brokers {
                p.cmd
                    .args(["--broker", &format!("{}:{BROKER_PORT}", b.addr)]);
            }
        }
        p.ok()
    }

    /// Admits host `name` with its own key, as `host-<name>` at its virtual address.
    pub fn admit(&self, name: &str, extra: &[&str]) -> anyhow::Result<String> {
        let h = self.host(name);
        let (member, vip) = (format!("host-{}", h.name), h.virtual_ip.to_string());
        let mut args = vec![
            "admit",
            "--name",
            &member,
            "--virtual-ip",
            &vip,
            "--host-key",
            &h.public_key,
        ];
        args.extend_from_slice(extra);
        self.master(&args)
    }

    /// The broker, every host admitted, every agent started; waits until
    /// each knows every other member.
    pub fn start_all(&mut self) -> anyhow::Result<()> {
        self.start_broker()?;
        self.admit_and_start_all()
    }

    /// Every host admitted, every agent started (the broker is up); waits
    /// until each knows every other member.
    pub fn admit_and_start_all(&mut self) -> anyhow::Result<()> {
        self.admit_all()?;
        self.start_agents()?;
        let names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
        for n in &names {
            self.wait_for_peers(n, names.len() - 1)?;
        }
        Ok(())
    }

    pub fn admit_all(&mut self) -> anyhow::Result<()> {
        let names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
        for n in &names {
            self.admit(n, &[])?;
        }
        Ok(())
    }

    pub fn start_agents(&mut self) -> anyhow::Result<()> {
        let names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
        for n in &names {
            self.start_agent(n)?;
        }
        Ok(())
    }

    /// Waits until host `name` knows exactly `n` verified members.
    pub fn wait_for_peers(&self, name: &str, n: usize) -> anyhow::Result<()> {
        let socket = self.host(name).socket.clone();
        wait_until(
            Duration::from_secs(20),
            &format!("{name} to know {n} members"),
            || {
                let s = status_of(&socket).ok()?;
                (s["peers"].as_array()?.len() == n).then_some(())
            },
        )
    }

    /// Whether host `name` has an authenticated path to the member at `vip`.
    pub fn authenticated(&self, name: &str, vip: Ipv4Addr) -> bool {
        self.status(name).ok().and_then(|s| {
            s["peers"]
                .as_array()?
                .iter()
                .find(|p| p["virtual_ip"] == vip.to_string())
                .map(|p| p["authenticated"] == true)
        }) == Some(true)
    }

    pub fn status(&self, name: &str) -> anyhow::Result<Value> {
        status_of(&self.host(name).socket)
    }

    pub fn agent_pid(&self, name: &str) -> Option<u32> {
        self.host(name).agent.as_ref().map(Child::id)
    }

    /// Clean stop (SIGTERM), waiting for the agent to exit.
    pub fn stop_agent(&mut self, name: &str) -> anyhow::Result<std::process::ExitStatus> {
        let i = self.index(name);
        let mut child = self.hosts[i]
            .agent
            .take()
            .ok_or_else(|| anyhow!("agent {name} not running"))?;
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("agent {name} did not stop within 10 s of SIGTERM");
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Crash (SIGKILL): the agent gets no chance to clean up.
    pub fn kill_agent(&mut self, name: &str) {
        let i = self.index(name);
        if let Some(mut child) = self.hosts[i].agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn agent_log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(format!("agent-{name}.log"))).unwrap_or_default()
    }

    /// Runs `pvc <args> --json` against host `name`'s agent.
    pub fn pvc_json(&self, name: &str, args: &[&str]) -> anyhow::Result<Value> {
        pvc_json(&self.host(name).socket, args)
    }
}

/// Runs `pvc <args> --json` against the agent behind `socket`.
fn pvc_json(socket: &Path, args: &[&str]) -> anyhow::Result<Value> {
    let out = Command::new(bin("pvc"))
        .args(args)
        .arg("--json")
        .arg("--socket")
        .arg(socket)
        .output()?;
    ensure!(
        out.status.success(),
        "pvc {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn status_of(socket: &Path) -> anyhow::Result<Value> {
    pvc_json(socket, &["status"])
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `limit`.
pub fn wait_until<T>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        sleep(Duration::from_millis(50));
    }
}

/// A program started in the background by the lab.
pub struct Spawned {
    pub pid: u32,
    pub log: PathBuf,
}

/// A command ready to run inside a namespace (owns the fds its pre_exec uses).
pub struct Prepared {
    pub cmd: Command,
    _ns: File,
    _uts: Option<File>,
    _procs: Option<File>,
}

impl Prepared {
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    pub fn output(mut self) -> anyhow::Result<Output> {
        Ok(self.cmd.stdin(Stdio::null()).output()?)
    }

    /// Runs to completion; fails with its output when it exits non-zero.
    pub fn ok(self) -> anyhow::Result<String> {
        let desc = format!("{:?}", self.cmd);
        let out = self.output()?;
        ensure!(
            out.status.success(),
            "{desc} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn spawn_logged(mut self, log: &Path) -> anyhow::Result<Child> {
        let file = File::create(log)?;
        self.cmd.stdout(file.try_clone()?).stderr(file);
        Ok(self.cmd.spawn()?)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Agents stop cleanly when they can; otherwise their leftovers are
        // removed by `pvc-agent --cleanup` inside their namespace.
        let names: Vec<String> = self
            .hosts
            .iter()
            .filter(|h| h.agent.is_some())
            .map(|h| h.name.clone())
            .collect();
        for n in names {
            if self.stop_agent(&n).is_err() {
                let h = self.host(&n);
                if let Ok(p) = Self::command_in(&h.netns, None, bin("pvc-agent")) {
                    let _ = p.args(["--cleanup", "--config"]).args([&h.config]).output();
                }
            }
        }
        self.kill_broker();
        for ns in &self.namespaces {
            if let Ok(pids) = sh(&["ip", "netns", "pids", ns]) {
                for pid in pids
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = sh(&["ip", "netns", "del", ns]);
            let uts = uts_file(ns);
            if uts.exists() {
                let _ = sh(&["umount", &uts.display().to_string()]);
                let _ = fs::remove_file(&uts);
            }
        }
        for h in &self.hosts {
            let _ = fs::remove_dir(&h.cgroup);
            let pins = Path::new("/sys/fs/bpf/pvc").join(&h.instance);
            if pins.exists() {
                let _ = fs::remove_dir_all(&pins);
            }
        }
        let _ = fs::remove_dir(&self.cgroup_dir);
        let _ = fs::remove_dir(Path::new("/sys/fs/bpf/pvc"));
        if std::thread::panicking() {
            // Keep logs of a failed test for the reader.
            eprintln!("lab logs kept in {}", self.dir.display());
            for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "log") {
                    let text = fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    let _ = writeln!(
                        std::io::stderr(),
                        "---- {}\n{}",
                        p.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes what labs of this process left, without their `Lab` values:
/// for a process that must end at once (a signal), where `Lab::drop`
/// cannot run. Every process in their namespaces is killed, and their
/// namespaces, hostnames, cgroups and pins go.
pub fn remove_this_process_labs() {
    let prefix = format!("pvct{}x", std::process::id());
    let namespaces = sh(&["ip", "netns", "list"]).unwrap_or_default();
    let ours: Vec<&str> = namespaces
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    for ns in &ours {
        for pid in sh(&["ip", "netns", "pids", ns])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: a plain signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    sleep(Duration::from_millis(300));
    for ns in &ours {
        let _ = sh(&["ip", "netns", "del", ns]);
        let uts = uts_file(ns);
        if uts.exists() {
            let _ = sh(&["umount", &uts.display().to_string()]);
            let _ = fs::remove_file(&uts);
        }
    }
    let starts = |e: &fs::DirEntry| e.file_name().to_string_lossy().starts_with(&prefix);
    for lab in fs::read_dir(cgroup2_root())
        .into_iter()
        .flatten()
        .flatten()
        .filter(starts)
    {
        for host in fs::read_dir(lab.path()).into_iter().flatten().flatten() {
            if host.path().is_dir() {
                let procs =
                    fs::read_to_string(host.path().join("cgroup.procs")).unwrap_or_default();
                for pid in procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: a plain signal.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                let _ = fs::remove_dir(host.path());
            }
        }
        let _ = fs::remove_dir(lab.path());
    }
    for dir in [Path::new("/sys/fs/bpf/pvc"), Path::new("/sys/fs/bpf")] {
        for pin in fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(starts)
        {
            let _ = fs::remove_dir_all(pin.path()).or_else(|_| fs::remove_file(pin.path()));
        }
    }
    let _ = fs::remove_dir(Path::new("/sys/fs/bpf/pvc"));
    // bpffs, if a lab of this process mounted it (`BpffsUse` never drops).
    let users = BPFFS_USERS.lock().unwrap_or_else(|e| e.into_inner());
    if users.1
        && let Ok(path) = std::ffi::CString::new(BPFFS)
    {
        // SAFETY: a valid C string.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The `[interposition]` line of a host that masquerades every flow per
/// packet, for `write_config`'s `extra`.
pub const PER_PACKET: &str = "translation = \"packet\"\n";

/// Small programs written against the plain socket API, run with python3:
/// they stand for any unmodified application and report what the socket
/// calls returned (accept(), getpeername(), getsockname(), errno).
pub mod probe {
    use super::*;

    /// A TCP server on `host` answering `count` connections with "echo:<data>",
    /// printing one JSON line per connection: what accept() returned.
    pub fn server(
        lab: &mut Lab,
        host: &str,
        bind: &str,
        port: u16,
        count: usize,
    ) -> anyhow::Result<PathBuf> {
        let script = format!(
            r#"
import socket, json
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{bind}", {port}))
s.listen(512)
for _ in range({count}):
    c, a = s.accept()
    d = c.recv(100)
    c.sendall(b"echo:" + d)
    l = c.getsockname()
    print(json.dumps({{"peer": a[0], "port": a[1], "local": l[0], "local_port": l[1]}}), flush=True)
    c.close()
"#
        );
        let log = lab.dir.join(format!("server-{host}-{port}.jsonl"));
        let mut p = lab.app(host, "python3");
        p.cmd
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(File::create(&log)?)
            .stderr(File::create(log.with_extension("err"))?);
        let child = p.cmd.spawn()?;
        lab.children.push(child);
        lab.wait_listening(host, port)?;
        Ok(log)
    }

    /// What the server saw, one entry per connection so far.
    pub fn accepted(log: &Path) -> Vec<Value> {
        fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// `count` sequential connections from `host` to dst:port, each sending
    /// "hello". Returns one JSON object per connection: peer/local/reply, or
    /// errno on failure.
    pub fn clients(
        lab: &Lab,
        host: &str,
        dst: Ipv4Addr,
        port: u16,
        count: usize,
    ) -> anyhow::Result<Vec<Value>> {
        let script = format!(
            r#"
import socket, json
for _ in range({count}):
    try:
        s = socket.create_connection(("{dst}", {port}), timeout=5)
        s.sendall(b"hello")
        r = s.recv(100)
        print(json.dumps({{"peer": s.getpeername()[0], "local": s.getsockname()[0], "reply": r.decode()}}))
        s.close()
    except OSError as e:
        print(json.dumps({{"errno": e.errno, "error": str(e)}}))
"#
        );
        let out = lab.app(host, "python3").args(["-c", &script]).ok()?;
        Ok(out
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?)
    }

    /// socat echoing every connection on `port` of `host`, for as long as the lab lives.
    pub fn echo_server(lab: &mut Lab, host: &str, port: u16) -> anyhow::Result<()> {
        lab.spawn(
            host,
            "socat",
            &[&format!("TCP-LISTEN:{port},fork,reuseaddr"), "EXEC:cat"],
        )?;
        lab.wait_listening(host, port)
    }

    /// A client on `host` exchanging a numbered line with an echo server at
    /// `dst:port` every 50 ms for `seconds`, over one connection. Read the
    /// outcome with `chatter_result`.
    pub fn chatter(
        lab: &mut Lab,
        host: &str,
        dst: Ipv4Addr,
        port: u16,
        seconds: u32,
    ) -> anyhow::Result<Spawned> {
        let script = format!(
            r#"
import socket, time, json
s = socket.create_connection(("{dst}", {port}), timeout=5)
n = 0
end = time.time() + {seconds}
try:
    while time.time() < end:
        msg = b"%d\n" % n
        s.sendall(msg)
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                raise OSError(0, "connection closed")
            got += chunk
        assert got == msg, (got, msg)
        n += 1
        time.sleep(0.05)
    print(json.dumps({{"ok": True, "exchanges": n}}))
except OSError as e:
    print(json.dumps({{"ok": False, "exchanges": n, "errno": e.errno, "error": str(e)}}))
"#
        );
        lab.spawn(host, "python3", &["-c", &script])
    }

    /// {"ok": true, "exchanges": n} if the connection lasted, else the error.
    pub fn chatter_result(lab: &mut Lab, c: &Spawned) -> anyhow::Result<Value> {
        let out = lab.wait(c, Duration::from_secs(60))?;
        serde_json::from_str(out.lines().last().unwrap_or("{}"))
            .with_context(|| format!("chatter said: {out}"))
    }

    /// One connection from `host` to dst:port, in the host's cgroup or
    /// outside it, sending "hello": {"reply", "ms" (connect() to the reply),
    /// "local", "peer"} as the socket calls returned them, or {"errno",
    /// "error", "ms"}.
    pub fn timed(
        lab: &Lab,
        host: &str,
        dst: Ipv4Addr,
        port: u16,
        in_cgroup: bool,
    ) -> anyhow::Result<Value> {
        let script = format!(
            r#"
import socket, json, time
t = time.monotonic()
try:
    s = socket.create_connection(("{dst}", {port}), timeout=8)
    s.sendall(b"hello")
    r = s.recv(100)
    ms = (time.monotonic() - t) * 1000
    print(json.dumps({{"reply": r.decode(), "ms": ms, "local": s.getsockname()[0], "peer": s.getpeername()[0]}}))
except OSError as e:
    print(json.dumps({{"errno": e.errno, "error": str(e), "ms": (time.monotonic() - t) * 1000}}))
"#
        );
        let h = lab.host(host);
        let cgroup = in_cgroup.then_some(h.cgroup.as_path());
        let out = Lab::command_in(&h.netns, cgroup, "python3")?
            .args(["-c", &script])
            .ok()?;
        Ok(serde_json::from_str(out.trim())?)
    }

    pub fn client(lab: &Lab, host: &str, dst: Ipv4Addr, port: u16) -> anyhow::Result<Value> {
        Ok(clients(lab, host, dst, port, 1)?.remove(0))
    }
}

impl Lab {
    /// Waits until something on `host` listens on TCP `port`.
    pub fn wait_listening(&self, host: &str, port: u16) -> anyhow::Result<()> {
        self.wait_port(&self.host(host).netns.clone(), port)
    }

    /// Makes `host`'s listeners answer every SYN with a SYN cookie (as
    /// under a SYN flood), or only when their queue is full (Linux's
    /// default), in its own namespace.
    pub fn force_syn_cookies(&self, host: &str, forced: bool) -> anyhow::Result<()> {
        let value = if forced { 2 } else { 1 };
        Self::command_in(&self.host(host).netns, None, "sysctl")?
            .args(["-qw", &format!("net.ipv4.tcp_syncookies={value}")])
            .ok()?;
        Ok(())
    }

    /// The SYN cookies `host`'s kernel has sent (`nstat`'s counter).
    pub fn syn_cookies_sent(&self, host: &str) -> anyhow::Result<u64> {
        let out = self
            .app(host, "nstat")
            .args(["-az", "TcpExtSyncookiesSent"])
            .ok()?;
        Ok(out
            .lines()
            .find_map(|l| l.strip_prefix("TcpExtSyncookiesSent"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0))
    }
}

/// tcpdump on the LAN bridge: what really crosses the wire.
pub struct Capture {
    child: Child,
    out: PathBuf,
}

impl Lab {
    /// Starts capturing on the bridge: `filter` holds tcpdump options and a
    /// pcap filter; text output with checksum verification (-vv, whole packets).
    pub fn capture(&self, filter: &str) -> anyhow::Result<Capture> {
        require_tools(&["tcpdump"]);
        let id = LABS.fetch_add(1, Ordering::Relaxed);
        let out = self.dir.join(format!("capture-{id}.txt"));
        let err = out.with_extension("err");
        let mut p = self.ns(&self.lan_ns, "tcpdump");
        p.cmd
            .args(["-i", "br0", "-n", "-l", "-vv"])
            .args(filter.split_whitespace())
            .stdout(File::create(&out)?)
            .stderr(File::create(&err)?)
            .stdin(Stdio::null());
        let child = p.cmd.spawn()?;
        wait_until(Duration::from_secs(10), "tcpdump to start", || {
            fs::read_to_string(&err)
                .ok()?
                .contains("listening on")
                .then_some(())
        })?;
        Ok(Capture { child, out })
    }
}

impl Capture {
    /// Stops the capture and returns its text (one packet may span two lines).
    pub fn finish(mut self) -> String {
        // Let the last packets reach the file.
        sleep(Duration::from_millis(300));
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        fs::read_to_string(&self.out).unwrap_or_default()
    }
}

/// A process's CPU time and memory at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub cpu: Duration,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

impl Usage {
    pub fn of(pid: u32) -> Usage {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        };
        Usage {
            cpu: cpu_time(pid),
            rss_kib: field("VmRSS:"),
            peak_rss_kib: field("VmHWM:"),
        }
    }
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("process alive");
    // Fields after the command name (which may contain spaces) start at ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}
