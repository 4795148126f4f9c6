//! Unmodified cluster software on the lab's hosts (paper §5.3): a Slurm
//! cluster (munge, slurmctld, slurmd with a node-local scratch folder) and a
//! BitTorrent swarm (opentracker, aria2c). Each is addressed either by
//! virtual addresses through PVC or by real addresses over the bare LAN, so
//! that the same software can be measured on both in one run.

use std::{
    ffi::OsStr,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail, ensure};

use super::{Lab, Prepared, Spawned, require_tools, wait_until};

/// Which network the software's addresses are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Virtual addresses, from inside the hosts' cgroups: through PVC.
    Pvc,
    /// Real addresses on the bare LAN (`Lab::add_bare_lan`), from outside
    /// the hosts' cgroups: PVC sees nothing of it.
    Bare,
}

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Pvc => "PVC",
            Route::Bare => "bare",
        }
    }

    /// Both routes, the order alternating with the repetition (so that
    /// machine noise hits both).
    pub fn interleaved(rep: usize) -> [Route; 2] {
        if rep.is_multiple_of(2) {
            [Route::Bare, Route::Pvc]
        } else {
            [Route::Pvc, Route::Bare]
        }
    }

    /// Host `host`'s address on this route.
    pub fn addr(self, lab: &Lab, host: &str) -> Ipv4Addr {
        match self {
            Route::Pvc => lab.host(host).virtual_ip,
            Route::Bare => lab.bare_ip(host),
        }
    }

    /// A command on `host`, inside its cgroup for PVC, outside it for bare.
    pub fn command(self, lab: &Lab, host: &str, program: impl AsRef<OsStr>) -> Prepared {
        let h = lab.host(host);
        let cgroup = (self == Route::Pvc).then_some(h.cgroup.as_path());
        Lab::command_in(&h.netns, cgroup, program).expect("prepare command")
    }

    /// A long-running program on `host`, killed with the lab.
    pub fn spawn(
        self,
        lab: &mut Lab,
        host: &str,
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<Spawned> {
        match self {
            Route::Pvc => lab.spawn(host, program, args),
            Route::Bare => lab.spawn_outside(host, program, args),
        }
    }

    /// Ports differ per route, so that both can run on the same hosts.
    fn port(self, base: u16) -> u16 {
        match self {
            Route::Pvc => base,
            Route::Bare => base + 1000,
        }
    }

    fn folder(self) -> &'static str {
        match self {
            Route::Pvc => "pvc",
            Route::Bare => "bare",
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The cluster's munge daemon: one key, one daemon for every host (the
/// lab's hosts share the file system, as a cluster shares its munge key).
/// Started once per lab; returns its socket.
pub fn munge(lab: &mut Lab) -> anyhow::Result<PathBuf> {
    let dir = lab.dir.clone();
    let socket = dir.join("munge.socket");
    if socket.exists() {
        return Ok(socket);
    }
    require_tools(&["munged"]);
    let key = dir.join("munge.key");
    let bytes: Vec<u8> = (0..1024).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&key, bytes)?;
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let arg = |flag: &str, p: PathBuf| format!("--{flag}={}", p.display());
    lab.spawn_beside_broker(
        "munged",
        &[
            "-F",
            "--force",
            &arg("key-file", key),
            &arg("socket", socket.clone()),
            &arg("pid-file", dir.join("munged.pid")),
            &arg("log-file", dir.join("munged.log")),
            &arg("seed-file", dir.join("munged.seed")),
        ],
    )?;
    wait_until(Duration::from_secs(10), "munged's socket", || {
        socket.exists().then_some(())
    })?;
    Ok(socket)
}

/// A Slurm cluster: slurmctld on one host, slurmd on others, every daemon
/// knowing the others by `route`'s addresses only.
pub struct Slurm {
    pub route: Route,
    /// Configuration, state and logs.
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub controller: String,
    pub nodes: Vec<String>,
}

/// Each slurmd sees its own folder here (a bind mount in its own mount
/// namespace): the node-local disk `sbcast` writes to.
const SCRATCH: &str = "scratch";

impl Slurm {
    /// Writes `slurm.conf`, starts the daemons and waits for every node to
    /// be idle.
    pub fn start(
        lab: &mut Lab,
        route: Route,
        controller: &str,
        nodes: &[&str],
    ) -> anyhow::Result<Slurm> {
        require_tools(&["slurmctld", "slurmd", "srun", "sinfo", "sbcast", "salloc"]);
        let munge = munge(lab)?;
        let dir = lab.dir.join(format!("slurm-{}", route.folder()));
        std::fs::create_dir_all(dir.join("state"))?;
        std::fs::create_dir_all(dir.join(SCRATCH))?;
        let slurm = Slurm {
            route,
            conf: dir.join("slurm.conf"),
            dir,
            controller: controller.to_string(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
        };
        std::fs::write(&slurm.conf, slurm.config(lab, &munge))?;
        let conf = slurm.conf.display().to_string();
        route.spawn(lab, controller, "slurmctld", &["-D", "-f", &conf])?;
        let mount_point = slurm.dir.join(SCRATCH).display().to_string();
        for n in nodes {
            let own = slurm.scratch(n);
            std::fs::create_dir_all(slurm.dir.join(format!("spool-host-{n}")))?;
            std::fs::create_dir_all(&own)?;
            // A mount namespace per slurmd: the job steps and file
            // broadcasts it starts see the node's own scratch folder.
            let script = format!(
                "mount --bind {} {mount_point} && exec slurmd -D -f {conf}",
                own.display()
            );
            route.spawn(
                lab,
                n,
                "unshare",
                &["--mount", "--propagation", "private", "sh", "-c", &script],
            )?;
        }
        slurm.wait_idle(lab, Duration::from_secs(30))?;
        Ok(slurm)
    }

    fn config(&self, lab: &Lab, munge: &Path) -> String {
        let dir = self.dir.display();
        let route = self.route;
        let mut conf = format!(
            "ClusterName={cluster}
SlurmctldHost=host-{c}({caddr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
ReturnToService=2
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
",
            cluster = route.folder(),
            c = self.controller,
            caddr = route.addr(lab, &self.controller),
            munge = munge.display(),
            ctld_port = route.port(6817),
            d_port = route.port(6818),
        );
        for n in &self.nodes {
            let _ = writeln!(
                conf,
                "NodeName=host-{n} NodeAddr={} CPUs=1 State=UNKNOWN",
                route.addr(lab, n)
            );
        }
        let names: Vec<String> = self.nodes.iter().map(|n| format!("host-{n}")).collect();
        let _ = writeln!(
            conf,
            "PartitionName=all Nodes={} Default=YES MaxTime=INFINITE State=UP",
            names.join(",")
        );
        conf
    }

    /// Node `node`'s scratch folder, as seen from outside the node.
    pub fn scratch(&self, node: &str) -> PathBuf {
        self.dir.join(format!("{SCRATCH}-host-{node}"))
    }

    /// A Slurm command on the controller's host: (success, stdout, stderr).
    pub fn run(&self, lab: &Lab, program: &str, args: &[&str]) -> (bool, String, String) {
        let mut p = self.route.command(lab, &self.controller, program);
        // Jobs without an output file write theirs to the working folder.
        p.cmd
            .env("SLURM_CONF", &self.conf)
            .current_dir(&self.dir)
            .args(args);
        match p.output() {
            Ok(o) => (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ),
            Err(e) => (false, String::new(), format!("cannot run {program}: {e}")),
        }
    }

    /// Waits for every node to be idle (and, on failure, says what the
    /// controller and a node logged).
    pub fn wait_idle(&self, lab: &Lab, limit: Duration) -> anyhow::Result<()> {
        wait_until(limit, "every Slurm node idle", || {
            let (_, out, _) = self.run(lab, "sinfo", &["-h", "-N", "-o", "%N %T"]);
            (out.lines().filter(|l| l.ends_with(" idle")).count() == self.nodes.len()).then_some(())
        })
        .with_context(|| {
            format!(
                "{:?}\n{}\n{}",
                self.run(lab, "sinfo", &["-N"]),
                self.log("slurmctld.log"),
                self.log(&format!("slurmd-host-{}.log", self.nodes[0]))
            )
        })
    }

    /// The last lines of one of the cluster's logs.
    pub fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until the queue is empty.
    pub fn wait_empty_queue(&self, lab: &Lab, limit: Duration) -> anyhow::Result<()> {
        wait_until(limit, "an empty Slurm queue", || {
            let (ok, q, _) = self.run(lab, "squeue", &["-h"]);
            (ok && q.trim().is_empty()).then_some(())
        })
    }

    /// Copies `file` to `name` in the scratch folder of `nodes` nodes
    /// with `sbcast`, inside an allocation of them; returns how long sbcast
    /// took (the allocation's own start is not counted).
    pub fn sbcast(
        &self,
        lab: &Lab,
        file: &Path,
        name: &str,
        nodes: usize,
    ) -> anyhow::Result<Duration> {
        let dest = self.dir.join(SCRATCH).join(name);
        let n = nodes.to_string();
        let script =
            "a=$(date +%s%N) && sbcast --force \"$1\" \"$2\" && b=$(date +%s%N) && echo $((b - a))";
        let file = file.display().to_string();
        let dest = dest.display().to_string();
        let (ok, out, err) = self.run(
            lab,
            "salloc",
            &["-N", &n, "sh", "-c", script, "sh", &file, &dest],
        );
        ensure!(ok, "salloc sbcast failed: {out}\n{err}");
        let ns: u64 = out
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .with_context(|| format!("no time from sbcast: {out}\n{err}"))?;
        Ok(Duration::from_nanos(ns))
    }
}

/// Bencoding of what a single-file .torrent holds.
enum Bencode<'a> {
    Int(u64),
    Bytes(&'a [u8]),
    /// Keys in sorted order, as the format requires.
    Dict(Vec<(&'a str, Bencode<'a>)>),
}

impl Bencode<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Bencode::Int(i) => out.extend_from_slice(format!("i{i}e").as_bytes()),
            Bencode::Bytes(b) => {
                out.extend_from_slice(format!("{}:", b.len()).as_bytes());
                out.extend_from_slice(b);
            }
            Bencode::Dict(entries) => {
                out.push(b'd');
                for (k, v) in entries {
                    Bencode::Bytes(k.as_bytes()).write(out);
                    v.write(out);
                }
                out.push(b'e');
            }
        }
    }
}

/// A .torrent for `file` announcing to `announce`, and its info hash.
pub fn torrent(
    file: &Path,
    announce: &str,
    piece_length: usize,
) -> anyhow::Result<(Vec<u8>, [u8; 20])> {
    let data = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .context("the file needs a name")?;
    let mut pieces = Vec::with_capacity(data.len() / piece_length * 20 + 20);
    for piece in data.chunks(piece_length) {
        let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, piece);
        pieces.extend_from_slice(d.as_ref());
    }
    let info = Bencode::Dict(vec![
        ("length", Bencode::Int(data.len() as u64)),
        ("name", Bencode::Bytes(name.as_bytes())),
        ("piece length", Bencode::Int(piece_length as u64)),
        ("pieces", Bencode::Bytes(&pieces)),
    ]);
    let mut info_bytes = Vec::new();
    info.write(&mut info_bytes);
    let hash = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &info_bytes);
    let mut info_hash = [0; 20];
    info_hash.copy_from_slice(hash.as_ref());
    let mut out = Vec::new();
    out.extend_from_slice(b"d");
    Bencode::Bytes(b"announce").write(&mut out);
    Bencode::Bytes(announce.as_bytes()).write(&mut out);
    Bencode::Bytes(b"info").write(&mut out);
    out.extend_from_slice(&info_bytes);
    out.push(b'e');
    Ok((out, info_hash))
}

