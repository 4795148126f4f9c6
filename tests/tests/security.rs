//! Security with real agents: admission by the master, untrusted brokers
//! (a tampering broker double), forged SYNs, keys replaced, revocation and
//! expiry of records, and the registry's uniqueness rules.

use std::{net::Ipv4Addr, time::Duration};

use pvc_lab::{Lab, probe, require_tools, wait_until};
use serde_json::Value;

const EPERM: i64 = 1;
const ECONNREFUSED: i64 = 111;
const EHOSTUNREACH: i64 = 113;
const ENETUNREACH: i64 = 101;
const EKEYEXPIRED: i64 = 127;
const EKEYREVOKED: i64 = 128;

fn connects(lab: &Lab, client: &str, server: &str, port: u16) -> Value {
    probe::client(lab, client, lab.host(server).virtual_ip, port).unwrap()
}

fn drops(lab: &Lab, host: &str, reason: &str) -> u64 {
    lab.status(host).unwrap()["drops"][reason]
        .as_u64()
        .unwrap_or(0)
}

/// A TCP SYN crafted by hand from `from` (its namespace), to `to_real`:22,
/// with source address `src`, carrying a PVC tag that names `claimed` with
/// a MAC of zeros.
fn forged_syn(lab: &Lab, from: &str, src: Ipv4Addr, to_real: Ipv4Addr, claimed: Ipv4Addr) {
    let script = format!(
        r#"
import socket, struct
src, dst = socket.inet_aton("{src}"), socket.inet_aton("{to_real}")
opts = bytes([2, 4, 5, 180, 253, 20, ord("P"), ord("V")]) + socket.inet_aton("{claimed}") + struct.pack("!HBB", 22, 0, 0) + bytes(8)
tcp = struct.pack("!HHIIBBHHH", 40999, 22, 1234, 0, (5 + len(opts) // 4) << 4, 0x02, 64240, 0, 0) + opts
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s > 0xffff: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
c = csum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, src, dst)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.sendto(ip + tcp, ("{to_real}", 0))
"#
    );
    let ns = lab.host(from).netns.clone();
    lab.ns(&ns, "python3").args(["-c", &script]).ok().unwrap();
}

#[test]
fn a_host_with_a_key_but_no_admission_cannot_reach_members_nor_be_reached() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(3).unwrap();
    lab.start_broker().unwrap();
    lab.admit("a", &[]).unwrap();
    lab.admit("b", &[]).unwrap();
    lab.start_agents().unwrap();
    lab.wait_for_peers("a", 1).unwrap();
    lab.wait_for_peers("b", 1).unwrap();

    // The broker refuses c, and says what the administrator must do.
    let c_key = lab.host("c").public_key.clone();
    wait_until(Duration::from_secs(10), "c's refusal", || {
        lab.agent_log("c")
            .contains(&format!("pvc master admit --host-key {c_key}"))
            .then_some(())
    })
    .unwrap();
    let c = lab.status("c").unwrap();
    assert_eq!(c["admitted"], false, "{c}");
    assert_eq!(c["state"], "waiting for admission", "{c}");
    assert_eq!(c["peers"].as_array().unwrap().len(), 0, "{c}");
    // Nothing of PVC is attached on c: the virtual network is not routed.
    assert_eq!(connects(&lab, "c", "a", 22)["errno"], ENETUNREACH);
    assert_eq!(connects(&lab, "a", "c", 22)["errno"], EHOSTUNREACH);

    // Members work with each other.
    probe::server(&mut lab, "b", "0.0.0.0", 7700, 1).unwrap();
    assert_eq!(connects(&lab, "a", "b", 7700)["reply"], "echo:hello");

    // c crafts SYNs tagged as b: from its own address, and spoofing b's.
    let (a_real, b_real, c_real) = (lab.host("a").real, lab.host("b").real, lab.host("c").real);
    let b_vip = lab.host("b").virtual_ip;
    forged_syn(&lab, "c", c_real, a_real, b_vip);
    forged_syn(&lab, "c", b_real, a_real, b_vip);
    wait_until(Duration::from_secs(5), "a to count both", || {
        (drops(&lab, "a", "tag_mismatch") >= 1 && drops(&lab, "a", "bad_tag") >= 1).then_some(())
    })
    .unwrap();
    let log = lab.agent_log("a");
    assert!(
        log.contains(&format!(
            "claiming to be {b_vip}, from {c_real}: {b_vip} has no authenticated path from {c_real}"
        )),
        "{log}"
    );
    assert!(log.contains("its tag's MAC is wrong"), "{log}");
    assert_eq!(
        connects(&lab, "a", "b", 7700)["errno"],
        ECONNREFUSED,
        "the one-shot server is gone, but the path works"
    );
}

