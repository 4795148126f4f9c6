//! The benchmark (paper §5, Figures 4 and 5): the bare network against
//! PVC, in the same run, on the same two hosts.
//!
//! Each host has two links to the same kind of bridge: `eth0` carries PVC
//! (its uplink, with the tc programs) and `eth1` carries nothing of PVC.
//! The bare path is real addresses over `eth1` from outside the hosts'
//! cgroups; the PVC path is virtual addresses from inside them. Every
//! measurement alternates the two paths (bare first on even repetitions,
//! PVC first on odd ones) so that machine noise hits both, and the report
//! gives medians and PVC/bare ratios.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use serde::Serialize;
use serde_json::Value;

use crate::{BROKER_PORT, Lab, Usage, bin, require_tools, wait_until};

/// How much to measure.
#[derive(Clone, Debug, Serialize)]
pub struct Options {
    /// Interleaved repetitions of each measurement, per path.
    pub reps: usize,
    /// Largest NetPIPE message, bytes.
    pub netpipe_upper: u32,
    /// NetPIPE repeats per message size (`-n`); `None` lets NetPIPE pick
    /// enough for a stable time per size.
    pub netpipe_repeats: Option<u32>,
    pub iperf_seconds: u32,
    /// Sequential connections per repetition, to an authenticated peer.
    pub connects: usize,
    /// First connections to a peer never talked to (one agent restart each).
    pub first_connects: usize,
    /// One-byte round trips per repetition over an open connection.
    pub round_trips: usize,
    /// Simulated agents on one broker, and their clusters.
    pub load_agents: usize,
    pub load_clusters: usize,
    pub load_seconds: u64,
}

impl Options {
    /// The benchmark of record (about 10 minutes on 2 cores, build included).
    pub fn full() -> Options {
        Options {
            reps: 3,
            netpipe_upper: 1 << 23,
            netpipe_repeats: None,
            iperf_seconds: 10,
            connects: 1000,
            first_connects: 50,
            round_trips: 5000,
            load_agents: 10_000,
            load_clusters: 100,
            load_seconds: 20,
        }
    }

    /// A short run of every part, so that the benchmark cannot rot.
    pub fn smoke() -> Options {
        Options {
            reps: 2,
            netpipe_upper: 4096,
            netpipe_repeats: Some(20),
            iperf_seconds: 2,
            connects: 50,
            first_connects: 2,
            round_trips: 100,
            load_agents: 300,
            load_clusters: 3,
            load_seconds: 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    Bare,
    Pvc,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Bare => "bare",
            Route::Pvc => "PVC",
        }
    }

    /// Both paths, the order alternating with the repetition.
    fn interleaved(rep: usize) -> [Route; 2] {
        if rep.is_multiple_of(2) {
            [Route::Bare, Route::Pvc]
        } else {
            [Route::Pvc, Route::Bare]
        }
    }
}

/// One NetPIPE point: message size, bandwidth, one-way latency.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Point {
    pub bytes: u64,
    pub mbps: f64,
    pub usec: f64,
}

