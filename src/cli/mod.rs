//! The `ven` command line: raw arguments ([`args`]) are validated once into a [`Command`], which
//! is then carried out against the data directory and, when one runs, the agent.

mod args;
mod check_env;
mod connectivity;
pub mod flows;
pub mod service;
pub mod supportreport;
mod tar;

use std::path::PathBuf;
use std::process::ExitCode;

use crate::agent::control::{self, ControlError, ControlRequest, ControlResponse};
use crate::agent::status::StatusReport;
use crate::agent::{self, AgentError, BootRestore, FirewallAfter, Trust, lifecycle};
use crate::config::Config;
use crate::history::{self, History};
use crate::state::DataDir;

/// A validated command.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Activate {
        server: String,
        activation_code: String,
        trust: Trust,
        hostname: String,
        release_key: Option<[u8; 32]>,
    },
    Agent,
    Status {
        json: bool,
        all: bool,
    },
    Deactivate {
        after: FirewallAfter,
    },
    Suspend,
    Unsuspend,
    Restore,
    History {
        json: bool,
        show: Option<u64>,
    },
    Flows {
        query: crate::flows::store::FlowQuery,
        format: flows::Format,
    },
    CheckEnv,
    Service {
        action: service::Action,
        direct: bool,
    },
    SetEnabled(bool),
    Version,
    GenSupportReport {
        output: Option<PathBuf>,
    },
    ConnectivityTest {
        peers: Vec<connectivity::Target>,
    },
    Upgrade {
        version: Option<String>,
    },
    UpgradeStatus,
    UpgradeGuard {
        trial: String,
    },
}

impl Command {
    fn from_raw(raw: args::RawArgs) -> Result<Self, String> {
        Ok(match raw.command {
            args::RawCommand::Activate(a) => {
                let trust = match (a.ca_fingerprint, a.ca_cert) {
                    (Some(fp), None) => {
                        Trust::CaFingerprint(agent::tls::parse_fingerprint(&fp).map_err(|e| e.to_string())?)
                    }
                    (None, Some(path)) => Trust::CaFile(PathBuf::from(path)),
                    (Some(_), Some(_)) => {
                        return Err("give either --ca-fingerprint or --ca-cert, not both".into());
                    }
                    (None, None) => {
                        return Err(
                            "the PCE must be authenticated: give --ca-fingerprint or --ca-cert".into()
                        );
                    }
                };
                agent::tls::split_server(&a.management_server).map_err(|e| e.to_string())?;
                if a.activation_code.trim().is_empty() {
                    return Err("the activation code is empty".into());
                }
                let given = a.hostname.is_some();
                let hostname = a.hostname.unwrap_or_else(agent::host::system_hostname);
                if let Err(why) = agent::host::check_hostname(&hostname) {
                    let whose = if given { "--hostname" } else { "this host's name" };
                    return Err(format!(
                        "{whose} {hostname:?} is not one the PCE accepts: {why}; give one with --hostname"
                    ));
                }
                let release_key = match a.release_key {
                    Some(key) => Some(ven_proto::release::parse_key(&key).map_err(|e| e.to_string())?),
                    None => None,
                };
                Command::Activate {
                    server: a.management_server,
                    activation_code: a.activation_code.trim().to_string(),
                    trust,
                    hostname,
                    release_key,
                }
            }
            args::RawCommand::Agent(_) => Command::Agent,
            args::RawCommand::Status(s) => Command::Status { json: s.json, all: s.all },
            args::RawCommand::Deactivate(d) => match d.firewall.as_str() {
                "open" => Command::Deactivate { after: FirewallAfter::Open },
                "saved" => Command::Deactivate { after: FirewallAfter::Saved },
                other => return Err(format!("--firewall {other:?}: expected open or saved")),
            },
            args::RawCommand::Suspend(_) => Command::Suspend,
            args::RawCommand::Unsuspend(_) => Command::Unsuspend,
            args::RawCommand::Restore(_) => Command::Restore,
            args::RawCommand::History(h) => {
                if h.json && h.show.is_some() {
                    return Err("give either --json or --show, not both".into());
                }
                Command::History { json: h.json, show: h.show }
            }
            args::RawCommand::Flows(f) => {
                let format = match (f.json, f.csv) {
                    (true, true) => return Err("give either --json or --csv, not both".into()),
                    (true, false) => flows::Format::Json,
                    (false, true) => flows::Format::Csv,
                    (false, false) => flows::Format::Table,
                };
                let query = flows::query(
                    f.raw,
                    f.accepted,
                    f.dropped,
                    f.since.as_deref(),
                    f.src.as_deref(),
                    f.dst.as_deref(),
                    f.port,
                    f.proto.as_deref(),
                    f.limit,
                    crate::clock::now(),
                )?;
                Command::Flows { query, format }
            }
            args::RawCommand::CheckEnv(_) => Command::CheckEnv,
            args::RawCommand::Start(a) => {
                Command::Service { action: service::Action::Start, direct: a.direct }
            }
            args::RawCommand::Stop(a) => Command::Service { action: service::Action::Stop, direct: a.direct },
            args::RawCommand::Restart(a) => {
                Command::Service { action: service::Action::Restart, direct: a.direct }
            }
            args::RawCommand::Enable(_) => Command::SetEnabled(true),
            args::RawCommand::Disable(_) => Command::SetEnabled(false),
            args::RawCommand::Version(_) => Command::Version,
            args::RawCommand::GenSupportReport(a) => {
                Command::GenSupportReport { output: a.output.map(PathBuf::from) }
            }
            args::RawCommand::ConnectivityTest(a) => Command::ConnectivityTest {
                peers: a.peers.iter().map(|p| connectivity::Target::parse(p)).collect::<Result<_, _>>()?,
            },
            args::RawCommand::Upgrade(a) => match (a.guard, a.status, a.version) {
                (Some(trial), _, _) => Command::UpgradeGuard { trial },
                (None, true, None) => Command::UpgradeStatus,
                (None, true, Some(_)) => return Err("give a version or --status, not both".into()),
                (None, false, version) => {
                    if let Some(version) = &version {
                        ven_proto::release::check_version(version).map_err(|e| e.to_string())?;
                    }
                    Command::Upgrade { version }
                }
            },
        })
    }
}