#[test]
fn a_member_whose_key_was_replaced_cannot_authenticate() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    probe::server(&mut lab, "b", "0.0.0.0", 7800, 2).unwrap();
    assert_eq!(connects(&lab, "a", "b", 7800)["reply"], "echo:hello");

    // b's private key is replaced (lost disk, stolen host rebuilt...).
    lab.stop_agent("b").unwrap();
    let key = lab.host("b").key_file.clone();
    std::fs::remove_file(&key).unwrap();
    lab.start_agent("b").unwrap();
    wait_until(Duration::from_secs(10), "b to be refused", || {
        lab.status("b").ok()?["broker_refusal"]
            .as_str()?
            .contains("NotAdmitted")
            .then_some(())
    })
    .unwrap();
    wait_until(Duration::from_secs(10), "a to forget b", || {
        lab.status("a").ok()?["peers"]
            .as_array()?
            .is_empty()
            .then_some(())
    })
    .unwrap();
    assert_eq!(connects(&lab, "a", "b", 7800)["errno"], EHOSTUNREACH);
}

/// Three admitted members behind a tampering broker.
fn evil_lab(mode: &[&str]) -> Lab {
    let mut lab = Lab::lan(3).unwrap();
    lab.start_evil_broker(mode).unwrap();
    lab.admit_all().unwrap();
    lab.start_agents().unwrap();
    lab
}

#[test]
fn a_broker_cannot_make_members_accept_a_forged_record() {
    require_tools(&["python3"]);
    let mut lab = evil_lab(&["--mode", "forge"]);
    for h in ["a", "b", "c"] {
        lab.wait_for_peers(h, 2).unwrap();
    }
    let log = lab.agent_log("a");
    assert!(
        log.contains(
            "ignoring a member the broker relayed: the master's signature does not verify"
        ),
        "{log}"
    );
    assert_eq!(
        probe::client(&lab, "a", Ipv4Addr::new(240, 0, 0, 9), 22).unwrap()["errno"],
        EHOSTUNREACH
    );
    probe::server(&mut lab, "b", "0.0.0.0", 7900, 1).unwrap();
    assert_eq!(connects(&lab, "a", "b", 7900)["reply"], "echo:hello");
}

#[test]
fn a_broker_cannot_swap_a_members_public_key() {
    require_tools(&["python3"]);
    let mut lab = evil_lab(&["--mode", "swap-key", "--target", "240.0.0.3"]);
    lab.wait_for_peers("a", 1).unwrap();
    lab.wait_for_peers("b", 1).unwrap();
    let log = lab.agent_log("a");
    assert!(
        log.contains(
            "ignoring a member the broker relayed: the master's signature does not verify"
        ),
        "{log}"
    );
    assert_eq!(connects(&lab, "a", "c", 22)["errno"], EHOSTUNREACH);
    probe::server(&mut lab, "b", "0.0.0.0", 7901, 1).unwrap();
    assert_eq!(connects(&lab, "a", "b", 7901)["reply"], "echo:hello");
}

#[test]
fn a_broker_cannot_substitute_one_members_record_for_another() {
    require_tools(&["python3"]);
    // Everyone is told that c's addresses belong to b.
    let mut lab = evil_lab(&[
        "--mode",
        "substitute",
        "--target",
        "240.0.0.3",
        "--with",
        "240.0.0.2",
    ]);
    lab.wait_for_peers("c", 2).unwrap();
    wait_until(Duration::from_secs(10), "a to know b", || {
        lab.status("a").ok()?["peers"]
            .as_array()?
            .iter()
            .any(|p| p["name"] == "host-b")
            .then_some(())
    })
    .unwrap();
    // a's handshake for b reaches c, which holds neither b's key nor b's
    // address: nothing is installed and the connection is refused at once.
    probe::server(&mut lab, "b", "0.0.0.0", 7902, 1).unwrap();
    let got = connects(&lab, "a", "b", 7902);
    assert_eq!(got["errno"], ECONNREFUSED, "{got}");
    assert!(
        lab.evil_broker_log()
            .contains("sent a handshake meant for 240.0.0.2 to 240.0.0.3")
    );
    assert!(!lab.authenticated("a", lab.host("b").virtual_ip));
    let c_log = lab.agent_log("c");
    assert!(
        c_log.contains("the exchange is addressed to 240.0.0.2, not to this host"),
        "{c_log}"
    );
    // b, which the lie does not concern, still reaches a.
    probe::server(&mut lab, "a", "0.0.0.0", 7903, 1).unwrap();
    assert_eq!(connects(&lab, "b", "a", 7903)["reply"], "echo:hello");
}

