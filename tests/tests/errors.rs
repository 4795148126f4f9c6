//! Bad input to the agent: a clear message, a non-zero exit, and nothing
//! left behind on the host.

use std::path::Path;

use pvc_lab::{Lab, bin};

/// Starts the agent of host a with `extra` appended to (or `replace`d in) its
/// configuration and expects it to fail with `message`.
fn fails_with(lab: &Lab, config: &str, message: &str) {
    let a = lab.host("a");
    let path = lab.dir.join("bad.toml");
    std::fs::write(&path, config).unwrap();
    let out = Lab::command_in(&a.netns, Some(&a.cgroup), bin("pvc-agent"))
        .unwrap()
        .args(["--config"])
        .args([&path])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(message),
        "expected {message:?} in:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        !Path::new("/sys/fs/bpf/pvc").join(&a.instance).exists(),
        "pins left behind"
    );
    let routes = lab.ns(&a.netns, "ip").args(["-4", "route"]).ok().unwrap();
    assert!(!routes.contains("240."), "routes left behind: {routes}");
}

#[test]
fn bad_configurations_are_refused_with_a_clear_message_and_leave_nothing() {
    let mut lab = Lab::lan(1).unwrap();
    lab.start_broker().unwrap();
    let good = std::fs::read_to_string(&lab.host("a").config).unwrap();

    fails_with(
        &lab,
        &good.replace("uplink", "uplnk"),
        "unknown field `uplnk`",
    );
    fails_with(
        &lab,
        &good.replace("240.0.0.1", "10.0.0.1"),
        "virtual address 10.0.0.1 is outside 240.0.0.0/4",
    );
    fails_with(
        &lab,
        &good.replace("name = \"host-a\"", "name = \"Host A\""),
        "is not a valid name",
    );
    fails_with(
        &lab,
        &good.replace("uplink = \"eth0\"", "uplink = \"eth9\""),
        "interface eth9 does not exist",
    );
    // A cgroup v1 or plain folder is not where the hooks can go.
    let cgroup = lab.host("a").cgroup.display().to_string();
    fails_with(
        &lab,
        &good.replace(&cgroup, "/tmp"),
        "/tmp is not a cgroup v2 folder",
    );
    fails_with(&lab, "this is not toml", "invalid agent configuration");
    let missing = Lab::command_in(&lab.host("a").netns, None, bin("pvc-agent"))
        .unwrap()
        .args(["--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("cannot read the agent configuration /nonexistent/agent.toml")
    );

    // And the same host then starts fine.
    lab.start_agent("a").unwrap();
}

#[test]
fn an_agent_configured_for_another_cluster_is_refused_and_attaches_nothing() {
    let mut lab = Lab::lan(2).unwrap();
    lab.start_broker().unwrap();
    lab.admit("b", &[]).unwrap();
    // Another cluster's master, as an operator might copy by mistake.
    let other = lab.dir.join("other-master");
    let init = std::process::Command::new(bin("pvc"))
        .args(["master", "init", "--dir"])
        .arg(&other)
        .output()
        .unwrap();
    let other_key = String::from_utf8_lossy(&init.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("master_key = \"")?
                .strip_suffix('"')
                .map(str::to_string)
        })
        .unwrap();
    let good = std::fs::read_to_string(&lab.host("a").config).unwrap();
    fails_with(
        &lab,
        &good.replace(&lab.master_key, &other_key),
        "wrong cluster: no broker serves cluster",
    );
    let a = lab.host("a");
    let addrs = lab
        .ns(&a.netns, "ip")
        .args(["-4", "addr", "show", "dev", "lo"])
        .ok()
        .unwrap();
    assert!(!addrs.contains("240."), "address left behind: {addrs}");
    assert!(!a.socket.exists(), "control socket left behind");
}

#[test]
fn an_all_zero_host_key_is_not_admitted() {
    let mut lab = Lab::lan(1).unwrap();
    lab.start_broker().unwrap();
    let zeros = "A".repeat(43) + "=";
    let err = lab
        .master(&[
            "admit",
            "--name",
            "zero",
            "--virtual-ip",
            "240.0.0.9",
            "--host-key",
            &zeros,
        ])
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a usable Ed25519 public key"), "{err}");
    let list = lab.master(&["list"]).unwrap();
    assert!(!list.contains("zero"), "{list}");
}

#[test]
fn a_broker_with_an_unusable_state_file_exits_before_saying_it_is_ready() {
    let lab = Lab::lan(1).unwrap();
    // A folder where the state file should be.
    let state = lab.dir.join("state-is-a-folder");
    std::fs::create_dir_all(&state).unwrap();
    let out = lab
        .in_broker_netns(bin("pvc-broker"))
        .args(["--listen", "198.18.0.254:7999", "--state"])
        .args([&state])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("cannot open broker state"), "{said}");
    assert!(!said.contains("broker ready"), "{said}");
}
