//! log/ in the data directory: what it holds and how big it may grow.
//!
//! ```text
//! agent.log platform.log evsync.log vtap.log logmgr.log   one per component (crate::logging)
//! flow.db flowsum.db                                      flow stores, redb (crate::flows::store)
//! <name>.1                                                the one backup of each
//! <name>.corrupt                                          a flow store found corrupt, kept once
//! ```
//!
//! Every file is rotated to its backup before it would pass [`LogCaps::per_file_bytes`]. That
//! cap is the configured file size lowered until every file log/ can hold, each at its cap, fits
//! in the total: so the total holds by construction, whatever each component writes, with no
//! coordination between writers. At the defaults (15 MB files, 390 MB in all) nothing is lowered.

use std::path::{Path, PathBuf};

/// The spec's rotation size and total, in bytes (decimal megabytes, as the spec counts them).
pub const DEFAULT_FILE_MAX_BYTES: u64 = 15_000_000;
pub const DEFAULT_TOTAL_MAX_BYTES: u64 = 390_000_000;

/// The application log files, one per component, in log/.
pub const LOG_FILES: [&str; 5] = ["agent.log", "platform.log", "evsync.log", "vtap.log", "logmgr.log"];
/// The flow stores in log/.
pub const FLOW_DBS: [&str; 2] = ["flow.db", "flowsum.db"];
/// Most files log/ ever holds: each log and its backup; each store, its backup and one corrupt
/// copy.
pub const MAX_FILES: u64 = (LOG_FILES.len() * 2 + FLOW_DBS.len() * 3) as u64;

/// Sizes of the files in log/ (board configs may set smaller ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogCaps {
    /// A file is rotated to its backup before it passes this size.
    pub file_max_bytes: u64,
    /// Everything in log/ together stays under this.
    pub total_max_bytes: u64,
}

impl Default for LogCaps {
    fn default() -> Self {
        Self { file_max_bytes: DEFAULT_FILE_MAX_BYTES, total_max_bytes: DEFAULT_TOTAL_MAX_BYTES }
    }
}

impl LogCaps {
    /// The size no file in log/ passes: the configured file size, or less when [`MAX_FILES`]
    /// files of that size would not fit in the total.
    pub fn per_file_bytes(&self) -> u64 {
        self.file_max_bytes.min(self.total_max_bytes / MAX_FILES)
    }
}

/// The backup of `path`: the same name with `.1` appended.
pub fn backup_path(path: &Path) -> PathBuf {
    suffixed(path, ".1")
}

/// Where a corrupt flow store at `path` is moved aside.
pub fn corrupt_path(path: &Path) -> PathBuf {
    suffixed(path, ".corrupt")
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Bytes taken by the files of log/ that ven writes (others are not counted, nor touched).
pub fn usage(dir: &Path) -> u64 {
    let mut total = 0;
    for name in LOG_FILES.iter().chain(FLOW_DBS.iter()) {
        let path = dir.join(name);
        for file in [corrupt_path(&path), backup_path(&path), path] {
            total += std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_specs_and_are_not_lowered() {
        let caps = LogCaps::default();
        assert_eq!(caps.per_file_bytes(), 15_000_000);
        assert!(caps.per_file_bytes() * MAX_FILES <= caps.total_max_bytes);
    }

    #[test]
    fn a_small_total_lowers_every_file_so_that_all_fit() {
        let caps = LogCaps { file_max_bytes: 15_000_000, total_max_bytes: 32_000_000 };
        assert_eq!(caps.per_file_bytes(), 32_000_000 / MAX_FILES);
        assert!(caps.per_file_bytes() * MAX_FILES <= caps.total_max_bytes);
    }

    #[test]
    fn backups_and_corrupt_copies_sit_beside_their_file() {
        assert_eq!(backup_path(Path::new("/d/log/flow.db")), Path::new("/d/log/flow.db.1"));
        assert_eq!(corrupt_path(Path::new("/d/log/flow.db")), Path::new("/d/log/flow.db.corrupt"));
    }
}
