//! vtapServer: NFLOG over netlink, bounded flow aggregation, size-capped redb stores.
//!
//! Not built yet (the flow-pipeline milestone). Until then the agent records no flows and
//! `ven` has no `flows` command; nothing here pretends otherwise.
