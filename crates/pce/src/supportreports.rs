//! Support reports the PCE asked VENs for (the spec's lightning bolt "send support report"): the
//! requests waiting for an upload and the reports received, in `DIR/support_reports/`.
//!
//! Files: `index.json` (the requests waiting, the reports' particulars, the last ids) and one
//! `NNNNNNNN.tar` per report, each replaced whole ([`crate::fsutil::write_atomic`]: temporary
//! file, fsync, rename, directory fsync). INVARIANT: an archive is written before the index names
//! it and removed only after the index stopped naming it, so a crash leaves at worst an archive
//! no index names, which the next open removes; the index never names a missing archive.
//!
//! Bounds: one request waiting per workload, [`MAX_PENDING_REQUESTS`] in all; the newest
//! [`MAX_REPORTS_PER_WORKLOAD`] reports of each workload, [`MAX_REPORTS`] and
//! [`MAX_STORED_BYTES`] in all (the oldest go first); an archive of
//! [`ven_proto::MAX_SUPPORT_REPORT_BYTES`] at most, which must be a whole tar.

use crate::{crypto, fsutil};
use serde::{Deserialize, Serialize};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use ven_proto::MAX_SUPPORT_REPORT_BYTES;

pub const DIR_NAME: &str = "support_reports";
const INDEX_FILE: &str = "index.json";
const FORMAT: u32 = 1;
/// Reports kept per workload (the newest).
pub const MAX_REPORTS_PER_WORKLOAD: usize = 3;
/// Reports kept in all.
pub const MAX_REPORTS: usize = 64;
/// Bytes of archives kept in all.
pub const MAX_STORED_BYTES: u64 = 256 * 1024 * 1024;
/// Requests waiting for their upload, in all (one per workload).
pub const MAX_PENDING_REQUESTS: usize = 10_000;
/// A tar block; an archive ends with two zero blocks.
const TAR_BLOCK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum SupportReportError {
    #[error("support reports: {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("support reports: the index {path} is damaged: {source}")]
    Index { path: PathBuf, source: serde_json::Error },
    /// An upload answers no request waiting for its workload (never asked, or answered).
    #[error("no support report request {request} is waiting for workload {workload}")]
    NotWaiting { request: u64, workload: u64 },
    /// The request or upload is refused (too many waiting, not a whole archive, too large).
    #[error("{0}")]
    Rejected(String),
    #[error("no support report with id {0}")]
    NoReport(u64),
}

/// A support report asked of a workload's VEN and not received yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub id: u64,
    pub workload_id: u64,
    pub requested_at: u64,
}

/// A support report received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub id: u64,
    pub request_id: u64,
    pub workload_id: u64,
    /// The workload's hostname when the report arrived.
    pub hostname: String,
    pub received_at: u64,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Index {
    format: u32,
    last_request_id: u64,
    last_report_id: u64,
    pending: Vec<Request>,
    /// Oldest first.
    reports: Vec<Report>,
}

/// The requests and reports (see the module header).
pub struct SupportReports {
    dir: PathBuf,
    index: Index,
}

