//! Faults an operator's probe found: a second agent for a running instance,
//! connections between real addresses that reuse the ports of PVC flows, a
//! full masquerading map, a burst of first connections, and the fixes' edges.

use std::{path::Path, time::Duration};

use pvc_lab::{Lab, bin, probe, require_tools, wait_until};
use serde_json::Value;

const ECONNREFUSED: i64 = 111;

fn drops(lab: &Lab, host: &str, reason: &str) -> u64 {
    lab.status(host).unwrap()["drops"][reason]
        .as_u64()
        .unwrap_or(0)
}

fn counter(status: &Value, name: &str) -> u64 {
    status["agent_counters"][name].as_u64().unwrap_or(0)
}

/// Runs a python script as an application of `host`; one JSON value per line.
fn python(lab: &Lab, host: &str, script: &str) -> Vec<Value> {
    let out = lab.app(host, "python3").args(["-c", script]).ok().unwrap();
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn a_second_agent_for_a_running_instance_leaves_no_trace() {
    require_tools(&["python3", "ip"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    probe::echo_server(&mut lab, "b", 7100).unwrap();
    probe::echo_server(&mut lab, "a", 7102).unwrap();
    let (va, vb) = (lab.host("a").virtual_ip, lab.host("b").virtual_ip);
    let reply = probe::client(&lab, "a", vb, 7100).unwrap();
    assert_eq!(reply["reply"], "hello", "{reply} {}", lab.agent_log("a"));
    let pid = lab.agent_pid("a").unwrap();

    let a = lab.host("a");
    let out = Lab::command_in(&a.netns, Some(&a.cgroup), bin("pvc-agent"))
        .unwrap()
        .args(["--config"])
        .args([&a.config])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("another pvc-agent (pid {pid}) runs instance")),
        "{stderr}"
    );

    // The running agent lost nothing: address, routes, pins, socket, its
    // broker session, and the peers' view of it.
    let addrs = lab
        .ns(&a.netns, "ip")
        .args(["-4", "addr", "show", "dev", "lo"])
        .ok()
        .unwrap();
    assert!(addrs.contains(&va.to_string()), "{addrs}");
    let routes = lab.ns(&a.netns, "ip").args(["-4", "route"]).ok().unwrap();
    assert!(routes.contains(&vb.to_string()), "{routes}");
    assert!(Path::new("/sys/fs/bpf/pvc").join(&a.instance).exists());
    let status = lab.status("a").unwrap();
    assert_eq!(status["state"], "running", "{status}");
    assert!(status["broker"].is_string(), "{status}");
    std::thread::sleep(Duration::from_secs(1));
    let b = lab.status("b").unwrap();
    assert_eq!(b["peers"].as_array().unwrap().len(), 1, "{b}");
    assert_eq!(b["peers"][0]["authenticated"], true, "{b}");
    let a_status = lab.status("a").unwrap();
    assert!(
        a_status["broker"].is_string() && a_status["broker_refusal"].is_null(),
        "{a_status}"
    );
    assert_eq!(
        probe::client(&lab, "a", vb, 7100).unwrap()["reply"],
        "hello"
    );
    assert_eq!(
        probe::client(&lab, "b", va, 7102).unwrap()["reply"],
        "hello"
    );

    // `--cleanup` refuses too while the agent runs.
    let out = Lab::command_in(&a.netns, None, bin("pvc-agent"))
        .unwrap()
        .args(["--cleanup", "--config"])
        .args([&a.config])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        probe::client(&lab, "a", vb, 7100).unwrap()["reply"],
        "hello"
    );
}

/// Connects from `port` to `dst:dport`, binding `src` with SO_REUSEADDR,
/// sends a line and reads the echo; JSON with "ok" or "errno". `then` is
/// what to do with the socket: "keep" it open, "close" it at once, or
/// "drain" it (wait for the server to close first).
fn bound_connect(src: &str, port: u16, dst: &str, dport: u16, then: &str) -> String {
    format!(
        r#"
try:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("{src}", {port}))
    s.settimeout(3)
    s.connect(("{dst}", {dport}))
    s.sendall(b"x\n")
    assert s.recv(10) == b"x\n"
    if "{then}" == "drain":
        assert s.recv(10) == b""
    if "{then}" == "keep":
        kept.append(s)
    else:
        s.close()
    print(json.dumps({{"ok": True, "port": {port}}}), flush=True)
except OSError as e:
    print(json.dumps({{"ok": False, "port": {port}, "dst": "{dst}", "errno": e.errno, "error": str(e)}}), flush=True)
"#
    )
}

/// A server on `port` of `host` that echoes one line and closes first.
fn one_line_server(lab: &mut Lab, host: &str, port: u16) {
    let script = format!(
        r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {port}))
s.listen(4096)
while True:
    c, _ = s.accept()
    c.sendall(c.recv(10))
    c.close()
"#
    );
    lab.spawn(host, "python3", &["-c", &script]).unwrap();
    lab.wait_listening(host, port).unwrap();
}