/// A BitTorrent swarm for one file: opentracker (whitelisted to this
/// torrent only) and aria2c on the hosts, TCP only (no DHT, no local peer
/// discovery: both are UDP).
pub struct Swarm {
    pub route: Route,
    pub dir: PathBuf,
    /// The file as the seed has it.
    pub original: PathBuf,
    pub name: String,
    pub info_hash: [u8; 20],
    torrent: PathBuf,
    tracker: SocketAddrV4,
    /// aria2c's process on each host that runs one.
    clients: Vec<(String, u32)>,
}

/// The port a tracker probe (`Swarm::announce`) claims to listen on.
const PROBE_PORT: u16 = 9;

/// Piece size: 256 KiB, as common clients choose for files of this size.
const PIECE: usize = 256 * 1024;

impl Swarm {
    /// Writes the torrent for `file` and starts opentracker on `tracker`.
    pub fn start(lab: &mut Lab, route: Route, tracker: &str, file: &Path) -> anyhow::Result<Swarm> {
        require_tools(&["opentracker", "aria2c"]);
        let dir = lab.dir.join(format!("swarm-{}", route.folder()));
        std::fs::create_dir_all(&dir)?;
        let addr = SocketAddrV4::new(route.addr(lab, tracker), route.port(6969));
        let (bytes, info_hash) = torrent(file, &format!("http://{addr}/announce"), PIECE)?;
        let torrent_file = dir.join("file.torrent");
        std::fs::write(&torrent_file, bytes)?;
        // Debian's opentracker serves whitelisted torrents only; it reads
        // the list after its chroot into `-d`.
        std::fs::write(dir.join("whitelist"), format!("{}\n", hex(&info_hash)))?;
        let dir_s = dir.display().to_string();
        let port = addr.port().to_string();
        route.spawn(
            lab,
            tracker,
            "opentracker",
            &[
                "-i",
                &addr.ip().to_string(),
                "-p",
                &port,
                "-P",
                &port,
                "-d",
                &dir_s,
                "-w",
                "whitelist",
            ],
        )?;
        let swarm = Swarm {
            route,
            original: file.to_path_buf(),
            name: file
                .file_name()
                .and_then(|n| n.to_str())
                .context("the file needs a name")?
                .to_string(),
            dir,
            info_hash,
            torrent: torrent_file,
            tracker: addr,
            clients: Vec::new(),
        };
        lab.wait_listening(tracker, addr.port())?;
        Ok(swarm)
    }

