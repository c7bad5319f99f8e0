//! The `ven` command line: raw arguments ([`args`]) are validated once into a [`Command`], which
//! is then carried out against the data directory and, when one runs, the agent.

mod args;

use std::path::PathBuf;
use std::process::ExitCode;

use crate::agent::control::{self, ControlError, ControlRequest, ControlResponse};
use crate::agent::status::StatusReport;
use crate::agent::{self, AgentError, Trust};
use crate::state::DataDir;

/// A validated command.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Activate { server: String, activation_code: String, trust: Trust, hostname: String },
    Agent,
    Status { json: bool },
    Deactivate,
    Version,
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
                let hostname = a.hostname.unwrap_or_else(agent::host::system_hostname);
                if hostname.is_empty() || hostname.len() > 253 || hostname.chars().any(char::is_whitespace) {
                    return Err(format!("{hostname:?} is not a usable host name"));
                }
                Command::Activate {
                    server: a.management_server,
                    activation_code: a.activation_code.trim().to_string(),
                    trust,
                    hostname,
                }
            }
            args::RawCommand::Agent(_) => Command::Agent,
            args::RawCommand::Status(s) => Command::Status { json: s.json },
            args::RawCommand::Deactivate(d) => match d.firewall.as_str() {
                "open" => Command::Deactivate,
                "saved" => {
                    return Err("--firewall saved needs a snapshot taken at activation, which this \
                                version does not take yet; use --firewall open"
                        .into());
                }
                other => return Err(format!("--firewall {other:?}: expected open")),
            },
            args::RawCommand::Version(_) => Command::Version,
        })
    }
}

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

fn execute(command: Command, data: &DataDir) -> Result<(), AgentError> {
    match command {
        Command::Version => println!("ven {}", env!("CARGO_PKG_VERSION")),
        Command::Agent => agent::run(data.clone())?,
        Command::Activate { server, activation_code, trust, hostname } => {
            let identity = agent::activate(data, &server, &activation_code, &trust, &hostname)?;
            println!(
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
                Ok(_) => println!("The running agent picked up the pairing."),
                Err(ControlError::NotRunning(_)) => {
                    println!("Start the agent (`ven agent`) to receive the policy.")
                }
                Err(e) => eprintln!("ven: the pairing is stored, but the agent was not told: {e}"),
            }
        }
        Command::Status { json } => {
            let report =
                match control::request(&data.socket_path(), &ControlRequest::Status, control::STATUS_TIMEOUT)
                {
                    Ok(ControlResponse::Status(report)) => report,
                    Ok(_) | Err(ControlError::NotRunning(_)) => StatusReport::from_data_dir(data)?,
                    Err(e) => {
                        log::warn!("{e}; showing the saved status");
                        StatusReport::from_data_dir(data)?
                    }
                };
            if json {
                println!("{}", report.to_json());
            } else {
                println!("{}", report.to_human(crate::clock::now()));
            }
        }
        Command::Deactivate => {
            let notice = match control::request(
                &data.socket_path(),
                &ControlRequest::Deactivate,
                control::WORK_TIMEOUT,
            ) {
                Ok(ControlResponse::Deactivated { pce_notice }) => pce_notice,
                Ok(ControlResponse::Failed(message)) if message.contains("not activated") => {
                    return Err(AgentError::NotActivated);
                }
                Ok(other) => {
                    eprintln!("ven: the agent could not deactivate: {other:?}");
                    return Err(AgentError::NotActivated);
                }
                Err(ControlError::NotRunning(_)) => agent::deactivate_offline(data)?,
                Err(e) => return Err(e.into()),
            };
            match notice {
                None => println!("Deactivated: the PCE was notified and the firewall is open."),
                Some(why) => println!(
                    "Deactivated locally and the firewall is open, but the PCE was not notified: {why}"
                ),
            }
        }
    }
    Ok(())
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
                hostname: "web".into()
            }
        );
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
    }

    #[test]
    fn deactivate_offers_only_what_exists() {
        assert_eq!(parse(&["deactivate"]).unwrap(), Command::Deactivate);
        assert_eq!(parse(&["deactivate", "--firewall", "open"]).unwrap(), Command::Deactivate);
        assert!(parse(&["deactivate", "--firewall", "saved"]).unwrap_err().contains("snapshot"));
        assert!(parse(&["deactivate", "--firewall", "closed"]).is_err());
    }
}
