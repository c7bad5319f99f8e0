//! The nf_tables generation canary against the real kernel: the generation is read over
//! netlink in a fresh network namespace, moves with every committed change by anyone, and lets a
//! quick tamper check skip reading the tables back only while it stands still.
//!
//! Whether a check read the tables is seen through the save tools themselves: the lab's
//! firewall runs `iptables-nft-save` and `ip6tables-nft-save` through wrappers that count their
//! calls. Needs the nf_tables backend and `nft`; without them the tests are skipped loudly,
//! except under CI, where they fail.

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use common::*;
use ven::firewall::backend::Backend;
use ven::firewall::{CheckDepth, Family, Firewall, FirewallConfig, Tools};
use ven_lab::netns::{self, Netns};
use ven_proto::PolicyState;

/// The kernel, the iptables tools, `nft`, and iptables on nf_tables.
fn require_nf_tables() -> bool {
    if !require_kernel() || !require_tools(&["nft", "iptables-nft-save", "ip6tables-nft-save"]) {
        return false;
    }
    let nft = netns::run("iptables-save", &["--version"])
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).contains("(nf_tables)"));
    match nft {
        true => true,
        false if std::env::var_os("CI").is_some() => {
            panic!("generation kernel test cannot run under CI: iptables-save is not the nf_tables one")
        }
        false => {
            eprintln!(
                "SKIPPED: generation kernel test needs iptables on nf_tables (iptables-save says otherwise)"
            );
            false
        }
    }
}

fn nft_config() -> FirewallConfig {
    FirewallConfig { tools: Tools::for_backend(Backend::Nft), ..FirewallConfig::default() }
}

/// The generation in `host`, as a firewall with `config` reads it.
fn generation_in(host: &Netns, config: FirewallConfig) -> Option<u32> {
    host.run(move || Firewall::new(config).ruleset_generation()).expect("enter namespace")
}

/// Save tools that log each call with `-t filter` to a file, then run the real ones.
struct CountingSaves {
    dir: PathBuf,
}

