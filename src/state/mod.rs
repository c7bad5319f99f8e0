//! The data directory ($VEN_DATA_DIR, default /var/lib/ven) and the records kept in it.
//!
//! Every record is written atomically (temp file, fsync, rename, fsync of the directory) and
//! carries a checksum, so a crash or a torn write leaves either the old record or the new one,
//! and a damaged file is reported as corrupt instead of being half-read.
//!
//! ```text
//! state/identity   pairing with the PCE (0600: holds the agent token)
//! state/policy     the last-known-good policy, applied at boot before the PCE is contacted
//! state/status     what `ven status` shows while the agent is stopped
//! agent.sock       the running agent's control socket (root only)
//! log/             application logs and flow stores, size-capped (crate::logdir)
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Default data directory when VEN_DATA_DIR is not set.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/ven";
/// Largest record we read back; anything bigger is corrupt by definition.
const MAX_RECORD_BYTES: u64 = 32 * 1024 * 1024;
const MAGIC: &[u8; 4] = b"VENR";
const FORMAT_VERSION: u8 = 1;
const CHECKSUM_BYTES: usize = 8;
const HEADER_BYTES: usize = MAGIC.len() + 2 + 4;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {path}: {cause}")]
    Read { path: PathBuf, cause: io::Error },
    #[error("cannot write {path}: {cause}")]
    Write { path: PathBuf, cause: io::Error },
    #[error("{path} is corrupt ({why}); it was left in place for inspection")]
    Corrupt { path: PathBuf, why: String },
    /// Another user could replace what the agent reads or make it write elsewhere.
    #[error("refusing to use the data directory: {path} {why}")]
    Unsafe { path: PathBuf, why: String },
}

/// The kinds of record, so that one file can never be read back as another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    Identity = 1,
    Policy = 2,
    Status = 3,
    /// The host's firewall as it was at activation ([`crate::firewall::Snapshot`]).
    SavedFirewall = 4,
    Suspended = 5,
    /// The clone token the PCE handed out last (issue 16, `agent::clone_token`).
    CloneToken = 6,
    /// The PCE said this copy of the agent is a suspected clone ([`CloneSuspicion`]).
    CloneSuspected = 7,
    /// Where a self-upgrade stands ([`crate::agent::upgrade::UpgradeRecord`]).
    Upgrade = 8,
    /// The release key pinned at activation (32 bytes, Ed25519 public key).
    ReleaseKey = 9,
}

/// Paths inside one agent's data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory named by VEN_DATA_DIR, or [`DEFAULT_DATA_DIR`].
    pub fn from_env() -> Self {
        Self::new(
            std::env::var_os("VEN_DATA_DIR").map(PathBuf::from).unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
        )
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    pub fn identity_path(&self) -> PathBuf {
        self.state_dir().join("identity")
    }

    pub fn policy_path(&self) -> PathBuf {
        self.state_dir().join("policy")
    }

    pub fn status_path(&self) -> PathBuf {
        self.state_dir().join("status")
    }

    /// The pre-activation firewall, for `deactivate --firewall saved`.
    pub fn saved_firewall_path(&self) -> PathBuf {
        self.state_dir().join("firewall-saved")
    }

    /// Present while the VEN is suspended ([`Suspension`]).
    pub fn suspended_path(&self) -> PathBuf {
        self.state_dir().join("suspended")
    }

    /// Present while `ven restart` (or an upgrade) restarts the agent: the stopping agent's
    /// goodbye then says "restart", which the PCE does not take as the workload leaving.
    pub fn restarting_path(&self) -> PathBuf {
        self.state_dir().join("restarting")
    }

    /// Application logs and flow stores ([`crate::logdir`]).
    /// The clone token the PCE handed out last (see `agent::clone_token`).
    pub fn clone_token_path(&self) -> PathBuf {
        self.state_dir().join("clone-token")
    }

    /// Present while the PCE takes this copy of the agent for a clone ([`CloneSuspicion`]).
    pub fn clone_suspected_path(&self) -> PathBuf {
        self.state_dir().join("clone-suspected")
    }

    /// Where a self-upgrade stands (issue 16, [`crate::agent::upgrade`]).
    pub fn upgrade_path(&self) -> PathBuf {
        self.state_dir().join("upgrade")
    }

    /// The release key `ven activate --release-key` pinned.
    pub fn release_key_path(&self) -> PathBuf {
        self.state_dir().join("release-key")
    }

    pub fn log_dir(&self) -> PathBuf {
        self.root.join("log")
    }

    pub fn socket_path(&self) -> PathBuf {
        self.root.join("agent.sock")
    }

    /// Creates the directory tree (mode 0700) if it is missing, and checks that no other user
    /// can change it ([`check_private`]).
    pub fn ensure(&self) -> Result<(), StateError> {
        for dir in [self.state_dir(), self.log_dir()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|cause| StateError::Write { path: dir, cause })?;
        }
        check_private(&self.root)
    }
}