    /// Where host `host`'s copy of the file lives.
    pub fn copy_of(&self, host: &str) -> PathBuf {
        self.dir.join(host).join(&self.name)
    }

    fn aria2c(&mut self, lab: &mut Lab, host: &str, extra: &[&str]) -> anyhow::Result<()> {
        let own = self.dir.join(host);
        std::fs::create_dir_all(&own)?;
        // aria2c runs this when the download has completed (before it
        // goes on seeding): the moment the copy is whole.
        let hook = self.dir.join("done.sh");
        std::fs::write(&hook, "#!/bin/sh\ndate +%s.%N > \"$3.done\"\n")?;
        std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let mut args = vec![
            format!("--dir={}", own.display()),
            format!("--listen-port={}", self.route.port(6881)),
            format!("--on-bt-download-complete={}", hook.display()),
            format!(
                "--log={}",
                self.dir.join(format!("{host}-aria2.log")).display()
            ),
            "--log-level=notice".into(),
            "--enable-dht=false".into(),
            "--bt-enable-lpd=false".into(),
            "--seed-ratio=0.0".into(),
            "--file-allocation=none".into(),
            "--console-log-level=warn".into(),
            "--summary-interval=0".into(),
            "--enable-color=false".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(self.torrent.display().to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let spawned = self.route.spawn(lab, host, "aria2c", &args)?;
        self.clients.push((host.to_string(), spawned.pid));
        Ok(())
    }

    /// Seeds the file from `host` (its copy checked first), at most
    /// `upload_limit` (aria2's notation, "500K") when given.
    pub fn seed(
        &mut self,
        lab: &mut Lab,
        host: &str,
        upload_limit: Option<&str>,
    ) -> anyhow::Result<()> {
        let copy = self.copy_of(host);
        std::fs::create_dir_all(copy.parent().expect("a folder"))?;
        std::fs::copy(&self.original, &copy)?;
        let limit = upload_limit.map(|l| format!("--max-upload-limit={l}"));
        let mut extra = vec!["--check-integrity=true"];
        extra.extend(limit.as_deref());
        self.aria2c(lab, host, &extra)?;
        // Seeding once the check is done: the hook has run.
        wait_until(Duration::from_secs(30), "the seed's check", || {
            self.done_at(host).map(|_| ())
        })
    }

    /// Starts downloading on `host` (it seeds afterwards).
    pub fn download(&mut self, lab: &mut Lab, host: &str) -> anyhow::Result<()> {
        self.aria2c(lab, host, &[])
    }

    /// Stops aria2c on `hosts` (it tells the tracker it leaves) and
    /// removes their copies: the next distribution starts from nothing.
    pub fn forget(&mut self, hosts: &[&str]) -> anyhow::Result<()> {
        for h in hosts {
            if let Some(i) = self.clients.iter().position(|(c, _)| c == h) {
                let (_, pid) = self.clients.remove(i);
                // SAFETY: a plain signal to a child the lab still holds.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                wait_until(Duration::from_secs(10), "aria2c to stop", || {
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
                    // Gone, or a zombie the lab reaps at its end.
                    stat.is_none_or(|s| s.contains(") Z ")).then_some(())
                })?;
            }
            let own = self.dir.join(h);
            if own.exists() {
                std::fs::remove_dir_all(&own)?;
            }
        }
        Ok(())
    }

