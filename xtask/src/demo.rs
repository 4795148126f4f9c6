//! The demo: a virtual cluster of three hosts on one LAN, in network
//! namespaces, with a broker and one agent per host; unmodified programs
//! talk over virtual addresses. Everything is removed at the end, also on
//! failure or Ctrl-C.

use std::{
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use pvc_lab::{
    BROKER_IP, BROKER_PORT, Lab, bin,
    grid::{Route, Slurm, Swarm},
    probe, wait_until,
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn step(title: &str) {
    if INTERRUPTED.load(Ordering::Relaxed) {
        // Unwinding drops the lab, which cleans up.
        panic!("interrupted");
    }
    println!("\n\x1b[1m== {title}\x1b[0m");
}

fn show(text: &str) {
    for line in text.lines() {
        println!("   {line}");
    }
}

fn pvc(lab: &Lab, host: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin("pvc"))
        .args(args)
        .arg("--socket")
        .arg(&lab.host(host).socket)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Ctrl-C ends the demo at the next step, cleaning up.
fn stop_at_next_step_on_ctrl_c() {
    extern "C" fn on_signal(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::Relaxed);
    }
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn run() -> anyhow::Result<()> {
    stop_at_next_step_on_ctrl_c();
    pvc_lab::require_tools(&["python3", "curl", "socat", "iperf3", "tcpdump"]);

    step("A LAN of three hosts, each in its own network namespace and cgroup");
    let mut lab = Lab::lan(3)?;
    for h in &lab.hosts {
        println!(
            "   host {}: real address {} on eth0, virtual address {}",
            h.name, h.real, h.virtual_ip
        );
    }
    println!("   broker: {BROKER_IP}:{BROKER_PORT} (pvc-broker)");
    println!("\n   The administrator created the cluster and every host its key pair:");
    println!(
        "   $ pvc master init            -> master_key = \"{}\"",
        lab.master_key
    );
    println!(
        "   $ pvc keygen                 (on each host; the private key stays there, mode 0600)"
    );

    step("The broker starts; the master admits each host; one pvc-agent per host");
    lab.start_broker()?;
    lab.admit_and_start_all()?;
    println!(
        "   $ pvc master admit --name host-a --virtual-ip 240.0.0.1 --host-key <a's key> --broker ..."
    );
    println!("   $ pvc master list");
    show(&lab.master(&["list"])?);
    println!(
        "\n   Every agent loaded its eBPF programs (cgroup connect4, tc ingress/egress on eth0),"
    );
    println!("   added its virtual address, registered with its host key, and checked the other");
    println!("   members' records against the master key. Paths are authenticated on first use.");
    println!("\n   $ pvc peers          (on host a)");
    show(&pvc(&lab, "a", &["peers"])?);

    let (a, b, c) = (
        lab.host("a").virtual_ip,
        lab.host("b").virtual_ip,
        lab.host("c").virtual_ip,
    );

    step(&format!(
        "An unmodified web server on host b, bound to its virtual address {b}"
    ));
    let www = lab.dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), "hello from host b, over PVC\n")?;
    let server = lab.spawn(
        "b",
        "python3",
        &[
            "-m",
            "http.server",
            "8080",
            "--bind",
            &b.to_string(),
            "--directory",
            www.to_str().unwrap(),
        ],
    )?;
    lab.wait_listening("b", 8080)?;
    println!("   $ python3 -m http.server 8080 --bind {b}");

    step(&format!(
        "curl from host a to http://{b}:8080/, watching the LAN with tcpdump"
    ));
    let capture = lab.capture("-c 6 tcp port 8080")?;
    let body = lab
        .app("a", "curl")
        .args(["-sS", "--max-time", "5", &format!("http://{b}:8080/")])
        .ok()?;
    println!("   $ curl http://{b}:8080/");
    show(&body);
    let wire = capture.finish();
    println!(
        "\n   On the wire only real addresses appear; the SYN carries PVC's flow tag (option 253):"
    );
    for line in wire.lines().filter(|l| l.contains(" > ")).take(4) {
        // Checksums are left out: with veth offloads, tcpdump sees them before the "NIC" fills them.
        let line = match (line.find(", cksum"), line.find("), seq")) {
            (Some(i), Some(j)) if i < j => format!("{}{}", &line[..i], &line[j + 1..]),
            _ => line.to_string(),
        };
        show(line.trim());
    }
    println!(
        "\n   Before that SYN left, a and b proved their keys to each other through the broker"
    );
    println!("   (challenge-response); a held the SYN meanwhile and re-sent it:");
    for line in lab
        .agent_log("a")
        .lines()
        .filter(|l| l.contains("authenticated and installed"))
    {
        show(line.split("INFO ").last().unwrap_or(line));
    }
    let log = wait_until(Duration::from_secs(5), "server log", || {
        let text = std::fs::read_to_string(&server.log).ok()?;
        text.contains("GET /").then_some(text)
    })?;
    println!("\n   The server's access log: accept() returned host a's VIRTUAL address:");
    for line in log.lines().filter(|l| l.contains("GET /")) {
        show(line);
    }

    step(&format!(
        "A socat echo server on host a; host c connects to {a}:9000"
    ));
    let socat = lab.spawn(
        "a",
        "socat",
        &["-d", "-d", "TCP-LISTEN:9000,fork,reuseaddr", "EXEC:cat"],
    )?;
    lab.wait_listening("a", 9000)?;
    let got = probe::client(&lab, "c", a, 9000)?;
    println!(
        "   client on c: getpeername() = {}, getsockname() = {}, reply {}",
        got["peer"], got["local"], got["reply"]
    );
    let socat_log = wait_until(Duration::from_secs(5), "socat log", || {
        let t = std::fs::read_to_string(&socat.log).ok()?;
        t.contains("accepting connection").then_some(t)
    })?;
    for line in socat_log
        .lines()
        .filter(|l| l.contains("accepting connection from"))
    {
        show(line.split("N ").last().unwrap_or(line));
    }

    step(&format!(
        "iperf3 from host c to host b ({c} -> {b}), 2 seconds"
    ));
    lab.spawn("b", "iperf3", &["-s", "-1", "-B", &b.to_string()])?;
    lab.wait_listening("b", 5201)?;
    let out = lab
        .app("c", "iperf3")
        .args(["-c", &b.to_string(), "-t", "2", "-J"])
        .ok()?;
    let r: serde_json::Value = serde_json::from_str(&out).context("iperf3 output")?;
    let gbps = r["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9;
    println!(
        "   {gbps:.2} Gbit/s through PVC's eBPF data path, no encapsulation, no copy to userspace"
    );

    step("Connecting to 240.0.0.99, which no member holds (from host a)");
    let refused = probe::client(&lab, "a", "240.0.0.99".parse()?, 80)?;
    println!("   connect() failed at once: {}", refused["error"]);

    step("An impostor: host d has a key pair, but the master never admitted it");
    let d = lab.add_host()?;
    lab.start_agent(&d)?;
    let d_key = lab.host(&d).public_key.clone();
    wait_until(Duration::from_secs(10), "d's refusal", || {
        lab.agent_log(&d)
            .contains(&format!("--host-key {d_key}"))
            .then_some(())
    })?;
    for line in lab
        .agent_log(&d)
        .lines()
        .filter(|l| l.contains("not admitted"))
        .take(1)
    {
        show(line.split("ERROR ").last().unwrap_or(line));
    }
    let got = probe::client(&lab, &d, a, 9000)?;
    println!("   connect() from d to {a}: {}", got["error"]);

    step("pvc status on host b");
    show(&pvc(&lab, "b", &["status"])?);
    // A flow that is open while the map is listed: flows carried at the
    // socket leave it when their socket closes.
    probe::echo_server(&mut lab, "b", 9100)?;
    let open = probe::chatter(&mut lab, "a", b, 9100, 2)?;
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "\n   $ pvc flows          (on host b, while a exchanges messages with it: the masquerading map, and flows translated at the socket)"
    );
    show(&pvc(&lab, "b", &["flows"])?);
    probe::chatter_result(&mut lab, &open)?;

    step(
        "Cleaning up: agents stop (removing routes, addresses, eBPF programs and pins), namespaces go",
    );
    drop(lab);
    println!("   done. To run PVC on real hosts, see \"Running a real cluster\" in README.md.");
    Ok(())
}

