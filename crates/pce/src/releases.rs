//! The PCE's store of signed agent releases (issue 16, self-upgrade), on disk only: the serving
//! PCE reads it when a VEN asks, so `pce release add|remove` work while `pce serve` runs.
//!
//! Layout, under `DIR/releases/`: `<target>/<version>/binary` (the agent as signed) and
//! `<target>/<version>/manifest` ([`render_manifest`]: what the signature covers, the signature,
//! when it was added). `DIR/release-key.pub` holds the one public key releases must verify with
//! (64 hex digits; `pce release-key trust`). `DIR/releases/orders.json` holds the upgrade orders
//! (`upgrades`).
//!
//! INVARIANT: a `<target>/<version>/` directory appears whole or not at all: a release is
//! written into a temporary directory (`.VERSION.tmp-RANDOM`, which no listing reads: versions
//! never start with a dot), its files fsynced, then renamed into place; a removal renames it
//! away first. Only a release whose signature verified with the trusted key is ever renamed
//! into place; the binary is checked against its manifest again each time it is served.
//!
//! Bounds: [`MAX_RELEASES`] releases and [`MAX_STORED_BYTES`] in all; each binary at most
//! [`MAX_RELEASE_BYTES`]; a manifest at most [`MAX_MANIFEST_BYTES`].

use crate::fsutil;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use ven_proto::release::{self, MAX_RELEASE_BYTES, Manifest, ReleaseError};

pub const DIR_NAME: &str = "releases";
/// The trusted public release key, in the data directory.
pub const KEY_FILE: &str = "release-key.pub";
const BINARY_FILE: &str = "binary";
const MANIFEST_FILE: &str = "manifest";
/// The first line of every manifest.
const MANIFEST_TAG: &str = "ven-release-manifest-v1";
/// Releases kept, all targets together.
pub const MAX_RELEASES: usize = 32;
/// Bytes of binaries kept, all targets together.
pub const MAX_STORED_BYTES: u64 = 256 * 1024 * 1024;
/// Longest manifest read from disk.
pub const MAX_MANIFEST_BYTES: usize = 1024;
/// Target directories read (each release's target is a directory; more can only be strays).
const MAX_TARGET_DIRS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ReleaseStoreError {
    #[error("release store: {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("no release key is trusted yet ({path} is missing): run `pce release-key trust HEX` first")]
    NoKey { path: PathBuf },
    #[error("{path}: a release key is already trusted; give --replace to replace it")]
    KeyExists { path: PathBuf },
    #[error("{path}: damaged: {cause}")]
    Damaged { path: PathBuf, cause: String },
    #[error("release {version} for {target} is already in the store (remove it first)")]
    Exists { version: String, target: String },
    #[error("no release {version} for {target} in the store")]
    NotFound { version: String, target: String },
    #[error("the release store is full: {0}")]
    Full(String),
    /// The stored binary is not what its manifest says (changed on disk since it was added).
    #[error("release {version} for {target} in the PCE's store is altered: {cause}")]
    Altered { version: String, target: String, cause: ReleaseError },
    #[error(transparent)]
    Release(#[from] ReleaseError),
}

/// A release as stored: what the signature covers, the signature, when it was added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRelease {
    pub manifest: Manifest,
    pub signature: [u8; 64],
    /// Unix seconds.
    pub added_at: u64,
}

/// The manifest file's text: one `key value` line each, in this order.
pub fn render_manifest(release: &StoredRelease) -> String {
    let m = &release.manifest;
    format!(
        "{MANIFEST_TAG}\nversion {}\ntarget {}\nlength {}\nsha256 {}\nsignature {}\nadded-at {}\n",
        m.version,
        m.target,
        m.length,
        release::hex(&m.sha256),
        release::hex(&release.signature),
        release.added_at
    )
}