#[test]
fn a_broker_cannot_answer_the_challenge_for_a_member() {
    require_tools(&["python3"]);
    let mut lab = evil_lab(&["--mode", "impersonate", "--target", "240.0.0.2"]);
    for h in ["a", "b", "c"] {
        lab.wait_for_peers(h, 2).unwrap();
    }
    probe::server(&mut lab, "b", "0.0.0.0", 7904, 1).unwrap();
    let got = connects(&lab, "a", "b", 7904);
    assert_eq!(got["errno"], ECONNREFUSED, "{got}");
    assert!(
        lab.evil_broker_log()
            .contains("answered a handshake meant for 240.0.0.2")
    );
    let log = lab.agent_log("a");
    assert!(
        log.contains("the peer's signature over the exchange does not verify"),
        "{log}"
    );
    assert!(!lab.authenticated("a", lab.host("b").virtual_ip));
    probe::server(&mut lab, "c", "0.0.0.0", 7905, 1).unwrap();
    assert_eq!(connects(&lab, "a", "c", 7905)["reply"], "echo:hello");
}

#[test]
fn a_recorded_exchange_cannot_be_replayed() {
    require_tools(&["python3"]);
    let mut lab = evil_lab(&["--mode", "replay"]);
    for h in ["a", "b", "c"] {
        lab.wait_for_peers(h, 2).unwrap();
    }
    probe::server(&mut lab, "b", "0.0.0.0", 7906, 3).unwrap();
    assert_eq!(connects(&lab, "a", "b", 7906)["reply"], "echo:hello");
    // b restarts: a forgets it (clean leave), and must prove b again.
    lab.stop_agent("b").unwrap();
    lab.start_agent("b").unwrap();
    lab.wait_for_peers("a", 2).unwrap();
    let got = connects(&lab, "a", "b", 7906);
    assert_eq!(got["errno"], ECONNREFUSED, "{got}");
    assert!(lab.evil_broker_log().contains("replayed an old Reply"));
    assert!(
        lab.agent_log("a")
            .contains("the peer's signature over the exchange does not verify")
    );
    // The broker replays once; the next exchange goes through.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(connects(&lab, "a", "b", 7906)["reply"], "echo:hello");
}

