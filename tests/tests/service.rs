//! The agent as systemd runs it: readiness, status and watchdog over the
//! notify socket, and SIGHUP reloading the configuration while flows run.

use std::{
    os::unix::net::UnixDatagram,
    time::{Duration, Instant},
};

use pvc_lab::{Lab, probe, require_tools};

fn hangup(lab: &Lab, name: &str) {
    let pid = lab.agent_pid(name).expect("agent running").to_string();
    let done = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(done.success());
}

/// What the agent told the "service manager" until `until` was said.
fn read_until(socket: &UnixDatagram, until: &str, limit: Duration) -> Vec<String> {
    socket.set_read_timeout(Some(limit)).unwrap();
    let mut said = Vec::new();
    let end = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        let Ok(n) = socket.recv(&mut buf) else { break };
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        let done = text.lines().any(|l| l == until);
        said.push(text);
        if done {
            break;
        }
    }
    said
}

#[test]
fn the_agent_tells_systemd_it_is_ready_its_status_and_pings_the_watchdog() {
    let mut lab = Lab::lan(2).unwrap();
    let path = lab.dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    lab.hosts[0].agent_env = vec![
        ("NOTIFY_SOCKET".into(), path.display().to_string()),
        ("WATCHDOG_USEC".into(), "400000".into()),
    ];
    lab.start_all().unwrap();
    let said = read_until(&socket, "READY=1", Duration::from_secs(10));
    assert!(
        said.iter().any(|s| s.lines().any(|l| l == "READY=1")),
        "{said:?}\n{}",
        lab.agent_log("a")
    );
    // Ready once the data path is attached and a broker session is up.
    let status = lab.status("a").unwrap();
    assert_eq!(status["state"], "running");
    assert!(!status["brokers"].as_array().unwrap().is_empty());
    assert!(
        said.iter()
            .any(|s| s.contains("STATUS=") && s.contains("brokers 1/1")),
        "{said:?}"
    );
    // Pings at half the watchdog period.
    let pings = read_until(&socket, "never", Duration::from_secs(1))
        .iter()
        .filter(|s| s.lines().any(|l| l == "WATCHDOG=1"))
        .count();
    assert!((3..=8).contains(&pings), "{pings} watchdog pings in 1 s");
    // A reload is announced and ends ready again.
    hangup(&lab, "a");
    let said = read_until(&socket, "READY=1", Duration::from_secs(5));
    let lines: Vec<&str> = said.iter().flat_map(|s| s.lines()).collect();
    let reloading = lines.iter().position(|l| *l == "RELOADING=1");
    let ready = lines.iter().rposition(|l| *l == "READY=1");
    assert!(
        matches!((reloading, ready), (Some(r), Some(d)) if r < d),
        "{lines:?}"
    );
}

#[test]
fn sighup_applies_a_new_local_policy_within_a_second_and_established_flows_survive() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    let b = lab.host("b").virtual_ip;
    probe::echo_server(&mut lab, "b", 7400).unwrap();
    probe::server(&mut lab, "b", "0.0.0.0", 7401, 100).unwrap();
    let before = probe::client(&lab, "a", b, 7401).unwrap();
    assert_eq!(before["reply"], "echo:hello", "{before}");
    let chatter = probe::chatter(&mut lab, "a", b, 7400, 5).unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // b now lets in port 7400 only.
    lab.write_config(
        1,
        "[policy]\ninbound = [{ peers = [\"*\"], ports = [\"7400\"] }]\n",
    )
    .unwrap();
    hangup(&lab, "b");
    // One second later the new policy holds: b drops the connection
    // request (inbound refusals are silent), a's connect() times out.
    std::thread::sleep(Duration::from_secs(1));
    let refused = probe::client(&lab, "a", b, 7401).unwrap();
    assert!(
        refused.get("reply").is_none(),
        "{refused}\n{}",
        lab.agent_log("b")
    );
    assert!(lab.agent_log("b").contains("local policy reloaded"));
    // The allowed port still opens new flows, and the flow that ran all
    // along never noticed.
    let allowed = probe::client(&lab, "a", b, 7400).unwrap();
    assert!(allowed.get("errno").is_none(), "{allowed}");
    let result = probe::chatter_result(&mut lab, &chatter).unwrap();
    assert_eq!(result["ok"], true, "{result}");

    // A configuration that does not load changes nothing.
    std::fs::write(&lab.host("b").config, "this is not toml [").unwrap();
    hangup(&lab, "b");
    pvc_lab::wait_until(Duration::from_secs(3), "the refused reload", || {
        lab.agent_log("b")
            .contains("the configuration was not reloaded")
            .then_some(())
    })
    .unwrap();
    let still = probe::client(&lab, "a", b, 7401).unwrap();
    assert!(still.get("reply").is_none(), "{still}");
    assert_eq!(lab.status("b").unwrap()["state"], "running");
}