/// Reads a manifest file's bytes, refusing anything [`render_manifest`] would not write: the
/// exact lines in their order, valid version and target, a length within [`MAX_RELEASE_BYTES`],
/// lowercase hex of the right lengths, decimal numbers without sign or leading zero.
pub fn parse_manifest(bytes: &[u8]) -> Result<StoredRelease, String> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(format!("longer than {MAX_MANIFEST_BYTES} bytes"));
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let body = text.strip_suffix('\n').ok_or("does not end with a newline")?;
    let mut lines = body.split('\n');
    if lines.next() != Some(MANIFEST_TAG) {
        return Err(format!("the first line is not {MANIFEST_TAG:?}"));
    }
    let mut field = |key: &str| -> Result<&str, String> {
        let line = lines.next().ok_or_else(|| format!("no {key} line"))?;
        let value = line.strip_prefix(key).and_then(|rest| rest.strip_prefix(' '));
        match value {
            Some(value) if !value.is_empty() && !value.contains(|c: char| c.is_whitespace()) => Ok(value),
            _ => Err(format!("expected a {key} line, found {:?}", truncated(line))),
        }
    };
    let version = field("version")?.to_string();
    release::check_version(&version).map_err(|e| e.to_string())?;
    let target = field("target")?.to_string();
    release::check_target(&target).map_err(|e| e.to_string())?;
    let length = decimal(field("length")?).ok_or("length: not a decimal number")?;
    if length > MAX_RELEASE_BYTES {
        return Err(format!("length {length} exceeds {MAX_RELEASE_BYTES}"));
    }
    let sha256 = lower_hex(field("sha256")?, 64)
        .and_then(|hex| release::parse_key(hex).ok())
        .ok_or("sha256: not 64 lowercase hex digits")?;
    let signature = lower_hex(field("signature")?, 128)
        .and_then(|hex| release::parse_signature(hex).ok())
        .ok_or("signature: not 128 lowercase hex digits")?;
    let added_at = decimal(field("added-at")?).ok_or("added-at: not a decimal number")?;
    if let Some(extra) = lines.next() {
        return Err(format!("unexpected line {:?}", truncated(extra)));
    }
    Ok(StoredRelease { manifest: Manifest { version, target, length, sha256 }, signature, added_at })
}

fn truncated(line: &str) -> String {
    line.chars().take(40).collect()
}

fn decimal(text: &str) -> Option<u64> {
    let canonical = text.bytes().all(|b| b.is_ascii_digit()) && (text == "0" || !text.starts_with('0'));
    if canonical { text.parse().ok() } else { None }
}

fn lower_hex(text: &str, digits: usize) -> Option<&str> {
    (text.len() == digits && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then_some(text)
}

/// Fuzzing (the `pce_release_manifest` target): `data` as a manifest file; never a panic, and
/// what is accepted is canonical (written back byte for byte) and within the bounds.
#[doc(hidden)]
pub fn fuzz_manifest(data: &[u8]) {
    if let Ok(parsed) = parse_manifest(data) {
        assert_eq!(render_manifest(&parsed).as_bytes(), data, "an accepted manifest is canonical");
        assert!(parsed.manifest.length <= MAX_RELEASE_BYTES);
        release::check_version(&parsed.manifest.version).expect("a valid version");
        release::check_target(&parsed.manifest.target).expect("a valid target");
    }
}

/// The `DIR/releases` directory.
pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join(DIR_NAME)
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ReleaseStoreError + '_ {
    move |source| ReleaseStoreError::Io { path: path.to_path_buf(), source }
}

/// Trusts `key_hex` (64 hex digits) as the release key: written to `DIR/release-key.pub`; an
/// existing key is replaced only when `replace`.
pub fn trust_key(data_dir: &Path, key_hex: &str, replace: bool) -> Result<[u8; 32], ReleaseStoreError> {
    let key = release::parse_key(key_hex)?;
    let path = data_dir.join(KEY_FILE);
    fs::DirBuilder::new().recursive(true).mode(0o700).create(data_dir).map_err(io_error(data_dir))?;
    if !replace && fs::symlink_metadata(&path).is_ok() {
        return Err(ReleaseStoreError::KeyExists { path });
    }
    let text = format!("{}\n", release::hex(&key));
    fsutil::write_atomic(&path, text.as_bytes(), 0o600).map_err(io_error(&path))?;
    Ok(key)
}

