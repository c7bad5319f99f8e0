//! The kernel seam: what the firewall asks of the kernel, as a narrow trait, and the real
//! implementation that runs the iptables, ip6tables and ipset tools as subprocesses.
//!
//! Children inherit the calling thread's network namespace, so a `Firewall` used on a thread that
//! entered a namespace programs that namespace; the nf_tables generation is read over a netlink
//! socket opened on the calling thread, so it is that namespace's too. A fake for unit tests
//! lives in `fake.rs` (`#[cfg(test)]` only); production code always gets [`SystemKernel`].

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use super::{Backend, Family, FirewallError, Tools, generation, ipset, iptables};

/// What the firewall needs from the kernel, as text in the tools' own save/restore formats.
pub(crate) trait Kernel: Send + Sync {
    /// Table `filter` of `family`, as `iptables-save -t filter` prints it.
    fn save_filter(&self, family: Family) -> Result<String, FirewallError>;
    /// Applies one `iptables-restore --noflush` input for table `filter`, atomically.
    fn restore_filter(&self, family: Family, input: &str) -> Result<(), FirewallError>;
    /// Every table of `family`, as `iptables-save` prints them.
    fn save_tables(&self, family: Family) -> Result<String, FirewallError>;
    /// Replaces every table named in `input` (a full `iptables-restore`, each table atomically).
    fn restore_tables(&self, family: Family, input: &str) -> Result<(), FirewallError>;
    /// Every set, as `ipset save` prints it.
    fn ipset_save(&self) -> Result<String, FirewallError>;
    /// Our sets' sizes (from the kernel over netlink, else from `ipset list -t`).
    fn ipset_sizes(&self) -> Result<BTreeMap<String, usize>, FirewallError>;
    /// Applies one `ipset restore` session (not atomic: it stops at the first failing line).
    fn ipset_restore(&self, input: &str) -> Result<(), FirewallError>;
    /// The nf_tables ruleset generation when the iptables tools (both families) program
    /// nf_tables: it moves on every committed change of any iptables-nft, ip6tables-nft or nft
    /// rule, by anyone, and on nothing else (not on reads, counters or ipset changes). `None`
    /// with the legacy backend or when it cannot be read: the caller must then assume a change.
    fn ruleset_generation(&self) -> Option<u32>;
}

/// The kernel reached through the iptables and ipset tools.
pub(crate) struct SystemKernel {
    tools: Tools,
    /// Whether both save tools are nf_tables ones (asked once: the tools do not change).
    nf_tables: OnceLock<bool>,
}

impl SystemKernel {
    pub(crate) fn new(tools: Tools) -> Self {
        Self { tools, nf_tables: OnceLock::new() }
    }

    /// Whether the tools program nf_tables: the nft backend's tools do; the plain names do when
    /// `iptables-save --version` and `ip6tables-save --version` both say so.
    fn uses_nf_tables(&self) -> bool {
        *self.nf_tables.get_or_init(|| match self.tools.backend {
            Backend::Nft => true,
            Backend::Legacy => false,
            Backend::Plain => {
                [&self.tools.iptables_save, &self.tools.ip6tables_save].into_iter().all(|program| {
                    run(program, &["--version"], None).is_ok_and(|output| {
                        output.status.success() && says_nf_tables(&String::from_utf8_lossy(&output.stdout))
                    })
                })
            }
        })
    }

    fn save_program(&self, family: Family) -> &Path {
        match family {
            Family::V4 => &self.tools.iptables_save,
            Family::V6 => &self.tools.ip6tables_save,
        }
    }

    fn restore_program(&self, family: Family) -> &Path {
        match family {
            Family::V4 => &self.tools.iptables_restore,
            Family::V6 => &self.tools.ip6tables_restore,
        }
    }
}

impl Kernel for SystemKernel {
    fn save_filter(&self, family: Family) -> Result<String, FirewallError> {
        iptables::save(self.save_program(family), Some("filter"))
    }

    fn restore_filter(&self, family: Family, input: &str) -> Result<(), FirewallError> {
        iptables::restore(self.restore_program(family), "filter", input, false)
    }

