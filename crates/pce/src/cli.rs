//! Command-line arguments: the raw argh structs and their one conversion into a validated
//! [`Command`]. Nothing else in the crate sees argh.

use crate::app;
use crate::ctl::{self, EventFormat, LabelRef, ServiceSpec};
use crate::orgevents::EventType;
use crate::policy;
use crate::serve::{self, DEFAULT_DATA_DIR};
use crate::traffic;
use argh::FromArgs;
use std::net::IpAddr;
use std::path::PathBuf;
use ven_proto::{CustomChain, PolicyState, Protocol, RuleFamily};

/// What the command line asks for.
pub enum Command {
    Serve(serve::Config),
    Admin(ctl::Target, ctl::Command),
    /// Offline: files only, no PCE needed.
    Release(crate::release::Command),
}

/// Parses the process arguments (argh prints help and usage errors itself and exits), then
/// validates them.
pub fn parse() -> Result<Command, String> {
    let args: Args = argh::from_env();
    convert(args)
}

#[derive(FromArgs)]
/// Reference Policy Compute Engine for ven: `pce serve` runs it, the other commands administer it
/// through its admin API.
struct Args {
    /// data directory (default /var/lib/pce)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// admin API address HOST:PORT (default 127.0.0.1:8443)
    #[argh(option)]
    server: Option<String>,
    /// admin API key (default: read from DIR/admin.key)
    #[argh(option)]
    api_key: Option<String>,
    /// CA certificate to trust (default DIR/ca.pem)
    #[argh(option)]
    ca_cert: Option<PathBuf>,
    #[argh(subcommand)]
    command: Sub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Sub {
    Serve(ServeArgs),
    ActivationCode(ActivationCodeArgs),
    CaFingerprint(CaFingerprintArgs),
    Label(LabelArgs),
    ApiKey(ApiKeyArgs),
    Workload(WorkloadArgs),
    Rule(RuleArgs),
    Provision(ProvisionArgs),
    Events(EventsArgs),
    Traffic(TrafficArgs),
    ReleaseKey(ReleaseKeyArgs),
    Release(ReleaseArgs),
    SupportReport(SupportReportArgs),
    Upgrade(UpgradeArgs),
}

#[derive(FromArgs)]
#[argh(subcommand, name = "upgrade")]
/// order VENs to upgrade to a release of the store (`pce upgrade VERSION --all`, `pce upgrade
/// VERSION HOST...`), or cancel orders (`pce upgrade --cancel --all|HOST...`)
struct UpgradeArgs {
    /// every workload (per-workload orders still override it)
    #[argh(switch)]
    all: bool,
    /// cancel the orders instead
    #[argh(switch)]
    cancel: bool,
    /// VERSION then hostnames or ids (without VERSION with --cancel)
    #[argh(positional)]
    args: Vec<String>,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "support-report")]
/// ask a workload's VEN for a support report, list the reports received, save one
struct SupportReportArgs {
    #[argh(subcommand)]
    command: SupportReportSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum SupportReportSub {
    Request(SupportReportRequestArgs),
    List(SupportReportListArgs),
    Get(SupportReportGetArgs),
}

#[derive(FromArgs)]
#[argh(subcommand, name = "request")]
/// ask the workload's VEN for a support report (a lightning bolt, and every heartbeat answer
/// until it arrives)
struct SupportReportRequestArgs {
    /// hostname or numeric id of the workload
    #[argh(positional)]
    host: String,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
/// list the support reports received, oldest first
struct SupportReportListArgs {
    /// print the raw JSON array
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "get")]
/// write a support report's archive (a tar) to a file
struct SupportReportGetArgs {
    /// id of the report (see `pce support-report list`)
    #[argh(positional)]
    id: u64,
    /// file to write (mode 0600, replaced whole)
    #[argh(option)]
    output: PathBuf,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "release-key")]
/// the Ed25519 key agent releases are signed with (offline: no PCE needed)
struct ReleaseKeyArgs {
    #[argh(subcommand)]
    command: ReleaseKeySub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum ReleaseKeySub {
    Generate(ReleaseKeyGenerateArgs),
    Trust(ReleaseKeyTrustArgs),
}

#[derive(FromArgs)]
#[argh(subcommand, name = "trust")]
/// trust a public release key for this PCE's release store (DIR/release-key.pub): releases are
/// added only when their signature verifies with it
struct ReleaseKeyTrustArgs {
    /// the public key (64 hex digits, as `pce release-key generate` prints it)
    #[argh(positional)]
    key: String,
    /// replace the key already trusted
    #[argh(switch)]
    replace: bool,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "generate")]
