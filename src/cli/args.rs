//! Raw command-line arguments as argh parses them. Nothing outside `cli` sees these types:
//! [`super::Command::from_raw`] validates them into typed commands.

use argh::FromArgs;

/// ven: the Virtual Enforcement Node. Pairs with a PCE and enforces its policy.
#[derive(FromArgs, Debug)]
pub struct RawArgs {
    #[argh(subcommand)]
    pub command: RawCommand,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub enum RawCommand {
    Activate(RawActivate),
    Agent(RawAgent),
    Status(RawStatus),
    Deactivate(RawDeactivate),
    Suspend(RawSuspend),
    Unsuspend(RawUnsuspend),
    Restore(RawRestore),
    History(RawHistory),
    Flows(RawFlows),
    CheckEnv(RawCheckEnv),
    Start(RawStart),
    Stop(RawStop),
    Restart(RawRestart),
    Enable(RawEnable),
    Disable(RawDisable),
    Version(RawVersion),
    GenSupportReport(RawGenSupportReport),
    ConnectivityTest(RawConnectivityTest),
    Upgrade(RawUpgrade),
}

/// Upgrade the agent to a signed release the PCE holds (default: the one it ordered), or show
/// how the last upgrade went. The running agent downloads and verifies it, starts it on trial
/// and rolls back if it does not report healthy.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "upgrade")]
pub struct RawUpgrade {
    /// the release's version
    #[argh(positional)]
    pub version: Option<String>,
    /// show the last upgrade and do nothing else
    #[argh(switch)]
    pub status: bool,
    /// internal: watch the trial process PID:START (started by the agent itself)
    #[argh(option, hidden_help)]
    pub guard: Option<String>,
}

/// Pair this host with a PCE (data directory: $VEN_DATA_DIR, default /var/lib/ven).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "activate")]
pub struct RawActivate {
    /// the PCE's VEN API as HOST:PORT, e.g. pce.example:8443
    #[argh(option)]
    pub management_server: String,
    /// the activation code of a pairing profile
    #[argh(option)]
    pub activation_code: String,
    /// SHA-256 fingerprint of the PCE's CA certificate (hex, colons allowed)
    #[argh(option)]
    pub ca_fingerprint: Option<String>,
    /// file with the PCE's CA certificate (PEM or DER)
    #[argh(option)]
    pub ca_cert: Option<String>,
    /// name to report for this host (default: the system hostname)
    #[argh(option)]
    pub hostname: Option<String>,
    /// the Ed25519 public key (64 hex digits) agent releases must be signed with, pinned for
    /// self-upgrades (the configuration's release_key takes precedence)
    #[argh(option)]
    pub release_key: Option<String>,
}

/// Run the agent in the foreground (what the init system starts).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "agent")]
pub struct RawAgent {}

/// Show pairing, PCE connectivity, policy state and version, last heartbeat.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
pub struct RawStatus {
    /// print one JSON object
    #[argh(switch)]
    pub json: bool,
    /// everything: components and their state, connectivity, policy sync, tampering checks,
    /// flows, uploads and the last errors
    #[argh(switch, short = 'a')]
    pub all: bool,
}

/// Unpair from the PCE and give the host its firewall back.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "deactivate")]
pub struct RawDeactivate {
    /// the firewall to leave behind: open (everything ven programmed is removed; the default) or
    /// saved (the firewall as it was just before activation)
    #[argh(option, default = "String::from(\"open\")")]
    pub firewall: String,
}

/// Remove every rule ven programmed (custom rules included) and pause the agent until unsuspend.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "suspend")]
pub struct RawSuspend {}

/// Restore the policy and custom rules in force before suspend, and resume.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "unsuspend")]
pub struct RawUnsuspend {}

/// Put the last-known-good policy in the firewall (the boot-time firewall script).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "restore")]
pub struct RawRestore {}

/// List the last 10 firewall changes, or show the ruleset of one.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "history")]
pub struct RawHistory {
    /// print one JSON array
    #[argh(switch)]
    pub json: bool,
    /// print the ruleset of the change with this number
    #[argh(option)]
    pub show: Option<u64>,
}

/// Show the traffic flow summaries recorded on this host (aggregated by default, both verdicts).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "flows")]
pub struct RawFlows {
    /// one row per flush interval (flow.db) instead of one per flow (flowsum.db)
    #[argh(switch)]
    pub raw: bool,
    /// accepted flows only (the spec's flow_view)
    #[argh(switch)]
    pub accepted: bool,
    /// flows no rule allows only: dropped, would-drop (test) and observed (build)
    #[argh(switch)]
    pub dropped: bool,
    /// flows last seen since: Unix seconds, or a time ago such as 10m, 2h, 7d
    #[argh(option)]
    pub since: Option<String>,
    /// source address or CIDR block
    #[argh(option)]
    pub src: Option<String>,
    /// destination address or CIDR block
    #[argh(option)]
    pub dst: Option<String>,
    /// destination port (ICMP type for ICMP)
    #[argh(option)]
    pub port: Option<u16>,
    /// protocol: tcp, udp, icmp, icmpv6 or a number
    #[argh(option)]
    pub proto: Option<String>,
    /// most rows to print (default 1000)
    #[argh(option)]
    pub limit: Option<usize>,
    /// print one JSON object
    #[argh(switch)]
    pub json: bool,
    /// print CSV with a header line
    #[argh(switch)]
    pub csv: bool,
}

/// Check that this host can run the agent: kernel features, tools, sysctls, the data directory,
/// the clock and the PCE (exit status 1 when a check fails).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "check-env")]
pub struct RawCheckEnv {}

/// Start the agent: through the running init system (systemd, procd, sysvinit) for the default
/// data directory, else directly.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "start")]
pub struct RawStart {
    /// start `ven agent` directly, whatever init system runs
    #[argh(switch)]
    pub direct: bool,
}

/// Stop the agent (it says goodbye to the PCE; the firewall keeps its policy).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "stop")]
pub struct RawStop {
    /// stop the agent directly, whatever init system runs
    #[argh(switch)]
    pub direct: bool,
}

/// Restart the agent.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "restart")]
pub struct RawRestart {
    /// restart the agent directly, whatever init system runs
    #[argh(switch)]
    pub direct: bool,
}

/// Let the agent start at boot (undoes `disable`).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "enable")]
pub struct RawEnable {}

/// Keep the agent from starting at boot: `ven restore` and `ven agent` then do nothing (an image
/// can carry an installed, unactivated VEN).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "disable")]
pub struct RawDisable {}

/// Print the version and the target this binary was built for.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "version")]
pub struct RawVersion {}

/// Write one bounded tar file for support: status, history, configuration (secrets redacted),
/// log tails, ven's chains and sets, check-env, versions. Never a token, key or activation code.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "gen-supportreport")]
pub struct RawGenSupportReport {
    /// where to write it (default: ven-supportreport-HOST-TIME.tar in $TMPDIR or /tmp)
    #[argh(option)]
    pub output: Option<String>,
}

/// Test reachability of the PCE and of peers (PEER[:PORT[/PROTO]], PROTO tcp or udp) from this
/// host, and say which rule of the applied policy allows or drops each (exit status 1 when one
/// fails).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "connectivity-test")]
pub struct RawConnectivityTest {
    /// peers to test: an address or name, optionally :PORT and /tcp or /udp
    #[argh(positional)]
    pub peers: Vec<String>,
}
