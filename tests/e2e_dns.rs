//! End to end, a management server given by name: the PCE moves to another address (its name now
//! resolves there, the old one refuses) while web is enforced, and web's agent follows without a
//! restart: the heartbeat that fails makes it resolve the name again, its firewall's management
//! channel moves to the new address (the enforced outbound policy would drop it otherwise), and
//! the next heartbeat gets through. The name lives in web's namespace only, through the hosts
//! file `ip netns exec` mounts from /etc/netns/<ns>/hosts. Needs root, iproute2, iptables and
//! ipset; skipped loudly without them, a failure under CI=true.
//!
//! All traffic stays inside the lab's namespaces (198.18.0.0/24).

use std::path::PathBuf;
use std::time::Duration;

use ven_lab::scenario::{API_PORT, Host};
use ven_lab::{Binaries, Lab, LabError, LabOptions};

fn prerequisites(test: &str) -> Option<Binaries> {
    ven_lab::binaries::for_end_to_end_test(test, env!("CARGO_BIN_EXE_ven"), &["iptables-save", "ipset"])
}

fn must<T>(result: Result<T, LabError>, what: &str) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The PCE's name, known only to web's namespace.
const PCE_NAME: &str = "pce.test";
/// Where the PCE moves: in the lab's segment, on no other host.
const NEW_ADDRESS: &str = "198.18.0.9";
/// Heartbeat interval the lab's PCE hands out: the agent notices the move within one.
const HEARTBEAT_S: u32 = 3;

/// /etc/netns/<ns>/ with web's hosts file, removed when the test ends however it ends.
struct HostsFile(PathBuf);

impl HostsFile {
    fn create(lab: &Lab, host: Host, address: &str) -> Self {
        let dir = PathBuf::from("/etc/netns").join(lab.ns_name(host));
        std::fs::create_dir_all(&dir).expect("creating /etc/netns/<ns>");
        let file = HostsFile(dir);
        file.point_at(address);
        file
    }

    /// Rewrites the file in place: `ip netns exec` bind-mounted this inode over /etc/hosts of the
    /// running agent, so a rename would not reach it.
    fn point_at(&self, address: &str) {
        std::fs::write(self.0.join("hosts"), format!("127.0.0.1 localhost\n{address} {PCE_NAME}\n"))
            .expect("writing the namespace's hosts file");
    }
}

impl Drop for HostsFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `last_heartbeat` of `ven status --json` on `host` (RFC 3339, or null).
fn last_heartbeat(lab: &Lab, host: Host) -> Result<String, LabError> {
    let out = lab.ven(host, &["status", "--json"])?.stdout;
    let value = out
        .split("\"last_heartbeat\":")
        .nth(1)
        .and_then(|rest| rest.split([',', '}']).next())
        .unwrap_or("null")
        .trim()
        .to_string();
    Ok(value)
}

#[test]
fn the_agent_follows_its_pce_to_a_new_address_without_a_restart() {
    let Some(bins) = prerequisites("the_agent_follows_its_pce_to_a_new_address_without_a_restart") else {
        return;
    };
    let opts = LabOptions {
        name_prefix: "vendns".into(),
        heartbeat_interval: Some(HEARTBEAT_S),
        // Every address of the PCE's namespace, the one it moves to included; the certificate
        // names the PCE as the agent knows it and as the lab's admin CLI does.
        pce_listen: Some("0.0.0.0".into()),
        pce_args: ["--san", PCE_NAME, "--san", &Host::Pce.address().to_string()].map(String::from).to_vec(),
        ..LabOptions::default()
    };
    let mut lab = Lab::new(bins, opts).expect("building the lab");
    let hosts = HostsFile::create(&lab, Host::Web, &Host::Pce.address().to_string());
    let pairing = must(lab.start_pce(), "starting the PCE");
    let server = format!("{PCE_NAME}:{API_PORT}");
    let activated = must(
        lab.try_activate(Host::Web, &server, &pairing.activation_code, &pairing.ca_fingerprint),
        "ven activate by name",
    );
    assert!(
        activated.success(),
        "ven activate --management-server {server}: {}{}",
        activated.stdout,
        activated.stderr
    );
    must(lab.start_agent(Host::Web), "starting web's agent");
    must(lab.set_state(Host::Web, "enforced"), "enforcing web");
    must(lab.wait_for_policy(&[Host::Web], "enforced", Duration::from_secs(30)), "web enforced");
    let outbound = must(lab.firewall(Host::Web), "web's firewall").v4;
    assert!(
        outbound.contains(&format!("-d {}/32 -p tcp -m tcp --dport {API_PORT}", Host::Pce.address())),
        "web's management channel to the PCE's address:\n{outbound}"
    );

    // The PCE moves: a new address, and the old one refuses web (as a host gone would).
    must(lab.sh(Host::Pce, &format!("ip addr add {NEW_ADDRESS}/24 dev eth0")), "the PCE's new address");
    must(
        lab.sh(
            Host::Pce,
            &format!(
                "iptables -I INPUT -s {} -d {} -p tcp -j REJECT --reject-with tcp-reset",
                Host::Web.address(),
                Host::Pce.address()
            ),
        ),
        "refusing web at the PCE's old address",
    );
    let before_move = must(last_heartbeat(&lab, Host::Web), "web's last heartbeat");
    hosts.point_at(NEW_ADDRESS);

    // Several heartbeat intervals: without following the name, every heartbeat fails from here on.
    let limit = Duration::from_secs(u64::from(HEARTBEAT_S) * 10);
    let followed = lab.wait_until("a heartbeat from web after the PCE moved", limit, |lab| {
        let now = last_heartbeat(lab, Host::Web)?;
        Ok(if now != before_move && now != "null" { None } else { Some(format!("last heartbeat {now}")) })
    });
    must(followed, "web's agent heartbeating to the PCE's new address");

    let firewall = must(lab.firewall(Host::Web), "web's firewall");
    assert!(
        firewall.v4.contains(&format!("-d {NEW_ADDRESS}/32 -p tcp -m tcp --dport {API_PORT}")),
        "web's management channel moved to {NEW_ADDRESS}:\n{}",
        firewall.v4
    );
    let status = must(lab.ven_status(Host::Web), "web's status");
    assert_eq!(status.policy_state.as_deref(), Some("enforced"), "web stays enforced: {status:?}");
    let history = must(lab.history(Host::Web), "web's history");
    assert!(
        history.iter().any(|item| format!("{item:?}").contains("management channel moved")),
        "the move is in web's history: {history:#?}"
    );
}