impl SupportReports {
    /// Opens `data_dir/support_reports/`, creating it (0700); removes archives and temporary files
    /// no index names (a crash between writing one and the index).
    pub fn open(data_dir: &Path) -> Result<Self, SupportReportError> {
        let dir = data_dir.join(DIR_NAME);
        let io_error = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SupportReportError::Io { path, source }
        };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(io_error(&dir))?;
        let index_path = dir.join(INDEX_FILE);
        let index = match std::fs::read(&index_path) {
            Ok(bytes) => serde_json::from_slice::<Index>(&bytes)
                .map_err(|source| SupportReportError::Index { path: index_path.clone(), source })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Index { format: FORMAT, ..Index::default() },
            Err(source) => return Err(SupportReportError::Io { path: index_path, source }),
        };
        let store = Self { dir, index };
        for entry in std::fs::read_dir(&store.dir).map_err(io_error(&store.dir))? {
            let entry = entry.map_err(io_error(&store.dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let named = name == INDEX_FILE || store.index.reports.iter().any(|r| archive_name(r.id) == name);
            if !named {
                log::info!("support reports: removing {name}, which the index does not name");
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(store)
    }

    /// Asks for a report from `workload_id`: the request already waiting for it, or a new one.
    /// Returns the request and whether it is new.
    pub fn request(&mut self, workload_id: u64, now: u64) -> Result<(Request, bool), SupportReportError> {
        if let Some(waiting) = self.index.pending.iter().find(|r| r.workload_id == workload_id) {
            return Ok((waiting.clone(), false));
        }
        if self.index.pending.len() >= MAX_PENDING_REQUESTS {
            return Err(SupportReportError::Rejected(format!(
                "{MAX_PENDING_REQUESTS} support reports are already waiting for their VENs"
            )));
        }
        let mut next = self.index.clone();
        next.last_request_id += 1;
        let request = Request { id: next.last_request_id, workload_id, requested_at: now };
        next.pending.push(request.clone());
        self.save(next)?;
        Ok((request, true))
    }

    /// The requests waiting for their uploads, oldest first.
    pub fn pending_requests(&self) -> &[Request] {
        &self.index.pending
    }

    /// The request waiting for `workload_id`'s upload, if any.
    pub fn pending(&self, workload_id: u64) -> Option<u64> {
        self.index.pending.iter().find(|r| r.workload_id == workload_id).map(|r| r.id)
    }

    /// Forgets the request waiting for `workload_id` (its VEN unpaired); its reports stay.
    pub fn cancel(&mut self, workload_id: u64) -> Result<(), SupportReportError> {
        if self.pending(workload_id).is_none() {
            return Ok(());
        }
        let mut next = self.index.clone();
        next.pending.retain(|r| r.workload_id != workload_id);
        self.save(next)
    }

    /// Stores `archive` as the answer to request `request_id` of `workload_id` (which must be
    /// waiting), then drops the oldest reports beyond the bounds. Nothing changes on an error.
    pub fn store(
        &mut self,
        workload_id: u64,
        hostname: &str,
        request_id: u64,
        archive: &[u8],
        now: u64,
    ) -> Result<Report, SupportReportError> {
        if !self.index.pending.iter().any(|r| r.workload_id == workload_id && r.id == request_id) {
            return Err(SupportReportError::NotWaiting { request: request_id, workload: workload_id });
        }
        check_archive(archive).map_err(SupportReportError::Rejected)?;
        let mut next = self.index.clone();
        next.last_report_id += 1;
        let report = Report {
            id: next.last_report_id,
            request_id,
            workload_id,
            hostname: hostname.to_string(),
            received_at: now,
            bytes: archive.len() as u64,
            sha256: crypto::sha256_hex(archive),
        };
        let path = self.dir.join(archive_name(report.id));
        fsutil::write_atomic(&path, archive, 0o600)
            .map_err(|source| SupportReportError::Io { path: path.clone(), source })?;
        next.pending.retain(|r| r.workload_id != workload_id);
        next.reports.push(report.clone());
        let evicted = evict(&mut next.reports);
        if let Err(e) = self.save(next) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        for old in evicted {
            // Named by no index any more: a failure here only leaves a file the next open removes.
            let _ = std::fs::remove_file(self.dir.join(archive_name(old.id)));
        }
        Ok(report)
    }

    /// The reports, oldest first.
    pub fn list(&self) -> &[Report] {
        &self.index.reports
    }

    /// The report `id` and its archive.
    pub fn read(&self, id: u64) -> Result<(Report, Vec<u8>), SupportReportError> {
        let report =
            self.index.reports.iter().find(|r| r.id == id).ok_or(SupportReportError::NoReport(id))?;
        let path = self.dir.join(archive_name(id));
        let bytes = std::fs::read(&path).map_err(|source| SupportReportError::Io { path, source })?;
        Ok((report.clone(), bytes))
    }

    /// Writes `next` as the index, then takes it as the state (unchanged on an error).
    fn save(&mut self, next: Index) -> Result<(), SupportReportError> {
        let path = self.dir.join(INDEX_FILE);
        let bytes = serde_json::to_vec(&next)
            .map_err(|source| SupportReportError::Index { path: path.clone(), source })?;
        fsutil::write_atomic(&path, &bytes, 0o600)
            .map_err(|source| SupportReportError::Io { path, source })?;
        self.index = next;
        Ok(())
    }
}

fn archive_name(id: u64) -> String {
    format!("{id:08}.tar")
}

/// Removes the oldest reports beyond the bounds (per workload, in all, in bytes); returns them.
fn evict(reports: &mut Vec<Report>) -> Vec<Report> {
    let mut evicted = Vec::new();
    loop {
        let newest = reports.last().map(|r| r.workload_id);
        let per_workload = newest
            .filter(|id| reports.iter().filter(|r| r.workload_id == *id).count() > MAX_REPORTS_PER_WORKLOAD);
        let bytes: u64 = reports.iter().map(|r| r.bytes).sum();
        let at = match per_workload {
            Some(id) => reports.iter().position(|r| r.workload_id == id),
            None if reports.len() > MAX_REPORTS || (bytes > MAX_STORED_BYTES && reports.len() > 1) => Some(0),
            None => None,
        };
        match at {
            Some(at) => evicted.push(reports.remove(at)),
            None => return evicted,
        }
    }
}

/// Whether `archive` is a whole ustar archive as `ven gen-supportreport` writes it: within the
/// size cap, whole blocks, the first header's `ustar` magic, two zero blocks at the end (a
/// truncated upload has none).
pub fn check_archive(archive: &[u8]) -> Result<(), String> {
    if archive.len() > MAX_SUPPORT_REPORT_BYTES {
        return Err(format!(
            "a support report of {} bytes exceeds the limit of {MAX_SUPPORT_REPORT_BYTES}",
            archive.len()
        ));
    }
    if archive.len() < 3 * TAR_BLOCK || archive.len() % TAR_BLOCK != 0 {
        return Err(format!("the support report is not a whole tar archive ({} bytes)", archive.len()));
    }
    if archive.get(257..262) != Some(b"ustar".as_slice()) {
        return Err("the support report is not a ustar archive".to_string());
    }
    if archive[archive.len() - 2 * TAR_BLOCK..].iter().any(|b| *b != 0) {
        return Err("the support report is truncated: the tar's end blocks are missing".to_string());
    }
    Ok(())
}

/// Fuzzing (the `pce_support_report` target): `data` as the body of `POST
/// /ven/v1/support_report` through the decoder and the archive check; never a panic, and what
/// passes the check is within the cap.
#[doc(hidden)]
pub fn fuzz_upload(data: &[u8]) {
    for body in
        [data, &ven_proto::encode(&ven_proto::SupportReportUpload { request: 1, report: data.to_vec() })]
    {
        if let Ok(upload) = ven_proto::decode::<ven_proto::SupportReportUpload>(body) {
            if check_archive(&upload.report).is_ok() {
                assert!(upload.report.len() <= MAX_SUPPORT_REPORT_BYTES);
                assert_eq!(upload.report.len() % TAR_BLOCK, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pce-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A minimal archive: one header block with the magic, one data block, two end blocks.
    pub(crate) fn archive(fill: u8) -> Vec<u8> {
        let mut bytes = vec![0u8; 4 * TAR_BLOCK];
        bytes[..4].copy_from_slice(b"file");
        bytes[257..262].copy_from_slice(b"ustar");
        bytes[TAR_BLOCK..2 * TAR_BLOCK].fill(fill);
        bytes
    }

    #[test]
    fn a_report_answers_its_request_and_survives_a_reopen() {
        let dir = scratch("support-roundtrip");
        let mut reports = SupportReports::open(&dir).unwrap();
        let (request, new) = reports.request(7, 100).unwrap();
        assert!(new);
        assert_eq!(reports.request(7, 101).unwrap(), (request.clone(), false), "one waiting per workload");
        assert_eq!(reports.pending(7), Some(request.id));
        let wrong = reports.store(7, "web", request.id + 1, &archive(1), 102);
        assert!(matches!(wrong, Err(SupportReportError::NotWaiting { .. })));
        let other = reports.store(8, "db", request.id, &archive(1), 102);
        assert!(matches!(other, Err(SupportReportError::NotWaiting { .. })), "another workload's request");
        let report = reports.store(7, "web", request.id, &archive(1), 103).unwrap();
        assert_eq!(reports.pending(7), None);
        assert!(reports.store(7, "web", request.id, &archive(1), 104).is_err(), "answered once");
        // A stray archive (a crash before the index named it) goes at the next open.
        std::fs::write(dir.join(DIR_NAME).join(archive_name(99)), b"stray").unwrap();
        drop(reports);
        let reopened = SupportReports::open(&dir).unwrap();
        assert_eq!(reopened.list(), std::slice::from_ref(&report));
        assert_eq!(reopened.read(report.id).unwrap().1, archive(1));
        assert!(!dir.join(DIR_NAME).join(archive_name(99)).exists());
        assert!(matches!(reopened.read(42), Err(SupportReportError::NoReport(42))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_archives_are_refused_and_nothing_is_lost() {
        let dir = scratch("support-bad");
        let mut reports = SupportReports::open(&dir).unwrap();
        let (request, _) = reports.request(3, 1).unwrap();
        let whole = archive(2);
        let truncated = &whole[..whole.len() - TAR_BLOCK];
        let mut no_magic = whole.clone();
        no_magic[257] = b'x';
        let oversized = vec![0u8; MAX_SUPPORT_REPORT_BYTES + TAR_BLOCK];
        for (what, bad) in [("truncated", truncated), ("no magic", &no_magic), ("oversized", &oversized)] {
            let refused = reports.store(3, "web", request.id, bad, 2);
            assert!(matches!(refused, Err(SupportReportError::Rejected(_))), "{what}");
        }
        assert_eq!(reports.pending(3), Some(request.id), "the request still waits");
        assert!(reports.list().is_empty());
        assert!(reports.store(3, "web", request.id, &whole, 3).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_newest_reports_are_kept_within_the_bounds() {
        let dir = scratch("support-bounds");
        let mut reports = SupportReports::open(&dir).unwrap();
        for round in 0..5u8 {
            let (request, _) = reports.request(1, u64::from(round)).unwrap();
            reports.store(1, "web", request.id, &archive(round), u64::from(round)).unwrap();
        }
        let kept: Vec<u64> = reports.list().iter().map(|r| r.id).collect();
        assert_eq!(kept, vec![3, 4, 5], "the newest {MAX_REPORTS_PER_WORKLOAD} of the workload");
        let files = std::fs::read_dir(dir.join(DIR_NAME)).unwrap().count();
        assert_eq!(files, MAX_REPORTS_PER_WORKLOAD + 1, "the evicted archives are gone, the index stays");
        for workload in 2..(MAX_REPORTS as u64 + 10) {
            let (request, _) = reports.request(workload, 0).unwrap();
            reports.store(workload, "w", request.id, &archive(0), 0).unwrap();
        }
        assert_eq!(reports.list().len(), MAX_REPORTS);
        assert!(reports.list().iter().all(|r| r.workload_id != 1), "the oldest went first");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn fuzzing_input_never_panics() {
        for data in [&[][..], &[1, 0], &archive(3)[..], &[1, 255, 255, 255, 255, 15]] {
            fuzz_upload(data);
        }
    }
}