    /// When host `host`'s copy completed (Unix time), if it has.
    fn done_at(&self, host: &str) -> Option<f64> {
        let mark = self.dir.join(host).join(format!("{}.done", self.name));
        std::fs::read_to_string(mark).ok()?.trim().parse().ok()
    }

    /// Starts downloads on `hosts` at once and waits for all of them;
    /// returns the time from the start to the last completed copy. Every
    /// copy is checked against the original. With `watch`, the downloaders'
    /// swarm connections are sampled meanwhile (peers drop each other once
    /// both are complete, so afterwards is too late to look).
    pub fn distribute(
        &mut self,
        lab: &mut Lab,
        hosts: &[&str],
        limit: Duration,
        watch: bool,
    ) -> anyhow::Result<Distribution> {
        let start = unix_now();
        for h in hosts {
            self.download(lab, h)?;
        }
        let mut seen: Vec<Connection> = Vec::new();
        let last = wait_until(limit, "every copy complete", || {
            if watch {
                for h in hosts {
                    for c in self.connections(lab, h).unwrap_or_default() {
                        match seen.iter_mut().find(|s| s.same(&c)) {
                            Some(s) => s.received = s.received.max(c.received),
                            None => seen.push(c),
                        }
                    }
                }
            }
            let done: Option<Vec<f64>> = hosts.iter().map(|h| self.done_at(h)).collect();
            done.map(|d| d.into_iter().fold(start, f64::max))
        })
        .with_context(|| self.logs(hosts))?;
        let original = std::fs::read(&self.original)?;
        for h in hosts {
            let copy = std::fs::read(self.copy_of(h))?;
            ensure!(
                copy == original,
                "host {h}'s copy differs from the original"
            );
        }
        Ok(Distribution {
            took: Duration::from_secs_f64(last - start),
            connections: seen,
        })
    }

