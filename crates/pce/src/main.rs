//! The `pce` binary: everything lives in the library (see `lib.rs` for the module map).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    pce::main()
}
