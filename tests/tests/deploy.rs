//! The files in deploy/ are what users install: they must be valid.

use std::{fs, path::Path, process::Command};

use pvc_lab::{bin, require_tools};

/// `systemd-analyze verify` on each unit, with ExecStart pointed at the
/// binaries just built (the units name /usr/local/bin, where users put them).
#[test]
fn systemd_units_verify() {
    require_tools(&["systemd-analyze"]);
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let dir = std::env::temp_dir().join(format!("pvc-units-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let built = bin("pvc-agent").parent().unwrap().to_path_buf();
    let mut checked = 0;
    for entry in fs::read_dir(&deploy).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "service") {
            continue;
        }
        let text = fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("ExecStart=/usr/local/bin/"),
            "{}",
            path.display()
        );
        let copy = dir.join(path.file_name().unwrap());
        fs::write(
            &copy,
            text.replace("/usr/local/bin/", &format!("{}/", built.display())),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{}: {stderr}",
            path.display()
        );
        checked += 1;
    }
    fs::remove_dir_all(&dir).unwrap();
    assert_eq!(checked, 2);
}

/// The example global policy parses and signs as `pvc master policy` would.
#[test]
fn the_example_global_policy_is_valid() {
    let dir = std::env::temp_dir().join(format!("pvc-policy-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let init = Command::new(bin("pvc"))
        .args(["master", "init", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(init.status.success());
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/global-policy.toml");
    let out = Command::new(bin("pvc"))
        .args(["master", "policy", "--dir"])
        .arg(&dir)
        .arg("--file")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("global policy version 1 with 2 rules"),
        "{stdout}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
