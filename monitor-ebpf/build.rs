//! Re-runs the eBPF build when bpf-linker changes (a new linker can change
//! the object even when no source did).
use which::which;

fn main() {
    let bpf_linker = which("bpf-linker")
        .expect("bpf-linker not found: run `cargo xtask setup` (it installs bpf-linker built against LLVM 22)");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_str().unwrap());
}