/// `demo --grid`: unmodified cluster software across the virtual cluster:
/// a Slurm cluster and a BitTorrent swarm on four hosts that know each
/// other only by virtual addresses.
pub fn grid() -> anyhow::Result<()> {
    stop_at_next_step_on_ctrl_c();
    step("Four hosts on a LAN, each with its own hostname, namespace, cgroup and pvc-agent");
    let mut lab = Lab::lan(4)?;
    lab.start_all()?;
    for h in &lab.hosts {
        println!("   host-{}: virtual address {}", h.name, h.virtual_ip);
    }

    step(
        "Slurm: slurmctld on host-a, slurmd on host-b, -c, -d; slurm.conf names virtual addresses only",
    );
    let slurm = Slurm::start(&mut lab, Route::Pvc, "a", &["b", "c", "d"])?;
    let conf = std::fs::read_to_string(&slurm.conf)?;
    for line in conf
        .lines()
        .filter(|l| l.starts_with("SlurmctldHost") || l.starts_with("NodeName"))
    {
        show(line);
    }
    let slurm_cmd = |args: &[&str]| -> anyhow::Result<String> {
        let (ok, out, err) = slurm.run(&lab, args[0], &args[1..]);
        anyhow::ensure!(ok, "{}: {out}{err}", args.join(" "));
        Ok(out)
    };
    println!("\n   $ sinfo -N");
    show(&slurm_cmd(&["sinfo", "-N"])?);

    step(
        "srun -N3 hostname (on host-a): a job step on three members, slurmd connecting back to srun",
    );
    show(&slurm_cmd(&["srun", "-N3", "-l", "hostname"])?);

    step("sbcast: an 8 MiB file from host-a to each node's own disk");
    let file = lab.dir.join("dataset.bin");
    let bytes: Vec<u8> = (0..8usize << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &bytes)?;
    let took = slurm.sbcast(&lab, &file, "dataset.bin", 3)?;
    for n in &slurm.nodes {
        let same = std::fs::read(slurm.scratch(n).join("dataset.bin"))? == bytes;
        println!(
            "   host-{n}: a copy, {}",
            if same { "identical" } else { "DIFFERENT" }
        );
    }
    println!("   sbcast took {:.2} s", took.as_secs_f64());

    step(
        "BitTorrent: opentracker on host-a, aria2c seeding on host-a (at most 2 MiB/s, as from a home uplink), downloading on host-b, -c, -d",
    );
    let mut swarm = Swarm::start(&mut lab, Route::Pvc, "a", &file)?;
    swarm.seed(&mut lab, "a", Some("2M"))?;
    let run = swarm.distribute(&mut lab, &["b", "c", "d"], Duration::from_secs(60), true)?;
    println!(
        "   three identical copies in {:.2} s; the tracker saw these peers:",
        run.took.as_secs_f64()
    );
    for p in swarm.announce(&lab, "a")? {
        show(&p.to_string());
    }
    let mut between_nodes = 0;
    let a = lab.host("a").virtual_ip;
    for c in &run.connections {
        if *c.peer.ip() != a {
            between_nodes += c.received;
        }
    }
    println!(
        "   the nodes received {:.1} MiB from each other, not from the seed",
        between_nodes as f64 / (1 << 20) as f64
    );

    step("pvc peers on host-a");
    show(&pvc(&lab, "a", &["peers"])?);
    step("Cleaning up");
    drop(lab);
    println!("   done. To run Slurm over PVC on real hosts, see \"Slurm over PVC\" in README.md.");
    Ok(())
}
