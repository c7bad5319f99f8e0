//! The security policy: the objects the administrator writes, in draft and active versions
//! (`model`), and the per-workload computation from the active version (`compute`).

pub mod compute;
pub mod model;

pub use compute::{
    Label, MAX_RULE_ID, MAX_SERVICES_PER_RULE, Member, Service, compute_all, compute_changed, family_name,
    host_addresses, parse_family,
};
