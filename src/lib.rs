//! ven: the Virtual Enforcement Node agent and its CLI (one multi-call binary).
#![forbid(unsafe_code)]

pub mod firewall;
