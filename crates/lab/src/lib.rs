//! The lab: network namespaces, veth segments and the real `pce` and `ven` binaries, shared by the
//! README's demo (`ven-lab`) and the end-to-end tests.
// The one exception is `process::reset_signal_mask` (a `pre_exec` hook; std has no safe way).
#![deny(unsafe_code)]

pub mod binaries;
pub mod firewall;
pub mod netns;
pub mod probe;
pub mod process;
pub mod scenario;
pub mod status;
pub mod workdir;

pub use binaries::Binaries;
pub use scenario::{Host, Lab, LabError, LabOptions, Teardown};