#[test]
fn real_address_connections_reusing_the_ports_of_pvc_flows_work_and_collisions_are_refused() {
    require_tools(&["python3", "socat"]);
    let mut lab = Lab::lan(2).unwrap();
    // Flows translated at the socket are real connections to the kernel,
    // which keeps their tuples apart itself (socket_translation.rs).
    lab.translate_per_packet().unwrap();
    lab.start_all().unwrap();
    one_line_server(&mut lab, "b", 7002);
    probe::echo_server(&mut lab, "b", 7001).unwrap();
    let (vb, ra, rb) = (
        lab.host("b").virtual_ip.to_string(),
        lab.host("a").real.to_string(),
        lab.host("b").real.to_string(),
    );

    // The client ports bound below lie under the ephemeral range (32768-60999
    // in a new namespace): a kernel-chosen port of the unforced connections
    // left in TIME_WAIT would otherwise refuse the bind (EADDRINUSE) now and
    // then, whatever SO_REUSEADDR says, since those sockets did not set it.
    //
    // The probe's repro, forced on 40 ports: a PVC flow from port p ends,
    // then a connection between the real addresses from the same port; and
    // the same with the client closing first (its last packets still cross
    // when the next SYN leaves).
    let mut script = String::from("import socket, json\nkept = []\n");
    for p in 30001..30041 {
        script += &bound_connect("0.0.0.0", p, &vb, 7002, "drain");
        script += &bound_connect(&ra, p, &rb, 7002, "drain");
    }
    for p in 30041..30046 {
        script += &bound_connect("0.0.0.0", p, &vb, 7002, "close");
        script += &bound_connect(&ra, p, &rb, 7002, "close");
    }
    let results = python(&lab, "a", &script);
    assert_eq!(results.len(), 90);
    let failed: Vec<&Value> = results.iter().filter(|r| r["ok"] != true).collect();
    assert!(failed.is_empty(), "{failed:?}");

    // Unforced, as applications do it: 300 connections to the virtual
    // address, then 300 to the real one, ports chosen by the kernel.
    let script = format!(
        r#"
import socket, json
fails = []
for dst in ["{vb}"] * 300 + ["{rb}"] * 300:
    try:
        s = socket.create_connection((dst, 7002), timeout=3)
        s.sendall(b"x\n")
        assert s.recv(10) == b"x\n"
        s.close()
    except OSError as e:
        fails.append([dst, e.errno, str(e)])
print(json.dumps(fails))
"#
    );
    let fails = python(&lab, "a", &script).remove(0);
    assert_eq!(fails, serde_json::json!([]));

    // A live PVC flow and a new real-address connection on its wire tuple:
    // the new one is refused at once, the PVC flow keeps working. Then the
    // other way round.
    let script = format!(
        "import socket, json\nkept = []\n{}{}{}{}{}",
        bound_connect("0.0.0.0", 30100, &vb, 7001, "keep"),
        bound_connect(&ra, 30100, &rb, 7001, "keep"),
        bound_connect(&ra, 30101, &rb, 7001, "keep"),
        bound_connect("0.0.0.0", 30101, &vb, 7001, "keep"),
        r#"
for s in kept:
    s.sendall(b"y\n")
    assert s.recv(10) == b"y\n"
print(json.dumps({"survivors": len(kept)}), flush=True)
"#
    );
    let results = python(&lab, "a", &script);
    assert_eq!(results[0]["ok"], true, "{results:?}");
    assert_eq!(results[1]["errno"], ECONNREFUSED, "{results:?}");
    assert_eq!(results[2]["ok"], true, "{results:?}");
    assert_eq!(results[3]["errno"], ECONNREFUSED, "{results:?}");
    assert_eq!(results[4]["survivors"], 2, "{results:?}");
    assert_eq!(drops(&lab, "a", "flow_collision"), 2);
    let log = lab.agent_log("a");
    assert!(
        log.contains("another live connection between the same two hosts uses its real ports"),
        "{log}"
    );
}

