//! The simulated Internet of the lab itself: routing, NAT and firewall
//! behaviour, the core's leak counter, a real miniupnpd.

use pvc_lab::{Lab, Site, probe, require_tools};

/// `ping -c1 -W1 dst` from `host`'s namespace: whether it got an answer.
fn pings(lab: &Lab, host: &str, dst: &str) -> bool {
    let netns = lab.host(host).netns.clone();
    Lab::command_in(&netns, None, "ping")
        .unwrap()
        .args(["-c1", "-W1", dst])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn the_simulated_internet_routes_nats_counts_leaks_and_runs_miniupnpd() {
    require_tools(&["ping", "upnpc", "iptables"]);
    let lab = Lab::internet(&[
        (Site::Pub, 1),
        (Site::Fwl, 1),
        (Site::Fws, 1),
        (Site::Cone, 2),
        (Site::Upnp, 1),
        (Site::Sym, 1),
    ])
    .unwrap();
    let names: Vec<String> = lab.hosts.iter().map(|h| h.name.clone()).collect();
    assert_eq!(names.len(), 7);
    // Everyone reaches the brokers' public addresses.
    for h in &names {
        for b in ["198.19.1.2", "198.19.2.2"] {
            assert!(pings(&lab, h, b), "{h} cannot reach {b}");
        }
    }
    assert_eq!(lab.leaks().unwrap(), 0);
    // A public host reaches the public hosts behind firewalls... for ping
    // (firewalls here filter TCP SYNs and unsolicited state only).
    assert!(pings(&lab, "a", &lab.host("b").real.to_string()));
    // Nobody reaches a private or a virtual address across the core, and
    // the core counts what tried; so is a NAT box that lets a private
    // source through.
    assert!(!pings(&lab, "a", &lab.host("d").real.to_string()));
    let to_private = lab.leaks().unwrap();
    assert!(
        to_private >= 1,
        "a packet to a private address was not counted"
    );
    assert!(!pings(&lab, "a", "240.0.0.9"));
    let to_virtual = lab.leaks().unwrap();
    assert!(
        to_virtual > to_private,
        "a packet to a virtual address was not counted"
    );
    let cone = lab.host("d").site.unwrap();
    let router = lab.router_netns(cone).unwrap();
    Lab::command_in(&router, None, "iptables")
        .unwrap()
        .args([
            "-t",
            "nat",
            "-I",
            "POSTROUTING",
            "-p",
            "icmp",
            "-j",
            "ACCEPT",
        ])
        .ok()
        .unwrap();
    assert!(!pings(&lab, "d", "198.19.1.2"));
    assert!(
        lab.leaks().unwrap() > to_virtual,
        "the leak was not counted"
    );

    // miniupnpd on the upnp site maps a port for its member.
    let upnp = lab.host("f").site.unwrap();
    assert_eq!(lab.site_of("f"), Site::Upnp);
    let real = lab.host("f").real.to_string();
    let netns = lab.host("f").netns.clone();
    let out = Lab::command_in(&netns, None, "upnpc")
        .unwrap()
        .args(["-i", "-a", &real, "7123", "7123", "TCP", "600"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mappings = lab.upnp_mappings(upnp).unwrap();
    assert!(
        mappings.iter().any(|m| m.contains("7123")),
        "{text}\n{mappings:?}"
    );
}

#[test]
fn each_agent_finds_out_what_kind_of_site_it_sits_in() {
    require_tools(&["iptables", "miniupnpd"]);
    let mut lab = Lab::internet(&[
        (Site::Pub, 1),
        (Site::Fwl, 1),
        (Site::Fws, 1),
        (Site::Cone, 1),
        (Site::Upnp, 1),
        (Site::Sym, 1),
    ])
    .unwrap();
    lab.start_all().unwrap();
    let expect = [
        ("a", "None", "Open", false),
        ("b", "None", "SynFiltered", false),
        ("c", "None", "Filtered", false),
        ("d", "Preserving", "Filtered", false),
        ("e", "Preserving", "Open", true),
        ("f", "Random", "Filtered", false),
    ];
    for (host, nat, inbound, upnp) in expect {
        let site = pvc_lab::wait_until(
            std::time::Duration::from_secs(20),
            &format!("{host}'s site"),
            || {
                let s = lab.status(host).ok()?;
                let site = s["site"].clone();
                (site["inbound"] != "Unknown" && (!upnp || !site["upnp"].is_null())).then_some(site)
            },
        )
        .unwrap();
        assert_eq!(site["nat"], nat, "{host} ({:?}): {site}", lab.site_of(host));
        assert_eq!(site["inbound"], inbound, "{host}: {site}");
        let j = lab.host(host).site.unwrap();
        let public = if nat == "None" {
            lab.host(host).real
        } else {
            lab.site_wan(j)
        };
        assert_eq!(site["public"], public.to_string(), "{host}: {site}");
        if upnp {
            assert_eq!(site["upnp"], format!("{}:7101", lab.site_wan(j)), "{site}");
        }
    }
    assert_eq!(lab.leaks().unwrap(), 0);
}

/// One connection from `client` to `server`'s virtual address: the echo's
/// reply and how long connect() and the first exchange took, or the errno.
fn connect_once(lab: &Lab, client: &str, server: &str, port: u16) -> serde_json::Value {
    probe::timed(lab, client, lab.host(server).virtual_ip, port, true).unwrap()
}

/// Flows `host`'s agent opened with `technique` so far.
fn opened(lab: &Lab, host: &str, technique: &str) -> u64 {
    lab.status(host).unwrap()["flows_opened"][technique]
        .as_u64()
        .unwrap_or(0)
}

/// The technique `client`'s agent uses toward `server`.
fn technique(lab: &Lab, client: &str, server: &str) -> Option<String> {
    let vip = lab.host(server).virtual_ip.to_string();
    let s = lab.status(client).ok()?;
    s["peers"]
        .as_array()?
        .iter()
        .find(|p| p["virtual_ip"] == vip.as_str())
        .and_then(|p| p["technique"].as_str().map(str::to_string))
}

/// Every ordered pair of site kinds (two sites of each kind, so that a kind
/// meets itself across the Internet), and two members behind one NAT: the
/// technique the agents pick, that an unmodified client's connection works
/// through it, how long it took, and that nothing private or virtual
/// crossed the core.
#[test]
fn every_pair_of_sites_connects_with_the_technique_that_fits() {
    use Site::*;
    require_tools(&["iptables", "miniupnpd", "python3", "socat"]);
    let kinds = [Pub, Fwl, Fws, Cone, Upnp, Sym];
    // Hosts a..f: one site of each kind; g..m: a second one, with k beside
    // j (a second member behind the second cone NAT).
    let mut sites: Vec<(Site, usize)> = kinds.iter().map(|k| (*k, 1)).collect();
    sites.extend(kinds.iter().map(|k| (*k, if *k == Cone { 2 } else { 1 })));
    let mut lab = Lab::internet(&sites).unwrap();
    lab.start_all().unwrap();
    let first: Vec<String> = ["a", "b", "c", "d", "e", "f"].map(String::from).into();
    let second: Vec<String> = ["g", "h", "i", "j", "l", "m"].map(String::from).into();
    const PORT: u16 = 7300;
    let mut logs = std::collections::BTreeMap::new();
    for h in first.iter().chain(&second).chain([&"k".to_string()]) {
        logs.insert(
            h.clone(),
            probe::server(&mut lab, h, "0.0.0.0", PORT, 16).unwrap(),
        );
    }
    // Sites are discovered in the background (probes, UPnP): the choice
    // settles once every member knows every site.
    let want = |c: Site, s: Site| -> &'static str {
        match (c, s) {
            (_, Pub) => "direct",
            (_, Upnp) => "upnp",
            (Sym, _) => "relay",
            (_, Fwl) => "ttcp",
            (_, Fws | Cone) => "punch",
            (Pub | Upnp, Sym) => "reversal",
            (_, Sym) => "relay",
        }
    };
    let mut cells = Vec::new();
    for (ci, c) in kinds.iter().enumerate() {
        for (si, s) in kinds.iter().enumerate() {
            cells.push((*c, *s, first[ci].clone(), second[si].clone()));
        }
    }
    pvc_lab::wait_until(
        std::time::Duration::from_secs(30),
        "every agent to pick its techniques",
        || {
            cells
                .iter()
                .all(|(c, s, from, to)| technique(&lab, from, to).as_deref() == Some(want(*c, *s)))
                .then_some(())
        },
    )
    .unwrap_or_else(|e| {
        let wrong: Vec<String> = cells
            .iter()
            .filter_map(|(c, s, from, to)| {
                let got = technique(&lab, from, to);
                (got.as_deref() != Some(want(*c, *s)))
                    .then(|| format!("{}->{}: {got:?}, want {}", c.name(), s.name(), want(*c, *s)))
            })
            .collect();
        panic!("{e}: {wrong:#?}\n{}", lab.status("a").unwrap())
    });
    assert_eq!(technique(&lab, "j", "k").as_deref(), Some("lan"));

    let mut table = String::from("| client \\ server |");
    for s in kinds {
        table += &format!(" {} |", s.name());
    }
    table += "\n|---|";
    table += &"---|".repeat(kinds.len());
    let mut failures = Vec::new();
    for (ci, c) in kinds.iter().enumerate() {
        table += &format!("\n| **{}** |", c.name());
        for (si, s) in kinds.iter().enumerate() {
            let (from, to) = (&first[ci], &second[si]);
            let before = opened(&lab, from, want(*c, *s));
            let r = connect_once(&lab, from, to, PORT);
            let took = opened(&lab, from, want(*c, *s)) > before;
            // Both ends see only virtual addresses.
            let (cv, sv) = (lab.host(from).virtual_ip, lab.host(to).virtual_ip);
            let seen = probe::accepted(&logs[to]);
            let virtual_both_ways = r["local"] == cv.to_string().as_str()
                && r["peer"] == sv.to_string().as_str()
                && seen.iter().any(|a| {
                    a["peer"] == cv.to_string().as_str() && a["local"] == sv.to_string().as_str()
                });
            let ok = r["reply"] == "echo:hello" && took && virtual_both_ways;
            let ms = r["ms"].as_f64().unwrap_or(f64::NAN);
            table += &format!(
                " {} {:.0} ms{} |",
                want(*c, *s),
                ms,
                if ok { "" } else { " FAILED" }
            );
            if !ok {
                failures.push(format!(
                    "{}->{} ({}, flow opened with it: {took}, server saw {seen:?}): {r}\n--- {from}\n{}\n--- {to}\n{}",
                    c.name(),
                    s.name(),
                    want(*c, *s),
                    lab.agent_log(from),
                    lab.agent_log(to)
                ));
            }
        }
    }
    let r = connect_once(&lab, "j", "k", PORT);
    table += &format!(
        "\n\nTwo members behind one cone NAT: lan {:.0} ms{}",
        r["ms"].as_f64().unwrap_or(f64::NAN),
        if r["reply"] == "echo:hello" {
            ""
        } else {
            " FAILED"
        }
    );
    if r["reply"] != "echo:hello" {
        failures.push(format!("j->k (lan): {r}"));
    }
    println!("{table}");
    let _ = std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("traversal-matrix.md"),
        &table,
    );
    assert!(failures.is_empty(), "{table}\n\n{}", failures.join("\n\n"));
    assert_eq!(
        lab.leaks().unwrap(),
        0,
        "private or virtual addresses crossed the core"
    );
}

/// The UPnP forward of the PVC port exists while the agent runs, is gone
/// after a clean stop, and after a kill -9 the next start removes what the
/// dead agent left (here with UPnP turned off meanwhile, so that nothing
/// new hides the leftover).
#[test]
fn upnp_forwards_are_removed_at_stop_and_after_a_crash() {
    require_tools(&["iptables", "miniupnpd", "nft"]);
    let mut lab = Lab::internet(&[(Site::Upnp, 1), (Site::Pub, 1)]).unwrap();
    lab.start_all().unwrap();
    let forwarded = |lab: &Lab| {
        lab.upnp_mappings(0)
            .unwrap()
            .iter()
            .filter(|m| m.contains("7101"))
            .count()
    };
    let wait_forwards = |lab: &Lab, n: usize, what: &str| {
        pvc_lab::wait_until(std::time::Duration::from_secs(15), what, || {
            (forwarded(lab) == n).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", lab.upnp_mappings(0), lab.agent_log("a")))
    };
    wait_forwards(&lab, 1, "the forward");
    lab.stop_agent("a").unwrap();
    wait_forwards(&lab, 0, "the forward to go at the clean stop");

    lab.start_agent("a").unwrap();
    wait_forwards(&lab, 1, "the forward again");
    lab.kill_agent("a");
    assert_eq!(forwarded(&lab), 1, "a killed agent cannot clean up");
    lab.write_config(0, "[connectivity]\nupnp = false\n")
        .unwrap();
    lab.start_agent("a").unwrap();
    wait_forwards(&lab, 0, "the next start to remove the leftover");
    assert!(
        lab.agent_log("a")
            .contains("removed the UPnP forward a previous agent left"),
        "{}",
        lab.agent_log("a")
    );
    assert_eq!(lab.leaks().unwrap(), 0);
}

/// A traversal that cannot complete (here the server's NAT drops the
/// punch) falls back to the relay within the bound: the application's
/// connect() succeeds, and the pair stays on the relay for the next flows,
/// in both directions.
#[test]
fn a_traversal_that_fails_falls_back_to_the_relay_within_two_seconds() {
    require_tools(&["iptables", "python3"]);
    let mut lab = Lab::internet(&[(Site::Cone, 1), (Site::Cone, 1)]).unwrap();
    lab.start_all().unwrap();
    probe::server(&mut lab, "a", "0.0.0.0", 7500, 10).unwrap();
    probe::server(&mut lab, "b", "0.0.0.0", 7500, 10).unwrap();
    pvc_lab::wait_until(
        std::time::Duration::from_secs(15),
        "a to pick the punch",
        || (technique(&lab, "a", "b").as_deref() == Some("punch")).then_some(()),
    )
    .unwrap();
    // b's NAT lets no connection request out to a's site: its punch
    // never leaves (the brokers it still reaches).
    lab.drop_syns_between_sites(1, 0).unwrap();
    let first = connect_once(&lab, "a", "b", 7500);
    assert_eq!(
        first["reply"],
        "echo:hello",
        "{first}\n{}",
        lab.agent_log("a")
    );
    let ms = first["ms"].as_f64().unwrap();
    println!("first connection through the fallback: {ms:.0} ms");
    assert!(ms < 2000.0, "{ms} ms");
    assert_eq!(opened(&lab, "a", "relay"), 1);
    assert_eq!(technique(&lab, "a", "b").as_deref(), Some("relay"));
    assert!(
        lab.agent_log("a")
            .contains("the member is reached through the relay from now on"),
        "{}",
        lab.agent_log("a")
    );
    // The next flows take the relay at once, both ways.
    let again = connect_once(&lab, "a", "b", 7500);
    assert_eq!(again["reply"], "echo:hello", "{again}");
    let back = connect_once(&lab, "b", "a", 7500);
    assert_eq!(
        back["reply"],
        "echo:hello",
        "{back}\n{}",
        lab.agent_log("b")
    );
    assert_eq!(opened(&lab, "a", "relay"), 3);
    // The agents' periodic check of their next hops (every 30 s) leaves
    // the relay's local route alone, and it is the member's only route.
    std::thread::sleep(std::time::Duration::from_secs(32));
    fn routes(lab: &Lab, host: &str, dst: &str) -> String {
        lab.app(host, "ip")
            .args(["route", "show", "table", "all", "proto", "80", "root", dst])
            .ok()
            .unwrap()
    }
    for (client, server) in [("a", "b"), ("b", "a")] {
        let vip = lab.host(server).virtual_ip.to_string();
        let route = routes(&lab, client, &vip);
        assert!(
            route.trim().starts_with("local ") && route.trim().lines().count() == 1,
            "{client}'s routes to {server} 32 s later: {route}\n{}",
            lab.agent_log(client)
        );
        let later = connect_once(&lab, client, server, 7500);
        assert_eq!(later["reply"], "echo:hello", "{later}");
    }
    // A stopped agent leaves no route behind, local ones included.
    lab.stop_agent("a").unwrap();
    let left = routes(&lab, "a", "240.0.0.0/4");
    assert!(left.trim().is_empty(), "routes left: {left}");
    assert_eq!(lab.leaks().unwrap(), 0);
}

/// Traversing-TCP through a firewall that rejects connection requests with
/// a RST (instead of dropping them): the RST is the firewall's, not the
/// server's answer, and never reaches the client's socket; the connection
/// completes through the SYN the agents carried.
#[test]
fn a_firewalls_reset_of_a_traversing_syn_never_reaches_the_client() {
    require_tools(&["iptables", "python3"]);
    let mut lab = Lab::internet(&[(Site::Pub, 1), (Site::Fwl, 1)]).unwrap();
    // b's firewall answers inbound SYNs with a RST from b's address.
    let router = lab.router_netns(1).unwrap();
    for chain in ["FORWARD", "INPUT"] {
        Lab::command_in(&router, None, "iptables")
            .unwrap()
            .args([
                "-I",
                chain,
                "-i",
                "wan",
                "-p",
                "tcp",
                "--syn",
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ])
            .ok()
            .unwrap();
    }
    lab.start_all().unwrap();
    probe::server(&mut lab, "b", "0.0.0.0", 7600, 5).unwrap();
    pvc_lab::wait_until(
        std::time::Duration::from_secs(15),
        "a to pick Traversing-TCP",
        || (technique(&lab, "a", "b").as_deref() == Some("ttcp")).then_some(()),
    )
    .unwrap();
    let r = connect_once(&lab, "a", "b", 7600);
    assert_eq!(r["reply"], "echo:hello", "{r}\n{}", lab.agent_log("a"));
    assert_eq!(opened(&lab, "a", "ttcp"), 1);
    let resets = lab.status("a").unwrap()["drops"]["traversal_reset"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        resets >= 1,
        "the firewall's RST was not seen (or not kept from the socket)"
    );
    assert_eq!(lab.leaks().unwrap(), 0);
}

/// The UPnP forward is renewed before its lease ends (here a 4 s lease):
/// it outlives several leases while the agent runs; stopped (SIGSTOP), the
/// agent renews nothing and the gateway drops the forward at the lease's
/// end; resumed, it asks again.
#[test]
fn upnp_forwards_are_renewed_before_their_lease_ends() {
    require_tools(&["iptables", "miniupnpd", "nft"]);
    let mut lab = Lab::internet(&[(Site::Upnp, 1), (Site::Pub, 1)]).unwrap();
    lab.write_config(0, "[connectivity]\nupnp_lease_secs = 4\n")
        .unwrap();
    lab.start_all().unwrap();
    let forwarded = |lab: &Lab| {
        lab.upnp_mappings(0)
            .unwrap()
            .iter()
            .any(|m| m.contains("7101"))
    };
    let wait = |lab: &Lab, want: bool, what: &str| {
        pvc_lab::wait_until(std::time::Duration::from_secs(20), what, || {
            (forwarded(lab) == want).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", lab.agent_log("a")))
    };
    wait(&lab, true, "the forward");
    for _ in 0..10 {
        std::thread::sleep(std::time::Duration::from_secs(1));
        assert!(forwarded(&lab), "the forward lapsed while the agent ran");
    }
    let pid = lab.agent_pid("a").unwrap().to_string();
    let signal = |sig: &str| {
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    signal("-STOP");
    wait(&lab, false, "the gateway to drop the unrenewed forward");
    signal("-CONT");
    wait(&lab, true, "the resumed agent to renew it");
}
