//! Finding the real `ven` and `pce` executables the lab drives.
//!
//! Order: the environment variable (`VEN_BIN`, `PCE_BIN`), then the directory of the running
//! executable, then its parent. That covers `target/<profile>/ven-lab` (binaries side by side) and
//! test executables, which live in `target/<profile>/deps` one level below the binaries.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("{var}={path} does not name an executable file")]
    BadOverride { var: &'static str, path: PathBuf },
    #[error(
        "cannot find the `{name}` binary (looked in: {looked}); run `cargo build --workspace --bins` \
         first, or point {var} at it"
    )]
    NotFound { name: &'static str, var: &'static str, looked: String },
}

/// Absolute paths of the two binaries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub ven: PathBuf,
    pub pce: PathBuf,
}

impl Binaries {
    /// Both binaries by the default search ([`locate`]).
    pub fn locate() -> Result<Self, BinaryError> {
        Ok(Self { ven: locate("ven", "VEN_BIN")?, pce: locate("pce", "PCE_BIN")? })
    }
}

/// The binaries an end-to-end test runs, or `None` (after saying why) when this machine cannot
/// run it: namespaces, `tools` (e.g. ip6tables-save) and the `pce` binary must be there. `ven`
/// is the test's own build (`env!("CARGO_BIN_EXE_ven")`) unless `VEN_BIN` names another, which
/// is said. Under `CI` a missing prerequisite panics instead: CI must not skip.
pub fn for_end_to_end_test(test: &str, own_ven: &str, tools: &[&str]) -> Option<Binaries> {
    let missing = |why: String| -> Option<Binaries> {
        if std::env::var_os("CI").is_some() {
            panic!("{test}: prerequisite missing under CI: {why}");
        }
        eprintln!("SKIPPED {test}: {why}");
        None
    };
    if let Err(why) = crate::netns::available() {
        return missing(format!("needs network namespaces: {why}"));
    }
    for tool in tools {
        if crate::netns::run("sh", &["-c", &format!("command -v {tool}")]).is_err() {
            return missing(format!("needs {tool}"));
        }
    }
    let pce = match locate("pce", "PCE_BIN") {
        Ok(pce) => pce,
        Err(e) => return missing(e.to_string()),
    };
    let ven = match std::env::var_os("VEN_BIN") {
        Some(path) => {
            eprintln!("{test}: VEN_BIN is set: testing {}", PathBuf::from(&path).display());
            PathBuf::from(path)
        }
        None => PathBuf::from(own_ven),
    };
    Some(Binaries { ven, pce })
}

/// Finds binary `name`: `$var` if set, else next to the current executable or in its parent dir.
pub fn locate(name: &'static str, var: &'static str) -> Result<PathBuf, BinaryError> {
    let exe_dir = std::env::current_exe().ok().and_then(|exe| exe.parent().map(Path::to_path_buf));
    locate_in(name, var, std::env::var_os(var).map(PathBuf::from), exe_dir.as_deref())
}

/// [`locate`] with its inputs as parameters.
pub fn locate_in(
    name: &'static str,
    var: &'static str,
    override_path: Option<PathBuf>,
    exe_dir: Option<&Path>,
) -> Result<PathBuf, BinaryError> {
    if let Some(path) = override_path {
        return match absolute_executable(&path) {
            Some(path) => Ok(path),
            None => Err(BinaryError::BadOverride { var, path }),
        };
    }
    let mut looked = Vec::new();
    if let Some(dir) = exe_dir {
        let mut candidates = vec![dir.join(name)];
        if let Some(parent) = dir.parent() {
            candidates.push(parent.join(name));
        }
        for candidate in candidates {
            if let Some(found) = absolute_executable(&candidate) {
                return Ok(found);
            }
            looked.push(candidate.display().to_string());
        }
    }
    let looked =
        if looked.is_empty() { format!("${var} unset, no executable path") } else { looked.join(", ") };
    Err(BinaryError::NotFound { name, var, looked })
}

fn absolute_executable(path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return None;
    }
    std::fs::canonicalize(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ven-lab-bin-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("debug/deps")).unwrap();
        Scratch(dir)
    }

    fn executable(path: &Path) {
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn a_test_executable_finds_binaries_one_level_up() {
        let s = scratch("up");
        executable(&s.0.join("debug/pce"));
        let found = locate_in("pce", "PCE_BIN", None, Some(&s.0.join("debug/deps"))).unwrap();
        assert_eq!(found, std::fs::canonicalize(s.0.join("debug/pce")).unwrap());
    }

    #[test]
    fn a_binary_beside_the_executable_wins() {
        let s = scratch("beside");
        executable(&s.0.join("debug/pce"));
        executable(&s.0.join("debug/deps/pce"));
        let found = locate_in("pce", "PCE_BIN", None, Some(&s.0.join("debug/deps"))).unwrap();
        assert!(found.ends_with("deps/pce"), "{}", found.display());
    }

    #[test]
    fn the_override_is_used_and_checked() {
        let s = scratch("override");
        let custom = s.0.join("my-ven");
        executable(&custom);
        let found = locate_in("ven", "VEN_BIN", Some(custom.clone()), Some(&s.0.join("debug/deps"))).unwrap();
        assert_eq!(found, std::fs::canonicalize(&custom).unwrap());
        std::fs::set_permissions(&custom, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = locate_in("ven", "VEN_BIN", Some(custom), None).unwrap_err();
        assert!(matches!(err, BinaryError::BadOverride { .. }), "{err}");
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let s = scratch("missing");
        let err = locate_in("pce", "PCE_BIN", None, Some(&s.0.join("debug/deps"))).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("cargo build --workspace --bins"), "{msg}");
        assert!(msg.contains("PCE_BIN"), "{msg}");
        assert!(msg.contains("debug/deps/pce"), "{msg}");
    }
}
