//! Across NATs and firewalls, in the lab's simulated Internet: a client
//! behind a port-keeping NAT reaching a public server (direct) and a server
//! behind a UPnP NAT (upnp), a hole-punched pair (two port-keeping NATs)
//! and a relayed pair (two symmetric NATs). The bare path of each is the
//! same client reaching the same server through the same boxes: its public
//! address, or a port forward set by hand on the server's NAT (what an
//! administrator would do without PVC); every measurement alternates the
//! two paths, as on the LAN.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, ensure};
use pvc_lab::{Lab, Site, bin, wait_until};
use serde::Serialize;

use super::{
    floor::{BESIDE, Beside},
    measure::{
        Options, connect_bench_us, enable_bpf_stats, iperf_gbps, program_costs, program_totals,
    },
    report::{ProgramCost, Spread, Throughput, median},
};

/// One pair of sites.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SiteCell {
    pub name: String,
    pub technique: String,
    pub iperf: Throughput,
    /// A new connection up to its first byte echoed back (a traversal or
    /// a relay's setup included).
    pub first_byte_bare_us: Spread,
    pub first_byte_pvc_us: Spread,
    pub round_trip_bare_us: Spread,
    pub round_trip_pvc_us: Spread,
    /// Each program's cost per run (client and server) over one more PVC
    /// iperf3 run, with the kernel's statistics on, and the empty program's
    /// in front of them in one more (`floor::BESIDE`).
    #[serde(default)]
    pub programs: BTreeMap<String, ProgramCost>,
}

struct Pair<'a> {
    client: &'a str,
    server: &'a str,
    /// The server's site (its NAT box holds the bare path's forward).
    site: usize,
}

/// Ports on the server: connect-bench's echo and iperf3's, the same
/// numbers for the bare path (forwarded) and for PVC.
const ECHO: u16 = 21001;
const IPERF: u16 = 21002;
const BARE_OFFSET: u16 = 100;

pub fn measure(opts: &Options) -> anyhow::Result<Vec<SiteCell>> {
    let mut lab = Lab::internet(&[
        (Site::Cone, 1),
        (Site::Cone, 1),
        (Site::Sym, 1),
        (Site::Sym, 1),
        (Site::Pub, 1),
        (Site::Upnp, 1),
    ])?;
    lab.start_all()?;
    let mut cells = Vec::new();
    for (name, technique, pair) in [
        (
            "public server (cone NAT to a public host)",
            "direct",
            Pair {
                client: "a",
                server: "e",
                site: 4,
            },
        ),
        (
            "UPnP-forwarded server (cone NAT to a UPnP NAT)",
            "upnp",
            Pair {
                client: "a",
                server: "f",
                site: 5,
            },
        ),
        (
            "hole-punched (cone NAT to cone NAT)",
            "punch",
            Pair {
                client: "a",
                server: "b",
                site: 1,
            },
        ),
        (
            "relayed (symmetric NAT to symmetric NAT)",
            "relay",
            Pair {
                client: "c",
                server: "d",
                site: 3,
            },
        ),
    ] {
        eprintln!("bench: {name}");
        let cell = measure_pair(&mut lab, opts, &pair, name, technique)
            .with_context(|| format!("the {name} cell"))?;
        cells.push(cell);
    }
    ensure!(
        lab.leaks()? == 0,
        "private or virtual addresses crossed the core"
    );
    Ok(cells)
}

