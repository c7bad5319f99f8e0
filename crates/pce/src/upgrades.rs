//! Upgrade orders (issue 16, self-upgrade): which release the operator wants each workload's VEN
//! to run. One order for all workloads and one per workload, the latter overriding the former
//! (a per-workload "none" exempts a workload from the all-order). Kept in memory by the serving
//! PCE and in `DIR/releases/orders.json`, replaced whole ([`crate::fsutil::write_atomic`]) at
//! each change, so orders survive a restart.
//!
//! Whether an order reaches a VEN is decided at each heartbeat (`venapi`): only when the store
//! holds the release for the target the VEN names, and the VEN runs another version.
//!
//! Bounds: one entry per workload, [`MAX_ORDERS`] in all (the store's workload cap).

use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

const ORDERS_FILE: &str = "orders.json";
const FORMAT: u32 = 1;
/// Per-workload entries kept: one per workload the store can hold.
pub const MAX_ORDERS: usize = crate::store::MAX_WORKLOADS;

#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("upgrade orders: {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("upgrade orders: {path} is damaged: {cause}")]
    Damaged { path: PathBuf, cause: String },
    #[error("upgrade orders: {0}")]
    Full(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrdersFile {
    format: u32,
    /// The release every workload without an entry of its own is to run.
    all: Option<String>,
    /// Per workload: a release, or `None` (exempt from the all-order).
    workloads: BTreeMap<u64, Option<String>>,
}

/// The orders (see the module header).
pub struct Upgrades {
    path: PathBuf,
    orders: OrdersFile,
}

impl Upgrades {
    /// Reads `DIR/releases/orders.json` (none yet: no orders).
    pub fn open(data_dir: &Path) -> Result<Self, UpgradeError> {
        let dir = crate::releases::dir(data_dir);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| UpgradeError::Io { path: dir.clone(), source })?;
        let path = dir.join(ORDERS_FILE);
        let orders = match std::fs::read(&path) {
            Ok(bytes) => {
                parse(&bytes).map_err(|cause| UpgradeError::Damaged { path: path.clone(), cause })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                OrdersFile { format: FORMAT, ..Default::default() }
            }
            Err(source) => return Err(UpgradeError::Io { path, source }),
        };
        Ok(Upgrades { path, orders })
    }

    /// The release `workload` is ordered to run, if any.
    pub fn order_for(&self, workload: u64) -> Option<&str> {
        match self.orders.workloads.get(&workload) {
            Some(own) => own.as_deref(),
            None => self.orders.all.as_deref(),
        }
    }

    /// The all-order, if any.
    pub fn all(&self) -> Option<&str> {
        self.orders.all.as_deref()
    }

    /// The per-workload entries (`None`: exempt from the all-order).
    pub fn per_workload(&self) -> impl Iterator<Item = (u64, Option<&str>)> {
        self.orders.workloads.iter().map(|(id, order)| (*id, order.as_deref()))
    }

    /// Orders every workload to run `version` (per-workload entries still override it).
    pub fn order_all(&mut self, version: &str) -> Result<(), UpgradeError> {
        let mut next = self.orders.clone();
        next.all = Some(version.to_string());
        self.save(next)
    }

    /// Orders `workloads` to run `version`.
    pub fn order(&mut self, workloads: &[u64], version: &str) -> Result<(), UpgradeError> {
        let mut next = self.orders.clone();
        for id in workloads {
            next.workloads.insert(*id, Some(version.to_string()));
        }
        if next.workloads.len() > MAX_ORDERS {
            return Err(UpgradeError::Full(format!("more than {MAX_ORDERS} per-workload orders")));
        }
        self.save(next)
    }

    /// Cancels every order.
    pub fn cancel_all(&mut self) -> Result<(), UpgradeError> {
        self.save(OrdersFile { format: FORMAT, ..Default::default() })
    }

    /// Cancels the orders of `workloads`: their own, and the all-order for them (they are
    /// exempted while it stands).
    pub fn cancel(&mut self, workloads: &[u64]) -> Result<(), UpgradeError> {
        let mut next = self.orders.clone();
        for id in workloads {
            if next.all.is_some() {
                next.workloads.insert(*id, None);
            } else {
                next.workloads.remove(id);
            }
        }
        if next.workloads.len() > MAX_ORDERS {
            return Err(UpgradeError::Full(format!("more than {MAX_ORDERS} per-workload orders")));
        }
        self.save(next)
    }

    /// Drops whatever names `workload` (it was unpaired or deleted).
    pub fn forget(&mut self, workload: u64) -> Result<(), UpgradeError> {
        if !self.orders.workloads.contains_key(&workload) {
            return Ok(());
        }
        let mut next = self.orders.clone();
        next.workloads.remove(&workload);
        self.save(next)
    }

    /// Drops the entries of workloads that no longer exist (`exists` says which do).
    pub fn retain(&mut self, exists: impl Fn(u64) -> bool) -> Result<(), UpgradeError> {
        let mut next = self.orders.clone();
        next.workloads.retain(|id, _| exists(*id));
        if next == self.orders { Ok(()) } else { self.save(next) }
    }

    fn save(&mut self, next: OrdersFile) -> Result<(), UpgradeError> {
        let bytes = serde_json::to_vec(&next)
            .map_err(|e| UpgradeError::Damaged { path: self.path.clone(), cause: e.to_string() })?;
        fsutil::write_atomic(&self.path, &bytes, 0o600)
            .map_err(|source| UpgradeError::Io { path: self.path.clone(), source })?;
        self.orders = next;
        Ok(())
    }
}

