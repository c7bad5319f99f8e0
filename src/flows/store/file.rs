//! One store file on disk: opening it as a redb database under the size cap, closing it without
//! redb's close-time writes, waiting for another process that holds it, telling corruption from
//! I/O trouble, and moving a corrupt file aside.
//!
//! - **Cap.** The database goes through [`CappedBackend`], a [`FileBackend`] whose `set_len`
//!   (and any write past the end) refuses a length above the cap: redb grows its file only
//!   through `set_len`, by doubling, so the refusal comes *before* the file passes the cap. The
//!   refusal fails the transaction (nothing of it is committed: copy-on-write) and latches the
//!   handle; the caller drops it, rotates and writes into a fresh file.
//! - **Close.** redb 2.6 keeps an allocator snapshot sized for a 4 GiB region (about 0.5 MB,
//!   stored in 1 MB pages, copy-on-write) and writes it when a database closes cleanly or a
//!   quick-repair commit runs: 3.2 MB written per close, measured, for any file size, which
//!   at one flush every few seconds would wear out an appliance's flash within months. So a
//!   store file is closed the way a killed process closes it: once the call's work is
//!   committed (durably), [`Opened`]'s drop makes the backend refuse every further write, and
//!   redb's close-time writes fail harmlessly. Every open then runs redb's crash recovery: it
//!   verifies the checksum of every page of the last commit (falling back to the one before if
//!   that was torn) and rebuilds the allocator in memory. That costs a read of the file (about
//!   13 ms for a full 11 MB file on x86, measured) and writes ~2 KB; a flush writes its own
//!   pages and about 25 KB more. It also means damaged pages are found at every open, before
//!   any of them is read as data.
//! - **Busy.** redb locks its file (`flock`, exclusive). A file another process (the `ven flows`
//!   CLI, or the agent) holds is retried with backoff for [`BUSY_WAIT`], then reported.
//! - **Corrupt.** redb asserts on some impossible headers (a truncated file panics while
//!   opening), and the release build aborts on panic, so the header is checked here first:
//!   magic, page size, region geometry, and the length it describes against the file's.
//!   Damaged pages, wrong tables and unknown formats are corrupt too; I/O errors (a full disk)
//!   never are.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redb::backends::FileBackend;
use redb::{Database, DatabaseError, StorageBackend, StorageError};

use super::Recovery;
use crate::logdir;

/// How long a file locked by another process is retried before [`super::StoreError::Busy`].
pub(super) const BUSY_WAIT: Duration = Duration::from_secs(2);
/// First and longest pause between two attempts at a locked file.
const BUSY_FIRST_PAUSE: Duration = Duration::from_millis(5);
const BUSY_LONGEST_PAUSE: Duration = Duration::from_millis(100);
/// redb's page cache while a file is open (it is freed when the call ends). Writes of one flush
/// and the pages a query walks fit; the default (1 GiB) would let a query of a full file keep
/// all of it in memory.
const CACHE_BYTES: usize = 4 * 1024 * 1024;
/// redb's page size (fixed in redb 2.6) and its header fields checked before opening.
const PAGE_BYTES: u64 = 4096;
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];
const REDB_PAGE_SIZE_AT: usize = 12;
const REDB_REGION_HEADER_PAGES_AT: usize = 16;
const REDB_REGION_DATA_PAGES_AT: usize = 20;
const REDB_FULL_REGIONS_AT: usize = 24;
const REDB_TRAILING_PAGES_AT: usize = 28;
const REDB_HEADER_BYTES: usize = 320;
const REDB_GOD_BYTE_AT: usize = 9;
const REDB_PRIMARY_SLOT_BIT: u8 = 1;
const REDB_RECOVERY_REQUIRED_BIT: u8 = 2;
const REDB_TWO_PHASE_BIT: u8 = 4;
/// Commit slots (the first byte of each is its file format version).
const REDB_SLOTS_AT: [usize; 2] = [64, 192];
const REDB_FORMAT_V3: u8 = 3;
const FILE_MODE: u32 = 0o600;

