//! The two measurements that can resolve a cost of about 1% on this noisy
//! machine: the machine's CPU time per byte at a fixed rate below
//! saturation, and one-byte round trips, each in alternating paired blocks
//! (bare then PVC, PVC then bare, ...). Each pair gives one PVC/bare ratio,
//! so slow drifts of the machine cancel within a pair; the report gives the
//! mean ratio and its 95% confidence interval.

use anyhow::{Context as _, anyhow, ensure};
use serde::Serialize;
use serde_json::Value;

use super::measure::{A, B, Bench, Route};

/// One paired measurement: means per path, and the PVC/bare ratio over the
/// pairs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Paired {
    pub unit: String,
    pub bare: f64,
    pub pvc: f64,
    /// Mean of the pairs' PVC/bare ratios.
    pub ratio: f64,
    /// Half-width of its 95% confidence interval (normal approximation).
    pub ratio_ci95: f64,
    pub pairs: usize,
}

impl Paired {
    /// From (bare, PVC) values, one per pair.
    pub fn of(unit: &str, pairs: &[(f64, f64)]) -> Paired {
        let n = pairs.len();
        if n == 0 {
            return Paired::default();
        }
        let mean = |v: &mut dyn Iterator<Item = f64>| v.sum::<f64>() / n as f64;
        let ratios: Vec<f64> = pairs.iter().map(|(b, p)| p / b).collect();
        let ratio = mean(&mut ratios.iter().copied());
        let var = if n > 1 {
            ratios.iter().map(|r| (r - ratio).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            f64::NAN
        };
        Paired {
            unit: unit.to_string(),
            bare: mean(&mut pairs.iter().map(|p| p.0)),
            pvc: mean(&mut pairs.iter().map(|p| p.1)),
            ratio,
            ratio_ci95: 1.96 * (var / n as f64).sqrt(),
            pairs: n,
        }
    }
}

/// Microseconds all CPUs have spent idle so far, from cpuidle's own
/// per-state counters: exact, where /proc/stat's busy time is sampled at
/// the tick (a paced sender's bursts can fall between ticks, or on them).
fn idle_us(only: Option<usize>) -> anyhow::Result<(u64, usize)> {
    let mut total = 0;
    let mut cpus = 0;
    for cpu in std::fs::read_dir("/sys/devices/system/cpu")?.flatten() {
        let name = cpu.file_name();
        let name = name.to_string_lossy();
        let Some(n) = name
            .strip_prefix("cpu")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if only.is_some_and(|o| o != n) {
            continue;
        }
        let idle = cpu.path().join("cpuidle");
        let states = std::fs::read_dir(&idle).with_context(|| {
            format!(
                "no cpuidle statistics in {}: CPU time cannot be measured exactly here",
                idle.display()
            )
        })?;
        for state in states.flatten() {
            let t = std::fs::read_to_string(state.path().join("time")).unwrap_or_default();
            total += t.trim().parse::<u64>().unwrap_or(0);
        }
        cpus += 1;
    }
    ensure!(cpus > 0, "no CPU in /sys/devices/system/cpu");
    Ok((total, cpus))
}

/// Runs `work`; returns its result and the busy time meanwhile (wall time
/// less idle time) of CPU `only`, or of all CPUs, ns.
fn busy_during<T>(
    only: Option<usize>,
    work: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, f64)> {
    let (idle0, cpus) = idle_us(only)?;
    let t = std::time::Instant::now();
    let out = work()?;
    let wall = t.elapsed().as_nanos() as f64;
    let (idle1, _) = idle_us(only)?;
    Ok((out, wall * cpus as f64 - (idle1 - idle0) as f64 * 1e3))
}

impl Bench<'_> {
    /// CPU per byte: iperf3 from a to b at `cpu_rate_mbit` for
    /// `cpu_seconds`, the whole machine's busy time over the bytes b
    /// received; ns of CPU per KiB.
    fn cpu_per_kib(&mut self, route: Route) -> anyhow::Result<f64> {
        let (busy_ns, bytes) = self.fixed_rate(route)?;
        Ok(busy_ns / (bytes / 1024.0))
    }

    /// The tc programs' own CPU per byte in the same fixed-rate transfer
    /// over PVC: their run time from the kernel's statistics (both hosts,
    /// both programs) over the bytes received, ns per KiB. The programs are
    /// all the per-packet work PVC adds, and their statistics are exact
    /// where the machine's busy time is not.
    pub(super) fn programs_per_kib(&mut self) -> anyhow::Result<f64> {
        let _stats = super::measure::enable_bpf_stats()?;
        let before = self.programs()?;
        let (_, bytes) = self.fixed_rate(Route::Pvc)?;
        let after = self.programs()?;
        let ns: u64 = ["pvc_egress", "pvc_ingress"]
            .iter()
            .map(|p| {
                let (ns0, _) = before.get(*p).copied().unwrap_or((0, 0));
                after.get(*p).map_or(0, |&(ns, _)| ns - ns0)
            })
            .sum();
        Ok(ns as f64 / (bytes / 1024.0))
    }