/// The trusted release key, if one is.
pub fn trusted_key(data_dir: &Path) -> Result<Option<[u8; 32]>, ReleaseStoreError> {
    let path = data_dir.join(KEY_FILE);
    let text = match read_bounded(&path, 256) {
        Ok(text) => text,
        Err(ReleaseStoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(other) => return Err(other),
    };
    let text = String::from_utf8(text)
        .map_err(|_| ReleaseStoreError::Damaged { path: path.clone(), cause: "not UTF-8".into() })?;
    release::parse_key(&text).map(Some).map_err(|e| ReleaseStoreError::Damaged { path, cause: e.to_string() })
}

/// At most `max` bytes of `path` (not through a link); more is an error.
fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, ReleaseStoreError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(io_error(path))?;
    let mut bytes = Vec::new();
    file.take(max as u64 + 1).read_to_end(&mut bytes).map_err(io_error(path))?;
    if bytes.len() > max {
        return Err(ReleaseStoreError::Damaged {
            path: path.to_path_buf(),
            cause: format!("longer than {max} bytes"),
        });
    }
    Ok(bytes)
}

/// One `<target>/<version>/` directory of the store, and its manifest as read.
#[derive(Debug)]
pub struct Entry {
    pub target: String,
    pub version: String,
    /// Bytes the binary takes on disk (0 when it is missing).
    pub bytes: u64,
    pub release: Result<StoredRelease, ReleaseStoreError>,
}

/// Every release directory of the store, by target then version. Names that cannot be a
/// target or version (temporary directories, `orders.json`) are skipped; a damaged manifest is
/// listed with its error.
pub fn scan(data_dir: &Path) -> Result<Vec<Entry>, ReleaseStoreError> {
    let root = dir(data_dir);
    let mut entries = Vec::new();
    for target in sorted_names(&root)?.into_iter().take(MAX_TARGET_DIRS) {
        if release::check_target(&target).is_err() {
            continue;
        }
        let target_dir = root.join(&target);
        if !target_dir.is_dir() {
            continue;
        }
        for version in sorted_names(&target_dir)? {
            if release::check_version(&version).is_err() {
                continue;
            }
            let release_dir = target_dir.join(&version);
            let bytes = fs::symlink_metadata(release_dir.join(BINARY_FILE)).map_or(0, |m| m.len());
            let release = read_release(&release_dir, &version, &target);
            entries.push(Entry { target: target.clone(), version, bytes, release });
            if entries.len() > 4 * MAX_RELEASES {
                // Never added by `add`, which stops at MAX_RELEASES: enough to refuse more.
                return Ok(entries);
            }
        }
    }
    Ok(entries)
}

fn sorted_names(dir: &Path) -> Result<Vec<String>, ReleaseStoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ReleaseStoreError::Io { path: dir.to_path_buf(), source }),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error(dir))?;
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
        if names.len() > 16 * MAX_RELEASES + MAX_TARGET_DIRS {
            break;
        }
    }
    names.sort();
    Ok(names)
}

/// The manifest of `release_dir`, which must name `version` and `target` (its directories).
fn read_release(release_dir: &Path, version: &str, target: &str) -> Result<StoredRelease, ReleaseStoreError> {
    let path = release_dir.join(MANIFEST_FILE);
    let bytes = read_bounded(&path, MAX_MANIFEST_BYTES)?;
    let parsed =
        parse_manifest(&bytes).map_err(|cause| ReleaseStoreError::Damaged { path: path.clone(), cause })?;
    if parsed.manifest.version != version || parsed.manifest.target != target {
        let cause = format!(
            "it names {} for {}, its directory {version} for {target}",
            parsed.manifest.version, parsed.manifest.target
        );
        return Err(ReleaseStoreError::Damaged { path, cause });
    }
    Ok(parsed)
}