/// Refuses a data directory that another local user could tamper with: the directory itself
/// writable by group or others, or it or any parent owned by another user (root excepted) or
/// writable by everyone without the sticky bit (which keeps `/tmp` usable). Such a user could
/// plant links where the agent writes (the agent runs as root) or swap its records.
pub fn check_private(root: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let unsafe_dir = |path: &Path, why: String| StateError::Unsafe { path: path.to_path_buf(), why };
    let root =
        fs::canonicalize(root).map_err(|cause| StateError::Read { path: root.to_path_buf(), cause })?;
    for (depth, dir) in root.ancestors().enumerate() {
        let meta = fs::metadata(dir).map_err(|cause| StateError::Read { path: dir.to_path_buf(), cause })?;
        let mode = meta.mode();
        if meta.uid() != me && meta.uid() != 0 {
            return Err(unsafe_dir(dir, format!("is owned by user {}, not by this one ({me})", meta.uid())));
        }
        if depth == 0 && mode & 0o022 != 0 {
            return Err(unsafe_dir(
                dir,
                format!("is writable by group or others (mode {:o}): chmod go-w it", mode & 0o7777),
            ));
        }
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err(unsafe_dir(
                dir,
                format!("is writable by everyone (mode {:o}): chmod o-w it", mode & 0o7777),
            ));
        }
    }
    Ok(())
}

impl DataDir {}

/// Writes `value` to `path` atomically with the given file mode.
pub fn write_record<T: Serialize>(
    path: &Path,
    kind: RecordKind,
    value: &T,
    mode: u32,
) -> Result<(), StateError> {
    let payload = postcard::to_allocvec(value).map_err(|e| StateError::Write {
        path: path.to_path_buf(),
        cause: io::Error::new(io::ErrorKind::InvalidData, e),
    })?;
    write_atomically(path, &frame_record(kind, &payload), mode)
        .map_err(|cause| StateError::Write { path: path.to_path_buf(), cause })
}

/// The bytes of a record file holding `payload` (postcard) of `kind`: header, payload, checksum.
/// Public for the fuzz targets that reach the payload decoders past the checksum.
#[doc(hidden)]
pub fn frame_record(kind: RecordKind, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_BYTES + payload.len() + CHECKSUM_BYTES);
    bytes.extend_from_slice(MAGIC);
    bytes.push(FORMAT_VERSION);
    bytes.push(kind as u8);
    // A payload over 4 GiB gets a wrong length, which decode_record reports as a mismatch.
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(payload);
    let checksum = checksum(&bytes);
    bytes.extend_from_slice(&checksum);
    bytes
}

/// Reads a record; `Ok(None)` when the file does not exist.
pub fn read_record<T: DeserializeOwned>(path: &Path, kind: RecordKind) -> Result<Option<T>, StateError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(cause) => return Err(StateError::Read { path: path.to_path_buf(), cause }),
    };
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, MAX_RECORD_BYTES + 1), &mut bytes)
        .map_err(|cause| StateError::Read { path: path.to_path_buf(), cause })?;
    decode_record(&bytes, kind).map(Some).map_err(|why| StateError::Corrupt { path: path.to_path_buf(), why })
}

/// Decodes the bytes of a record file (public for the fuzz target).
pub fn decode_record<T: DeserializeOwned>(bytes: &[u8], kind: RecordKind) -> Result<T, String> {
    if bytes.len() as u64 > MAX_RECORD_BYTES {
        return Err("larger than any record".into());
    }
    if bytes.len() < HEADER_BYTES + CHECKSUM_BYTES || &bytes[..4] != MAGIC {
        return Err("not a ven record".into());
    }
    let (body, stored_checksum) = bytes.split_at(bytes.len() - CHECKSUM_BYTES);
    if checksum(body) != stored_checksum {
        return Err("checksum mismatch".into());
    }
    if body[4] != FORMAT_VERSION {
        return Err(format!("unknown format version {}", body[4]));
    }
    if body[5] != kind as u8 {
        return Err(format!("record kind {} where {} was expected", body[5], kind as u8));
    }
    let len = u32::from_le_bytes([body[6], body[7], body[8], body[9]]) as usize;
    let payload = &body[HEADER_BYTES..];
    if payload.len() != len {
        return Err("length mismatch".into());
    }
    postcard::from_bytes(payload).map_err(|e| format!("undecodable payload: {e}"))
}

fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_BYTES] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; CHECKSUM_BYTES];
    out.copy_from_slice(&digest.as_ref()[..CHECKSUM_BYTES]);
    out
}

