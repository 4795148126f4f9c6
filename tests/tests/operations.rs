//! What operators run PVC with: Prometheus metrics from agents and brokers,
//! read by a real Prometheus, and the Grafana dashboard's queries.

use std::time::Duration;

use pvc_lab::{
    AGENT_METRICS_PORT, BROKER_IP, Lab, probe,
    prometheus::{series, value},
    require_tools,
};
use serde_json::Value;

const DASHBOARD: &str = include_str!("../../deploy/grafana/pvc-dashboard.json");
/// A PromQL query now, or nothing if Prometheus does not answer.
fn query(lab: &Lab, expr: &str) -> Value {
    lab.prometheus_query(expr, None).unwrap_or(Value::Null)
}

/// The dashboard's variables, as Grafana would fill them in.
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "15s")
        .replace("$instance", ".*")
        .replace("$floor_ns", "62")
}

fn dashboard_queries(d: &Value) -> Vec<(String, String)> {
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("").to_string();
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap().to_string()))
        })
        .collect()
}

#[test]
fn the_dashboard_is_importable_with_unique_ids_and_a_data_source_variable() {
    let d: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let panels = d["panels"].as_array().unwrap();
    let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "panel ids repeat");
    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data-source variable");
    assert_eq!(ds["query"], "prometheus");
    let name = ds["name"].as_str().unwrap();
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            p["datasource"]["uid"],
            format!("${{{name}}}"),
            "panel {} does not use the data-source variable",
            p["title"]
        );
        assert!(
            !p["targets"].as_array().unwrap().is_empty(),
            "panel {} has no query",
            p["title"]
        );
    }
    assert!(
        d.get("__inputs")
            .is_some_and(|i| i.as_array().unwrap().is_empty())
    );
}

#[test]
fn prometheus_scrapes_agents_and_brokers_and_every_dashboard_query_returns_data() {
    require_tools(&["prometheus", "curl", "python3"]);
    let mut lab = Lab::lan(3).unwrap();
    for i in 0..3 {
        let real = lab.hosts[i].real;
        lab.write_config(
            i,
            &format!("[metrics]\nlisten = \"{real}:{AGENT_METRICS_PORT}\"\nprogram_stats = true\n"),
        )
        .unwrap();
    }
    lab.start_all().unwrap();

    lab.start_prometheus().unwrap();

    // Traffic for every panel: connections among the members (handshakes
    // through the broker, flows, set-up times), and a session the broker
    // refuses.
    for (server, _) in [("a", 0), ("b", 1), ("c", 2)] {
        probe::server(&mut lab, server, "0.0.0.0", 7300, 100).unwrap();
    }
    let traffic = |lab: &Lab| {
        for (client, server) in [("a", "b"), ("b", "c"), ("c", "a")] {
            let dst = lab.host(server).virtual_ip;
            let got = probe::client(lab, client, dst, 7300).unwrap();
            assert_eq!(got["reply"], "echo:hello", "{got}");
        }
    };
    traffic(&lab);
    // A flow that lasts while Prometheus scrapes: a flow carried at the
    // socket leaves the flow gauges when its socket closes (the clients
    // above close at once).
    probe::echo_server(&mut lab, "b", 7301).unwrap();
    let b = lab.host("b").virtual_ip;
    let _lasting = probe::chatter(&mut lab, "a", b, 7301, 60).unwrap();
    let garbage = lab
        .in_broker_netns("python3")
        .args([
            "-c",
            &format!(
                "import socket; s=socket.create_connection(('{BROKER_IP}', {})); \
                 s.sendall(b'\\xff'*64); s.settimeout(3)\ntry: s.recv(100)\nexcept Exception: pass",
                pvc_lab::BROKER_PORT
            ),
        ])
        .output()
        .unwrap();
    assert!(garbage.status.success(), "{garbage:?}");

    // Enough samples for rates over the dashboard's windows.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(2));
        traffic(&lab);
    }

    let d: Value = serde_json::from_str(DASHBOARD).unwrap();
    let queries = dashboard_queries(&d);
    assert!(queries.len() >= 20, "{}", queries.len());
    let mut empty = Vec::new();
    for (title, expr) in &queries {
        let expr = substitute(expr);
        let got = pvc_lab::wait_until(Duration::from_secs(10), "data", || {
            let v = query(&lab, &expr);
            (v["status"] == "success" && !series(&v).is_empty()).then_some(v)
        });
        if got.is_err() {
            empty.push(format!("{title}: {expr} -> {}", query(&lab, &expr)));
        }
    }
    assert!(
        empty.is_empty(),
        "queries without data:\n{}",
        empty.join("\n")
    );

    // The per-program cost the dashboard shows is the kernel's figure.
    let cost = query(
        &lab,
        "sum by (program) (rate(pvc_program_run_time_nanoseconds_total[15s])) / \
         sum by (program) (rate(pvc_program_runs_total[15s]))",
    );
    let programs: Vec<String> = series(&cost)
        .iter()
        .map(|r| r["metric"]["program"].as_str().unwrap_or("").to_string())
        .collect();
    for p in ["pvc_egress", "pvc_ingress"] {
        assert!(programs.iter().any(|x| x == p), "{p} missing: {cost}");
    }
    // What the agents counted reached Prometheus: three handshakes at least
    // (each pair authenticated once, counted on both ends), and the
    // broker's refusal by its reason.
    let total = |expr: &str| {
        let v = query(&lab, expr);
        (series(&v).first().and_then(value).unwrap_or(0.0), v)
    };
    let (n, handshakes) = total("sum(pvc_handshakes_total{outcome=\"succeeded\"})");
    assert!(n >= 6.0, "{handshakes}");
    let refusals = query(&lab, "pvc_broker_refusals_total");
    assert!(!series(&refusals).is_empty(), "{refusals}");
    let (n, opened) = total("sum(pvc_flows_opened_total{technique=\"lan\"})");
    assert!(n >= 15.0, "{opened}");
}