    fn logs(&self, hosts: &[&str]) -> String {
        hosts
            .iter()
            .map(|h| {
                let p = self.dir.join(format!("{h}-aria2.log"));
                format!(
                    "---- {h}\n{}",
                    std::fs::read_to_string(p).unwrap_or_default()
                )
            })
            .collect()
    }

    /// Announces to the tracker from `host` (as a peer on `PROBE_PORT`
    /// that has the whole file) and returns the other peers the tracker
    /// hands out: the addresses it saw.
    pub fn announce(&self, lab: &Lab, host: &str) -> anyhow::Result<Vec<SocketAddrV4>> {
        let hash: String = self.info_hash.iter().map(|b| format!("%{b:02x}")).collect();
        let url = format!(
            "http://{}/announce?info_hash={hash}&peer_id=-PV0001-labprobe0001&port={PROBE_PORT}\
             &uploaded=0&downloaded=0&left=0&compact=1&numwant=200",
            self.tracker
        );
        let out = self
            .route
            .command(lab, host, "curl")
            .args(["-sSf", "-g", "--max-time", "5", &url])
            .output()?;
        ensure!(
            out.status.success(),
            "announce from {host} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let me = self.route.addr(lab, host);
        // Less this probe itself, which the tracker now lists too.
        Ok(compact_peers(&out.stdout)?
            .into_iter()
            .filter(|p| !(*p.ip() == me && p.port() == PROBE_PORT))
            .collect())
    }

    /// Host `host`'s open connections with other peers of the swarm and
    /// what each has received so far (the kernel's TCP state: `ss -ti` in
    /// the host's namespace), by the addresses the application sees: a flow
    /// PVC translated at the socket shows its real tuple to `ss`, and its
    /// virtual one (from `pvc flows`) here.
    pub fn connections(&self, lab: &Lab, host: &str) -> anyhow::Result<Vec<Connection>> {
        let ss = || {
            lab.ns(&lab.host(host).netns, "ss")
                .args(["-tinH", "state", "established"])
                .ok()
        };
        // The agent's list before and after `ss`: a flow that `ss` saw had
        // its entry at one of the two times, unless it opened and closed
        // between them (checked below).
        let mut virtual_tuples = socket_flows(lab, host)?;
        let out = ss()?;
        virtual_tuples.extend(socket_flows(lab, host)?);
        let mut again: Option<String> = None;
        let port = self.route.port(6881);
        let mut found = Vec::new();
        let mut current: Option<(SocketAddrV4, SocketAddrV4)> = None;
        for line in out.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !line.starts_with(char::is_whitespace) && fields.len() >= 4 {
                // "Recv-Q Send-Q local peer": a swarm connection has the
                // peers' listening port on one end.
                current = match (fields[2].parse(), fields[3].parse()) {
                    (Ok(l), Ok(p)) => {
                        let (l, p): (SocketAddrV4, SocketAddrV4) = (l, p);
                        (l.port() == port || p.port() == port).then_some((l, p))
                    }
                    _ => None,
                };
            } else if let Some((local, peer)) = current.take() {
                let received = fields
                    .iter()
                    .find_map(|f| f.strip_prefix("bytes_received:"))
                    .and_then(|b| b.parse().ok())
                    .unwrap_or(0);
                let (local, peer) = match virtual_tuples.get(&(local, peer)) {
                    Some(v) => *v,
                    None => {
                        // Not in either list: a flow that came and went
                        // between them (gone from a second look), or one by
                        // real address (still there).
                        let later = match &again {
                            Some(t) => t,
                            None => again.insert(ss()?),
                        };
                        if !later.contains(&format!("{local} ")) {
                            continue;
                        }
                        (local, peer)
                    }
                };
                found.push(Connection {
                    host: host.to_string(),
                    local,
                    peer,
                    received,
                });
            }
        }
        Ok(found)
    }
}

