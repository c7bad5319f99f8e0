//! Automatic history of firewall changes (the spec's audit trail): every change the agent makes
//! to the firewall is recorded with the ruleset as programmed; the newest [`HISTORY_CAPACITY`]
//! entries are kept.
//!
//! ```text
//! <data>/state/history/          0700
//!   00000012                     one entry per file, named by its sequence number (0600)
//! ```
//! Each file: magic `VENHIST`, format version (1 byte), payload length (u32 LE), postcard
//! [`HistoryEntry`], then the first 8 bytes of SHA-256 over everything before (as `state` does).
//!
//! Guarantees:
//! - an entry is written atomically ([`crate::state::write_atomically`]) before the oldest are
//!   deleted, so a failed write (full flash) leaves every existing entry as it was;
//! - a damaged, foreign or newer-format file is listed as unreadable with the reason, never
//!   misread, never fatal, and never hides the other entries; it counts toward the capacity and
//!   ages out like any entry;
//! - sequence numbers increase and survive restarts (next = largest on disk + 1);
//! - bounded: at most [`MAX_RULESET_BYTES`] of ruleset and [`MAX_NOTE_BYTES`] of note per entry.
//!
//! One writer at a time, as for the other state records: the agent, or the CLI when no agent runs.

mod diff;
mod render;

use std::borrow::Cow;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use ven_proto::PolicyState;

use crate::state::{DataDir, write_atomically};

pub use diff::diff_summary;
pub use render::{render_entry, render_json, render_table};

/// Entries kept; the oldest files beyond this are deleted after each record.
pub const HISTORY_CAPACITY: usize = 10;
/// Most bytes of ruleset text kept per entry (flash is scarce); longer text is cut at a line
/// boundary and ends with a note saying how many lines were left out.
pub const MAX_RULESET_BYTES: usize = 512 * 1024;
/// Most bytes of the caller's note kept per entry (cut at a character boundary, made one line).
pub const MAX_NOTE_BYTES: usize = 512;
/// Largest entry file read back; anything bigger is corrupt by definition.
const MAX_ENTRY_BYTES: usize = MAX_RULESET_BYTES + 16 * 1024;
/// Room kept for the truncation note inside [`MAX_RULESET_BYTES`].
const TRUNCATION_NOTE_RESERVE: usize = 160;
const MAGIC: &[u8; 7] = b"VENHIST";
const FORMAT_VERSION: u8 = 1;
const HEADER_BYTES: usize = MAGIC.len() + 1 + 4;
const CHECKSUM_BYTES: usize = 8;
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;
/// Start of the line that ends a cut ruleset (recognised by [`diff_summary`]).
pub(crate) const TRUNCATION_PREFIX: &str = "# ven-history: truncated,";

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("cannot read {path}: {cause}")]
    Read { path: PathBuf, cause: io::Error },
    #[error("cannot write {path}: {cause}")]
    Write { path: PathBuf, cause: io::Error },
    #[error("{path} is unreadable ({why}); it was left in place and ages out of the history")]
    Corrupt { path: PathBuf, why: String },
}

/// Why the firewall changed. Stored by position (postcard): only append variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeReason {
    /// A policy from the PCE was applied.
    PolicyUpdate,
    /// The last-known-good policy was applied at agent start.
    BootRestore,
    /// Our rules were found altered in the kernel and were put back.
    TamperRepair,
    Suspend,
    Unsuspend,
    Deactivate,
    /// Our rules and sets were removed (idle state).
    Remove,
}

impl ChangeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PolicyUpdate => "policy_update",
            Self::BootRestore => "boot_restore",
            Self::TamperRepair => "tamper_repair",
            Self::Suspend => "suspend",
            Self::Unsuspend => "unsuspend",
            Self::Deactivate => "deactivate",
            Self::Remove => "remove",
        }
    }
}

impl std::fmt::Display for ChangeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One recorded change. Stored by position (postcard): a field change bumps `FORMAT_VERSION`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Increasing, never reused.
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    pub reason: ChangeReason,
    /// 0 = none.
    pub policy_version: u64,
    /// None: the firewall was removed or suspended.
    pub state: Option<PolicyState>,
    /// One line: what differed from the previous entry (see [`diff_summary`]), then the note.
    pub summary: String,
    /// The firewall as programmed: iptables-restore text of our chains per family, then our sets
    /// with member counts; at most [`MAX_RULESET_BYTES`].
    pub ruleset: String,
}

