//! The virtual DNS: member names resolve for unmodified programs through the
//! system resolver (glibc's getaddrinfo, as ssh or nc call it), from signed
//! records only.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use pvc_lab::{Lab, probe, require_tools, wait_until};
use serde_json::Value;

const EAI_NONAME: i64 = -2;

/// What `name` resolves to for a program on `host`: the hosts file and the
/// resolv.conf given are mounted over /etc in a mount namespace of its own
/// (as a system whose resolver sends the domain to `nameserver`).
fn resolve(lab: &Lab, host: &str, name: &str, hosts: &Path, nameserver: Ipv4Addr) -> Value {
    let resolv = lab.dir.join(format!("resolv-{host}-{nameserver}"));
    std::fs::write(
        &resolv,
        format!("nameserver {nameserver}\noptions timeout:1 attempts:1\n"),
    )
    .unwrap();
    let script = format!(
        r#"
import socket, json, time
t = time.time()
try:
    a = socket.getaddrinfo("{name}", None, socket.AF_INET, socket.SOCK_STREAM)
    print(json.dumps({{"addrs": sorted({{x[4][0] for x in a}}), "ms": (time.time() - t) * 1000}}))
except socket.gaierror as e:
    print(json.dumps({{"error": e.errno, "ms": (time.time() - t) * 1000}}))
"#
    );
    let out = lab
        .app(host, "unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            &format!(
                "mount --bind {} /etc/hosts && mount --bind {} /etc/resolv.conf && exec python3 -c \"$0\"",
                hosts.display(),
                resolv.display()
            ),
            &script,
        ])
        .ok()
        .unwrap();
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn addrs(v: &Value) -> Vec<String> {
    v["addrs"]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn member_names_resolve_for_unmodified_programs_and_revoked_ones_disappear() {
    require_tools(&["python3", "unshare", "nc", "socat"]);
    let mut lab = Lab::lan(3).unwrap();
    lab.start_all().unwrap();
    lab.wait_for_peers("a", 2).unwrap();
    let (a, b, c) = (
        lab.host("a").virtual_ip,
        lab.host("b").virtual_ip,
        lab.host("c").virtual_ip,
    );
    // Through the agent's DNS server (a hosts file without members).
    let plain = lab.dir.join("plain-hosts");
    std::fs::write(&plain, "127.0.0.1\tlocalhost\n").unwrap();
    let got = resolve(&lab, "a", "host-b.pvc", &plain, a);
    assert_eq!(
        addrs(&got),
        [b.to_string()],
        "{got}\n{}",
        lab.agent_log("a")
    );
    let got = resolve(&lab, "a", "HOST-C.pvc", &plain, a);
    assert_eq!(addrs(&got), [c.to_string()], "{got}");
    let got = resolve(&lab, "a", "host-a.pvc", &plain, a);
    assert_eq!(addrs(&got), [a.to_string()], "its own name: {got}");
    let unknown = resolve(&lab, "a", "nobody.pvc", &plain, a);
    assert_eq!(unknown["error"], EAI_NONAME, "{unknown}");
    assert!(unknown["ms"].as_f64().unwrap() < 500.0, "{unknown}");

    // Without a DNS route to the agent: the hosts file it keeps (the
    // nameserver here answers nothing).
    let kept = lab.hosts_file("a");
    let silent = Ipv4Addr::new(127, 0, 0, 9);
    let got = resolve(&lab, "a", "host-b.pvc", &kept, silent);
    assert_eq!(addrs(&got), [b.to_string()], "{got}");

    // An unmodified program connects by name.
    probe::echo_server(&mut lab, "b", 7700).unwrap();
    let resolv = lab.dir.join("resolv-nc");
    std::fs::write(&resolv, format!("nameserver {a}\n")).unwrap();
    let nc = lab
        .app("a", "unshare")
        .args([
            "--mount",
            "sh",
            "-c",
            &format!(
                "mount --bind {} /etc/resolv.conf && mount --bind {} /etc/hosts && nc -z -w 3 host-b.pvc 7700",
                resolv.display(),
                plain.display()
            ),
        ])
        .output()
        .unwrap();
    assert!(nc.status.success(), "{nc:?}");

    // A revoked member disappears, from the server and from the file.
    lab.master(&["revoke", "--name", "host-c"]).unwrap();
    wait_until(Duration::from_secs(10), "host-c.pvc to disappear", || {
        (resolve(&lab, "a", "host-c.pvc", &plain, a)["error"] == EAI_NONAME).then_some(())
    })
    .unwrap();
    let text = std::fs::read_to_string(&kept).unwrap();
    assert!(!text.contains("host-c.pvc"), "{text}");
    assert!(text.contains("host-b.pvc"), "{text}");

    // Malformed queries get a format error or nothing, and the server
    // answers the next one; TCP works too.
    let script = format!(
        r#"
import socket, struct, json
def query(name):
    q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    for l in name.split("."):
        q += bytes([len(l)]) + l.encode()
    return q + b"\0" + struct.pack(">HH", 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
out = {{}}
for junk in [b"", b"\x01", b"\x12\x34\x01\x00\x00\x05" + b"\xff" * 40, bytes(range(256)) * 4]:
    u.sendto(junk, ("{a}", 53))
    try:
        r = u.recv(4096)
        out.setdefault("rcodes", []).append(r[3] & 0xf)
    except socket.timeout:
        out.setdefault("rcodes", []).append(None)
u.sendto(query("host-b.pvc"), ("{a}", 53))
r = u.recv(4096)
out["udp"] = list(r[-4:])
t = socket.create_connection(("{a}", 53), timeout=2)
q = query("host-b.pvc")
t.sendall(struct.pack(">H", len(q)) + q)
n = struct.unpack(">H", t.recv(2))[0]
r = b""
while len(r) < n:
    r += t.recv(n - len(r))
out["tcp"] = list(r[-4:])
print(json.dumps(out))
"#
    );
    let out = lab.app("a", "python3").args(["-c", &script]).ok().unwrap();
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let b_octets: Vec<Value> = b.octets().iter().map(|o| Value::from(*o)).collect();
    assert_eq!(v["udp"].as_array().unwrap(), &b_octets, "{v}");
    assert_eq!(v["tcp"].as_array().unwrap(), &b_octets, "{v}");
    for rcode in v["rcodes"].as_array().unwrap() {
        assert!(rcode.is_null() || rcode == 1, "{v}");
    }

    // A clean stop takes the names out of the hosts file.
    lab.stop_agent("a").unwrap();
    let text = std::fs::read_to_string(&kept).unwrap();
    assert!(!text.contains(".pvc"), "{text}");
}

/// With systemd-resolved, the agent hangs the domain's DNS route on a link
/// of its own. systemd-resolved does not run on these machines: a
/// `resolvectl` stand-in records what the agent asks of it (the real one is
/// not tested here), the link is real.
#[test]
fn the_agent_gives_systemd_resolved_a_link_routed_to_the_domain() {
    require_tools(&["python3"]);
    let mut lab = Lab::lan(1).unwrap();
    let bin = lab.dir.join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let said = lab.dir.join("resolvectl.log");
    let fake = bin.join("resolvectl");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", said.display()),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["755"])
        .arg(&fake)
        .status()
        .unwrap();
    // (A hosts file of the lab's, should anything write one.)
    let extra = format!(
        "[dns]\nresolver = \"resolved\"\nhosts_file = \"{}\"\n",
        lab.hosts_file("a").display()
    );
    lab.write_config(0, &extra).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    lab.hosts[0].agent_env = vec![("PATH".into(), path)];
    lab.start_all().unwrap();
    let mut link = format!("pvc-{}", lab.host("a").instance);
    link.truncate(15);
    let vip = lab.host("a").virtual_ip;
    let asked = std::fs::read_to_string(&said).unwrap();
    for line in [
        format!("dns {link} {vip}"),
        format!("domain {link} ~pvc"),
        format!("default-route {link} false"),
    ] {
        assert!(asked.lines().any(|l| l == line), "{line} not in:\n{asked}");
    }
    let shown = lab
        .app("a", "ip")
        .args(["link", "show", &link])
        .output()
        .unwrap();
    assert!(shown.status.success(), "{shown:?}");
    // The hosts file is left alone.
    assert!(
        !lab.hosts_file("a").exists()
            || !std::fs::read_to_string(lab.hosts_file("a"))
                .unwrap()
                .contains(".pvc")
    );
    lab.stop_agent("a").unwrap();
    let gone = lab
        .app("a", "ip")
        .args(["link", "show", &link])
        .output()
        .unwrap();
    assert!(!gone.status.success(), "the link outlived the agent");
}
