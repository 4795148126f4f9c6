//! A short run of the benchmark (`cargo xtask bench`), so that it cannot rot.
//! It checks that every measurement was made and is plausible, not how fast
//! anything was: these machines are too noisy for timing assertions.

use std::fs;

use pvc_tests::bench::{self, Options};

#[test]
fn a_short_benchmark_run_measures_everything_it_reports() {
    let out = std::env::temp_dir().join(format!("pvc-bench-smoke-{}", std::process::id()));
    let opts = Options::smoke();
    let r = bench::run(&opts, &out).unwrap();

    assert!(!r.netpipe.is_empty(), "no NetPIPE points");
    assert_eq!(
        r.netpipe.last().unwrap().bytes,
        u64::from(opts.netpipe_upper) + 3
    );
    for c in &r.netpipe {
        for v in [c.bare_mbps, c.pvc_mbps, c.bare_usec, c.pvc_usec] {
            assert!(v.is_finite() && v > 0.0, "implausible NetPIPE point {c:?}");
        }
    }
    assert_eq!(r.iperf.len(), 2, "iperf3 in both directions: {:?}", r.iperf);
    for (dir, t) in &r.iperf {
        assert!(t.bare_gbps > 0.1 && t.pvc_gbps > 0.1, "iperf3 {dir}: {t:?}");
    }
    let connects = opts.reps * opts.connects;
    assert_eq!(r.connect_bare_us.samples, connects);
    assert_eq!(r.connect_pvc_us.samples, connects);
    assert_eq!(r.first_connect_bare_us.samples, opts.first_connects);
    assert_eq!(r.first_connect_pvc_us.samples, opts.first_connects);
    let round_trips = opts.reps * opts.round_trips;
    assert_eq!(r.round_trip_bare_us.samples, round_trips);
    assert_eq!(r.round_trip_pvc_us.samples, round_trips);
    assert!(r.round_trip_bare_us.median > 0.0 && r.round_trip_pvc_us.median > 0.0);
    // First connections to a PVC peer include authentication: never faster
    // than to an authenticated one.
    assert!(
        r.first_connect_pvc_us.median > r.connect_pvc_us.median,
        "{r:?}"
    );

    // Every program ran in the phases it serves, and the kernel timed it.
    for phase in ["netpipe", "iperf3", "connect", "round trip"] {
        let progs = &r.programs[phase];
        for prog in ["pvc_egress", "pvc_ingress"] {
            let c = &progs[prog];
            assert!(c.runs > 0 && c.ns_per_run > 0.0, "{phase}/{prog}: {c:?}");
        }
    }
    assert!(
        // One PVC run of the phase, timed by the kernel's statistics.
        r.programs["connect"]["pvc_connect4"].runs >= opts.connects as u64,
        "{:?}",
        r.programs["connect"]
    );
    assert!(
        r.empty_program.runs > 0 && r.empty_program.ns_per_run > 0.0,
        "{:?}",
        r.empty_program
    );
    assert!(r.pvc_bytes > 0);
    assert_eq!(r.agents.len(), 2);
    assert!(r.agents.values().all(|a| a.rss_kib > 0), "{:?}", r.agents);

    let load = &r.broker_load;
    assert_eq!(load["registered"], opts.load_agents as u64, "{load}");
    assert_eq!(load["errors"], 0, "{load}");
    assert!(load["received_per_sec"].as_f64().unwrap() > 0.0, "{load}");
    assert!(
        load["broker_rss_loaded_kib"].as_u64().unwrap() > 0,
        "{load}"
    );

    let md = fs::read_to_string(out.join("bench.md")).unwrap();
    for section in [
        "## Targets",
        "## Bulk throughput",
        "## NetPIPE",
        "## Connection setup",
        "## Round trip",
        "## eBPF programs",
        "## Broker under load",
    ] {
        assert!(md.contains(section), "bench.md lacks {section}:\n{md}");
    }
    for png in ["bandwidth.png", "latency.png"] {
        let bytes = fs::read(out.join(png)).unwrap();
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
            "{png} is not a drawn figure"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    assert!(json["raw_netpipe"]["pvc"].as_array().unwrap().len() == opts.reps);
    fs::remove_dir_all(&out).unwrap();
}
