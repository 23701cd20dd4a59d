//! Builds the bare-metal test guest (resources/test-guest, its own cargo
//! project with its own target and profile) and hands its ELF to the `ftvmm`
//! crate, which embeds it as the default kernel.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest = manifest.join("../resources/test-guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("ftguest.elf");
    for p in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "linker.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args(["build", "--release", "--quiet"]);
    // The outer build's settings (its target dir, rustflags, profile and
    // jobserver) must not leak into the guest's build, which has its own.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || key == "RUSTFLAGS"
            || key == "RUSTC_WRAPPER"
            || key == "RUSTC_WORKSPACE_WRAPPER"
        {
            cmd.env_remove(&key);
        }
    }
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot run cargo to build the test guest in {}: {e}",
            guest.display()
        )
    });
    if !status.success() {
        panic!(
            "building the test guest in {} failed ({status})",
            guest.display()
        );
    }
    let elf = guest.join("target/x86_64-unknown-linux-gnu/release/ftguest");
    std::fs::copy(&elf, &out)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", elf.display(), out.display()));
}
