//! The lab's private scratch directory (data dirs of the PCE and agents, logs), removed on drop
//! unless asked to keep it for debugging.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// How many names are tried before giving up (collisions only come from stale directories).
const MAX_ATTEMPTS: u32 = 100;

pub struct Workdir {
    path: PathBuf,
    keep: bool,
}

impl Workdir {
    /// Creates `<parent>/<prefix>-<pid>-<n>`, mode 0700, with a fresh name.
    pub fn create(parent: &Path, prefix: &str) -> io::Result<Self> {
        let mut last = None;
        for attempt in 0..MAX_ATTEMPTS {
            let path = parent.join(format!("{prefix}-{}-{attempt}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Self { path, keep: false }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no attempt made")))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leave the directory in place on drop.
    pub fn keep(&mut self, keep: bool) {
        self.keep = keep;
    }

    pub fn is_kept(&self) -> bool {
        self.keep
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A fresh scratch directory for one test, `<tmp>/ven-<name>-<pid>-<n>`, removed on drop.
/// Panics when it cannot be made (a test cannot run without it).
pub fn scratch(name: &str) -> Workdir {
    Workdir::create(&std::env::temp_dir(), &format!("ven-{name}"))
        .unwrap_or_else(|e| panic!("cannot make a scratch directory for {name}: {e}"))
}

/// A small tmpfs mounted on a scratch directory, for full-disk tests; unmounted on drop.
pub struct Tmpfs {
    dir: Workdir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as mount's `size=` option: `64k`, `3m`). `None`, said loudly,
    /// when it cannot be mounted here (not root); under CI that is a failure.
    pub fn mount(name: &str, size: &str) -> Option<Tmpfs> {
        let dir = scratch(name);
        let why = if !nix::unistd::geteuid().is_root() {
            "not root".to_owned()
        } else {
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "tmpfs"])
                .arg(dir.path())
                .status();
            match status {
                Ok(status) if status.success() => return Some(Tmpfs { dir }),
                Ok(status) => format!("mount -t tmpfs failed: {status}"),
                Err(e) => format!("cannot run mount: {e}"),
            }
        };
        if std::env::var_os("CI").is_some() {
            panic!("{name} cannot run under CI: it needs a tmpfs mount: {why}");
        }
        eprintln!("SKIPPED: {name} needs a tmpfs mount: {why}");
        None
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_private_and_removed_unless_kept() {
        let a = Workdir::create(&std::env::temp_dir(), "ven-lab-wd-test").unwrap();
        let b = Workdir::create(&std::env::temp_dir(), "ven-lab-wd-test").unwrap();
        assert_ne!(a.path(), b.path());
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(a.path().join("f"), "x").unwrap();
        let (pa, pb) = (a.path().to_path_buf(), b.path().to_path_buf());
        let mut b = b;
        b.keep(true);
        drop(a);
        drop(b);
        assert!(!pa.exists());
        assert!(pb.exists());
        std::fs::remove_dir_all(pb).unwrap();
    }
}