/// Whether to make the file when it is missing or empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    Create,
    /// A missing or empty file is no database (`Ok(None)`); never written into existence.
    Existing,
}

/// Why a file did not open (or a transaction on it failed).
#[derive(Debug)]
pub(super) enum Failure {
    /// Another process holds it (after [`BUSY_WAIT`]).
    Busy,
    /// Not a flow store: the cause, for [`Recovery::cause`].
    Corrupt(String),
    /// The database needed to grow past the cap.
    CapReached,
    Io(io::Error),
    Db(Box<redb::Error>),
}

impl Failure {
    /// Classifies a redb error; `refused` says whether the cap refused a growth meanwhile.
    pub(super) fn from_redb(error: impl Into<redb::Error>, refused: &AtomicBool) -> Self {
        if refused.load(Ordering::Acquire) {
            return Self::CapReached;
        }
        match error.into() {
            redb::Error::DatabaseAlreadyOpen => Self::Busy,
            redb::Error::Corrupted(cause) => Self::Corrupt(format!("damaged: {cause}")),
            redb::Error::UpgradeRequired(version) => {
                Self::Corrupt(format!("redb file format {version} is not supported"))
            }
            redb::Error::Io(error) if error.kind() == io::ErrorKind::InvalidData => {
                Self::Corrupt("not a redb database (bad magic number)".to_string())
            }
            redb::Error::Io(error) => Self::Io(error),
            redb::Error::PreviousIo => Self::Io(io::Error::other("an earlier I/O error failed the database")),
            error @ (redb::Error::TableTypeMismatch { .. }
            | redb::Error::TableIsMultimap(_)
            | redb::Error::TableIsNotMultimap(_)
            | redb::Error::TypeDefinitionChanged { .. }) => Self::Corrupt(format!("wrong tables: {error}")),
            error => Self::Db(Box::new(error)),
        }
    }
}

/// `?` on redb's errors where no growth can have been refused (or the caller checks with
/// [`Opened::classify`]).
macro_rules! failure_from {
    ($($error:ty),*) => {$(
        impl From<$error> for Failure {
            fn from(error: $error) -> Self {
                Self::from_redb(error, &AtomicBool::new(false))
            }
        }
    )*};
}
failure_from!(redb::StorageError, redb::TableError, redb::TransactionError, redb::CommitError);

/// A [`FileBackend`] that never lets the file pass `cap` bytes, and that refuses every write
/// once its database is being closed. See the module doc.
#[derive(Debug)]
struct CappedBackend {
    inner: FileBackend,
    cap: u64,
    refused: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
}

impl CappedBackend {
    fn check(&self, len: u64) -> Result<(), io::Error> {
        if self.closing.load(Ordering::Acquire) {
            return Err(io::Error::other("closed without redb's close-time writes"));
        }
        if len > self.cap {
            self.refused.store(true, Ordering::Release);
            return Err(io::Error::other(format!(
                "growing the file to {len} bytes would pass its cap of {} bytes",
                self.cap
            )));
        }
        Ok(())
    }
}

impl StorageBackend for CappedBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
        self.inner.read(offset, len)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.check(len)?;
        self.inner.set_len(len)
    }

    fn sync_data(&self, eventual: bool) -> Result<(), io::Error> {
        self.check(0)?;
        self.inner.sync_data(eventual)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        // redb writes inside the length it set; a write past the cap would grow the file.
        self.check(offset.saturating_add(data.len() as u64))?;
        self.inner.write(offset, data)
    }
}

/// An open store file. Dropping it closes the database without redb's close-time writes (see
/// the module doc) and releases the lock; whatever was committed stays.
pub(super) struct Opened {
    pub(super) db: Database,
    /// Set when the cap refused a growth: the handle is failed and must be dropped.
    pub(super) refused: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
}

