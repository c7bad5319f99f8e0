//! Which iptables implementation programs the kernel: legacy (x_tables) or nft (nf_tables).
//!
//! Rules written with the wrong one are silently without effect when the host's other rules
//! live in the other (calico #3709, tailscale #9247), so with `firewall_backend = auto` the agent
//! detects it the way Calico Felix does (`felix/environment/feature_detect_linux.go`):
//! Kubernetes' hint chains first, then whichever backend holds more rules; the legacy tools are
//! never run when `/proc/net/ip_tables_names` is absent, because running them would load the
//! legacy modules. A host with one implementation only uses that one under its plain names.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::BackendChoice;

/// Present when the legacy x_tables modules are loaded (in any namespace).
const LEGACY_TABLES_MARKER: &str = "/proc/net/ip_tables_names";
/// Chains Kubernetes components create in table `mangle` of the backend they use.
const HINT_CHAINS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

/// An iptables implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
    /// The tools under their plain names, whichever implementation they are.
    Plain,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::Nft => "nft",
            Self::Plain => "plain",
        }
    }
}

/// The programs the firewall runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tools {
    pub backend: Backend,
    pub iptables_save: PathBuf,
    pub iptables_restore: PathBuf,
    pub ip6tables_save: PathBuf,
    pub ip6tables_restore: PathBuf,
    pub ipset: PathBuf,
}

impl Tools {
    /// `iptables-save`, `iptables-restore`, ... as found in `PATH`.
    pub fn plain() -> Self {
        Self::named(Backend::Plain, "")
    }

    /// The tools of one backend (`iptables-legacy-save`, ...), or the plain names when this
    /// host does not ship the backend-specific ones.
    pub fn for_backend(backend: Backend) -> Self {
        let infix = match backend {
            Backend::Legacy => "-legacy",
            Backend::Nft => "-nft",
            Backend::Plain => return Self::plain(),
        };
        if find_in_path(&format!("iptables{infix}-restore")).is_some() {
            Self::named(backend, infix)
        } else {
            Self::plain()
        }
    }

    fn named(backend: Backend, infix: &str) -> Self {
        Self {
            backend,
            iptables_save: PathBuf::from(format!("iptables{infix}-save")),
            iptables_restore: PathBuf::from(format!("iptables{infix}-restore")),
            ip6tables_save: PathBuf::from(format!("ip6tables{infix}-save")),
            ip6tables_restore: PathBuf::from(format!("ip6tables{infix}-restore")),
            ipset: PathBuf::from("ipset"),
        }
    }

    /// Whether ip6tables can be used here (the tool exists and the kernel has IPv6 filtering).
    pub fn ipv6_usable(&self) -> bool {
        output_of(&self.ip6tables_save, &["-t", "filter"]).is_some()
    }
}

/// The tools for the configured choice; `auto` detects.
pub fn select(choice: BackendChoice) -> Tools {
    let tools = match choice {
        BackendChoice::Legacy => Tools::for_backend(Backend::Legacy),
        BackendChoice::Nft => Tools::for_backend(Backend::Nft),
        BackendChoice::Auto => Tools::for_backend(detect()),
    };
    log::debug!("iptables backend: {} ({})", tools.backend.as_str(), tools.iptables_restore.display());
    tools
}

/// Detects the backend in use on this host (in the calling thread's network namespace).
pub fn detect() -> Backend {
    let has = |name: &str| find_in_path(name).is_some();
    detect_with(
        has("iptables-legacy-save"),
        has("iptables-nft-save"),
        Path::new(LEGACY_TABLES_MARKER).exists(),
        &|program, args| output_of(Path::new(program), args),
    )
}

