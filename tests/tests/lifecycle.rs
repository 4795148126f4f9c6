//! Agents and brokers coming and going: clean stops undo everything, crashes
//! leave a working data path, broker loss does not cut established flows.

use std::{path::Path, time::Duration};

use pvc_lab::{BROKER_IP, BROKER_PORT, Lab, Spawned, probe, require_tools, wait_until};
use serde_json::Value;

const EHOSTUNREACH: i64 = 113;
const ENETUNREACH: i64 = 101;

/// An echo server on `server` and a client on `client` exchanging a line
/// every 50 ms for `seconds` over one TCP connection.
fn chatter(lab: &mut Lab, client: &str, server: &str, port: u16, seconds: u32) -> Spawned {
    probe::echo_server(lab, server, port).unwrap();
    let dst = lab.host(server).virtual_ip;
    probe::chatter(lab, client, dst, port, seconds).unwrap()
}

fn chatter_result(lab: &mut Lab, c: &Spawned) -> Value {
    probe::chatter_result(lab, c).unwrap()
}

fn connects(lab: &Lab, client: &str, server: &str, port: u16) -> Value {
    probe::client(lab, client, lab.host(server).virtual_ip, port).unwrap()
}

#[test]
fn a_clean_stop_removes_everything_and_a_restart_restores_the_cluster() {
    require_tools(&["python3", "ip"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    probe::server(&mut lab, "b", "0.0.0.0", 7300, 2).unwrap();
    assert_eq!(connects(&lab, "a", "b", 7300)["reply"], "echo:hello");

    let status = lab.stop_agent("a").unwrap();
    assert!(
        status.success(),
        "agent exited with {status}:\n{}",
        lab.agent_log("a")
    );
    let a = lab.host("a");
    let ns = a.netns.clone();
    let routes = lab
        .ns(&ns, "ip")
        .args(["-4", "route", "show"])
        .ok()
        .unwrap();
    assert!(!routes.contains("240."), "routes left:\n{routes}");
    let addrs = lab
        .ns(&ns, "ip")
        .args(["-4", "addr", "show", "dev", "lo"])
        .ok()
        .unwrap();
    assert!(!addrs.contains("240.0.0.1"), "address left:\n{addrs}");
    let neigh = lab
        .ns(&ns, "ip")
        .args(["neigh", "show", "dev", "eth0"])
        .ok()
        .unwrap();
    assert!(!neigh.contains("240.0.0.0"), "neighbour left:\n{neigh}");
    assert!(
        !Path::new("/sys/fs/bpf/pvc").join(&a.instance).exists(),
        "pins left"
    );
    assert!(!a.socket.exists(), "control socket left");
    // With the hook gone, a virtual address is simply unroutable.
    let got = probe::client(&lab, "a", lab.host("b").virtual_ip, 7300).unwrap();
    assert_eq!(got["errno"], ENETUNREACH, "{got}");

    // b learnt that a left: connecting to a fails at once.
    wait_until(Duration::from_secs(10), "b to forget a", || {
        let s = lab.status("b").ok()?;
        s["peers"].as_array()?.is_empty().then_some(())
    })
    .unwrap();
    assert_eq!(connects(&lab, "b", "a", 7300)["errno"], EHOSTUNREACH);

    lab.start_agent("a").unwrap();
    lab.wait_for_peers("a", 1).unwrap();
    lab.wait_for_peers("b", 1).unwrap();
    assert_eq!(connects(&lab, "a", "b", 7300)["reply"], "echo:hello");
    probe::server(&mut lab, "a", "0.0.0.0", 7301, 1).unwrap();
    assert_eq!(connects(&lab, "b", "a", 7301)["reply"], "echo:hello");
}

#[test]
fn a_crashed_agent_leaves_a_working_data_path_that_its_successor_takes_over() {
    require_tools(&["python3", "socat"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    let chat = chatter(&mut lab, "a", "b", 7400, 6);
    std::thread::sleep(Duration::from_millis(500));

    lab.kill_agent("a");
    // The kernel alone: new flows in both directions still work.
    probe::server(&mut lab, "b", "0.0.0.0", 7401, 1).unwrap();
    assert_eq!(connects(&lab, "a", "b", 7401)["reply"], "echo:hello");
    probe::server(&mut lab, "a", "0.0.0.0", 7402, 2).unwrap();
    assert_eq!(connects(&lab, "b", "a", 7402)["reply"], "echo:hello");

    lab.start_agent("a").unwrap();
    assert_eq!(lab.status("a").unwrap()["takeover"], true);
    lab.wait_for_peers("a", 1).unwrap();
    let result = chatter_result(&mut lab, &chat);
    assert_eq!(
        result["ok"], true,
        "the connection across the crash: {result}"
    );
    assert!(result["exchanges"].as_u64().unwrap() > 50, "{result}");
    let after = connects(&lab, "b", "a", 7402);
    assert_eq!(
        after["reply"],
        "echo:hello",
        "{after}\n{}",
        lab.agent_log("a")
    );
}

#[test]
fn losing_the_broker_cuts_no_flow_and_agents_register_again() {
    require_tools(&["python3", "socat"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    let chat = chatter(&mut lab, "b", "a", 7500, 5);
    std::thread::sleep(Duration::from_millis(300));
    lab.kill_broker();
    // Known peers keep their paths: new flows need no broker.
    probe::server(&mut lab, "b", "0.0.0.0", 7501, 1).unwrap();
    assert_eq!(connects(&lab, "a", "b", 7501)["reply"], "echo:hello");

    lab.start_broker().unwrap();
    for h in ["a", "b"] {
        wait_until(Duration::from_secs(30), "agents to register again", || {
            lab.status(h).ok()?["broker"].as_str().map(|_| ())
        })
        .unwrap();
    }
    let result = chatter_result(&mut lab, &chat);
    assert_eq!(result["ok"], true, "{result}");
    lab.wait_for_peers("a", 1).unwrap();
}

#[test]
fn the_broker_answers_garbage_with_an_error_and_keeps_serving() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    let script = format!(
        r#"
import socket, sys
for garbage in [b"GET / HTTP/1.0\r\n\r\n", b"PVC\x01\xff\xff\xff\xff", b"PVC\x07\x00\x00\x00\x00", b"PVC\x01\x00\x00\x00\x03\xff\xff\xff"]:
    s = socket.create_connection(("{BROKER_IP}", {BROKER_PORT}), timeout=5)
    s.sendall(garbage)
    answer = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        answer += chunk
    print(answer[:4].hex(), len(answer))
"#
    );
    let a_ns = lab.host("a").netns.clone();
    let out = lab.ns(&a_ns, "python3").args(["-c", &script]).ok().unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    for l in lines {
        // An error frame ("PVC" and a version byte), then the broker closed.
        assert!(l.starts_with("505643"), "{out}");
    }
    // The members never noticed.
    for h in ["a", "b"] {
        let s = lab.status(h).unwrap();
        assert!(s["broker"].is_string(), "{s}");
    }
    lab.wait_for_peers("a", 1).unwrap();
}

#[test]
fn ended_flows_are_retired_from_the_masquerading_map() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(2).unwrap();
    // Flows in the masquerading map: every flow per packet.
    let fast_gc = format!(
        "{}[flows]\nclosed_timeout_secs = 1\ngc_interval_secs = 1\n",
        pvc_lab::PER_PACKET
    );
    lab.write_config(0, &fast_gc).unwrap();
    lab.write_config(1, &fast_gc).unwrap();
    lab.start_all().unwrap();
    probe::server(&mut lab, "b", "0.0.0.0", 7600, 5).unwrap();
    let results = probe::clients(&lab, "a", lab.host("b").virtual_ip, 7600, 5).unwrap();
    assert!(
        results.iter().all(|r| r["reply"] == "echo:hello"),
        "{results:?}"
    );
    let flows = lab.pvc_json("a", &["flows"]).unwrap();
    assert!(
        !flows.as_array().unwrap().is_empty(),
        "the flows were in the map"
    );
    // Closed (FIN seen) and idle for a second: both ends drop both directions.
    for h in ["a", "b"] {
        wait_until(
            Duration::from_secs(15),
            &format!("{h}'s map to empty"),
            || {
                lab.pvc_json(h, &["flows"])
                    .ok()?
                    .as_array()?
                    .is_empty()
                    .then_some(())
            },
        )
        .unwrap();
    }
}

#[test]
fn a_local_policy_holds_across_a_crash_without_waiting_for_the_broker() {
    require_tools(&["python3", "socat"]);
    const EPERM: i64 = 1;
    let mut lab = Lab::lan(2).unwrap();
    lab.write_config(
        0,
        "[policy]\noutbound = [{ peers = [\"host-b\"], ports = [\"7701\"] }]\n",
    )
    .unwrap();
    lab.start_all().unwrap();
    probe::echo_server(&mut lab, "b", 7701).unwrap();
    probe::echo_server(&mut lab, "b", 7702).unwrap();
    let vb = lab.host("b").virtual_ip;
    assert_eq!(
        probe::client(&lab, "a", vb, 7701).unwrap()["reply"],
        "hello"
    );
    assert_eq!(probe::client(&lab, "a", vb, 7702).unwrap()["errno"], EPERM);

    // The broker is gone and a's agent crashes: its successor takes the
    // pinned data path over, policy included, with nobody to ask.
    lab.kill_broker();
    lab.kill_agent("a");
    lab.start_agent("a").unwrap();
    assert_eq!(lab.status("a").unwrap()["state"], "running");
    assert_eq!(probe::client(&lab, "a", vb, 7702).unwrap()["errno"], EPERM);
    assert_eq!(
        probe::client(&lab, "a", vb, 7701).unwrap()["reply"],
        "hello"
    );
    assert_eq!(lab.status("a").unwrap()["takeover"], true);
}
