//! `.ci/setup` installs every tool the tests and the lab run: a fresh CI machine has nothing else.
//! The tools are found where the code names them (`Command::new("…")`, `netns::run("…")`,
//! `require_tools(&[…])`) and each must have a row in setup's TOOLS table.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Programs the workspace builds itself: never installed by setup.
const BUILT_HERE: [&str; 3] = ["ven", "pce", "ven-lab"];
/// Programs only the agent runs, and only on a board that has them: `ubus` feeds procd's
/// watchdog on OpenWrt (src/agent/notify.rs); no test runs it.
const BOARD_ONLY: [&str; 1] = ["ubus"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The commands in setup's `TOOLS=( "command package" … )` table.
fn tools_setup_installs() -> BTreeSet<String> {
    let setup = std::fs::read_to_string(root().join(".ci/setup")).expect("read .ci/setup");
    let table = setup.split("TOOLS=(").nth(1).expect(".ci/setup has a TOOLS=( table");
    let table = &table[..table.find("\n)").expect("the TOOLS table ends with a lone )")];
    table
        .lines()
        .filter_map(|line| line.trim().strip_prefix('"'))
        .filter_map(|row| row.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|name| name != "target") {
                rust_files(&path, found);
            }
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

/// The string literals right after each `marker` in `source` (one for a call, all of them for a
/// `&[…]` list).
fn literals_after(source: &str, marker: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in source.match_indices(marker) {
        let rest = &source[at + marker.len()..];
        let list = rest.starts_with("&[");
        let end = if list { rest.find(']') } else { rest.find(')') }.unwrap_or(rest.len());
        let args = &rest[..end];
        let quoted: Vec<&str> = args.split('"').skip(1).step_by(2).collect();
        if list {
            names.extend(quoted.iter().map(|s| s.to_string()));
        } else if args.trim_start().starts_with('"') {
            names.extend(quoted.first().map(|s| s.to_string()));
        }
    }
    names
}

fn tools_the_code_runs() -> BTreeSet<String> {
    let mut files = Vec::new();
    for dir in ["src", "tests", "crates"] {
        rust_files(&root().join(dir), &mut files);
    }
    let mut tools = BTreeSet::new();
    let this_file = root().join(file!());
    for file in files.into_iter().filter(|file| *file != this_file) {
        let source = std::fs::read_to_string(&file).expect("read source");
        for marker in ["Command::new(", "netns::run(", "require_tools("] {
            tools.extend(literals_after(&source, marker));
        }
    }
    // Names only: a path (absolute, or a test's deliberately missing program) is not looked up in
    // PATH, so no package provides it.
    let is_program_name = |tool: &str| {
        !tool.is_empty() && tool.chars().all(|c| c.is_ascii_alphanumeric() || "_.+-".contains(c))
    };
    tools.retain(|tool| {
        is_program_name(tool) && !BUILT_HERE.contains(&tool.as_str()) && !BOARD_ONLY.contains(&tool.as_str())
    });
    tools
}

#[test]
fn every_tool_the_tests_run_is_installed_by_setup() {
    let installed = tools_setup_installs();
    let needed = tools_the_code_runs();
    // The scan itself must see the tools we know the kernel tests use, or it proves nothing.
    for known in ["ip", "nft", "iptables-restore", "ipset", "iptables-legacy"] {
        assert!(needed.contains(known), "the scan missed {known}: {needed:?}");
    }
    let missing: Vec<&String> = needed.difference(&installed).collect();
    assert!(missing.is_empty(), "tools run by the code but absent from .ci/setup's TOOLS table: {missing:?}");
}

#[test]
fn literals_are_read_from_calls_and_lists() {
    let source = r#"Command::new("ip").arg("x"); require_tools(&["nft", "ipset"]); Command::new(path)"#;
    assert_eq!(literals_after(source, "Command::new("), ["ip"]);
    assert_eq!(literals_after(source, "require_tools("), ["nft", "ipset"]);
}
