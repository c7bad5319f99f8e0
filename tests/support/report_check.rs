//! Checks of a support report archive shared by the end-to-end tests (`e2e_cli_tools.rs`: the
//! local `ven gen-supportreport`; `e2e_supportreport.rs`: the one the PCE asked for): what
//! `tar -tf` lists, and that no secret of the lab's agent is anywhere in its bytes.

use std::path::Path;
use std::process::Command;

use ven::state::{self, Identity, RecordKind};
use ven_lab::Lab;
use ven_lab::scenario::Host;

/// Parts every report holds (under its one directory).
pub const MEMBERS: [&str; 11] = [
    "status.json",
    "status.txt",
    "history.json",
    "config.txt",
    "identity.txt",
    "log/agent.log",
    "firewall/iptables-save.txt",
    "firewall/ipset-list.txt",
    "check-env.txt",
    "version.txt",
    "MANIFEST.txt",
];

/// `tar -tf path`, which must succeed and list every one of [`MEMBERS`].
pub fn listed_members(path: &Path) -> String {
    let listed = Command::new("tar").arg("-tf").arg(path).output().expect("tar -tf");
    assert!(listed.status.success(), "tar -tf: {}", String::from_utf8_lossy(&listed.stderr));
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    for member in MEMBERS {
        assert!(listed.lines().any(|l| l.ends_with(&format!("/{member}"))), "{member} missing:\n{listed}");
    }
    listed
}

/// Fails when `host`'s agent token, the lab's activation code or one of `planted` (what, value)
/// is in `bytes`.
pub fn assert_no_secrets(lab: &Lab, host: Host, bytes: &[u8], planted: &[(&str, &str)]) {
    let identity: Identity =
        state::read_record(&lab.data_dir(host).join("state/identity"), RecordKind::Identity)
            .expect("the agent's identity")
            .expect("the agent is activated");
    let pairing = lab.pairing().expect("the PCE's pairing material").clone();
    let known =
        [("agent token", identity.agent_token.as_str()), ("activation code", &pairing.activation_code)];
    for (what, secret) in known.iter().chain(planted) {
        assert!(secret.len() >= 8, "{what} too short to test: {secret:?}");
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the {what} is in the report");
    }
}