/// One file of the history as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listed {
    Entry(HistoryEntry),
    /// A file named like an entry that cannot be read or decoded.
    Unreadable {
        seq: u64,
        path: PathBuf,
        why: String,
    },
}

impl Listed {
    pub fn seq(&self) -> u64 {
        match self {
            Self::Entry(entry) => entry.seq,
            Self::Unreadable { seq, .. } => *seq,
        }
    }
}

/// Why one file could not be read back.
enum ReadFailure {
    Io(io::Error),
    Corrupt(String),
}

impl ReadFailure {
    fn why(&self) -> String {
        match self {
            Self::Io(cause) => format!("cannot read: {cause}"),
            Self::Corrupt(why) => why.clone(),
        }
    }
}

/// The history directory of one agent.
#[derive(Clone, Debug)]
pub struct History {
    dir: PathBuf,
}

impl History {
    /// `<data>/state/history`; nothing is created until the first record.
    pub fn new(data: &DataDir) -> Self {
        Self { dir: data.state_dir().join("history") }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records a change at the current time: see [`History::record_at`].
    pub fn record(
        &self,
        reason: ChangeReason,
        policy_version: u64,
        state: Option<PolicyState>,
        ruleset: &str,
        note: &str,
    ) -> Result<HistoryEntry, HistoryError> {
        self.record_at(crate::clock::now(), reason, policy_version, state, ruleset, note)
    }

    /// Records a change made at `at`. The summary is [`diff_summary`] of the newest entry's
    /// ruleset and this one (both as stored), followed by `; <note>` when the note is not empty.
    /// The ruleset is cut to [`MAX_RULESET_BYTES`]. Afterwards the oldest files beyond
    /// [`HISTORY_CAPACITY`] are deleted (a failure there is logged; the next record retries).
    pub fn record_at(
        &self,
        at: u64,
        reason: ChangeReason,
        policy_version: u64,
        state: Option<PolicyState>,
        ruleset: &str,
        note: &str,
    ) -> Result<HistoryEntry, HistoryError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&self.dir)
            .map_err(|cause| HistoryError::Write { path: self.dir.clone(), cause })?;
        self.remove_stale_temp_files();
        let files = self.files()?;
        let seq = match files.last() {
            Some((newest, _)) => newest.checked_add(1).ok_or_else(|| HistoryError::Write {
                path: self.dir.clone(),
                cause: io::Error::other("sequence numbers are exhausted"),
            })?,
            None => 1,
        };

        let ruleset = truncate_ruleset(ruleset);
        let mut summary = match files.last() {
            None => diff_summary(None, &ruleset),
            Some((newest, path)) => match read_entry(path, *newest) {
                Ok(previous) => diff_summary(Some(&previous.ruleset), &ruleset),
                Err(_) => format!("previous entry unreadable; now {}", diff::describe_ruleset(&ruleset)),
            },
        };
        let note = one_line(note, MAX_NOTE_BYTES);
        if !note.is_empty() {
            summary.push_str("; ");
            summary.push_str(&note);
        }
        let entry =
            HistoryEntry { seq, at, reason, policy_version, state, summary, ruleset: ruleset.into_owned() };

        let path = self.entry_path(seq);
        let bytes = encode_entry(&entry)
            .map_err(|why| HistoryError::Write { path: path.clone(), cause: io::Error::other(why) })?;
        write_atomically(&path, &bytes, FILE_MODE)
            .map_err(|cause| HistoryError::Write { path: path.clone(), cause })?;

