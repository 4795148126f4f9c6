//! File distribution (paper §5.3.1, Figures 7 and 8): one file to N nodes
//! by the batch scheduler (Slurm's `sbcast`: the submit host sends the file
//! to every node) and by BitTorrent (aria2c: the submit host seeds, the
//! nodes swap pieces), over PVC and over the bare network in the same run,
//! the two alternating. Every host's uplink is limited (tbf on both of its
//! links), so that a sender's upload runs out, as on the paper's testbed,
//! and not this machine's CPU.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, ensure};
use pvc_lab::{
    Lab,
    grid::{Route, Slurm, Swarm},
};
use serde::Serialize;

use super::{measure::Options, report::median};

/// One node count: medians over the repetitions, seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DistributionCell {
    pub nodes: usize,
    pub sbcast_bare_s: f64,
    pub sbcast_pvc_s: f64,
    pub torrent_bare_s: f64,
    pub torrent_pvc_s: f64,
}

/// The submit host: Slurm's controller, the tracker and the seed.
const SUBMIT: &str = "a";

pub fn measure(opts: &Options) -> anyhow::Result<Vec<DistributionCell>> {
    let most = opts.distribution_nodes.iter().copied().max().unwrap_or(0);
    ensure!(most > 0, "no node count to measure file distribution with");
    let mut lab = Lab::lan(most + 1)?;
    lab.add_bare_lan()?;
    lab.start_all()?;
    let rate = format!("{}mbit", opts.uplink_mbit);
    for h in lab
        .hosts
        .iter()
        .map(|h| h.netns.clone())
        .collect::<Vec<_>>()
    {
        for dev in ["eth0", "eth1"] {
            // The burst holds a whole GSO packet (64 KiB) several times.
            lab.ns(&h, "tc")
                .args(["qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate])
                .args(["burst", "256kb", "latency", "100ms"])
                .ok()?;
        }
    }
    let nodes: Vec<String> = lab.hosts[1..].iter().map(|h| h.name.clone()).collect();
    let nodes: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let file = lab.dir.join("payload.bin");
    let bytes: Vec<u8> = (0..opts.distribution_mib << 20)
        .map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, bytes)?;
    let mut runs = Vec::new();
    for route in [Route::Bare, Route::Pvc] {
        let slurm = Slurm::start(&mut lab, route, SUBMIT, &nodes)?;
        let mut swarm = Swarm::start(&mut lab, route, SUBMIT, &file)?;
        swarm.seed(&mut lab, SUBMIT, None)?;
        runs.push((slurm, swarm));
    }
    // Per node count: [sbcast bare, sbcast PVC, torrent bare, torrent PVC].
    let mut samples = vec![[(); 4].map(|_| Vec::new()); opts.distribution_nodes.len()];
    for rep in 0..opts.reps {
        for (i, &n) in opts.distribution_nodes.iter().enumerate() {
            for route in Route::interleaved(rep) {
                let (slurm, swarm) = &mut runs[(route == Route::Pvc) as usize];
                eprintln!(
                    "bench: {} MiB to {n} nodes over {}, repetition {}",
                    opts.distribution_mib,
                    route.name(),
                    rep + 1
                );
                let sbcast = slurm
                    .sbcast(&lab, &file, "payload.bin", n)
                    .with_context(|| format!("sbcast to {n} nodes over {}", route.name()))?;
                let limit = Duration::from_secs(120);
                let torrent = swarm
                    .distribute(&mut lab, &nodes[..n], limit, false)
                    .with_context(|| format!("BitTorrent to {n} nodes over {}", route.name()))?;
                swarm.forget(&nodes[..n])?;
                let pvc = (route == Route::Pvc) as usize;
                samples[i][pvc].push(sbcast.as_secs_f64());
                samples[i][2 + pvc].push(torrent.took.as_secs_f64());
            }
        }
    }
    Ok(opts
        .distribution_nodes
        .iter()
        .zip(samples)
        .map(|(&nodes, [sb, sp, tb, tp])| DistributionCell {
            nodes,
            sbcast_bare_s: median(&sb),
            sbcast_pvc_s: median(&sp),
            torrent_bare_s: median(&tb),
            torrent_pvc_s: median(&tp),
        })
        .collect())
}

/// The report's section.
pub fn markdown(opts: &Options, cells: &[DistributionCell], m: &mut String) {
    let _ = writeln!(
        m,
        "\n## File distribution (paper §5.3.1)\n\n\
         One {} MiB file from the submit host to N nodes, every host's uplink limited to {} Mbit/s \
         (tbf): Slurm's `sbcast` (the submit host sends to every node) against BitTorrent \
         (opentracker and aria2c: the submit host seeds, the nodes swap pieces), over the bare \
         network and over PVC, alternating. Seconds to the last complete copy, medians of {} \
         repetitions.\n\n\
         | nodes | sbcast bare | sbcast PVC | BitTorrent bare | BitTorrent PVC |\n\
         |---|---|---|---|---|",
        opts.distribution_mib, opts.uplink_mbit, opts.reps
    );
    for c in cells {
        let _ = writeln!(
            m,
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} |",
            c.nodes, c.sbcast_bare_s, c.sbcast_pvc_s, c.torrent_bare_s, c.torrent_pvc_s
        );
    }
}
