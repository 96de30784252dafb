//! Compiles the probes in `src/bpf/` and generates their libbpf-rs skeleton, with the Rust
//! types of every event, into OUT_DIR.
use std::env;
use std::path::PathBuf;

use libbpf_cargo::SkeletonBuilder;

const SOURCE: &str = "src/bpf/psleak.bpf.c";

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let arch = env::var("CARGO_CFG_TARGET_ARCH").expect("cargo sets CARGO_CFG_TARGET_ARCH");
    // <linux/types.h> includes <asm/types.h>, which Debian keeps in the multiarch directory;
    // `clang -target bpf` does not look there by itself.
    let multiarch = format!("/usr/include/{arch}-linux-gnu");

    SkeletonBuilder::new()
        .source(SOURCE)
        .clang_args(["-I", &multiarch, "-Wall", "-Wno-unused-function"])
        .build_and_generate(out.join("psleak.skel.rs"))
        .unwrap_or_else(|err| {
            panic!(
                "building the BPF probes failed: {err:#}\n\
                 (they need clang and the kernel UAPI headers: `cargo xtask setup` installs them)"
            )
        });
    println!("cargo:rerun-if-changed=src/bpf");
}
