//! The benchmark (paper §5, Figures 4 and 5): the bare network against
//! PVC, in the same run, on the same two hosts.
//!
//! Each host has two links to the same kind of bridge: `eth0` carries PVC
//! (its uplink, with the tc programs) and `eth1` carries nothing of PVC.
//! The bare path is real addresses over `eth1` from outside the hosts'
//! cgroups; the PVC path is virtual addresses from inside them. Every
//! measurement alternates the two paths (bare first on even repetitions,
//! PVC first on odd ones) so that machine noise hits both, and the report
//! gives medians and PVC/bare ratios.

//!
//! `measure` runs the lab and the measurements (`sites` the pairs across
//! NATs, in the simulated Internet), `report` turns them into
//! medians, ratios, targets and the markdown report, `plot` draws the
//! figures; `floor` loads the empty tc program that measures what any
//! program costs on this machine.

mod distribution;
mod floor;
mod measure;
mod paired;
mod plot;
mod report;
mod sites;
pub mod smoke;

pub use measure::{Options, run};
pub use paired::per_packet;
pub use report::markdown;

/// Only the file distribution part, as markdown.
pub fn distribution(opts: &Options) -> anyhow::Result<String> {
    let cells = distribution::measure(opts)?;
    let mut m = String::new();
    distribution::markdown(opts, &cells, &mut m);
    Ok(m)
}

/// Ctrl-C or SIGTERM during a benchmark: the labs it made are removed
/// (namespaces, cgroups, pins, every process in them) and it exits, rather
/// than leave them behind as a plain kill would.
pub fn clean_up_on_signal() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static SIGNALLED: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_signal(_: libc::c_int) {
        SIGNALLED.store(true, Ordering::Relaxed);
    }
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    std::thread::spawn(|| {
        while !SIGNALLED.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("bench: interrupted; removing its labs");
        pvc_lab::remove_this_process_labs();
        std::process::exit(130);
    });
}