impl CountingSaves {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ven-fwg-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("wrapper directory");
        Self { dir }
    }

    fn wrap(&self, real: &Path) -> PathBuf {
        let name = real.file_name().expect("tool name").to_string_lossy().into_owned();
        let path = self.dir.join(&name);
        let log = self.dir.join("calls");
        let script = format!(
            "#!/bin/sh\necho \"{name} $*\" >> '{}'\nexec '{}' \"$@\"\n",
            log.display(),
            real.display()
        );
        std::fs::write(&path, script).expect("write wrapper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    /// The nft tools, with the save tools wrapped.
    fn config(&self) -> FirewallConfig {
        let tools = Tools::for_backend(Backend::Nft);
        let tools = Tools {
            iptables_save: self.wrap(&tools.iptables_save),
            ip6tables_save: self.wrap(&tools.ip6tables_save),
            ..tools
        };
        FirewallConfig { tools, ..FirewallConfig::default() }
    }

    /// Table filter reads so far, both families.
    fn reads(&self) -> usize {
        let calls = std::fs::read_to_string(self.dir.join("calls")).unwrap_or_default();
        calls.lines().filter(|line| line.ends_with("-t filter")).count()
    }
}

impl Drop for CountingSaves {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_generation_is_read_per_namespace_and_moves_with_a_foreign_change() {
    if !require_nf_tables() {
        return;
    }
    let host = Netns::new("fwg-read").expect("namespace");
    let first = generation_in(&host, nft_config()).expect("the generation of a fresh namespace");
    assert_eq!(generation_in(&host, nft_config()), Some(first), "reading does not move it");
    sh(&host, "iptables-save -t filter >/dev/null && ip6tables-save >/dev/null && ipset create fwg hash:ip");
    assert_eq!(generation_in(&host, nft_config()), Some(first), "saves and ipset do not move it");

    sh(&host, "iptables -A INPUT -s 198.19.9.9/32 -j DROP");
    let second = generation_in(&host, nft_config()).expect("generation");
    assert!(second > first, "{first} -> {second} after an iptables -A");
    sh(&host, "ip6tables -A INPUT -s 2001:2:0:96::9/128 -j DROP");
    let third = generation_in(&host, nft_config()).expect("generation");
    assert!(third > second, "{second} -> {third}: ip6tables-nft shares it");

    // Another namespace has its own; the legacy tools have none.
    let other = Netns::new("fwg-other").expect("namespace");
    assert!(generation_in(&other, nft_config()).is_some());
    assert_eq!(generation_in(&other, nft_config()), generation_in(&other, nft_config()));
    let legacy = FirewallConfig { tools: Tools::for_backend(Backend::Legacy), ..FirewallConfig::default() };
    assert_eq!(generation_in(&host, legacy), None);
}

#[test]
fn quick_checks_read_the_tables_only_when_the_generation_moved() {
    if !require_nf_tables() {
        return;
    }
    let saves = CountingSaves::new("skip");
    let lab = Lab::with_config("fwg-skip", saves.config());
    let generation = || generation_in(&lab.b, nft_config()).expect("generation");
    lab.apply(&policy(1, PolicyState::Enforced, &[A, A6])).unwrap();

    // Right after our apply: nothing read back, nothing found.
    let reads = saves.reads();
    assert_eq!(lab.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
    assert_eq!(saves.reads(), reads, "a quick check after our own apply reads no table");
    assert_eq!(lab.verify(CheckDepth::Full).unwrap(), Vec::<String>::new());
    assert_eq!(saves.reads(), reads + 2, "a full check reads both families");

    // Set sizes are checked whatever the generation: a deleted member is found without a read.
    let before = generation();
    lab.b_sh(&format!("ipset del ven-1 {A}"));
    assert_eq!(generation(), before, "ipset does not move the generation");
    assert_eq!(lab.verify(CheckDepth::Quick).unwrap(), ["set ven-1 holds 0 members, not 1"]);
    assert_eq!(saves.reads(), reads + 2);
    lab.repair().unwrap();
    assert_eq!(generation(), before, "a sets-only repair commits no rule");

    // One of our rules deleted by someone else: the generation moves, quick reads and finds it.
    let listing = lab.b.exec("iptables", &["-S", "VEN-INPUT"]).expect("iptables -S");
    let listing = String::from_utf8_lossy(&listing.stdout);
    let number = listing
        .lines()
        .filter(|line| line.starts_with("-A "))
        .position(|line| line.contains(&format!("--dport {RULED} ")) && line.contains("-j ACCEPT"))
        .expect("the ruled port's accept")
        + 1;
    lab.b_sh(&format!("iptables -D VEN-INPUT {number}"));
    assert_ne!(generation(), before, "iptables -D moves the generation");
    let reads = saves.reads();
    assert_eq!(lab.verify(CheckDepth::Quick).unwrap(), ["IPv4: VEN-INPUT: 1 rules missing, 0 unexpected"]);
    assert_eq!(saves.reads(), reads + 2, "the quick check read both families");
    expect_tcp(
        "rule 1's accept is gone from IPv4",
        &lab.inbound([Dropped, Dropped, Dropped, Allowed, Dropped]),
    );

    // Our repair moves it too, and is not taken for someone else's change.
    let before = generation();
    assert!(lab.repair().unwrap().changed);
    assert_eq!(generation(), before.wrapping_add(1), "one restore, one commit");
    let reads = saves.reads();
    assert_eq!(lab.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
    assert_eq!(saves.reads(), reads, "nothing read after our repair");
    expect_tcp("repaired", &lab.inbound(ONLY_A));

    // A foreign nf_tables change elsewhere: the full comparison runs once, finds nothing, and
    // the next quick check skips again.
    let before = generation();
    lab.b_sh("nft add table inet other && nft add chain inet other input '{ type filter hook input priority 10; }'");
    assert!(generation() > before, "nft moves the generation");
    assert_eq!(lab.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
    assert_eq!(saves.reads(), reads + 2, "the quick check compared both families");
    assert_eq!(lab.verify(CheckDepth::Quick).unwrap(), Vec::<String>::new());
    assert_eq!(saves.reads(), reads + 2, "and the next one skipped again");
    let output = lab.b.exec("nft", &["list", "tables"]).expect("nft list tables");
    assert!(String::from_utf8_lossy(&output.stdout).contains("table inet other"), "foreign table untouched");
    assert_eq!(lab.filter(Family::V4).matches("ven:jump").count(), 2, "INPUT and OUTPUT jumps");
}