impl Opened {
    /// A failure of a write on this handle: the cap's refusal, whatever redb made of it.
    pub(super) fn classify(&self, failure: Failure) -> Failure {
        if self.refused.load(Ordering::Acquire) { Failure::CapReached } else { failure }
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        // INVARIANT: runs before `db` is dropped (fields drop after this), so redb's close
        // writes nothing; every transaction of this handle has ended (they borrow `db`).
        self.closing.store(true, Ordering::Release);
    }
}

/// Opens `path` as a redb database of at most `cap` bytes. `Ok(None)`: [`Mode::Existing`] and
/// there is no database there.
pub(super) fn open(path: &Path, cap: u64, mode: Mode) -> Result<Option<Opened>, Failure> {
    let Some(backend) = lock(path, mode)? else {
        return Ok(None);
    };
    let len = backend.len().map_err(Failure::Io)?;
    if len == 0 && mode == Mode::Existing {
        return Ok(None);
    }
    if len > 0 {
        let head = backend.read(0, PAGE_BYTES.min(len) as usize).map_err(Failure::Io)?;
        check_header(&head, len).map_err(Failure::Corrupt)?;
        require_verified_recovery(&backend, &head).map_err(Failure::Io)?;
    }
    let refused = Arc::new(AtomicBool::new(false));
    let closing = Arc::new(AtomicBool::new(false));
    let capped = CappedBackend { inner: backend, cap, refused: refused.clone(), closing: closing.clone() };
    let db = redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create_with_file_format_v3(true)
        .create_with_backend(capped)
        .map_err(|error| Failure::from_redb(error, &refused))?;
    Ok(Some(Opened { db, refused, closing }))
}

