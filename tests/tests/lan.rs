//! A virtual cluster on one LAN: real agents, a real broker, unmodified
//! programs connecting to virtual addresses.

use std::net::Ipv4Addr;

use pvc_lab::{Lab, probe, require_tools};

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
        let seen = pvc_lab::wait_until(std::time::Duration::from_secs(5), "server log", || {
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
    let seen = pvc_lab::wait_until(std::time::Duration::from_secs(5), "server log", || {
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
        log.contains("to 240.0.0.99:80: no member has this virtual address"),
        "{log}"
    );
}

#[test]
fn three_hosts_reach_each_other_in_all_directions_with_real_programs() {
    require_tools(&["python3", "curl", "socat"]);
    let mut lab = Lab::lan(3).unwrap();
    lab.start_all().unwrap();
    let names = ["a", "b", "c"];
    // An HTTP server on every host, bound to its virtual address.
    for h in names {
        let vip = lab.host(h).virtual_ip.to_string();
        let root = lab.dir.join(format!("www-{h}"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), format!("this is host {h}\n")).unwrap();
        let root = root.to_str().unwrap().to_string();
        lab.spawn(
            h,
            "python3",
            &[
                "-m",
                "http.server",
                "8080",
                "--bind",
                &vip,
                "--directory",
                &root,
            ],
        )
        .unwrap();
        lab.wait_listening(h, 8080).unwrap();
    }
    for client in names {
        for server in names.iter().filter(|s| **s != client) {
            let url = format!("http://{}:8080/", lab.host(server).virtual_ip);
            let body = lab
                .app(client, "curl")
                .args(["-sS", "--max-time", "5", &url])
                .ok()
                .unwrap();
            assert_eq!(
                body,
                format!("this is host {server}\n"),
                "{client} -> {server}"
            );
        }
    }
    // python's http.server logs the client address of every request.
    for server in names {
        let logs: String = std::fs::read_dir(&lab.dir)
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{server}-python3"))
            })
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .collect();
        for client in names.iter().filter(|c| **c != server) {
            let vip = lab.host(client).virtual_ip.to_string();
            assert!(
                logs.contains(&format!("{vip} - - ")),
                "{server} saw no request from {vip}:\n{logs}"
            );
        }
        assert!(
            !logs.contains("198.18."),
            "{server} saw a real address:\n{logs}"
        );
    }

    // socat as a server on a, reporting the peer it accepted.
    let a = lab.host("a").virtual_ip.to_string();
    lab.spawn(
        "a",
        "socat",
        &["-d", "-d", "TCP-LISTEN:9000,fork,reuseaddr", "EXEC:cat"],
    )
    .unwrap();
    lab.wait_listening("a", 9000).unwrap();
    for client in ["b", "c"] {
        let out = lab
            .app(client, "socat")
            .args(["-T", "5", "-", &format!("TCP:{a}:9000")])
            .cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child.stdin.take().unwrap().write_all(b"through socat\n")?;
                child.wait_with_output()
            })
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "through socat\n");
    }
    let socat_log: String = std::fs::read_dir(&lab.dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("a-socat"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    for client in ["b", "c"] {
        let vip = lab.host(client).virtual_ip;
        assert!(
            socat_log.contains(&format!("accepting connection from AF=2 {vip}:")),
            "{socat_log}"
        );
    }
}

#[test]
fn many_short_connections_all_succeed() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    const N: usize = 500;
    let b = lab.host("b").virtual_ip;
    let log = probe::server(&mut lab, "b", "0.0.0.0", 7200, N).unwrap();
    let results = probe::clients(&lab, "a", b, 7200, N).unwrap();
    assert_eq!(results.len(), N);
    let failed: Vec<_> = results
        .iter()
        .filter(|r| r["reply"] != "echo:hello")
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {N} failed, e.g. {}",
        failed.len(),
        failed[0]
    );
    let seen = pvc_lab::wait_until(
        std::time::Duration::from_secs(10),
        "server to log all",
        || {
            let s = probe::accepted(&log);
            (s.len() == N).then_some(s)
        },
    )
    .unwrap();
    let a = lab.host("a").virtual_ip.to_string();
    assert!(seen.iter().all(|s| s["peer"] == a.as_str()));
    let status = lab.status("a").unwrap();
    assert!(
        status["flows_opened"]["lan"].as_u64().unwrap() >= N as u64,
        "{}",
        status["flows_opened"]
    );
}