    /// iperf3 from a to b at `cpu_rate_mbit` for `cpu_seconds`: CPU 0's
    /// busy time meanwhile (ns) and the bytes b received.
    fn fixed_rate(&mut self, route: Route) -> anyhow::Result<(f64, f64)> {
        let port = self.next_port();
        self.spawn(B, route, "iperf3", &["-s", "-1", "-p", &port.to_string()])?;
        self.lab.wait_listening(B, port)?;
        let dst = self.addr(B, route).to_string();
        let rate = format!("{}M", self.opts.cpu_rate_mbit);
        let secs = self.opts.cpu_seconds.to_string();
        let cmd = self.command(A, route, "iperf3").args([
            "-c",
            &dst,
            "-p",
            &port.to_string(),
            "-b",
            &rate,
            "-t",
            &secs,
            // Client and server on one CPU, as for the round trips: where
            // the scheduler puts them otherwise changes what a byte costs.
            "-A",
            "0,0",
            "-J",
        ]);
        // CPU 0's busy time: the transfer runs there, softirqs included
        // (veth delivers on the sending CPU); the rest of the machine
        // (Prometheus, agents, the broker) mostly runs beside it.
        let (out, busy_ns) = busy_during(Some(0), || {
            cmd.ok()
                .with_context(|| format!("iperf3 at a fixed rate over the {} path", route.name()))
        })?;
        let v: Value = serde_json::from_str(&out)?;
        let bytes = v["end"]["sum_received"]["bytes"]
            .as_f64()
            .ok_or_else(|| anyhow!("iperf3 reported no bytes: {out}"))?;
        ensure!(bytes > 0.0, "iperf3 moved nothing");
        Ok((busy_ns, bytes))
    }

    /// iperf3 between the hosts' real addresses on eth0, PVC's uplink,
    /// from outside the cgroups: PVC's programs see it and pass it.
    fn iperf_real_on_uplink(&mut self, from: &str, to: &str) -> anyhow::Result<f64> {
        let port = self.next_port().to_string();
        self.lab
            .spawn_outside(to, "iperf3", &["-s", "-1", "-p", &port])?;
        self.lab.wait_listening(to, port.parse()?)?;
        let dst = self.lab.host(to).real.to_string();
        let secs = self.opts.iperf_seconds.to_string();
        let netns = self.lab.host(from).netns.clone();
        let out = self
            .lab
            .ns(&netns, "iperf3")
            .args(["-c", &dst, "-p", &port, "-t", &secs, "-O", "1", "-J"])
            .ok()
            .with_context(|| format!("iperf3 {from}->{to} between real addresses"))?;
        super::measure::iperf_gbps(&out)
    }

    /// CPU per byte at a fixed rate, alternating paired runs.
    pub(super) fn cpu_per_byte(&mut self) -> anyhow::Result<Paired> {
        let mut pairs = Vec::new();
        for k in 0..self.opts.cpu_pairs {
            let mut pair = (0.0, 0.0);
            for route in Route::interleaved(k) {
                let v = self.cpu_per_kib(route)?;
                eprintln!(
                    "bench: CPU per byte, pair {k}, {}: {v:.1} ns per KiB",
                    route.name()
                );
                match route {
                    Route::Bare => pair.0 = v,
                    Route::Pvc => pair.1 = v,
                }
            }
            pairs.push(pair);
        }
        Ok(Paired::of("ns of CPU per KiB", &pairs))
    }

    /// One-byte round trips in alternating paired blocks, one process
    /// holding a connection over each path (from inside a's cgroup: the
    /// bare path's real addresses are nothing to PVC), each block's
    /// median, µs.
    pub(super) fn round_trip_blocks(
        &mut self,
        bare_port: u16,
        pvc_port: u16,
    ) -> anyhow::Result<Paired> {
        let out = self
            .round_trip_client(Route::Pvc, true)
            .args([
                "rtt-pairs".to_string(),
                self.addr(B, Route::Bare).to_string(),
                bare_port.to_string(),
                self.addr(B, Route::Pvc).to_string(),
                pvc_port.to_string(),
                self.opts.rtt_block.to_string(),
                self.opts.rtt_blocks.to_string(),
            ])
            .ok()
            .context("connect-bench rtt-pairs")?;
        let v: Value = serde_json::from_str(out.trim())?;
        let pairs: Vec<(f64, f64)> = v["pairs"]
            .as_array()
            .ok_or_else(|| anyhow!("connect-bench said: {out}"))?
            .iter()
            .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
            .collect();
        for (k, (bare, pvc)) in pairs.iter().enumerate() {
            eprintln!("bench: round trips, block {k}: bare {bare:.2} µs, PVC {pvc:.2} µs");
        }
        ensure!(
            pairs.len() == self.opts.rtt_blocks,
            "connect-bench timed {} of {} pairs",
            pairs.len(),
            self.opts.rtt_blocks
        );
        Ok(Paired::of("µs per round trip", &pairs))
    }
}