/// Median over repetitions, per message size, for both paths.
#[derive(Clone, Debug, Serialize)]
pub struct Curve {
    pub bytes: u64,
    pub bare_mbps: f64,
    pub pvc_mbps: f64,
    pub bare_usec: f64,
    pub pvc_usec: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Spread {
    pub median: f64,
    pub p99: f64,
    pub samples: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        if values.is_empty() {
            return Spread::default();
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Spread {
            median: median(&v),
            p99: rank(0.99),
            samples: v.len(),
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Per-program cost from the kernel's own statistics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProgramCost {
    pub runs: u64,
    pub ns_per_run: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Throughput {
    pub bare_gbps: f64,
    pub pvc_gbps: f64,
    pub ratio: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcessCost {
    pub cpu_secs: f64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub options: Options,
    pub kernel: String,
    pub netpipe: Vec<Curve>,
    /// iperf3 bulk throughput, by direction ("a->b", "b->a").
    pub iperf: BTreeMap<String, Throughput>,
    /// connect() to an authenticated peer, microseconds.
    pub connect_bare_us: Spread,
    pub connect_pvc_us: Spread,
    /// connect() to a peer this host never talked to (PVC authenticates
    /// first); the bare path's counterpart has a cold neighbour cache.
    pub first_connect_bare_us: Spread,
    pub first_connect_pvc_us: Spread,
    /// A one-byte TCP round trip on an open connection, microseconds: the
    /// latency of the path with thousands of samples per run.
    pub round_trip_bare_us: Spread,
    pub round_trip_pvc_us: Spread,
    /// Per phase ("netpipe", "iperf3", "connect"), per program.
    pub programs: BTreeMap<String, BTreeMap<String, ProgramCost>>,
    /// A program that does nothing, on both ends of the bare path during
    /// iperf3 in both directions: what any tc program costs on this machine.
    pub empty_program: ProgramCost,
    /// Over every PVC run of the data-path phases.
    pub agents: BTreeMap<String, ProcessCost>,
    pub broker: ProcessCost,
    /// Bytes the PVC path carried during the data-path phases (both hosts).
    pub pvc_bytes: u64,
    pub broker_load: Value,
    pub seconds: f64,
}

struct Bench<'a> {
    lab: Lab,
    opts: &'a Options,
    port: u16,
}

const A: &str = "a";
const B: &str = "b";

impl Bench<'_> {
    fn addr(&self, host: &str, route: Route) -> Ipv4Addr {
        match route {
            Route::Bare => self.lab.bare_ip(host),
            Route::Pvc => self.lab.host(host).virtual_ip,
        }
    }

    /// A fresh port per server, so that no run waits for another's TIME_WAIT.
    fn next_port(&mut self) -> u16 {
        self.port += 1;
        self.port
    }

    fn spawn(
        &mut self,
        host: &str,
        route: Route,
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<crate::Spawned> {
        match route {
            Route::Bare => self.lab.spawn_outside(host, program, args),
            Route::Pvc => self.lab.spawn(host, program, args),
        }
    }

    fn command(
        &self,
        host: &str,
        route: Route,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> crate::Prepared {
        let h = self.lab.host(host);
        let cgroup = (route == Route::Pvc).then_some(h.cgroup.as_path());
        Lab::command_in(&h.netns, cgroup, program).expect("prepare command")
    }

    fn netpipe(&mut self, route: Route) -> anyhow::Result<Vec<Point>> {
        let port = self.next_port().to_string();
        self.spawn(B, route, "NPtcp", &["-P", &port])?;
        self.lab.wait_listening(B, port.parse()?)?;
        let out = self
            .lab
            .dir
            .join(format!("netpipe-{}-{port}.out", route.name()));
        let (dst, upper) = (
            self.addr(B, route).to_string(),
            self.opts.netpipe_upper.to_string(),
        );
        let out_s = out.display().to_string();
        let mut args = vec!["-h", &dst, "-P", &port, "-o", &out_s, "-u", &upper];
        let repeats = self.opts.netpipe_repeats.map(|n| n.to_string());
        if let Some(n) = &repeats {
            args.extend(["-n", n]);
        }
        let t = self.spawn(A, route, "NPtcp", &args)?;
        self.lab
            .wait(&t, Duration::from_secs(900))
            .with_context(|| format!("NetPIPE over the {} path did not finish", route.name()))?;
        let points = parse_netpipe(&fs::read_to_string(&out)?)?;
        ensure!(
            !points.is_empty(),
            "NetPIPE over the {} path wrote no results",
            route.name()
        );
        Ok(points)
    }

    /// Bulk throughput from `from` to `to`, Gbit/s.
    fn iperf(&mut self, route: Route, from: &str, to: &str) -> anyhow::Result<f64> {
        let port = self.next_port().to_string();
        self.spawn(to, route, "iperf3", &["-s", "-1", "-p", &port])?;
        self.lab.wait_listening(to, port.parse()?)?;
        let dst = self.addr(to, route).to_string();
        let secs = self.opts.iperf_seconds.to_string();
        // -O 1: the first second (slow start) is not counted.
        let out = self
            .command(from, route, "iperf3")
            .args(["-c", &dst, "-p", &port, "-t", &secs, "-O", "1", "-J"])
            .ok()
            .with_context(|| format!("iperf3 {from}->{to} over the {} path", route.name()))?;
        let v: Value = serde_json::from_str(&out)?;
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .ok_or_else(|| anyhow!("iperf3 reported no throughput: {out}"))?;
        Ok(bps / 1e9)
    }

    /// `sample` on both paths, interleaved, `reps` times; pooled per path.
    fn spreads(
        &mut self,
        mut sample: impl FnMut(&mut Self, Route) -> anyhow::Result<Vec<f64>>,
    ) -> anyhow::Result<(Spread, Spread)> {
        let (mut bare, mut pvc) = (Vec::new(), Vec::new());
        for rep in 0..self.opts.reps {
            for route in Route::interleaved(rep) {
                let values = sample(self, route)?;
                match route {
                    Route::Bare => bare.extend(values),
                    Route::Pvc => pvc.extend(values),
                }
            }
        }
        Ok((Spread::of(&bare), Spread::of(&pvc)))
    }

    /// Times `count` sequential connect()s from a to b's server at `port`.
    fn connects(&self, route: Route, port: u16, count: usize) -> anyhow::Result<Vec<f64>> {
        self.timed("connect", route, port, count)
    }

    /// Times `count` one-byte round trips from a to b's echo server.
    fn round_trips(&self, route: Route, port: u16, count: usize) -> anyhow::Result<Vec<f64>> {
        self.timed("rtt", route, port, count)
    }

    fn timed(&self, mode: &str, route: Route, port: u16, count: usize) -> anyhow::Result<Vec<f64>> {
        let out = self
            .command(A, route, bin("connect-bench"))
            .args([
                mode.to_string(),
                self.addr(B, route).to_string(),
                port.to_string(),
                count.to_string(),
            ])
            .ok()
            .with_context(|| format!("connect-bench {mode} over the {} path", route.name()))?;
        let v: Value = serde_json::from_str(out.trim())?;
        let us: Vec<f64> = v["us"]
            .as_array()
            .ok_or_else(|| anyhow!("connect-bench said: {out}"))?
            .iter()
            .filter_map(Value::as_f64)
            .collect();
        ensure!(
            us.len() == count,
            "connect-bench timed {} of {count}",
            us.len()
        );
        Ok(us)
    }

    fn programs(&self) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
        let mut total = BTreeMap::new();
        for h in [A, B] {
            let s = self.lab.status(h)?;
            let programs = s["programs"]
                .as_object()
                .ok_or_else(|| anyhow!("agent {h} reports no program statistics"))?;
            for (name, v) in programs {
                let (ns, runs) = (v[0].as_u64().unwrap_or(0), v[1].as_u64().unwrap_or(0));
                let e = total.entry(name.clone()).or_insert((0, 0));
                e.0 += ns;
                e.1 += runs;
            }
        }
        Ok(total)
    }

    fn pvc_bytes(&self) -> anyhow::Result<u64> {
        let mut bytes = 0;
        for h in [A, B] {
            let t = &self.lab.status(h)?["traffic"];
            bytes += t["egress_bytes"].as_u64().unwrap_or(0);
        }
        Ok(bytes)
    }

    /// Runs `phase` (bare against PVC) with the kernel's run-time statistics
    /// off, as users run PVC: they add two clock reads to every program run,
    /// which only the PVC path would pay. Then runs `pvc_sample`, one PVC
    /// run of the same work, with statistics on, for what each program
    /// spent per run.
    fn measured<T>(
        &mut self,
        name: &str,
        programs: &mut BTreeMap<String, BTreeMap<String, ProgramCost>>,
        phase: impl FnOnce(&mut Self) -> anyhow::Result<T>,
        pvc_sample: impl FnOnce(&mut Self) -> anyhow::Result<()>,
    ) -> anyhow::Result<T> {
        eprintln!("bench: {name}");
        let result = phase(self)?;
        let stats = enable_bpf_stats()?;
        let before = self.programs()?;
        pvc_sample(self)?;
        let after = self.programs()?;
        drop(stats);
        let costs = after
            .iter()
            .map(|(prog, &(ns, runs))| {
                let (ns0, runs0) = before.get(prog).copied().unwrap_or((0, 0));
                let runs = runs - runs0;
                let cost = ProgramCost {
                    runs,
                    ns_per_run: if runs == 0 {
                        0.0
                    } else {
                        (ns - ns0) as f64 / runs as f64
                    },
                };
                (prog.clone(), cost)
            })
            .collect();
        programs.insert(name.to_string(), costs);
        Ok(result)
    }
}

/// NetPIPE's output file: "bytes Mbps seconds" per line (one-way time).
pub fn parse_netpipe(text: &str) -> anyhow::Result<Vec<Point>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            ensure!(f.len() >= 3, "unexpected NetPIPE line: {l}");
            Ok(Point {
                bytes: f[0].parse()?,
                mbps: f[1].parse()?,
                usec: f[2].parse::<f64>()? * 1e6,
            })
        })
        .collect()
}

/// Medians per message size over repetitions, both paths side by side.
fn curves(bare: &[Vec<Point>], pvc: &[Vec<Point>]) -> Vec<Curve> {
    let mut by_size: BTreeMap<u64, [Vec<Point>; 2]> = BTreeMap::new();
    for (i, runs) in [bare, pvc].into_iter().enumerate() {
        for p in runs.iter().flatten() {
            by_size.entry(p.bytes).or_default()[i].push(*p);
        }
    }
    by_size
        .into_iter()
        .filter(|(_, [b, p])| !b.is_empty() && !p.is_empty())
        .map(|(bytes, [b, p])| {
            let m =
                |v: &[Point], f: fn(&Point) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
            Curve {
                bytes,
                bare_mbps: m(&b, |p| p.mbps),
                pvc_mbps: m(&p, |p| p.mbps),
                bare_usec: m(&b, |p| p.usec),
                pvc_usec: m(&p, |p| p.usec),
            }
        })
        .collect()
}

/// Enables the kernel's per-program run-time statistics for as long as the
/// returned descriptor is open (BPF_ENABLE_STATS, not the global sysctl).
fn enable_bpf_stats() -> anyhow::Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| {
        anyhow!("cannot enable eBPF run-time statistics (BPF_ENABLE_STATS, Linux 5.8+): {e}")
    })
}

