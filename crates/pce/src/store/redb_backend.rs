//! The store's records in one redb file (`DIR/pce.redb`): a table per [`Table`], text keys, JSON
//! values. Every commit is one redb write transaction with immediate durability (fsynced before
//! it returns), so a change acknowledged to a client survives a crash or power loss.

use super::StoreError;
use super::backend::{Backend, ChangeSet, Records, Table};
use redb::{Database, ReadableTable, TableDefinition, TableError};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const STORE_FILE: &str = "pce.redb";

pub struct RedbBackend {
    db: Database,
    path: PathBuf,
}

fn definition(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

impl RedbBackend {
    /// Opens `path`, creating it (mode 0600) when missing.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| database_error(path, e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|source| StoreError::Write { path: path.to_path_buf(), source })?;
        Ok(Self { db, path: path.to_path_buf() })
    }
}

fn database_error(path: &Path, cause: impl std::fmt::Display) -> StoreError {
    StoreError::Database { path: path.to_path_buf(), cause: cause.to_string() }
}

impl Backend for RedbBackend {
    fn load(&self) -> Result<Records, StoreError> {
        let error = |e: &dyn std::fmt::Display| database_error(&self.path, e);
        let txn = self.db.begin_read().map_err(|e| error(&e))?;
        let mut records = Vec::new();
        for table in Table::ALL {
            let opened = match txn.open_table(definition(table)) {
                Ok(opened) => opened,
                Err(TableError::TableDoesNotExist(_)) => continue,
                Err(e) => return Err(error(&e)),
            };
            for entry in opened.iter().map_err(|e| error(&e))? {
                let (key, value) = entry.map_err(|e| error(&e))?;
                records.push((table, key.value().to_string(), value.value().to_vec()));
            }
        }
        Ok(records)
    }

    fn commit(&mut self, changes: &ChangeSet) -> Result<(), StoreError> {
        self.write(changes, redb::Durability::Immediate)
    }

    fn commit_lazily(&mut self, changes: &ChangeSet) -> Result<(), StoreError> {
        self.write(changes, redb::Durability::None)
    }
}

impl RedbBackend {
    /// One transaction; an empty durable one still makes the lazy commits before it durable.
    fn write(&mut self, changes: &ChangeSet, durability: redb::Durability) -> Result<(), StoreError> {
        if changes.is_empty() && matches!(durability, redb::Durability::None) {
            return Ok(());
        }
        let error = |e: &dyn std::fmt::Display| database_error(&self.path, e);
        let mut txn = self.db.begin_write().map_err(|e| error(&e))?;
        txn.set_durability(durability);
        for table in Table::ALL {
            let puts: Vec<_> = changes.puts.iter().filter(|(t, _, _)| *t == table).collect();
            let deletes: Vec<_> = changes.deletes.iter().filter(|(t, _)| *t == table).collect();
            if puts.is_empty() && deletes.is_empty() {
                continue;
            }
            let mut opened = txn.open_table(definition(table)).map_err(|e| error(&e))?;
            for (_, key, value) in puts {
                opened.insert(key.as_str(), value.as_slice()).map_err(|e| error(&e))?;
            }
            for (_, key) in deletes {
                opened.remove(key.as_str()).map_err(|e| error(&e))?;
            }
        }
        txn.commit().map_err(|e| error(&e))
    }
}
