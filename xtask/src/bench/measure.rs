//! Measuring: the lab of two hosts with a bare and a PVC link, every
//! measurement interleaved between the paths, the kernel's per-program
//! statistics, agents' and brokers' costs.

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, ensure};
pub(super) use pvc_lab::grid::Route;
use pvc_lab::{BROKER_PORT, Lab, Usage, bin, require_tools, wait_until};
use serde::Serialize;
use serde_json::Value;

use super::{
    floor,
    report::{Point, ProcessCost, ProgramCost, Report, Spread, Throughput, curves, median, write},
};

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
    /// CPU per byte: the fixed rate, ms per block, quartets of blocks (bare,
    /// PVC, PVC, bare: one pair of values each).
    pub cpu_rate_mbit: u32,
    pub cpu_block_ms: u64,
    pub cpu_pairs: usize,
    /// Round trips in paired blocks: blocks per path, round trips per block.
    pub rtt_blocks: usize,
    pub rtt_block: usize,
    /// File distribution: node counts, file size, every host's uplink.
    pub distribution_nodes: Vec<usize>,
    pub distribution_mib: usize,
    pub uplink_mbit: u32,
}

impl Options {
    /// The benchmark of record (about 40 minutes on 2 cores, build included).
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
            // 60% of CPU 0 on the bare path: below saturation, and a
            // quartet's noise is 8-11% here against 13-20% at 2 Gbit/s.
            cpu_rate_mbit: 4000,
            cpu_block_ms: 100,
            cpu_pairs: 1500,
            rtt_blocks: 30,
            rtt_block: 2000,
            distribution_nodes: vec![1, 2, 4, 6],
            distribution_mib: 24,
            uplink_mbit: 100,
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
            cpu_rate_mbit: 500,
            cpu_block_ms: 50,
            cpu_pairs: 3,
            rtt_blocks: 2,
            rtt_block: 100,
            distribution_nodes: vec![2],
            distribution_mib: 2,
            uplink_mbit: 200,
        }
    }
}

pub(super) struct Bench<'a> {
    pub lab: Lab,
    pub(super) opts: &'a Options,
    port: u16,
    /// Per phase, per program: ns per run as Prometheus, scraping the
    /// agents' metrics, saw it over the same PVC run.
    prometheus: BTreeMap<String, BTreeMap<String, f64>>,
}

/// Long enough for Prometheus (1 s scrapes) to have scraped a quiet moment.
const SCRAPE_SETTLE: Duration = Duration::from_millis(2500);

/// Unix time, seconds, as Prometheus' API takes it.
fn unix_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// Round trips run with the client and the echo servers on one CPU: left
/// to the scheduler, a block of them took 17 µs per round trip or 55 µs
/// (client and server on different vCPUs, woken by IPIs), flipping every
/// tenth of a second, which drowned a difference of a few percent.
const PINNED: [&str; 3] = ["taskset", "-c", "0"];

pub(super) const A: &str = "a";
pub(super) const B: &str = "b";

