//! Properties of the kernel data path with real traffic: bulk transfer with
//! offloads on, checksums on the wire, MTU, no leaks of virtual addresses,
//! and the agent's CPU staying flat while bytes flow.

use std::time::Duration;

use pvc_lab::{Lab, cpu_time, require_tools};
use serde_json::Value;

const GIB: u64 = 1 << 30;

fn iperf(lab: &mut Lab, client: &str, server: &str, args: &[&str]) -> Value {
    let server_ip = lab.host(server).virtual_ip.to_string();
    lab.spawn(server, "iperf3", &["-s", "-1", "-B", &server_ip])
        .unwrap();
    lab.wait_listening(server, 5201).unwrap();
    let out = lab
        .app(client, "iperf3")
        .args(["-c", &server_ip, "-J"])
        .args(args)
        .ok()
        .unwrap();
    serde_json::from_str(&out).unwrap()
}

/// Checks that iperf3 moved `bytes`; returns the bytes sent.
fn assert_transferred(r: &Value, bytes: u64) -> u64 {
    let sent = r["end"]["sum_sent"]["bytes"].as_u64().unwrap();
    let received = r["end"]["sum_received"]["bytes"].as_u64().unwrap();
    // iperf3 exits successfully only once TCP delivered everything; the
    // receiver's own total may leave out what arrived after its last report.
    assert!(
        sent >= bytes && received > bytes / 2,
        "{sent} bytes sent, {received} received"
    );
    sent
}

