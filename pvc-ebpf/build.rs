use which::which;

/// Building this crate has an undeclared dependency on the `bpf-linker` binary: rebuild when it
/// changes (artifact dependencies would express this, but cargo cannot use them here yet).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!(
            "cargo:warning=bpf-linker is not in PATH: run ./setup.sh (or `cargo install bpf-linker`)"
        ),
    }
}