/// Runs the whole benchmark and writes the report, the plots and the raw
/// numbers to `out`.
pub fn run(opts: &Options, out: &Path) -> anyhow::Result<Report> {
    require_tools(&["NPtcp", "iperf3", "ip", "nsenter"]);
    let started = Instant::now();
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    // Fail early, with the reason, on a kernel without BPF_ENABLE_STATS.
    drop(enable_bpf_stats()?);

    let mut lab = Lab::lan(2)?;
    lab.add_bare_lan()?;
    lab.start_all()?;
    let mut bench = Bench {
        lab,
        opts,
        port: 20000,
    };
    let mut programs = BTreeMap::new();

    // Servers for the connection measurements, one per path.
    let (bare_srv, pvc_srv) = (bench.next_port(), bench.next_port());
    let (bare_echo, pvc_echo) = (bench.next_port(), bench.next_port());
    let connect_bench = bin("connect-bench").display().to_string();
    for (route, mode, port) in [
        (Route::Bare, "serve", bare_srv),
        (Route::Pvc, "serve", pvc_srv),
        (Route::Bare, "echo", bare_echo),
        (Route::Pvc, "echo", pvc_echo),
    ] {
        bench.spawn(B, route, &connect_bench, &[mode, &port.to_string()])?;
        bench.lab.wait_listening(B, port)?;
    }
    // The first PVC connection authenticates the path; what follows is
    // measured against an authenticated peer.
    bench.connects(Route::Pvc, pvc_srv, 1)?;
    let vip_b = bench.lab.host(B).virtual_ip;
    wait_until(
        Duration::from_secs(10),
        "a's path to b authenticated",
        || bench.lab.authenticated(A, vip_b).then_some(()),
    )?;

    let pids = [A, B].map(|h| bench.lab.agent_pid(h).expect("agent running"));
    let broker_pid = bench.lab.broker_pid().expect("broker running");
    let usage0 = pids.map(Usage::of);
    let broker0 = Usage::of(broker_pid);
    let bytes0 = bench.pvc_bytes()?;

    let (bare_np, pvc_np) = bench.measured(
        "netpipe",
        &mut programs,
        |b| {
            let (mut bare, mut pvc) = (Vec::new(), Vec::new());
            for rep in 0..b.opts.reps {
                for route in Route::interleaved(rep) {
                    let points = b.netpipe(route)?;
                    match route {
                        Route::Bare => bare.push(points),
                        Route::Pvc => pvc.push(points),
                    }
                }
            }
            Ok((bare, pvc))
        },
        |b| b.netpipe(Route::Pvc).map(drop),
    )?;

    let iperf = bench.measured(
        "iperf3",
        &mut programs,
        |b| {
            let mut samples: BTreeMap<String, [Vec<f64>; 2]> = BTreeMap::new();
            for rep in 0..b.opts.reps {
                for (from, to) in [(A, B), (B, A)] {
                    for route in Route::interleaved(rep) {
                        let gbps = b.iperf(route, from, to)?;
                        let e = samples.entry(format!("{from}->{to}")).or_default();
                        e[(route == Route::Pvc) as usize].push(gbps);
                    }
                }
            }
            Ok(samples
                .into_iter()
                .map(|(dir, [bare, pvc])| {
                    let (bare_gbps, pvc_gbps) = (median(&bare), median(&pvc));
                    let ratio = pvc_gbps / bare_gbps;
                    (
                        dir,
                        Throughput {
                            bare_gbps,
                            pvc_gbps,
                            ratio,
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>())
        },
        |b| {
            for (from, to) in [(A, B), (B, A)] {
                b.iperf(Route::Pvc, from, to)?;
            }
            Ok(())
        },
    )?;

    let (connect_bare, connect_pvc) = bench.measured(
        "connect",
        &mut programs,
        |b| {
            b.spreads(|b, route| {
                let port = if route == Route::Pvc {
                    pvc_srv
                } else {
                    bare_srv
                };
                b.connects(route, port, b.opts.connects)
            })
        },
        |b| b.connects(Route::Pvc, pvc_srv, b.opts.connects).map(drop),
    )?;

    let (round_trip_bare, round_trip_pvc) = bench.measured(
        "round trip",
        &mut programs,
        |b| {
            b.spreads(|b, route| {
                let port = if route == Route::Pvc {
                    pvc_echo
                } else {
                    bare_echo
                };
                b.round_trips(route, port, b.opts.round_trips)
            })
        },
        |b| {
            b.round_trips(Route::Pvc, pvc_echo, b.opts.round_trips)
                .map(drop)
        },
    )?;

    let pvc_bytes = bench.pvc_bytes()? - bytes0;
    let agents = [A, B]
        .iter()
        .zip(pids.iter().zip(usage0))
        .map(|(h, (&pid, u0))| (format!("agent {h}"), cost(u0, Usage::of(pid))))
        .collect();
    let broker = cost(broker0, Usage::of(broker_pid));

    eprintln!("bench: an empty eBPF program on the bare path");
    let empty_program = {
        let _stats = enable_bpf_stats()?;
        floor::measure(&mut bench)?
    };

    eprintln!("bench: first connections");
    let (mut first_bare, mut first_pvc) = (Vec::new(), Vec::new());
    for rep in 0..opts.first_connects {
        for route in Route::interleaved(rep) {
            match route {
                Route::Bare => {
                    // A cold neighbour cache: the bare path's first contact.
                    let ns = bench.lab.host(A).netns.clone();
                    bench
                        .lab
                        .ns(&ns, "ip")
                        .args(["neigh", "flush", "dev", "eth1"])
                        .ok()?;
                    first_bare.extend(bench.connects(route, bare_srv, 1)?);
                }
                Route::Pvc => {
                    forget_peer(&mut bench.lab)?;
                    first_pvc.extend(bench.connects(route, pvc_srv, 1)?);
                    ensure!(
                        bench.lab.authenticated(A, vip_b),
                        "a connected to b without authenticating the path"
                    );
                }
            }
        }
    }

    eprintln!("bench: broker with {} simulated agents", opts.load_agents);
    let broker_load = broker_load(&mut bench.lab, opts)?;

    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let report = Report {
        options: opts.clone(),
        kernel,
        netpipe: curves(&bare_np, &pvc_np),
        iperf,
        connect_bare_us: connect_bare,
        connect_pvc_us: connect_pvc,
        first_connect_bare_us: Spread::of(&first_bare),
        first_connect_pvc_us: Spread::of(&first_pvc),
        round_trip_bare_us: round_trip_bare,
        round_trip_pvc_us: round_trip_pvc,
        programs,
        empty_program,
        agents,
        broker,
        pvc_bytes,
        broker_load,
        seconds: started.elapsed().as_secs_f64(),
    };
    drop(bench);
    write(&report, &bare_np, &pvc_np, out)?;
    Ok(report)
}

fn cost(before: Usage, after: Usage) -> ProcessCost {
    ProcessCost {
        cpu_secs: (after.cpu.saturating_sub(before.cpu)).as_secs_f64(),
        rss_kib: after.rss_kib,
        peak_rss_kib: after.peak_rss_kib,
    }
}

/// Makes a's next connection to b a first one: a clean restart of a's
/// agent ends its sessions (b is told a left), so the path must be
/// authenticated again.
fn forget_peer(lab: &mut Lab) -> anyhow::Result<()> {
    lab.stop_agent(A)?;
    lab.wait_for_peers(B, 0)?;
    lab.start_agent(A)?;
    lab.wait_for_peers(A, 1)?;
    lab.wait_for_peers(B, 1)?;
    ensure!(
        !lab.authenticated(A, lab.host(B).virtual_ip),
        "a restarted agent still had an authenticated path to b"
    );
    Ok(())
}

/// A separate broker under `load_agents` simulated agents.
fn broker_load(lab: &mut Lab, opts: &Options) -> anyhow::Result<Value> {
    let port = BROKER_PORT + 100;
    let pid = lab.start_extra_broker(port)?;
    let out = lab
        .in_broker_netns(bin("broker-load"))
        .args([
            "--broker".to_string(),
            format!("{}:{port}", crate::BROKER_IP),
            "--agents".into(),
            opts.load_agents.to_string(),
            "--clusters".into(),
            opts.load_clusters.to_string(),
            "--seconds".into(),
            opts.load_seconds.to_string(),
            "--broker-pid".into(),
            pid.to_string(),
        ])
        .ok()
        .context("broker load")?;
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("broker-load said: {out}"))?;
    ensure!(
        v["registered"].as_u64() == Some(opts.load_agents as u64),
        "not every simulated agent registered: {v}"
    );
    Ok(v)
}

/// The floor under the programs' cost: a tc program that returns at once,
/// measured like PVC's (kernel run-time statistics) under the same bulk
/// traffic. What it costs, dispatch, the statistics' own clock reads and
/// cold caches between packets, every tc program pays on this machine.
mod floor {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

    use super::*;

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

    /// The head of `union bpf_attr` for BPF_PROG_LOAD (the kernel takes a
    /// shorter attribute and treats the rest as zero).
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
    }

    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }

    /// `r0 = TC_ACT_OK; exit`, pinned at `pin` for tc to attach.
    struct Empty {
        pin: PathBuf,
        _fd: OwnedFd,
    }

    impl Empty {
        fn load(pin: PathBuf) -> anyhow::Result<Empty> {
            let insns: [u64; 2] = [0xb7, 0x95];
            let license = c"GPL";
            let mut prog_name = [0u8; 16];
            prog_name[..9].copy_from_slice(b"pvc_empty");
            let attr = ProgLoad {
                prog_type: BPF_PROG_TYPE_SCHED_CLS,
                insn_cnt: insns.len() as u32,
                insns: insns.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level: 0,
                log_size: 0,
                log_buf: 0,
                kern_version: 0,
                prog_flags: 0,
                prog_name,
            };
            // SAFETY: the attribute points at live memory for the call.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_PROG_LOAD,
                    &attr as *const ProgLoad,
                    size_of::<ProgLoad>(),
                )
            };
            if fd < 0 {
                bail!(
                    "cannot load an empty tc program: {}",
                    std::io::Error::last_os_error()
                );
            }
            // SAFETY: the kernel just returned this descriptor to us.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())?;
            let attr = ObjPin {
                pathname: path.as_ptr() as u64,
                bpf_fd: fd.as_raw_fd() as u32,
                file_flags: 0,
            };
            // SAFETY: as above.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_OBJ_PIN,
                    &attr as *const ObjPin,
                    size_of::<ObjPin>(),
                )
            };
            if r != 0 {
                bail!(
                    "cannot pin {}: {}",
                    pin.display(),
                    std::io::Error::last_os_error()
                );
            }
            Ok(Empty { pin, _fd: fd })
        }

        fn stats(&self) -> anyhow::Result<(u64, u64)> {
            let info = aya::programs::ProgramInfo::from_pin(&self.pin)
                .with_context(|| format!("cannot read {}", self.pin.display()))?;
            Ok((info.run_time().as_nanos() as u64, info.run_count()))
        }
    }

    impl Drop for Empty {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.pin);
        }
    }

    fn tc(lab: &Lab, host: &str, args: &[&str]) -> anyhow::Result<()> {
        let h = lab.host(host);
        Lab::command_in(&h.netns, None, "tc")?.args(args).ok()?;
        Ok(())
    }

    /// Attaches the empty program to both directions of both hosts' bare
    /// link, runs iperf3 both ways over it, and detaches it again.
    pub fn measure(b: &mut Bench) -> anyhow::Result<ProgramCost> {
        let pin = Path::new("/sys/fs/bpf").join(format!("{}-empty", b.lab.prefix));
        let empty = Empty::load(pin)?;
        let pin = empty.pin.display().to_string();
        let attach = |lab: &Lab| -> anyhow::Result<()> {
            for h in [A, B] {
                tc(lab, h, &["qdisc", "add", "dev", "eth1", "clsact"])?;
                for dir in ["ingress", "egress"] {
                    tc(
                        lab,
                        h,
                        &[
                            "filter",
                            "add",
                            "dev",
                            "eth1",
                            dir,
                            "bpf",
                            "direct-action",
                            "object-pinned",
                            &pin,
                        ],
                    )?;
                }
            }
            Ok(())
        };
        let result = attach(&b.lab).and_then(|()| {
            let before = empty.stats()?;
            for (from, to) in [(A, B), (B, A)] {
                b.iperf(Route::Bare, from, to)?;
            }
            let after = empty.stats()?;
            let runs = after.1 - before.1;
            ensure!(
                runs > 0,
                "the empty program never ran: is it attached to eth1?"
            );
            Ok(ProgramCost {
                runs,
                ns_per_run: (after.0 - before.0) as f64 / runs as f64,
            })
        });
        for h in [A, B] {
            // Removing clsact detaches the filters.
            let _ = tc(&b.lab, h, &["qdisc", "del", "dev", "eth1", "clsact"]);
        }
        result
    }
}

