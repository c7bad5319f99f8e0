//! Files replaced whole and safely: a crash leaves the old content or the new, and a local user
//! who can write to the directory cannot make us write through a link or into a file they made
//! (the temporary file has a random name and is created exclusively, without following links).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why a data directory is unsafe: another local user could change what the PCE reads or make it
/// write elsewhere (it holds the CA key, the admin key and every agent's credentials).
pub fn check_private(root: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    let root = fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;
    for (depth, dir) in root.ancestors().enumerate() {
        let meta = fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mode = meta.mode();
        if meta.uid() != me && meta.uid() != 0 {
            return Err(format!("{} is owned by user {}, not by this one ({me})", dir.display(), meta.uid()));
        }
        if depth == 0 && mode & 0o022 != 0 {
            return Err(format!(
                "{} is writable by group or others (mode {:o}): chmod go-w it",
                dir.display(),
                mode & 0o7777
            ));
        }
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err(format!(
                "{} is writable by everyone (mode {:o}): chmod o-w it",
                dir.display(),
                mode & 0o7777
            ));
        }
    }
    Ok(())
}

/// `.NAME.tmp-RANDOM` beside `path`.
fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut random = [0u8; 8];
    // Without the system RNG the name is still unique per process and time; O_EXCL keeps it safe.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).is_err() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        random = (now.as_nanos() as u64 ^ u64::from(std::process::id())).to_le_bytes();
    }
    let random: String = random.iter().map(|b| format!("{b:02x}")).collect();
    path.with_file_name(format!(".{name}.tmp-{random}"))
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new content: write a
/// temporary file with `mode`, fsync it, rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    replace_file(path, mode, |file| file.write_all(bytes))?;
    sync_parent(path)
}

/// Writes what `write` produces into a temporary file with `mode`, fsyncs it and renames it over
/// `path`: a crash leaves the old file or the new one, whole. The rename is durable only once
/// the directory is synced ([`sync_parent`]).
pub fn replace_file<T>(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&mut File) -> io::Result<T>,
) -> io::Result<T> {
    let tmp = temp_path(path);
    // A new file of our own: never one planted in our place (O_EXCL), never through a link
    // (O_NOFOLLOW). A name taken by chance or by someone else is an error, not a target.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .mode(mode)
        .open(&tmp)?;
    let result = (|| {
        let written = write(&mut file)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        Ok(written)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Syncs the directory holding `path`, so that a rename into it survives a crash.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// A fresh directory under the system temp dir, removed on drop.
#[cfg(test)]
pub(crate) struct ScratchDir(PathBuf);

#[cfg(test)]
pub(crate) fn scratch_dir(name: &str) -> ScratchDir {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("pce-unit-{name}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create scratch dir");
    ScratchDir(dir)
}

#[cfg(test)]
impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planted_link_is_not_followed_and_the_target_is_replaced_whole() {
        let dir = scratch_dir("fsutil");
        let victim = dir.join("victim");
        fs::write(&victim, b"precious").unwrap();
        let path = dir.join("state");
        fs::write(&path, b"old").unwrap();
        // Whatever temp name an attacker guesses, it is not ours: plant links at the old fixed
        // name; the write goes to a fresh random name and the victim is untouched.
        std::os::unix::fs::symlink(&victim, dir.join("state.tmp")).unwrap();
        write_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        let leftovers: Vec<_> = fs::read_dir(&*dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "no temp file is left behind");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_data_directory_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch_dir("fsutil-private");
        let data = dir.join("data");
        fs::create_dir(&data).unwrap();
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
        check_private(&data).expect("0700 under a sticky /tmp is fine");
        fs::set_permissions(&data, fs::Permissions::from_mode(0o770)).unwrap();
        assert!(check_private(&data).unwrap_err().contains("chmod go-w"));
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(&*dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check_private(&data).unwrap_err().contains("writable by everyone"));
        fs::set_permissions(&*dir, fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temp() {
        let dir = scratch_dir("fsutil-fail");
        let path = dir.join("state");
        fs::write(&path, b"old").unwrap();
        let failed = replace_file(&path, 0o600, |_| -> io::Result<()> { Err(io::Error::other("disk full")) });
        assert!(failed.is_err());
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(&*dir).unwrap().count(), 1);
    }
}
