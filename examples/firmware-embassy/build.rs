//! Puts the lm3s6965evb memory map (shared with firmware-pump) where cortex-m-rt's link.x finds
//! it, with an empty device.x: the board module defines the interrupt vectors itself.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::write(out.join("memory.x"), include_bytes!("../firmware-pump/memory-lm3s6965evb.x"))
        .expect("write memory.x");
    fs::write(out.join("device.x"), "").expect("write device.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=../firmware-pump/memory-lm3s6965evb.x");
}