fn measure_pair(
    lab: &mut Lab,
    opts: &Options,
    p: &Pair<'_>,
    name: &str,
    technique: &str,
) -> anyhow::Result<SiteCell> {
    let server_vip = lab.host(p.server).virtual_ip;
    wait_until(
        Duration::from_secs(20),
        "the agents to pick the technique",
        || {
            let s = lab.status(p.client).ok()?;
            s["peers"]
                .as_array()?
                .iter()
                .any(|m| {
                    m["virtual_ip"] == server_vip.to_string().as_str()
                        && m["technique"] == technique
                })
                .then_some(())
        },
    )?;
    // The bare path: the server's public address, else a forward of each
    // port on the server's NAT.
    let server_real = lab.host(p.server).real;
    let nat = lab
        .router_netns(p.site)
        .filter(|_| lab.site_wan(p.site) != server_real);
    for (router, port) in nat.iter().flat_map(|r| [(r, ECHO), (r, IPERF)]) {
        let bare = (port + BARE_OFFSET).to_string();
        Lab::command_in(router, None, "iptables")?
            .args([
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-i",
                "wan",
                "-p",
                "tcp",
                "--dport",
                &bare,
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{server_real}:{bare}"),
            ])
            .ok()?;
    }
    let connect_bench = bin("connect-bench").display().to_string();
    lab.spawn(p.server, &connect_bench, &["echo", &ECHO.to_string()])?;
    let bare = (ECHO + BARE_OFFSET).to_string();
    lab.spawn_outside(p.server, &connect_bench, &["echo", &bare])?;
    lab.wait_listening(p.server, ECHO)?;
    lab.wait_listening(p.server, ECHO + BARE_OFFSET)?;
    let bare_dst = if nat.is_some() {
        lab.site_wan(p.site)
    } else {
        server_real
    };
    let before = opened(lab, p.client, technique);

    let timed =
        |lab: &Lab, mode: &str, bare: bool, port: u16, count: usize| -> anyhow::Result<Vec<f64>> {
            let h = lab.host(p.client);
            let cgroup = (!bare).then_some(h.cgroup.as_path());
            let (dst, port) = if bare {
                (bare_dst, port + BARE_OFFSET)
            } else {
                (server_vip, port)
            };
            let out = Lab::command_in(&h.netns, cgroup, bin("connect-bench"))?
                .args([
                    mode.to_string(),
                    dst.to_string(),
                    port.to_string(),
                    count.to_string(),
                ])
                .ok()?;
            connect_bench_us(&out, count)
        };
    let (mut cb, mut cp, mut rb, mut rp, mut ib, mut ip) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for rep in 0..opts.reps {
        let order = if rep % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for bare in order {
            let connects = timed(lab, "first", bare, ECHO, opts.connects)?;
            let trips = timed(lab, "rtt", bare, ECHO, opts.round_trips)?;
            let gbps = iperf(lab, opts, p, bare, bare_dst, server_vip)?;
            if bare {
                cb.extend(connects);
                rb.extend(trips);
                ib.push(gbps);
            } else {
                cp.extend(connects);
                rp.extend(trips);
                ip.push(gbps);
            }
        }
    }
    let programs = {
        let _stats = enable_bpf_stats()?;
        let hosts = [p.client, p.server];
        let before = program_totals(lab, &hosts)?;
        iperf(lab, opts, p, false, bare_dst, server_vip)?;
        let after = program_totals(lab, &hosts)?;
        // The floor, over the same work again.
        let beside = Beside::attach(lab, &hosts)?;
        iperf(lab, opts, p, false, bare_dst, server_vip)?;
        let floor = beside.cost()?;
        drop(beside);
        let mut costs = program_costs(&before, &after);
        costs.insert(BESIDE.to_string(), floor);
        costs
    };
    let used = opened(lab, p.client, technique) - before;
    ensure!(
        used > 0,
        "no flow of the {name} cell took {technique}: {}",
        lab.status(p.client)?["flows_opened"]
    );
    let (bare_gbps, pvc_gbps) = (median(&ib), median(&ip));
    Ok(SiteCell {
        name: name.to_string(),
        technique: technique.to_string(),
        iperf: Throughput {
            bare_gbps,
            pvc_gbps,
            ratio: pvc_gbps / bare_gbps,
        },
        first_byte_bare_us: Spread::of(&cb),
        first_byte_pvc_us: Spread::of(&cp),
        round_trip_bare_us: Spread::of(&rb),
        round_trip_pvc_us: Spread::of(&rp),
        programs,
    })
}

fn opened(lab: &Lab, host: &str, technique: &str) -> u64 {
    lab.status(host)
        .ok()
        .and_then(|s| s["flows_opened"][technique].as_u64())
        .unwrap_or(0)
}

fn iperf(
    lab: &mut Lab,
    opts: &Options,
    p: &Pair<'_>,
    bare: bool,
    bare_dst: std::net::Ipv4Addr,
    server_vip: std::net::Ipv4Addr,
) -> anyhow::Result<f64> {
    let (dst, port) = if bare {
        (bare_dst, IPERF + BARE_OFFSET)
    } else {
        (server_vip, IPERF)
    };
    let port_s = port.to_string();
    let args = ["-s", "-1", "-p", port_s.as_str()];
    if bare {
        lab.spawn_outside(p.server, "iperf3", &args)?;
    } else {
        lab.spawn(p.server, "iperf3", &args)?;
    }
    lab.wait_listening(p.server, port)?;
    let h = lab.host(p.client);
    let cgroup = (!bare).then_some(h.cgroup.as_path());
    let secs = opts.iperf_seconds.to_string();
    let out = Lab::command_in(&h.netns, cgroup, "iperf3")?
        .args([
            "-c",
            &dst.to_string(),
            "-p",
            &port_s,
            "-t",
            &secs,
            "-O",
            "1",
            "-J",
        ])
        .ok()
        .with_context(|| format!("iperf3 over the {} path", if bare { "bare" } else { "PVC" }))?;
    iperf_gbps(&out)
}