/// Whether a measured value meets its target, and by how much it misses.
struct Target {
    name: &'static str,
    measured: String,
    met: bool,
    miss: String,
}

/// NetPIPE messages from this size on are bandwidth-bound.
const NETPIPE_LARGE: u64 = 64 * 1024;

fn targets(r: &Report) -> Vec<Target> {
    let mut t = Vec::new();
    let worst_iperf = r
        .iperf
        .values()
        .map(|x| x.ratio)
        .fold(f64::INFINITY, f64::min);
    let peak = |f: fn(&Curve) -> f64| r.netpipe.iter().map(f).fold(0.0, f64::max);
    let np_ratio = peak(|c| c.pvc_mbps) / peak(|c| c.bare_mbps);
    // One peak is one noisy point: the bandwidth-bound sizes, all together,
    // say more.
    let large = median(
        &r.netpipe
            .iter()
            .filter(|c| c.bytes >= NETPIPE_LARGE)
            .map(|c| c.pvc_mbps / c.bare_mbps)
            .collect::<Vec<_>>(),
    );
    // NaN (no message that large, in a short run) leaves `min` unchanged.
    let worst = worst_iperf.min(np_ratio).min(large);
    let large_text = if large.is_nan() {
        String::new()
    } else {
        format!(", messages >= 64 KiB {:.1}% (median)", large * 100.0)
    };
    t.push(Target {
        name: "throughput >= 99% of bare",
        measured: format!(
            "iperf3 {}; NetPIPE peak {:.1}%{large_text}",
            r.iperf
                .iter()
                .map(|(d, x)| format!("{d} {:.1}%", x.ratio * 100.0))
                .collect::<Vec<_>>()
                .join(", "),
            np_ratio * 100.0
        ),
        met: worst >= 0.99,
        miss: format!("{:.1} points", (0.99 - worst) * 100.0),
    });
    // Latency: the small messages, where latency is what NetPIPE measures.
    let small: Vec<f64> = r
        .netpipe
        .iter()
        .filter(|c| c.bytes <= 64)
        .map(|c| c.pvc_usec / c.bare_usec - 1.0)
        .collect();
    let netpipe_overhead = median(&small);
    // Judged on the round trips: thousands of samples per run, where
    // NetPIPE has a few per message size and swings by tens of percent
    // between runs on a noisy machine.
    let overhead = r.round_trip_pvc_us.median / r.round_trip_bare_us.median - 1.0;
    t.push(Target {
        name: "latency overhead <= 2%",
        measured: format!(
            "{:+.1}% (1-byte TCP round trip, median of {}); NetPIPE messages <= 64 B: {:+.1}% (median)",
            overhead * 100.0,
            r.round_trip_pvc_us.samples,
            netpipe_overhead * 100.0
        ),
        met: overhead <= 0.02,
        miss: format!("{:.1} points", (overhead - 0.02) * 100.0),
    });
    // Per packet: the tc programs, in every phase. connect4 runs once per
    // connect(), not per packet: it is reported with connection setup.
    let mut worst_ns: f64 = 0.0;
    let mut parts = Vec::new();
    for (phase, progs) in &r.programs {
        for (name, c) in progs {
            if c.runs > 0 && name != "pvc_connect4" {
                parts.push(format!("{name} {:.0} ns ({phase})", c.ns_per_run));
                worst_ns = worst_ns.max(c.ns_per_run);
            }
        }
    }
    parts.push(format!(
        "an empty program on this machine: {:.0} ns",
        r.empty_program.ns_per_run
    ));
    t.push(Target {
        name: "<= 60 ns per packet per program",
        measured: parts.join(", "),
        met: worst_ns <= 60.0,
        miss: format!("{:.0} ns", worst_ns - 60.0),
    });
    let added = r.connect_pvc_us.median - r.connect_bare_us.median;
    let connect4 = r
        .programs
        .get("connect")
        .and_then(|p| p.get("pvc_connect4"))
        .map_or(0.0, |c| c.ns_per_run);
    t.push(Target {
        name: "connect() to an authenticated peer adds <= 1 ms",
        measured: format!(
            "{added:+.1} µs (median; of which pvc_connect4 {connect4:.0} ns per connect())"
        ),
        met: added <= 1000.0,
        miss: format!("{:.1} µs", added - 1000.0),
    });
    t
}

