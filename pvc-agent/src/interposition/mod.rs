//! Interposition (paper §4.1): the eBPF programs that intercept connection
//! requests and masquerade packets, and the maps through which the agent
//! steers them.
//!
//! Everything is pinned under `/sys/fs/bpf/pvc/<instance>/`: the maps (so that
//! flows survive an agent restart, and operators can read them with bpftool)
//! and the links (so that a crashed agent leaves a working data path, never a
//! leaking one). A restarted agent takes the pinned links over atomically.

mod events;
mod flows;
pub mod inject;
mod maps;
mod pins;
// They load programs into the kernel: root only, run by `cargo xtask test`.
#[cfg(all(test, feature = "root-tests"))]
mod root_tests;

use std::{
    fs,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, ProgramArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, SkLookup, SockOps,
        TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
pub use events::{EventStream, FlowEvent};
pub use flows::{FlowEntry, Timeouts, hint_lifetime, listens_on, monotonic_ns};
pub use maps::{Counters, Maps};
pub use pins::{ensure_bpffs, remove_instance};
use tracing::{info, warn};

/// The kernel programs, compiled from `pvc-ebpf` by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pvc-ebpf"));

use pvc_common::maps::ALL as MAP_NAMES;
const CONNECT4: &str = "pvc_connect4";
const EGRESS: &str = "pvc_egress";
const INGRESS: &str = "pvc_ingress";
const RELAY_LOOKUP: &str = "pvc_relay_lookup";
const GETPEERNAME4: &str = "pvc_getpeername4";
const GETSOCKNAME4: &str = "pvc_getsockname4";
const SOCK_OPS: &str = "pvc_sock_ops";
const MASQUERADE: &str = "pvc_masquerade";
pub const PROGRAM_NAMES: [&str; 8] = [
    CONNECT4,
    EGRESS,
    INGRESS,
    MASQUERADE,
    RELAY_LOOKUP,
    GETPEERNAME4,
    GETSOCKNAME4,
    SOCK_OPS,
];

/// Where the data path is attached.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub pin_dir: PathBuf,
    pub uplink: String,
    pub uplink_index: u32,
    pub cgroup: PathBuf,
    pub max_flows: u32,
    /// How long a masquerading hint lasts (`hint_lifetime`).
    pub hint_lifetime: std::time::Duration,
}

/// The loaded and attached data path.
pub struct Datapath {
    pin_dir: PathBuf,
    ebpf: Ebpf,
    pub maps: Maps,
    /// Whether the maps a previous agent pinned were taken over.
    pub reused: bool,
    events: Option<EventStream>,
    /// Holds `pvc_masquerade` for the masquerading programs' tail call for
    /// as long as this agent runs: the kernel empties the array when the
    /// last holder goes, and tc then rewrites with helpers.
    in_place: Option<ProgramArray<MapData>>,
}

impl Datapath {
    /// Loads the programs, reusing pinned maps, and attaches them (taking
    /// over links a previous agent of this instance left pinned).
    pub fn start(a: &Attachment) -> anyhow::Result<Self> {
        pins::create_dir(&a.pin_dir)?;
        let reused = MAP_NAMES.iter().any(|m| a.pin_dir.join(m).exists());
        let mut ebpf = match load(a) {
            Ok(ebpf) => ebpf,
            Err(e) if reused => {
                warn!(
                    "the pinned maps in {} do not fit this agent's programs ({e:#}); \
                     removing them, established flows are lost",
                    a.pin_dir.display()
                );
                for m in MAP_NAMES {
                    let _ = fs::remove_file(a.pin_dir.join(m));
                }
                load(a)?
            }
            Err(e) => return Err(e),
        };
        if reused {
            info!(pins = %a.pin_dir.display(), "reusing pinned maps: established flows are kept");
        }
        let scope = pins::CgroupScope::of(&a.cgroup)?;
        let (mut maps, events) = Maps::take(&mut ebpf, a.max_flows.saturating_mul(2), scope)?;
        // A clock taken over from a stopped agent is stale: current before
        // any program runs.
        maps.tick_clock()?;
        // Before any new program runs: entries taken over get their hints.
        maps.set_hint_lifetime(a.hint_lifetime)?;
        maps.hint_existing();
        maps.set_masquerading_ports(flows::masquerading_ports()?)?;
        let mut datapath = Self {
            pin_dir: a.pin_dir.clone(),
            ebpf,
            maps,
            reused,
            events: Some(events),
            in_place: None,
        };
        datapath.attach(a)?;
        Ok(datapath)
    }

    /// The ring buffer of control-plane events (taken once).
    pub fn take_events(&mut self) -> Option<EventStream> {
        self.events.take()
    }