#[test]
fn gigabyte_transfers_both_ways_with_offloads_on_and_the_agent_stays_idle() {
    require_tools(&["iperf3"]);
    let mut lab = Lab::lan(2).unwrap();
    // The per-packet rewrite, at a gigabyte each way (a flow translated at
    // the socket has no rewrite to check).
    lab.translate_per_packet().unwrap();
    lab.start_all().unwrap();
    let agents: Vec<u32> = ["a", "b"]
        .iter()
        .map(|h| lab.agent_pid(h).unwrap())
        .collect();
    let cpu_before: Vec<Duration> = agents.iter().map(|p| cpu_time(*p)).collect();
    let masq_before = lab.status("a").unwrap()["traffic"].clone();

    for reverse in [false, true] {
        let mut args = vec!["-n", "1G"];
        if reverse {
            args.push("-R");
        }
        let r = iperf(&mut lab, "a", "b", &args);
        let sent = assert_transferred(&r, GIB);
        // A checksum broken by the rewrite would stall the transfer or make
        // the receiver drop segments, i.e. retransmit massively.
        let retransmits = r["end"]["sum_sent"]["retransmits"].as_u64().unwrap();
        let segments = sent / 1448;
        assert!(
            retransmits < segments / 50,
            "reverse={reverse}: {retransmits} retransmits for {segments} segments"
        );
        let bps = r["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap();
        eprintln!(
            "iperf3 reverse={reverse}: {:.2} Gbit/s, {retransmits} retransmits",
            bps / 1e9
        );
    }

    // Every byte went through the masquerading programs...
    let masq = lab.status("a").unwrap()["traffic"].clone();
    let out =
        masq["egress_bytes"].as_u64().unwrap() - masq_before["egress_bytes"].as_u64().unwrap();
    let inn =
        masq["ingress_bytes"].as_u64().unwrap() - masq_before["ingress_bytes"].as_u64().unwrap();
    assert!(
        out >= GIB && inn >= GIB,
        "masqueraded {out} bytes out, {inn} in"
    );
    // ...and none through the agents: their CPU time does not grow with bytes.
    for (pid, before) in agents.iter().zip(cpu_before) {
        let used = cpu_time(*pid) - before;
        eprintln!("agent {pid} used {used:?} of CPU while 2 GiB crossed");
        assert!(
            used < Duration::from_millis(300),
            "agent {pid} used {used:?} of CPU during the transfers"
        );
    }
}

#[test]
fn checksums_on_the_wire_are_valid_when_the_sender_computes_them() {
    require_tools(&["iperf3", "tcpdump", "ethtool"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    // With TX checksum offload off, the stack completes the checksum after
    // tc egress, from the pseudo-header the rewrite left: tcpdump then sees
    // the final value.
    let a_ns = lab.host("a").netns.clone();
    lab.ns(&a_ns, "ethtool")
        .args(["-K", "eth0", "tx", "off"])
        .ok()
        .unwrap();
    let a_real = lab.host("a").real.to_string();
    let cap = lab
        .capture(&format!("-c 3000 tcp and src host {a_real}"))
        .unwrap();
    let r = iperf(&mut lab, "a", "b", &["-n", "20M"]);
    assert_transferred(&r, 20 << 20);
    let text = cap.finish();
    let correct = text.matches("(correct)").count();
    let incorrect = text.matches("incorrect").count();
    assert!(
        correct > 100,
        "saw {correct} checksummed packets:\n{}",
        &text[..text.len().min(2000)]
    );
    assert_eq!(incorrect, 0, "bad checksums on the wire:\n{text}");
    // The SYN carried the flow tag: "unknown-253 0x5056" + 240.0.0.1.
    assert!(
        text.contains("unknown-253 0x5056f0000001"),
        "tagged SYN not seen:\n{}",
        &text[..text.len().min(3000)]
    );
}

#[test]
fn full_size_packets_cross_unfragmented_because_nothing_is_encapsulated() {
    require_tools(&["ping", "iperf3", "tcpdump", "ethtool"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    let b = lab.host("b").virtual_ip.to_string();

    // 1472 bytes of ICMP payload + 28 bytes of headers = the LAN's MTU, with DF.
    let out = lab
        .app("a", "ping")
        .args(["-c", "2", "-W", "2", "-M", "do", "-s", "1472", &b])
        .ok()
        .unwrap();
    assert!(out.contains("2 received"), "{out}");
    let too_big = lab
        .app("a", "ping")
        .args(["-c", "1", "-W", "2", "-M", "do", "-s", "1473", &b])
        .output()
        .unwrap();
    assert!(!too_big.status.success());
    let msg = String::from_utf8_lossy(&too_big.stderr).to_string()
        + &String::from_utf8_lossy(&too_big.stdout);
    assert!(
        msg.contains("message too long") || msg.contains("mtu = 1500"),
        "{msg}"
    );

    // TCP with segmentation offloads off: the segments on the wire are
    // exactly MTU-sized, DF set, never fragmented.
    let a_ns = lab.host("a").netns.clone();
    lab.ns(&a_ns, "ethtool")
        .args(["-K", "eth0", "tso", "off", "gso", "off"])
        .ok()
        .unwrap();
    let cap = lab
        .capture(&format!("tcp and src host {}", lab.host("a").real))
        .unwrap();
    iperf(&mut lab, "a", "b", &["-n", "10M"]);
    let text = cap.finish();
    let lengths: Vec<usize> = text
        .lines()
        .filter_map(|l| l.split("length ").nth(1)?.split(')').next()?.parse().ok())
        .collect();
    assert!(!lengths.is_empty(), "{text}");
    assert_eq!(*lengths.iter().max().unwrap(), 1500, "largest IP packet");
    assert!(lengths.iter().filter(|l| **l == 1500).count() > 100);
    assert!(
        !text.contains("offset 1") && !text.contains("flags [+]"),
        "fragments on the wire"
    );
    assert!(text.contains("mss 1460"), "the SYN's MSS is the LAN's");
}

#[test]
fn udp_to_a_virtual_address_never_reaches_the_wire() {
    require_tools(&["python3", "tcpdump"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    let cap = lab.capture("net 240.0.0.0/4").unwrap();
    let b = lab.host("b").virtual_ip;
    let script = format!(
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(b"x" * 100, ("{b}", 9999))
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.connect(("{b}", 9998))
for _ in range(5):
    c.send(b"y" * 100)
"#
    );
    lab.app("a", "python3").args(["-c", &script]).ok().unwrap();
    // And TCP and ping, which are masqueraded: not a single virtual address either.
    lab.app("a", "ping")
        .args(["-c", "1", "-W", "2", &b.to_string()])
        .ok()
        .unwrap();
    let text = cap.finish();
    assert!(
        text.trim().is_empty(),
        "virtual addresses on the wire:\n{text}"
    );
    let status = lab.status("a").unwrap();
    assert_eq!(
        status["drops"]["unsupported_protocol"], 10,
        "{}",
        status["drops"]
    );
}

#[test]
fn bpftool_shows_the_masquerading_map_with_field_names() {
    require_tools(&["bpftool", "python3"]);
    let mut lab = Lab::lan(2).unwrap();
    // Flows in the masquerading map: every flow per packet.
    lab.translate_per_packet().unwrap();
    lab.start_all().unwrap();
    let b = lab.host("b").virtual_ip;
    pvc_lab::probe::server(&mut lab, "b", "0.0.0.0", 7100, 1).unwrap();
    pvc_lab::probe::client(&lab, "a", b, 7100).unwrap();
    let pin = format!("/sys/fs/bpf/pvc/{}/masquerading", lab.host("a").instance);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", &pin])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = dump.as_array().unwrap();
    assert_eq!(entries.len(), 2, "one flow, two directions: {dump}");
    let f = &entries[0]["formatted"];
    for field in ["saddr", "daddr", "sport", "dport", "proto", "direction"] {
        assert!(f["key"].get(field).is_some(), "key field {field}: {f}");
    }
    for field in [
        "last_seen_ns",
        "saddr",
        "daddr",
        "peer",
        "technique",
        "tcp_flags",
    ] {
        assert!(f["value"].get(field).is_some(), "value field {field}: {f}");
    }
    let egress = entries
        .iter()
        .find(|e| e["formatted"]["key"]["direction"] == 0)
        .unwrap();
    assert_eq!(egress["formatted"]["key"]["dport"], 7100);
    assert_eq!(
        egress["formatted"]["value"]["daddr"],
        serde_json::json!([198, 18, 0, 2])
    );
}