        let excess = (files.len() + 1).saturating_sub(HISTORY_CAPACITY);
        for (_, old) in files.iter().take(excess) {
            if let Err(e) = fs::remove_file(old) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("history: cannot delete old entry {}: {e}", old.display());
                }
            }
        }
        Ok(entry)
    }

    /// Every entry file, oldest first; a missing directory is an empty history.
    pub fn list(&self) -> Result<Vec<Listed>, HistoryError> {
        Ok(self
            .files()?
            .into_iter()
            .map(|(seq, path)| match read_entry(&path, seq) {
                Ok(entry) => Listed::Entry(entry),
                Err(failure) => Listed::Unreadable { seq, why: failure.why(), path },
            })
            .collect())
    }

    /// The entry with this sequence number; `Ok(None)` when there is none.
    pub fn get(&self, seq: u64) -> Result<Option<HistoryEntry>, HistoryError> {
        let Some((_, path)) = self.files()?.into_iter().find(|(s, _)| *s == seq) else {
            return Ok(None);
        };
        match read_entry(&path, seq) {
            Ok(entry) => Ok(Some(entry)),
            Err(ReadFailure::Io(cause)) => Err(HistoryError::Read { path, cause }),
            Err(ReadFailure::Corrupt(why)) => Err(HistoryError::Corrupt { path, why }),
        }
    }

    fn entry_path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:08}"))
    }

    /// Regular files named like entries (digits only), by sequence number.
    fn files(&self) -> Result<Vec<(u64, PathBuf)>, HistoryError> {
        let read_error = |cause| HistoryError::Read { path: self.dir.clone(), cause };
        let listing = match fs::read_dir(&self.dir) {
            Ok(listing) => listing,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(cause) => return Err(read_error(cause)),
        };
        let mut files = Vec::new();
        for item in listing {
            let item = item.map_err(read_error)?;
            let is_file = item.file_type().is_ok_and(|t| t.is_file());
            if let Some(seq) = item.file_name().to_str().and_then(parse_entry_name).filter(|_| is_file) {
                files.push((seq, item.path()));
            }
        }
        files.sort();
        Ok(files)
    }

    /// Deletes temp files a crash left mid-write (`.<name>.tmp-<pid>-<random>` of another
    /// process): each may hold up to an entry's worth of flash.
    fn remove_stale_temp_files(&self) {
        let own = std::process::id().to_string();
        let Ok(listing) = fs::read_dir(&self.dir) else { return };
        for item in listing.flatten() {
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            let writer =
                name.rsplit_once(".tmp-").map(|(_, rest)| rest.split_once('-').map_or(rest, |(pid, _)| pid));
            let stale = name.starts_with('.')
                && writer.is_some_and(|pid| is_digits(pid) && pid != own)
                && item.file_type().is_ok_and(|t| t.is_file());
            if stale {
                match fs::remove_file(item.path()) {
                    Ok(()) => log::info!("history: removed {} left by an interrupted write", name),
                    Err(e) => log::warn!("history: cannot remove {}: {e}", item.path().display()),
                }
            }
        }
    }
}