    fn attach(&mut self, a: &Attachment) -> anyhow::Result<()> {
        let links = a.pin_dir.join("links");
        pins::create_dir(&links)?;

        // Before the programs that tail-call it attach, so that their first
        // packets already take it.
        let mut in_place: ProgramArray<MapData> = self
            .ebpf
            .take_map(pvc_common::maps::IN_PLACE)
            .ok_or_else(|| {
                anyhow!(
                    "map {} missing from the eBPF object",
                    pvc_common::maps::IN_PLACE
                )
            })?
            .try_into()
            .context("the in-place masquerading map has an unexpected type")?;
        let prog: &mut SchedClassifier = self.program(MASQUERADE)?.try_into()?;
        prog.load()
            .with_context(|| format!("the kernel refused program {MASQUERADE}"))?;
        in_place
            .set(0, prog.fd()?, 0)
            .context("cannot put the in-place masquerading program in its array")?;
        self.in_place = Some(in_place);

        for (name, kind, label) in [
            (INGRESS, TcAttachType::Ingress, "ingress"),
            (EGRESS, TcAttachType::Egress, "egress"),
        ] {
            let prog: &mut SchedClassifier = self.program(name)?.try_into()?;
            prog.load()
                .with_context(|| format!("the kernel refused program {name}"))?;
            let pin = links.join(format!("tc_{label}_{}", a.uplink_index));
            pins::remove_stale(&links, &format!("tc_{label}_"), &pin)?;
            let link_id = match PinnedLink::from_pin(&pin) {
                Ok(old) => {
                    // Atomic replacement: no packet sees a gap or both programs.
                    let link = SchedClassifierLink::try_from(FdLink::from(old))?;
                    prog.attach_to_link(link)
                        .with_context(|| format!("cannot take over the pinned {label} link"))?
                }
                Err(_) => prog
                    .attach_with_options(
                        &a.uplink,
                        kind,
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .with_context(|| format!("cannot attach tc {label} to {}", a.uplink))?,
            };
            let link = FdLink::try_from(prog.take_link(link_id)?).map_err(|_| {
                anyhow!(
                    "tc {label} on {} was attached without TCX (kernel older than 6.6): \
                     PVC needs TCX links to pin its data path",
                    a.uplink
                )
            })?;
            if !pin.exists() {
                link.pin(&pin)?;
            }
        }

        let cgroup = fs::File::open(&a.cgroup)
            .with_context(|| format!("cannot open cgroup {}", a.cgroup.display()))?;
        let inode = pins::inode(&a.cgroup)?;
        for (name, label) in [
            (CONNECT4, "connect4"),
            (GETPEERNAME4, "getpeername4"),
            (GETSOCKNAME4, "getsockname4"),
            (SOCK_OPS, "sock_ops"),
        ] {
            let pin = links.join(format!("{label}_{inode}"));
            pins::remove_stale(&links, &format!("{label}_"), &pin)?;
            // cgroup links cannot be replaced in place: attach the new
            // program next to the old one (both decide alike), then drop
            // the old one. A cgroup bpf_link always coexists with other
            // programs; its flags must be 0 ("Single" here).
            // The two program types share these calls but no trait.
            macro_rules! attach_as {
                ($kind:ty) => {{
                    let prog: &mut $kind = self.program(name)?.try_into()?;
                    prog.load()
                        .with_context(|| format!("the kernel refused program {name}"))?;
                    let id = prog
                        .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                        .with_context(|| {
                            format!("cannot attach {label} to cgroup {}", a.cgroup.display())
                        })?;
                    FdLink::try_from(prog.take_link(id)?)?
                }};
            }
            let link = if name == SOCK_OPS {
                attach_as!(SockOps)
            } else {
                attach_as!(CgroupSockAddr)
            };
            if let Ok(old) = PinnedLink::from_pin(&pin) {
                old.unpin()?;
            }
            link.pin(&pin)?;
        }

        // Not pinned: relayed flows live in the agent, and a link that
        // outlived it would only steer connections to a closed listener.
        let netns = fs::File::open("/proc/self/ns/net")
            .context("cannot open this process's network namespace")?;
        let prog: &mut SkLookup = self.program(RELAY_LOOKUP)?.try_into()?;
        prog.load()
            .with_context(|| format!("the kernel refused program {RELAY_LOOKUP}"))?;
        prog.attach(netns.as_fd())
            .context("cannot attach the relay's sk_lookup program to the network namespace")?;
        Ok(())
    }

    fn program(&mut self, name: &str) -> anyhow::Result<&mut aya::programs::Program> {
        self.ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))
    }

    /// Kernel statistics of each program (`kernel.bpf_stats_enabled`).
    pub fn program_stats(&self) -> Vec<(String, u64, u64)> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some((
                    name.to_string(),
                    info.run_time().as_nanos() as u64,
                    info.run_count(),
                ))
            })
            .collect()
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Detaches everything and removes the pins (clean stop).
    pub fn remove(self) -> anyhow::Result<()> {
        let Self {
            pin_dir,
            ebpf,
            maps,
            events,
            in_place,
            ..
        } = self;
        drop((events, maps, in_place, ebpf));
        remove_instance(&pin_dir)
    }
}

/// Whether a previous agent of this instance left its data path pinned (it
/// crashed, or is being replaced by a new version).
pub fn has_pins(pin_dir: &Path) -> bool {
    pin_dir.join("links").exists() || MAP_NAMES.iter().any(|m| pin_dir.join(m).exists())
}

fn load(a: &Attachment) -> anyhow::Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    for name in MAP_NAMES {
        loader.map_pin_path(name, a.pin_dir.join(name));
    }
    loader.map_max_entries(
        pvc_common::maps::MASQUERADING,
        a.max_flows.saturating_mul(2),
    );
    let ebpf = loader.load(OBJECT).context(
        "cannot load PVC's eBPF object (needs BTF, BPF ring buffers and tc/cgroup programs: \
         Linux 6.6 or later, run as root)",
    )?;
    if ebpf.programs().count() != PROGRAM_NAMES.len() {
        bail!(
            "unexpected eBPF object: {} programs",
            ebpf.programs().count()
        );
    }
    Ok(ebpf)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_object_has_exactly_the_maps_and_programs_the_agent_takes() {
        let obj = aya_obj::Object::parse(OBJECT).expect("the embedded eBPF object parses");
        let in_object: BTreeSet<&str> = obj.maps.keys().map(String::as_str).collect();
        let mut taken: BTreeSet<&str> = MAP_NAMES.into_iter().collect();
        taken.insert(pvc_common::maps::RELAY_LISTENER);
        taken.insert(pvc_common::maps::IN_PLACE);
        assert_eq!(in_object, taken);
        let programs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
        assert_eq!(programs, PROGRAM_NAMES.into_iter().collect());
    }
}
