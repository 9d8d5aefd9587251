//! Builds the kernel programs (monitor-ebpf, nightly, bpfel-unknown-none) so
//! the agent can embed the object file. `AYA_BUILD_SKIP=1` skips it.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir).join("../monitor-ebpf");
    let ebpf_dir = ebpf_dir.canonicalize()?;
    let root_dir = ebpf_dir.to_str().expect("utf-8 path");
    println!("cargo:rerun-if-changed={root_dir}/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "monitor-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