#[test]
fn a_full_masquerading_map_refuses_new_flows_and_keeps_established_ones() {
    require_tools(&["python3", "socat"]);
    let mut lab = Lab::lan(2).unwrap();
    for i in 0..2 {
        lab.write_config(i, pvc_lab::PER_PACKET).unwrap();
        let text = std::fs::read_to_string(&lab.hosts[i].config)
            .unwrap()
            .replace("max_flows = 4096", "max_flows = 64");
        std::fs::write(&lab.hosts[i].config, text).unwrap();
    }
    lab.start_all().unwrap();
    probe::echo_server(&mut lab, "b", 7200).unwrap();
    let vb = lab.host("b").virtual_ip;
    // 100 connections held open, then 300 short ones, then the open ones
    // are used again.
    let script = format!(
        r#"
import socket, json, time
def connect():
    s = socket.socket()
    s.settimeout(5)
    t = time.time()
    try:
        s.connect(("{vb}", 7200))
        s.sendall(b"x\n")
        assert s.recv(10) == b"x\n"
        return s, None, time.time() - t
    except OSError as e:
        s.close()
        return None, e.errno, time.time() - t
idle, refused, slow = [], {{}}, 0
for _ in range(100):
    s, err, took = connect()
    if s: idle.append(s)
    else: refused[str(err)] = refused.get(str(err), 0) + 1
    slow += took > 0.9
short_ok, short_refused = 0, {{}}
for _ in range(300):
    s, err, took = connect()
    if s:
        short_ok += 1
        s.close()
    else: short_refused[str(err)] = short_refused.get(str(err), 0) + 1
    slow += took > 0.9
alive = 0
for s in idle:
    try:
        s.sendall(b"y\n")
        alive += s.recv(10) == b"y\n"
    except OSError:
        pass
print(json.dumps({{"idle": len(idle), "refused": refused, "short_ok": short_ok,
                  "short_refused": short_refused, "alive": alive, "slow": slow}}))
"#
    );
    let r = python(&lab, "a", &script).remove(0);
    let idle = r["idle"].as_u64().unwrap();
    assert!((1..=64).contains(&idle), "{r}");
    assert_eq!(r["alive"], idle, "established flows were broken: {r}");
    let refused = r["refused"][ECONNREFUSED.to_string()].as_u64().unwrap_or(0);
    assert_eq!(refused + idle, 100, "refusals must be ECONNREFUSED: {r}");
    assert_eq!(r["slow"], 0, "a refusal waited for a timeout: {r}");
    let short_refused = r["short_refused"][ECONNREFUSED.to_string()]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(r["short_ok"].as_u64().unwrap() + short_refused, 300, "{r}");

    let status = lab.status("a").unwrap();
    assert_eq!(status["flow_capacity"], 128, "{status}");
    assert!(status["flows"].as_array().unwrap().len() <= 128);
    assert!(drops(&lab, "a", "flow_table_full") >= 1);
    assert!(counter(&status, "refused_syns_answered") >= 1, "{status}");
    let log = lab.agent_log("a");
    assert!(
        log.contains("the masquerading map is full (64 flows)"),
        "{log}"
    );
    assert!(log.contains("Raise interposition.max_flows"), "{log}");
}

#[test]
fn a_burst_of_first_connections_to_a_new_member_completes_without_retransmits() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    let vb = lab.host("b").virtual_ip;
    let server = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7300))
s.listen(4096)
while True:
    c, _ = s.accept()
    c.close()
"#;
    lab.spawn("b", "python3", &["-c", server]).unwrap();
    lab.wait_listening("b", 7300).unwrap();
    // 300 connects at once to a member never talked to: every SYN is held
    // while the agents authenticate, then re-sent. A SYN the agent could
    // not keep would be retransmitted by TCP after a second.
    let script = format!(
        r#"
import socket, json, select
def syn_retransmits():
    lines = open("/proc/net/netstat").read().splitlines()
    for head, vals in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            return dict(zip(head.split()[1:], map(int, vals.split()[1:])))["TCPSynRetrans"]
before = syn_retransmits()
socks = []
for _ in range(300):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex(("{vb}", 7300))
    socks.append(s)
pending, ok, failed = set(socks), 0, 0
while pending:
    _, w, _ = select.select([], list(pending), [], 10)
    if not w:
        break
    for s in w:
        pending.discard(s)
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0: ok += 1
        else: failed += 1
print(json.dumps({{"ok": ok, "failed": failed, "pending": len(pending),
                  "syn_retransmits": syn_retransmits() - before}}))
"#
    );
    let r = python(&lab, "a", &script).remove(0);
    assert_eq!(r["ok"], 300, "{r}");
    assert_eq!(r["syn_retransmits"], 0, "{r}");
    let status = lab.status("a").unwrap();
    assert_eq!(counter(&status, "held_overflow"), 0, "{status}");
    assert!(counter(&status, "held_resent") >= 1, "{status}");
}

#[test]
fn an_agent_restarted_after_a_clean_stop_waits_for_its_broker_before_attaching() {
    require_tools(&["python3", "ip"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_broker().unwrap();
    lab.admit("a", &[]).unwrap();
    // b is not admitted: it waits, attaches nothing, and says so.
    lab.start_agents().unwrap();
    let b = lab.status("b").unwrap();
    assert_eq!(b["state"], "waiting for admission", "{b}");
    let ns = lab.host("b").netns.clone();
    let addrs = lab
        .ns(&ns, "ip")
        .args(["-4", "addr", "show", "dev", "lo"])
        .ok()
        .unwrap();
    assert!(!addrs.contains("240."), "{addrs}");
    assert!(
        !Path::new("/sys/fs/bpf/pvc")
            .join(&lab.host("b").instance)
            .exists()
    );
    // Admitted, it attaches and joins.
    lab.admit("b", &[]).unwrap();
    wait_until(Duration::from_secs(20), "b to attach", || {
        (lab.status("b").ok()?["state"] == "running").then_some(())
    })
    .unwrap();
    lab.wait_for_peers("b", 1).unwrap();
    lab.wait_for_peers("a", 1).unwrap();
    probe::echo_server(&mut lab, "a", 7400).unwrap();
    let va = lab.host("a").virtual_ip;
    assert_eq!(
        probe::client(&lab, "b", va, 7400).unwrap()["reply"],
        "hello"
    );
}