/// The orders file's bytes: known fields only, valid versions, at most [`MAX_ORDERS`] entries.
fn parse(bytes: &[u8]) -> Result<OrdersFile, String> {
    let orders: OrdersFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if orders.format != FORMAT {
        return Err(format!("format {} (this PCE reads {FORMAT})", orders.format));
    }
    if orders.workloads.len() > MAX_ORDERS {
        return Err(format!("{} per-workload orders; the most is {MAX_ORDERS}", orders.workloads.len()));
    }
    for version in orders.all.iter().chain(orders.workloads.values().flatten()) {
        ven_proto::release::check_version(version).map_err(|e| e.to_string())?;
    }
    Ok(orders)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::scratch_dir;

    #[test]
    fn orders_override_survive_a_reopen_and_are_cancelled() {
        let dir = scratch_dir("upgrade-orders");
        let mut orders = Upgrades::open(&dir).unwrap();
        assert_eq!(orders.order_for(1), None);
        orders.order_all("1.0.0").unwrap();
        orders.order(&[2], "2.0.0").unwrap();
        orders.cancel(&[3]).unwrap();
        assert_eq!(
            (orders.order_for(1), orders.order_for(2), orders.order_for(3)),
            (Some("1.0.0"), Some("2.0.0"), None)
        );
        drop(orders);
        let mut orders = Upgrades::open(&dir).unwrap();
        assert_eq!(
            (orders.order_for(1), orders.order_for(2), orders.order_for(3)),
            (Some("1.0.0"), Some("2.0.0"), None)
        );
        orders.forget(2).unwrap();
        assert_eq!(orders.order_for(2), Some("1.0.0"), "the all-order applies again");
        orders.retain(|id| id != 3).unwrap();
        assert_eq!(orders.order_for(3), Some("1.0.0"));
        orders.cancel_all().unwrap();
        assert_eq!((orders.order_for(1), orders.all()), (None, None));
        orders.order(&[4], "4.0.0").unwrap();
        orders.cancel(&[4]).unwrap();
        assert_eq!(orders.per_workload().count(), 0, "without an all-order a cancel leaves no entry");
    }

    #[test]
    fn a_damaged_orders_file_is_refused() {
        let dir = scratch_dir("upgrade-orders-damaged");
        let path = crate::releases::dir(&dir).join(ORDERS_FILE);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        for bad in [
            &b"{"[..],
            br#"{"format":2,"all":null,"workloads":{}}"#,
            br#"{"format":1,"all":"../x","workloads":{}}"#,
            br#"{"format":1,"all":null,"workloads":{"1":"a b"}}"#,
            br#"{"format":1,"all":null,"workloads":{},"extra":1}"#,
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(
                matches!(Upgrades::open(&dir), Err(UpgradeError::Damaged { .. })),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        std::fs::write(&path, br#"{"format":1,"all":"1.0","workloads":{"7":null}}"#).unwrap();
        let orders = Upgrades::open(&dir).unwrap();
        assert_eq!((orders.order_for(7), orders.order_for(8)), (None, Some("1.0")));
    }
}