/// The markdown report.
pub fn markdown(r: &Report) -> String {
    let mut m = String::new();
    let _ = writeln!(m, "# PVC benchmark: bare network against PVC\n");
    let _ = writeln!(
        m,
        "Two hosts in network namespaces on veth links to a bridge; Linux {}. \
         Bare: real addresses over a second link without PVC. PVC: virtual addresses over \
         the uplink with PVC's eBPF programs. {} interleaved repetitions per path; medians. \
         Took {:.0} s.\n",
        r.kernel, r.options.reps, r.seconds
    );
    let _ = writeln!(
        m,
        "## Targets\n\n| target | measured | result |\n|---|---|---|"
    );
    for t in targets(r) {
        let result = if t.met {
            "met".to_string()
        } else {
            format!("**missed** by {}", t.miss)
        };
        let _ = writeln!(m, "| {} | {} | {} |", t.name, t.measured, result);
    }
    let _ = writeln!(
        m,
        "\n## Bulk throughput (iperf3, {} s)\n\n| direction | bare Gbit/s | PVC Gbit/s | PVC/bare |\n|---|---|---|---|",
        r.options.iperf_seconds
    );
    for (dir, x) in &r.iperf {
        let _ = writeln!(
            m,
            "| {dir} | {:.2} | {:.2} | {:.3} |",
            x.bare_gbps, x.pvc_gbps, x.ratio
        );
    }
    let _ = writeln!(
        m,
        "\n## NetPIPE (NPtcp), bandwidth and one-way latency by message size\n\n\
         ![bandwidth](bandwidth.png) ![latency](latency.png)\n\n\
         NPtcp sets its own socket buffers (16 KiB send, 128 KiB receive, doubled by Linux), \
         so large messages are window-bound: every packet's cost on the path, PVC's programs \
         included, shows in their bandwidth, unlike iperf3's autotuned buffers.\n\n\
         | bytes | bare Mbit/s | PVC Mbit/s | PVC/bare | bare µs | PVC µs | PVC/bare |\n|---|---|---|---|---|---|---|"
    );
    for c in &r.netpipe {
        let _ = writeln!(
            m,
            "| {} | {:.1} | {:.1} | {:.3} | {:.2} | {:.2} | {:.3} |",
            c.bytes,
            c.bare_mbps,
            c.pvc_mbps,
            c.pvc_mbps / c.bare_mbps,
            c.bare_usec,
            c.pvc_usec,
            c.pvc_usec / c.bare_usec
        );
    }
    let _ = writeln!(
        m,
        "\n## Connection setup (connect() until established, µs)\n\n| case | bare median | bare p99 | PVC median | PVC p99 | samples |\n|---|---|---|---|---|---|"
    );
    for (case, b, p) in [
        ("authenticated peer", &r.connect_bare_us, &r.connect_pvc_us),
        (
            "first connection (PVC authenticates first)",
            &r.first_connect_bare_us,
            &r.first_connect_pvc_us,
        ),
    ] {
        let _ = writeln!(
            m,
            "| {case} | {:.0} | {:.0} | {:.0} | {:.0} | {} / {} |",
            b.median, b.p99, p.median, p.p99, b.samples, p.samples
        );
    }
    let (b, p) = (&r.round_trip_bare_us, &r.round_trip_pvc_us);
    let _ = writeln!(
        m,
        "\n## Round trip (one byte each way on an open TCP connection, µs)\n\n\
         | bare median | bare p99 | PVC median | PVC p99 | PVC/bare (median) | samples |\n|---|---|---|---|---|---|\n\
         | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {} / {} |",
        b.median,
        b.p99,
        p.median,
        p.p99,
        p.median / b.median,
        b.samples,
        p.samples
    );
    let _ = writeln!(
        m,
        "\n## eBPF programs (kernel run-time statistics, both hosts)\n\n\
         Statistics add two clock reads to every program run, so the comparisons above ran \
         without them; these come from one more PVC run of each phase, with them on.\n\n\
         | phase | program | runs | ns per run | above the empty program |\n|---|---|---|---|---|"
    );
    for (phase, progs) in &r.programs {
        for (name, c) in progs {
            let _ = writeln!(
                m,
                "| {phase} | {name} | {} | {:.0} | {:.0} |",
                c.runs,
                c.ns_per_run,
                c.ns_per_run - r.empty_program.ns_per_run
            );
        }
    }
    let _ = writeln!(
        m,
        "| iperf3, bare path | an empty program (the floor: dispatch, statistics, cold caches) | {} | {:.0} | 0 |",
        r.empty_program.runs, r.empty_program.ns_per_run
    );
    let _ = writeln!(
        m,
        "\n## Agents and broker during the data-path phases\n\nPVC carried {:.2} GiB.\n\n| process | CPU s | RSS MiB | peak RSS MiB |\n|---|---|---|---|",
        r.pvc_bytes as f64 / (1u64 << 30) as f64
    );
    for (name, c) in r.agents.iter().chain([(&"broker".to_string(), &r.broker)]) {
        let _ = writeln!(
            m,
            "| {name} | {:.3} | {:.1} | {:.1} |",
            c.cpu_secs,
            c.rss_kib as f64 / 1024.0,
            c.peak_rss_kib as f64 / 1024.0
        );
    }
    let l = &r.broker_load;
    let f = |k: &str| l[k].as_f64().unwrap_or(f64::NAN);
    let agents = f("agents");
    let _ = writeln!(
        m,
        "\n## Broker under load\n\n{agents:.0} simulated agents in {} clusters, each with its own host key, \
         registered over TCP in {:.1} s (at most 256 registering at once); then each sends a ping and a \
         200-byte relay to another member every second for {:.0} s.\n\n\
         | measure | value |\n|---|---|\n\
         | messages received by the broker per second | {:.0} |\n\
         | messages sent by the broker per second | {:.0} |\n\
         | broker CPU, registration | {:.2} s |\n\
         | broker CPU, steady state | {:.2} s ({:.1}% of a core) |\n\
         | broker RSS idle / loaded / peak | {:.1} / {:.1} / {:.1} MiB |\n\
         | memory per connected agent | {:.1} KiB |",
        l["clusters"],
        f("register_secs"),
        f("steady_secs"),
        f("sent_per_sec"),
        f("received_per_sec"),
        f("broker_cpu_register_secs"),
        f("broker_cpu_steady_secs"),
        f("broker_cpu_steady_secs") / f("steady_secs") * 100.0,
        f("broker_rss_idle_kib") / 1024.0,
        f("broker_rss_loaded_kib") / 1024.0,
        f("broker_peak_rss_kib") / 1024.0,
        (f("broker_rss_loaded_kib") - f("broker_rss_idle_kib")) / agents,
    );
    m
}

