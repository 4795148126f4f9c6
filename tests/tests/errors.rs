//! Bad input to the agent: a clear message, a non-zero exit, and nothing
//! left behind on the host.

use std::path::Path;

use pvc_tests::{Lab, bin};

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
