//! ven: the Virtual Enforcement Node agent and its CLI (one multi-call binary).
//!
//! Map (see ARCHITECTURE.md): [`cli`] parses and dispatches; [`agent`] is the daemon
//! (AgentManager, EventSync, control socket); [`firewall`] renders and applies the policy
//! (PlatformHandler); [`flows`] will hold the flow pipeline (vtapServer); [`state`] is the data
//! directory.
#![forbid(unsafe_code)]

pub mod agent;
pub mod cli;
pub use ven_proto::clock;
pub mod config;
pub mod conntrack;
pub mod firewall;
pub mod flows;
/// Entry points of the fuzz targets and of their corpus replay test; not an API.
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod logdir;
pub mod logging;
pub mod memory;
mod netlink;
pub mod state;
