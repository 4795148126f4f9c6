//! The simulated Internet of the lab itself: routing, NAT and firewall
//! behaviour, the core's leak counter, a real miniupnpd.

use pvc_lab::{Lab, Site, require_tools};

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
    // Nobody reaches a private address across the core, and a NAT box that
    // lets a private source through is caught by the counter.
    assert!(!pings(&lab, "a", &lab.host("d").real.to_string()));
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
    assert!(lab.leaks().unwrap() >= 1, "the leak was not counted");

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
