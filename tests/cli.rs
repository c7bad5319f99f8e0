//! The `ven` command line as a user meets it: `version` names the build's target, and output
//! into a pipe whose reader went away (`ven status --json | head -c0`) ends quietly.

use std::process::{Command, Stdio};

const VEN: &str = env!("CARGO_BIN_EXE_ven");

#[test]
fn version_names_the_version_and_the_target() {
    let out = Command::new(VEN).arg("version").output().expect("run ven version");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let (version, target) =
        text.trim().strip_prefix("ven ").and_then(|rest| rest.split_once(' ')).expect("ven V (T)");
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    let target = target.trim_start_matches('(').trim_end_matches(')');
    assert!(target.split('-').count() >= 3 && target.contains("linux"), "a target triple: {target}");
}

#[test]
fn a_closed_output_pipe_ends_the_command_quietly() {
    let data = std::env::temp_dir().join(format!("ven-cli-pipe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&data).expect("data dir");
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(VEN)
        .args(["status", "--json"])
        .env("VEN_DATA_DIR", &data)
        .stdout(Stdio::from(writer))
        .output()
        .expect("run ven status");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "{}: {stderr}", out.status);
    let _ = std::fs::remove_dir_all(&data);
}
