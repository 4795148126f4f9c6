#!/bin/sh
# Installs what PVC needs on a Debian 12 machine, idempotently: Debian's
# Rust compiler and cargo (the compiler has a prebuilt `core` for the BPF
# target; no rustup needed), a C compiler, LLVM 22 and
# bpf-linker (to link the eBPF object), bpftool, the programs the tests, the
# demo and the benchmark run (NetPIPE, iperf3, a font for the plots; the
# simulated Internet's NATs and firewalls, a real miniupnpd and its client,
# Prometheus to scrape the lab's metrics, Slurm, munge, aria2 and opentracker for the
# cluster-software tests),
# and cargo-fuzz. Safe to run again: it only adds what is missing.
set -eu

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

PACKAGES="rustc-web cargo-web libstd-rust-web-dev-bpf llvm-22-dev libbpf-dev bpftool
  gcc g++ libc6-dev libzstd-dev zlib1g-dev
  iproute2 iputils-ping ethtool tcpdump iperf3 socat netcat-openbsd curl python3 systemd
  netpipe-tcp fonts-dejavu-core ca-certificates
  iptables nftables conntrack miniupnpd miniupnpd-nftables miniupnpc prometheus
  slurm-wlm munge aria2 opentracker"

missing=""
for p in $PACKAGES; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed"; then
    missing="$missing $p"
  fi
done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

# Debian's cargo-web and rustc-web (1.96) build everything; a rustup
# installation, when there is one, comes first in PATH and is used instead.
command -v cargo >/dev/null || { echo "setup: cargo not found (cargo-web should provide /usr/bin/cargo)" >&2; exit 1; }

# Tools go where every shell finds them: /usr/local/bin when we may write
# there (root), else cargo's own bin folder (put it in PATH).
if [ -w /usr/local/bin ]; then
  INSTALL_ROOT="--root /usr/local"
else
  INSTALL_ROOT=""
  echo "setup: tools go to ~/.cargo/bin: make sure it is in PATH"
fi

# bpf-linker against Debian's LLVM 22 (/usr/bin/llvm-config is an older LLVM).
if ! bpf-linker --version 2>/dev/null | grep -q "0.13.0"; then
  echo "setup: building bpf-linker 0.13.0 against LLVM 22 (about a minute)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install $INSTALL_ROOT bpf-linker@0.13.0 --locked \
    --no-default-features --features llvm-22
fi

# cargo-fuzz for the fuzz targets: with rustup's nightly toolchain when there
# is one, else with Debian's compiler in bootstrap mode (`cargo xtask fuzz`
# picks).
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz"
  cargo install $INSTALL_ROOT cargo-fuzz@0.13.2 --locked
fi

echo "setup: done"