/// Only the per-packet measurements (issue 13), as markdown: each tc
/// program's ns per run in bulk transfers and in round trips beside the
/// empty program's, CPU per byte at a fixed rate and round trips in paired
/// blocks. A few minutes: for trying a change to the data path.
pub fn per_packet(opts: &super::measure::Options) -> anyhow::Result<String> {
    use std::{collections::BTreeMap, fmt::Write as _};
    let mut bench = Bench::new(opts)?;
    let (bare_echo, pvc_echo) = bench.servers("echo")?;
    // The first flow to a member waits for its authentication: not
    // measured.
    bench.round_trips(Route::Pvc, pvc_echo, 100)?;
    let mut programs = BTreeMap::new();
    bench.measured(
        "iperf3",
        &mut programs,
        |_| Ok(()),
        |b| b.both_ways(|b, from, to| b.iperf(Route::Pvc, from, to)),
    )?;
    // What a flow costs that PVC's programs pass without rewriting (a
    // connection between the real addresses over PVC's uplink): the cost
    // per packet of a flow translated at the socket instead.
    bench.measured(
        "iperf3, real addresses on PVC's uplink",
        &mut programs,
        |_| Ok(()),
        |b| b.both_ways(Bench::iperf_real_on_uplink),
    )?;
    let blocks = bench.measured(
        "round trip",
        &mut programs,
        |b| b.round_trip_blocks(bare_echo, pvc_echo),
        |b| {
            b.round_trips(Route::Pvc, pvc_echo, b.opts.rtt_block)
                .map(drop)
        },
    )?;
    let floor = {
        let _stats = super::measure::enable_bpf_stats()?;
        super::floor::measure(&mut bench)?
    };
    let cpu = bench.cpu_per_byte()?;
    let programs_per_kib = bench.programs_per_kib()?;
    let mut m = String::new();
    let _ = writeln!(
        m,
        "translation: {}\n",
        std::env::var("PVC_LAB_TRANSLATION").unwrap_or_else(|_| "socket (default)".into())
    );
    let _ = writeln!(
        m,
        "| phase | program | runs | ns per run | x empty program on PVC's uplinks, the run after | x empty program alone on the bare link |\n|---|---|---|---|---|---|"
    );
    for (phase, progs) in &programs {
        let beside = progs
            .get(super::floor::BESIDE)
            .map_or(f64::NAN, |c| c.ns_per_run);
        for (name, c) in progs.iter().filter(|(n, _)| {
            n.starts_with("pvc_e") || n.starts_with("pvc_i") || *n == super::floor::BESIDE
        }) {
            let _ = writeln!(
                m,
                "| {phase} | {name} | {} | {:.0} | {:.2} | {:.2} |",
                c.runs,
                c.ns_per_run,
                c.ns_per_run / beside,
                c.ns_per_run / floor.ns_per_run
            );
        }
    }
    let _ = writeln!(
        m,
        "| iperf3, bare | empty program alone | {} | {:.0} | - | 1 |",
        floor.runs, floor.ns_per_run
    );
    for (name, p) in [
        ("CPU per byte, fixed rate", &cpu),
        ("round trips, paired blocks", &blocks),
    ] {
        let _ = writeln!(
            m,
            "\n{name}: bare {:.2}, PVC {:.2} {}; PVC/bare {:.4} ± {:.4} ({} pairs)",
            p.bare, p.pvc, p.unit, p.ratio, p.ratio_ci95, p.pairs
        );
    }
    let _ = writeln!(
        m,
        "\nthe programs' own CPU per byte at that rate: {programs_per_kib:.2} ns per KiB, \
         {:.4} of the bare path's CPU per byte",
        1.0 + programs_per_kib / cpu.bare
    );
    Ok(m)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn paired_ratios_and_their_interval() {
        let p = Paired::of("x", &[(100.0, 101.0), (200.0, 202.0), (50.0, 50.5)]);
        assert!((p.ratio - 1.01).abs() < 1e-12);
        assert!(p.ratio_ci95.abs() < 1e-9);
        let q = Paired::of("x", &[(100.0, 100.0), (100.0, 102.0)]);
        assert!((q.ratio - 1.01).abs() < 1e-12);
        // sd of (1.00, 1.02) is 0.01414; / sqrt(2) * 1.96 = 0.0196.
        assert!((q.ratio_ci95 - 0.0196).abs() < 1e-4, "{q:?}");
        assert_eq!(Paired::of("x", &[]).pairs, 0);
    }

    #[test]
    fn busy_time_counts_a_busy_loop() {
        let ((), busy) = busy_during(None, || {
            let t = std::time::Instant::now();
            while t.elapsed() < Duration::from_millis(300) {
                std::hint::black_box(0);
            }
            Ok(())
        })
        .unwrap();
        // At least the loop's own 300 ms (other work may add to it).
        assert!(busy >= 0.25e9, "{busy}");
    }
}