/// SIGHUP with another broker list: the new broker's session starts, the
/// one no longer listed ends, and members still meet.
#[test]
fn sighup_moves_the_agent_to_the_brokers_its_configuration_lists() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    lab.start_extra_broker(7200).unwrap();
    let extra = format!("{}:7200", pvc_lab::BROKER_IP);
    lab.master(&["publish", "--broker", &extra]).unwrap();
    let first = format!("{}:{}", pvc_lab::BROKER_IP, pvc_lab::BROKER_PORT);
    let config = lab.host("b").config.clone();
    let text = std::fs::read_to_string(&config).unwrap();
    let brokers_line = text
        .lines()
        .find(|l| l.starts_with("brokers"))
        .unwrap()
        .to_string();
    let connected = |lab: &Lab| -> Vec<String> {
        lab.status("b").unwrap()["brokers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["broker"].as_str().unwrap().to_string())
            .collect()
    };
    for (list, want) in [
        (
            format!("brokers = [\"{first}\", \"{extra}\"]"),
            vec![first.clone(), extra.clone()],
        ),
        (format!("brokers = [\"{extra}\"]"), vec![extra.clone()]),
    ] {
        std::fs::write(&config, text.replace(&brokers_line, &list)).unwrap();
        hangup(&lab, "b");
        pvc_lab::wait_until(Duration::from_secs(5), "the new broker list", || {
            let mut now = connected(&lab);
            now.sort();
            (now == want).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", connected(&lab), lab.agent_log("b")));
    }
    assert!(
        lab.agent_log("b")
            .contains("no longer configured: leaving it")
    );
}

/// SIGHUP with another metrics address: the endpoint moves.
#[test]
fn sighup_moves_the_metrics_endpoint() {
    require_tools(&["curl"]);
    let mut lab = Lab::lan(1).unwrap();
    lab.start_all().unwrap();
    let real = lab.host("a").real;
    let scrape = |lab: &Lab, port: u16| {
        lab.app("a", "curl")
            .args(["-sS", "--max-time", "2"])
            .args([format!("http://{real}:{port}/metrics")])
            .output()
            .unwrap()
    };
    let before = scrape(&lab, pvc_lab::AGENT_METRICS_PORT);
    assert!(
        String::from_utf8_lossy(&before.stdout).contains("pvc_admitted 1"),
        "{before:?}"
    );
    let config = lab.host("a").config.clone();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            &format!("{real}:{}", pvc_lab::AGENT_METRICS_PORT),
            &format!("{real}:9611"),
        ),
    )
    .unwrap();
    hangup(&lab, "a");
    wait_until_scraped(&lab, || {
        String::from_utf8_lossy(&scrape(&lab, 9611).stdout).contains("pvc_admitted 1")
    });
    assert!(!scrape(&lab, pvc_lab::AGENT_METRICS_PORT).status.success());
}

fn wait_until_scraped(lab: &Lab, mut ok: impl FnMut() -> bool) {
    pvc_lab::wait_until(
        Duration::from_secs(5),
        "the metrics at the new address",
        || ok().then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.agent_log("a")));
}

/// SIGHUP with another `log` filter: the agent's log follows it (PVC_LOG
/// unset, as under systemd).
#[test]
fn sighup_changes_the_log_filter() {
    let mut lab = Lab::lan(1).unwrap();
    lab.hosts[0].agent_env = vec![("PVC_LOG".into(), String::new())];
    lab.write_config(0, "").unwrap();
    let config = lab.host("a").config.clone();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("log = \"warn\"\n{text}")).unwrap();
    lab.start_all().unwrap();
    // At "warn", not even "agent ready" is logged.
    assert!(
        !lab.agent_log("a").contains("agent ready"),
        "{}",
        lab.agent_log("a")
    );
    std::fs::write(&config, format!("log = \"info\"\n{text}")).unwrap();
    hangup(&lab, "a");
    pvc_lab::wait_until(Duration::from_secs(3), "info lines", || {
        lab.agent_log("a")
            .contains("log filter reloaded")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.agent_log("a")));
}