fn is_digits(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

fn parse_entry_name(name: &str) -> Option<u64> {
    if is_digits(name) && name.len() <= 20 { name.parse().ok() } else { None }
}

fn read_entry(path: &Path, seq: u64) -> Result<HistoryEntry, ReadFailure> {
    let file = File::open(path).map_err(ReadFailure::Io)?;
    let mut bytes = Vec::new();
    file.take(MAX_ENTRY_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(ReadFailure::Io)?;
    let entry = decode_entry(&bytes).map_err(ReadFailure::Corrupt)?;
    if entry.seq != seq {
        return Err(ReadFailure::Corrupt(format!("holds entry {} under the name of entry {seq}", entry.seq)));
    }
    Ok(entry)
}

fn encode_entry(entry: &HistoryEntry) -> Result<Vec<u8>, String> {
    let payload = postcard::to_allocvec(entry).map_err(|e| format!("cannot encode history entry: {e}"))?;
    frame_entry(&payload)
}

/// The bytes of a history file holding `payload` (a postcard [`HistoryEntry`]): header, payload,
/// checksum. Public for the fuzz target that reaches the entry decoder past the checksum.
#[doc(hidden)]
pub fn frame_entry(payload: &[u8]) -> Result<Vec<u8>, String> {
    let len = u32::try_from(payload.len()).map_err(|_| "history entry too large".to_string())?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + payload.len() + CHECKSUM_BYTES);
    bytes.extend_from_slice(MAGIC);
    bytes.push(FORMAT_VERSION);
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(payload);
    let checksum = checksum(&bytes);
    bytes.extend_from_slice(&checksum);
    Ok(bytes)
}

/// Decodes the bytes of a history file (public for a fuzz target).
pub fn decode_entry(bytes: &[u8]) -> Result<HistoryEntry, String> {
    if bytes.len() > MAX_ENTRY_BYTES {
        return Err("larger than any history entry".into());
    }
    if bytes.len() < HEADER_BYTES + CHECKSUM_BYTES || !bytes.starts_with(MAGIC) {
        return Err("not a ven history entry".into());
    }
    let version = bytes[MAGIC.len()];
    if version != FORMAT_VERSION {
        return Err(format!("format version {version}, this ven reads version {FORMAT_VERSION}"));
    }
    let (body, stored_checksum) = bytes.split_at(bytes.len() - CHECKSUM_BYTES);
    if checksum(body) != stored_checksum {
        return Err("checksum mismatch".into());
    }
    let len = &body[MAGIC.len() + 1..HEADER_BYTES];
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let payload = &body[HEADER_BYTES..];
    if payload.len() != len {
        return Err("length mismatch".into());
    }
    match postcard::take_from_bytes::<HistoryEntry>(payload) {
        Ok((entry, [])) => Ok(entry),
        Ok(_) => Err("trailing bytes after the entry".into()),
        Err(e) => Err(format!("undecodable entry: {e}")),
    }
}

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_BYTES] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; CHECKSUM_BYTES];
    out.copy_from_slice(&digest.as_ref()[..CHECKSUM_BYTES]);
    out
}

/// The ruleset as stored: whole if it fits in [`MAX_RULESET_BYTES`], else the lines that fit
/// followed by a note line (starting with [`TRUNCATION_PREFIX`]) counting the lines left out.
fn truncate_ruleset(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_RULESET_BYTES {
        return Cow::Borrowed(text);
    }
    let budget = MAX_RULESET_BYTES - TRUNCATION_NOTE_RESERVE;
    // '\n' is one byte, so the cut after it is a character boundary.
    let cut = text.as_bytes()[..budget].iter().rposition(|&b| b == b'\n').map_or(0, |at| at + 1);
    let left_out = text[cut..].lines().count();
    let mut kept = String::with_capacity(budget + TRUNCATION_NOTE_RESERVE);
    kept.push_str(&text[..cut]);
    kept.push_str(&format!(
        "{TRUNCATION_PREFIX} {left_out} more lines left out (at most {MAX_RULESET_BYTES} bytes of \
         ruleset are kept per entry)\n"
    ));
    debug_assert!(kept.len() <= MAX_RULESET_BYTES);
    Cow::Owned(kept)
}