    fn save_tables(&self, family: Family) -> Result<String, FirewallError> {
        iptables::save(self.save_program(family), None)
    }

    fn restore_tables(&self, family: Family, input: &str) -> Result<(), FirewallError> {
        iptables::restore(self.restore_program(family), "all", input, true)
    }

    fn ipset_save(&self) -> Result<String, FirewallError> {
        ipset::save(&self.tools.ipset)
    }

    fn ipset_sizes(&self) -> Result<BTreeMap<String, usize>, FirewallError> {
        match super::ipset_sizes::our_set_sizes() {
            Ok(sizes) => Ok(sizes),
            Err(e) => {
                // Debug only: a kernel without IPSET_ATTR_ELEMENTS would log at every check.
                log::debug!("{e}; asking `ipset list -t` instead");
                Ok(ipset::parse_terse(&ipset::list_terse(&self.tools.ipset)?))
            }
        }
    }

    fn ipset_restore(&self, input: &str) -> Result<(), FirewallError> {
        ipset::restore(&self.tools.ipset, input)
    }

    fn ruleset_generation(&self) -> Option<u32> {
        if !self.uses_nf_tables() {
            return None;
        }
        // Debug only: a kernel that never answers would otherwise log at every quick check, and
        // the only cost of an unknown generation is a full comparison.
        generation::nftables_generation().map_err(|e| log::debug!("{e}")).ok()
    }
}

/// Whether a save tool's `--version` line names the nf_tables backend (`iptables-save v1.8.9
/// (nf_tables)`; legacy ones say `(legacy)` or, before 1.8, nothing).
fn says_nf_tables(version: &str) -> bool {
    version.lines().next().is_some_and(|line| line.trim_end().ends_with("(nf_tables)"))
}

/// Most bytes of a tool's stderr kept in an error.
const MAX_STDERR_BYTES: usize = 4096;
/// Most characters of one input line quoted in an error.
const MAX_EXCERPT_LINE_CHARS: usize = 240;

/// Runs `program` to completion with `stdin` as its input, in the C locale (stable messages).
pub(crate) fn run(program: &Path, args: &[&str], stdin: Option<&str>) -> Result<Output, FirewallError> {
    let spawn_error = |cause| FirewallError::Spawn { program: program.to_path_buf(), cause };
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    let pipe = child.stdin.take();
    // Feed stdin from a second thread while this one drains stdout and stderr, so that neither
    // side can block the other on a full pipe.
    std::thread::scope(|scope| {
        if let (Some(mut pipe), Some(text)) = (pipe, stdin) {
            scope.spawn(move || {
                // A tool that fails early stops reading (EPIPE); its exit status tells why.
                let _ = pipe.write_all(text.as_bytes());
            });
        }
        child.wait_with_output()
    })
    .map_err(spawn_error)
}

