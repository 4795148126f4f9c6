//! `cargo xtask`: the project's own commands.
//!
//! - `demo`: a 3-host virtual cluster in network namespaces, narrated.
//! - `test`: formatting, lints, the whole test suite and a short fuzz run —
//!   what CI runs.
//! - `bench`: PVC against the bare network, written to `results/`.
//! - `fuzz`: the wire-protocol fuzz targets, longer.

mod bench;
mod demo;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use bench::Options;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build, then run a 3-host virtual cluster in network namespaces and show
    /// unmodified programs talking over virtual addresses. Cleans up after.
    Demo {
        /// Instead: a Slurm cluster and a BitTorrent swarm on four hosts
        /// that know each other by virtual addresses only.
        #[arg(long)]
        grid: bool,
    },
    /// What CI runs: fmt, clippy, build, every test, a short fuzz run.
    Test {
        /// Seconds per fuzz target.
        #[arg(long, default_value_t = 15)]
        fuzz_seconds: u32,
    },
    /// Measure PVC against the bare network (bandwidth, latency, connection
    /// setup, eBPF cost per packet, agent and broker load); writes a report
    /// and figures to `--out`. Not part of the tests: the numbers are noisy.
    Bench {
        /// A short run of every part (about a minute) instead of the full one.
        #[arg(long)]
        quick: bool,
        /// Only the file distribution by Slurm and by BitTorrent (a few
        /// minutes); prints its table, writes nothing.
        #[arg(long)]
        distribution: bool,
        /// Only the per-packet cost: each tc program's ns per run beside
        /// an empty program's, CPU per byte at a fixed rate and round trips
        /// in paired blocks (a few minutes); prints, writes nothing.
        #[arg(long)]
        per_packet: bool,
        /// Run PVC's agents with this `interposition.translation` ("packet"
        /// or "socket") instead of the default.
        #[arg(long)]
        translation: Option<String>,
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// Run the fuzz targets (cargo-fuzz, nightly) on the committed corpus,
    /// adding what they find to it.
    Fuzz {
        #[arg(long, default_value_t = 60)]
        seconds: u32,
    },
}

const FUZZ_TARGETS: [&str; 4] = [
    "broker_reads_agent_frames",
    "agent_reads_broker_frames",
    "agent_reads_handshakes",
    "agent_answers_dns",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// pvc-agent's unit tests that load programs into the kernel.
const ROOT_TESTS: &str = "pvc-agent/root-tests";

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from)
}

fn run(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("\n==> {what}");
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot start: {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args);
    c
}

/// Runs every fuzz target for `seconds`. libFuzzer writes the inputs it
/// finds into its first corpus folder: the committed corpus when asked to
/// grow it (`cargo xtask fuzz`), else a scratch folder under `target/`, so
/// that a test run leaves the working tree as it was.
fn fuzz(seconds: u32, grow_corpus: bool) -> anyhow::Result<()> {
    let dir = root().join("pvc-proto/fuzz");
    for target in FUZZ_TARGETS {
        let what = format!("fuzz {target} for {seconds} s");
        eprintln!("\n==> {what}");
        let committed = dir.join("corpus").join(target);
        let mut corpora = vec![committed.clone()];
        if !grow_corpus {
            let scratch = root().join("target/fuzz-corpus").join(target);
            std::fs::create_dir_all(&scratch)
                .with_context(|| format!("cannot create {}", scratch.display()))?;
            corpora.insert(0, scratch);
        }
        let status = fuzz_run(target)
            .args(&corpora)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .current_dir(&dir)
            .status()
            .context(
                "cannot run cargo fuzz: install it with ./setup.sh (cargo install cargo-fuzz)",
            )?;
        if !status.success() {
            bail!("{what} found a failure: see pvc-proto/fuzz/artifacts/{target}/");
        }
    }
    Ok(())
}

/// `cargo fuzz run TARGET` with rustup's nightly toolchain when there is
/// one; else with the compiler at hand in bootstrap mode (Debian's
/// rustc-web), without a sanitizer (it ships none; a panic still stops the
/// run).
fn fuzz_run(target: &str) -> Command {
    let nightly = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("nightly"))
        });
    let mut c = Command::new("cargo");
    if nightly {
        c.args(["+nightly", "fuzz", "run", target]);
    } else {
        c.env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", "--sanitizer", "none", target]);
    }
    c
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Cmd::Demo { grid } => {
            run("build", &mut cargo(&["build"]))?;
            if grid { demo::grid() } else { demo::run() }
        }
        Cmd::Test { fuzz_seconds } => {
            run("format", &mut cargo(&["fmt", "--all", "--check"]))?;
            run(
                "lints",
                &mut cargo(&[
                    "clippy",
                    "--all-targets",
                    "--features",
                    ROOT_TESTS,
                    "--",
                    "-D",
                    "warnings",
                ]),
            )?;
            run(
                "lints (xtask)",
                &mut cargo(&[
                    "clippy",
                    "-p",
                    "xtask",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ]),
            )?;
            // The lab starts the real binaries: build them before the tests.
            run("build", &mut cargo(&["build"]))?;
            run(
                "tests (with the ones that need root)",
                &mut cargo(&["test", "--no-fail-fast", "--features", ROOT_TESTS]),
            )?;
            run("xtask's own tests", &mut cargo(&["test", "-p", "xtask"]))?;
            eprintln!("\n==> a short benchmark run");
            bench::smoke::run_and_check(&target_dir().join("debug/bench-smoke"))?;
            fuzz(fuzz_seconds, false)?;
            eprintln!("\nall checks passed");
            Ok(())
        }
        Cmd::Bench {
            quick,
            distribution,
            per_packet,
            translation,
            out,
        } => {
            // Release binaries: the broker's and the tools' own speed count here.
            run("build (release)", &mut cargo(&["build", "--release"]))?;
            // SAFETY: single-threaded here; the lab reads it to find the binaries.
            unsafe { std::env::set_var("PVC_BIN_DIR", target_dir().join("release")) };
            if let Some(t) = translation {
                // SAFETY: as above; every lab host's configuration gets it.
                unsafe { std::env::set_var("PVC_LAB_TRANSLATION", t) };
            }
            bench::clean_up_on_signal();
            let opts = if quick {
                Options::smoke()
            } else {
                Options::full()
            };
            if per_packet {
                print!("{}", bench::per_packet(&opts)?);
                return Ok(());
            }
            if distribution {
                print!("{}", bench::distribution(&opts)?);
                return Ok(());
            }
            let out = root().join(out);
            let report = bench::run(&opts, &out)?;
            println!("{}", bench::markdown(&report));
            eprintln!("report and figures in {}", out.display());
            Ok(())
        }
        Cmd::Fuzz { seconds } => fuzz(seconds, true),
    }
}
