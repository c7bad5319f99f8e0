//! The lab: network namespaces, veth segments and the real `pce` and `ven` binaries, shared by the
//! README's demo (`ven-lab`) and the end-to-end tests.
#![forbid(unsafe_code)]

pub mod netns;