/// Temp file in the same directory, fsync, rename over the target, fsync the directory.
///
/// The temp file, `.NAME.tmp-PID-RANDOM`, is created exclusively and without following links:
/// a link or file planted there by someone else makes the write fail rather than go through it.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("record");
    let mut random = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random)
        .map_err(|_| io::Error::other("the system random number generator failed"))?;
    let random: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let temp = dir.join(format!(".{file_name}.tmp-{}-{random}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .mode(mode)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Removes a record; a missing file is not an error.
pub fn remove_record(path: &Path) -> Result<(), StateError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(StateError::Write { path: path.to_path_buf(), cause: e })
        }
        _ => Ok(()),
    }
}

/// The agent's pairing with a PCE.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub agent_id: u64,
    pub agent_token: String,
    /// The name this VEN was activated with.
    pub hostname: String,
    /// `HOST:PORT` of the VEN API.
    pub management_server: String,
    pub event_port: u16,
    /// The PCE's CA certificate (DER): the only trust anchor for both channels.
    pub ca_cert_der: Vec<u8>,
    pub heartbeat_interval_s: u32,
    pub activated_at: u64,
}

/// What `ven status` shows of a stopped agent, saved when it stops and after each apply.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedStatus {
    pub last_heartbeat: Option<u64>,
    pub last_apply_error: Option<String>,
    /// Times the firewall was found tampered with and repaired, since activation.
    pub tamper_count: u64,
    /// When the last tampering was found, and what differed.
    pub last_tamper: Option<(u64, String)>,
}

/// The PCE refused this copy of the agent as a suspected clone (issue 16): another live copy of
/// the data directory holds the workload. The agent keeps its last-known-good policy and takes
/// nothing new until it is re-paired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSuspicion {
    pub since: u64,
    /// The PCE's words.
    pub message: String,
}

/// The record of a suspended VEN (the spec's `suspend`): the firewall holds nothing of ours and
/// the agent does no work but wait for `unsuspend`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    pub since: u64,
    /// The policy state in force when it was suspended (unsuspend restores the last-known-good
    /// policy, whose state the PCE may have changed meanwhile).
    pub previous_state: Option<ven_proto::PolicyState>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ven-state-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_planted_link_at_the_temp_name_is_never_written_through() {
        let dir = temp_dir("planted");
        let victim = dir.join("victim");
        fs::write(&victim, b"root's file").unwrap();
        // The old, predictable name: a link there is no longer where the agent writes.
        std::os::unix::fs::symlink(&victim, dir.join(format!(".status.tmp-{}", std::process::id()))).unwrap();
        write_atomically(&dir.join("status"), b"new", 0o600).unwrap();
        assert_eq!(fs::read(dir.join("status")).unwrap(), b"new");
        assert_eq!(fs::read(&victim).unwrap(), b"root's file");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_data_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("unsafe");
        let data = DataDir::new(dir.join("data"));
        data.ensure().expect("a fresh 0700 directory under /tmp (sticky) is fine");
        fs::set_permissions(dir.join("data"), fs::Permissions::from_mode(0o777)).unwrap();
        let refused = data.ensure().unwrap_err();
        assert!(
            matches!(&refused, StateError::Unsafe { why, .. } if why.contains("chmod go-w")),
            "{refused}"
        );
        fs::set_permissions(dir.join("data"), fs::Permissions::from_mode(0o700)).unwrap();
        // A parent everyone can write to, without the sticky bit.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let refused = data.ensure().unwrap_err();
        assert!(matches!(&refused, StateError::Unsafe { why, .. } if why.contains("everyone")), "{refused}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777)).unwrap();
        data.ensure().expect("a sticky world-writable parent, like /tmp, is fine");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn records_round_trip_with_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("roundtrip");
        let path = dir.join("status");
        let status = SavedStatus {
            last_heartbeat: Some(5),
            last_apply_error: Some("boom".into()),
            ..SavedStatus::default()
        };
        write_record(&path, RecordKind::Status, &status, 0o600).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_record::<SavedStatus>(&path, RecordKind::Status).unwrap(), Some(status));
        assert_eq!(read_record::<SavedStatus>(&dir.join("missing"), RecordKind::Status).unwrap(), None);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn damaged_or_foreign_records_are_corrupt_not_misread() {
        let dir = temp_dir("corrupt");
        let path = dir.join("status");
        write_record(&path, RecordKind::Status, &SavedStatus::default(), 0o600).unwrap();
        let good = fs::read(&path).unwrap();

        let mut flipped = good.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x40;
        fs::write(&path, &flipped).unwrap();
        assert!(matches!(
            read_record::<SavedStatus>(&path, RecordKind::Status),
            Err(StateError::Corrupt { .. })
        ));

        fs::write(&path, &good[..good.len() - 3]).unwrap();
        assert!(matches!(
            read_record::<SavedStatus>(&path, RecordKind::Status),
            Err(StateError::Corrupt { .. })
        ));

        fs::write(&path, &good).unwrap();
        let as_policy = read_record::<ven_proto::Policy>(&path, RecordKind::Policy);
        assert!(matches!(as_policy, Err(StateError::Corrupt { .. })), "{as_policy:?}");
        fs::remove_dir_all(dir).unwrap();
    }
}
