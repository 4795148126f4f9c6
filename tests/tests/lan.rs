//! A virtual cluster on one LAN: real agents, a real broker, unmodified
//! programs connecting to virtual addresses.

use std::net::Ipv4Addr;

use pvc_tests::{Lab, probe, require_tools};

const EHOSTUNREACH: i64 = 113;

#[test]
fn two_hosts_see_each_others_virtual_addresses_in_both_directions() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    let (a, b) = (lab.host("a").virtual_ip, lab.host("b").virtual_ip);

    for (client, server, server_ip, client_ip) in [("a", "b", b, a), ("b", "a", a, b)] {
        // A server bound to the wildcard address: accept() returns the
        // client's virtual address, not its real one.
        let log = probe::server(&mut lab, server, "0.0.0.0", 7000, 1).unwrap();
        let got = probe::client(&lab, client, server_ip, 7000).unwrap();
        assert_eq!(got["reply"], "echo:hello", "{got}");
        assert_eq!(got["peer"], server_ip.to_string(), "client's getpeername()");
        assert_eq!(
            got["local"],
            client_ip.to_string(),
            "client's getsockname()"
        );
        let seen = pvc_tests::wait_until(std::time::Duration::from_secs(5), "server log", || {
            probe::accepted(&log).pop()
        })
        .unwrap();
        assert_eq!(seen["peer"], client_ip.to_string(), "server's accept()");
        assert_eq!(seen["local"], server_ip.to_string());
    }

    // A server bound to its virtual address only.
    let log = probe::server(&mut lab, "b", &b.to_string(), 7001, 1).unwrap();
    let got = probe::client(&lab, "a", b, 7001).unwrap();
    assert_eq!(got["reply"], "echo:hello", "{got}");
    let seen = pvc_tests::wait_until(std::time::Duration::from_secs(5), "server log", || {
        probe::accepted(&log).pop()
    })
    .unwrap();
    assert_eq!(seen["peer"], a.to_string());
}

#[test]
fn connecting_to_a_virtual_address_without_member_fails_at_once() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    let nobody = Ipv4Addr::new(240, 0, 0, 99);
    let got = probe::client(&lab, "a", nobody, 80).unwrap();
    // EHOSTUNREACH comes from the connect4 hook; without it the SYN would
    // be dropped and the client would time out (errno None, "timed out").
    assert_eq!(got["errno"], EHOSTUNREACH, "{got}");
    let status = lab.status("a").unwrap();
    assert_eq!(status["drops"]["connect_no_member"], 1, "{status}");
    let log = lab.agent_log("a");
    assert!(
        log.contains("refused connect(): no member has virtual address 240.0.0.99"),
        "{log}"
    );
}
