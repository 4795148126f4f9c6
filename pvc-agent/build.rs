//! Builds the eBPF object (pvc-ebpf) from source and leaves it in OUT_DIR, where
//! `interposition` embeds it with `include_bytes_aligned!`.
//!
//! Two toolchain routes:
//! - Debian's `rustc-web` with its prebuilt `core` for bpfel-unknown-none (what `./setup.sh`
//!   installs): the inner cargo is pointed at /usr/bin/rustc and unstable features are enabled
//!   for aya-ebpf only, so no `-Z build-std` is needed.
//! - aya's standard route elsewhere: rustup nightly with `rust-src`.
//!
//! `PVC_EBPF_RUSTC=/path/to/rustc` forces the first route with another compiler.
use std::{env, path::Path};

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_BPF_CORE: &str = "/usr/lib/rustlib/bpfel-unknown-none/lib";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PVC_EBPF_RUSTC");
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "pvc-ebpf")
        .ok_or_else(|| anyhow!("pvc-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;

    let rustc = env::var("PVC_EBPF_RUSTC").ok().or_else(|| {
        (Path::new(DEBIAN_RUSTC).exists() && Path::new(DEBIAN_BPF_CORE).exists())
            .then(|| DEBIAN_RUSTC.to_string())
    });
    // SAFETY: single-threaded build script. Keeps the inner cargo's progress
    // lines out of the outer build's warnings; errors still come through.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    let toolchain = match &rustc {
        Some(rustc) => {
            // SAFETY: build scripts are single-threaded; these variables are meant for the
            // cargo that aya-build spawns (it removes RUSTC but keeps CARGO_BUILD_RUSTC).
            unsafe {
                env::set_var("CARGO_BUILD_RUSTC", rustc);
                env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf");
            }
            Toolchain::Custom("stable")
        }
        None => Toolchain::Nightly,
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "pvc-ebpf",
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        toolchain,
    )
    .context(
        "building the eBPF programs failed; on Debian run ./setup.sh (rustc-web, \
         libstd-rust-web-dev-bpf, bpf-linker), elsewhere install rustup nightly with rust-src \
         and `cargo install bpf-linker`",
    )
}