/// write a new signing key (PKCS#8, mode 0600, never overwritten) and print its public half, the
/// `release_key` VENs pin
struct ReleaseKeyGenerateArgs {
    /// where to write the signing key
    #[argh(option)]
    output: PathBuf,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "release")]
/// agent releases: sign and verify (offline), add, list and remove those of the data directory's
/// store (works while `pce serve` runs)
struct ReleaseArgs {
    #[argh(subcommand)]
    command: ReleaseSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum ReleaseSub {
    Sign(ReleaseSignArgs),
    Verify(ReleaseVerifyArgs),
    Add(ReleaseAddArgs),
    List(ReleaseListArgs),
    Remove(ReleaseRemoveArgs),
}

#[derive(FromArgs)]
#[argh(subcommand, name = "add")]
/// copy an agent binary into the release store, when its signature verifies with the trusted key
struct ReleaseAddArgs {
    /// the agent binary
    #[argh(positional)]
    binary: PathBuf,
    /// the release's version
    #[argh(option)]
    version: String,
    /// the target triple it is built for
    #[argh(option)]
    target: String,
    /// its detached signature (128 hex digits, from `pce release sign`)
    #[argh(option)]
    signature: Option<String>,
    /// sign it here with this signing key instead
    #[argh(option)]
    signing_key: Option<PathBuf>,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
/// list the releases of the store
struct ReleaseListArgs {
    /// print a JSON array
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "remove")]
/// remove a release from the store
struct ReleaseRemoveArgs {
    /// the release's version
    #[argh(positional)]
    version: String,
    /// the target triple
    #[argh(option)]
    target: String,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "sign")]
/// print the detached signature (hex) of an agent binary as a release
struct ReleaseSignArgs {
    /// the agent binary
    #[argh(positional)]
    binary: PathBuf,
    /// the signing key (from `pce release-key generate`)
    #[argh(option)]
    key: PathBuf,
    /// the release's version
    #[argh(option)]
    version: String,
    /// the target triple it is built for
    #[argh(option)]
    target: String,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "verify")]
/// check an agent binary against its signature and a public release key, as a VEN does
struct ReleaseVerifyArgs {
    /// the agent binary
    #[argh(positional)]
    binary: PathBuf,
    /// the signature (128 hex digits)
    #[argh(option)]
    signature: String,
    /// the public release key (64 hex digits)
    #[argh(option)]
    key: String,
    /// the release's version
    #[argh(option)]
    version: String,
    /// the target triple it is built for
    #[argh(option)]
    target: String,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "serve")]
/// run the PCE: VEN and admin API (HTTPS) and the event service
struct ServeArgs {
    /// data directory (default /var/lib/pce)
    #[argh(option)]
    data_dir: Option<PathBuf>,
    /// address to listen on (default 0.0.0.0)
    #[argh(option, default = "IpAddr::from([0, 0, 0, 0])")]
    listen: IpAddr,
    /// port of the VEN and admin API (default 8443)
    #[argh(option, default = "ven_proto::DEFAULT_API_PORT")]
    api_port: u16,
    /// port of the event service (default 8444)
    #[argh(option, default = "ven_proto::DEFAULT_EVENT_PORT")]
    event_port: u16,
    /// extra name or address for the server certificate (repeatable)
    #[argh(option)]
    san: Vec<String>,
    /// seconds between VEN heartbeats (default 300)
    #[argh(option, default = "300")]
    heartbeat_interval: u32,
    /// silent heartbeat intervals before a workload goes offline and leaves its peers' policies
    /// (default 12; suspended workloads never do)
    #[argh(option, default = "app::DEFAULT_OFFLINE_AFTER_HEARTBEATS")]
    offline_after_heartbeats: u32,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "activation-code")]
/// print the default pairing profile's activation code
struct ActivationCodeArgs {}

#[derive(FromArgs)]
#[argh(subcommand, name = "ca-fingerprint")]
/// print the SHA-256 fingerprint of the CA certificate (offline)
struct CaFingerprintArgs {}

