//! `pce release-key generate`, `pce release sign` and `pce release verify` as an operator runs
//! them, offline, with the real `pce` binary, on a 2 MiB stand-in for an agent build: a good
//! signature verifies; a tampered binary, another version and another key do not, each with a
//! clear message and a failing exit status.

use std::path::Path;
use std::process::{Command, Output};

const TARGET: &str = "x86_64-unknown-linux-gnu";

fn pce(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pce")).args(args).output().expect("running pce")
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn verify(binary: &Path, signature: &str, key: &str, version: &str) -> Output {
    pce(&[
        "release",
        "verify",
        binary.to_str().unwrap(),
        "--signature",
        signature,
        "--key",
        key,
        "--version",
        version,
        "--target",
        TARGET,
    ])
}

#[test]
fn a_signed_release_verifies_and_tampering_is_refused() {
    let dir = std::env::temp_dir().join(format!("pce-release-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("release.key");
    let key_path = key_file.to_str().unwrap();
    let public = stdout(&pce(&["release-key", "generate", "--output", key_path]));
    assert_eq!(public.len(), 64, "{public}");
    let again = pce(&["release-key", "generate", "--output", key_path]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwritten"));

    let binary = dir.join("ven");
    // An ELF header and 2 MiB of varied bytes, about a static agent's size.
    let mut stand_in = b"\x7fELF\x02\x01\x01".to_vec();
    stand_in.extend((0u32..2 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    std::fs::write(&binary, &stand_in).unwrap();
    let signature = stdout(&pce(&[
        "release",
        "sign",
        binary.to_str().unwrap(),
        "--key",
        key_path,
        "--version",
        "1.4.0",
        "--target",
        TARGET,
    ]));
    assert_eq!(signature.len(), 128, "{signature}");
    let ok = stdout(&verify(&binary, &signature, &public, "1.4.0"));
    assert!(ok.starts_with("ok: 1.4.0 for x86_64-unknown-linux-gnu"), "{ok}");

    let refused = |output: Output, needle: &str| {
        assert!(!output.status.success(), "accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{stderr}");
    };
    // Another version than the one signed.
    refused(verify(&binary, &signature, &public, "1.4.1"), "does not verify with the pinned release key");
    // Another key.
    let other_key = dir.join("other.key");
    let other = stdout(&pce(&["release-key", "generate", "--output", other_key.to_str().unwrap()]));
    refused(verify(&binary, &signature, &other, "1.4.0"), "does not verify");
    // One byte changed in the binary.
    let mut bytes = std::fs::read(&binary).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x20;
    std::fs::write(&binary, &bytes).unwrap();
    refused(verify(&binary, &signature, &public, "1.4.0"), "does not verify");
    // Malformed signature and key.
    refused(verify(&binary, "abc", &public, "1.4.0"), "not 128 hex digits");
    refused(verify(&binary, &signature, "xyz", "1.4.0"), "not 64 hex digits");
    std::fs::remove_dir_all(&dir).unwrap();
}