/// Runs a listing tool (`iptables-save`, `ipset save`, ...) and returns its output; a failure is
/// a [`FirewallError::Save`] naming the command.
pub(crate) fn listing(program: &Path, args: &[&str]) -> Result<String, FirewallError> {
    let output = run(program, args, None)?;
    if !output.status.success() {
        return Err(FirewallError::Save {
            command: format!("{} {}", program.display(), args.join(" ")),
            status: output.status,
            stderr: stderr_text(&output.stderr),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A tool's stderr as text, trimmed and capped at [`MAX_STDERR_BYTES`].
pub(crate) fn stderr_text(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(&stderr[..stderr.len().min(MAX_STDERR_BYTES)]);
    text.trim().to_string()
}

/// The input lines around the one a tool's error message names (`line 4`, `line: 4`), numbered,
/// with the named one marked `>`; the first lines when no line is named.
pub(crate) fn excerpt(input: &str, stderr: &str) -> String {
    let lines: Vec<&str> = input.lines().collect();
    let (from, to, named) = match named_line(stderr) {
        Some(line) if line >= 1 && line <= lines.len() => {
            ((line - 1).max(1), (line + 1).min(lines.len()), line)
        }
        _ => (1, lines.len().min(3), 0),
    };
    let mut out = String::new();
    for number in from..=to {
        let text: String = lines[number - 1].chars().take(MAX_EXCERPT_LINE_CHARS).collect();
        let marker = if number == named { '>' } else { ' ' };
        out.push_str(&format!("{marker}{number:>5}: {text}\n"));
    }
    out.trim_end().to_string()
}

/// The line number in messages such as `Error occurred at line: 4` (iptables-restore) or
/// `Error in line 3: ...` (ipset).
fn named_line(stderr: &str) -> Option<usize> {
    stderr.match_indices("line").find_map(|(at, word)| {
        let rest = stderr[at + word.len()..].trim_start_matches([':', ' ']);
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const INPUT: &str = "*filter\n:VEN-INPUT - [0:0]\n-A VEN-INPUT -j ACCEPT\n-A VEN-INPUT -p tcp --dport 0:-1 -j ACCEPT\n-A VEN-INPUT -j DROP\nCOMMIT\n";

    #[test]
    fn excerpt_marks_the_line_iptables_restore_names() {
        // `iptables-restore --noflush` of INPUT (v1.8.9, nf_tables), stderr verbatim.
        let stderr = "iptables-restore v1.8.9 (nf_tables): invalid port/service `-1' specified\n\
                      Error occurred at line: 4\n\
                      Try `iptables-restore -h' or 'iptables-restore --help' for more information.";
        assert_eq!(
            excerpt(INPUT, stderr),
            "     3: -A VEN-INPUT -j ACCEPT\n>    4: -A VEN-INPUT -p tcp --dport 0:-1 -j ACCEPT\n     5: -A VEN-INPUT -j DROP"
        );
    }

    #[test]
    fn excerpt_marks_the_line_ipset_names_or_shows_the_start() {
        // `ipset restore` (v7.17), stderr verbatim.
        let stderr =
            "ipset v7.17: Error in line 1: Set cannot be created: set with the same name already exists";
        assert_eq!(
            excerpt("create ven-1 hash:net\nadd ven-1 198.18.0.2\n", stderr),
            ">    1: create ven-1 hash:net\n     2: add ven-1 198.18.0.2"
        );
        assert_eq!(excerpt("a\nb\nc\nd\n", "something odd"), "     1: a\n     2: b\n     3: c");
        assert_eq!(excerpt("a\n", "line 99 failed"), "     1: a");
    }

    #[test]
    fn only_an_nf_tables_save_tool_counts_as_nf_tables() {
        // `--version` of iptables-save, iptables-legacy-save (v1.8.9) and of a pre-1.8 build.
        assert!(says_nf_tables("iptables-save v1.8.9 (nf_tables)\n"));
        assert!(!says_nf_tables("iptables-save v1.8.9 (legacy)\n"));
        assert!(!says_nf_tables("iptables-save v1.6.1\n"));
        assert!(!says_nf_tables(""));
    }

    #[test]
    fn the_legacy_backend_has_no_generation_and_runs_nothing() {
        let tools = Tools {
            iptables_save: "/nonexistent/ven-no-such-tool".into(),
            ..Tools::for_backend(Backend::Legacy)
        };
        let kernel = SystemKernel::new(Tools { backend: Backend::Legacy, ..tools });
        assert_eq!(kernel.ruleset_generation(), None);
        // Plain tools that cannot be run are not taken for nf_tables ones.
        let missing = Tools { iptables_save: "/nonexistent/ven-no-such-tool".into(), ..Tools::plain() };
        assert_eq!(SystemKernel::new(missing).ruleset_generation(), None);
    }

    #[test]
    fn run_reports_a_missing_program_and_feeds_stdin() {
        let err = run(Path::new("/nonexistent/ven-no-such-tool"), &[], None).unwrap_err();
        assert!(matches!(err, FirewallError::Spawn { .. }), "{err}");
        let big = "x".repeat(1 << 20);
        let output = run(Path::new("wc"), &["-c"], Some(&big)).unwrap();
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), (1 << 20).to_string());
    }
}