#[derive(FromArgs)]
#[argh(subcommand, name = "label")]
/// create and list labels
struct LabelArgs {
    #[argh(subcommand)]
    command: LabelSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum LabelSub {
    Create(LabelCreateArgs),
    List(LabelListArgs),
}

#[derive(FromArgs)]
#[argh(subcommand, name = "api-key")]
/// create, list and delete API keys (HTTP Basic credentials for scripts and illumio-py)
struct ApiKeyArgs {
    #[argh(subcommand)]
    command: ApiKeySub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum ApiKeySub {
    Create(ApiKeyCreateArgs),
    List(ApiKeyListArgs),
    Delete(ApiKeyDeleteArgs),
}

#[derive(FromArgs)]
#[argh(subcommand, name = "create")]
/// create an API key and print its id (auth_username) and secret, shown only this once
struct ApiKeyCreateArgs {
    /// a name for the key
    #[argh(option, default = "String::new()")]
    name: String,
    /// what the key is for
    #[argh(option, default = "String::new()")]
    description: String,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
/// list the API keys (never their secrets)
struct ApiKeyListArgs {
    /// print the raw JSON array
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "delete")]
/// delete an API key: its secret stops working at once
struct ApiKeyDeleteArgs {
    /// the key's id (key_id, as `list` shows it)
    #[argh(positional)]
    key_id: String,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "create")]
/// create a label and print its href
struct LabelCreateArgs {
    /// label key, e.g. role
    #[argh(positional)]
    key: String,
    /// label value, e.g. web
    #[argh(positional)]
    value: String,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
/// list the labels as a table
struct LabelListArgs {
    /// print the raw JSON array
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
/// list the workloads as a table
struct WorkloadListArgs {
    /// print the raw JSON array
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "show")]
/// show one workload: its agent's version, target and host uptime, state, labels, addresses
struct WorkloadShowArgs {
    /// hostname or numeric id of the workload
    #[argh(positional)]
    host: String,
    /// print the admin API's JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "workload")]
/// list workloads, set their labels or policy state, edit their custom iptables rules
struct WorkloadArgs {
    #[argh(subcommand)]
    command: WorkloadSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum WorkloadSub {
    List(WorkloadListArgs),
    Show(WorkloadShowArgs),
    Set(WorkloadSetArgs),
    Services(WorkloadServicesArgs),
    CustomRule(CustomRuleArgs),
}

#[derive(FromArgs)]
#[argh(subcommand, name = "custom-rule")]
/// list, add and remove a workload's custom iptables rules (they apply at once, no provisioning)
struct CustomRuleArgs {
    #[argh(subcommand)]
    command: CustomRuleSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum CustomRuleSub {
    List(CustomRuleListArgs),
    Add(CustomRuleAddArgs),
    Remove(CustomRuleRemoveArgs),
}

#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
/// list a workload's custom rules as a table
struct CustomRuleListArgs {
    /// hostname or numeric id of the workload
    #[argh(positional)]
    host: String,
    /// print the raw JSON array
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "add")]
/// add a custom rule to a workload and print its href
struct CustomRuleAddArgs {
    /// hostname or numeric id of the workload
    #[argh(positional)]
    host: String,
    /// chain: input, output or forward
    #[argh(option)]
    chain: String,
    /// address family: v4, v6 or both (default both)
    #[argh(option, default = "String::from(\"both\")")]
    family: String,
    /// matches and target as `iptables -A CHAIN` takes them, e.g. "-p tcp --dport 9000 -j ACCEPT"
    #[argh(option)]
    rule: String,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "remove")]
/// remove a custom rule from a workload
struct CustomRuleRemoveArgs {
    /// hostname or numeric id of the workload
    #[argh(positional)]
    host: String,
    /// id of the custom rule (see `pce workload custom-rule list`)
    #[argh(positional)]
    id: u32,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "events")]
/// list the organisation events, oldest first
struct EventsArgs {
    /// print the raw JSON array (same as --format json)
    #[argh(switch)]
    json: bool,
    /// output: table (default), json, cef or leef (one line per event)
    #[argh(option)]
    format: Option<String>,
    /// only events of this type, e.g. tampering or server_suspended
    #[argh(option, long = "type")]
    event_type: Option<String>,
    /// only the newest N events
    #[argh(option)]
    max: Option<usize>,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "traffic")]
/// query the flows the VENs uploaded, newest first
struct TrafficArgs {
    /// source IP address or CIDR
    #[argh(option)]
    src: Option<String>,
    /// destination IP address or CIDR
    #[argh(option)]
    dst: Option<String>,
    /// destination port (ICMP type for ICMP)
    #[argh(option)]
    port: Option<String>,
    /// protocol: tcp, udp, icmp, icmpv6 or a number
    #[argh(option)]
    proto: Option<String>,
    /// verdict: allowed, observed, would-drop or dropped
    #[argh(option)]
    verdict: Option<String>,
    /// workload: hostname or numeric id
    #[argh(option)]
    workload: Option<String>,
    /// flows seen at or after: Unix seconds or RFC 3339 (2026-11-27T12:00:00Z)
    #[argh(option)]
    since: Option<String>,
    /// flows seen at or before: Unix seconds or RFC 3339
    #[argh(option)]
    until: Option<String>,
    /// at most this many flows, the newest (default 1000, at most 100000)
    #[argh(option)]
    limit: Option<String>,
    /// print the admin API's JSON answer
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "services")]
/// list the services a workload's VEN reported listening (protocol, address, port, process,
/// pid, user)
struct WorkloadServicesArgs {
    /// hostname or numeric id of the workload
    #[argh(positional)]
    host: String,
    /// print JSON (Illumio's `services` block) instead of a table
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "set")]
/// set a workload's labels (each replaces the label of the same key) and/or policy state
struct WorkloadSetArgs {
    /// hostname or numeric id of the workload
    #[argh(positional)]
    host: String,
    /// KEY=VALUE of an existing label (repeatable)
    #[argh(option)]
    label: Vec<String>,
    /// policy state: idle, build, test or enforced
    #[argh(option)]
    state: Option<String>,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "rule")]
