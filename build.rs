//! Passes the target triple to the code, for `ven version` (cargo gives it to build scripts only).
fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".to_string());
    println!("cargo:rustc-env=VEN_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
