//! The floor under the programs' cost: a tc program that returns at once,
//! measured like PVC's (kernel run-time statistics) under the same bulk
//! traffic. What it costs, dispatch, the statistics' own clock reads and
//! cold caches between packets, every tc program pays on this machine.
//!
//! Measured two ways: alone on the bare link (`measure`), and in front of
//! PVC's own programs on PVC's uplinks in a PVC run of the same work right
//! after the one that measured them (`Beside`): on this noisy machine the
//! floor itself moves by a third between runs.

use std::{
    fs,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};
use pvc_lab::Lab;

use super::{
    measure::{A, B, Bench, Route},
    report::ProgramCost,
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;
/// With no relative program: in front of every other one.
const BPF_F_BEFORE: u32 = 1 << 3;

/// `r0 = TC_ACT_OK; exit`: the packet passes.
const RETURN_OK: [u64; 2] = [0xb7, 0x95];
/// `r0 = TCX_NEXT (-1); exit`: the next program of the hook runs.
const RETURN_NEXT: [u64; 2] = [0xffff_ffff_0000_00b7, 0x95];

/// The name the empty program's cost goes under among the programs of a
/// phase: in front of PVC's on PVC's uplinks, over a second PVC run of
/// the same work right after the one that measured PVC's.
pub const BESIDE: &str = "empty program, the run after";

/// The head of `union bpf_attr` for BPF_PROG_LOAD (the kernel takes a
/// shorter attribute and treats the rest as zero).
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
}

#[repr(C)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// The head of `union bpf_attr` for BPF_LINK_CREATE of a TCX link.
#[repr(C)]
struct TcxLinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

/// A program that returns at once, pinned at `pin` (for tc to attach, and
/// for its statistics).
struct Empty {
    pin: PathBuf,
    fd: OwnedFd,
}

impl Empty {
    fn load(pin: PathBuf, insns: &[u64]) -> anyhow::Result<Empty> {
        let license = c"GPL";
        let mut prog_name = [0u8; 16];
        prog_name[..9].copy_from_slice(b"pvc_empty");
        let attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name,
        };
        let fd = bpf(BPF_PROG_LOAD, &attr).context("cannot load an empty tc program")?;
        // SAFETY: the kernel just returned this descriptor to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // The name carries this process's id: a pin of that name was left
        // by an earlier process with the same id that was killed before it
        // could clean up (ids wrap on a machine that runs for long).
        match fs::remove_file(&pin) {
            Ok(()) => eprintln!("bench: removed {}, left by a killed run", pin.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", pin.display())),
        }
        let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())?;
        let attr = ObjPin {
            pathname: path.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            file_flags: 0,
        };
        bpf(BPF_OBJ_PIN, &attr).with_context(|| format!("cannot pin {}", pin.display()))?;
        Ok(Empty { pin, fd })
    }

    fn stats(&self) -> anyhow::Result<(u64, u64)> {
        let info = aya::programs::ProgramInfo::from_pin(&self.pin)
            .with_context(|| format!("cannot read {}", self.pin.display()))?;
        Ok((info.run_time().as_nanos() as u64, info.run_count()))
    }
}

impl Drop for Empty {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.pin);
    }
}

fn tc(lab: &Lab, host: &str, args: &[&str]) -> anyhow::Result<()> {
    let h = lab.host(host);
    Lab::command_in(&h.netns, None, "tc")?.args(args).ok()?;
    Ok(())
}

