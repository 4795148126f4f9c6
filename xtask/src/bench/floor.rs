//! The floor under the programs' cost: a tc program that returns at once,
//! measured like PVC's (kernel run-time statistics) under the same bulk
//! traffic. What it costs, dispatch, the statistics' own clock reads and
//! cold caches between packets, every tc program pays on this machine.

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
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

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

/// `r0 = TC_ACT_OK; exit`, pinned at `pin` for tc to attach.
struct Empty {
    pin: PathBuf,
    _fd: OwnedFd,
}

impl Empty {
    fn load(pin: PathBuf) -> anyhow::Result<Empty> {
        let insns: [u64; 2] = [0xb7, 0x95];
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
        // SAFETY: the attribute points at live memory for the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &attr as *const ProgLoad,
                size_of::<ProgLoad>(),
            )
        };
        if fd < 0 {
            bail!(
                "cannot load an empty tc program: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: the kernel just returned this descriptor to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())?;
        let attr = ObjPin {
            pathname: path.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            file_flags: 0,
        };
        // SAFETY: as above.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_PIN,
                &attr as *const ObjPin,
                size_of::<ObjPin>(),
            )
        };
        if r != 0 {
            bail!(
                "cannot pin {}: {}",
                pin.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Empty { pin, _fd: fd })
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
    let empty = Empty::load(pin)?;
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