/// The release `version` for `target`, if the store holds it.
pub fn find(
    data_dir: &Path,
    version: &str,
    target: &str,
) -> Result<Option<StoredRelease>, ReleaseStoreError> {
    release::check_version(version)?;
    release::check_target(target)?;
    let release_dir = dir(data_dir).join(target).join(version);
    match read_release(&release_dir, version, target) {
        Ok(found) => Ok(Some(found)),
        Err(ReleaseStoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(other) => Err(other),
    }
}

/// The targets for which the store holds `version`.
pub fn targets_of(data_dir: &Path, version: &str) -> Result<Vec<String>, ReleaseStoreError> {
    release::check_version(version)?;
    let entries = scan(data_dir)?;
    Ok(entries.into_iter().filter(|e| e.version == version && e.release.is_ok()).map(|e| e.target).collect())
}

/// The release `version` for `target` and its binary, checked against the manifest (length and
/// SHA-256): [`ReleaseStoreError::Altered`] when the bytes on disk are not those added.
pub fn read(
    data_dir: &Path,
    version: &str,
    target: &str,
) -> Result<(StoredRelease, Vec<u8>), ReleaseStoreError> {
    let not_found =
        || ReleaseStoreError::NotFound { version: version.to_string(), target: target.to_string() };
    let stored = find(data_dir, version, target)?.ok_or_else(not_found)?;
    let path = dir(data_dir).join(target).join(version).join(BINARY_FILE);
    let altered = |cause| ReleaseStoreError::Altered {
        version: version.to_string(),
        target: target.to_string(),
        cause,
    };
    let bytes = match read_bounded(&path, MAX_RELEASE_BYTES as usize) {
        Ok(bytes) => bytes,
        Err(ReleaseStoreError::Damaged { .. }) => {
            return Err(altered(ReleaseError::TooLarge { version: version.to_string() }));
        }
        Err(other) => return Err(other),
    };
    stored.manifest.verify_content(&mut bytes.as_slice()).map_err(altered)?;
    Ok((stored, bytes))
}

/// Copies `binary` into the store as release `version` for `target` when `signature` verifies
/// with the trusted key (over the copy, so what is stored is what was checked). Refused: no key
/// trusted, a malformed version or target, a release that exists, a binary over
/// [`MAX_RELEASE_BYTES`], a store at its bounds, a signature that does not verify.
pub fn add(
    data_dir: &Path,
    binary: &Path,
    version: &str,
    target: &str,
    signature: &[u8; 64],
    now: u64,
) -> Result<StoredRelease, ReleaseStoreError> {
    release::check_version(version)?;
    release::check_target(target)?;
    let key_path = data_dir.join(KEY_FILE);
    let key = trusted_key(data_dir)?.ok_or(ReleaseStoreError::NoKey { path: key_path })?;
    let exists = || ReleaseStoreError::Exists { version: version.to_string(), target: target.to_string() };
    match find(data_dir, version, target) {
        Ok(None) => {}
        // A damaged release of that name exists too: it must be removed first.
        Ok(Some(_)) | Err(ReleaseStoreError::Damaged { .. }) => return Err(exists()),
        Err(other) => return Err(other),
    }
    let length = fs::metadata(binary).map_err(io_error(binary))?.len();
    if length > MAX_RELEASE_BYTES {
        return Err(ReleaseError::TooLarge { version: version.to_string() }.into());
    }
    let entries = scan(data_dir)?;
    if entries.len() >= MAX_RELEASES {
        return Err(ReleaseStoreError::Full(format!(
            "it holds {} releases, the most it keeps is {MAX_RELEASES}; remove one with `pce release remove`",
            entries.len()
        )));
    }
    let stored: u64 = entries.iter().map(|e| e.bytes).sum();
    if stored + length > MAX_STORED_BYTES {
        return Err(ReleaseStoreError::Full(format!(
            "{stored} bytes stored and {length} more would exceed {MAX_STORED_BYTES}; remove a release first"
        )));
    }

    let target_dir = dir(data_dir).join(target);
    fs::DirBuilder::new().recursive(true).mode(0o700).create(&target_dir).map_err(io_error(&target_dir))?;
    sweep_abandoned(&target_dir);
    let temp = target_dir.join(format!(".{version}.tmp-{}", random_suffix()));
    fs::DirBuilder::new().mode(0o700).create(&temp).map_err(io_error(&temp))?;
    let result = (|| {
        let manifest = copy_binary(binary, &temp.join(BINARY_FILE), version, target)?;
        manifest.verify_signature(signature, &key)?;
        let stored = StoredRelease { manifest, signature: *signature, added_at: now };
        let manifest_path = temp.join(MANIFEST_FILE);
        let mut file = create_new(&manifest_path)?;
        file.write_all(render_manifest(&stored).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_error(&manifest_path))?;
        File::open(&temp).and_then(|d| d.sync_all()).map_err(io_error(&temp))?;
        let final_dir = target_dir.join(version);
        // rename(2) onto an existing non-empty directory fails: a concurrent add loses here.
        fs::rename(&temp, &final_dir).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists | io::ErrorKind::DirectoryNotEmpty => exists(),
            _ => ReleaseStoreError::Io { path: final_dir.clone(), source: e },
        })?;
        File::open(&target_dir).and_then(|d| d.sync_all()).map_err(io_error(&target_dir))?;
        Ok(stored)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&temp);
    }
    result
}