#[test]
fn the_policy_matrix_is_enforced_in_the_kernel_with_real_errnos() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(3).unwrap();
    lab.start_broker().unwrap();
    // a and c serve the web; b is the operators' host.
    lab.admit("a", &["--groups", "web"]).unwrap();
    lab.admit("b", &["--groups", "ops"]).unwrap();
    lab.admit("c", &["--groups", "web"]).unwrap();
    let global = lab.dir.join("global.toml");
    std::fs::write(
        &global,
        r#"
[[rule]]
from = ["*"]
to = ["group:web"]
ports = ["8080"]

[[rule]]
from = ["group:ops"]
to = ["*"]
ports = ["22", "2222"]
"#,
    )
    .unwrap();
    lab.master(&["policy", "--file", global.to_str().unwrap()])
        .unwrap();
    // a's own policy: ssh from operators, the web from anyone; it only opens
    // flows to b.
    lab.write_config(
        0,
        r#"[policy]
inbound = [ { peers = ["group:ops"], ports = ["22"] }, { peers = ["*"], ports = ["8080"] } ]
outbound = [ { peers = ["host-b"], ports = ["*"] } ]
"#,
    )
    .unwrap();
    lab.start_agents().unwrap();
    for h in ["a", "b", "c"] {
        lab.wait_for_peers(h, 2).unwrap();
    }
    for (h, ports) in [
        ("a", [22, 2222, 8080, 9090]),
        ("b", [22, 8080, 8081, 8082]),
        ("c", [22, 8080, 8083, 8084]),
    ] {
        for port in ports {
            probe::echo_server(&mut lab, h, port).unwrap();
        }
    }
    let expect = |client: &str, server: &str, port: u16, want: &str| {
        let got = connects(&lab, client, server, port);
        let outcome = if got["reply"].is_string() {
            "allowed"
        } else if got["errno"] == EPERM {
            "EPERM"
        } else if got["error"] == "timed out" {
            "dropped"
        } else {
            "other"
        };
        assert_eq!(outcome, want, "{client} -> {server}:{port}: {got}");
    };
    expect("c", "a", 8080, "allowed"); // global *->web:8080, a allows * on 8080
    expect("c", "a", 22, "EPERM"); // global: c is not an operator
    expect("b", "a", 22, "allowed"); // global ops->*:22, a allows ops on 22
    expect("b", "a", 2222, "dropped"); // global allows, a's own policy does not: a drops the SYN
    expect("b", "a", 9090, "EPERM"); // no global rule
    expect("a", "b", 22, "EPERM"); // global: a is not an operator
    expect("a", "c", 8080, "EPERM"); // global allows, a's own outbound policy does not
    expect("b", "c", 22, "allowed"); // global ops->*:22, c has no policy of its own
    expect("c", "b", 8080, "EPERM"); // b is not in group web
    assert!(drops(&lab, "a", "policy_inbound") >= 1);
    assert!(drops(&lab, "c", "policy_outbound") >= 1);
    let log = lab.agent_log("a");
    assert!(log.contains("refused a flow to port 2222 claiming to be 240.0.0.2, from 198.18.0.2: the policy does not allow it"), "{log}");
    assert!(
        log.contains("to 240.0.0.3:8080: the policy does not allow this flow"),
        "{log}"
    );
}

#[test]
fn a_revoked_member_is_refused_within_seconds_and_its_flows_are_cut() {
    require_tools(&["python3", "socat"]);
    let mut lab = Lab::lan(3).unwrap();
    lab.start_all().unwrap();
    probe::echo_server(&mut lab, "c", 7950).unwrap();
    probe::echo_server(&mut lab, "b", 7951).unwrap();
    assert_eq!(connects(&lab, "a", "c", 7950)["reply"], "hello");
    // A long-lived connection a -> c across the revocation.
    let c = lab.host("c").virtual_ip;
    let chat = probe::chatter(&mut lab, "a", c, 7950, 10).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    lab.master(&["revoke", "--name", "host-c"]).unwrap();
    let started = std::time::Instant::now();
    wait_until(Duration::from_secs(10), "a to refuse c", || {
        (connects(&lab, "a", "c", 7950)["errno"] == EHOSTUNREACH).then_some(())
    })
    .unwrap();
    eprintln!(
        "a refused new flows to c {:?} after the revocation",
        started.elapsed()
    );
    let out = lab.wait(&chat, Duration::from_secs(30)).unwrap();
    let result: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(
        result["ok"], false,
        "the established flow was cut: {result}"
    );
    // c cannot open flows to members either, and is told so: its agent
    // says it, and its connect() fails at once with EKEYREVOKED.
    wait_until(Duration::from_secs(5), "c to know it is revoked", || {
        (lab.status("c").ok()?["standing"] == "revoked").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.agent_log("c")));
    assert!(
        lab.agent_log("c")
            .contains("the master revoked this host's membership"),
        "{}",
        lab.agent_log("c")
    );
    let got = probe::timed(&lab, "c", lab.host("b").virtual_ip, 7951, true).unwrap();
    assert_eq!(got["errno"], EKEYREVOKED, "{got}");
    assert!(got["ms"].as_f64().unwrap() < 100.0, "{got}");
    // The others are unaffected.
    assert_eq!(connects(&lab, "a", "b", 7951)["reply"], "hello");
    let status = lab.status("b").unwrap();
    assert_eq!(status["revocations_version"], 1, "{status}");
}

