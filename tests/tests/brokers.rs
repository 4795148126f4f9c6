//! Several brokers (issue: NAT traversal, item 5): every agent keeps a
//! session with each broker it is configured with, so losing one (killed,
//! or cut off without a word) costs neither established flows nor new ones.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use pvc_lab::{Lab, Site, probe, require_tools, wait_until};

/// `client` connects to `server`:port, retrying until it works or `within`
/// passes; returns how long it took.
fn connects_within(
    lab: &Lab,
    client: &str,
    server: Ipv4Addr,
    port: u16,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        let r = probe::client(lab, client, server, port).unwrap();
        if r["reply"] == "echo:hello" {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{client} -> {server}:{port} still fails after {within:?}: {r}\n{}",
            lab.agent_log(client)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn brokers_of(lab: &Lab, host: &str) -> Vec<String> {
    lab.status(host).unwrap()["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["broker"].as_str().unwrap().to_string())
        .collect()
}

/// The broker in use dies: established direct flows go on, and new flows,
/// to members already reached and to members never reached before, work
/// again within 2 s through the other broker.
#[test]
fn killing_the_broker_in_use_costs_no_flow_and_new_ones_work_within_2s() {
    require_tools(&["iptables", "python3"]);
    // a behind a cone NAT, b behind a stateful firewall, c and d public.
    let mut lab = Lab::internet(&[
        (Site::Cone, 1),
        (Site::Fws, 1),
        (Site::Pub, 1),
        (Site::Pub, 1),
    ])
    .unwrap();
    lab.start_all().unwrap();
    let (vb, vc, vd) = (
        lab.host("b").virtual_ip,
        lab.host("c").virtual_ip,
        lab.host("d").virtual_ip,
    );
    for h in ["b", "c", "d"] {
        probe::server(&mut lab, h, "0.0.0.0", 7400, 100).unwrap();
        probe::echo_server(&mut lab, h, 7401).unwrap();
    }
    // Flows that must survive: punched (a -> b) and direct (a -> c).
    let punched = probe::chatter(&mut lab, "a", vb, 7401, 6).unwrap();
    let direct = probe::chatter(&mut lab, "a", vc, 7401, 6).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    let in_use = lab.status("a").unwrap()["broker"]
        .as_str()
        .unwrap()
        .to_string();
    let i = (0..2)
        .find(|i| lab.broker_addr(*i) == in_use)
        .expect("a broker of the lab");
    lab.kill_broker_at(i);
    let killed = Instant::now();
    // A known member (a -> b, a new punched flow) and a never-reached one
    // (a -> d, whose path is authenticated now, through the other broker).
    let known = connects_within(&lab, "a", vb, 7400, Duration::from_secs(2));
    let never_seen = connects_within(&lab, "a", vd, 7400, Duration::from_secs(2));
    let total = killed.elapsed();
    println!(
        "after the kill: known member {known:?}, never-reached member {never_seen:?} (total {total:?})"
    );
    assert!(total < Duration::from_secs(3), "{total:?}");
    assert_eq!(brokers_of(&lab, "a"), vec![lab.broker_addr(1 - i)]);
    for (what, c) in [("punched", punched), ("direct", direct)] {
        let r = probe::chatter_result(&mut lab, &c).unwrap();
        assert_eq!(r["ok"], true, "the {what} flow broke with the broker: {r}");
    }
    assert_eq!(lab.leaks().unwrap(), 0);
}

/// A broker that stops answering without closing anything (its link cut)
/// is given up within a few seconds, not after TCP's timeouts; a member
/// that lost only its own link to a broker still reaches the others
/// through the broker they share.
#[test]
fn a_silent_broker_is_given_up_within_seconds_and_members_still_meet() {
    require_tools(&["iptables", "python3"]);
    let mut lab = Lab::internet(&[(Site::Cone, 1), (Site::Pub, 1), (Site::Fws, 1)]).unwrap();
    lab.start_all().unwrap();
    let (vb, vc) = (lab.host("b").virtual_ip, lab.host("c").virtual_ip);
    probe::server(&mut lab, "b", "0.0.0.0", 7400, 100).unwrap();
    probe::server(&mut lab, "c", "0.0.0.0", 7400, 100).unwrap();

    // a loses its own way to broker 0 (packets dropped, nothing closed).
    let netns = lab.host("a").netns.clone();
    let b0 = lab.broker_addr(0);
    let b0_ip = b0.split(':').next().unwrap().to_string();
    for (chain, dir) in [("OUTPUT", "-d"), ("INPUT", "-s")] {
        Lab::command_in(&netns, None, "iptables")
            .unwrap()
            .args(["-A", chain, dir, &b0_ip, "-j", "DROP"])
            .ok()
            .unwrap();
    }
    let cut = Instant::now();
    let gone = wait_until(Duration::from_secs(8), "a to give broker 0 up", || {
        (brokers_of(&lab, "a") == vec![lab.broker_addr(1)]).then(|| cut.elapsed())
    })
    .unwrap();
    println!("silent broker given up after {gone:?}");
    assert!(gone <= Duration::from_secs(5), "{gone:?}");
    // a and its peers meet on broker 1 (first contact and a punched flow).
    connects_within(&lab, "a", vb, 7400, Duration::from_secs(2));
    connects_within(&lab, "a", vc, 7400, Duration::from_secs(2));
    probe::server(&mut lab, "a", "0.0.0.0", 7400, 100).unwrap();
    connects_within(
        &lab,
        "c",
        lab.host("a").virtual_ip,
        7400,
        Duration::from_secs(2),
    );

    // Broker 1 goes silent for everyone: every agent gives it up too, and
    // meets the others on broker 0 again once a's link is back.
    for chain in ["OUTPUT", "INPUT"] {
        Lab::command_in(&netns, None, "iptables")
            .unwrap()
            .args(["-F", chain])
            .ok()
            .unwrap();
    }
    wait_until(Duration::from_secs(10), "a back on broker 0", || {
        brokers_of(&lab, "a").contains(&b0).then_some(())
    })
    .unwrap();
    lab.cut_broker_link(1).unwrap();
    let cut = Instant::now();
    for h in ["a", "b", "c"] {
        wait_until(
            Duration::from_secs(8),
            &format!("{h} to give broker 1 up"),
            || (brokers_of(&lab, h) == vec![b0.clone()]).then_some(()),
        )
        .unwrap();
    }
    println!("broker 1 cut: all gave it up after {:?}", cut.elapsed());
    connects_within(&lab, "b", vc, 7400, Duration::from_secs(2));
    assert_eq!(lab.leaks().unwrap(), 0);
}
