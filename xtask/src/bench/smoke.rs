//! A short run of the benchmark in `cargo xtask test`, so that it cannot
//! rot. It checks that every measurement was made and is plausible, not how
//! fast anything was: these machines are too noisy for timing assertions.

use std::{fs, path::Path};

use anyhow::{Context as _, ensure};

use super::{Options, report::Report, run};

pub fn run_and_check(out: &Path) -> anyhow::Result<()> {
    let opts = Options::smoke();
    let r = run(&opts, out)?;
    check(&r, &opts, out).with_context(|| format!("benchmark smoke run in {}", out.display()))?;
    fs::remove_dir_all(out)?;
    Ok(())
}

fn check(r: &Report, opts: &Options, out: &Path) -> anyhow::Result<()> {
    let last = r.netpipe.last().context("no NetPIPE points")?;
    ensure!(
        last.bytes == u64::from(opts.netpipe_upper) + 3,
        "NetPIPE stopped at {} bytes",
        last.bytes
    );
    for c in &r.netpipe {
        for v in [c.bare_mbps, c.pvc_mbps, c.bare_usec, c.pvc_usec] {
            ensure!(v.is_finite() && v > 0.0, "implausible NetPIPE point {c:?}");
        }
    }
    ensure!(
        r.iperf.len() == 2,
        "iperf3 in both directions: {:?}",
        r.iperf
    );
    for (dir, t) in &r.iperf {
        ensure!(t.bare_gbps > 0.1 && t.pvc_gbps > 0.1, "iperf3 {dir}: {t:?}");
    }
    let connects = opts.reps * opts.connects;
    let round_trips = opts.reps * opts.round_trips;
    for (what, samples, want) in [
        ("connect bare", r.connect_bare_us.samples, connects),
        ("connect PVC", r.connect_pvc_us.samples, connects),
        (
            "first connect bare",
            r.first_connect_bare_us.samples,
            opts.first_connects,
        ),
        (
            "first connect PVC",
            r.first_connect_pvc_us.samples,
            opts.first_connects,
        ),
        ("round trip bare", r.round_trip_bare_us.samples, round_trips),
        ("round trip PVC", r.round_trip_pvc_us.samples, round_trips),
    ] {
        ensure!(samples == want, "{what}: {samples} samples, not {want}");
    }
    ensure!(r.round_trip_bare_us.median > 0.0 && r.round_trip_pvc_us.median > 0.0);
    // First connections to a PVC peer include authentication: never faster
    // than to an authenticated one.
    ensure!(
        r.first_connect_pvc_us.median > r.connect_pvc_us.median,
        "first connections {:?}, later ones {:?}",
        r.first_connect_pvc_us,
        r.connect_pvc_us
    );
    // Every program ran in the phases it serves, and the kernel timed it.
    for phase in ["netpipe", "iperf3", "connect", "round trip"] {
        let progs = r.programs.get(phase).context(phase)?;
        // The floor ran in front of them over the same work again: on
        // both hosts and both directions, as often as PVC's did, within
        // the background's packets.
        let floor = progs.get(super::floor::BESIDE).context("no floor beside")?;
        ensure!(
            floor.ns_per_run > 0.0 && floor.runs * 2 >= pvc_runs(progs),
            "{phase}: the empty program beside PVC's: {floor:?}, PVC's: {progs:?}"
        );
        for prog in ["pvc_egress", "pvc_ingress"] {
            let c = progs.get(prog).context(prog)?;
            ensure!(c.runs > 0 && c.ns_per_run > 0.0, "{phase}/{prog}: {c:?}");
            // Prometheus, scraping the agents, read back the same cost
            // (its window also holds a few background packets).
            let prom = r
                .programs_prometheus
                .get(phase)
                .and_then(|p| p.get(prog))
                .with_context(|| format!("{phase}/{prog} missing from Prometheus"))?;
            // Over a few hundred runs the background packets weigh.
            ensure!(
                c.runs < 1000 || (prom / c.ns_per_run - 1.0).abs() < 0.15,
                "{phase}/{prog}: Prometheus says {prom:.0} ns per run, the kernel {:.0}",
                c.ns_per_run
            );
        }
    }
    let connect4 = &r.programs["connect"]["pvc_connect4"];
    ensure!(connect4.runs >= opts.connects as u64, "{connect4:?}");
    ensure!(
        r.empty_program.runs > 0 && r.empty_program.ns_per_run > 0.0,
        "{:?}",
        r.empty_program
    );
    ensure!(r.pvc_bytes > 0);
    ensure!(r.agents.len() == 2, "{:?}", r.agents);
    ensure!(r.agents.values().all(|a| a.rss_kib > 0), "{:?}", r.agents);

    let load = &r.broker_load;
    ensure!(load["registered"] == opts.load_agents as u64, "{load}");
    ensure!(load["errors"] == 0, "{load}");
    ensure!(
        load["received_per_sec"].as_f64().unwrap_or(0.0) > 0.0,
        "{load}"
    );
    ensure!(
        load["broker_rss_loaded_kib"].as_u64().unwrap_or(0) > 0,
        "{load}"
    );

    ensure!(
        r.programs_per_kib > 0.0 && r.programs_per_kib.is_finite(),
        "the programs' CPU per byte: {}",
        r.programs_per_kib
    );
    for (p, pairs) in [
        (&r.cpu_per_byte, opts.cpu_pairs),
        (&r.round_trip_blocks, opts.rtt_blocks),
    ] {
        ensure!(
            p.pairs == pairs && p.bare > 0.0 && p.pvc > 0.0 && p.ratio.is_finite(),
            "paired measurement: {p:?}"
        );
    }
    ensure!(
        r.distribution.len() == opts.distribution_nodes.len(),
        "{:?}",
        r.distribution
    );
    for c in &r.distribution {
        for t in [
            c.sbcast_bare_s,
            c.sbcast_pvc_s,
            c.torrent_bare_s,
            c.torrent_pvc_s,
        ] {
            ensure!(t.is_finite() && t > 0.0, "file distribution: {c:?}");
        }
    }
    ensure!(r.sites.len() == 4, "{:?}", r.sites);
    for c in &r.sites {
        let floor = c.programs.get(super::floor::BESIDE);
        ensure!(
            floor.is_some_and(|f| f.ns_per_run > 0.0 && f.runs * 2 >= pvc_runs(&c.programs)),
            "{}: the empty program beside PVC's: {floor:?}, PVC's: {:?}",
            c.name,
            c.programs
        );
        for p in ["pvc_egress", "pvc_ingress"] {
            ensure!(
                c.programs
                    .get(p)
                    .is_some_and(|p| p.runs > 0 && p.ns_per_run > 0.0),
                "{}: no cost per run for {p}: {:?}",
                c.name,
                c.programs
            );
        }
        for (what, s) in [
            ("first byte bare", &c.first_byte_bare_us),
            ("first byte PVC", &c.first_byte_pvc_us),
        ] {
            ensure!(s.samples == connects, "{}: {what}: {s:?}", c.name);
        }
        for (what, s) in [
            ("round trip bare", &c.round_trip_bare_us),
            ("round trip PVC", &c.round_trip_pvc_us),
        ] {
            ensure!(
                s.samples == round_trips && s.median > 0.0,
                "{}: {what}: {s:?}",
                c.name
            );
        }
        ensure!(
            c.iperf.bare_gbps > 0.01 && c.iperf.pvc_gbps > 0.01,
            "{}: {:?}",
            c.name,
            c.iperf
        );
    }

    let md = fs::read_to_string(out.join("bench.md"))?;
    for section in [
        "## Targets",
        "## Bulk throughput",
        "## NetPIPE",
        "## Connection setup",
        "## Round trip",
        "## eBPF programs",
        "## Broker under load",
        "## Across NATs",
    ] {
        ensure!(md.contains(section), "bench.md lacks {section}:\n{md}");
    }
    for png in ["bandwidth.png", "latency.png"] {
        let bytes = fs::read(out.join(png))?;
        ensure!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
            "{png} is not a drawn figure"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("bench.json"))?)?;
    ensure!(
        json["raw_netpipe"]["pvc"].as_array().map(Vec::len) == Some(opts.reps),
        "raw NetPIPE runs missing from bench.json"
    );
    Ok(())
}

/// How often PVC's tc programs ran.
fn pvc_runs(progs: &std::collections::BTreeMap<String, super::report::ProgramCost>) -> u64 {
    ["pvc_egress", "pvc_ingress"]
        .iter()
        .filter_map(|p| progs.get(*p))
        .map(|c| c.runs)
        .sum()
}
