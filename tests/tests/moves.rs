//! A desktop that changes network: a new address on its uplink (a DHCP
//! renewal), then another uplink (Wi-Fi to wired), while a member keeps
//! connecting to it. With `uplink = "auto"` the agent follows the default
//! route and starts over on the new network; its flows over the old one end
//! at once on both ends, and members reach it again within seconds.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use pvc_lab::{Lab, probe, require_tools, wait_until};

const ECONNABORTED: i64 = 103;

fn ip(lab: &Lab, host: &str, args: &[&str]) {
    let netns = lab.host(host).netns.clone();
    Lab::command_in(&netns, None, "ip")
        .unwrap()
        .args(args)
        .ok()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
}

/// b's default route through the LAN's router address, on `dev`.
fn default_route(lab: &Lab, dev: &str) {
    ip(
        lab,
        "b",
        &[
            "route",
            "replace",
            "default",
            "via",
            "198.18.0.254",
            "dev",
            dev,
        ],
    );
}

/// How long until `a` connects to `b` again.
fn reached_again(lab: &Lab, since: Instant) -> Duration {
    let b = lab.host("b").virtual_ip;
    wait_until(Duration::from_secs(20), "a to reach b again", || {
        let got = probe::client(lab, "a", b, 7800).ok()?;
        (got["reply"] == "echo:hello").then(|| since.elapsed())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", lab.agent_log("b"), lab.agent_log("a")))
}

#[test]
fn an_agent_follows_its_host_to_a_new_address_and_a_new_uplink() {
    require_tools(&["python3", "ss"]);
    let mut lab = Lab::lan(2).unwrap();
    // b follows its default route.
    let config = lab.host("b").config.clone();
    let text = std::fs::read_to_string(&config).unwrap();
    // (Its metrics on loopback: the lab's default is the address that goes.)
    let text = text
        .replace("uplink = \"eth0\"", "uplink = \"auto\"")
        .replace(
            &format!("listen = \"{}:", lab.host("b").real),
            "listen = \"127.0.0.1:",
        );
    std::fs::write(&config, text).unwrap();
    default_route(&lab, "eth0");
    lab.start_all().unwrap();
    probe::server(&mut lab, "b", "0.0.0.0", 7800, 1000).unwrap();
    probe::echo_server(&mut lab, "a", 7801).unwrap();
    let b_vip = lab.host("b").virtual_ip;
    let got = probe::client(&lab, "a", b_vip, 7800).unwrap();
    assert_eq!(got["reply"], "echo:hello", "{got}");
    let pid = lab.agent_pid("b").unwrap();

    // 1. A new address on the same uplink (a DHCP renewal gave another).
    let a_vip = lab.host("a").virtual_ip;
    probe::echo_server(&mut lab, "b", 7802).unwrap();
    let chatter = probe::chatter(&mut lab, "b", a_vip, 7801, 20).unwrap();
    let towards = probe::chatter(&mut lab, "a", b_vip, 7802, 20).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // Both are carried by their sockets (translation at the socket, the
    // agents' default): the move ends them by their wire tuples.
    for (host, port) in [("a", 7802), ("b", 7801)] {
        let flows = lab.status(host).unwrap()["flows"].clone();
        assert!(
            flows
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["direction"] == "socket"
                    && f["from"].as_str().unwrap().contains(&format!(":{port}"))),
            "{host}'s flows: {flows}"
        );
    }
    ip(&lab, "b", &["addr", "del", "198.18.0.2/24", "dev", "eth0"]);
    ip(&lab, "b", &["addr", "add", "198.18.0.12/24", "dev", "eth0"]);
    default_route(&lab, "eth0");
    let moved = Instant::now();
    // b's flow over the old address ends at once, cleanly.
    let ended = probe::chatter_result(&mut lab, &chatter).unwrap();
    assert_eq!(ended["ok"], false, "{ended}");
    assert_eq!(
        ended["errno"],
        ECONNABORTED,
        "{ended}\n{}",
        lab.agent_log("b")
    );
    // a's end of a connection to b's old address ends too, once b has
    // re-registered from its new one.
    let ended = probe::chatter_result(&mut lab, &towards).unwrap();
    assert_eq!(
        ended["errno"],
        ECONNABORTED,
        "{ended}\n{}",
        lab.agent_log("a")
    );
    let after = reached_again(&lab, moved);
    println!("new address: a reaches b again {after:?} after the change");
    assert!(after < Duration::from_secs(10), "{after:?}");
    assert!(
        lab.agent_log("b")
            .contains("has 198.18.0.12 instead of 198.18.0.2")
    );
    // Same process (it started over in place), new address in its status.
    assert_eq!(lab.agent_pid("b"), Some(pid));
    assert_eq!(lab.status("b").unwrap()["real_ip"], "198.18.0.12");

    // 2. Another uplink: a second interface comes up and takes the default
    // route; the first one goes down.
    lab.add_lan_link("b", "eth2", Ipv4Addr::new(198, 18, 0, 22))
        .unwrap();
    default_route(&lab, "eth2");
    ip(&lab, "b", &["link", "set", "eth0", "down"]);
    let moved = Instant::now();
    let after = reached_again(&lab, moved);
    println!("new uplink: a reaches b again {after:?} after the change");
    assert!(after < Duration::from_secs(10), "{after:?}");
    let status = lab.status("b").unwrap();
    assert_eq!(status["uplink"], "eth2", "{status}");
    assert_eq!(status["real_ip"], "198.18.0.22", "{status}");
    // And b reaches a from its new place.
    let back = probe::client(&lab, "b", a_vip, 7801).unwrap();
    assert!(back.get("errno").is_none(), "{back}");
}