/// Detection with its inputs made explicit: which tools exist, whether the legacy modules are
/// loaded, and a way to run a save tool (stdout, or `None` when it fails).
pub(crate) fn detect_with(
    legacy_tools: bool,
    nft_tools: bool,
    legacy_loaded: bool,
    run: &dyn Fn(&str, &[&str]) -> Option<String>,
) -> Backend {
    match (legacy_tools, nft_tools) {
        (false, false) => return Backend::Plain,
        (true, false) => return Backend::Legacy,
        (false, true) => return Backend::Nft,
        (true, true) => {}
    }
    // INVARIANT: the legacy tools run only when the legacy modules are already loaded.
    let legacy_mangle = if legacy_loaded { run("iptables-legacy-save", &["-t", "mangle"]) } else { None };
    let nft_mangle = run("iptables-nft-save", &["-t", "mangle"]);
    for hint in HINT_CHAINS {
        let declared = |text: &Option<String>| {
            text.as_deref()
                .is_some_and(|text| text.lines().any(|line| line.starts_with(&format!(":{hint} "))))
        };
        if declared(&legacy_mangle) {
            return Backend::Legacy;
        }
        if declared(&nft_mangle) {
            return Backend::Nft;
        }
    }
    if !legacy_loaded {
        return Backend::Nft;
    }
    let rules = |programs: [&str; 2]| -> usize {
        programs
            .iter()
            .filter_map(|program| run(program, &[]))
            .map(|text| text.lines().filter(|line| line.starts_with("-A ")).count())
            .sum()
    };
    let legacy = rules(["iptables-legacy-save", "ip6tables-legacy-save"]);
    let nft = rules(["iptables-nft-save", "ip6tables-nft-save"]);
    if legacy > nft { Backend::Legacy } else { Backend::Nft }
}

/// Runs a program and returns its stdout when it succeeds.
fn output_of(program: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The first executable file called `name` in `PATH`.
fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| {
        std::fs::metadata(candidate)
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake host: save outputs by program name.
    fn host(outputs: &[(&str, &str)]) -> impl Fn(&str, &[&str]) -> Option<String> + use<> {
        let outputs: Vec<(String, String)> =
            outputs.iter().map(|(program, text)| (program.to_string(), text.to_string())).collect();
        move |program: &str, _args: &[&str]| {
            outputs.iter().find(|(name, _)| name == program).map(|(_, text)| text.clone())
        }
    }

    #[test]
    fn one_implementation_is_used_as_is() {
        let run = host(&[]);
        assert_eq!(detect_with(false, false, true, &run), Backend::Plain);
        assert_eq!(detect_with(true, false, true, &run), Backend::Legacy);
        assert_eq!(detect_with(false, true, true, &run), Backend::Nft);
    }

    #[test]
    fn kubernetes_hints_win() {
        let hinted = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
        let run = host(&[("iptables-legacy-save", hinted), ("iptables-nft-save", "*mangle\nCOMMIT\n")]);
        assert_eq!(detect_with(true, true, true, &run), Backend::Legacy);
        let run = host(&[("iptables-legacy-save", "*mangle\nCOMMIT\n"), ("iptables-nft-save", hinted)]);
        assert_eq!(detect_with(true, true, true, &run), Backend::Nft);
    }

    #[test]
    fn the_backend_with_more_rules_wins() {
        let legacy = "*filter\n-A INPUT -j ACCEPT\n-A INPUT -j DROP\nCOMMIT\n";
        let nft = "*filter\n-A INPUT -j ACCEPT\nCOMMIT\n";
        let run = host(&[("iptables-legacy-save", legacy), ("iptables-nft-save", nft)]);
        assert_eq!(detect_with(true, true, true, &run), Backend::Legacy);
        let run = host(&[("iptables-legacy-save", nft), ("iptables-nft-save", legacy)]);
        assert_eq!(detect_with(true, true, true, &run), Backend::Nft);
        let run = host(&[]);
        assert_eq!(detect_with(true, true, true, &run), Backend::Nft, "a tie (nothing anywhere) is nft");
    }

    #[test]
    fn legacy_is_never_probed_when_its_modules_are_not_loaded() {
        let run = |program: &str, _: &[&str]| -> Option<String> {
            assert!(!program.contains("legacy"), "{program} would load the legacy modules");
            None
        };
        assert_eq!(detect_with(true, true, false, &run), Backend::Nft);
    }
}