/// Attaches the empty program to both directions of both hosts' bare
/// link, runs iperf3 both ways over it, and detaches it again.
pub(super) fn measure(b: &mut Bench) -> anyhow::Result<ProgramCost> {
    let pin = Path::new("/sys/fs/bpf").join(format!("{}-empty", b.lab.prefix));
    let empty = Empty::load(pin, &RETURN_OK)?;
    let pin = empty.pin.display().to_string();
    let attach = |lab: &Lab| -> anyhow::Result<()> {
        for h in [A, B] {
            tc(lab, h, &["qdisc", "add", "dev", "eth1", "clsact"])?;
            for dir in ["ingress", "egress"] {
                tc(
                    lab,
                    h,
                    &[
                        "filter",
                        "add",
                        "dev",
                        "eth1",
                        dir,
                        "bpf",
                        "direct-action",
                        "object-pinned",
                        &pin,
                    ],
                )?;
            }
        }
        Ok(())
    };
    let result = attach(&b.lab).and_then(|()| {
        let before = empty.stats()?;
        b.both_ways(|b, from, to| b.iperf(Route::Bare, from, to))?;
        let after = empty.stats()?;
        let runs = after.1 - before.1;
        ensure!(
            runs > 0,
            "the empty program never ran: is it attached to eth1?"
        );
        Ok(ProgramCost {
            runs,
            ns_per_run: (after.0 - before.0) as f64 / runs as f64,
        })
    });
    for h in [A, B] {
        // Removing clsact detaches the filters.
        let _ = tc(&b.lab, h, &["qdisc", "del", "dev", "eth1", "clsact"]);
    }
    result
}

/// The bpf(2) command `cmd` with `attr`: what it returned (a descriptor
/// for the commands that make one).
fn bpf<A>(cmd: libc::c_long, attr: &A) -> std::io::Result<i32> {
    // SAFETY: `attr` is a live `union bpf_attr` head of its own size.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const A, size_of::<A>()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as i32)
}

/// The empty program in front of PVC's on both directions of hosts'
/// uplinks (eth0), for as long as it lives: TCX runs it first and, as it
/// answers "next", PVC's programs after it as always. Its statistics are
/// the floor under the packets PVC's programs handle meanwhile.
pub(super) struct Beside {
    empty: Empty,
    _links: Vec<OwnedFd>,
}

impl Beside {
    /// PVC's programs are measured alone in the run before, on the same
    /// work: a program in front changes what the next one costs (the first
    /// program of a hook pays more: 68 against 55 ns for the same empty
    /// program second in one run).
    pub(super) fn attach(lab: &Lab, hosts: &[&str]) -> anyhow::Result<Beside> {
        let pin = Path::new("/sys/fs/bpf").join(format!("{}-beside", lab.prefix));
        let empty = Empty::load(pin, &RETURN_NEXT)?;
        let mut links = Vec::new();
        for h in hosts {
            let netns = lab.host(h).netns.clone();
            let prog = empty.fd.as_raw_fd() as u32;
            // A thread of its own enters the host's namespace, where the
            // uplink's index means that uplink; the links outlive it.
            let made = std::thread::spawn(move || tcx_links(&netns, prog))
                .join()
                .map_err(|_| anyhow::anyhow!("attaching the empty program panicked"))?
                .with_context(|| format!("cannot put an empty program beside {h}'s"))?;
            links.extend(made);
        }
        Ok(Beside {
            empty,
            _links: links,
        })
    }

    /// What it cost per run since it was attached.
    pub(super) fn cost(&self) -> anyhow::Result<ProgramCost> {
        let (ns, runs) = self.empty.stats()?;
        ensure!(
            runs > 0,
            "the empty program beside PVC's never ran: is it linked to eth0?"
        );
        Ok(ProgramCost {
            runs,
            ns_per_run: ns as f64 / runs as f64,
        })
    }
}

/// Links `prog` in front of both TCX hooks of eth0 in `netns`; the calling
/// thread stays in that namespace.
fn tcx_links(netns: &str, prog: u32) -> anyhow::Result<Vec<OwnedFd>> {
    let ns =
        fs::File::open(format!("/run/netns/{netns}")).with_context(|| format!("netns {netns}"))?;
    // SAFETY: a descriptor we own, for this thread only.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {netns}: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c"eth0".as_ptr()) };
    ensure!(ifindex != 0, "no eth0 in {netns}");
    [BPF_TCX_INGRESS, BPF_TCX_EGRESS]
        .into_iter()
        .map(|attach_type| {
            let attr = TcxLinkCreate {
                prog_fd: prog,
                target_ifindex: ifindex,
                attach_type,
                flags: BPF_F_BEFORE,
                relative_fd: 0,
                _pad: 0,
                expected_revision: 0,
            };
            let fd = bpf(BPF_LINK_CREATE, &attr)
                .context("cannot link an empty program to eth0's TCX hook")?;
            // SAFETY: the kernel just returned this descriptor to us.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .collect()
}