/// The flows `host`'s agent translated at the socket: their tuple on the
/// wire (local, peer) -> their virtual tuple.
fn socket_flows(
    lab: &Lab,
    host: &str,
) -> anyhow::Result<
    std::collections::HashMap<(SocketAddrV4, SocketAddrV4), (SocketAddrV4, SocketAddrV4)>,
> {
    let pair = |s: &str| -> Option<(SocketAddrV4, SocketAddrV4)> {
        let (a, b) = s.split_once(" -> ")?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    let status = lab.status(host)?;
    Ok(status["flows"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["direction"] == "socket")
        .filter_map(|f| Some((pair(f["to"].as_str()?)?, pair(f["from"].as_str()?)?)))
        .collect())
}

/// What a distribution by the swarm took.
pub struct Distribution {
    /// From the downloads' start to the last complete copy.
    pub took: Duration,
    /// The downloaders' swarm connections seen meanwhile (with `watch`).
    pub connections: Vec<Connection>,
}

/// One swarm connection as a host's kernel saw it.
#[derive(Clone, Debug)]
pub struct Connection {
    pub host: String,
    pub local: SocketAddrV4,
    pub peer: SocketAddrV4,
    /// Bytes received (the most seen).
    pub received: u64,
}

impl Connection {
    fn same(&self, other: &Connection) -> bool {
        self.host == other.host && self.local == other.local && self.peer == other.peer
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `peers` of a tracker's compact answer: 6 bytes per peer.
fn compact_peers(answer: &[u8]) -> anyhow::Result<Vec<SocketAddrV4>> {
    let key = b"5:peers";
    let at = answer
        .windows(key.len())
        .position(|w| w == key)
        .with_context(|| format!("no peers in {:?}", String::from_utf8_lossy(answer)))?
        + key.len();
    let rest = &answer[at..];
    let colon = rest
        .iter()
        .position(|&b| b == b':')
        .context("bad peers length")?;
    let len: usize = std::str::from_utf8(&rest[..colon])?.parse()?;
    let list = rest
        .get(colon + 1..colon + 1 + len)
        .context("peers cut short")?;
    if !len.is_multiple_of(6) {
        bail!("peers list of {len} bytes is not compact");
    }
    Ok(list
        .chunks(6)
        .map(|c| {
            SocketAddrV4::new(
                Ipv4Addr::new(c[0], c[1], c[2], c[3]),
                u16::from_be_bytes([c[4], c[5]]),
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_peers_are_read_and_bad_lists_refused() {
        let answer =
            b"d8:intervali1800e5:peers12:\xf0\x00\x00\x02\x1a\xe1\xf0\x00\x00\x03\x1a\xe1e";
        assert_eq!(
            compact_peers(answer).unwrap(),
            [
                "240.0.0.2:6881".parse().unwrap(),
                "240.0.0.3:6881".parse().unwrap()
            ]
        );
        assert!(compact_peers(b"d5:peers5:abcdee").is_err());
        assert!(compact_peers(b"d5:peers99:abc").is_err());
        assert!(compact_peers(b"d14:failure reason3:note").is_err());
    }

    #[test]
    fn a_torrent_is_bencoded_with_the_info_hash_of_its_info() {
        let dir = std::env::temp_dir().join(format!("pvc-torrent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, vec![7u8; 5]).unwrap();
        let (t, hash) = torrent(&file, "http://x/a", 4).unwrap();
        let info = b"d6:lengthi5e4:name1:f12:piece lengthi4e6:pieces40:";
        assert!(t.starts_with(b"d8:announce10:http://x/a4:info"));
        let start = t.windows(info.len()).position(|w| w == info).unwrap();
        let info_bytes = &t[start..t.len() - 1];
        let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, info_bytes);
        assert_eq!(d.as_ref(), hash);
        assert_eq!(info_bytes.len(), info.len() + 40 + 1);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
