//! Puts the chosen board's memory map where cortex-m-rt's link.x finds it (as memory.x), with
//! an empty device.x: the lm3s6965evb build uses cortex-m-rt's `device` feature, which includes
//! one, and its board module defines the interrupt vectors itself.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let memory: &[u8] = if env::var_os("CARGO_FEATURE_MICROBIT").is_some() {
        include_bytes!("memory-microbit.x")
    } else {
        include_bytes!("memory-lm3s6965evb.x")
    };
    fs::write(out.join("memory.x"), memory).expect("write memory.x");
    fs::write(out.join("device.x"), "").expect("write device.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory-microbit.x");
    println!("cargo:rerun-if-changed=memory-lm3s6965evb.x");
}