#[test]
fn an_expired_record_ends_membership() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_broker().unwrap();
    lab.admit("a", &[]).unwrap();
    lab.admit("b", &["--valid-secs", "6"]).unwrap();
    for i in 0..2 {
        lab.write_config(i, "[flows]\ngc_interval_secs = 1\n")
            .unwrap();
    }
    lab.start_agents().unwrap();
    lab.wait_for_peers("a", 1).unwrap();
    probe::server(&mut lab, "b", "0.0.0.0", 7960, 1).unwrap();
    assert_eq!(connects(&lab, "a", "b", 7960)["reply"], "echo:hello");
    wait_until(Duration::from_secs(20), "a to drop b", || {
        lab.status("a").ok()?["peers"]
            .as_array()?
            .is_empty()
            .then_some(())
    })
    .unwrap();
    assert!(lab.agent_log("a").contains("member's record expired"));
    assert_eq!(connects(&lab, "a", "b", 7960)["errno"], EHOSTUNREACH);
    // b is told: its status and log say so, its connect() fails at once.
    assert_eq!(lab.status("b").unwrap()["standing"], "expired");
    assert!(
        lab.agent_log("b")
            .contains("this host's membership expired")
    );
    let got = probe::timed(&lab, "b", lab.host("a").virtual_ip, 7960, true).unwrap();
    assert_eq!(got["errno"], EKEYEXPIRED, "{got}");
    assert!(got["ms"].as_f64().unwrap() < 100.0, "{got}");
}

#[test]
fn the_registry_refuses_taken_names_and_addresses_across_restarts() {
    let mut lab = Lab::lan(2).unwrap();
    lab.start_broker().unwrap();
    lab.admit("a", &[]).unwrap();
    // Every `pvc master` run opens the registry afresh.
    let b_key = lab.host("b").public_key.clone();
    let err = lab
        .master(&[
            "admit",
            "--name",
            "host-a",
            "--virtual-ip",
            "240.0.0.7",
            "--host-key",
            &b_key,
        ])
        .unwrap_err()
        .to_string();
    assert!(err.contains("name host-a is taken"), "{err}");
    let err = lab
        .master(&[
            "admit",
            "--name",
            "host-x",
            "--virtual-ip",
            "240.0.0.1",
            "--host-key",
            &b_key,
        ])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("virtual address 240.0.0.1 is taken by host-a"),
        "{err}"
    );
    let list = lab.master(&["list"]).unwrap();
    assert!(
        list.contains("host-a") && list.contains("admitted"),
        "{list}"
    );
}

#[test]
fn authenticated_paths_expire_and_are_proven_again_while_in_use() {
    require_tools(&["python3", "socat"]);
    let mut lab = Lab::lan(2).unwrap();
    for i in 0..2 {
        lab.write_config(
            i,
            "[flows]\ngc_interval_secs = 1\n[security]\nsession_lifetime_secs = 10\n",
        )
        .unwrap();
    }
    lab.start_all().unwrap();
    probe::echo_server(&mut lab, "b", 7970).unwrap();
    let b = lab.host("b").virtual_ip;
    // A connection in use across two lifetimes.
    let chat = probe::chatter(&mut lab, "a", b, 7970, 22).unwrap();
    let result = probe::chatter_result(&mut lab, &chat).unwrap();
    assert_eq!(result["ok"], true, "{result}");
    let proofs = lab
        .agent_log("a")
        .matches("path to member authenticated and installed name=\"host-b\"")
        .count()
        + lab
            .agent_log("b")
            .matches("path to member authenticated and installed name=\"host-a\"")
            .count();
    assert!(
        proofs >= 4,
        "the path was proven {proofs} times (both sides counted), expected renewals"
    );
    // New connections still work on the renewed path.
    assert_eq!(connects(&lab, "a", "b", 7970)["reply"], "hello");
}

/// A broker that says a member sits at a third host's address (and that
/// it sees it there) sends nobody's flows to that host: the exchange binds
/// the addresses the path uses, and the member refuses an address that is
/// not its own.
#[test]
fn a_broker_cannot_send_a_members_flows_to_a_third_host() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(3).unwrap();
    let c_real = lab.host("c").real.to_string();
    lab.start_evil_broker(&[
        "--mode",
        "third-endpoint",
        "--target",
        "240.0.0.2",
        "--at",
        &c_real,
    ])
    .unwrap();
    // c is no member: a plain host of the LAN, listening on the port.
    lab.admit("a", &[]).unwrap();
    lab.admit("b", &[]).unwrap();
    lab.start_agent("a").unwrap();
    lab.start_agent("b").unwrap();
    lab.wait_for_peers("a", 1).unwrap();
    lab.wait_for_peers("b", 1).unwrap();
    let at_c = probe::server(&mut lab, "c", "0.0.0.0", 7950, 5).unwrap();
    let at_b = probe::server(&mut lab, "b", "0.0.0.0", 7950, 5).unwrap();
    let r = connects(&lab, "a", "b", 7950);
    assert_eq!(r["errno"], ECONNREFUSED, "{r}");
    let b_log = lab.agent_log("b");
    assert!(
        b_log.contains("refusing an exchange"),
        "b must refuse a path to an address not its own: {b_log}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        probe::accepted(&at_c).is_empty(),
        "a reached the third host"
    );
    assert!(probe::accepted(&at_b).is_empty());
}

