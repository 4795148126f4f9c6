//! The two measurements that can resolve a cost of about 1% on this noisy
//! machine: the machine's CPU time per byte at a fixed rate below
//! saturation, and one-byte round trips, each from one process holding a
//! connection over each path and alternating between them in short blocks
//! (connect-bench's `rate-pairs` and `rtt-pairs`). Each pair of values
//! gives one PVC/bare ratio, so slow drifts of the machine cancel within a
//! pair; the report gives the ratios' geometric mean and its 95%
//! confidence interval. Geometric, because a block's noise is skewed (a
//! block that something else on the machine slowed is slower by a lot, one
//! it spared is faster by little): the arithmetic mean of such ratios is
//! above 1 for the same path on both sides, their log is not.

use std::collections::BTreeMap;

use anyhow::{Context as _, anyhow, ensure};
use serde::Serialize;
use serde_json::Value;

use super::{
    measure::{B, Bench, Route},
    report::ProgramCost,
};

/// One paired measurement: means per path, and the PVC/bare ratio over the
/// pairs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Paired {
    pub unit: String,
    pub bare: f64,
    pub pvc: f64,
    /// Geometric mean of the pairs' PVC/bare ratios.
    pub ratio: f64,
    /// Half-width of its 95% confidence interval (normal approximation on
    /// the logs; the interval is nearly symmetric at these widths).
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
        let logs: Vec<f64> = pairs.iter().map(|(b, p)| (p / b).ln()).collect();
        let log = mean(&mut logs.iter().copied());
        let sd = if n > 1 {
            (logs.iter().map(|l| (l - log).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            f64::NAN
        };
        let half = 1.96 * sd / (n as f64).sqrt();
        Paired {
            unit: unit.to_string(),
            bare: mean(&mut pairs.iter().map(|p| p.0)),
            pvc: mean(&mut pairs.iter().map(|p| p.1)),
            ratio: log.exp(),
            ratio_ci95: ((log + half).exp() - (log - half).exp()) / 2.0,
            pairs: n,
        }
    }
}

impl Bench<'_> {
    /// The tc programs' own CPU per byte in the same paced transfer over
    /// PVC (`connect-bench rate`, one block of `cpu_block_ms` x
    /// `cpu_pairs`, at most a minute): their run time from the kernel's
    /// statistics (both hosts, both programs) over the bytes sent, ns per
    /// KiB. The programs
    /// are all the per-packet work PVC adds, and their statistics are exact
    /// where the machine's busy time is not.
    pub(super) fn programs_per_kib(&mut self, pvc_sink: u16) -> anyhow::Result<f64> {
        let _stats = super::measure::enable_bpf_stats()?;
        let before = self.programs()?;
        // Exact counts: a minute is plenty, whatever the quartets need.
        let ms = (self.opts.cpu_block_ms * self.opts.cpu_pairs as u64).min(60_000);
        let out = self
            .round_trip_client(Route::Pvc, true)
            .args([
                "rate".to_string(),
                self.addr(B, Route::Pvc).to_string(),
                pvc_sink.to_string(),
                self.opts.cpu_rate_mbit.to_string(),
                ms.to_string(),
            ])
            .ok()
            .context("connect-bench rate over the PVC path")?;
        let after = self.programs()?;
        let v: Value = serde_json::from_str(out.trim())?;
        let bytes = v["bytes"]
            .as_f64()
            .ok_or_else(|| anyhow!("connect-bench said: {out}"))?;
        ensure!(bytes > 0.0, "connect-bench sent nothing");
        let ns: u64 = ["pvc_egress", "pvc_ingress"]
            .iter()
            .map(|p| {
                let (ns0, _) = before.get(*p).copied().unwrap_or((0, 0));
                after.get(*p).map_or(0, |&(ns, _)| ns - ns0)
            })
            .sum();
        Ok(ns as f64 / (bytes / 1024.0))
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

    /// CPU per byte at a fixed rate below saturation, in quartets of blocks
    /// (bare, PVC, PVC, bare) over one held connection per path to a sink
    /// on b, ns of CPU 0's busy time per KiB.
    pub(super) fn cpu_per_byte(&mut self, bare_sink: u16, pvc_sink: u16) -> anyhow::Result<Paired> {
        let o = self.opts;
        let rest = [o.cpu_rate_mbit.to_string(), o.cpu_block_ms.to_string()];
        self.paired_blocks(
            ("rate-pairs", "CPU per byte"),
            (bare_sink, pvc_sink),
            &rest,
            (o.cpu_pairs, "ns of CPU per KiB"),
        )
    }

    /// One-byte round trips in alternating paired blocks over one held
    /// connection per path to an echo server on b, each block's median, µs.
    pub(super) fn round_trip_blocks(
        &mut self,
        bare_port: u16,
        pvc_port: u16,
    ) -> anyhow::Result<Paired> {
        let rest = [self.opts.rtt_block.to_string()];
        self.paired_blocks(
            ("rtt-pairs", "round trips"),
            (bare_port, pvc_port),
            &rest,
            (self.opts.rtt_blocks, "µs per round trip"),
        )
    }

    /// connect-bench's paired `mode` from one process inside a's cgroup
    /// (the bare path's real addresses are nothing to PVC), pinned to CPU
    /// 0 as the servers on b are: the bare path's server on `ports.0`,
    /// PVC's on `ports.1`, then `rest` and the count of pairs.
    fn paired_blocks(
        &mut self,
        (mode, what): (&str, &str),
        ports: (u16, u16),
        rest: &[String],
        (count, unit): (usize, &str),
    ) -> anyhow::Result<Paired> {
        let mut args = vec![
            mode.to_string(),
            self.addr(B, Route::Bare).to_string(),
            ports.0.to_string(),
            self.addr(B, Route::Pvc).to_string(),
            ports.1.to_string(),
        ];
        args.extend(rest.iter().cloned());
        args.push(count.to_string());
        let out = self
            .round_trip_client(Route::Pvc, true)
            .args(args)
            .ok()
            .with_context(|| format!("connect-bench {mode}"))?;
        let pairs = pairs_of(&out, count)?;
        for (k, (bare, pvc)) in pairs.iter().enumerate() {
            eprintln!("bench: {what}, pair {k}: bare {bare:.2}, PVC {pvc:.2} {unit}");
        }
        Ok(Paired::of(unit, &pairs))
    }
}