impl<'a> Bench<'a> {
    /// Two hosts with a bare and a PVC link, agents running, Prometheus
    /// scraping them.
    pub(super) fn new(opts: &'a Options) -> anyhow::Result<Bench<'a>> {
        let mut lab = Lab::lan(2)?;
        lab.add_bare_lan()?;
        lab.start_all()?;
        lab.start_prometheus()?;
        Ok(Bench {
            lab,
            opts,
            port: 20000,
            prometheus: BTreeMap::new(),
        })
    }

    /// connect-bench servers in `mode` ("serve", "echo", "sink") on b, one per path
    /// (bare, PVC); the PVC one is reached once, which authenticates the
    /// path: what follows is measured against an authenticated peer.
    pub(super) fn servers(&mut self, mode: &str) -> anyhow::Result<(u16, u16)> {
        let (bare, pvc) = (self.next_port(), self.next_port());
        let connect_bench = bin("connect-bench").display().to_string();
        for (route, port) in [(Route::Bare, bare), (Route::Pvc, pvc)] {
            let port_s = port.to_string();
            let mut args = vec![connect_bench.as_str(), mode, &port_s];
            if mode == "echo" || mode == "sink" {
                args.splice(0..0, PINNED);
            }
            let program = args.remove(0);
            self.spawn(B, route, program, &args)?;
            self.lab.wait_listening(B, port)?;
        }
        let probe = if mode == "echo" { "rtt" } else { "connect" };
        self.timed(probe, Route::Pvc, pvc, 1)?;
        let vip_b = self.lab.host(B).virtual_ip;
        wait_until(
            Duration::from_secs(10),
            "a's path to b authenticated",
            || self.lab.authenticated(A, vip_b).then_some(()),
        )?;
        Ok((bare, pvc))
    }

    pub(super) fn addr(&self, host: &str, route: Route) -> Ipv4Addr {
        route.addr(&self.lab, host)
    }

    /// A fresh port per server, so that no run waits for another's TIME_WAIT.
    pub(super) fn next_port(&mut self) -> u16 {
        self.port += 1;
        self.port
    }

    pub(super) fn spawn(
        &mut self,
        host: &str,
        route: Route,
        program: &str,
        args: &[&str],
    ) -> anyhow::Result<pvc_lab::Spawned> {
        route.spawn(&mut self.lab, host, program, args)
    }

    pub(super) fn command(
        &self,
        host: &str,
        route: Route,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> pvc_lab::Prepared {
        route.command(&self.lab, host, program)
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
    pub(super) fn iperf(&mut self, route: Route, from: &str, to: &str) -> anyhow::Result<f64> {
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
        iperf_gbps(&out)
    }

    /// `run(from, to)` from a to b, then from b to a.
    pub(super) fn both_ways(
        &mut self,
        mut run: impl FnMut(&mut Self, &str, &str) -> anyhow::Result<f64>,
    ) -> anyhow::Result<()> {
        for (from, to) in [(A, B), (B, A)] {
            run(self, from, to)?;
        }
        Ok(())
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
    pub(super) fn round_trips(
        &self,
        route: Route,
        port: u16,
        count: usize,
    ) -> anyhow::Result<Vec<f64>> {
        self.timed("rtt", route, port, count)
    }

    fn timed(&self, mode: &str, route: Route, port: u16, count: usize) -> anyhow::Result<Vec<f64>> {
        let out = self
            .round_trip_client(route, mode == "rtt")
            .args([
                mode.to_string(),
                self.addr(B, route).to_string(),
                port.to_string(),
                count.to_string(),
            ])
            .ok()
            .with_context(|| format!("connect-bench {mode} over the {} path", route.name()))?;
        connect_bench_us(&out, count)
    }

    /// connect-bench on a; for round trips pinned to the CPU the echo
    /// servers run on (`PINNED`).
    pub(super) fn round_trip_client(&self, route: Route, pinned: bool) -> pvc_lab::Prepared {
        if pinned {
            self.command(A, route, PINNED[0])
                .args(&PINNED[1..])
                .args([bin("connect-bench")])
        } else {
            self.command(A, route, bin("connect-bench"))
        }
    }

    pub(super) fn programs(&self) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
        program_totals(&self.lab, &[A, B])
    }

    /// The agents' program totals (ns, runs) as Prometheus held them at
    /// `at`, summed over both agents.
    fn prometheus_programs(&self, at: f64) -> anyhow::Result<BTreeMap<String, (f64, f64)>> {
        let mut totals: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for (metric, slot) in [
            ("pvc_program_run_time_nanoseconds_total", 0),
            ("pvc_program_runs_total", 1),
        ] {
            let v = self.lab.prometheus_query(
                &format!("sum by (program) ({metric}{{job=\"pvc-agent\"}})"),
                Some(at),
            )?;
            let results = pvc_lab::prometheus::series(&v);
            for r in results {
                let program = r["metric"]["program"].as_str().unwrap_or("").to_string();
                let value = pvc_lab::prometheus::value(r).unwrap_or(0.0);
                let e = totals.entry(program).or_default();
                if slot == 0 {
                    e.0 = value;
                } else {
                    e.1 = value;
                }
            }
        }
        Ok(totals)
    }

    /// Bytes PVC's uplinks (eth0) sent so far, both hosts: what the PVC
    /// path carried, whether its flows were masqueraded per packet or
    /// translated at the socket (only the former show in the agents'
    /// masquerading counters).
    fn pvc_bytes(&self) -> anyhow::Result<u64> {
        let mut bytes = 0;
        for h in [A, B] {
            let netns = self.lab.host(h).netns.clone();
            let out = self
                .lab
                .ns(&netns, "ip")
                .args(["-s", "-j", "link", "show", "dev", "eth0"])
                .ok()?;
            let v: Value = serde_json::from_str(&out)?;
            bytes += v[0]["stats64"]["tx"]["bytes"]
                .as_u64()
                .ok_or_else(|| anyhow!("no byte counters for {h}'s eth0: {out}"))?;
        }
        Ok(bytes)
    }

    /// Runs `phase` (bare against PVC) with the kernel's run-time statistics
    /// off, as users run PVC: they add two clock reads to every program run,
    /// which only the PVC path would pay. Then runs `pvc_sample`, one PVC
    /// run of the same work, with statistics on, for what each program
    /// spent per run.
    pub(super) fn measured<T>(
        &mut self,
        name: &str,
        programs: &mut BTreeMap<String, BTreeMap<String, ProgramCost>>,
        phase: impl FnOnce(&mut Self) -> anyhow::Result<T>,
        mut pvc_sample: impl FnMut(&mut Self) -> anyhow::Result<()>,
    ) -> anyhow::Result<T> {
        eprintln!("bench: {name}");
        let result = phase(self)?;
        let stats = enable_bpf_stats()?;
        // Prometheus scrapes a quiet moment on either side of the sample.
        std::thread::sleep(SCRAPE_SETTLE);
        let from = unix_secs();
        let before = self.programs()?;
        pvc_sample(self)?;
        let after = self.programs()?;
        // Prometheus's window ends here too: the floor's run below is the
        // same work again, and PVC's programs run in it as well, at another
        // cost (a second run of a noisy machine), which would weigh in.
        std::thread::sleep(SCRAPE_SETTLE);
        let to = unix_secs();
        // The floor, over the same work again.
        let beside = floor::Beside::attach(&self.lab, &[A, B])?;
        pvc_sample(self)?;
        let floor = beside.cost()?;
        drop(beside);
        let (p0, p1) = (
            self.prometheus_programs(from)?,
            self.prometheus_programs(to)?,
        );
        drop(stats);
        let seen = p1
            .iter()
            .filter_map(|(prog, &(ns, runs))| {
                let (ns0, runs0) = p0.get(prog).copied().unwrap_or((0.0, 0.0));
                (runs > runs0).then(|| (prog.clone(), (ns - ns0) / (runs - runs0)))
            })
            .collect();
        self.prometheus.insert(name.to_string(), seen);
        let mut costs = program_costs(&before, &after);
        costs.insert(floor::BESIDE.to_string(), floor);
        programs.insert(name.to_string(), costs);
        Ok(result)
    }
}

/// Each program's run time and runs so far (ns, runs), summed over the
/// agents of `hosts` (kernel statistics, in their status).
pub(super) fn program_totals(
    lab: &Lab,
    hosts: &[&str],
) -> anyhow::Result<BTreeMap<String, (u64, u64)>> {
    let mut total = BTreeMap::new();
    for h in hosts {
        let s = lab.status(h)?;
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

/// What each program cost per run between two readings of `program_totals`.
pub(super) fn program_costs(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
) -> BTreeMap<String, ProgramCost> {
    after
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
        .collect()
}

/// connect-bench's durations, microseconds; exactly `count` of them.
pub(super) fn connect_bench_us(out: &str, count: usize) -> anyhow::Result<Vec<f64>> {
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

/// The throughput iperf3's JSON report gives, Gbit/s.
pub(super) fn iperf_gbps(out: &str) -> anyhow::Result<f64> {
    let v: Value = serde_json::from_str(out)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 reported no throughput: {out}"))?;
    Ok(bps / 1e9)
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

/// Enables the kernel's per-program run-time statistics for as long as the
/// returned descriptor is open (BPF_ENABLE_STATS, not the global sysctl).
pub(super) fn enable_bpf_stats() -> anyhow::Result<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| {
        anyhow!("cannot enable eBPF run-time statistics (BPF_ENABLE_STATS, Linux 5.8+): {e}")
    })
}

/// Runs the whole benchmark and writes the report, the plots and the raw
/// numbers to `out`.
pub fn run(opts: &Options, out: &Path) -> anyhow::Result<Report> {
    require_tools(&["NPtcp", "iperf3", "ip", "nsenter", "prometheus", "curl"]);
    let started = Instant::now();
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    // Fail early, with the reason, on a kernel without BPF_ENABLE_STATS.
    drop(enable_bpf_stats()?);

    let mut bench = Bench::new(opts)?;
    let mut programs = BTreeMap::new();
    let (bare_srv, pvc_srv) = bench.servers("serve")?;
    let (bare_echo, pvc_echo) = bench.servers("echo")?;
    let vip_b = bench.lab.host(B).virtual_ip;

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
        |b| b.both_ways(|b, from, to| b.iperf(Route::Pvc, from, to)),
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

    eprintln!("bench: CPU per byte at a fixed rate, paired blocks");
    let (bare_sink, pvc_sink) = bench.servers("sink")?;
    let cpu_per_byte = bench.cpu_per_byte(bare_sink, pvc_sink)?;
    let programs_per_kib = bench.programs_per_kib(pvc_sink)?;
    eprintln!("bench: round trips in paired blocks");
    let round_trip_blocks = bench.round_trip_blocks(bare_echo, pvc_echo)?;

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
    let programs_prometheus = std::mem::take(&mut bench.prometheus);
    drop(bench);
    let sites = super::sites::measure(opts)?;
    eprintln!("bench: file distribution by Slurm and by BitTorrent");
    let distribution = super::distribution::measure(opts)?;

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
        cpu_per_byte,
        programs_per_kib,
        round_trip_blocks,
        programs,
        programs_prometheus,
        empty_program,
        agents,
        broker,
        pvc_bytes,
        broker_load,
        sites,
        distribution,
        seconds: started.elapsed().as_secs_f64(),
    };
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
            format!("{}:{port}", pvc_lab::BROKER_IP),
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