/// `pvc flows | head -1`: a reader that stops early ends the output quietly;
/// and the master's listing says dates, not Unix seconds.
#[test]
fn the_cli_survives_a_closed_pipe_and_says_dates_in_words() {
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    let socket = lab.host("a").socket.display().to_string();
    let pvc = pvc_lab::bin("pvc").display().to_string();
    for command in ["status --json", "flows", "peers"] {
        // `true` reads nothing and is gone before pvc writes.
        let out = lab
            .app("a", "sh")
            .args(["-c", &format!("{pvc} {command} --socket {socket} | true")])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.trim().is_empty(), "pvc {command}: {stderr}");
    }
    let list = lab.master(&["list"]).unwrap();
    assert!(list.contains("VALID UNTIL"), "{list}");
    let year = list
        .lines()
        .find(|l| l.contains("host-a"))
        .and_then(|l| {
            l.split_whitespace()
                .find(|w| w.len() == 10 && w.starts_with("20"))
        })
        .unwrap_or_else(|| panic!("no date in {list}"));
    assert_eq!(&year[4..5], "-", "{list}");
    assert!(list.contains(" UTC"), "{list}");
}

/// `pvc ping`: the first ping authenticates the path and says what it cost,
/// the next finds it ready; both time round trips; an unknown name is an
/// error that says where to look.
#[test]
fn pvc_ping_authenticates_then_times_round_trips() {
    let mut lab = Lab::lan(2).unwrap();
    lab.start_all().unwrap();
    lab.wait_for_peers("a", 1).unwrap();
    let socket = lab.host("a").socket.display().to_string();
    let ping = |lab: &Lab, target: &str| {
        lab.app("a", &pvc_lab::bin("pvc").display().to_string())
            .args(["ping", target, "--socket", &socket, "--json"])
            .output()
            .unwrap()
    };
    let out = ping(&lab, "host-b");
    assert!(out.status.success(), "{out:?}\n{}", lab.agent_log("a"));
    let first: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(first["technique"], "lan", "{first}");
    assert_eq!(first["virtual_ip"], lab.host("b").virtual_ip.to_string());
    assert_eq!(first["authenticated_now"], true, "{first}");
    assert!(first["setup_ms"].as_f64().unwrap() > 0.0, "{first}");
    assert_eq!(first["round_trips_ms"].as_array().unwrap().len(), 3);
    let b = lab.host("b").virtual_ip.to_string();
    let again: Value = serde_json::from_slice(&ping(&lab, &b).stdout).unwrap();
    assert_eq!(again["authenticated_now"], false, "{again}");
    assert!(again["setup_ms"].is_null(), "{again}");
    let unknown = ping(&lab, "nobody");
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("pvc peers"),
        "{unknown:?}"
    );
}