/// What an empty program in their place would cost, as a share of what
/// PVC's tc programs cost in a phase: the empty program's ns per run over
/// theirs (weighted by their runs). An empty program runs on the same
/// packets, so this share of the programs' CPU per byte is the price of
/// having any tc program on the uplink, the floor under PVC's.
fn empty_share(progs: &BTreeMap<String, ProgramCost>, floor_ns: f64) -> Option<f64> {
    let (ns, runs) = ["pvc_egress", "pvc_ingress"]
        .iter()
        .filter_map(|p| progs.get(*p))
        .fold((0.0, 0u64), |(ns, runs), c| {
            (ns + c.ns_per_run * c.runs as f64, runs + c.runs)
        });
    (runs > 0 && ns > 0.0).then(|| floor_ns * runs as f64 / ns)
}

/// The CPU per byte, as a ratio to the bare path's (`bare_per_kib`), that
/// an empty program in the place of PVC's tc programs would cost: their own
/// `programs_per_kib` times the empty program's share of their cost in
/// `progs`, at `floor_ns` per run.
pub fn empty_in_place(
    progs: &BTreeMap<String, ProgramCost>,
    floor_ns: f64,
    programs_per_kib: f64,
    bare_per_kib: f64,
) -> f64 {
    empty_share(progs, floor_ns).map_or(f64::NAN, |s| 1.0 + programs_per_kib * s / bare_per_kib)
}

/// connect-bench's (bare, PVC) pairs; exactly `count` of them.
fn pairs_of(out: &str, count: usize) -> anyhow::Result<Vec<(f64, f64)>> {
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("connect-bench said: {out}"))?;
    let pairs: Vec<(f64, f64)> = v["pairs"]
        .as_array()
        .ok_or_else(|| anyhow!("connect-bench said: {out}"))?
        .iter()
        .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
        .collect();
    ensure!(
        pairs.len() == count,
        "connect-bench measured {} of {count} pairs",
        pairs.len()
    );
    Ok(pairs)
}

/// Only the per-packet measurements (issue 13), as markdown: each tc
/// program's ns per run in bulk transfers and in round trips beside the
/// empty program's, CPU per byte at a fixed rate and round trips in paired
/// blocks. A few minutes: for trying a change to the data path.
pub fn per_packet(opts: &super::measure::Options) -> anyhow::Result<String> {
    use std::fmt::Write as _;
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
    let (bare_sink, pvc_sink) = bench.servers("sink")?;
    let cpu = bench.cpu_per_byte(bare_sink, pvc_sink)?;
    let programs_per_kib = bench.programs_per_kib(pvc_sink)?;
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
    let empty = programs.get("iperf3").map_or(f64::NAN, |p| {
        let floor = p
            .get(super::floor::BESIDE)
            .map_or(f64::NAN, |c| c.ns_per_run);
        empty_in_place(p, floor, programs_per_kib, cpu.bare)
    });
    let _ = writeln!(
        m,
        "\nthe programs' own CPU per byte at that rate: {programs_per_kib:.2} ns per KiB, \
         {:.4} of the bare path's CPU per byte; an empty program in their place: {:.4}",
        1.0 + programs_per_kib / cpu.bare,
        empty
    );
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_ratios_and_their_interval() {
        let p = Paired::of("x", &[(100.0, 101.0), (200.0, 202.0), (50.0, 50.5)]);
        assert!((p.ratio - 1.01).abs() < 1e-12);
        assert!(p.ratio_ci95.abs() < 1e-9);
        // The geometric mean of 1.00 and 1.02, and the interval around it:
        // sd of (ln 1.00, ln 1.02) is 0.014003; / sqrt(2) * 1.96 = 0.019408.
        let q = Paired::of("x", &[(100.0, 100.0), (100.0, 102.0)]);
        assert!((q.ratio - 1.02f64.sqrt()).abs() < 1e-12, "{q:?}");
        assert!((q.ratio_ci95 - 0.0196).abs() < 1e-4, "{q:?}");
        // Ratios of x and 1/x: the same path on both sides, one block
        // slowed and one spared, is 1, not their arithmetic mean 1.25.
        let r = Paired::of("x", &[(100.0, 200.0), (100.0, 50.0)]);
        assert!((r.ratio - 1.0).abs() < 1e-12, "{r:?}");
        assert_eq!(Paired::of("x", &[]).pairs, 0);
    }

    #[test]
    fn an_empty_programs_share_weights_by_runs() {
        let cost = |runs, ns_per_run| ProgramCost { runs, ns_per_run };
        let progs = BTreeMap::from([
            ("pvc_egress".to_string(), cost(100, 100.0)),
            ("pvc_ingress".to_string(), cost(300, 60.0)),
            ("pvc_connect4".to_string(), cost(5, 5000.0)),
        ]);
        // 400 runs at 35 ns against 10,000 + 18,000 ns.
        let s = empty_share(&progs, 35.0).unwrap();
        assert!((s - 0.5).abs() < 1e-12, "{s}");
        assert_eq!(empty_share(&BTreeMap::new(), 35.0), None);
    }
}