fn write(r: &Report, bare: &[Vec<Point>], pvc: &[Vec<Point>], out: &Path) -> anyhow::Result<()> {
    fs::write(
        out.join("bench.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "report": r,
            "raw_netpipe": { "bare": bare, "pvc": pvc },
        }))?,
    )?;
    fs::write(out.join("bench.md"), markdown(r))?;
    plot::figures(&r.netpipe, out)
}

/// The figures, drawn like the paper's Figures 4 and 5.
mod plot {
    use plotters::prelude::*;

    use super::*;

    const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

    fn register_font() -> anyhow::Result<()> {
        static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
        if DONE.get().is_some() {
            return Ok(());
        }
        let bytes = fs::read(FONT)
            .with_context(|| format!("cannot read {FONT}: run ./setup.sh (fonts-dejavu-core)"))?;
        plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            Box::leak(bytes.into_boxed_slice()),
        )
        .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
        let _ = DONE.set(());
        Ok(())
    }

    pub fn figures(curves: &[Curve], out: &Path) -> anyhow::Result<()> {
        if curves.is_empty() {
            bail!("no NetPIPE results to plot");
        }
        register_font()?;
        figure(
            curves,
            &out.join("bandwidth.png"),
            "Bandwidth (NetPIPE)",
            "bandwidth (Mbit/s)",
            false,
            |c| (c.bare_mbps, c.pvc_mbps),
        )?;
        figure(
            curves,
            &out.join("latency.png"),
            "Latency (NetPIPE, one way)",
            "latency (µs)",
            true,
            |c| (c.bare_usec, c.pvc_usec),
        )
    }

    fn figure(
        curves: &[Curve],
        path: &PathBuf,
        title: &str,
        y_desc: &str,
        log_y: bool,
        value: fn(&Curve) -> (f64, f64),
    ) -> anyhow::Result<()> {
        let root = BitMapBackend::new(path, (960, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(draw)?;
        let x_max = curves.last().map_or(2.0, |c| c.bytes as f64 * 1.5);
        let (lo, hi) = curves.iter().fold((f64::INFINITY, 0f64), |(lo, hi), c| {
            let (b, p) = value(c);
            (lo.min(b).min(p), hi.max(b).max(p))
        });
        let mut chart = ChartBuilder::on(&root);
        chart
            .caption(title, ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(80);
        let series = |c: &Curve, pvc: bool| {
            let (b, p) = value(c);
            (c.bytes as f64, if pvc { p } else { b })
        };
        macro_rules! draw_chart {
            ($chart:expr) => {{
                let mut chart = $chart;
                chart
                    .configure_mesh()
                    .x_desc("message size (bytes)")
                    .y_desc(y_desc)
                    .label_style(("sans-serif", 15))
                    .draw()
                    .map_err(draw)?;
                for (pvc, color, name) in [(false, BLUE, "bare network"), (true, RED, "PVC")] {
                    let points: Vec<(f64, f64)> = curves.iter().map(|c| series(c, pvc)).collect();
                    chart
                        .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                        .map_err(draw)?
                        .label(name)
                        .legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
                        });
                    chart
                        .draw_series(
                            points
                                .into_iter()
                                .map(|p| Circle::new(p, 3, color.filled())),
                        )
                        .map_err(draw)?;
                }
                chart
                    .configure_series_labels()
                    .position(SeriesLabelPosition::UpperLeft)
                    .label_font(("sans-serif", 16))
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()
                    .map_err(draw)?;
            }};
        }
        if log_y {
            draw_chart!(
                chart
                    .build_cartesian_2d(
                        (1f64..x_max).log_scale(),
                        (lo * 0.8..hi * 1.25).log_scale()
                    )
                    .map_err(draw)?
            );
        } else {
            draw_chart!(
                chart
                    .build_cartesian_2d((1f64..x_max).log_scale(), 0f64..hi * 1.1)
                    .map_err(draw)?
            );
        }
        root.present().map_err(draw)?;
        Ok(())
    }

    fn draw(e: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("cannot draw the figure: {e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netpipe_output_parses() {
        let p =
            parse_netpipe("       1 0.119065   0.00006408\n 1048576 24379.951501   0.00032814\n")
                .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].bytes, 1 << 20);
        assert!((p[0].usec - 64.08).abs() < 1e-6);
        assert!(parse_netpipe("garbage\n").is_err());
    }

    #[test]
    fn spread_is_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = Spread::of(&v);
        assert_eq!(s.median, 50.5);
        assert_eq!(s.p99, 99.0);
        assert_eq!(Spread::of(&[3.0]).p99, 3.0);
    }
}