/// Opens and locks the file, waiting up to [`BUSY_WAIT`] for another holder.
fn lock(path: &Path, mode: Mode) -> Result<Option<FileBackend>, Failure> {
    let started = Instant::now();
    let mut pause = BUSY_FIRST_PAUSE;
    loop {
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(mode == Mode::Create)
            .truncate(false)
            .mode(FILE_MODE)
            .open(path)
        {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound && mode == Mode::Existing => {
                return Ok(None);
            }
            Err(error) => return Err(Failure::Io(error)),
        };
        match FileBackend::new(file) {
            Ok(backend) => return Ok(Some(backend)),
            Err(DatabaseError::DatabaseAlreadyOpen) => {
                if started.elapsed() >= BUSY_WAIT {
                    return Err(Failure::Busy);
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(BUSY_LONGEST_PAUSE);
            }
            Err(DatabaseError::Storage(StorageError::Io(error))) => return Err(Failure::Io(error)),
            Err(error) => return Err(Failure::Db(Box::new(error.into()))),
        }
    }
}

/// What redb would otherwise assert on (and abort the process): a header that is not redb's,
/// of another page size or file format, with impossible region geometry, or describing a file
/// other than this one (truncated, or a length its recovery cannot lay out). `len` is the file's
/// length, `head` its first page. Mirrors redb 2.6's `DatabaseLayout` arithmetic.
pub(super) fn check_header(head: &[u8], len: u64) -> Result<(), String> {
    if len < PAGE_BYTES || head.len() < REDB_HEADER_BYTES {
        return Err(format!("truncated: {len} bytes, less than redb's header page"));
    }
    if head[..REDB_MAGIC.len()] != REDB_MAGIC {
        return Err("not a redb database (bad magic number)".to_string());
    }
    let field = |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
    let page_size = field(REDB_PAGE_SIZE_AT);
    if u64::from(page_size) != PAGE_BYTES {
        return Err(format!("page size {page_size}, expected {PAGE_BYTES}"));
    }
    let primary = usize::from(head[REDB_GOD_BYTE_AT] & REDB_PRIMARY_SLOT_BIT);
    let version = head[REDB_SLOTS_AT[primary]];
    if version != REDB_FORMAT_V3 {
        return Err(format!("redb file format {version}, expected {REDB_FORMAT_V3}"));
    }
    // One region holds 4 GiB (redb's recovery counts in u32 below that): never a flow store.
    if len > u64::from(u32::MAX) {
        return Err(format!("{len} bytes, larger than any flow store"));
    }
    let header_pages = u64::from(field(REDB_REGION_HEADER_PAGES_AT));
    let data_pages = u64::from(field(REDB_REGION_DATA_PAGES_AT));
    let full_regions = u64::from(field(REDB_FULL_REGIONS_AT));
    let trailing_pages = u64::from(field(REDB_TRAILING_PAGES_AT));
    if data_pages == 0 || (full_regions == 0 && trailing_pages == 0) || trailing_pages > data_pages {
        return Err("impossible region layout in the header".to_string());
    }
    let page = PAGE_BYTES;
    let region = (header_pages + data_pages).saturating_mul(page);
    let trailing = if trailing_pages > 0 { (header_pages + trailing_pages) * page } else { 0 };
    let described = full_regions.saturating_mul(region).saturating_add(page + trailing);
    if described > len {
        return Err(format!("truncated: the header describes {described} bytes, the file has {len}"));
    }
    // Recovery lays the file out again from its length; redb asserts that it comes out exact.
    let beyond_full = (len - page) % region;
    let laid_out = len - beyond_full
        + if beyond_full >= (header_pages + 1) * page {
            beyond_full - (beyond_full - header_pages * page) % page
        } else {
            0
        };
    if laid_out != len {
        return Err(format!("{len} bytes is not a whole number of redb pages and regions"));
    }
    Ok(())
}

/// Makes redb's next open run its full recovery, which verifies every page's checksum before
/// it reads the page: marks the file as needing recovery (it already does, unless redb closed
/// it cleanly) and its last commit as one-phase (a two-phase commit would make redb trust the
/// last commit and read its allocator table unverified, where a damaged page panics). A
/// one-phase commit is what the store makes anyway; recovery then takes the newest commit
/// whose checksums hold. `head` is the first page, already checked.
fn require_verified_recovery(backend: &FileBackend, head: &[u8]) -> Result<(), io::Error> {
    let god = head[REDB_GOD_BYTE_AT];
    let wanted = (god | REDB_RECOVERY_REQUIRED_BIT) & !REDB_TWO_PHASE_BIT;
    if wanted != god {
        backend.write(REDB_GOD_BYTE_AT as u64, &[wanted])?;
    }
    Ok(())
}

/// Moves a corrupt `path` to its `.corrupt` name (replacing an older corrupt copy). A copy over
/// the cap (only a file ven did not write can be) is deleted instead, so log/ stays in its total.
pub(super) fn move_aside(path: &Path, cap: u64, cause: String) -> Result<Recovery, io::Error> {
    let moved_to = logdir::corrupt_path(path);
    fs::rename(path, &moved_to)?;
    let mut cause = cause;
    let len = fs::metadata(&moved_to).map(|m| m.len()).unwrap_or(0);
    if len > cap {
        fs::remove_file(&moved_to)?;
        cause.push_str(&format!("; deleted: {len} bytes is over the {cap}-byte cap"));
    }
    sync_dir(path);
    Ok(Recovery { path: path.to_path_buf(), moved_to, cause })
}

/// Renames `from` to `to` (replacing it) and makes the rename durable.
pub(super) fn rename(from: &Path, to: &Path) -> Result<(), io::Error> {
    fs::rename(from, to)?;
    sync_dir(to);
    Ok(())
}

/// Best effort: a lost directory sync costs at most the order of renames after a power cut,
/// and each file stays a valid database either way.
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
}

/// Length of `path`, 0 when it is missing.
pub(super) fn len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

pub(super) fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// The backup beside `path`.
pub(super) fn backup(path: &Path) -> PathBuf {
    logdir::backup_path(path)
}