/// A broker that asks an agent to inject a SYN, or to join a relayed
/// flow, for a non-member or in a member's name without the pair's key,
/// gets nothing: the requests are dropped and counted, no application
/// sees a connection.
#[test]
fn a_broker_cannot_make_an_agent_inject_syns_or_join_relays() {
    require_tools(&["python3"]);
    let mut lab = evil_lab(&[
        "--mode",
        "inject",
        "--target",
        "240.0.0.1",
        "--with",
        "240.0.0.2",
    ]);
    for h in ["a", "b", "c"] {
        lab.wait_for_peers(h, 2).unwrap();
    }
    // The port the injected SYNs are for.
    let ssh = probe::server(&mut lab, "a", "0.0.0.0", 22, 5).unwrap();
    let counter = |lab: &Lab, name: &str| {
        lab.status("a").unwrap()["agent_counters"][name]
            .as_u64()
            .unwrap_or(0)
    };
    wait_until(Duration::from_secs(10), "a to refuse the requests", || {
        (counter(&lab, "traversals_refused") >= 4 && counter(&lab, "relays_refused") >= 4)
            .then_some(())
    })
    .unwrap();
    // b authenticates its path to a: requests in b's name still fail
    // their MACs.
    probe::server(&mut lab, "a", "0.0.0.0", 7960, 1).unwrap();
    assert_eq!(connects(&lab, "b", "a", 7960)["reply"], "echo:hello");
    wait_until(
        Duration::from_secs(10),
        "MAC checks to refuse b's name",
        || {
            let log = lab.agent_log("a");
            (log.contains("refused a traversal request that does not check")
                && log.contains("refused a relayed flow whose request does not check"))
            .then_some(())
        },
    )
    .unwrap();
    let log = lab.agent_log("a");
    assert!(
        log.contains("refused a traversal request from a member without an authenticated path"),
        "{log}"
    );
    assert!(probe::accepted(&ssh).is_empty(), "a SYN was injected");
    let status = lab.status("a").unwrap();
    assert!(status["flows_opened"]["relay"].is_null(), "{status}");
    assert_eq!(counter(&lab, "traversals_served"), 0);
    assert_eq!(counter(&lab, "relays_served"), 0);
}

/// A broker that does not pair relayed connections as asked (it answers
/// them itself, as the other end) connects nobody: each agent checks, on
/// the relayed connection, that the other end holds the pair's key before
/// any byte of the flow passes; the client's connection is reset and the
/// server's application never sees one.
#[test]
fn a_broker_that_misroutes_relayed_connections_connects_nobody() {
    require_tools(&["iptables", "python3"]);
    // Two members behind symmetric NATs (the relay is their only path);
    // broker 0, the one relayed flows go through first, tampers.
    let mut lab =
        pvc_lab::Lab::internet(&[(pvc_lab::Site::Sym, 1), (pvc_lab::Site::Sym, 1)]).unwrap();
    lab.start_evil_broker_at(0, &["--mode", "misroute-relay"])
        .unwrap();
    lab.start_broker_at(1).unwrap();
    lab.admit_all().unwrap();
    lab.start_agents().unwrap();
    lab.wait_for_peers("a", 1).unwrap();
    lab.wait_for_peers("b", 1).unwrap();
    let served = probe::server(&mut lab, "b", "0.0.0.0", 7970, 5).unwrap();
    wait_until(Duration::from_secs(15), "a to pick the relay", || {
        let s = lab.status("a").ok()?;
        (s["peers"][0]["technique"] == "relay").then_some(())
    })
    .unwrap();
    let r = connects(&lab, "a", "b", 7970);
    assert_ne!(r["reply"], "echo:hello", "{r}");
    let log = lab.agent_log("a");
    assert!(
        log.contains("does not hold the pair's key: not the member"),
        "{log}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        probe::accepted(&served).is_empty(),
        "b's server saw a connection"
    );
}
