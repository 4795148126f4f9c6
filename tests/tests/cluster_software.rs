//! Unmodified cluster software over PVC (paper §5.3): a Slurm cluster and a
//! BitTorrent swarm whose programs know each other only by virtual
//! addresses, each daemon on its own host of the lab; on one LAN and across
//! NATed and firewalled sites of the simulated Internet.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use pvc_lab::{
    Lab, Site,
    grid::{Distribution, Route, Slurm, Swarm},
    wait_until,
};

/// A file of `mib` MiB that compresses to nothing useful.
fn payload(lab: &Lab, name: &str, mib: usize) -> PathBuf {
    let path = lab.dir.join(name);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..mib << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn is_virtual(ip: &Ipv4Addr) -> bool {
    ip.octets()[0] & 0xf0 == 240
}

/// `sbcast` of a file to every node of `slurm`: each node's own scratch
/// folder holds a byte-identical copy.
fn broadcast_and_check(lab: &Lab, slurm: &Slurm, file: &std::path::Path) -> Duration {
    let took = slurm
        .sbcast(lab, file, "payload", slurm.nodes.len())
        .unwrap();
    let original = std::fs::read(file).unwrap();
    for n in &slurm.nodes {
        let copy = std::fs::read(slurm.scratch(n).join("payload"))
            .unwrap_or_else(|e| panic!("node {n} has no copy: {e}"));
        assert!(copy == original, "node {n}'s copy differs");
    }
    took
}

#[test]
fn a_slurm_cluster_runs_jobs_across_members_by_virtual_address_only() {
    let mut lab = Lab::lan(4).unwrap();
    lab.start_all().unwrap();
    let slurm = Slurm::start(&mut lab, Route::Pvc, "a", &["b", "c", "d"]).unwrap();
    let conf = std::fs::read_to_string(&slurm.conf).unwrap();
    assert!(!conf.contains("198.18."), "slurm.conf holds a real address");

    // A job step on the three nodes: slurmd connects back to srun.
    let (ok, out, err) = slurm.run(&lab, "srun", &["-N3", "hostname"]);
    assert!(ok, "{out}\n{err}");
    let mut names: Vec<&str> = out.lines().collect();
    names.sort();
    assert_eq!(names, ["host-b", "host-c", "host-d"], "{out}\n{err}");

    // A batch job array, each task on some node, its output written there.
    let out_pattern = lab.dir.join("array-%a.out").display().to_string();
    let (ok, out, err) = slurm.run(
        &lab,
        "sbatch",
        &["--array=1-6", "-o", &out_pattern, "--wrap", "hostname"],
    );
    assert!(ok, "{out}\n{err}");
    slurm
        .wait_empty_queue(&lab, Duration::from_secs(30))
        .unwrap();
    for task in 1..=6 {
        let said = std::fs::read_to_string(lab.dir.join(format!("array-{task}.out"))).unwrap();
        assert!(
            ["host-b", "host-c", "host-d"].contains(&said.trim()),
            "task {task}: {said}"
        );
    }

    // A file broadcast to every node's own disk.
    let file = payload(&lab, "payload", 4);
    broadcast_and_check(&lab, &slurm, &file);

    // A job cancelled while it runs.
    let (ok, out, err) = slurm.run(&lab, "sbatch", &["--parsable", "--wrap", "sleep 300"]);
    assert!(ok, "{out}\n{err}");
    let job = out.trim().to_string();
    wait_until(Duration::from_secs(20), "the job to run", || {
        let (_, q, _) = slurm.run(&lab, "squeue", &["-h", "-j", &job, "-o", "%T"]);
        (q.trim() == "RUNNING").then_some(())
    })
    .unwrap();
    let (ok, _, err) = slurm.run(&lab, "scancel", &[&job]);
    assert!(ok, "{err}");
    slurm
        .wait_empty_queue(&lab, Duration::from_secs(20))
        .unwrap();

    // A node's agent restarted while the node is idle: the node still runs
    // job steps afterwards.
    lab.stop_agent("c").unwrap();
    lab.start_agent("c").unwrap();
    let again = wait_until(
        Duration::from_secs(30),
        "job steps on all nodes again",
        || {
            let (ok, out, _) = slurm.run(&lab, "srun", &["-N3", "hostname"]);
            (ok && out.lines().count() == 3).then_some(out)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.agent_log("c")));
    assert!(again.contains("host-c"), "{again}");
}

/// The swarm's checks: every copy whole (checked by `distribute`), the
/// tracker saw the members by virtual address only, and downloaders got
/// pieces from each other, not only from the seed.
fn check_swarm(
    lab: &Lab,
    swarm: &Swarm,
    run: &Distribution,
    tracker: &str,
    seed: &str,
    downloaders: &[&str],
) {
    let peers = swarm.announce(lab, tracker).unwrap();
    for p in &peers {
        assert!(
            is_virtual(p.ip()),
            "the tracker saw a real address: {peers:?}"
        );
    }
    for h in std::iter::once(&seed).chain(downloaders) {
        let vip = lab.host(h).virtual_ip;
        assert!(
            peers.iter().any(|p| *p.ip() == vip && p.port() == 6881),
            "{h} ({vip}) not among the tracker's peers {peers:?}"
        );
    }
    let seed_vip = lab.host(seed).virtual_ip;
    let mut among_members = 0;
    for c in &run.connections {
        assert!(
            is_virtual(c.local.ip()) && is_virtual(c.peer.ip()),
            "a swarm connection by real address: {c:?}"
        );
        if *c.peer.ip() != seed_vip {
            among_members += c.received;
        }
    }
    eprintln!("downloaders received {among_members} bytes from each other");
    assert!(
        among_members > 256 * 1024,
        "downloaders received only {among_members} bytes from each other"
    );
}

/// `file` shared by a swarm: the tracker on a, the seed on b, uploading
/// slowly (at `seed_rate`) so that downloaders that swap pieces finish well
/// before the seed alone could serve them, downloads on c, d and e; checked
/// by `check_swarm`. Returns how long the copies took.
fn share(lab: &mut Lab, file: &std::path::Path, seed_rate: &str, limit: Duration) -> Duration {
    let mut swarm = Swarm::start(lab, Route::Pvc, "a", file).unwrap();
    swarm.seed(lab, "b", Some(seed_rate)).unwrap();
    let downloaders = ["c", "d", "e"];
    let run = swarm.distribute(lab, &downloaders, limit, true).unwrap();
    check_swarm(lab, &swarm, &run, "a", "b", &downloaders);
    run.took
}

#[test]
fn a_bittorrent_swarm_shares_a_file_among_members_by_virtual_address_only() {
    let mut lab = Lab::lan(5).unwrap();
    lab.start_all().unwrap();
    let file = payload(&lab, "payload.bin", 8);
    let wire = lab.capture("net 240.0.0.0/4").unwrap();
    // 2 MiB/s for 3 copies of 8 MiB.
    let took = share(&mut lab, &file, "2M", Duration::from_secs(60));
    eprintln!("8 MiB to 3 members through PVC in {took:?}");
    assert_eq!(wire.finish().trim(), "", "virtual addresses on the wire");
}

/// Slurm and the swarm with members in different kinds of site: a public
/// controller and tracker, nodes behind a port-preserving NAT, a symmetric
/// NAT, a stateful firewall and a UPnP NAT. Each flow uses whatever
/// technique fits its pair; the test reports which.
#[test]
fn slurm_and_a_swarm_run_across_nated_and_firewalled_sites() {
    let mut lab = Lab::internet(&[
        (Site::Pub, 1),
        (Site::Cone, 1),
        (Site::Sym, 1),
        (Site::Fws, 1),
        (Site::Upnp, 1),
    ])
    .unwrap();
    lab.start_all().unwrap();
    let nodes = ["b", "c", "d", "e"];
    for h in std::iter::once(&"a").chain(&nodes) {
        lab.wait_for_peers(h, nodes.len()).unwrap();
    }
    let slurm = Slurm::start(&mut lab, Route::Pvc, "a", &nodes).unwrap();
    let (ok, out, err) = slurm.run(&lab, "srun", &["-N4", "hostname"]);
    assert!(ok, "{out}\n{err}");
    let mut names: Vec<&str> = out.lines().collect();
    names.sort();
    assert_eq!(names, ["host-b", "host-c", "host-d", "host-e"]);
    let file = payload(&lab, "payload.bin", 4);
    broadcast_and_check(&lab, &slurm, &file);

    share(&mut lab, &file, "1M", Duration::from_secs(90));

    // What each member's flows used, by site.
    let mut used = Vec::new();
    for h in std::iter::once(&"a").chain(&nodes) {
        let status = lab.status(h).unwrap();
        let opened = &status["flows_opened"];
        let techniques: Vec<String> = opened
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        assert!(!techniques.is_empty(), "{h} opened no flow: {status}");
        used.push(format!(
            "{h} ({}): {}",
            lab.site_of(h).name(),
            techniques.join(", ")
        ));
    }
    eprintln!("flows opened per technique:\n{}", used.join("\n"));
    assert_eq!(
        lab.leaks().unwrap(),
        0,
        "private or virtual addresses crossed the core"
    );
}
