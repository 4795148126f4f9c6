//! Translation at the socket (`interposition.translation = "socket"`):
//! flows over a direct path go to the member's real address from connect()
//! on, so that no packet of theirs is rewritten, while both ends' sockets
//! still see only virtual addresses. Real agents, real programs.

use std::time::Duration;

use pvc_lab::{Lab, Site, probe, require_tools, wait_until};
use serde_json::Value;

const ECONNREFUSED: i64 = 111;

/// The `[interposition]` line of a host translating at the socket.
const SOCKET: &str = "translation = \"socket\"\n";

/// `lab` started with every host translating at the socket.
fn started_at_the_socket(mut lab: Lab) -> Lab {
    for i in 0..lab.hosts.len() {
        lab.write_config(i, SOCKET).unwrap();
    }
    lab.start_all().unwrap();
    lab
}

/// A LAN of `n` hosts translating at the socket, with a first flow from
/// a to every other host.
fn socket_lab(n: usize) -> Lab {
    with_first_flows(started_at_the_socket(Lab::lan(n).unwrap()))
}

/// `lab` after a first flow from a to every other host: the first flow to
/// a member waits for its authentication and is masqueraded per packet;
/// later ones can be translated at the socket.
fn with_first_flows(mut lab: Lab) -> Lab {
    for h in 1..lab.hosts.len() {
        let name = lab.hosts[h].name.clone();
        let vip = lab.host(&name).virtual_ip;
        probe::echo_server(&mut lab, &name, 6999).unwrap();
        let got = probe::client(&lab, "a", vip, 6999).unwrap();
        assert_eq!(got["reply"], "hello", "first flow a -> {name}: {got}");
    }
    lab
}