fn create_new(path: &Path) -> Result<File, ReleaseStoreError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(io_error(path))
}

/// Copies `from` to the new file `to` (at most [`MAX_RELEASE_BYTES`]), fsynced; the manifest of
/// the copy, read back from it.
fn copy_binary(from: &Path, to: &Path, version: &str, target: &str) -> Result<Manifest, ReleaseStoreError> {
    let source = File::open(from).map_err(io_error(from))?;
    let mut copy = create_new(to)?;
    let copied = io::copy(&mut source.take(MAX_RELEASE_BYTES + 1), &mut copy).map_err(io_error(to))?;
    if copied > MAX_RELEASE_BYTES {
        return Err(ReleaseError::TooLarge { version: version.to_string() }.into());
    }
    copy.sync_all().map_err(io_error(to))?;
    drop(copy);
    let mut written = File::open(to).map_err(io_error(to))?;
    Ok(Manifest::of_reader(version, target, &mut written)?)
}

/// A temporary directory older than this was left by an add that crashed (an add takes
/// seconds): it is removed by the next add for the same target.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the `.VERSION.tmp-*` directories of crashed adds in `target_dir` (never read, never
/// counted, but they hold disk); one of a concurrent add is younger and stays.
fn sweep_abandoned(target_dir: &Path) {
    let Ok(entries) = fs::read_dir(target_dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with('.') && name.contains(".tmp-")) {
            continue;
        }
        let age = entry.metadata().and_then(|m| m.modified()).ok().and_then(|at| at.elapsed().ok());
        if age.is_some_and(|age| age >= ABANDONED_AFTER) {
            log::info!("removing {}, left by an interrupted `pce release add`", entry.path().display());
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn random_suffix() -> String {
    let mut random = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).is_err() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        random = (now.as_nanos() as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    release::hex(&random)
}

/// Removes release `version` for `target` (renamed away first, so it is never served half
/// removed).
pub fn remove(data_dir: &Path, version: &str, target: &str) -> Result<(), ReleaseStoreError> {
    release::check_version(version)?;
    release::check_target(target)?;
    let target_dir = dir(data_dir).join(target);
    let release_dir = target_dir.join(version);
    let doomed = target_dir.join(format!(".{version}.removed-{}", random_suffix()));
    fs::rename(&release_dir, &doomed).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => {
            ReleaseStoreError::NotFound { version: version.to_string(), target: target.to_string() }
        }
        _ => ReleaseStoreError::Io { path: release_dir.clone(), source: e },
    })?;
    File::open(&target_dir).and_then(|d| d.sync_all()).map_err(io_error(&target_dir))?;
    fs::remove_dir_all(&doomed).map_err(io_error(&doomed))?;
    // An empty target directory goes too (a failure leaves only an empty directory).
    let _ = fs::remove_dir(&target_dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::scratch_dir;
    use ring::rand::SystemRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair as _};

    const TARGET: &str = "x86_64-unknown-linux-gnu";

    fn key_pair() -> Ed25519KeyPair {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
    }

    fn sign(pair: &Ed25519KeyPair, bytes: &[u8], version: &str, target: &str) -> [u8; 64] {
        let manifest = Manifest::of_reader(version, target, &mut &bytes[..]).unwrap();
        let mut signature = [0u8; 64];
        signature.copy_from_slice(pair.sign(&manifest.signed_message()).as_ref());
        signature
    }

    fn sample() -> StoredRelease {
        StoredRelease {
            manifest: Manifest {
                version: "1.2.0-rc.1".into(),
                target: TARGET.into(),
                length: 42,
                sha256: [0xab; 32],
            },
            signature: [0x01; 64],
            added_at: 1_795_780_800,
        }
    }

    #[test]
    fn an_add_sweeps_what_crashed_adds_left_but_not_a_running_one() {
        let dir = scratch_dir("releases-sweep");
        let target_dir = dir.join(DIR_NAME).join(TARGET);
        let (stale, fresh) = (target_dir.join(".1.0.0.tmp-aa"), target_dir.join(".1.0.1.tmp-bb"));
        for temp in [&stale, &fresh] {
            fs::create_dir_all(temp).unwrap();
            fs::write(temp.join(BINARY_FILE), b"half a copy").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - 2 * ABANDONED_AFTER;
        File::open(&stale).unwrap().set_modified(two_hours_ago).unwrap();
        sweep_abandoned(&target_dir);
        assert!(!stale.exists(), "left by a crash long ago");
        assert!(fresh.exists(), "an add may be writing it now");
    }

    #[test]
    fn a_manifest_reads_back_and_anything_else_is_refused() {
        let text = render_manifest(&sample());
        assert_eq!(parse_manifest(text.as_bytes()), Ok(sample()));
        let bad = [
            String::new(),
            text.trim_end().to_string(),
            text.replace("ven-release-manifest-v1", "ven-release-manifest-v2"),
            text.replace("version 1.2.0-rc.1", "version ../../etc"),
            text.replace("version 1.2.0-rc.1", "version  1.2.0"),
            text.replace("target x86_64", "target X86_64"),
            text.replace("length 42", "length 042"),
            text.replace("length 42", "length -1"),
            text.replace("length 42", &format!("length {}", MAX_RELEASE_BYTES + 1)),
            text.replace("length 42", "length 99999999999999999999999"),
            text.replace(&"ab".repeat(32), &"AB".repeat(32)),
            text.replace(&"ab".repeat(32), &"ab".repeat(31)),
            text.replace(&"01".repeat(64), &"01".repeat(63)),
            text.replace("added-at 1795780800", "added-at x"),
            text.replace("length 42\n", ""),
            text.replace("length 42\nsha256", "sha256"),
            format!("{text}extra 1\n"),
            text.replace('\n', "\r\n"),
            format!("{text}{}", " ".repeat(MAX_MANIFEST_BYTES)),
        ];
        for (i, bad) in bad.iter().enumerate() {
            assert!(parse_manifest(bad.as_bytes()).is_err(), "case {i}: {bad:?}");
        }
        assert!(parse_manifest(&[0xff, 0xfe]).is_err());
        // Every prefix is refused and none panics.
        for end in 0..text.len() {
            assert!(parse_manifest(&text.as_bytes()[..end]).is_err(), "prefix of {end} bytes");
            fuzz_manifest(&text.as_bytes()[..end]);
        }
        fuzz_manifest(text.as_bytes());
    }

    #[test]
    fn a_release_is_added_only_with_a_trusted_key_and_a_good_signature() {
        let dir = scratch_dir("releases-add");
        let pair = key_pair();
        let bytes = b"\x7fELF a release".to_vec();
        let binary = dir.join("ven");
        fs::write(&binary, &bytes).unwrap();
        let signature = sign(&pair, &bytes, "1.0.0", TARGET);
        assert!(matches!(
            add(&dir, &binary, "1.0.0", TARGET, &signature, 1),
            Err(ReleaseStoreError::NoKey { .. })
        ));
        let public = release::hex(pair.public_key().as_ref());
        trust_key(&dir, &public, false).unwrap();
        let other = release::hex(key_pair().public_key().as_ref());
        assert!(matches!(trust_key(&dir, &other, false), Err(ReleaseStoreError::KeyExists { .. })));
        assert_eq!(trusted_key(&dir).unwrap().map(|k| release::hex(&k)), Some(public.clone()));

        let wrong = sign(&key_pair(), &bytes, "1.0.0", TARGET);
        let refused = add(&dir, &binary, "1.0.0", TARGET, &wrong, 1);
        assert!(
            matches!(refused, Err(ReleaseStoreError::Release(ReleaseError::Signature { .. }))),
            "{refused:?}"
        );
        let other_version = add(&dir, &binary, "1.0.1", TARGET, &signature, 1);
        assert!(matches!(other_version, Err(ReleaseStoreError::Release(ReleaseError::Signature { .. }))));
        assert!(scan(&dir).unwrap().is_empty(), "nothing refused is stored");
        let leftovers = fs::read_dir(dir.join(DIR_NAME).join(TARGET)).unwrap().count();
        assert_eq!(leftovers, 0, "no temporary directory is left behind");
        assert!(matches!(
            add(&dir, &binary, "../x", TARGET, &signature, 1),
            Err(ReleaseStoreError::Release(_))
        ));
        assert!(matches!(
            add(&dir, &binary, "1.0.0", "x86", &signature, 1),
            Err(ReleaseStoreError::Release(_))
        ));

        let stored = add(&dir, &binary, "1.0.0", TARGET, &signature, 7).unwrap();
        assert_eq!((stored.manifest.length, stored.added_at), (bytes.len() as u64, 7));
        assert!(matches!(
            add(&dir, &binary, "1.0.0", TARGET, &signature, 8),
            Err(ReleaseStoreError::Exists { .. })
        ));
        let (read_back, served) = read(&dir, "1.0.0", TARGET).unwrap();
        assert_eq!((read_back, served), (stored, bytes.clone()));
        assert_eq!(targets_of(&dir, "1.0.0").unwrap(), vec![TARGET.to_string()]);
        assert!(targets_of(&dir, "2.0.0").unwrap().is_empty());

        // A byte flipped on disk: refused as altered, not served.
        let on_disk = dir.join(DIR_NAME).join(TARGET).join("1.0.0").join(BINARY_FILE);
        let mut altered = bytes.clone();
        altered[3] ^= 0x20;
        fs::write(&on_disk, &altered).unwrap();
        let refused = read(&dir, "1.0.0", TARGET);
        assert!(matches!(refused, Err(ReleaseStoreError::Altered { .. })), "{refused:?}");
        assert!(refused.unwrap_err().to_string().contains("in the PCE's store is altered"));
        fs::write(&on_disk, &bytes[..bytes.len() - 1]).unwrap();
        assert!(matches!(read(&dir, "1.0.0", TARGET), Err(ReleaseStoreError::Altered { .. })));
        assert!(matches!(read(&dir, "9.0.0", TARGET), Err(ReleaseStoreError::NotFound { .. })));

        remove(&dir, "1.0.0", TARGET).unwrap();
        assert!(matches!(remove(&dir, "1.0.0", TARGET), Err(ReleaseStoreError::NotFound { .. })));
        assert!(scan(&dir).unwrap().is_empty());
        trust_key(&dir, &other, true).unwrap();
        assert_eq!(trusted_key(&dir).unwrap().map(|k| release::hex(&k)), Some(other));
    }

    #[test]
    fn the_store_refuses_beyond_its_bounds() {
        let dir = scratch_dir("releases-bounds");
        let pair = key_pair();
        trust_key(&dir, &release::hex(pair.public_key().as_ref()), false).unwrap();
        let binary = dir.join("ven");
        fs::write(&binary, b"small").unwrap();
        for n in 0..MAX_RELEASES {
            let version = format!("1.0.{n}");
            add(&dir, &binary, &version, TARGET, &sign(&pair, b"small", &version, TARGET), 1).unwrap();
        }
        let one_more = add(&dir, &binary, "2.0.0", TARGET, &sign(&pair, b"small", "2.0.0", TARGET), 1);
        assert!(matches!(&one_more, Err(ReleaseStoreError::Full(why)) if why.contains("32")), "{one_more:?}");
        assert_eq!(scan(&dir).unwrap().len(), MAX_RELEASES);

        // Bytes: stored binaries count by their size on disk (sparse stand-ins).
        let dir = scratch_dir("releases-bytes");
        trust_key(&dir, &release::hex(pair.public_key().as_ref()), false).unwrap();
        fs::write(binary_in(&dir), b"small").unwrap();
        add(&dir, &binary_in(&dir), "1.0.0", TARGET, &sign(&pair, b"small", "1.0.0", TARGET), 1).unwrap();
        let on_disk = dir.join(DIR_NAME).join(TARGET).join("1.0.0").join(BINARY_FILE);
        File::options().write(true).open(&on_disk).unwrap().set_len(MAX_STORED_BYTES - 2).unwrap();
        let full = add(&dir, &binary_in(&dir), "1.0.1", TARGET, &sign(&pair, b"small", "1.0.1", TARGET), 1);
        assert!(matches!(&full, Err(ReleaseStoreError::Full(why)) if why.contains("exceed")), "{full:?}");

        // A binary over the size cap is refused before anything is copied.
        let huge = dir.join("huge");
        File::create(&huge).unwrap().set_len(MAX_RELEASE_BYTES + 1).unwrap();
        let refused = add(&dir, &huge, "3.0.0", TARGET, &[0; 64], 1);
        assert!(
            matches!(refused, Err(ReleaseStoreError::Release(ReleaseError::TooLarge { .. }))),
            "{refused:?}"
        );
    }

    fn binary_in(dir: &Path) -> PathBuf {
        dir.join("ven")
    }

    #[test]
    fn a_damaged_manifest_is_listed_as_such_and_never_served() {
        let dir = scratch_dir("releases-damaged");
        let release_dir = dir.join(DIR_NAME).join(TARGET).join("1.0.0");
        fs::create_dir_all(&release_dir).unwrap();
        fs::write(release_dir.join(BINARY_FILE), b"x").unwrap();
        fs::write(release_dir.join(MANIFEST_FILE), b"ven-release-manifest-v1\nversion 1.0.0\n").unwrap();
        // A manifest naming another release than its directory.
        let other = dir.join(DIR_NAME).join(TARGET).join("2.0.0");
        fs::create_dir_all(&other).unwrap();
        fs::write(
            other.join(MANIFEST_FILE),
            render_manifest(&StoredRelease {
                manifest: Manifest { version: "3.0.0".into(), ..sample().manifest },
                ..sample()
            }),
        )
        .unwrap();
        fs::create_dir_all(dir.join(DIR_NAME).join(TARGET).join(".1.0.0.tmp-00")).unwrap();
        fs::write(dir.join(DIR_NAME).join("orders.json"), b"{}").unwrap();
        let entries = scan(&dir).unwrap();
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert!(entries.iter().all(|e| matches!(e.release, Err(ReleaseStoreError::Damaged { .. }))));
        assert!(matches!(read(&dir, "1.0.0", TARGET), Err(ReleaseStoreError::Damaged { .. })));
        assert!(matches!(read(&dir, "2.0.0", TARGET), Err(ReleaseStoreError::Damaged { .. })));
        assert!(targets_of(&dir, "1.0.0").unwrap().is_empty());
    }
}
