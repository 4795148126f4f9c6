//! Unmodified cluster software over PVC (paper §5.3): a Slurm cluster whose
//! controller and nodes know each other only by virtual addresses, each
//! daemon on its own host of the lab.

use std::time::Duration;

use pvc_lab::{Lab, require_tools, wait_until};

/// slurm.conf for a controller on host a and nodes b, c, d: no real address
/// anywhere in it.
fn slurm_conf(lab: &Lab, munge_socket: &str) -> String {
    let dir = lab.dir.display();
    let vip = |h: &str| lab.host(h).virtual_ip;
    let mut conf = format!(
        "ClusterName=pvc
SlurmctldHost=host-a({a})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={dir}/slurmctld
SlurmdSpoolDir={dir}/slurmd-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
",
        a = vip("a")
    );
    for h in ["b", "c", "d"] {
        conf.push_str(&format!(
            "NodeName=host-{h} NodeAddr={} CPUs=1 State=UNKNOWN\n",
            vip(h)
        ));
    }
    conf.push_str(
        "PartitionName=all Nodes=host-b,host-c,host-d Default=YES MaxTime=INFINITE State=UP\n",
    );
    conf
}

#[test]
fn a_slurm_cluster_runs_jobs_across_members_by_virtual_address_only() {
    require_tools(&["slurmctld", "slurmd", "srun", "sinfo", "munged"]);
    let mut lab = Lab::lan(4).unwrap();
    lab.start_all().unwrap();
    let dir = lab.dir.clone();
    // munge: one key for the cluster (shared by every daemon through one
    // munged, as the hosts share the file system).
    let key = dir.join("munge.key");
    std::fs::write(
        &key,
        (0..1024).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>(),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["600"])
        .arg(&key)
        .status()
        .unwrap();
    let munge_socket = dir.join("munge.socket").display().to_string();
    lab.spawn_beside_broker(
        "munged",
        &[
            "-F",
            "--force",
            &format!("--key-file={}", key.display()),
            &format!("--socket={munge_socket}"),
            &format!("--pid-file={}", dir.join("munged.pid").display()),
            &format!("--log-file={}", dir.join("munged.log").display()),
            &format!("--seed-file={}", dir.join("munged.seed").display()),
        ],
    )
    .unwrap();
    let conf = dir.join("slurm.conf");
    std::fs::write(&conf, slurm_conf(&lab, &munge_socket)).unwrap();
    std::fs::create_dir_all(dir.join("slurmctld")).unwrap();
    for h in ["b", "c", "d"] {
        std::fs::create_dir_all(dir.join(format!("slurmd-host-{h}"))).unwrap();
    }
    assert!(
        !std::fs::read_to_string(&conf).unwrap().contains("198.18."),
        "slurm.conf holds a real address"
    );
    let conf_s = conf.display().to_string();
    lab.spawn("a", "slurmctld", &["-D", "-f", &conf_s]).unwrap();
    for h in ["b", "c", "d"] {
        lab.spawn(h, "slurmd", &["-D", "-f", &conf_s]).unwrap();
    }
    let slurm = |lab: &Lab, program: &str, args: &[&str]| {
        let mut p = lab.app("a", program);
        p.cmd.env("SLURM_CONF", &conf).args(args);
        p.output()
            .map(|o| {
                (
                    o.status.success(),
                    String::from_utf8_lossy(&o.stdout).to_string(),
                    String::from_utf8_lossy(&o.stderr).to_string(),
                )
            })
            .unwrap()
    };
    wait_until(Duration::from_secs(30), "three idle nodes", || {
        let (_, out, _) = slurm(&lab, "sinfo", &["-h", "-N", "-o", "%N %T"]);
        (out.lines().filter(|l| l.ends_with("idle")).count() == 3).then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}\n{}\n{}",
            slurm(&lab, "sinfo", &["-N"]),
            std::fs::read_to_string(dir.join("slurmctld.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("slurmd-host-b.log")).unwrap_or_default()
        )
    });
    // A job step on the three nodes: slurmd connects back to srun.
    let (ok, out, err) = slurm(&lab, "srun", &["-N3", "hostname"]);
    assert!(ok, "{out}\n{err}");
    let mut names: Vec<&str> = out.lines().collect();
    names.sort();
    assert_eq!(names, ["host-b", "host-c", "host-d"], "{out}\n{err}");

    // A batch job array, each task on some node, its output written there.
    let out_pattern = dir.join("array-%a.out").display().to_string();
    let (ok, out, err) = slurm(
        &lab,
        "sbatch",
        &["--array=1-6", "-o", &out_pattern, "--wrap", "hostname"],
    );
    assert!(ok, "{out}\n{err}");
    let done = |lab: &Lab| {
        let (_, q, _) = slurm(lab, "squeue", &["-h"]);
        q.trim().is_empty().then_some(())
    };
    wait_until(Duration::from_secs(30), "the array to finish", || {
        done(&lab)
    })
    .unwrap();
    for task in 1..=6 {
        let said = std::fs::read_to_string(dir.join(format!("array-{task}.out"))).unwrap();
        assert!(
            ["host-b", "host-c", "host-d"].contains(&said.trim()),
            "task {task}: {said}"
        );
    }

    // A job cancelled while it runs.
    let (ok, out, err) = slurm(&lab, "sbatch", &["--parsable", "--wrap", "sleep 300"]);
    assert!(ok, "{out}\n{err}");
    let job = out.trim().to_string();
    wait_until(Duration::from_secs(20), "the job to run", || {
        let (_, q, _) = slurm(&lab, "squeue", &["-h", "-j", &job, "-o", "%T"]);
        (q.trim() == "RUNNING").then_some(())
    })
    .unwrap();
    let (ok, _, err) = slurm(&lab, "scancel", &[&job]);
    assert!(ok, "{err}");
    wait_until(Duration::from_secs(20), "the cancelled job to go", || {
        done(&lab)
    })
    .unwrap();

    // A node's agent restarted while the node is idle: the node still runs
    // job steps afterwards.
    lab.stop_agent("c").unwrap();
    lab.start_agent("c").unwrap();
    let again = wait_until(
        Duration::from_secs(30),
        "job steps on all nodes again",
        || {
            let (ok, out, _) = slurm(&lab, "srun", &["-N3", "hostname"]);
            (ok && out.lines().count() == 3).then_some(out)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", lab.agent_log("c")));
    assert!(again.contains("host-c"), "{again}");
}