/// The flows `pvc status` lists on `host` with this port on either end.
fn flows_on_port(lab: &Lab, host: &str, port: u16) -> Vec<Value> {
    let needle = format!(":{port}");
    let status = lab.status(host).unwrap();
    status["flows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["from"].as_str().unwrap().contains(&needle))
        .cloned()
        .collect()
}

fn directions(flows: &[Value]) -> Vec<String> {
    let mut d: Vec<String> = flows
        .iter()
        .map(|f| f["direction"].as_str().unwrap().to_string())
        .collect();
    d.sort();
    d
}

fn traffic(lab: &Lab, host: &str) -> u64 {
    let t = lab.status(host).unwrap()["traffic"].clone();
    t["egress_packets"].as_u64().unwrap() + t["ingress_packets"].as_u64().unwrap()
}

#[test]
fn flows_over_a_direct_path_are_translated_at_the_socket_and_both_ends_see_virtual_addresses() {
    require_tools(&["python3", "socat", "ss", "tcpdump"]);
    let mut lab = socket_lab(2);
    let (a, b) = (lab.host("a").virtual_ip, lab.host("b").virtual_ip);
    let b_real = lab.host("b").real;
    let capture = lab.capture("net 240.0.0.0/4").unwrap();

    // accept(), getpeername() and getsockname() on both ends: virtual.
    let log = probe::server(&mut lab, "b", "0.0.0.0", 7000, 1).unwrap();
    let got = probe::client(&lab, "a", b, 7000).unwrap();
    assert_eq!(got["reply"], "echo:hello", "{got}");
    assert_eq!(got["peer"], b.to_string(), "client's getpeername()");
    assert_eq!(got["local"], a.to_string(), "client's getsockname()");
    let seen = wait_until(Duration::from_secs(5), "server log", || {
        probe::accepted(&log).pop()
    })
    .unwrap();
    assert_eq!(seen["peer"], a.to_string(), "server's accept()");
    assert_eq!(seen["local"], b.to_string(), "server's getsockname()");

    // A long-lived flow: its socket is connected to the real address (what
    // `ss` shows), `pvc flows` lists it as translated at the socket on both
    // ends, and no packet of it goes through the masquerading rewrite.
    probe::echo_server(&mut lab, "b", 7100).unwrap();
    let packets_before = (traffic(&lab, "a"), traffic(&lab, "b"));
    let chatter = probe::chatter(&mut lab, "a", b, 7100, 3).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let ss = lab
        .app("a", "ss")
        .args(["-tnH", "state", "established"])
        .ok()
        .unwrap();
    assert!(ss.contains(&format!("{b_real}:7100")), "a's ss: {ss}");
    assert!(!ss.contains(&format!("{b}:7100")), "a's ss: {ss}");
    let on_a = flows_on_port(&lab, "a", 7100);
    assert_eq!(directions(&on_a), ["socket"], "a's flows: {on_a:?}");
    assert_eq!(on_a[0]["technique"], "lan");
    assert_eq!(on_a[0]["peer"], b.to_string());
    assert!(
        on_a[0]["to"]
            .as_str()
            .unwrap()
            .ends_with(&format!("{b_real}:7100")),
        "{on_a:?}"
    );
    let on_b = flows_on_port(&lab, "b", 7100);
    assert_eq!(directions(&on_b), ["socket"], "b's flows: {on_b:?}");
    assert_eq!(on_b[0]["peer"], a.to_string());
    let result = probe::chatter_result(&mut lab, &chatter).unwrap();
    assert_eq!(result["ok"], true, "{result}");
    assert!(result["exchanges"].as_u64().unwrap() > 20, "{result}");
    assert_eq!(
        (traffic(&lab, "a"), traffic(&lab, "b")),
        packets_before,
        "packets of socket-level flows were masqueraded"
    );
    // Their entries go with their sockets.
    wait_until(Duration::from_secs(5), "socket flows to end", || {
        (flows_on_port(&lab, "a", 7100).is_empty() && flows_on_port(&lab, "b", 7100).is_empty())
            .then_some(())
    })
    .unwrap();

    // A server bound to its virtual address: tc ingress hands it the
    // member's verified SYN, so both ends carry the flow at the socket,
    // and the server still sees only virtual addresses.
    let log = probe::server(&mut lab, "b", &b.to_string(), 7001, 1).unwrap();
    let got = probe::client(&lab, "a", b, 7001).unwrap();
    assert_eq!(got["reply"], "echo:hello", "{got}");
    assert_eq!(got["peer"], b.to_string(), "client's getpeername()");
    let seen = wait_until(Duration::from_secs(5), "server log", || {
        probe::accepted(&log).pop()
    })
    .unwrap();
    assert_eq!(seen["peer"], a.to_string(), "server's accept()");
    assert_eq!(seen["local"], b.to_string(), "server's getsockname()");
    let listen = format!("TCP-LISTEN:7003,bind={b},fork,reuseaddr");
    lab.spawn("b", "socat", &[&listen, "EXEC:cat"]).unwrap();
    lab.wait_listening("b", 7003).unwrap();
    let chatter = probe::chatter(&mut lab, "a", b, 7003, 2).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let on_a = flows_on_port(&lab, "a", 7003);
    let on_b = flows_on_port(&lab, "b", 7003);
    let result = probe::chatter_result(&mut lab, &chatter).unwrap();
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(directions(&on_a), ["socket"], "a's flows: {on_a:?}");
    assert_eq!(directions(&on_b), ["socket"], "b's flows: {on_b:?}");
    assert_eq!(on_b[0]["peer"], a.to_string(), "{on_b:?}");
    // Answered with a SYN cookie (as under a SYN flood), the answer has no
    // socket: it is still that listener's, and the client's ACK is handed
    // to it as the SYN was.
    lab.force_syn_cookies("b", true).unwrap();
    let got = probe::client(&lab, "a", b, 7003).unwrap();
    lab.force_syn_cookies("b", false).unwrap();
    assert_eq!(got["reply"], "hello", "{got}\n{}", lab.agent_log("b"));
    assert!(
        lab.syn_cookies_sent("b").unwrap() >= 1,
        "b sent no SYN cookie"
    );
    assert_eq!(got["peer"], b.to_string(), "client's getpeername()");
    // Only a member's tagged SYN reaches it: on the real address there is
    // no listener, for members and strangers alike.
    let real = probe::client(&lab, "a", b_real, 7003).unwrap();
    assert_eq!(real["errno"], ECONNREFUSED, "{real}");

    // A client bound to its virtual address: its packets leave with it, so
    // they are masqueraded per packet.
    probe::echo_server(&mut lab, "b", 7002).unwrap();
    let script = format!(
        r#"
import socket, json, time
s = socket.socket()
s.bind(("{a}", 0))
s.connect(("{b}", 7002))
s.sendall(b"hi\n")
r = s.recv(10)
print(json.dumps({{"reply": r.decode(), "peer": s.getpeername()[0], "local": s.getsockname()[0]}}), flush=True)
time.sleep(2)
"#
    );
    let bound = lab.spawn("a", "python3", &["-c", &script]).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let on_a = flows_on_port(&lab, "a", 7002);
    let out = lab.wait(&bound, Duration::from_secs(10)).unwrap();
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["reply"], "hi\n", "{got}");
    assert_eq!(got["peer"], b.to_string());
    assert_eq!(got["local"], a.to_string());
    assert_eq!(
        directions(&on_a),
        ["egress", "ingress"],
        "a's flows: {on_a:?}"
    );

    // Nothing virtual on the wire, and the real tuples are what it carried.
    let wire = capture.finish();
    assert!(
        !wire.contains("240."),
        "virtual addresses on the wire: {wire}"
    );
}