/// edit the draft rules
struct RuleArgs {
    #[argh(subcommand)]
    command: RuleSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum RuleSub {
    Add(RuleAddArgs),
}

#[derive(FromArgs)]
#[argh(subcommand, name = "add")]
/// add a rule to the draft (takes effect at `pce provision`) and print its href
struct RuleAddArgs {
    /// labels of the consumers: KEY=VALUE[,KEY=VALUE...]
    #[argh(option)]
    consumers: String,
    /// labels of the providers: KEY=VALUE[,KEY=VALUE...]
    #[argh(option)]
    providers: String,
    /// service the providers offer: PORT[-PORT]/PROTO, PROTO tcp or udp (repeatable)
    #[argh(option)]
    service: Vec<String>,
}

#[derive(FromArgs)]
#[argh(subcommand, name = "provision")]
/// make the draft rules active
struct ProvisionArgs {}

fn convert(args: Args) -> Result<Command, String> {
    let data_dir = args.data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let command = match args.command {
        Sub::Serve(serve) => {
            if serve.heartbeat_interval == 0 {
                return Err("--heartbeat-interval must be at least 1 second".into());
            }
            if serve.offline_after_heartbeats == 0 {
                return Err("--offline-after-heartbeats must be at least 1".into());
            }
            return Ok(Command::Serve(serve::Config {
                // `pce serve --data-dir` and `pce --data-dir DIR serve` both work.
                data_dir: serve.data_dir.unwrap_or(data_dir),
                listen: serve.listen,
                api_port: serve.api_port,
                event_port: serve.event_port,
                sans: serve.san,
                heartbeat_interval_s: serve.heartbeat_interval,
                offline_after_heartbeats: serve.offline_after_heartbeats,
            }));
        }
        Sub::ReleaseKey(ReleaseKeyArgs { command: ReleaseKeySub::Generate(generate) }) => {
            return Ok(Command::Release(crate::release::Command::GenerateKey { output: generate.output }));
        }
        Sub::Release(ReleaseArgs { command: ReleaseSub::Sign(sign) }) => {
            return Ok(Command::Release(crate::release::Command::Sign {
                binary: sign.binary,
                key: sign.key,
                version: sign.version,
                target: sign.target,
            }));
        }
        Sub::Release(ReleaseArgs { command: ReleaseSub::Verify(verify) }) => {
            return Ok(Command::Release(crate::release::Command::Verify {
                binary: verify.binary,
                signature: verify.signature,
                public_key: verify.key,
                version: verify.version,
                target: verify.target,
            }));
        }
        Sub::ReleaseKey(ReleaseKeyArgs { command: ReleaseKeySub::Trust(trust) }) => {
            return Ok(Command::Release(crate::release::Command::TrustKey {
                data_dir,
                public_key: trust.key,
                replace: trust.replace,
            }));
        }
        Sub::Release(ReleaseArgs { command: ReleaseSub::Add(add) }) => {
            let signature = match (add.signature, add.signing_key) {
                (Some(hex), None) => crate::release::SignatureSource::Hex(hex),
                (None, Some(key)) => crate::release::SignatureSource::Key(key),
                _ => return Err("give one of --signature HEX and --signing-key KEYFILE".into()),
            };
            return Ok(Command::Release(crate::release::Command::Add {
                data_dir,
                binary: add.binary,
                version: add.version,
                target: add.target,
                signature,
            }));
        }
        Sub::Release(ReleaseArgs { command: ReleaseSub::List(list) }) => {
            return Ok(Command::Release(crate::release::Command::List { data_dir, json: list.json }));
        }
        Sub::Release(ReleaseArgs { command: ReleaseSub::Remove(remove) }) => {
            return Ok(Command::Release(crate::release::Command::Remove {
                data_dir,
                version: remove.version,
                target: remove.target,
            }));
        }
        Sub::Upgrade(upgrade) => upgrade_command(upgrade)?,
        Sub::ActivationCode(_) => ctl::Command::ActivationCode,
        Sub::CaFingerprint(_) => ctl::Command::CaFingerprint,
        Sub::Label(LabelArgs { command: LabelSub::Create(create) }) => {
            ctl::Command::LabelCreate { key: create.key, value: create.value }
        }
        Sub::ApiKey(ApiKeyArgs { command: ApiKeySub::Create(create) }) => {
            ctl::Command::ApiKeyCreate { name: create.name, description: create.description }
        }
        Sub::ApiKey(ApiKeyArgs { command: ApiKeySub::List(list) }) => {
            ctl::Command::ApiKeyList { json: list.json }
        }
        Sub::ApiKey(ApiKeyArgs { command: ApiKeySub::Delete(delete) }) => {
            ctl::Command::ApiKeyDelete { key_id: delete.key_id }
        }
        Sub::Label(LabelArgs { command: LabelSub::List(list) }) => {
            ctl::Command::LabelList { json: list.json }
        }
        Sub::Workload(WorkloadArgs { command: WorkloadSub::List(list) }) => {
            ctl::Command::WorkloadList { json: list.json }
        }
        Sub::Workload(WorkloadArgs { command: WorkloadSub::Show(args) }) => {
            ctl::Command::WorkloadShow { host: args.host, json: args.json }
        }
        Sub::Workload(WorkloadArgs { command: WorkloadSub::Services(args) }) => {
            ctl::Command::WorkloadServices { host: args.host, json: args.json }
        }
        Sub::Workload(WorkloadArgs { command: WorkloadSub::Set(set) }) => {
            let labels = set.label.iter().map(|text| label_ref(text)).collect::<Result<Vec<_>, _>>()?;
            let state = set.state.as_deref().map(str::parse::<PolicyState>).transpose()?;
            if labels.is_empty() && state.is_none() {
                return Err("nothing to set: give --label KEY=VALUE and/or --state STATE".into());
            }
            ctl::Command::WorkloadSet { host: set.host, labels, state }
        }
        Sub::Workload(WorkloadArgs { command: WorkloadSub::CustomRule(CustomRuleArgs { command }) }) => {
            match command {
                CustomRuleSub::List(list) => {
                    ctl::Command::CustomRuleList { host: list.host, json: list.json }
                }
                CustomRuleSub::Add(add) => {
                    let chain: CustomChain = add.chain.parse()?;
                    let family: RuleFamily = policy::parse_family(&add.family)?;
                    ctl::Command::CustomRuleAdd { host: add.host, chain, family, rule: add.rule }
                }
                CustomRuleSub::Remove(remove) => {
                    ctl::Command::CustomRuleRemove { host: remove.host, id: remove.id }
                }
            }
        }
        Sub::Events(events) => {
            let format = match (events.json, events.format.as_deref()) {
                (true, None | Some("json")) | (false, Some("json")) => EventFormat::Json,
                (false, None | Some("table")) => EventFormat::Table,
                (false, Some("cef")) => EventFormat::Cef,
                (false, Some("leef")) => EventFormat::Leef,
                (true, Some(other)) => return Err(format!("--json contradicts --format {other}")),
                (false, Some(other)) => {
                    return Err(format!("unknown format {other:?} (expected table, json, cef or leef)"));
                }
            };
            let event_type = events.event_type.as_deref().map(str::parse::<EventType>).transpose()?;
            ctl::Command::Events { format, event_type, max: events.max }
        }
        Sub::Traffic(args) => ctl::Command::Traffic { query: traffic_query(&args)?, json: args.json },
        Sub::SupportReport(SupportReportArgs { command }) => match command {
            SupportReportSub::Request(args) => ctl::Command::SupportReportRequest { host: args.host },
            SupportReportSub::List(args) => ctl::Command::SupportReportList { json: args.json },
            SupportReportSub::Get(args) => {
                ctl::Command::SupportReportGet { id: args.id, output: args.output }
            }
        },
        Sub::Rule(RuleArgs { command: RuleSub::Add(add) }) => {
            if add.service.is_empty() {
                return Err("a rule needs at least one --service PORT[-PORT]/PROTO".into());
            }
            ctl::Command::RuleAdd {
                consumers: label_list(&add.consumers)?,
                providers: label_list(&add.providers)?,
                services: add.service.iter().map(|text| service(text)).collect::<Result<_, _>>()?,
            }
        }
        Sub::Provision(_) => ctl::Command::Provision,
    };
    let target = ctl::Target {
        data_dir,
        server: args.server.unwrap_or_else(|| format!("127.0.0.1:{}", ven_proto::DEFAULT_API_PORT)),
        api_key: args.api_key,
        ca_cert: args.ca_cert,
    };
    Ok(Command::Admin(target, command))
}

/// `pce upgrade`: a version and hosts or --all; with --cancel, hosts or --all.
fn upgrade_command(args: UpgradeArgs) -> Result<ctl::Command, String> {
    let mut rest = args.args.into_iter();
    let version = if args.cancel {
        None
    } else {
        let version =
            rest.next().ok_or("give the release's version: pce upgrade VERSION (--all | HOST...)")?;
        ven_proto::release::check_version(&version).map_err(|e| e.to_string())?;
        Some(version)
    };
    let hosts: Vec<String> = rest.collect();
    match (args.all, hosts.is_empty()) {
        (true, false) => Err("give --all or hosts, not both".into()),
        (false, true) => Err("give --all or at least one host".into()),
        _ => Ok(ctl::Command::Upgrade { version, all: args.all, hosts }),
    }
}

/// The options of `pce traffic`, checked by the admin API's own parser.
fn traffic_query(args: &TrafficArgs) -> Result<traffic::Query, String> {
    let mut query = traffic::Query::default();
    let options = [
        ("src", &args.src),
        ("dst", &args.dst),
        ("port", &args.port),
        ("proto", &args.proto),
        ("verdict", &args.verdict),
        ("workload", &args.workload),
        ("since", &args.since),
        ("until", &args.until),
        ("limit", &args.limit),
    ];
    for (name, value) in options {
        if let Some(value) = value {
            query.set(name, value).map_err(|e| format!("--{e}"))?;
        }
    }
    query.check().map_err(|e| format!("--{e}"))?;
    Ok(query)
}

/// `KEY=VALUE`.
fn label_ref(text: &str) -> Result<LabelRef, String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() && !value.is_empty() => {
            Ok(LabelRef { key: key.to_string(), value: value.to_string() })
        }
        _ => Err(format!("expected a label as KEY=VALUE, got {text:?}")),
    }
}