/// `println!` (`out!`) and `print!` (`out_raw!`) that end the program quietly when stdout is a
/// closed pipe (`ven flows --json | head`); another write error is reported, with status 1.
macro_rules! out {
    ($($arg:tt)*) => {
        write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

macro_rules! out_raw {
    ($($arg:tt)*) => {
        write_out(format_args!($($arg)*))
    };
}

fn write_out(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(text) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("ven: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// The target this binary was built for (printed by `ven version`).
pub const TARGET: &str = env!("VEN_TARGET");

/// Entry point of the `ven` binary.
pub fn main() -> ExitCode {
    let raw: args::RawArgs = argh::from_env();
    let command = match Command::from_raw(raw) {
        Ok(command) => command,
        Err(message) => {
            eprintln!("ven: {message}");
            return ExitCode::from(2);
        }
    };
    crate::logging::init();
    match execute(command, &DataDir::from_env()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ven: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Commands that change the firewall need the configuration; the others run without it, so that
/// `status` and `history` work even when the configuration file is broken.
fn config() -> Result<Config, AgentError> {
    Ok(Config::load()?)
}

fn execute(command: Command, data: &DataDir) -> Result<(), AgentError> {
    match command {
        Command::Version => out!("ven {} ({TARGET})", env!("CARGO_PKG_VERSION")),
        Command::GenSupportReport { output } => {
            let now = crate::clock::now();
            let path = output.unwrap_or_else(|| supportreport::default_path(now));
            let written = supportreport::generate(data, &path, now)?;
            out!(
                "Support report written to {} ({} bytes, {} files, {} cut to their caps; mode 0600).",
                written.path.display(),
                written.bytes,
                written.parts,
                written.cut
            );
        }
        Command::ConnectivityTest { peers } => {
            let config = Config::load().unwrap_or_else(|e| {
                eprintln!("ven: {e}; the fail-safe services are the defaults");
                Config::default()
            });
            let results = connectivity::run(data, &config, &peers);
            out_raw!("{}", connectivity::render(&results));
            if results.iter().any(|r| r.verdict == check_env::Verdict::Fail) {
                return Err(AgentError::ChecksFailed);
            }
        }
        Command::CheckEnv => {
            let config = config()?;
            let checks = check_env::run(data, &config);
            out_raw!("{}", check_env::render(&checks));
            if checks.iter().any(|c| c.verdict == check_env::Verdict::Fail) {
                return Err(AgentError::ChecksFailed);
            }
        }
        Command::Agent if service::is_disabled(data) => {
            out!("Disabled (`ven enable` to run): the agent does not start.");
        }
        Command::Agent => agent::run(data.clone(), config()?)?,
        Command::UpgradeGuard { trial } => {
            let config = config()?;
            if let Err(e) = crate::logging::init_daemon(&data.log_dir(), config.logs, false) {
                eprintln!("ven: {e}");
            }
            agent::upgrade::guard(data, &config, &trial).map_err(AgentError::Upgrade)?;
        }
        Command::UpgradeStatus => match agent::upgrade::read_record(data)? {
            Some(record) => out!("Last upgrade: {}", agent::upgrade::describe(&record)),
            None => out!("No upgrade recorded; this is ven {}.", agent::upgrade::agent_version()),
        },
        Command::Upgrade { version } => {
            match control::request(
                &data.socket_path(),
                &ControlRequest::Upgrade { version },
                control::STATUS_TIMEOUT,
            )? {
                control::ControlResponse::Failed(why) => return Err(AgentError::Upgrade(why)),
                control::ControlResponse::Upgrading(what) => out!("{what}"),
                other => return Err(AgentError::Upgrade(format!("unexpected answer {other:?}"))),
            }
        }
        Command::Service { action, direct } => out!("{}", service::control_agent(data, action, direct)?),
        Command::SetEnabled(enabled) => out!("{}", service::set_enabled(data, enabled)?),
        Command::Activate { server, activation_code, trust, hostname, release_key } => {
            let firewall = agent::firewall(&config()?);
            let identity =
                lifecycle::activate(data, &server, &activation_code, &trust, &hostname, &firewall)?;
            if let Some(key) = release_key {
                agent::upgrade::pin_release_key(data, &key)?;
                out!("Pinned release key {} for self-upgrades.", ven_proto::release::hex(&key));
            }
            out!(
                "Activated: agent {} ({}) is paired with the PCE at {} (CA {}).",
                identity.agent_id,
                identity.hostname,
                identity.management_server,
                agent::tls::fingerprint(&identity.ca_cert_der)
            );
            match control::request(
                &data.socket_path(),
                &ControlRequest::IdentityChanged,
                control::STATUS_TIMEOUT,
            ) {
                Ok(_) => out!("The running agent picked up the pairing."),
                Err(ControlError::NotRunning(_)) => {
                    out!("Start the agent (`ven agent`) to receive the policy.")
                }
                Err(e) => eprintln!("ven: the pairing is stored, but the agent was not told: {e}"),
            }
        }
        Command::Status { json, all } => {
            let report = status_report(data)?;
            match (json, all) {
                (true, false) => out!("{}", report.to_json()),
                (true, true) => out!("{}", report.to_json_all()),
                (false, false) => out!("{}", report.to_human(crate::clock::now())),
                (false, true) => out!("{}", report.to_human_all(crate::clock::now())),
            }
        }
        Command::Deactivate { after } => {
            let request = ControlRequest::Deactivate { saved: after == FirewallAfter::Saved };
            let notice = match agent_work(data, &request)? {
                Some(ControlResponse::Deactivated { pce_notice }) => pce_notice,
                Some(other) => return Err(refused(other)),
                None => agent::deactivate_offline(data, &config()?, after)?,
            };
            let firewall = match after {
                FirewallAfter::Open => "the firewall is open",
                FirewallAfter::Saved => "the firewall is as it was before activation",
            };
            match notice {
                None => out!("Deactivated: the PCE was notified and {firewall}."),
                Some(why) => {
                    out!("Deactivated locally and {firewall}, but the PCE was not notified: {why}")
                }
            }
        }
        Command::Suspend => {
            out!("Suspending the VEN...");
            let notice = match agent_work(data, &ControlRequest::Suspend)? {
                Some(ControlResponse::Suspended { pce_notice }) => pce_notice,
                Some(other) => return Err(refused(other)),
                None => agent::suspend_offline(data, &config()?)?,
            };
            match notice {
                None => out!("The VEN has been suspended. PCE was notified."),
                Some(why) => out!("The VEN has been suspended, but the PCE was not notified: {why}"),
            }
        }
        Command::Unsuspend => {
            out!("Unsuspending the VEN...");
            let notice = match agent_work(data, &ControlRequest::Unsuspend)? {
                Some(ControlResponse::Unsuspended { pce_notice }) => pce_notice,
                Some(other) => return Err(refused(other)),
                None => agent::unsuspend_offline(data, &config()?)?,
            };
            match notice {
                None => out!("The VEN has been unsuspended. PCE was notified."),
                Some(why) => out!("The VEN has been unsuspended, but the PCE was not notified: {why}"),
            }
        }
        Command::Restore if service::is_disabled(data) => {
            out!("Disabled (`ven enable` to run): the firewall is left as it is.");
        }
        Command::Restore => {
            if control::request(&data.socket_path(), &ControlRequest::Status, control::STATUS_TIMEOUT).is_ok()
            {
                out!("The agent is running and keeps the firewall; nothing to restore.");
                return Ok(());
            }
            let firewall = agent::firewall(&config()?);
            match lifecycle::restore_at_boot(data, &firewall, &History::new(data))? {
                BootRestore::NotActivated => out!("Not activated; the firewall is left as it is."),
                BootRestore::Suspended => out!("Suspended; the firewall is left as it is."),
                BootRestore::NoPolicy => out!("No policy received yet; the firewall is left as it is."),
                BootRestore::Restored { version, state } => {
                    out!("Restored policy version {version} ({state}).")
                }
            }
        }
        Command::Flows { query, format } => {
            // Reading needs no setting but the caps; a broken configuration must not hide flows.
            let caps = Config::load().map(|config| config.logs).unwrap_or_default();
            let store = crate::flows::store::FlowStore::new(&data.log_dir(), caps);
            let result = store.query(&query)?;
            out_raw!("{}", flows::render(&result, query.view, format));
        }
        Command::History { json, show } => {
            let history = History::new(data);
            match show {
                Some(seq) => match history.get(seq).map_err(history_error)? {
                    Some(entry) => out_raw!("{}", history::render_entry(&entry)),
                    None => return Err(AgentError::NoHistoryEntry(seq)),
                },
                None => {
                    let entries = history.list().map_err(history_error)?;
                    if json {
                        out!("{}", history::render_json(&entries));
                    } else {
                        out_raw!("{}", history::render_table(&entries));
                    }
                }
            }
        }
    }
    Ok(())
}

/// The running agent's status, or the saved one when none runs.
pub(crate) fn status_report(data: &DataDir) -> Result<StatusReport, AgentError> {
    let mut report =
        match control::request(&data.socket_path(), &ControlRequest::Status, control::STATUS_TIMEOUT) {
            Ok(ControlResponse::Status(report)) => *report,
            Ok(_) | Err(ControlError::NotRunning(_)) => StatusReport::from_data_dir(data)?,
            Err(e) => {
                log::warn!("{e}; showing the saved status");
                StatusReport::from_data_dir(data)?
            }
        };
    report.disabled = service::is_disabled(data);
    Ok(report)
}

/// Hands `request` to the running agent; `None` when no agent runs (the caller then does the
/// work itself). "Not activated" answers become that error.
fn agent_work(data: &DataDir, request: &ControlRequest) -> Result<Option<ControlResponse>, AgentError> {
    match control::request(&data.socket_path(), request, control::WORK_TIMEOUT) {
        Ok(ControlResponse::Failed(message)) if message.contains("not activated") => {
            Err(AgentError::NotActivated)
        }
        Ok(response) => Ok(Some(response)),
        Err(ControlError::NotRunning(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The agent's refusal as an error.
fn refused(response: ControlResponse) -> AgentError {
    match response {
        ControlResponse::Failed(message) => AgentError::Refused(message),
        other => AgentError::Refused(format!("unexpected answer {other:?}")),
    }
}

fn history_error(e: crate::history::HistoryError) -> AgentError {
    AgentError::History(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argh::FromArgs;

    fn parse(args: &[&str]) -> Result<Command, String> {
        let raw = args::RawArgs::from_args(&["ven"], args).map_err(|e| e.output)?;
        Command::from_raw(raw)
    }

    #[test]
    fn activate_needs_exactly_one_trust_anchor() {
        let base = ["activate", "--management-server", "198.18.0.1:8443", "--activation-code", "abc"];
        assert!(parse(&base).unwrap_err().contains("--ca-fingerprint or --ca-cert"));
        let fp = "ab".repeat(32);
        let mut with_fp = base.to_vec();
        with_fp.extend(["--ca-fingerprint", &fp, "--hostname", "web"]);
        assert_eq!(
            parse(&with_fp).unwrap(),
            Command::Activate {
                server: "198.18.0.1:8443".into(),
                activation_code: "abc".into(),
                trust: Trust::CaFingerprint(fp.clone()),
                hostname: "web".into(),
                release_key: None,
            }
        );
        let key = "5a".repeat(32);
        let mut with_key = with_fp.clone();
        with_key.extend(["--release-key", &key]);
        assert!(
            matches!(parse(&with_key).unwrap(), Command::Activate { release_key: Some(k), .. } if k == [0x5a; 32])
        );
        with_key.pop();
        with_key.push("5a");
        assert!(parse(&with_key).unwrap_err().contains("release key"));
        assert_eq!(parse(&["upgrade", "0.2.0"]).unwrap(), Command::Upgrade { version: Some("0.2.0".into()) });
        assert_eq!(parse(&["upgrade"]).unwrap(), Command::Upgrade { version: None });
        assert_eq!(parse(&["upgrade", "--status"]).unwrap(), Command::UpgradeStatus);
        assert!(parse(&["upgrade", "../etc"]).is_err());
        let mut both = with_fp.clone();
        both.extend(["--ca-cert", "/tmp/ca.pem"]);
        assert!(parse(&both).unwrap_err().contains("not both"));
    }

    #[test]
    fn activate_rejects_bad_servers_and_fingerprints() {
        let fp = "ab".repeat(32);
        let no_port =
            ["activate", "--management-server", "pce", "--activation-code", "a", "--ca-fingerprint", &fp];
        assert!(parse(&no_port).unwrap_err().contains("HOST:PORT"));
        let short =
            ["activate", "--management-server", "pce:1", "--activation-code", "a", "--ca-fingerprint", "ab"];
        assert!(parse(&short).unwrap_err().contains("fingerprint"));
        let escape = [
            "activate",
            "--management-server",
            "pce:1",
            "--activation-code",
            "a",
            "--ca-fingerprint",
            &fp,
            "--hostname",
            "web\x1b[31m",
        ];
        let why = parse(&escape).unwrap_err();
        assert!(why.starts_with("--hostname \"web\\u{1b}[31m\" is not one the PCE accepts"), "{why}");
    }

    #[test]
    fn deactivate_offers_open_and_saved() {
        let open = Command::Deactivate { after: FirewallAfter::Open };
        assert_eq!(parse(&["deactivate"]).unwrap(), open);
        assert_eq!(parse(&["deactivate", "--firewall", "open"]).unwrap(), open);
        assert_eq!(
            parse(&["deactivate", "--firewall", "saved"]).unwrap(),
            Command::Deactivate { after: FirewallAfter::Saved }
        );
        assert!(parse(&["deactivate", "--firewall", "closed"]).unwrap_err().contains("open or saved"));
    }

    #[test]
    fn history_lists_or_shows_one() {
        assert_eq!(parse(&["history"]).unwrap(), Command::History { json: false, show: None });
        assert_eq!(
            parse(&["history", "--show", "7"]).unwrap(),
            Command::History { json: false, show: Some(7) }
        );
        assert!(parse(&["history", "--json", "--show", "7"]).unwrap_err().contains("not both"));
        assert!(parse(&["history", "--show", "x"]).is_err());
        assert_eq!(parse(&["suspend"]).unwrap(), Command::Suspend);
        assert_eq!(parse(&["unsuspend"]).unwrap(), Command::Unsuspend);
        assert_eq!(parse(&["restore"]).unwrap(), Command::Restore);
    }

    #[test]
    fn status_all_support_report_and_connectivity_test_parse() {
        assert_eq!(parse(&["status", "-a"]).unwrap(), Command::Status { json: false, all: true });
        assert_eq!(parse(&["status", "--all", "--json"]).unwrap(), Command::Status { json: true, all: true });
        assert_eq!(parse(&["gen-supportreport"]).unwrap(), Command::GenSupportReport { output: None });
        assert_eq!(
            parse(&["gen-supportreport", "--output", "/tmp/r.tar"]).unwrap(),
            Command::GenSupportReport { output: Some(PathBuf::from("/tmp/r.tar")) }
        );
        match parse(&["connectivity-test", "198.18.0.3:5432", "db:53/udp"]).unwrap() {
            Command::ConnectivityTest { peers } => {
                assert_eq!(peers.len(), 2);
                assert_eq!((peers[1].port, peers[1].protocol), (Some(53), ven_proto::Protocol::Udp));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(parse(&["connectivity-test"]).unwrap(), Command::ConnectivityTest { peers: Vec::new() });
        assert!(parse(&["connectivity-test", "db:0"]).unwrap_err().contains("port"));
    }
}