/// The first flow to a member goes at the socket too: connect() goes to
/// the member's real address at once, tc egress holds its SYN while the
/// agents authenticate the path, and the agent's sending it again is
/// tagged on its way. Both ends see virtual addresses, no packet of it is
/// rewritten, and `ss` shows the real tuple.
#[test]
fn the_first_flow_to_a_member_is_carried_at_the_socket() {
    require_tools(&["python3", "socat", "ss"]);
    let mut lab = started_at_the_socket(Lab::lan(2).unwrap());
    let (a, b) = (lab.host("a").virtual_ip, lab.host("b").virtual_ip);
    let b_real = lab.host("b").real;
    let log = probe::server(&mut lab, "b", "0.0.0.0", 7800, 1).unwrap();
    let script = format!(
        r#"
import socket, json, time
s = socket.create_connection(("{b}", 7800), timeout=10)
s.sendall(b"hello")
r = s.recv(100)
print(json.dumps({{"reply": r.decode(), "peer": s.getpeername()[0], "local": s.getsockname()[0]}}), flush=True)
time.sleep(3)
"#
    );
    let client = lab.spawn("a", "python3", &["-c", &script]).unwrap();
    let seen = wait_until(Duration::from_secs(10), "server log", || {
        probe::accepted(&log).pop()
    })
    .unwrap();
    // The server closes after its echo: the client's socket is there in
    // whatever state it reached.
    let ss = lab.app("a", "ss").args(["-tnH"]).ok().unwrap();
    let on_a = flows_on_port(&lab, "a", 7800);
    let out = lab.wait(&client, Duration::from_secs(15)).unwrap();
    let got: Value = serde_json::from_str(out.lines().next().unwrap_or_default()).unwrap();
    assert_eq!(got["reply"], "echo:hello", "{got}");
    assert_eq!(got["peer"], b.to_string(), "client's getpeername()");
    assert_eq!(got["local"], a.to_string(), "client's getsockname()");
    assert_eq!(seen["peer"], a.to_string(), "server's accept()");
    assert_eq!(seen["local"], b.to_string(), "server's getsockname()");
    assert!(ss.contains(&format!("{b_real}:7800")), "a's ss: {ss}");
    assert_eq!(directions(&on_a), ["socket"], "a's flows: {on_a:?}");
    let status = lab.status("a").unwrap();
    assert!(
        status["agent_counters"]["held_resent"]
            .as_u64()
            .unwrap_or(0)
            >= 1,
        "the SYN did not wait for the path: {status}"
    );
    assert_eq!(
        (traffic(&lab, "a"), traffic(&lab, "b")),
        (0, 0),
        "packets of the first flow were masqueraded"
    );
}

#[test]
fn a_socket_level_flow_to_a_server_outside_the_cgroup_is_refused() {
    require_tools(&["python3", "socat"]);
    let mut lab = socket_lab(2);
    let b = lab.host("b").virtual_ip;
    lab.spawn_outside(
        "b",
        "socat",
        &["TCP-LISTEN:7200,fork,reuseaddr", "EXEC:cat"],
    )
    .unwrap();
    lab.wait_listening("b", 7200).unwrap();
    let got = probe::timed(&lab, "a", b, 7200, true).unwrap();
    assert_eq!(got["errno"], ECONNREFUSED, "{got}");
    assert!(got["ms"].as_f64().unwrap() < 1000.0, "{got}");
    assert!(flows_on_port(&lab, "a", 7200).is_empty());
    assert!(flows_on_port(&lab, "b", 7200).is_empty());
    let status = lab.status("b").unwrap();
    assert!(
        status["drops"]["outside_cgroup"].as_u64().unwrap() >= 1,
        "{status}"
    );
}

#[test]
fn a_member_revoked_loses_its_socket_level_flows_at_once() {
    require_tools(&["python3", "socat"]);
    let mut lab = socket_lab(2);
    let b = lab.host("b").virtual_ip;
    probe::echo_server(&mut lab, "b", 7300).unwrap();
    let chatter = probe::chatter(&mut lab, "a", b, 7300, 30).unwrap();
    wait_until(Duration::from_secs(5), "the socket flow", || {
        (!flows_on_port(&lab, "b", 7300).is_empty()).then_some(())
    })
    .unwrap();
    let revoked = std::time::Instant::now();
    lab.master(&["revoke", "--name", "host-a"]).unwrap();
    let result = probe::chatter_result(&mut lab, &chatter).unwrap();
    assert_eq!(
        result["ok"], false,
        "the flow outlived the revocation: {result}"
    );
    assert!(
        revoked.elapsed() < Duration::from_secs(15),
        "cut {:?} after the revocation: {result}",
        revoked.elapsed()
    );
    wait_until(Duration::from_secs(5), "b's socket flows to end", || {
        flows_on_port(&lab, "b", 7300).is_empty().then_some(())
    })
    .unwrap();
}