/// `KEY=VALUE[,KEY=VALUE...]`.
fn label_list(text: &str) -> Result<Vec<LabelRef>, String> {
    text.split(',').map(label_ref).collect()
}

/// `PORT[-PORT]/PROTO`.
fn service(text: &str) -> Result<ServiceSpec, String> {
    let bad = || format!("expected a service as PORT[-PORT]/PROTO (PROTO tcp or udp), got {text:?}");
    let (ports, proto) = text.split_once('/').ok_or_else(bad)?;
    let protocol: Protocol = proto.parse()?;
    if !matches!(protocol, Protocol::Tcp | Protocol::Udp) {
        return Err(format!("{text:?}: only tcp and udp services are supported"));
    }
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p >= 1)
            .ok_or_else(|| format!("{text:?}: {p:?} is not a port 1-65535"))
    };
    let (first, last) = match ports.split_once('-') {
        Some((first, last)) => (port(first)?, port(last)?),
        None => (port(ports)?, port(ports)?),
    };
    if last < first {
        return Err(format!("{text:?}: the range ends before it starts"));
    }
    Ok(ServiceSpec { first, last, protocol })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        let args = Args::from_args(&["pce"], args).map_err(|e| e.output)?;
        convert(args)
    }

    #[test]
    fn serve_takes_the_data_dir_on_either_side() {
        let Ok(Command::Serve(config)) =
            parse(&["--data-dir", "/a", "serve", "--api-port", "1", "--san", "x"])
        else {
            panic!("serve expected");
        };
        assert_eq!(config.data_dir, PathBuf::from("/a"));
        assert_eq!((config.api_port, config.event_port, config.heartbeat_interval_s), (1, 8444, 300));
        assert_eq!(config.sans, vec!["x".to_string()]);
        assert_eq!(config.listen, IpAddr::from([0, 0, 0, 0]));
        let Ok(Command::Serve(config)) = parse(&["serve", "--data-dir", "/b"]) else {
            panic!("serve expected")
        };
        assert_eq!(config.data_dir, PathBuf::from("/b"));
    }

    #[test]
    fn admin_arguments_are_validated() {
        let Ok(Command::Admin(target, ctl::Command::RuleAdd { consumers, services, .. })) = parse(&[
            "rule",
            "add",
            "--consumers",
            "role=web,env=prod",
            "--providers",
            "role=db",
            "--service",
            "5432/tcp",
            "--service",
            "1000-2000/udp",
        ]) else {
            panic!("rule add expected");
        };
        assert_eq!(target.server, "127.0.0.1:8443");
        assert_eq!(consumers.len(), 2);
        assert_eq!(services[1], ServiceSpec { first: 1000, last: 2000, protocol: Protocol::Udp });
        assert!(service("0/tcp").is_err());
        assert!(service("80/sctp").is_err());
        assert!(service("90-80/tcp").is_err());
        assert!(service("80").is_err());
        assert!(label_ref("role").is_err());
        assert!(parse(&["workload", "set", "web"]).is_err());
        assert!(parse(&["workload", "set", "web", "--state", "enforcing"]).is_err());
        assert!(parse(&["workload", "set", "web", "--label", "role=web"]).is_ok());
    }

    #[test]
    fn custom_rule_and_event_arguments_are_validated() {
        let add = ["workload", "custom-rule", "add", "web", "--chain", "input", "--rule", "-j ACCEPT"];
        let Ok(Command::Admin(_, ctl::Command::CustomRuleAdd { host, chain, family, rule })) = parse(&add)
        else {
            panic!("custom-rule add expected");
        };
        assert_eq!(
            (host.as_str(), chain, family, rule.as_str()),
            ("web", CustomChain::Input, RuleFamily::Both, "-j ACCEPT")
        );
        let bad_chain = ["workload", "custom-rule", "add", "web", "--chain", "INPUT", "--rule", "-j ACCEPT"];
        assert!(parse(&bad_chain).err().unwrap_or_default().contains("input, output or forward"));
        let bad_family = [&add[..], &["--family", "4"]].concat();
        assert!(parse(&bad_family).err().unwrap_or_default().contains("v4, v6 or both"));
        assert!(matches!(
            parse(&["workload", "custom-rule", "remove", "web", "3"]),
            Ok(Command::Admin(_, ctl::Command::CustomRuleRemove { id: 3, .. }))
        ));
        assert!(parse(&["workload", "custom-rule", "remove", "web", "x"]).is_err());

        let Ok(Command::Admin(_, ctl::Command::Events { format, event_type, max })) =
            parse(&["events", "--format", "leef", "--type", "tampering", "--max", "5"])
        else {
            panic!("events expected");
        };
        assert_eq!((format, event_type, max), (EventFormat::Leef, Some(EventType::Tampering), Some(5)));
        assert!(matches!(
            parse(&["events", "--json"]),
            Ok(Command::Admin(_, ctl::Command::Events { format: EventFormat::Json, .. }))
        ));
        assert!(parse(&["events", "--json", "--format", "cef"]).is_err());
        assert!(parse(&["events", "--format", "xml"]).is_err());
        assert!(parse(&["events", "--type", "nope"]).err().unwrap_or_default().contains("tampering"));
        assert!(parse(&["serve", "--offline-after-heartbeats", "0"]).is_err());
    }

    #[test]
    fn support_report_commands_parse() {
        assert!(matches!(
            parse(&["support-report", "request", "web"]),
            Ok(Command::Admin(_, ctl::Command::SupportReportRequest { host })) if host == "web"
        ));
        assert!(matches!(
            parse(&["support-report", "get", "3", "--output", "/tmp/r.tar"]),
            Ok(Command::Admin(_, ctl::Command::SupportReportGet { id: 3, output })) if output == std::path::Path::new("/tmp/r.tar")
        ));
        assert!(matches!(
            parse(&["support-report", "list", "--json"]),
            Ok(Command::Admin(_, ctl::Command::SupportReportList { json: true }))
        ));
    }

    #[test]
    fn release_and_upgrade_commands_parse() {
        assert!(matches!(
            parse(&["--data-dir", "/d", "release", "add", "/b", "--version", "1.0", "--target", "a-b", "--signature", "00"]),
            Ok(Command::Release(crate::release::Command::Add { data_dir, .. })) if data_dir == std::path::Path::new("/d")
        ));
        let both = [
            "release",
            "add",
            "/b",
            "--version",
            "1.0",
            "--target",
            "a-b",
            "--signature",
            "00",
            "--signing-key",
            "/k",
        ];
        assert!(parse(&both).err().unwrap_or_default().contains("one of"));
        assert!(parse(&["release", "add", "/b", "--version", "1.0", "--target", "a-b"]).is_err());
        assert!(matches!(
            parse(&["release-key", "trust", "ab", "--replace"]),
            Ok(Command::Release(crate::release::Command::TrustKey { replace: true, .. }))
        ));
        assert!(matches!(
            parse(&["upgrade", "1.2.0", "web", "db"]),
            Ok(Command::Admin(_, ctl::Command::Upgrade { version: Some(v), all: false, hosts })) if v == "1.2.0" && hosts == ["web", "db"]
        ));
        assert!(matches!(
            parse(&["upgrade", "--cancel", "--all"]),
            Ok(Command::Admin(_, ctl::Command::Upgrade { version: None, all: true, .. }))
        ));
        assert!(parse(&["upgrade", "1.2.0"]).is_err(), "neither --all nor a host");
        assert!(parse(&["upgrade", "1.2.0", "--all", "web"]).is_err(), "both");
        assert!(parse(&["upgrade", "../x", "--all"]).is_err(), "a malformed version");
        assert!(parse(&["upgrade", "--cancel"]).is_err());
    }

    #[test]
    fn traffic_options_are_checked_like_the_api_parameters() {
        let Ok(Command::Admin(_, ctl::Command::Traffic { query, json })) = parse(&[
            "traffic",
            "--src",
            "198.18.0.7/24",
            "--proto",
            "udp",
            "--verdict",
            "would-drop",
            "--since",
            "2026-11-27T12:00:00Z",
            "--limit",
            "10",
            "--json",
        ]) else {
            panic!("traffic expected");
        };
        assert!(json);
        assert_eq!(query.src, Some("198.18.0.0/24".parse().unwrap()));
        assert_eq!((query.proto, query.since, query.limit), (Some(17), Some(1_795_780_800), 10));
        assert_eq!(
            query.to_query_string(),
            "src=198.18.0.0%2F24&proto=udp&verdict=would-drop&since=1795780800&limit=10"
        );
        let error = |args: &[&str]| parse(args).err().unwrap_or_default();
        assert!(error(&["traffic", "--port", "http"]).starts_with("--port: \"http\""));
        assert!(error(&["traffic", "--verdict", "blocked"]).contains("would-drop"));
        assert!(error(&["traffic", "--since", "20", "--until", "10"]).starts_with("--since (1970"));
        assert!(error(&["traffic", "--limit", "1000000"]).starts_with("--limit:"));
        let Ok(Command::Admin(_, ctl::Command::Traffic { query, json: false })) = parse(&["traffic"]) else {
            panic!("traffic expected");
        };
        assert_eq!(query, traffic::Query::default());
    }
}