/// Control characters become spaces; cut at a character boundary to at most `max` bytes.
fn one_line(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.trim().chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A unique temporary data directory, removed on drop.
    pub(super) struct TempData {
        pub data: DataDir,
    }

    impl TempData {
        pub fn new(name: &str) -> Self {
            let root = std::env::temp_dir().join(format!("ven-history-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root).unwrap();
            Self { data: DataDir::new(root) }
        }
    }

    impl Drop for TempData {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(self.data.root());
        }
    }

    fn ruleset(n: usize) -> String {
        let mut text = String::from("# IPv4\n*filter\n:VEN-INPUT - [0:0]\n");
        for port in 0..n {
            text.push_str(&format!("-A VEN-INPUT -p tcp -m tcp --dport {port} -j ACCEPT\n"));
        }
        text.push_str("COMMIT\n# sets\nven-1 hash:net inet 3 members\n");
        text
    }

    fn record(history: &History, n: usize) -> HistoryEntry {
        history
            .record_at(
                1_795_780_800,
                ChangeReason::PolicyUpdate,
                n as u64,
                Some(PolicyState::Enforced),
                &ruleset(n),
                "",
            )
            .unwrap()
    }

    fn seqs(listed: &[Listed]) -> Vec<u64> {
        listed.iter().map(Listed::seq).collect()
    }

    #[test]
    fn missing_directory_is_an_empty_history() {
        let temp = TempData::new("missing");
        let history = History::new(&temp.data);
        assert_eq!(history.list().unwrap(), Vec::new());
        assert_eq!(history.get(1).unwrap(), None);
    }

    #[test]
    fn records_round_trip_with_modes_and_summaries() {
        let temp = TempData::new("roundtrip");
        let history = History::new(&temp.data);
        let first = record(&history, 2);
        assert_eq!(first.seq, 1);
        assert_eq!(first.summary, "first entry: 2 rules, 1 set (3 members)");
        let second = history
            .record_at(7, ChangeReason::TamperRepair, 2, None, &ruleset(3), "2 rules\nwere missing")
            .unwrap();
        assert_eq!(second.summary, "+1 -0 rules; 2 rules were missing");
        assert_eq!(history.get(2).unwrap(), Some(second.clone()));
        assert_eq!(history.list().unwrap(), vec![Listed::Entry(first), Listed::Entry(second)]);
        let mode = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(history.dir()), 0o700);
        assert_eq!(mode(&history.dir().join("00000002")), 0o600);
    }

    #[test]
    fn keeps_the_newest_ten_and_continues_after_restart() {
        let temp = TempData::new("capacity");
        let history = History::new(&temp.data);
        for n in 0..15 {
            assert_eq!(record(&history, n).seq, n as u64 + 1);
        }
        let listed = history.list().unwrap();
        assert_eq!(seqs(&listed), (6..=15).collect::<Vec<_>>());
        assert_eq!(fs::read_dir(history.dir()).unwrap().count(), HISTORY_CAPACITY);

        let restarted = History::new(&temp.data);
        assert_eq!(record(&restarted, 1).seq, 16);
        assert_eq!(seqs(&restarted.list().unwrap()), (7..=16).collect::<Vec<_>>());
        assert_eq!(restarted.get(6).unwrap(), None);
    }

    #[test]
    fn corrupt_and_foreign_files_are_reported_and_the_rest_kept() {
        let temp = TempData::new("corrupt");
        let history = History::new(&temp.data);
        for n in 0..4 {
            record(&history, n);
        }
        let path = |seq| history.dir().join(format!("{seq:08}"));
        let mut flipped = fs::read(path(2)).unwrap();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x40;
        fs::write(path(2), flipped).unwrap();
        let mut newer = fs::read(path(3)).unwrap();
        newer[MAGIC.len()] = FORMAT_VERSION + 1;
        fs::write(path(3), newer).unwrap();
        fs::write(path(4), b"").unwrap();
        fs::copy(path(1), history.dir().join("00000005")).unwrap();
        fs::write(history.dir().join("notes.txt"), b"not ours").unwrap();

        let listed = history.list().unwrap();
        assert_eq!(seqs(&listed), vec![1, 2, 3, 4, 5]);
        assert!(matches!(&listed[0], Listed::Entry(entry) if entry.seq == 1));
        let why = |listed: &Listed| match listed {
            Listed::Unreadable { why, .. } => why.clone(),
            other => panic!("expected unreadable, got {other:?}"),
        };
        assert_eq!(why(&listed[1]), "checksum mismatch");
        assert_eq!(why(&listed[2]), "format version 2, this ven reads version 1");
        assert_eq!(why(&listed[3]), "not a ven history entry");
        assert_eq!(why(&listed[4]), "holds entry 1 under the name of entry 5");
        assert!(matches!(history.get(2), Err(HistoryError::Corrupt { .. })));
        assert_eq!(history.get(1).unwrap().unwrap().seq, 1);

        // The next record does not trust the unreadable newest entry for its summary.
        let next = record(&history, 1);
        assert_eq!(next.seq, 6);
        assert_eq!(next.summary, "previous entry unreadable; now 1 rule, 1 set (3 members)");
    }

    #[test]
    fn failed_write_leaves_existing_entries_intact() {
        let temp = TempData::new("failed-write");
        let history = History::new(&temp.data);
        for n in 0..HISTORY_CAPACITY {
            record(&history, n);
        }
        let before = history.list().unwrap();
        // The next entry cannot be put in place (even by root): a directory holds its name, so
        // the rename fails as a full disk would fail the write.
        let blocker = history.dir().join(format!("{:08}", 11));
        fs::create_dir(&blocker).unwrap();
        let result = record_result(&history);
        assert!(matches!(result, Err(HistoryError::Write { .. })), "{result:?}");
        fs::remove_dir(&blocker).unwrap();
        assert_eq!(history.list().unwrap(), before, "no entry lost or damaged");
        let temps = fs::read_dir(history.dir())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"));
        assert_eq!(temps.count(), 0, "the failed write's temp file is gone");

        assert_eq!(record_result(&history).unwrap().seq, 11);
        assert_eq!(seqs(&history.list().unwrap()), (2..=11).collect::<Vec<_>>());
    }

    fn record_result(history: &History) -> Result<HistoryEntry, HistoryError> {
        history.record_at(1, ChangeReason::Remove, 0, None, "", "")
    }

    #[test]
    fn stale_temp_files_of_other_processes_are_removed() {
        let temp = TempData::new("stale");
        let history = History::new(&temp.data);
        record(&history, 1);
        let stale = history.dir().join(".00000002.tmp-4294967295-0123456789abcdef");
        fs::write(&stale, b"half an entry").unwrap();
        record(&history, 2);
        assert!(!stale.exists());
        assert_eq!(seqs(&history.list().unwrap()), vec![1, 2]);
    }

    #[test]
    fn huge_ruleset_is_cut_at_a_line_with_a_note() {
        let temp = TempData::new("huge");
        let history = History::new(&temp.data);
        let huge = ruleset(20_000);
        assert!(huge.len() > MAX_RULESET_BYTES);
        let entry = history.record_at(1, ChangeReason::PolicyUpdate, 1, None, &huge, "").unwrap();
        assert!(entry.ruleset.len() <= MAX_RULESET_BYTES);
        let (kept, note) = entry.ruleset.trim_end().rsplit_once('\n').unwrap();
        assert!(huge.starts_with(&format!("{kept}\n")), "cut at a line boundary");
        let left_out = huge.lines().count() - kept.lines().count();
        assert_eq!(
            note,
            format!(
                "{TRUNCATION_PREFIX} {left_out} more lines left out (at most 524288 bytes of ruleset are \
                 kept per entry)"
            )
        );
        assert!(entry.summary.ends_with("(partial: a ruleset was cut at 512 KiB)"), "{}", entry.summary);
        assert_eq!(history.get(1).unwrap(), Some(entry));

        let exact = "x".repeat(MAX_RULESET_BYTES);
        assert_eq!(truncate_ruleset(&exact), exact.as_str());
        let one_long_line = "y".repeat(MAX_RULESET_BYTES + 1);
        assert!(truncate_ruleset(&one_long_line).starts_with(&format!("{TRUNCATION_PREFIX} 1 more")));
    }

    #[test]
    fn notes_are_one_bounded_line() {
        assert_eq!(one_line(" a\nb\tc ", 100), "a b c");
        assert_eq!(one_line("ééé", 5), "éé");
        let entry = record_note(&"n".repeat(2 * MAX_NOTE_BYTES));
        assert_eq!(entry.summary.len(), "first entry: 0 rules, 0 sets (0 members); ".len() + MAX_NOTE_BYTES);
    }

    fn record_note(note: &str) -> HistoryEntry {
        let temp = TempData::new("note");
        History::new(&temp.data).record_at(1, ChangeReason::Suspend, 0, None, "", note).unwrap()
    }

    #[test]
    fn decode_rejects_garbage_without_panicking() {
        let entry = HistoryEntry {
            seq: 1,
            at: 2,
            reason: ChangeReason::Deactivate,
            policy_version: 3,
            state: Some(PolicyState::Test),
            summary: "s".into(),
            ruleset: "r".into(),
        };
        let good = encode_entry(&entry).unwrap();
        assert_eq!(decode_entry(&good).unwrap(), entry);
        for cut in 0..good.len() {
            assert!(decode_entry(&good[..cut]).is_err());
        }
        assert!(decode_entry(&vec![0; MAX_ENTRY_BYTES + 1]).is_err());
    }
}