#[test]
fn processes_outside_the_cgroup_do_not_use_the_virtual_network() {
    const ECONNREFUSED: i64 = 111;
    require_tools(&["python3", "socat"]);
    let mut lab = Lab::lan(3).unwrap();
    lab.start_all().unwrap();
    probe::echo_server(&mut lab, "b", 7500).unwrap();
    let (vb, vc) = (lab.host("b").virtual_ip, lab.host("c").virtual_ip);
    let nobody = Ipv4Addr::new(240, 0, 0, 99);

    // Outside a's cgroup: refused at once, whether the member was talked
    // to or never, or no member holds the address; no exchange starts.
    assert_eq!(
        probe::client(&lab, "a", vb, 7500).unwrap()["reply"],
        "hello"
    );
    for dst in [vb, vc, nobody] {
        // From a's network namespace but outside its cgroup.
        let got = probe::timed(&lab, "a", dst, 7500, false).unwrap();
        assert_eq!(got["errno"], ECONNREFUSED, "to {dst}: {got}");
    }
    assert!(
        !lab.authenticated("a", vc),
        "an outsider made a authenticate c"
    );
    let a = lab.status("a").unwrap();
    assert!(a["drops"]["outside_cgroup"].as_u64().unwrap() >= 3, "{a}");
    // Inside, everything works as before.
    assert_eq!(
        probe::client(&lab, "a", vb, 7500).unwrap()["reply"],
        "hello"
    );

    // A server outside b's cgroup is not on the virtual network: members
    // get a refusal, not a connection to it.
    lab.spawn_outside(
        "b",
        "socat",
        &["TCP-LISTEN:7501,fork,reuseaddr", "EXEC:cat"],
    )
    .unwrap();
    lab.wait_listening("b", 7501).unwrap();
    let got = probe::client(&lab, "a", vb, 7501).unwrap();
    assert_eq!(got["errno"], ECONNREFUSED, "{got}");
    let b = lab.status("b").unwrap();
    assert!(b["drops"]["outside_cgroup"].as_u64().unwrap() >= 1, "{b}");
}

/// A server whose kernel answers with SYN cookies (under a SYN flood or a
/// full accept queue; forced here) sends its SYN/ACK without a socket: it is
/// still the cgroup's listener answering, and the connection completes.
#[test]
fn a_server_answering_with_syn_cookies_is_reached() {
    require_tools(&["python3", "sysctl"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    let b = lab.host("b").virtual_ip;
    lab.force_syn_cookies("b", true).unwrap();
    probe::server(&mut lab, "b", "0.0.0.0", 7000, 3).unwrap();
    for _ in 0..3 {
        let got = probe::client(&lab, "a", b, 7000).unwrap();
        assert_eq!(got["reply"], "echo:hello", "{got}\n{}", lab.agent_log("b"));
    }
    let sent = lab.syn_cookies_sent("b").unwrap();
    assert!(sent >= 3, "the server sent {sent} SYN cookies");
}

/// Each host of the lab has its own hostname, as separate machines do
/// (software such as Slurm names nodes by gethostname()); the machine's own
/// is untouched, and nothing is left when the lab goes.
#[test]
fn each_host_has_its_own_hostname() {
    let ours = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let lab = Lab::lan(2).unwrap();
    for name in ["a", "b"] {
        let said = lab.app(name, "hostname").ok().unwrap();
        assert_eq!(said.trim(), format!("host-{name}"));
    }
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap(),
        ours
    );
    let kept: Vec<std::path::PathBuf> = lab
        .hosts
        .iter()
        .map(|h| std::path::Path::new("/run/pvc-lab").join(format!("{}.uts", h.netns)))
        .collect();
    assert!(kept.iter().all(|p| p.exists()));
    drop(lab);
    assert!(kept.iter().all(|p| !p.exists()), "{kept:?}");
}