fn bpftool(args: &[&str]) -> String {
    let out = std::process::Command::new("bpftool")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn bpftool_reads_the_socket_flows_and_entries_without_a_socket_are_removed() {
    require_tools(&["python3", "socat", "bpftool"]);
    let mut lab = Lab::lan(2).unwrap();
    for i in 0..2 {
        lab.write_config(i, &format!("{SOCKET}[flows]\ngc_interval_secs = 1\n"))
            .unwrap();
    }
    lab.start_all().unwrap();
    let b = lab.host("b").virtual_ip;
    probe::echo_server(&mut lab, "b", 7400).unwrap();
    assert_eq!(probe::client(&lab, "a", b, 7400).unwrap()["reply"], "hello");
    let chatter = probe::chatter(&mut lab, "a", b, 7400, 5).unwrap();
    wait_until(Duration::from_secs(5), "the socket flow", || {
        (!flows_on_port(&lab, "b", 7400).is_empty()).then_some(())
    })
    .unwrap();
    let pin = format!("/sys/fs/bpf/pvc/{}/socket_flows", lab.host("b").instance);
    let dump: Value =
        serde_json::from_str(&bpftool(&["-j", "map", "dump", "pinned", &pin])).unwrap();
    let entries = dump.as_array().unwrap();
    assert_eq!(entries.len(), 1, "{dump}");
    let f = &entries[0]["formatted"];
    assert_eq!(f["key"]["peer"], serde_json::json!([198, 18, 0, 1]), "{f}");
    assert_eq!(f["key"]["local_port"], 7400, "{f}");
    assert_eq!(
        f["value"]["vpeer"],
        serde_json::json!([240, 0, 0, 1]),
        "{f}"
    );
    assert_eq!(f["value"]["side"], 1, "accepted: {f}");

    // What a member's connection request that never completed leaves: an
    // entry without a socket. Key: 198.18.0.1:40000 -> local port 7400.
    bpftool(&[
        "map", "update", "pinned", &pin, "key", "hex", "c6", "12", "00", "01", "40", "9c", "e8",
        "1c", "value", "hex", "f0", "00", "00", "01", "40", "9c", "02", "01", "00", "00", "00",
        "00",
    ]);
    assert_eq!(flows_on_port(&lab, "b", 7400).len(), 2);
    wait_until(
        Duration::from_secs(6),
        "the entry without a socket to go",
        || (flows_on_port(&lab, "b", 7400).len() == 1).then_some(()),
    )
    .unwrap();
    // The live flow's entry stays as long as its socket.
    let result = probe::chatter_result(&mut lab, &chatter).unwrap();
    assert_eq!(result["ok"], true, "{result}");
}

/// The path to a member may take another technique while a connect() to it
/// waits for its answer (the agents found out that the member needs a
/// traversal). The socket went to the real address already and cannot
/// follow: its next SYN is refused, so connect() fails at once instead of
/// retransmitting into a path that no longer exists.
#[test]
fn a_connect_whose_path_leaves_the_socket_before_its_answer_fails_at_once() {
    require_tools(&["python3", "socat", "bpftool", "iptables"]);
    let mut lab = socket_lab(2);
    let b = lab.host("b").virtual_ip;
    probe::echo_server(&mut lab, "b", 7500).unwrap();
    // b's first answer never comes: the connect() waits for TCP's
    // retransmission of its SYN (1 s).
    Lab::command_in(&lab.host("b").netns, None, "iptables")
        .unwrap()
        .args(["-A", "INPUT", "-p", "tcp", "--dport", "7500", "-j", "DROP"])
        .ok()
        .unwrap();
    let script = format!(
        r#"
import socket, json, time
t = time.monotonic()
try:
    socket.create_connection(("{b}", 7500), timeout=5)
    print(json.dumps({{"ok": True}}))
except OSError as e:
    print(json.dumps({{"errno": e.errno, "error": str(e), "ms": (time.monotonic() - t) * 1000}}))
"#
    );
    let client = lab.spawn("a", "python3", &["-c", &script]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // a's path to b no longer lets the socket carry flows.
    let pin = format!("/sys/fs/bpf/pvc/{}/peers", lab.host("a").instance);
    let key: Vec<String> = b.octets().iter().map(|o| format!("{o:02x}")).collect();
    let mut args = vec!["-j", "map", "lookup", "pinned", &pin, "key", "hex"];
    args.extend(key.iter().map(String::as_str));
    let entry: Value = serde_json::from_str(&bpftool(&args)).unwrap();
    let mut value: Vec<u8> = entry["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| u8::from_str_radix(v.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
        .collect();
    assert_eq!(
        value[8] & 2,
        2,
        "the path lets the socket carry flows: {entry}"
    );
    value[8] &= !2;
    let value: Vec<String> = value.iter().map(|v| format!("{v:02x}")).collect();
    let mut args = vec!["map", "update", "pinned", &pin, "key", "hex"];
    args.extend(key.iter().map(String::as_str));
    args.extend(["value", "hex"]);
    args.extend(value.iter().map(String::as_str));
    bpftool(&args);
    let out = lab.wait(&client, Duration::from_secs(10)).unwrap();
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["errno"], ECONNREFUSED, "{got}");
    assert!(got["ms"].as_f64().unwrap() < 2500.0, "{got}");
}

/// Whether a member's SYN can be taken at the socket depends on the SYN
/// (it came straight, to a port a listener has), not on how this host's
/// own flows reach the member: a public server whose flows to a member
/// behind a NAT need a hole punched still takes that member's flows at
/// the socket.
#[test]
fn a_public_server_takes_a_nated_members_flows_at_the_socket() {
    require_tools(&["python3", "socat"]);
    let mut lab = with_first_flows(started_at_the_socket(
        Lab::internet(&[(Site::Cone, 1), (Site::Pub, 1)]).unwrap(),
    ));
    let (a, b) = (lab.host("a").virtual_ip, lab.host("b").virtual_ip);
    probe::echo_server(&mut lab, "b", 7600).unwrap();
    wait_until(
        Duration::from_secs(20),
        "b's flows to a to need a punch",
        || {
            let s = lab.status("b").ok()?;
            s["peers"]
                .as_array()?
                .iter()
                .any(|p| p["virtual_ip"] == a.to_string().as_str() && p["technique"] == "punch")
                .then_some(())
        },
    )
    .unwrap();
    let chatter = probe::chatter(&mut lab, "a", b, 7600, 2).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let on_a = flows_on_port(&lab, "a", 7600);
    let on_b = flows_on_port(&lab, "b", 7600);
    let result = probe::chatter_result(&mut lab, &chatter).unwrap();
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(directions(&on_a), ["socket"], "a's flows: {on_a:?}");
    assert_eq!(directions(&on_b), ["socket"], "b's flows: {on_b:?}");
    assert_eq!(on_b[0]["technique"], "direct", "{on_b:?}");
    assert_eq!(on_b[0]["peer"], a.to_string());
}

/// A UPnP forward brings every member's flow to a server behind it on
/// the one forwarded port (PVC's, 7101); tc ingress hands each SYN to the
/// listener of the port its tag names, so the server's side is carried by
/// its socket too: no packet is rewritten at either end, and accept(),
/// getpeername() and getsockname() show the virtual tuple the client
/// connected to.
#[test]
fn a_server_behind_a_upnp_nat_takes_members_flows_at_the_socket() {
    require_tools(&["python3", "socat", "miniupnpd"]);
    let mut lab = with_first_flows(started_at_the_socket(
        Lab::internet(&[(Site::Cone, 1), (Site::Upnp, 1)]).unwrap(),
    ));
    let (a, b) = (lab.host("a").virtual_ip, lab.host("b").virtual_ip);
    let technique = lab.status("a").unwrap()["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["virtual_ip"] == b.to_string().as_str())
        .map(|p| p["technique"].clone());
    assert_eq!(technique, Some("upnp".into()), "a's path to b");

    let log = probe::server(&mut lab, "b", "0.0.0.0", 7000, 2).unwrap();
    let connect = |lab: &Lab, n: usize| {
        let got = probe::client(lab, "a", b, 7000).unwrap();
        assert_eq!(got["reply"], "echo:hello", "{got}");
        assert_eq!(got["peer"], b.to_string(), "client's getpeername()");
        assert_eq!(got["local"], a.to_string(), "client's getsockname()");
        let seen = wait_until(Duration::from_secs(5), "server log", || {
            let mut seen = probe::accepted(&log);
            (seen.len() == n).then(|| seen.pop().unwrap())
        })
        .unwrap();
        assert_eq!(seen["peer"], a.to_string(), "server's accept()");
        assert_eq!(seen["local"], b.to_string(), "server's getsockname()");
        assert_eq!(seen["local_port"], 7000, "server's getsockname()");
    };
    connect(&lab, 1);
    // A listener answering with SYN cookies (as under a SYN flood) keeps
    // no state: the client's ACK, on the forwarded port as its SYN was,
    // must reach the same listener (not the agent's, on that port).
    lab.force_syn_cookies("b", true).unwrap();
    connect(&lab, 2);
    lab.force_syn_cookies("b", false).unwrap();

    probe::echo_server(&mut lab, "b", 7600).unwrap();
    let packets_before = traffic(&lab, "b");
    let chatter = probe::chatter(&mut lab, "a", b, 7600, 2).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let on_a = flows_on_port(&lab, "a", 7600);
    let on_b = flows_on_port(&lab, "b", 7600);
    let result = probe::chatter_result(&mut lab, &chatter).unwrap();
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(directions(&on_a), ["socket"], "a's flows: {on_a:?}");
    assert_eq!(directions(&on_b), ["socket"], "b's flows: {on_b:?}");
    assert_eq!(on_b[0]["peer"], a.to_string());
    // The virtual tuple has the listener's port, the wire the forward's.
    assert!(
        on_b[0]["from"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{b}:7600 -> {a}:")),
        "{on_b:?}"
    );
    assert!(
        on_b[0]["to"].as_str().unwrap().contains(":7101 -> "),
        "{on_b:?}"
    );
    assert_eq!(
        traffic(&lab, "b"),
        packets_before,
        "the server masqueraded packets of a socket-level flow"
    );
    assert_eq!(lab.leaks().unwrap(), 0);
}

/// The kernel picks a translated connect()'s source port for the member's
/// real address, blind to the ports of flows to the same member that are
/// masqueraded per packet (a client socket bound to the virtual address).
/// Such a flow takes a port outside the kernel's ephemeral range on the
/// wire, so that a socket-level connect() from its own port is carried,
/// not refused as a collision. Forced here by binding the second socket to
/// that port.
#[test]
fn a_socket_level_connect_from_the_port_of_a_flow_masqueraded_per_packet_is_carried() {
    require_tools(&["python3", "socat"]);
    let mut lab = started_at_the_socket(Lab::lan(2).unwrap());
    let b = lab.host("b").virtual_ip;
    let (a, a_real) = (lab.host("a").virtual_ip, lab.host("a").real);
    probe::echo_server(&mut lab, "b", 7600).unwrap();
    let script = format!(
        r#"
import socket, json, time
first = socket.socket()
first.settimeout(10)
first.bind(("{a}", 0))
first.connect(("{b}", 7600))
port = first.getsockname()[1]
out = {{"port": port}}
second = socket.socket()
second.settimeout(5)
second.bind(("{a_real}", port))
try:
    second.connect(("{b}", 7600))
    second.sendall(b"two\n")
    out["second"] = second.recv(10).decode()
    out["peer"] = second.getpeername()[0]
except OSError as e:
    out["errno"] = e.errno
first.sendall(b"one\n")
out["first"] = first.recv(10).decode()
print(json.dumps(out), flush=True)
time.sleep(3)
"#
    );
    let client = lab.spawn("a", "python3", &["-c", &script]).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let on_a = flows_on_port(&lab, "a", 7600);
    let out = lab.wait(&client, Duration::from_secs(15)).unwrap();
    let got: Value = serde_json::from_str(out.lines().next().unwrap_or_default()).unwrap();
    assert_eq!(got["second"], "two\n", "socket-level connect(): {got}");
    assert_eq!(got["peer"], b.to_string(), "{got}");
    assert_eq!(got["first"], "one\n", "the first flow: {got}");
    let port = got["port"].as_u64().unwrap();
    // The first flow is masqueraded per packet, from a port above the
    // kernel's ephemeral range (32768-60999 in the lab); the second is
    // carried by its socket.
    let mut d = directions(&on_a);
    d.dedup();
    assert_eq!(d, ["egress", "ingress", "socket"], "a's flows: {on_a:?}");
    let egress = on_a.iter().find(|f| f["direction"] == "egress").unwrap();
    assert!(
        egress["from"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{a}:{port} ")),
        "{egress}"
    );
    let wire_port: u64 = egress["to"]
        .as_str()
        .unwrap()
        .split(" -> ")
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        wire_port > 60999,
        "the first flow's port on the wire: {egress}"
    );
}

/// A member's SYN sent again because the answer to its first was lost
/// reaches the connection request its first SYN made at the server's
/// socket, which answers it (before, the server's tc took that request for
/// another connection on the tuple, dropped every SYN sent again and
/// counted it as a collision: the connection waited for the server's own
/// retransmission).
#[test]
fn a_syn_sent_again_after_a_lost_answer_completes_the_connection() {
    require_tools(&["python3", "socat", "iptables"]);
    let mut lab = socket_lab(2);
    let b = lab.host("b").virtual_ip;
    probe::echo_server(&mut lab, "b", 7700).unwrap();
    let rule = [
        "INPUT",
        "-p",
        "tcp",
        "--sport",
        "7700",
        "--tcp-flags",
        "SYN,ACK",
        "SYN,ACK",
        "-j",
        "DROP",
    ];
    let iptables = |lab: &Lab, op: &str| {
        let mut args = vec![op];
        args.extend(rule);
        Lab::command_in(&lab.host("a").netns, None, "iptables")
            .unwrap()
            .args(args)
            .ok()
            .unwrap();
    };
    // a loses b's answers: its TCP sends the SYN again after 1 s.
    iptables(&lab, "-A");
    let script = format!(
        r#"
import socket, json, time
t = time.monotonic()
try:
    s = socket.create_connection(("{b}", 7700), timeout=10)
    s.sendall(b"hi\n")
    print(json.dumps({{"reply": s.recv(10).decode(), "ms": (time.monotonic() - t) * 1000}}))
except OSError as e:
    print(json.dumps({{"errno": e.errno, "error": str(e)}}))
"#
    );
    let client = lab.spawn("a", "python3", &["-c", &script]).unwrap();
    // Both ends send again after 1 s: the answer to the second SYN is
    // lost too (the stack's, had tc let it through), so that the client's
    // second SYN certainly reached b before any answer came.
    std::thread::sleep(Duration::from_millis(1500));
    iptables(&lab, "-D");
    let out = lab.wait(&client, Duration::from_secs(15)).unwrap();
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got["reply"], "hi\n", "{got}");
    assert!(
        got["ms"].as_f64().unwrap() > 1500.0,
        "no answer was lost: {got}"
    );
    // Each SYN sent again reached b's stack (which answered it), none was
    // taken for another connection's.
    let drops = lab.status("b").unwrap()["drops"].clone();
    assert_eq!(drops["flow_collision"], 0, "b's drops: {drops}");
}

/// The technique `client`'s agent uses toward the member at `server`.
fn technique_to(lab: &Lab, client: &str, server: std::net::Ipv4Addr) -> Option<String> {
    let s = lab.status(client).ok()?;
    s["peers"]
        .as_array()?
        .iter()
        .find(|p| p["virtual_ip"] == server.to_string().as_str())
        .and_then(|p| p["technique"].as_str().map(str::to_string))
}

/// A member's flow that needs a traversal (a hole punched, Traversing-TCP,
/// a reversal) is carried by sockets. The server's side always: its agent
/// injects the member's SYN with the tuple it will have on the wire, the
/// punch carries the stack's answer to it, and the member's SYN through the
/// hole completes that connection request. The client's side once a
/// traversal to the member has worked and when the member's port on the
/// wire is its application's (punch, Traversing-TCP): connect() goes to the
/// member's public address, tc hands the tagged SYN to the agents, which
/// send it when the way is open. Both ends' socket calls show virtual
/// addresses, and no packet of such a flow is rewritten at either end. A
/// reversal's client (the member's NAT picks its port) stays per packet.
#[test]
fn traversed_flows_are_carried_by_their_sockets() {
    require_tools(&["python3", "socat", "iptables"]);
    let mut lab = started_at_the_socket(
        Lab::internet(&[
            (Site::Cone, 1),
            (Site::Cone, 1),
            (Site::Fwl, 1),
            (Site::Pub, 1),
            (Site::Sym, 1),
        ])
        .unwrap(),
    );
    let pairs = [
        ("a", "b", "punch"),
        ("a", "c", "ttcp"),
        ("d", "e", "reversal"),
    ];
    for (client, server, technique) in pairs {
        let vip = lab.host(server).virtual_ip;
        wait_until(
            Duration::from_secs(30),
            &format!("{client}'s path to {server} to take {technique}"),
            || (technique_to(&lab, client, vip).as_deref() == Some(technique)).then_some(()),
        )
        .unwrap();
    }
    for (client, server, technique) in pairs {
        let (cv, sv) = (lab.host(client).virtual_ip, lab.host(server).virtual_ip);
        let log = probe::server(&mut lab, server, "0.0.0.0", 7000, 2).unwrap();
        // Both ends' socket calls, for the pair's first flow (the client's
        // side masqueraded per packet) and for a later one.
        let connect = |lab: &Lab, n: usize| {
            let got = probe::client(lab, client, sv, 7000).unwrap();
            assert_eq!(got["reply"], "echo:hello", "{client} -> {server}: {got}");
            assert_eq!(got["peer"], sv.to_string(), "{client}'s getpeername()");
            assert_eq!(got["local"], cv.to_string(), "{client}'s getsockname()");
            let seen = wait_until(Duration::from_secs(5), "server log", || {
                let mut seen = probe::accepted(&log);
                (seen.len() == n).then(|| seen.pop().unwrap())
            })
            .unwrap();
            assert_eq!(seen["peer"], cv.to_string(), "{server}'s accept(): {seen}");
            assert_eq!(seen["local"], sv.to_string(), "{server}'s getsockname()");
            assert_eq!(seen["local_port"], 7000, "{server}'s getsockname()");
        };
        connect(&lab, 1);
        // (The agent learns the traversal worked from the kernel's report,
        // read at the latest on its timer or before it answers `pvc status`.)
        wait_until(
            Duration::from_secs(5),
            "the first traversal to be done",
            || (lab.status(client).ok()?["flows_opened"][technique].as_u64()? >= 1).then_some(()),
        )
        .unwrap();

        probe::echo_server(&mut lab, server, 7600).unwrap();
        let rewritten = (traffic(&lab, client), traffic(&lab, server));
        let chatter = probe::chatter(&mut lab, client, sv, 7600, 2).unwrap();
        std::thread::sleep(Duration::from_millis(800));
        let on_server = flows_on_port(&lab, server, 7600);
        // (The server's port on the wire may be its NAT's: the client's
        // flows are found by member, not by port.)
        let on_client: Vec<Value> = lab.status(client).unwrap()["flows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["peer"] == sv.to_string().as_str() && f["closing"] == false)
            .cloned()
            .collect();
        let result = probe::chatter_result(&mut lab, &chatter).unwrap();
        assert_eq!(result["ok"], true, "{client} -> {server}: {result}");
        assert_eq!(
            directions(&on_server),
            ["socket"],
            "{server}'s flows ({technique}): {on_server:?}\n{}",
            lab.agent_log(server)
        );
        assert_eq!(on_server[0]["technique"], technique, "{on_server:?}");
        assert_eq!(on_server[0]["peer"], cv.to_string());
        assert_eq!(
            traffic(&lab, server),
            rewritten.1,
            "{server} rewrote packets of a flow its socket carries"
        );
        if technique == "reversal" {
            assert_eq!(
                directions(&on_client),
                ["egress", "ingress"],
                "{client}'s flows ({technique}): {on_client:?}"
            );
        } else {
            assert_eq!(
                directions(&on_client),
                ["socket"],
                "{client}'s flows ({technique}): {on_client:?}\n{}",
                lab.agent_log(client)
            );
            assert_eq!(on_client[0]["technique"], technique, "{on_client:?}");
            assert_eq!(
                traffic(&lab, client),
                rewritten.0,
                "{client} rewrote packets of a flow its socket carries"
            );
        }
        connect(&lab, 2);
    }
    assert_eq!(lab.leaks().unwrap(), 0);
}

/// A traversal translated at the socket cannot fall back to the relay (its
/// socket is connected to the member's public address): when the way does
/// not open (here b's NAT drops every connection request toward a's site,
/// so b's punch never leaves), connect() fails at once with ECONNREFUSED
/// instead of waiting for TCP's timeouts, and a flow that runs at the
/// socket meanwhile goes on.
/// Two cone NATs' hosts at the socket, a's path to b punched, an echo
/// server on b's `port`, and the pair's first traversal done (per packet
/// at a): a's next flows to b go at the socket.
fn punched_past_the_first_traversal(port: u16) -> Lab {
    let mut lab =
        started_at_the_socket(Lab::internet(&[(Site::Cone, 1), (Site::Cone, 1)]).unwrap());
    let b = lab.host("b").virtual_ip;
    wait_until(
        Duration::from_secs(30),
        "a's path to b to take punch",
        || (technique_to(&lab, "a", b).as_deref() == Some("punch")).then_some(()),
    )
    .unwrap();
    probe::echo_server(&mut lab, "b", port).unwrap();
    let first = probe::timed(&lab, "a", b, port, true).unwrap();
    assert_eq!(first["reply"], "hello", "{first}");
    // (The agent learns it from the kernel's report, read at the latest
    // on its timer or before it answers `pvc status`.)
    wait_until(
        Duration::from_secs(5),
        "a's first traversal to be done",
        || (lab.status("a").ok()?["flows_opened"]["punch"].as_u64()? >= 1).then_some(()),
    )
    .unwrap();
    lab
}

#[test]
fn a_traversal_at_the_socket_that_fails_is_refused_at_once() {
    require_tools(&["python3", "socat", "iptables"]);
    let mut lab = punched_past_the_first_traversal(7600);
    let b = lab.host("b").virtual_ip;
    let chatter = probe::chatter(&mut lab, "a", b, 7600, 4).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let running: Vec<Value> = flows_on_port(&lab, "a", 7600)
        .into_iter()
        .filter(|f| f["closing"] == false)
        .collect();
    assert_eq!(directions(&running), ["socket"], "{running:?}");

    lab.drop_syns_between_sites(1, 0).unwrap();
    let failed = probe::timed(&lab, "a", b, 7600, true).unwrap();
    assert_eq!(
        failed["errno"],
        ECONNREFUSED,
        "{failed}\n{}",
        lab.agent_log("a")
    );
    assert!(failed["ms"].as_f64().unwrap() < 2500.0, "{failed}");
    assert!(
        lab.agent_log("a").contains("did not complete within"),
        "{}",
        lab.agent_log("a")
    );
    let result = probe::chatter_result(&mut lab, &chatter).unwrap();
    assert_eq!(result["ok"], true, "the flow at the socket: {result}");
    assert_eq!(lab.leaks().unwrap(), 0);
}

/// A flow masqueraded per packet beside one carried at the socket can pick
/// the same ports on the wire (here a socket bound to a's virtual address
/// and to the port the kernel gave the running flow's socket, towards the
/// same member's port): the member's agent refuses to serve its traversal,
/// and the running flow goes on untouched (before, b's agent rewrote the
/// running flow's entry for the new one: held answers, dropped RSTs, and a
/// SYN injected into the running connection). The new connect() fails, or
/// takes the relay when the pair moves to it.
#[test]
fn a_traversal_that_would_take_a_running_flows_ports_is_refused() {
    require_tools(&["python3", "socat", "iptables", "bpftool"]);
    let mut lab = punched_past_the_first_traversal(7600);
    let (a, b) = (lab.host("a").virtual_ip, lab.host("b").virtual_ip);
    let chatter = probe::chatter(&mut lab, "a", b, 7600, 4).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let running: Vec<Value> = flows_on_port(&lab, "a", 7600)
        .into_iter()
        .filter(|f| f["direction"] == "socket")
        .collect();
    assert_eq!(running.len(), 1, "{running:?}");
    // "198.18.x.y:PORT -> ...": the running flow's port on the wire.
    let wire = running[0]["to"].as_str().unwrap();
    let port: u16 = wire
        .split(" -> ")
        .next()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let pin = format!("/sys/fs/bpf/pvc/{}/socket_flows", lab.host("b").instance);
    let entry_on_b = || -> Value {
        let dump: Value =
            serde_json::from_str(&bpftool(&["-j", "map", "dump", "pinned", &pin])).unwrap();
        dump.as_array()
            .unwrap()
            .iter()
            .find(|e| e["formatted"]["key"]["local_port"] == 7600)
            .map(|e| e["formatted"]["value"].clone())
            .unwrap_or(Value::Null)
    };
    let before = entry_on_b();
    assert_eq!(before["flags"], 0, "{before}");

    let script = format!(
        r#"
import socket, json
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{a}", {port}))
s.settimeout(5)
try:
    s.connect(("{b}", 7600))
    print(json.dumps({{"connected": True}}))
except OSError as e:
    print(json.dumps({{"errno": e.errno}}))
"#
    );
    let out = lab.app("a", "python3").args(["-c", &script]).ok().unwrap();
    let got: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        got["connected"] == true || got["errno"] == ECONNREFUSED,
        "{got}\n{}",
        lab.agent_log("a")
    );
    assert_eq!(entry_on_b(), before, "b's entry of the running flow");
    assert!(
        lab.agent_log("b").contains("refused to serve a traversal"),
        "{}",
        lab.agent_log("b")
    );
    let result = probe::chatter_result(&mut lab, &chatter).unwrap();
    assert_eq!(result["ok"], true, "the running flow: {result}");
    assert_eq!(lab.leaks().unwrap(), 0);
}
